"""The demo's fine-tuning recipes, one record per method: CCA, GFT and DDO from the same base.

Every method trains through ``run_training`` (resumable, one folder per distinct recipe: its
name is the method and a hash of the training config) with a MATCHED COMPUTE BUDGET: the same
number of optimizer steps, and per step the same number of sequence rows through the policy with
gradient (``DemoSettings.rows_per_step``, 2 x the CCA pairs) plus at most as many rows through a
no-gradient forward:

- CCA: ``pairs_per_step`` images, each under its true and a mismatched label: 2 x pairs policy
  rows with gradient and as many reference rows.
- GFT: 2 x pairs images: as many conditional rows with gradient, and as many unconditional rows
  (null class, beta 1) without.
- DDO: B data images plus one reference sample per conditional row (expected B x (1 - u) of
  them, u = ``ddo_uncond_ratio``), B chosen so that B x (2 - u) = 2 x pairs rows go through the
  policy with gradient and the reference; its steps are split over its rounds. Sampling the
  negatives is extra work on top, reported apart (``negatives_seconds``).

A record also says which rows of the results table its models fill and how the reports describe
it. Fine-tuning wall time is measured around the training call and kept in the run folder
(``demo_time.json``), so a reused fine-tune still reports the time it took.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ccalign.io import atomic_write, open_safetensors
from ccalign.train import TrainConfig, run_training

if TYPE_CHECKING:
    from ccalign.demo.settings import DemoSettings

TIME_FILE = "demo_time.json"


@dataclass(frozen=True)
class Variant:
    """One model a recipe trains: its key among the demo's models and its training config."""

    key: str  # "cca30", "gft", ...
    config: TrainConfig
    main: bool = True  # the headline model (CCA's lambda sweep adds others)


@dataclass(frozen=True)
class DemoRecipe:
    """How the demo fine-tunes with one method and reports it."""

    method: str  # the method's name in ccalign.train.methods
    title: str  # for the reports
    #: (settings, the data section's keys, output folder of the demo) -> the models it trains
    variants: Callable[[DemoSettings, dict, Path], list[Variant]]
    #: (settings, run folder of the main variant, fine-tune seconds) -> metrics.json's meta
    meta: Callable[[DemoSettings, Path, float], dict]
    rows: Callable[[DemoSettings], list[dict]]  # its rows of the results table
    recipe_text: Callable[[dict], str]  # its recipe in one cell of the comparison
    #: the sentence on its recipe in a report of this method alone
    setup_text: Callable[[dict], str] = lambda info: ""
    model_key: Callable[[dict], str] = lambda row: row["model"]  # a row's model among them
    time_note: Callable[[dict], str] = lambda info: ""  # extra words on its fine-tune time
    #: refuses settings the recipe cannot train with, naming the flag
    check: Callable[[DemoSettings], None] = lambda settings: None


def run_folder(out: Path, method: str, config: TrainConfig) -> Path:
    """``<out>/<method>_<hash>``: one folder per distinct training config (its output folder,
    data path and progress bar aside), so a changed setting never reuses a stale model."""
    record = config.to_dict()
    record["checkpoint"] = {**record["checkpoint"], "out": None}
    record["train"] = {**record["train"], "progress": None}
    record["data"] = {
        key: Path(value).name if key in ("path", "captions") and value else value
        for key, value in record["data"].items()
    }
    digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
    return out / f"{method}_{digest}"


def with_folder(config: TrainConfig, folder: Path) -> TrainConfig:
    """The config writing into ``folder``."""
    raw = config.to_dict()
    raw["checkpoint"]["out"] = str(folder)
    return TrainConfig.from_dict(raw)


def train_timed(config: TrainConfig, say) -> float:
    """Train (resuming a killed run) unless finished; returns the wall time the training took."""
    out = Path(config.checkpoint.out)
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


# ---- shared recipe parts ----
def _common(settings: DemoSettings, data: dict, batch: int, steps: int) -> dict:
    """Model, data, train and checkpoint sections shared by every method; ``data``: the data
    section's keys of the task's training data (codes, and caption features for captions)."""
    return {
        "model": {**settings.bundle.model_section, "init": str(settings.base_model)},
        "data": {**data, "seed": settings.seed},
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
        "checkpoint": {"out": "", "every": 50, "keep": 1},
    }


def _cosine(lr: float) -> dict:
    return {
        "lr": lr,
        "schedule": "cosine",
        "warmup_ratio": 0.05,
        "weight_decay": 0.05,
        "grad_clip": 1.0,
    }


def _placed(doc: dict, out: Path, method: str) -> TrainConfig:
    """The config of ``doc``, writing into its own run folder under ``out``."""
    config = TrainConfig.from_dict(doc)
    return with_folder(config, run_folder(out, method, config))


def first_log_record(metrics_log: Path) -> dict:
    """The first line of a run's metrics.jsonl (step 1: the trainer always logs it)."""
    with open(metrics_log) as f:
        return json.loads(f.readline())


