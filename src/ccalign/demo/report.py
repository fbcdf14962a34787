"""What the demo leaves behind: per-class grids, metrics.json, report.md and trade-off plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ccalign.io import atomic_write

METRIC_COLUMNS = (
    ("fid", "FID ↓", "{:.2f}"),
    ("fid_std", "± (bootstrap)", "{:.2f}"),
    ("accuracy", "acc CNN ↑", "{:.3f}"),
    ("accuracy_mlp", "acc MLP ↑", "{:.3f}"),
    ("accuracy_heldout", "held-out acc CNN ↑", "{:.3f}"),  # text-to-image: unseen pairs
    ("accuracy_heldout_mlp", "held-out acc MLP ↑", "{:.3f}"),
    ("precision", "prec ↑", "{:.3f}"),
    ("recall", "recall ↑", "{:.3f}"),
    ("inception_score", "IS ↑", "{:.2f}"),
    ("images_per_s", "images/s", "{:.0f}"),
    ("num_samples", "samples", "{}"),
)


def class_grid(images: np.ndarray, labels: np.ndarray, per_row: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W[, C]) into one row per class (sorted), ``per_row`` columns."""
    if images.ndim == 3:
        images = images[..., None]
    h, w, c = images.shape[1:]
    classes = np.unique(labels)
    grid = np.full(
        (len(classes) * (h + pad) + pad, per_row * (w + pad) + pad, c), 255, dtype=np.uint8
    )
    for r, cls in enumerate(classes):
        for col, idx in enumerate(np.flatnonzero(labels == cls)[:per_row]):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[y : y + h, x : x + w] = images[idx]
    return grid[..., 0] if c == 1 else grid


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> Path:
    """Write a uint8 image atomically, optionally enlarged with nearest-neighbour pixels."""
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_metrics(runs: Sequence[dict], path: Path, meta: dict) -> Path:
    """``metrics.json``: {"meta": {...}, "runs": [one record per setting]}."""
    text = json.dumps({"meta": meta, "runs": list(runs)}, indent=2)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def cfg_curve(runs: Sequence[dict]) -> list[dict]:
    """The base model's constant-scale CFG rows, its guidance-free row (s = 1) included."""
    return [r for r in runs if r["model"] == "base" and "sampler_settings" not in r]


def own_guidance_runs(runs: Sequence[dict]) -> list[dict]:
    """The base model's rows under its family's own guidance number (VAR's cfg ramp)."""
    return [r for r in runs if r["model"] == "base" and "sampler_settings" in r]


def prompt_words(meta: dict) -> str:
    """What every setting sampled for (class labels or captions)."""
    return meta.get("prompts", "balanced over the 10 classes")


def split_words(meta: dict) -> str:
    """Which samples and test images a report's figures come from (``--split``)."""
    split = meta.get("split", "report")
    half = "second" if split == "tune" else "first"
    return (f"sampling seed {meta.get('sample_seed', meta['seed'])}, the {split} split: the "
            f"{half} half of the test images")


#: the two bundled classifiers' accuracies: every accuracy claim must hold under both
ACCURACIES = (("accuracy", "CNN"), ("accuracy_mlp", "MLP"))


def gap_closed(base: dict, tuned: dict, target: dict) -> dict[str, float | None]:
    """Per classifier, the share of the accuracy gap from ``base`` to ``target`` that ``tuned``
    closes (None where ``target`` is not more accurate than ``base`` by that classifier)."""
    shares = {}
    for key, name in ACCURACIES:
        if key not in base:
            continue
        gap = target[key] - base[key]
        shares[name] = (tuned[key] - base[key]) / gap if gap > 0 else None
    return shares


def accuracy_claim(title: str, base: dict, tuned: dict, target: dict, what: str) -> str:
    """What ``tuned`` does to the accuracy gap from ``base`` to ``target`` (``what`` names it),
    as both classifiers see it; a share is claimed only where both classifiers agree."""
    shares = gap_closed(base, tuned, target)
    known = {name: share for name, share in shares.items() if share is not None}
    if not known:
        return f"{what} is not more accurate than the base model, by either classifier."
    said = " and ".join(f"{share:.0%} ({name})" for name, share in known.items())
    text = f"Of the accuracy gap to {what} {title} closes {said}"
    if len(known) < len(shares):
        return text + "; the other classifier sees no gap, so no accuracy gain is claimed."
    low, high = min(known.values()), max(known.values())
    if low <= 0 < high:
        return text + ": the classifiers disagree on whether it gains accuracy at all, so no " \
            "accuracy gain is claimed."
    if low < 0.5 <= high:
        return text + f": the classifiers disagree on whether it closes most of it; only " \
            f"{low:.0%} is claimed."
    return text + (" (beyond that setting's accuracy)." if low >= 1 else ".")


def metrics_table(runs: Sequence[dict]) -> str:
    """A Markdown table: one row per setting, the metrics in METRIC_COLUMNS that any run has."""
    columns = [c for c in METRIC_COLUMNS if any(run.get(c[0]) is not None for run in runs)]
    head = "| setting | model | guidance |" + "".join(f" {t} |" for _, t, _ in columns)
    rule = "|---|---|---|" + "---|" * len(columns)
    rows = [head, rule]
    for run in runs:
        guidance = run.get("guidance") or (
            "none" if run["cfg_scale"] == 1.0 else f"CFG {run['cfg_scale']:g}"
        )
        cells = "".join(
            f" {fmt.format(run[key])} |" if run.get(key) is not None else " - |"
            for key, _, fmt in columns
        )
        rows.append(f"| {run['name']} | {run['model']} | {guidance} |{cells}")
    return "\n".join(rows)


def plot_tradeoff(runs: Sequence[dict], path: Path, title: str = "CFG scale vs CCA",
                  accuracy_label: str = "conditional accuracy") -> Path:
    """FID against IS and against accuracy, one curve per family (CFG sweep, CCA lambda sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    families: dict[str, list[dict]] = {}
    for run in runs:
        families.setdefault(run.get("family", run["name"]), []).append(run)
    for ax, key, label in (
        (axes[0], "inception_score", "IS analogue (classifier) ↑"),
        (axes[1], "accuracy", f"{accuracy_label.split(' (')[0]} ↑"),
    ):
        for family, members in families.items():
            members = sorted(members, key=lambda r: r.get("sweep_value", 0.0))
            xs = [m[key] for m in members]
            ys = [m["fid"] for m in members]
            marker = "o-" if len(members) > 1 else "s"
            ax.plot(xs, ys, marker, label=family)
            for m, x, y in zip(members, xs, ys, strict=True):
                if "sweep_label" in m:
                    ax.annotate(
                        m["sweep_label"],
                        (x, y),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ax.set_xlabel(label)
        ax.set_ylabel("FID (classifier features) ↓")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fidelity-diversity trade-off: {title}")
    fig.tight_layout()

    def save(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write(path, save)
    plt.close(fig)
    return path
