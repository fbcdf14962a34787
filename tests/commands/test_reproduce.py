"""`ccalign reproduce`: sampling with a release's protocol and ADM's evaluation end to end, on
tiny random checkpoints in the releases' layouts (offline Hugging Face cache) and a tiny
TorchScript Inception with logits."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ccalign.cli import main
from ccalign.eval import feature_statistics, frechet_distance, load_inception, precision_recall
from support.releases import tiny_llamagen_release, tiny_var_release


class TinyInception(nn.Module):
    """(N, 3, 299, 299) -> (8-d pooled ReLU features, 10 logits), like the FID Inception."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 7, stride=16)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.conv(x)).mean((2, 3))
        return features, self.fc(features) * 4.0


@pytest.fixture
def inception(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated; Inception files are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(TinyInception()), str(path))
    return path


def reference(tmp_path, inception, size: int) -> tuple:
    """An ADM-layout reference: 40 images and the statistics of 200 (more than it stores)."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(200, size, size, 3), dtype=np.uint8)
    features = load_inception(inception, device="cpu", progress=False)(images)
    mu, sigma = feature_statistics(features)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images[:40], mu=mu, sigma=sigma)
    return path, mu, sigma, features[:40]


#: the end-to-end runs on the CPU, and on CUDA with the protocols' dtypes (gpu_check.sh runs
#: ``pytest -m cuda``): bf16 weights for LlamaGen, float16 autocast over float32 for VAR
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def reproduce(name, ref, out, inception, *more, device="cpu") -> int:
    return main(["reproduce", name, "--ref", str(ref), "--out", str(out), "--num-samples", "64",
                 "--inception-weights", str(inception), "--device", device, "--quiet",
                 "--batch-size", "32", *more])


def check_report(out, mu, sigma, real, inception, published, device="cpu"):
    """The report's figures equal the metrics recomputed from the samples file."""
    record = json.loads((out / "report.json").read_text())
    images = np.load(out / "samples" / "samples.npz")["arr_0"]
    fake = load_inception(inception, device=device, progress=False).extract(images)
    measured = record["measured"]
    fid = frechet_distance(*feature_statistics(fake.features), mu, sigma)
    assert measured["fid"] == pytest.approx(fid, rel=1e-9)
    log_p = torch.from_numpy(fake.logits).double().log_softmax(1)  # one ADM split under 5000
    log_marginal = torch.logsumexp(log_p, 0) - np.log(len(log_p))
    score = torch.exp((log_p.exp() * (log_p - log_marginal)).sum(1).mean()).item()
    assert measured["is"] == pytest.approx(score, rel=1e-9)
    precision, recall = precision_recall(real, fake.features, k=3)
    assert (measured["precision"], measured["recall"]) == pytest.approx((precision, recall))
    assert record["published"] == published and record["num_samples"] == 64
    assert record["num_reference_images"] == 40 and record["bootstrap_rounds"] == 4
    assert all(value is not None and value >= 0 for value in record["spread"].values())
    table = (out / "report.md").read_text()
    assert f"| FID | {published['fid']:.4g} | {measured['fid']:.4g} |" in table
    assert "FID is biased upwards" in table
    return record


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_reproduce_a_llamagen_release_end_to_end_and_resume(cache, monkeypatch, tmp_path,
                                                            inception, capsys, device):
    tiny_llamagen_release("cca-llamagen-L-384", cache, monkeypatch, tmp_path)
    ref, mu, sigma, real = reference(tmp_path, inception, 256)  # the protocol resizes to 256
    out = tmp_path / "run"
    assert reproduce("cca-llamagen-L-384", ref, out, inception, "--bootstrap", "4",
                     device=device) == 0
    record = check_report(out, mu, sigma, real, inception, {"fid": 3.43}, device)
    assert "| FID | 3.43 |" in capsys.readouterr().out
    run = json.loads((out / "samples" / "run.json").read_text())
    assert run["protocol"]["values"]["labels"] == "random" and run["resize"] == 256
    assert reproduce("cca-llamagen-L-384", ref, out, inception, "--bootstrap", "4",
                     device=device) == 0
    assert "(0 batches sampled now)" in capsys.readouterr().out  # resumed: nothing sampled again
    assert json.loads((out / "report.json").read_text()) == record


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_reproduce_a_var_release_with_its_dtypes(cache, monkeypatch, tmp_path, inception,
                                                 device):
    tiny_var_release("cca-var-d16", cache, monkeypatch, tmp_path)
    ref, mu, sigma, real = reference(tmp_path, inception, 8)  # the tiny VQVAE's 8 px
    out = tmp_path / "run"
    assert reproduce("cca-var-d16", ref, out, inception, "--bootstrap", "4", device=device) == 0
    check_report(out, mu, sigma, real, inception, {"fid": 4.03}, device)
    run = json.loads((out / "samples" / "run.json").read_text())
    assert run["numerics"]["autocast"] == "float16" and run["uint8"] == "floor"


def test_reproduce_refuses_what_it_cannot_measure_in_one_line(cache, tmp_path, inception,
                                                              capsys):
    ref, *_ = reference(tmp_path, inception, 8)
    assert reproduce("cca-var-d20", ref, tmp_path / "a", inception) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not in the Hugging Face cache" in err
    assert "`hf download ChenDRAG/CCA_VAR CCA_VAR_Guidance_Free/VAR_d20_CCA.pth`" in err
    assert reproduce(str(tmp_path / "mine.pt"), ref, tmp_path / "b", inception) == 1
    assert "is not a registry name" in capsys.readouterr().err
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert reproduce("cca-var-d16", tmp_path / "images_only.npz", tmp_path / "c", inception) == 1
    assert "holds no mu/sigma statistics" in capsys.readouterr().err


def test_reproduce_refuses_a_release_without_published_metrics(cache, tmp_path, inception,
                                                                capsys):
    ref, *_ = reference(tmp_path, inception, 8)
    assert reproduce("llamagen-t2i-XL-256", ref, tmp_path / "t", inception) == 1
    assert "has no published metric to reproduce" in capsys.readouterr().err
