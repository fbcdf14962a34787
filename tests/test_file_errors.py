"""A file given in the wrong place, or damaged, is named with what it is and the fix: never a
misleading "does not record its architecture", never a parser's bare message."""

from __future__ import annotations

import pytest

from ccalign.cli import main
from support import REPO
from support.tiny import write_files

ASSETS = REPO / "src" / "ccalign" / "assets"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    init, codes = write_files(root)
    run = root / "run"
    assert main(["finetune", "--config", str(REPO / "configs" / "tiny_cpu.toml"), "--init", init,
                 "--data", codes, "--out", str(run), "--set", "method.lora.enabled=true"]) == 0
    return run


@pytest.mark.parametrize(
    ("name", "what"),
    [
        (lambda run: max((run / "checkpoints").iterdir()),
         "is a training checkpoint (step 3: the state to resume from), not a model"),
        (lambda run: run / "final_lora.safetensors", "is LoRA adapters alone"),
        (lambda run: ASSETS / "fmnist_vq.safetensors", "is an image tokenizer, not a model"),
        (lambda run: ASSETS / "fmnist_msvq.safetensors", "is an image tokenizer, not a model"),
    ],
)
def test_a_file_that_is_not_a_model_is_named_for_what_it_is(lora_run, tmp_path, capsys, name,
                                                            what):
    path = name(lora_run)
    for argv in (["sample", str(path), "--out", str(tmp_path / "s"), "--per-class", "1"],
                 ["export", str(path), "--format", "official", "--out", str(tmp_path / "e.pt")]):
        assert main(argv) == 1
        err = _one_line(capsys)
        assert what in err and "does not record its architecture" not in err


@pytest.mark.parametrize(
    ("suffix", "text", "message"),
    [(".toml", "[optim\nlr = 1\n", "is not valid TOML: Expected ']'"),
     (".yaml", "optim: [1, 2\n", "is not valid YAML (line 2, column 1)")],
)
def test_a_broken_config_file_is_named(tmp_path, capsys, suffix, text, message):
    config = tmp_path / f"bad{suffix}"
    config.write_text(text)
    assert main(["finetune", "--config", str(config), "--dry-run"]) == 1
    assert f"{config} {message}" in _one_line(capsys)


def test_damaged_sampling_records_and_shards_are_named_with_the_fix(lora_run, tmp_path, capsys):
    sample = ["sample", str(lora_run / "final.safetensors"), "--out", str(tmp_path / "s"),
              "--per-class", "1", "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert main(sample) == 0
    (tmp_path / "s" / "shards" / "000001.npz").write_bytes(b"junk")
    (tmp_path / "s" / "tokens.npz").unlink()
    assert main(sample) == 1
    assert "000001.npz is damaged (ValueError); delete it and run the same command again" in (
        _one_line(capsys))
    (tmp_path / "s" / "shards" / "000001.npz").unlink()
    assert main(sample) == 0  # resampled
    capsys.readouterr()
    (tmp_path / "s" / "run.json").write_text("{broken")
    assert main(sample) == 1
    assert "run.json is damaged (not a JSON object)" in _one_line(capsys)
