"""`ccalign <command>`: each module in ``ccalign.commands`` contributes one sub-command.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``; the
sub-command's name is the module name with underscores as dashes (``extract_codes`` ->
``extract-codes``). Imports are deferred so ``ccalign --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import ccalign
import ccalign.commands


def _command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(ccalign.commands.__path__))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccalign", description="Condition Contrastive Alignment for AR image generators"
    )
    parser.add_argument("--version", action="version", version=f"ccalign {ccalign.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in _command_modules():
        module = importlib.import_module(f"ccalign.commands.{name}")
        sub = subparsers.add_parser(
            name.replace("_", "-"), help=module.HELP, description=module.HELP
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    except (ValueError, FileNotFoundError) as exc:  # user errors: message, no traceback
        print(f"ccalign {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
