"""The written report of ``ccalign demo --methods ...``: guidance-free methods against CFG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ccalign.demo import recipes, report
from ccalign.io import atomic_write


def _title(method: str) -> str:
    return recipes.get(method).title


def write_report(runs: list[dict], meta: dict, path: Path, extra: str = "") -> Path:
    """report.md: setup, budget, fine-tune times, the metrics table, the reading (``extra``:
    the task's own words after it), the figures."""
    by_name = {r["name"]: r for r in runs}
    methods = meta["methods"]
    text = "\n\n".join(
        [
            f"# Guidance-free methods on Fashion-MNIST ({meta.get('family_title', 'LlamaGen')}): "
            + ", ".join(_title(m) for m in methods),
            setup_text(meta),
            budget_table(meta),
            report.metrics_table(runs),
            "## Reading\n\n" + reading(by_name, runs, meta) + (f" {extra}" if extra else ""),
            "![trade-off](tradeoff.png)\n\n"
            + "\n".join(f"![{r['name']}](grids/{r['name']}.png)" for r in runs),
        ]
    )
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def setup_text(meta: dict) -> str:
    """Samples, reference, the matched budget and the machine, in one paragraph."""
    budget = meta["budget"]
    return (
        f"{meta['samples_per_setting']} samples per headline row (base, base + CFG, each "
        f"method guidance-free) and {meta['curve_samples_per_setting']} per other row "
        f"({report.prompt_words(meta)}, {report.split_words(meta)}), compared with "
        f"{meta['reference_images']} test images through the bundled classifier's features; "
        "the ± column is the bootstrap spread of FID (sample noise only: one fine-tune per "
        "method, so fine-tune-to-fine-tune variance is not in it). Every method fine-tunes the "
        "same bundled base model on the same encoded training codes through the project's "
        f"trainer with a matched budget: {budget['steps']} optimizer steps, "
        f"{budget['rows_per_step']} sequence rows through the policy with gradient per step and "
        "as many through a no-gradient forward (CCA: pairs under true and mismatched labels, "
        "reference forward; GFT: conditional rows, unconditional pass without gradient; DDO: "
        "data rows plus one reference sample per conditional row, reference forward). DDO also "
        "samples its negatives from the reference, which is extra work counted in its time. "
        f"Whole run: {meta['seconds']:.0f} s on {meta['threads']} thread(s)."
    )


def budget_table(meta: dict) -> str:
    """One row per method: recipe, steps, rows per step and fine-tuning wall time."""
    rows = [
        "| method | recipe | steps | rows/step (grad + no-grad) | fine-tune s | negatives s |",
        "|---|---|---|---|---|---|",
    ]
    for method in meta["methods"]:
        info = meta[method]
        negatives = info.get("negatives_seconds")
        rows.append(
            f"| {_title(method)} | {recipes.get(method).recipe_text(info)} | {info['steps']} | "
            f"{info['rows_per_step']:g} + {info['nograd_rows_per_step']:g} | "
            f"{info['finetune_seconds']:.0f} | "
            + (f"{negatives:.0f} |" if negatives is not None else "- |")
        )
    return "\n".join(rows)


def cfg_fid_at(accuracy: float, cfg_runs: list[dict]) -> float | None:
    """FID of the base model's CFG curve at ``accuracy`` (linear in accuracy), None outside it."""
    points = sorted((r["accuracy"], r["fid"]) for r in cfg_runs)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 2 or not xs[0] <= accuracy <= xs[-1]:
        return None
    return float(np.interp(accuracy, xs, ys))


def reading(by_name: dict, runs: list[dict], meta: dict) -> str:
    """What the numbers show, method by method, with the noise that bounds each claim."""
    base = by_name["base"]
    curve = report.cfg_curve(runs)  # guidance-free base is the curve's s = 1
    best = min((r for r in curve if r["cfg_scale"] != 1.0), key=lambda r: r["fid"])
    parts = [
        f"Guidance-free, the base model has FID {base['fid']:.2f} ± {base['fid_std']:.2f} at "
        f"accuracy {base['accuracy']:.3f}; its best CFG setting (scale {best['cfg_scale']:g}) "
        f"FID {best['fid']:.2f} ± {best['fid_std']:.2f} at accuracy {best['accuracy']:.3f}."
    ]
    heads = [by_name[m] for m in meta["methods"]]
    parts += [method_sentence(row, meta, base, curve) for row in heads]
    if len(heads) > 1:
        parts.append(ranking(heads))
    parts.append(speed_sentence(heads, curve, meta["speed_ratio"]))
    parts.append(time_sentence(meta))
    return " ".join(parts)


def method_sentence(row: dict, meta: dict, base: dict, curve: list[dict]) -> str:
    """One method's guidance-free point against the base model and the CFG curve."""
    name = _title(row["model"])
    noise = float(np.hypot(base["fid_std"], row["fid_std"]))
    change = row["fid"] - base["fid"]
    text = (
        f"{name} guidance-free: FID {row['fid']:.2f} ± {row['fid_std']:.2f}, accuracy "
        f"{row['accuracy']:.3f}, recall {row['recall']:.3f} ("
        + (
            "within 2x noise of the base model's FID"
            if abs(change) < 2 * noise
            else f"FID {change:+.2f} vs the base model"
        )
        + f", accuracy {row['accuracy'] - base['accuracy']:+.3f}"
        + _second_accuracy(row, base)
        + ")"
    )
    peer = cfg_fid_at(row["accuracy"], curve)
    if peer is None:
        side = "above" if row["accuracy"] > max(r["accuracy"] for r in curve) else "below"
        return text + f"; its accuracy lies {side} the CFG curve's range."
    gap = row["fid"] - peer
    where = "on" if abs(gap) < 2 * row["fid_std"] else ("below" if gap < 0 else "above")
    return (
        text + f"; the CFG curve reaches that accuracy at FID {peer:.2f} (interpolated), so it "
        f"lies {where} the curve ({gap:+.2f})."
    )


def _second_accuracy(row: dict, base: dict) -> str:
    """The MLP classifier's accuracy change beside the CNN's, flagged where the two disagree."""
    if "accuracy_mlp" not in row:
        return ""
    cnn, mlp = row["accuracy"] - base["accuracy"], row["accuracy_mlp"] - base["accuracy_mlp"]
    text = f"; by the MLP classifier {mlp:+.3f}"
    return text + (", which disagrees: no accuracy change is claimed" if cnn * mlp < 0 else "")


def ranking(heads: list[dict]) -> str:
    """Which method has the lowest FID, and whether the gap to the next exceeds the noise."""
    order = sorted(heads, key=lambda r: r["fid"])
    first, second = order[0], order[1]
    noise = float(np.hypot(first["fid_std"], second["fid_std"]))
    gap = second["fid"] - first["fid"]
    head = (
        f"Lowest guidance-free FID: {_title(first['model'])} ({first['fid']:.2f}), then "
        f"{_title(second['model'])} ({second['fid']:.2f})"
    )
    if gap < 2 * noise:
        head += f": the gap {gap:.2f} is within twice the bootstrap noise ({noise:.2f})"
    else:
        head += f": the gap {gap:.2f} exceeds twice the bootstrap noise ({noise:.2f})"
    return head + "; " + accuracy_ranking(heads)


def accuracy_ranking(heads: list[dict]) -> str:
    """The most accurate method, named only where both classifiers rank it first."""
    cnn = max(heads, key=lambda r: r["accuracy"])
    if not all("accuracy_mlp" in r for r in heads):
        return f"highest accuracy: {_title(cnn['model'])} ({cnn['accuracy']:.3f})."
    mlp = max(heads, key=lambda r: r["accuracy_mlp"])
    if mlp is cnn:
        return (f"highest accuracy by both classifiers: {_title(cnn['model'])} "
                f"({cnn['accuracy']:.3f}, MLP {cnn['accuracy_mlp']:.3f}).")
    return (f"highest accuracy: {_title(cnn['model'])} by the CNN ({cnn['accuracy']:.3f}), "
            f"{_title(mlp['model'])} by the MLP ({mlp['accuracy_mlp']:.3f}): the classifiers "
            "disagree, so no method is ranked first by accuracy.")


def speed_sentence(heads: list[dict], curve: list[dict], ratio: dict) -> str:
    cfg_speed = float(np.mean([r["images_per_s"] for r in curve if r["cfg_scale"] != 1.0]))
    speeds = ", ".join(f"{_title(r['model'])} {r['images_per_s']:.0f}" for r in heads)
    return (
        f"Guidance-free sampling runs {ratio['median']:.2f}x as fast as CFG (median over "
        f"{ratio['rounds']} interleaved rounds, range {ratio['min']:.2f}-{ratio['max']:.2f}; "
        f"{speeds} vs CFG {cfg_speed:.0f} images/s)."
    )


def time_sentence(meta: dict) -> str:
    times = []
    for method in meta["methods"]:
        info = meta[method]
        note = recipes.get(method).time_note(info)
        times.append(f"{_title(method)} {info['finetune_seconds']:.0f} s{note}")
    return "Fine-tuning wall time at the matched budget: " + ", ".join(times) + "."