# ---- CCA ----
def cca_config(settings: DemoSettings, data: dict, out: Path, lam: float) -> TrainConfig:
    """The demo's CCA recipe (beta and lambda per family: DemoSettings), in its run folder."""
    doc = _common(settings, data, settings.pairs_per_step, settings.steps)
    doc["method"] = {
        "name": "cca",
        "beta": settings.beta,
        "lam": lam,
        "uncond_ratio": 0.1,
        "dropout": settings.dropout,
    }
    doc["optim"] = _cosine(settings.lr)
    return _placed(doc, out, "cca")


def _cca_lams(settings: DemoSettings) -> list[float]:
    return [settings.lam, *(settings.sweep_lams if settings.sweep else ())]


def _cca_variants(settings: DemoSettings, data: dict, out: Path) -> list[Variant]:
    return [
        Variant(f"cca{lam:g}", cca_config(settings, data, out, lam), lam == settings.lam)
        for lam in _cca_lams(settings)
    ]


def _cca_meta(settings: DemoSettings, folder: Path, seconds: float) -> dict:
    """CCA's recipe, its D at step 1 and its budget: pairs -> 2 x pairs policy + reference rows."""
    start = first_log_record(folder / "metrics.jsonl")
    return {
        "beta": settings.beta,
        "lam": settings.lam,
        "dropout": settings.dropout,
        "d_pos_step1": start["d_pos"],  # policy == reference: 0 up to dropout noise
        "d_neg_step1": start["d_neg"],
        "lr": settings.lr,
        "steps": settings.steps,
        "pairs_per_step": settings.pairs_per_step,
        "rows_per_step": 2 * settings.pairs_per_step,
        "nograd_rows_per_step": 2 * settings.pairs_per_step,  # the reference's forward
        "finetune_seconds": seconds,
    }


def _cca_rows(settings: DemoSettings) -> list[dict]:
    """CCA guidance-free (and its lambda sweep), then CCA + CFG."""
    rows = []
    for lam in sorted(set(_cca_lams(settings))):
        suffix = "" if lam == settings.lam else f"-lam{lam:g}"
        rows.append(
            dict(
                name=f"cca{suffix}",
                model="cca",
                headline=lam == settings.lam,
                cfg_scale=1.0,
                family="CCA, lambda sweep",
                sweep_value=lam,
                sweep_label=f"λ={lam:g}",
                lam=lam,
            )
        )
    rows.append(_with_cfg("cca", "CCA", settings, lam=settings.lam))
    return rows


def _with_cfg(model: str, title: str, settings: DemoSettings, **extra) -> dict:
    """The fine-tuned model sampled with CFG on top (``cca_cfg_scale``)."""
    return dict(name=f"{model}+cfg", model=model, headline=False,
                cfg_scale=settings.cca_cfg_scale, family=f"{title} + CFG", **extra)


def _cca_recipe_text(info: dict) -> str:
    return (
        f"beta {info['beta']:g}, lambda {info['lam']:g}, lr {info['lr']:g} cosine, "
        f"{info['pairs_per_step']} pairs"
    )


def _cca_setup_text(info: dict) -> str:
    return (
        f"CCA: beta {info['beta']}, lambda {info['lam']}, dropout {info['dropout']} (policy and "
        f"reference; mean D+ at step 1 {info['d_pos_step1']:+.2f} nats per image), "
        f"{info['steps']} steps of {info['pairs_per_step']} pairs, lr {info['lr']} (cosine)."
    )


# ---- GFT ----
def gft_config(settings: DemoSettings, data: dict, out: Path) -> TrainConfig:
    """GFT: 2 x pairs images per step, class dropout 0.1, the CCA schedule at ``gft_lr``."""
    doc = _common(settings, data, settings.rows_per_step, settings.steps)
    doc["method"] = {"name": "gft", "class_dropout": 0.1, "dropout": settings.dropout}
    doc["optim"] = _cosine(settings.gft_lr)
    return _placed(doc, out, "gft")


def _gft_meta(settings: DemoSettings, folder: Path, seconds: float) -> dict:
    """GFT's recipe and budget: 2 x pairs images, each a conditional row with gradient."""
    return {
        "lr": settings.gft_lr,
        "scale": settings.gft_scale,
        "gft_beta": 1.0 / settings.gft_scale,
        "class_dropout": 0.1,
        "dropout": settings.dropout,
        "steps": settings.steps,
        "images_per_step": settings.rows_per_step,
        "rows_per_step": settings.rows_per_step,
        "nograd_rows_per_step": settings.rows_per_step,  # the unconditional pass
        "finetune_seconds": seconds,
    }


def _gft_rows(settings: DemoSettings) -> list[dict]:
    """GFT guidance-free at beta = 1 / gft_scale (headline), and its curve over other scales."""
    scales = sorted({settings.gft_scale, *settings.gft_curve_scales})
    return [
        dict(
            name="gft" if s == settings.gft_scale else f"gft-s{s:g}",
            model="gft",
            headline=s == settings.gft_scale,
            cfg_scale=1.0,
            gft_beta=1.0 / s,
            family="GFT, beta = 1/s",
            sweep_value=s,
            sweep_label=f"s={s:g}",
        )
        for s in scales
    ]


