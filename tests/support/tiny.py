"""Tiny LlamaGen models, random code data sets and trainer configs shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ccalign.data.codes import write_flat_codes
from ccalign.models import llamagen
from ccalign.train import TrainConfig, Trainer

GRID, VOCAB, CLASSES = 4, 32, 5

def tiny_model(dropout: float = 0.0, seed: int = 0) -> llamagen.LlamaGen:
    """A 2-layer model with a non-zero output head (the released init zeroes it)."""
    torch.manual_seed(seed)
    model = llamagen.build(
        "custom",
        grid=GRID,
        dim=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        num_classes=CLASSES,
        token_dropout=dropout,
        resid_dropout=dropout,
        ffn_dropout=dropout,
    )
    nn.init.normal_(model.output.weight, std=0.2)
    return model

def random_model(seed: int = 0, std: float = 0.3, **sizes) -> llamagen.LlamaGen:
    """A tiny LlamaGen with every weight random (the released init zeroes the output head)."""
    torch.manual_seed(seed)
    config = dict(grid=4, dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10)
    config.update(sizes)
    model = llamagen.build("custom", **config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()

class RandomCodes(Dataset):
    """In-memory (tokens, label) pairs."""

    def __init__(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, GRID * GRID), generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.tokens[i], self.labels[i]

def make_config(out: Path, **sections) -> TrainConfig:
    raw = {
        "method": {"name": "cca", "beta": 0.5, "lam": 10.0},
        "optim": {"lr": 1e-3},
        "train": {
            "global_batch": 8,
            "micro_batch": 4,
            "steps": 2,
            "device": "cpu",
            "precision": "fp32",
            "progress": False,
        },
        "checkpoint": {"out": str(out), "every": 100},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(raw)

def capture_grads(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Record every parameter's gradient right before each optimizer step."""
    seen: list[dict[str, torch.Tensor]] = []

    def hook(optimizer, args, kwargs):
        seen.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(hook)
    return seen

def write_files(folder: Path, n: int = 16, dropout: float = 0.0, labels=None) -> tuple[str, str]:
    model = tiny_model(dropout)
    init = folder / "init.safetensors"
    llamagen.save(model, init)
    data = RandomCodes(n)
    codes = folder / "codes.safetensors"
    write_flat_codes(
        codes, data.tokens, data.labels if labels is None else labels, vocab_size=VOCAB, grid=GRID
    )
    return str(init), str(codes)

def load_final(path: Path) -> dict[str, torch.Tensor]:
    return llamagen.load(path).state_dict()


def run_config(out, init, codes, micro_batch: int, **train) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"init": init},
            "data": {"path": codes},
            "method": {"name": "cca", "beta": 0.5, "lam": 10.0, "uncond_ratio": 0.3},
            "optim": {"lr": 1e-3, "grad_clip": 0.5, "ema_decay": 0.5},
            "train": {
                "global_batch": 8,
                "micro_batch": micro_batch,
                "steps": 3,
                "device": "cpu",
                "precision": "fp32",
                "progress": False,
                **train,
            },
            "checkpoint": {"out": str(out), "every": 2, "format": "full"},  # sharded: own tests
        }
    )
