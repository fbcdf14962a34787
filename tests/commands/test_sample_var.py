"""`ccalign sample` with VAR files: tokens, PNG-ready images and the ADM .npz through the same
runner as LlamaGen; VAR's cfg number through --var-cfg; options VAR has not are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccalign.cli import main
from ccalign.models import var
from ccalign.tokenizers import var_vq
from support.tiny_var import SAMPLER_TINY as TINY
from support.tiny_var import random_var as tiny

VQ = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
          patch_nums=(1, 2, 3, 4))


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    vae = var_vq.VarVQ(var_vq.VarVQConfig(**VQ)).eval()
    model = tiny()
    model.set_quantizer(vae.quantize)
    var.save(model, tmp_path / "var.safetensors")
    var_vq.save(vae, tmp_path / "vae.safetensors")
    return tmp_path / "var.safetensors", tmp_path / "vae.safetensors"


def sample(checkpoint, out, *options) -> int:
    return main(["sample", str(checkpoint), "--out", str(out), "--device", "cpu", "--quiet",
                 "--batch-size", "3", *options])


def test_var_file_samples_tokens_and_images(files, tmp_path):
    checkpoint, vae = files
    assert sample(checkpoint, tmp_path / "a", "--per-class", "2", "--tokenizer", str(vae)) == 0
    with np.load(tmp_path / "a" / "samples.npz") as data:
        assert data["arr_0"].shape == (10, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    with np.load(tmp_path / "a" / "tokens.npz") as data:
        tokens, labels = data["tokens"], data["labels"]
    assert tokens.shape == (10, 30) and labels.tolist() == [c for c in range(5) for _ in (0, 1)]
    assert sample(checkpoint, tmp_path / "b", "--per-class", "2", "--var-cfg", "1.5") == 0
    with np.load(tmp_path / "b" / "tokens.npz") as data:
        guided = data["tokens"]
    assert guided.shape == (10, 30) and not np.array_equal(guided, tokens)
    assert sample(checkpoint, tmp_path / "c", "--per-class", "2") == 0  # same seed, same tokens
    with np.load(tmp_path / "c" / "tokens.npz") as data:
        assert np.array_equal(data["tokens"], tokens)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--var-cfg", "1.5", "--cfg-scale", "2"], "not both"),
        (["--temperature", "0.5"], "--temperature: not an option of VAR sampling"),
        (["--grid", "4"], "--grid"),
        (["--var-cfg", "-3"], "argument --var-cfg: must be in [0, 1000], got -3"),
        (["--model", "VAR-d16"], "which records depth 2, dim 32"),
        (["--model", "VAR-d99"], "choose one of"),
    ],
)
def test_options_var_has_not_are_refused(files, tmp_path, capsys, options, message):
    assert sample(files[0], tmp_path / "out", "--per-class", "1", *options) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_official_var_file_needs_its_preset_and_vqvae(files, tmp_path, capsys):
    model = var.load(files[0])
    var.save(model, tmp_path / "var_d16.pth", official=True)
    assert sample(tmp_path / "var_d16.pth", tmp_path / "o", "--model", "VAR-d16",
                  "--per-class", "1") == 1
    assert "give --tokenizer with its VQVAE" in capsys.readouterr().err
    assert model.config.to_dict()["patch_nums"] == list(TINY["patch_nums"])