def _gft_recipe_text(info: dict) -> str:
    return (
        f"lr {info['lr']:g} cosine, {info['images_per_step']} images, sampled at beta "
        f"{info['gft_beta']:.3g} (s = {info['scale']:g})"
    )


# ---- DDO ----
def ddo_batch(settings: DemoSettings) -> int:
    """DDO's images per step: B x (2 - u) policy rows (data + expected negatives) = the budget."""
    return max(1, round(settings.rows_per_step / (2 - settings.ddo_uncond_ratio)))


def _check_ddo_rounds(settings: DemoSettings) -> None:
    if settings.ddo_rounds > settings.steps:
        raise ValueError(
            f"--ddo-rounds {settings.ddo_rounds} would split {settings.steps} steps: give at "
            "least one step per round (--steps, --ddo-rounds)"
        )


def ddo_steps_per_round(settings: DemoSettings) -> int:
    """The step budget split over the rounds (150 steps, 3 rounds: 50 each)."""
    return max(1, settings.steps // settings.ddo_rounds)


def ddo_config(settings: DemoSettings, data: dict, out: Path) -> TrainConfig:
    """DDO: ``ddo_rounds`` rounds sharing the step budget, constant lr, negatives from a file."""
    doc = _common(settings, data, ddo_batch(settings), ddo_steps_per_round(settings))
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
    return _placed(doc, out, "ddo")


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


def _ddo_meta(settings: DemoSettings, folder: Path, seconds: float) -> dict:
    """DDO's recipe and budget, with the negatives actually drawn and their sampling time."""
    batch, per_round = ddo_batch(settings), ddo_steps_per_round(settings)
    steps = per_round * settings.ddo_rounds
    drawn = ddo_negatives(folder, settings.ddo_rounds)
    return {
        "alpha": settings.ddo_alpha,
        "beta": settings.ddo_beta,
        "lr": settings.ddo_lr,
        "uncond_ratio": settings.ddo_uncond_ratio,
        "rounds": settings.ddo_rounds,
        "steps_per_round": per_round,
        "steps": steps,
        "images_per_step": batch,
        "rows_per_step": batch * (2 - settings.ddo_uncond_ratio),  # expected: data + negatives
        "rows_per_step_measured": (batch * steps + drawn["negatives"]) / steps,
        "nograd_rows_per_step": batch * (2 - settings.ddo_uncond_ratio),  # the reference
        **drawn,
        "finetune_seconds": seconds,  # negatives' sampling included
    }


def _ddo_rows(settings: DemoSettings) -> list[dict]:
    """DDO guidance-free, then DDO + CFG: what its null rows (data term only) keep usable."""
    return [
        dict(
            name="ddo",
            model="ddo",
            headline=True,
            cfg_scale=1.0,
            family="DDO",
            sweep_label=f"α={settings.ddo_alpha:g}",
        ),
        _with_cfg("ddo", "DDO", settings),
    ]


def _ddo_recipe_text(info: dict) -> str:
    return (
        f"alpha {info['alpha']:g}, beta {info['beta']:g}, lr {info['lr']:g} constant, "
        f"uncond {info['uncond_ratio']:g}, {info['rounds']} rounds x {info['steps_per_round']}, "
        f"{info['images_per_step']} images + {info['negatives']} negatives in all "
        f"({info['rows_per_step_measured']:.1f} rows/step measured)"
    )


def _one(build: Callable[[DemoSettings, Path, Path], TrainConfig], key: str):
    def variants(settings: DemoSettings, data: dict, out: Path) -> list[Variant]:
        return [Variant(key, build(settings, data, out))]

    return variants


#: the demo's recipes, in the order reports list them
RECIPES: dict[str, DemoRecipe] = {
    "cca": DemoRecipe(
        "cca",
        "CCA",
        _cca_variants,
        _cca_meta,
        _cca_rows,
        _cca_recipe_text,
        setup_text=_cca_setup_text,
        model_key=lambda row: f"cca{row['lam']:g}",
    ),
    "gft": DemoRecipe("gft", "GFT", _one(gft_config, "gft"), _gft_meta, _gft_rows,
                      _gft_recipe_text),
    "ddo": DemoRecipe(
        "ddo",
        "DDO",
        _one(ddo_config, "ddo"),
        _ddo_meta,
        _ddo_rows,
        _ddo_recipe_text,
        time_note=lambda info: f" (of it {info['negatives_seconds']:.0f} s sampling its negatives)",
        check=_check_ddo_rounds,
    ),
}


def get(method: str) -> DemoRecipe:
    """The demo recipe of ``method``."""
    if method not in RECIPES:
        raise ValueError(f"the demo has no recipe for {method!r}; it has {', '.join(RECIPES)}")
    return RECIPES[method]


def parse_methods(text: str) -> tuple[str, ...]:
    """``"cca,gft"`` -> ("cca", "gft") in the canonical order; unknown names raise ValueError."""
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    unknown = names - set(RECIPES)
    if unknown or not names:
        raise ValueError(f"--methods takes a comma list of {', '.join(RECIPES)}; got {text!r}")
    return tuple(m for m in RECIPES if m in names)
