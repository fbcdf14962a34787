"""The embedded demo: CCA on Fashion-MNIST from a bundled base model, measured against CFG.

Two model families ship a base model and tokenizer (``ccalign.demo.bundles``): LlamaGen (the
default, 49 codes per image) and VAR (``--family var``: next-scale prediction over the 88 codes
of a small multi-scale VQ). The pipeline below is the same for both, and for every method.

Stages (each with its own progress bar): encode the training images with the bundled VQ (cached
in the output folder), fine-tuning through the project's trainer (resumable), sampling every
setting with the same labels and seeds, and evaluation with the bundled classifier against the
10k test images: domain FID, conditional accuracy, precision/recall, IS analogue and images/s;
and the conditional accuracy again under the second bundled classifier (a pixel MLP trained
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

from ccalign.data import fashion_mnist
from ccalign.data.codes import write_flat_codes
from ccalign.demo import compare, recipes, report, single
from ccalign.demo.settings import DemoSettings
from ccalign.eval import (
    bundled_classifier_path,
    conditional_accuracy,
    feature_statistics,
    fid_from_features,
    inception_score,
    load_classifier_extractor,
    manifold_radii,
    precision_recall,
)
from ccalign.models import families
from ccalign.tokenizers import load as load_tokenizer


def run_demo(settings: DemoSettings) -> dict:
    """Run every stage; returns the metrics document also written to ``out/metrics.json``."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle = settings.bundle
    tokenizer = load_tokenizer(bundle.tokenizer).eval()
    codes_path = encode_training_set(tokenizer, settings, out)
    extractor = load_classifier_extractor(progress=False)
    second = load_classifier_extractor(bundled_classifier_path("mlp"), progress=False)
    test_images, _ = fashion_mnist.load("test")
    reference = extractor.extract(test_images[settings.reference_slice])
    reference_radii = manifold_radii(reference.features, k=3)  # once, not per setting

    base = bundle.load_model(settings.base_model)
    models, trained = finetune_methods(settings, codes_path, out)
    rows = plan_settings(settings)
    models = {"base": base, **models}
    drawn = sample_interleaved(rows, models, settings)
    runs = []
    for row in rows:
        labels, tokens, speed = drawn[row["name"]]
        images = decode_images(tokenizer, tokens)
        metrics = score(
            images, labels, reference, reference_radii, extractor, settings.curve_samples
        )
        metrics["accuracy_mlp"] = conditional_accuracy(second.extract(images).logits, labels)
        record = {**row, **metrics, "images_per_s": speed}
        runs.append(record)
        grid = report.class_grid(images, labels, per_row=settings.grid_columns)
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
    report.plot_tradeoff(runs, out / "tradeoff.png", title=f"CFG scale vs {title}")
    written = single if len(settings.methods) == 1 else compare
    written.write_report(runs, meta, out / "report.md")
    return {"meta": meta, "runs": runs}


def _say(settings: DemoSettings, text: str) -> None:
    if settings.progress:
        print(text, flush=True)


# ---- stage 1: data ----
def encode_training_set(tokenizer, settings: DemoSettings, out: Path) -> Path:
    """Encode the first ``train_images`` training images once; later runs reuse the file."""
    path = out / f"codes_{settings.family}_train{settings.train_images}.safetensors"
    if path.exists():
        return path
    images, labels = fashion_mnist.load("train")
    images, labels = images[: settings.train_images], labels[: settings.train_images]
    codes = encode_images(tokenizer, images, settings)
    write_flat_codes(
        path,
        codes,
        labels,
        vocab_size=tokenizer.vocab_size,
        grid=tokenizer.grid,
        seq_len=getattr(tokenizer, "seq_len", None),  # a multi-scale VQ: every scale's codes
    )
    return path


@torch.inference_mode()
def encode_images(tokenizer, images: np.ndarray, settings: DemoSettings) -> np.ndarray:
    from tqdm import tqdm

    codes = []
    batches = range(0, len(images), 1000)
    for start in tqdm(batches, desc="encode train images", disable=not settings.progress):
        pixels = torch.from_numpy(images[start : start + 1000]).float()[:, None] / 127.5 - 1
        codes.append(tokenizer.encode(pixels).numpy())
    return np.concatenate(codes)


# ---- stage 2: models ----
# ---- stage 2: models ----
def finetune_methods(settings: DemoSettings, codes_path: Path, out: Path) -> tuple[dict, dict]:
    """Fine-tune every method in ``settings.methods``: ({model key: model}, {method: meta})."""
    models: dict = {}
    info: dict = {}
    for method in settings.methods:
        recipe = recipes.get(method)
        for variant in recipe.variants(settings, codes_path, out):
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


