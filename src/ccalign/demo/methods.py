"""The demo's fine-tuning recipes: CCA, GFT and DDO from the same base model and codes.

Every method trains through ``run_training`` (resumable, one folder per distinct recipe) with a
MATCHED COMPUTE BUDGET: the same number of optimizer steps, and per step the same number of
sequence rows through the policy with gradient (``DemoSettings.rows_per_step``, 2 x the CCA pairs)
plus at most as many rows through a no-gradient forward:

- CCA: ``pairs_per_step`` images, each under its true and a mismatched label: 2 x pairs policy
  rows with gradient and as many reference rows.
- GFT: 2 x pairs images: as many conditional rows with gradient, and as many unconditional rows
  (null class, beta 1) without.
- DDO: B data images plus one reference sample per conditional row (expected B x (1 - u) of
  them, u = ``ddo_uncond_ratio``), B chosen so that B x (2 - u) = 2 x pairs rows go through the
  policy with gradient and the reference; its steps are split over its rounds. Sampling the
  negatives is extra work on top, reported apart (``negatives_seconds``).

Fine-tuning wall time is measured around the training call and kept in the run folder
(``demo_time.json``), so a reused fine-tune still reports the time it took.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ccalign.io import atomic_write, open_safetensors
from ccalign.models import families
from ccalign.train import TrainConfig, run_training

if TYPE_CHECKING:
    from ccalign.demo.pipeline import DemoSettings

METHODS = ("cca", "gft", "ddo")
TIME_FILE = "demo_time.json"


def parse_methods(text: str) -> tuple[str, ...]:
    """``"cca,gft"`` -> ("cca", "gft") in the canonical order; unknown names raise ValueError."""
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    unknown = names - set(METHODS)
    if unknown or not names:
        raise ValueError(f"--methods takes a comma list of {', '.join(METHODS)}; got {text!r}")
    return tuple(m for m in METHODS if m in names)


def ddo_batch(settings: DemoSettings) -> int:
    """DDO's images per step: B x (2 - u) policy rows (data + expected negatives) = the budget."""
    return max(1, round(settings.rows_per_step / (2 - settings.ddo_uncond_ratio)))


