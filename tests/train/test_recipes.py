"""The recipe's fidelity: consistent dropout, the official effective clip, what gets logged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ccalign.data import fashion_mnist
from ccalign.demo.bundles import BUNDLES
from ccalign.models import llamagen
from ccalign.tokenizers import load as load_tokenizer
from ccalign.train import TrainConfig, Trainer, load_config
from support import REPO
from support.tiny import RandomCodes, make_config, tiny_model

BASE_MODEL = BUNDLES["llamagen"].base_model  # the default demo's


def first_record(config: TrainConfig, model: nn.Module, data) -> dict:
    trainer = Trainer(config, model, data)
    records: list[dict] = []
    trainer.callbacks.append(lambda t, record: records.append(record))
    trainer.fit()
    return records[0]


@pytest.fixture(scope="module")
def demo_codes() -> TensorDataset:
    """128 real Fashion-MNIST training images as codes of the bundled VQ, with their labels."""
    images, labels = fashion_mnist.load("train")
    tokenizer = load_tokenizer("fmnist-vq").eval()
    with torch.inference_mode():
        codes = tokenizer.encode(torch.from_numpy(images[:128]).float()[:, None] / 127.5 - 1)
    return TensorDataset(codes.reshape(128, -1).long(), torch.from_numpy(labels[:128]).long())


@pytest.mark.slow
def test_d_at_step_one_is_unbiased_for_consistent_dropout_on_the_demo_model(tmp_path, demo_codes):
    """The bundled base model has dropout 0.1: its data log-likelihood is ~4 nats lower in train
    mode. A policy with dropout against a reference without starts at D ~ -4; both modes that
    keep the two consistent start at D ~ 0 (exactly 0 without dropout)."""
    tokens, labels = demo_codes.tensors
    model = llamagen.load(BASE_MODEL)
    with torch.no_grad():
        exact = model.eval()(labels, tokens)
        noisy = model.train()(labels, tokens)
    gap = float((exact - noisy).mean())
    assert gap > 2.5  # the bias the mixed setting would put into D (4.1 nats measured)

    measured = {}
    for mode in ("both", "none", "policy-only"):
        config = TrainConfig.from_dict(
            {
                "model": {"name": "custom", "grid": 7},
                "method": {"name": "cca", "beta": 0.5, "lam": 10.0, "dropout": mode},
                "train": {
                    "global_batch": 128,
                    "micro_batch": 64,
                    "steps": 1,
                    "device": "cpu",
                    "precision": "fp32",
                    "progress": False,
                },
                "checkpoint": {"out": str(tmp_path / mode), "every": 100},
            }
        )
        measured[mode] = first_record(config, llamagen.load(BASE_MODEL), demo_codes)["d_pos"]
    assert measured["none"] == 0.0
    # standard error of the mean of D over 128 images is ~0.35 nats (per-image std ~3.9)
    assert abs(measured["both"]) < 1.5
    assert measured["policy-only"] < -gap + 1.5
    logged = json.loads((tmp_path / "both" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1 and logged["d_pos"] == measured["both"]


def test_config_round_trips_through_its_dict():
    config = load_config(REPO / "configs" / "llamagen_L.toml", ["data.tokenizer='vq.pt'"])
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict(load_config(None).to_dict()).data.tokenizer is None


def test_default_recipe_is_consistent_and_the_mixed_one_needs_its_own_key():
    assert load_config(None).method.dropout == "both"
    with pytest.raises(ValueError, match='method.dropout = "both"'):
        load_config(None, ["method.reference_dropout=false"])
    with pytest.raises(ValueError, match="method.dropout"):
        load_config(None, ["method.dropout='mixed'"])
    assert load_config(None, ["method.dropout='policy-only'"]).method.dropout == "policy-only"


@pytest.mark.parametrize("method", ["cca", "dpo", "unlearning"])
def test_micro_batch_of_one_is_refused_for_contrastive_objectives(method):
    with pytest.raises(ValueError, match="micro_batch = 1 leaves .* without negatives"):
        load_config(None, [f"method.name='{method}'", "train.micro_batch=1"])
    assert load_config(None, ["method.name='mle'", "train.micro_batch=1"]).train.micro_batch == 1


def test_official_clip_on_the_summed_gradient_equals_ours_on_the_mean():
    """The official trainer sums 16 micro-batch losses and clips at 1.0; averaging and clipping
    at 1/16 gives the same AdamW update (the configs' grad_clip = 0.0625)."""
    torch.manual_seed(0)  # float64: the two scalings round differently in float32
    micro = [(torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
             for _ in range(16)]
    models = [nn.Linear(8, 4).double(), nn.Linear(8, 4).double()]
    models[1].load_state_dict(models[0].state_dict())
    for model, scale, clip in ((models[0], 1.0, 1.0), (models[1], 1.0 / 16, 1.0 / 16)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-12)
        for x, y in micro:
            (scale * ((model(x) - y) ** 2).mean()).backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        assert norm > clip  # the clip is active in both
        optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        # the same update but for AdamW's eps against the rescaled moments: eps / |g| ~ 1e-8
        torch.testing.assert_close(a, b, rtol=1e-7, atol=0)


def test_clipped_steps_and_step_one_are_logged(tmp_path):
    records = {}
    for clip in (1e-6, 0.0):
        config = make_config(
            tmp_path / str(clip),
            optim={"grad_clip": clip},
            train={"steps": 3, "log_every": 10},
        )
        trainer = Trainer(config, tiny_model(), RandomCodes(32))
        trainer.fit()
        lines = (tmp_path / str(clip) / "metrics.jsonl").read_text().splitlines()
        records[clip] = [json.loads(line) for line in lines]
    tight, off = records[1e-6], records[0.0]
    assert [r["step"] for r in tight] == [1, 3]  # step 1 always, then every log_every and last
    assert [(r["clipped"], r["clipped_fraction"]) for r in tight] == [(1, 1.0), (1, 1.0)]
    assert [(r["clipped"], r["clipped_fraction"]) for r in off] == [(0, 0.0), (0, 0.0)]
