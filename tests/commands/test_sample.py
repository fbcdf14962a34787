"""`ccalign sample` options: one-line errors for unusable values, the checkpoint's recorded
architecture, resumes guarded by the model's contents, random labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccalign.cli import main
from ccalign.models import llamagen
from ccalign.sample import plan_labels
from support.tiny import random_model


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    llamagen.save(small_model(), path)  # grid 4, dim 32, 1 layer, 2 heads, 5 classes
    return path


def small_model(seed: int = 0):
    return random_model(seed, dim=32, n_layer=1, n_head=2, num_classes=5)


def sample(checkpoint, out, *options) -> int:
    return main(["sample", str(checkpoint), "--out", str(out), "--device", "cpu", "--quiet",
                 "--batch-size", "2", *options])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--per-class", "1", "--resize", "0"], "argument --resize: must be in [1, 16384], got 0"),
        (["--per-class", "1", "--resize", "-8"], "argument --resize: must be in"),
        (["--classes", "3-1"], "--classes '3-1': the range '3-1' is empty; write low-high"),
        (["--classes", ","], "--classes ',': no class given"),
        (["--classes", "1-x"], "expected indices like"),
        (["--per-class", "1", "--cfg-scale", "nan"], "--cfg-scale: must be a finite number"),
        (["--per-class", "1", "--cfg-scale", "inf"], "--cfg-scale: must be a finite"),
        (["--per-class", "1", "--cfg-scale", "-1"], "--cfg-scale: must be in [0, 1000], got -1"),
        (["--per-class", "1", "--cfg-scale", "3e38"], "--cfg-scale: must be in [0, 1000]"),
        (["--per-class", "1", "--seed", "-1"], "--seed: must be in [0, 2**63 - 1], got -1"),
        (["--per-class", "1", "--batch-size", "0"], "--batch-size: must be in [1, 65536], got 0"),
        (["--per-class", "1", "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
        (["--per-class", "x"], "argument --per-class: expected an integer, got 'x'"),
        (["--labels", "random", "--per-class", "2"], "--labels random draws every label"),
        # sizes are bounded before anything is built (these grew memory or a 988 MB line)
        (["--num-samples", "99999999999999"], "--num-samples: must be in [1, 10,000,000]"),
        (["--per-class", "5000000"],  # 5 classes
         "more than one sampling run plans (10,000,000)"),
        (["--classes", "0-99999999"], "lists more than 100,000 classes"),
        (["--classes", "7-" + "9" * 5000], "--classes '7-99999999999999999999999999"),
        (["--per-class", "1", "--classes", ",".join(map(str, range(5, 400)))],
         "got 5, 6, 7, 8, 9 and 390 more"),
    ],
)
def test_unusable_options_end_in_one_clear_line(checkpoint, tmp_path, capsys, options, message):
    assert sample(checkpoint, tmp_path / "out", *options) in (1, 2)  # 2: a usage error
    error = one_line_error(capsys)
    assert message in error and len(error) < 300  # never an echo of unbounded input
    assert not (tmp_path / "out" / "tokens.npz").exists()


def test_a_model_giving_non_finite_logits_is_refused_not_sampled(tmp_path, capsys):
    """NaN weights sampled token V-1 everywhere and exited 0."""
    model = small_model()
    with torch.no_grad():
        model.output.weight.fill_(float("nan"))
    llamagen.save(model, tmp_path / "nan.safetensors")
    assert sample(tmp_path / "nan.safetensors", tmp_path / "out", "--per-class", "1") == 1
    assert "the model gave logits that are not finite" in one_line_error(capsys)


def test_grid_or_model_contradicting_the_file_is_an_error(checkpoint, tmp_path, capsys):
    assert sample(checkpoint, tmp_path / "a", "--classes", "1", "--grid", "5") == 1
    err = one_line_error(capsys)
    assert "--grid 5 contradicts" in err and "which records grid 4" in err
    assert sample(checkpoint, tmp_path / "b", "--classes", "1", "--model", "GPT-B") == 1
    err = one_line_error(capsys)
    assert "--model GPT-B (dim 768, n_head 12, n_layer 12) contradicts" in err
    assert "which records dim 32, n_head 2, n_layer 1" in err
    assert sample(checkpoint, tmp_path / "c", "--classes", "1", "--model", "GPT-Q") == 1
    assert "--model 'GPT-Q': choose one of" in one_line_error(capsys)
    assert sample(checkpoint, tmp_path / "d", "--classes", "1", "--grid", "4") == 0  # agrees
    assert np.load(tmp_path / "d" / "tokens.npz")["tokens"].shape == (1, 16)


def test_resume_after_the_checkpoint_file_was_replaced_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert sample(checkpoint, out, "--per-class", "1", "--cfg-scale", "2") == 0
    first = (out / "tokens.npz").read_bytes()
    moved = tmp_path / "elsewhere" / "same.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(checkpoint.read_bytes())
    llamagen.save(small_model(seed=1), checkpoint)  # other weights at the same path
    capsys.readouterr()
    assert sample(checkpoint, out, "--per-class", "1", "--cfg-scale", "2") == 1
    err = one_line_error(capsys)
    assert f"{out} holds samples of a different model" in err
    assert "use a new output folder (--out) or remove it" in err
    assert (out / "tokens.npz").read_bytes() == first
    # the same weights under another path are the same model: the run is simply reassembled
    assert sample(moved, out, "--per-class", "1", "--cfg-scale", "2") == 0
    assert "0 batches sampled now" in capsys.readouterr().out
    assert (out / "tokens.npz").read_bytes() == first


def test_random_labels_follow_the_seed_not_the_batch_size(checkpoint, tmp_path):
    options = ["--labels", "random", "--num-samples", "7", "--seed", "11"]
    assert sample(checkpoint, tmp_path / "a", *options) == 0
    assert sample(checkpoint, tmp_path / "b", *options, "--batch-size", "3") == 0
    want = plan_labels(5, num_samples=7, mode="random", seed=11)
    for run in ("a", "b"):
        assert np.load(tmp_path / run / "tokens.npz")["labels"].tolist() == want
    assert want != plan_labels(5, num_samples=7)  # not the balanced default
