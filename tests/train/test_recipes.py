"""The recipe's fidelity: consistent dropout, the official effective clip, what gets logged."""

from __future__ import annotations

import copy
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


PAPER_CONFIGS = ("llamagen_B", "llamagen_L", "llamagen_XL", "llamagen_XXL", "llamagen_3B")


def adamw_updates(model: nn.Module, micro, scale: float, clip: float, eps: float) -> nn.Module:
    """Three optimizer steps of 16 micro-batches each, the losses scaled by ``scale``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=eps,
                                  weight_decay=0.05)
    for _ in range(3):
        for x, y in micro:
            (scale * ((model(x) - y) ** 2).mean()).backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        assert norm > clip  # the clip is active
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_update_equals_the_official_unscaled_one(name):
    """The official trainer sums 16 micro-batch losses, clips at 1.0, AdamW eps 1e-8; the paper
    configs average, clip at 1/16 and divide eps by 16: the same update (up to the clip's own
    1e-6), even where gradients are small enough for eps to matter (an undivided eps would
    change it)."""
    optim = load_config(REPO / "configs" / f"{name}.toml").optim
    assert optim.grad_clip == pytest.approx(1 / 16) and optim.eps == pytest.approx(1e-8 / 16)
    torch.manual_seed(0)  # float64: the two scalings round differently in float32
    # half the inputs tiny: their weights' gradients (~1e-7) are where eps is not negligible
    tiny = torch.tensor([1.0] * 4 + [1e-7] * 4, dtype=torch.float64)
    micro = [(torch.randn(2, 8, dtype=torch.float64) * tiny, torch.randn(2, 4, dtype=torch.float64))
             for _ in range(16)]
    start = nn.Linear(8, 4).double()
    official = adamw_updates(copy.deepcopy(start), micro, 1.0, 1.0, 1e-8)
    ours = adamw_updates(copy.deepcopy(start), micro, 1 / 16, optim.grad_clip, optim.eps)
    undivided = adamw_updates(copy.deepcopy(start), micro, 1 / 16, optim.grad_clip, 1e-8)
    # clip_grad_norm_ divides by norm + 1e-6, which does not scale: the clip factors differ by
    # at most 15e-6 / norm (norm > 1 when clipping), and the updates with them where eps counts
    for name in ("weight", "bias"):
        update = getattr(official, name) - getattr(start, name)
        torch.testing.assert_close(getattr(ours, name) - getattr(start, name), update,
                                   rtol=2e-5, atol=0)
    moved = (undivided.weight - official.weight).abs() / (official.weight - start.weight).abs()
    assert moved[:, 4:].min() > 0.01  # the undivided eps shrinks the small-gradient updates


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


@pytest.mark.parametrize("name", ["llamagen_L_ddo", "var_d16_ddo"])
def test_ddo_recipes_say_which_parts_are_ccalign_s_choice(name):
    """DDO's AR trainer is unpublished: the recipes must not attribute ccalign's choices (null
    rows with the data term only; VAR's re-tokenised negatives) to DDO."""
    text = (REPO / "configs" / f"{name}.toml").read_text()
    config = load_config(REPO / "configs" / f"{name}.toml")
    assert config.method.uncond_ratio > 0 and "ccalign's choice" in text
    assert "unpublished" in text
    docs = (REPO / "docs" / "recipes.md").read_text()
    assert "ccalign's own choices, not DDO's" in docs and "Ablation of the null rows" in docs
