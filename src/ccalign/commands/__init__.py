"""One module per `ccalign <command>` (see ``ccalign.cli``)."""
