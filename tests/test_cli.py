"""The `ccalign` entry point: every command is reachable and user errors are one clear line."""


import pytest

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


def test_running_out_of_memory_is_one_line_with_the_fix(monkeypatch, capsys):
    from ccalign.commands import theory

    def allocate(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 86261313536 bytes.\nmore")

    monkeypatch.setattr(theory, "run", allocate)
    assert main(["theory"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ccalign theory: error: out of memory ([enforce fail" in err
    assert "lower the batch size" in err


def test_an_unexpected_runtime_error_still_shows_its_traceback(monkeypatch):
    from ccalign.commands import theory

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(theory, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["theory"])
