"""The embedded demo: CCA on Fashion-MNIST from a bundled base model, measured against CFG.

Three bundles ship a base model and tokenizer (``ccalign.demo.bundles``): LlamaGen (the
default, 49 codes per image), VAR (``--family var``: next-scale prediction over the 88 codes of
a small multi-scale VQ) and LlamaGen T2I (``--family t2i``: two-item scenes drawn from
captions). The pipeline below is the same for all, and for every method; what a bundle's model
draws and how its pictures are judged is its task (``ccalign.demo.tasks``).

Stages (each with its own progress bar): the task's training data (encoded once, cached in the
output folder), fine-tuning through the project's trainer (resumable), sampling every setting
with the same prompts and seeds, and evaluation with the bundled classifier against the split's
test images: domain FID, accuracy (conditional or caption), precision/recall, IS analogue and
images/s; and the accuracy again under the second bundled classifier (a pixel MLP trained
apart), so that no claim rests on one classifier.
With ``methods`` (``--methods cca,gft,ddo``) each method fine-tunes from the same base model and
codes at a matched budget (``ccalign.demo.recipes``) and one report compares them all
(``ccalign.demo.compare``); one method gets its own report (``ccalign.demo.single``).

The headline rows (base, base + CFG at the CCA + CFG scale, CCA) get enough samples for a
bootstrap FID spread <= 1; the rest of the curve (other CFG scales, CCA + CFG, sweeps) fewer.
Sampling runs the settings interleaved batch by batch, so every setting is timed many times under
the same machine load and the guidance-free / CFG speed ratio is a median over rounds, not one
timing per setting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ccalign.demo import compare, recipes, report, single
from ccalign.demo.settings import DemoSettings
from ccalign.models import families


def run_demo(settings: DemoSettings) -> dict:
    """Run every stage; returns the metrics document also written to ``out/metrics.json``."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle = settings.bundle
    task = bundle.task
    tokenizer = task.tokenizer(bundle.tokenizer)
    data = task.training_data(tokenizer, settings, out)
    scorer = task.scorer(settings)

    base = bundle.load_model(settings.base_model)
    models, trained = finetune_methods(settings, data, out)
    rows = plan_settings(settings)
    models = {"base": base, **models}
    drawn = sample_interleaved(rows, models, settings)
    runs = []
    for row in rows:
        prompts, tokens, speed = drawn[row["name"]]
        images = task.decode(tokenizer, tokens)
        record = {**row, **scorer.score(images, prompts, settings.curve_samples),
                  "images_per_s": speed}
        runs.append(record)
        grid = task.grid(images, prompts, settings.grid_columns)
        report.save_png(grid, out / "grids" / f"{row['name']}.png", scale=3)
        _say(
            settings,
            f"{row['name']}: FID {record['fid']:.2f} ± {record['fid_std']:.2f}, acc "
            f"{record['accuracy']:.3f} (MLP {record['accuracy_mlp']:.3f}), {speed:.0f} images/s",
        )

    meta = {
        "family": bundle.name,
        "family_title": bundle.title,
        "seed": settings.seed,
        "split": settings.split,
        "sample_seed": settings.sample_seed,
        "samples_per_setting": settings.samples,
        "curve_samples_per_setting": settings.curve_samples,
        "prompts": task.prompt_words,
        "accuracy_measure": task.accuracy_words,
        "reference_images": settings.reference_images,
        "speed_ratio": drawn["speed_ratio"],
        "methods": list(settings.methods),
        "budget": {"steps": settings.steps, "rows_per_step": settings.rows_per_step},
        **trained,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    report.write_metrics(runs, out / "metrics.json", meta)
    title = " / ".join(recipes.get(m).title for m in settings.methods)
    report.plot_tradeoff(runs, out / "tradeoff.png", title=f"CFG scale vs {title}",
                         accuracy_label=task.accuracy_words)
    written = single if len(settings.methods) == 1 else compare
    written.write_report(runs, meta, out / "report.md", task.reading(runs, settings.methods[0]))
    return {"meta": meta, "runs": runs}


def _say(settings: DemoSettings, text: str) -> None:
    if settings.progress:
        print(text, flush=True)


# ---- stage 2: models ----
def finetune_methods(settings: DemoSettings, data: dict, out: Path) -> tuple[dict, dict]:
    """Fine-tune every method in ``settings.methods`` on ``data`` (the config's data keys):
    ({model key: model}, {method: meta})."""
    models: dict = {}
    info: dict = {}
    for method in settings.methods:
        recipe = recipes.get(method)
        for variant in recipe.variants(settings, data, out):
            seconds = recipes.train_timed(variant.config, lambda t: _say(settings, t))
            folder = Path(variant.config.checkpoint.out)
            models[variant.key] = families.load_file(folder / "final.safetensors").eval()
            if variant.main:
                info[method] = recipe.meta(settings, folder, seconds)
    return models, info


# ---- stage 3: sampling and scoring ----
def plan_settings(settings: DemoSettings) -> list[dict]:
    """The table's rows: base without/with CFG, then each method's rows (CCA: with CFG, sweeps)."""
    sweep_scales = settings.sweep_cfg_scales if settings.sweep else ()
    base_scales = sorted({*settings.cfg_scales, *sweep_scales})
    rows = [
        dict(
            name="base",
            model="base",
            headline=True,
            cfg_scale=1.0,
            family="base + CFG scale",
            sweep_value=1.0,
            sweep_label="s=1",
            lam=None,
        )
    ]
    for s in base_scales:
        rows.append(
            dict(
                name=f"base-cfg{s:g}",
                model="base",
                headline=s == settings.cca_cfg_scale,
                cfg_scale=s,
                family="base + CFG scale",
                sweep_value=s,
                sweep_label=f"s={s:g}",
                lam=None,
            )
        )
    rows += own_guidance_rows(settings)
    for method in settings.methods:
        rows += recipes.get(method).rows(settings)
    return rows


def own_guidance_rows(settings: DemoSettings) -> list[dict]:
    """The base model under its family's own guidance number (VAR's cfg ramp), if any."""
    own = families.get(settings.bundle.family).own_guidance
    if own is None:
        return []
    return [
        dict(
            name=f"base-{own.key}{c:g}",
            model="base",
            headline=False,
            cfg_scale=1.0,
            sampler_settings={own.setting: c},
            guidance=f"{own.label} {c:g}",
            family=f"base + {own.label}",
            sweep_value=c,
            sweep_label=f"c={c:g}",
            lam=None,
        )
        for c in settings.own_cfg_scales
    ]


def is_guided(row: dict) -> bool:
    """Whether a row samples with guidance (a CFG scale, or the family's own number)."""
    return row["cfg_scale"] != 1.0 or "sampler_settings" in row


def model_key(row: dict) -> str:
    """The key of a row's model among the demo's models (a recipe may train several)."""
    return "base" if row["model"] == "base" else recipes.get(row["model"]).model_key(row)


@dataclass
class _Draw:
    """One setting's sampling: prompts, seeded generator, the batches drawn and their times."""

    row: dict
    sampler: object  # the model family's sampler
    prompts: object  # the task's prompts
    count: int
    generator: torch.Generator
    tokens: list[torch.Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def images_per_s(self) -> float:
        """Median over the batches (robust to a batch slowed by other load)."""
        speeds = [len(t) / s for t, s in zip(self.tokens, self.seconds, strict=True)]
        return float(np.median(speeds))


def sample_interleaved(rows: list[dict], models: dict, settings: DemoSettings) -> dict:
    """Tokens of every setting, drawn batch by batch in rounds over the settings.

    Each setting keeps its own generator seeded with ``settings.sample_seed`` (its samples do not
    depend on the interleaving) and is timed on every batch. Returns ``{name: (prompts, tokens,
    images/s)}`` with the median speed over its batches, and ``"speed_ratio"``: the median over
    rounds of (mean guidance-free speed) / (mean CFG speed) within the round, with its range.
    """
    from tqdm import tqdm

    task = settings.bundle.task
    samplers = {key: families.of(model).sampler(model) for key, model in models.items()}
    counts = [settings.samples if row.get("headline") else settings.curve_samples for row in rows]
    prompts = {count: task.prompts(count, settings) for count in set(counts)}
    draws = []
    for row, count in zip(rows, counts, strict=True):
        generator = torch.Generator().manual_seed(settings.sample_seed)
        draws.append(_Draw(row, samplers[model_key(row)], prompts[count], count, generator))
    longest = max(counts)
    rounds: list[dict[str, list[float]]] = []
    total = sum(counts)
    with tqdm(total=total, desc="sample", unit="image", disable=not settings.progress) as bar:
        for start in range(0, longest, settings.batch_size):
            speeds: dict[str, list[float]] = {"free": [], "cfg": []}
            for draw in draws:
                stop = min(start + settings.batch_size, draw.count)
                if stop <= start:
                    continue
                batch = task.conditions(draw.prompts, start, stop)
                scale = draw.row["cfg_scale"]
                extra = dict(draw.row.get("sampler_settings", {}))
                if "gft_beta" in draw.row:
                    extra["gft_beta"] = draw.row["gft_beta"]
                begin = time.perf_counter()
                draw.tokens.append(
                    draw.sampler.generate(batch, cfg_scale=scale, generator=draw.generator, **extra)
                )
                draw.seconds.append(time.perf_counter() - begin)
                kind = "cfg" if is_guided(draw.row) else "free"
                speeds[kind].append((stop - start) / draw.seconds[-1])
                bar.update(stop - start)
            rounds.append(speeds)
    for sampler in samplers.values():
        sampler.release()
    drawn = {d.row["name"]: (d.prompts, torch.cat(d.tokens), d.images_per_s()) for d in draws}
    drawn["speed_ratio"] = speed_ratio(rounds)
    return drawn


def speed_ratio(rounds: list[dict[str, list[float]]]) -> dict:
    """Median over rounds (with min and max) of mean guidance-free / mean CFG images/s."""
    ratios = [
        float(np.mean(r["free"]) / np.mean(r["cfg"])) for r in rounds if r["free"] and r["cfg"]
    ]
    if not ratios:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "rounds": 0}
    return {
        "median": float(np.median(ratios)),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }

