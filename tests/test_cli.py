"""The `ccalign` entry point: every command is reachable and user errors are one clear line."""


from ccalign.cli import build_parser, main

COMMANDS = {
    "demo",
    "eval",
    "export",
    "extract-codes",
    "finetune",
    "models",
    "pretrain",
    "sample",
    "theory",
    "train-classifier",
    "train-tokenizer",
}


def test_every_command_is_listed(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in COMMANDS:
        assert name in listed
    assert COMMANDS <= set(build_parser()._subparsers._group_actions[0].choices)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: ccalign" in capsys.readouterr().out


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["finetune", "--config", str(tmp_path / "missing.toml")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("ccalign finetune: error:") and "missing.toml" in err
    assert "Traceback" not in err
