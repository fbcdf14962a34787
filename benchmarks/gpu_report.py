"""Collect the stage outputs of ``benchmarks/gpu_check.sh`` into one JSON and one markdown table.

    python benchmarks/gpu_report.py OUT       # reads OUT/stages.tsv, OUT/*.json, OUT/*.xml

Also computes the memory plans of the paper configs (configs/llamagen_*.toml) and puts the
official figures of docs/performance.md beside the measured ones.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
#: docs/performance.md: the official code on one H200 (bf16 autocast, eager, random weights)
OFFICIAL_TRAIN = {  # (model, micro-batch) -> (images/s, peak GiB)
    ("GPT-L", 2): (15.1, 9.7),
    ("GPT-L", 8): (57.3, 20.9),
    ("GPT-L", 16): (63.0, 35.8),
    ("GPT-L", 32): (67.0, 65.5),
    ("GPT-B", 2): (40.2, 3.8),
    ("GPT-B", 32): (173.9, 32.6),
}
OFFICIAL_SAMPLE = {  # (model, batch) -> (guidance-free images/s, CFG images/s)
    ("GPT-L", 8): (0.68, 8 / 15.4),
    ("GPT-L", 64): (4.0, 64 / 13.7),
    ("GPT-L", 256): (19.2, 15.3),
    ("GPT-B", 256): (46.8, 42.0),
}
PRESET_CONFIGS = ("B", "L", "XL", "XXL", "3B")


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def stages(out: Path) -> list[dict]:
    """name, exit code, seconds and command of every stage that ran."""
    rows = []
    path = out / "stages.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, ms, command = line.split("\t", 3)
        rows.append({"stage": name, "exit": int(rc), "seconds": int(ms) / 1000, "command": command})
    return rows


def test_counts(out: Path) -> dict | None:
    """Totals of the CUDA tests' junit file, with the names of failures."""
    path = out / "cuda_tests.xml"
    if not path.exists():
        return None
    cases = ET.parse(path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in cases:
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            counts["failures"].append(case.get("name"))
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def train_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("train_*.json")):
        data = read_json(path)
        args = data["args"]
        for r in data["results"]:
            official = OFFICIAL_TRAIN.get((args["model"], args["micro_batch"]))
            rows.append(
                {
                    "stage": path.stem,
                    "model": args["model"],
                    "micro_batch": args["micro_batch"],
                    "variant": r["variant"],
                    "weights": args["weights_dtype"] if r["variant"] == "ccalign" else "fp32",
                    "checkpointing": args["activation_checkpointing"] and r["variant"] == "ccalign",
                    "images_per_s": r["images_per_s"],
                    "peak_gib": r["peak_mib"] / 1024,
                    "memory_kind": r["memory_kind"],
                    "plan_gib": r["plan_mib"]["total"] / 1024 if "plan_mib" in r else None,
                    "official_images_per_s": official[0] if official else None,
                    "official_peak_gib": official[1] if official else None,
                }
            )
    return rows


def sample_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("sample_*.json")):
        for r in read_json(path):
            official = OFFICIAL_SAMPLE.get((r["model"], r["batch"]))
            rows.append(
                {
                    "stage": path.stem,
                    **r,
                    "official_free_img_s": official[0] if official else None,
                    "official_cfg_img_s": official[1] if official else None,
                }
            )
    return rows


def plans() -> list[dict]:
    """The paper configs' plans on an 80 GiB GPU: as written, and bf16 weights + checkpointing."""
    from ccalign.train.config import load_config
    from ccalign.train.memory import plan_from_config

    rows = []
    for size in PRESET_CONFIGS:
        path = REPO / "configs" / f"llamagen_{size}.toml"
        for label, sets in (
            ("as configured (fp32 weights)", []),
            (
                "bf16 weights + checkpointing",
                ['train.weights_dtype="bf16"', "train.activation_checkpointing=true"],
            ),
        ):
            config = load_config(path, ['train.device="cuda"', *sets])
            plan = plan_from_config(config, 80 * GIB).to_dict()
            plan["setting"] = label
            rows.append(plan)
    return rows


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['machine']}", ""]
    lines += ["| stage | exit | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['exit']} | {s['seconds']:.0f} |" for s in report["stages"]]
    tests = report["cuda_tests"]
    if tests is not None:
        failed = f" ({', '.join(tests['failures'])})" if tests["failures"] else ""
        lines += [
            "",
            f"CUDA tests: {tests['passed']} passed, {tests['failed']} failed{failed}, "
            f"{tests['skipped']} skipped",
        ]
    lines += [
        "",
        "## CCA training step (one optimizer step, random weights)",
        "",
        "| stage | model | micro-batch | variant | weights | checkpointing | images/s | peak GiB "
        "| plan GiB | official images/s | official GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["train"]:
        lines.append(
            f"| {r['stage']} | {r['model']} | {r['micro_batch']} | {r['variant']} | "
            f"{r['weights']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{fmt(r['images_per_s'])} | "
            f"{fmt(r['peak_gib'], 2)} | {fmt(r['plan_gib'], 2)} | "
            f"{fmt(r['official_images_per_s'])} | {fmt(r['official_peak_gib'])} |"
        )
    lines += [
        "",
        "## Sampling (576 tokens unless the model is custom)",
        "",
        "| stage | model | mode | batch | free img/s | latency s | CFG img/s | CFG cost | setup s "
        "| official free img/s | official CFG img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["sample"]:
        lines.append(
            f"| {r['stage']} | {r['model']} | {r['mode']} | {r['batch']} | "
            f"{fmt(r['free_img_s'])} | {fmt(r['free_latency_s'], 3)} | {fmt(r['cfg_img_s'])} | "
            f"{fmt(r['cfg_cost'], 2)}x | "
            f"{fmt(r['free_setup_s'] + r['cfg_setup_s'])} | {fmt(r['official_free_img_s'])} | "
            f"{fmt(r['official_cfg_img_s'])} |"
        )
    lines += [
        "",
        "## Memory plans of the paper configs on one 80 GiB GPU (GiB)",
        "",
        "| model | setting | micro-batch | weights | grads | optimizer | reference | activations "
        "| workspace | total | largest micro-batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["plans"]:
        parts = [p[k] / GIB for k in ("weights", "gradients", "optimizer", "reference")]
        acts = (p["activations"] + p["autocast_copies"]) / GIB
        lines.append(
            f"| {p['model']} | {p['setting']} | {p['micro_batch']} | "
            + " | ".join(f"{v:.1f}" for v in parts)
            + f" | {acts:.1f} | {p['workspace'] / GIB:.1f} | {p['total'] / GIB:.1f} | "
            f"{p['max_micro_batch']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    env = read_json(out / "env.json") or {}
    report = {
        "machine": env.get("machine", "unknown machine"),
        "env": env,
        "stages": stages(out),
        "cuda_tests": test_counts(out),
        "train": train_rows(out),
        "sample": sample_rows(out),
        "plans": plans(),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