def balanced_labels(count: int) -> np.ndarray:
    return np.arange(count) % 10


@dataclass
class _Draw:
    """One setting's sampling: labels, seeded generator, the batches drawn and their times."""

    row: dict
    sampler: object  # the model family's sampler
    labels: np.ndarray
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
    depend on the interleaving) and is timed on every batch. Returns ``{name: (labels, tokens,
    images/s)}`` with the median speed over its batches, and ``"speed_ratio"``: the median over
    rounds of (mean guidance-free speed) / (mean CFG speed) within the round, with its range.
    """
    from tqdm import tqdm

    samplers = {key: families.of(model).sampler(model) for key, model in models.items()}
    draws = []
    for row in rows:
        count = settings.samples if row.get("headline") else settings.curve_samples
        generator = torch.Generator().manual_seed(settings.sample_seed)
        draws.append(_Draw(row, samplers[model_key(row)], balanced_labels(count), generator))
    longest = max(len(d.labels) for d in draws)
    rounds: list[dict[str, list[float]]] = []
    total = sum(len(d.labels) for d in draws)
    with tqdm(total=total, desc="sample", unit="image", disable=not settings.progress) as bar:
        for start in range(0, longest, settings.batch_size):
            speeds: dict[str, list[float]] = {"free": [], "cfg": []}
            for draw in draws:
                batch = torch.from_numpy(draw.labels[start : start + settings.batch_size])
                if len(batch) == 0:
                    continue
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
                speeds[kind].append(len(batch) / draw.seconds[-1])
                bar.update(len(batch))
            rounds.append(speeds)
    for sampler in samplers.values():
        sampler.release()
    drawn = {d.row["name"]: (d.labels, torch.cat(d.tokens), d.images_per_s()) for d in draws}
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


def decode_images(tokenizer, tokens: torch.Tensor) -> np.ndarray:
    """uint8 images (N, 28, 28) from token grids, decoded in batches."""
    with torch.inference_mode():
        pixels = torch.cat([tokenizer.decode(chunk) for chunk in tokens.split(2000)])
    return ((pixels[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def score(
    images: np.ndarray,
    labels: np.ndarray,
    reference,
    reference_radii,
    extractor,
    manifold_samples: int,
) -> dict:
    """Domain metrics of uint8 samples against the reference's classifier features.

    Precision and recall use the first ``manifold_samples`` samples of every row (balanced, as
    the labels cycle): recall's k-NN radii shrink as samples grow, so rows of different sizes
    are only comparable on the same count. FID, accuracy and IS use every sample.
    """
    extracted = extractor.extract(images)
    precision, recall = precision_recall(
        reference.features,
        extracted.features[:manifold_samples],
        k=3,
        real_radii=reference_radii,
    )
    return {
        "fid": fid_from_features(reference.features, extracted.features),
        "fid_std": bootstrap_fid_std(reference.features, extracted.features),
        "accuracy": conditional_accuracy(extracted.logits, labels),
        "precision": precision,
        "recall": recall,
        "inception_score": inception_score(extracted.logits, splits=1),
        "num_samples": int(len(labels)),
    }


def bootstrap_fid_std(reference: np.ndarray, samples: np.ndarray, rounds: int = 20) -> float:
    """Spread of FID over resamplings (with replacement) of the samples: its sampling noise.

    Uses tr sqrt(S_r S) = sum sqrt(eig(H^T S H)) with S_r = H H^T: a symmetric eigenproblem
    per round instead of a matrix square root, far faster; the reported FID stays the exact
    one, this only sizes its noise.
    """
    rng = np.random.default_rng(0)
    mu_r, sigma_r = feature_statistics(reference)
    w, v = np.linalg.eigh(sigma_r)
    half = v * np.sqrt(w.clip(min=0))
    fids = []
    for _ in range(rounds):
        mu, sigma = feature_statistics(samples[rng.integers(0, len(samples), len(samples))])
        eig = np.linalg.eigvalsh(half.T @ sigma @ half).clip(min=0)
        trace = np.trace(sigma_r) + np.trace(sigma) - 2 * np.sqrt(eig).sum()
        fids.append(float(np.sum((mu_r - mu) ** 2) + trace))
    return float(np.std(fids))


# ---- stage 4: the written report ----
