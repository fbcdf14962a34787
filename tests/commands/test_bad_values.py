"""Every option of every command, and every config field, given NaN, inf, 0, negative, huge and
wrongly typed values: one line, exit code 1 or 2, no traceback; a value outside the range a
setting declares is refused naming the option or key.

Each command runs from a base invocation that fails (or, for a dry run, finishes) quickly once
its options are accepted, so a value that is fine only costs that failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

import pytest

from ccalign.cli import build_parser, main
from ccalign.demo.settings import DemoSettings
from ccalign.io import output_file, output_folder, output_path
from ccalign.models import llamagen
from ccalign.models.llamagen.model import LlamaGenConfig
from ccalign.models.var.model import VARConfig
from ccalign.settings import Range
from ccalign.train.config import TrainConfig
from support import REPO
from support.tiny import write_files

#: what a careless or hostile user types
BAD_TEXT = ["nan", "inf", "-inf", "0", "-1", "1e30", "99999999999999999999", "abc", ""]
#: the same as TOML values, for config fields (--set key=value)
BAD_TOML = ["nan", "inf", "-inf", "0", "-1", "1e30", "99999999999999999999", '"abc"', "true",
            "[1, 2]", "{ a = 1 }"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model and its codes, a file where a folder is needed, missing inputs."""
    root = tmp_path_factory.mktemp("bad_values")
    init, codes = write_files(root)
    blocker = root / "a_file"
    blocker.write_text("a file, not a folder")
    return {"root": root, "init": init, "codes": codes, "blocked": blocker / "out",
            "missing": root / "missing"}


def base_invocations(files) -> dict[str, list[str]]:
    """Per command: arguments that pass parsing and then stop fast (a missing input, no
    Fashion-MNIST for the demo, a dry run, a one-cell theory table)."""
    missing, scratch = str(files["missing"]), files["root"] / "outputs"
    tiny = str(REPO / "configs" / "tiny_cpu.toml")
    return {
        "demo": ["demo", "--quick", "--no-progress", "--out", str(scratch / "demo")],
        "eval": ["eval", "--samples", missing, "--ref", missing, "--inception-weights", missing],
        "export": ["export", missing, "--format", "official", "--out", str(scratch / "x.pt")],
        "extract-codes": ["extract-codes", missing, "--tokenizer", missing, "--out",
                          str(scratch / "codes")],
        "finetune": ["finetune", "--config", tiny, "--init", files["init"], "--data",
                     files["codes"], "--out", str(scratch / "run"), "--dry-run"],
        "models": ["models"],
        "pretrain": ["pretrain", "--config", str(REPO / "configs" / "fmnist_pretrain.toml"),
                     "--data", files["codes"], "--out", str(scratch / "run"), "--dry-run"],
        "sample": ["sample", missing, "--out", str(scratch / "samples")],
        "encode-captions": ["encode-captions", missing, "--out", str(scratch / "c.safetensors")],
        "reproduce": ["reproduce", "cca-var-d16", "--ref", missing, "--out",
                      str(scratch / "repro")],
        "theory": ["theory", "--betas", "1", "--lambdas", "1", "--out", str(scratch / "t.json")],
        "train-classifier": ["train-classifier", "--data-dir", missing, "--out",
                             str(scratch / "c.safetensors")],
        "train-tokenizer": ["train-tokenizer", "--data", missing, "--out",
                            str(scratch / "t.safetensors")],
    }


def test_an_output_under_a_file_gets_the_same_line_from_every_command(files, capsys):
    """Before any work, as a usage error naming the option and the file in the way."""
    blocker = str(files["blocked"].parent)
    for name, base in base_invocations(files).items():
        for action in options(commands()[name]):
            if action.type not in (output_file, output_folder, output_path):
                continue
            flag = action.option_strings[0]
            code, err = run_one_line(capsys, [*base, flag, str(files["blocked"] / "x")])
            assert code == 2, (name, flag)
            assert f"argument {flag}: " in err and f"{blocker} is a file, not a folder" in err


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(command: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options and positionals that take a value."""
    return [a for a in command._actions if a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


def run_one_line(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``ccalign argv``; a refusal must be one line with exit code 1 or 2, never a
    traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, argv
    if code != 0:
        err = captured.err.strip()
        assert code in (1, 2) and err and "\n" not in err, (argv, code, err)
        assert len(err) < 1000, argv  # never an echo of unbounded input
        return code, err
    return code, ""


def outside(value: str, declared: Range | None) -> bool:
    """Whether the typed ``value`` is a number the declared range (or finiteness) refuses."""
    try:
        number = float(value)
    except ValueError:
        return False
    return not math.isfinite(number) or (declared is not None and not declared.allows(number))


def test_every_numeric_option_declares_a_bounded_range():
    """A numeric flag reads through ``ccalign.settings.number`` with an upper bound, so a huge
    value is refused at parsing instead of allocating."""
    for name, command in commands().items():
        for action in options(command):
            kind = action.type
            assert kind not in (int, float), f"{name} {action.option_strings}: plain {kind}"
            declared = getattr(kind, "range", None)
            if declared is not None:
                assert declared.high is not None, f"{name} {action.option_strings}"


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_option_refuses_bad_values_in_one_line(files, capsys, monkeypatch, name):
    # where a value replaces the base's failing output or input, the run still stops early:
    # relative paths land in a scratch folder, and the demo finds no Fashion-MNIST
    monkeypatch.chdir(files["root"])
    monkeypatch.setenv("CCALIGN_FASHION_MNIST", str(files["missing"]))
    base = base_invocations(files)[name]
    for action in options(commands()[name]):
        flag = action.option_strings[:1]
        declared = getattr(action.type, "range", None)
        for value in BAD_TEXT:
            # a positional (each command has at most one, right after the name) is replaced
            argv = [*base, *flag, value] if flag else [name, value, *base[2:]]
            code, err = run_one_line(capsys, argv)
            if declared is not None and outside(value, declared):
                assert code == 2 and f"argument {flag[0]}" in err, (argv, err)


def config_fields(cls: type, prefix: str = "") -> list[tuple[str, Range | None, typing.Any]]:
    """(dotted key, declared range, type) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.append((prefix + f.name, f.metadata.get("range"), hints[f.name]))
    return found


def numeric(hint: typing.Any) -> bool:
    parts = {*typing.get_args(hint), hint}
    return bool(parts & {int, float}) or any(typing.get_args(p) and
                                            set(typing.get_args(p)) & {int, float} for p in parts)


@pytest.mark.parametrize("cls", [TrainConfig, LlamaGenConfig, VARConfig, DemoSettings])
def test_every_numeric_setting_declares_a_bounded_range(cls):
    for key, declared, hint in config_fields(cls):
        if numeric(hint):
            assert declared is not None and declared.high is not None, f"{cls.__name__}.{key}"


def test_every_config_field_refuses_bad_values_in_one_line(files, capsys):
    """Through ``finetune --dry-run --set key=value``: validated before any file is read."""
    base = ["finetune", *base_invocations(files)["finetune"][1:]]
    for key, declared, _ in config_fields(TrainConfig):
        for value in BAD_TOML:
            code, err = run_one_line(capsys, [*base, "--set", f"{key}={value}"])
            if declared is not None and outside(value, declared):
                assert code == 1 and key in err, (key, value, err)


def test_every_architecture_field_refuses_bad_values_in_one_line(files, capsys):
    """``model.arch`` of a fresh LlamaGen (pretrain --dry-run): ranges, n_head | dim, types."""
    base = ["pretrain", "--config", str(REPO / "configs" / "fmnist_pretrain.toml"), "--data",
            files["codes"], "--dry-run"]
    for key, declared, _ in config_fields(LlamaGenConfig):
        for value in BAD_TOML:
            code, err = run_one_line(capsys, [*base, "--set", f"model.arch.{key}={value}"])
            if declared is not None and outside(value, declared):
                assert code == 1 and f"model.arch.{key}" in err, (key, value, err)
    code, err = run_one_line(capsys, [*base, "--set", "model.arch.n_head=7"])
    assert code == 1 and "must be n_head (7) times an even head width" in err
    code, err = run_one_line(capsys, [*base, "--set", "model.arch.depth=3"])
    assert code == 1 and "unknown key(s) ['depth'] in [model.arch]" in err


def test_a_llamagen_file_recording_a_broken_architecture_is_named(files, tmp_path):
    model = llamagen.load(files["init"])
    path = tmp_path / "edited.safetensors"
    llamagen.save(model, path)
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata={"ccalign.llamagen.config": '{"dim": -4}'})
    with pytest.raises(ValueError, match="records an architecture ccalign cannot build"):
        llamagen.load(path)