def ddo_steps_per_round(settings: DemoSettings) -> int:
    """The step budget split over the rounds (150 steps, 3 rounds: 50 each)."""
    return max(1, settings.steps // settings.ddo_rounds)


def _common(settings: DemoSettings, codes_path: Path, out: Path, batch: int, steps: int) -> dict:
    """Model, data, train and checkpoint sections shared by every method."""
    return {
        "model": {**settings.demo_family.model_section, "init": str(settings.base_model)},
        "data": {"path": str(codes_path), "seed": settings.seed},
        "train": {
            "global_batch": batch,
            "micro_batch": batch,
            "steps": steps,
            "precision": "fp32",
            "seed": settings.seed,
            "device": "auto",
            "log_every": 10,
            "progress": settings.progress,
        },
        "checkpoint": {"out": str(out), "every": 50, "keep": 1},
    }


def _cosine(lr: float) -> dict:
    return {
        "lr": lr,
        "schedule": "cosine",
        "warmup_ratio": 0.05,
        "weight_decay": 0.05,
        "grad_clip": 1.0,
    }


def cca_config(settings: DemoSettings, codes_path: Path, out: Path, lam: float) -> TrainConfig:
    """The demo's CCA recipe as a TrainConfig (beta and lambda per family: DemoSettings)."""
    doc = _common(settings, codes_path, out, settings.pairs_per_step, settings.steps)
    doc["method"] = {
        "name": "cca",
        "beta": settings.beta,
        "lam": lam,
        "uncond_ratio": 0.1,
        "dropout": settings.dropout,
    }
    doc["optim"] = _cosine(settings.lr)
    return TrainConfig.from_dict(doc)


def gft_config(settings: DemoSettings, codes_path: Path, out: Path) -> TrainConfig:
    """GFT: 2 x pairs images per step, class dropout 0.1, the CCA schedule at ``gft_lr``."""
    doc = _common(settings, codes_path, out, settings.rows_per_step, settings.steps)
    doc["method"] = {"name": "gft", "class_dropout": 0.1, "dropout": settings.dropout}
    doc["optim"] = _cosine(settings.gft_lr)
    return TrainConfig.from_dict(doc)


def ddo_config(settings: DemoSettings, codes_path: Path, out: Path) -> TrainConfig:
    """DDO: ``ddo_rounds`` rounds sharing the step budget, constant lr, negatives from a file."""
    doc = _common(settings, codes_path, out, ddo_batch(settings), ddo_steps_per_round(settings))
    doc["method"] = {
        "name": "ddo",
        "beta": settings.ddo_beta,
        "alpha": settings.ddo_alpha,
        "uncond_ratio": settings.ddo_uncond_ratio,
        "dropout": "none",  # DDO trains without dropout; D = 0 exactly at step 1
        "rounds": settings.ddo_rounds,
        "negatives": "file",
    }
    doc["optim"] = {"lr": settings.ddo_lr, "schedule": "constant", "grad_clip": 1.0}
    return TrainConfig.from_dict(doc)


def _digest(recipe: tuple) -> str:
    return hashlib.sha1(repr(recipe).encode()).hexdigest()[:8]


def _shared(settings: DemoSettings) -> tuple:
    return (settings.steps, settings.seed, settings.train_images, str(settings.base_model))


def run_folder(settings: DemoSettings, out: Path, lam: float) -> Path:
    """One folder per distinct CCA recipe, so a changed setting never reuses a stale model."""
    recipe = (
        lam,
        settings.dropout,
        settings.beta,
        settings.lr,
        settings.steps,
        settings.pairs_per_step,
        settings.seed,
        settings.train_images,
        str(settings.base_model),
    )
    return out / f"cca_lam{lam:g}_{_digest(recipe)}"


def method_folder(settings: DemoSettings, out: Path, method: str) -> Path:
    """The run folder of GFT or DDO, keyed by every setting its recipe depends on."""
    if method == "gft":
        recipe = (settings.gft_lr, settings.dropout, settings.rows_per_step, *_shared(settings))
        return out / f"gft_{_digest(recipe)}"
    if method == "ddo":
        recipe = (
            settings.ddo_alpha,
            settings.ddo_beta,
            settings.ddo_lr,
            settings.ddo_rounds,
            settings.ddo_uncond_ratio,
            settings.rows_per_step,
            *_shared(settings),
        )
        return out / f"ddo_{_digest(recipe)}"
    raise ValueError(f"no run folder for method {method!r}")


def train_timed(config: TrainConfig, out: Path, say) -> float:
    """Train (resuming a killed run) unless finished; returns the wall time the training took."""
    record = out / TIME_FILE
    if not (out / "final.safetensors").exists():
        say(f"{config.method.name.upper()} fine-tuning -> {out}")
        started = time.perf_counter()
        run_training(config, resume=True)
        seconds = {"seconds": round(time.perf_counter() - started, 1)}
        atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(seconds)))
    if not record.exists():  # finished before timing was recorded
        return float("nan")
    return float(json.loads(record.read_text())["seconds"])


def load_final(out: Path) -> nn.Module:
    """The fine-tuned model a run folder holds, whatever its family."""
    return families.load_file(out / "final.safetensors").eval()


def ddo_negatives(out: Path, rounds: int) -> dict:
    """Negatives drawn over DDO's rounds: their count and the seconds their sampling took."""
    folders = [out] if rounds == 1 else [out / f"round_{r}" for r in range(1, rounds + 1)]
    count, seconds = 0, 0.0
    for folder in folders:
        with open_safetensors(folder / "negatives.safetensors") as f:
            meta = f.metadata() or {}
            count += int(f.get_slice("rows").get_shape()[0])
        seconds += float(meta.get("sampling_seconds", "nan"))
    return {"negatives": count, "negatives_seconds": round(seconds, 1)}
