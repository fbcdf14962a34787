"""`ccalign demo`: the embedded default, CCA vs CFG on Fashion-MNIST, with a written report."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "CCA on Fashion-MNIST from the bundled base model, compared with CFG (report in --out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="report folder")
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="add a lambda sweep for CCA and a scale sweep for CFG (the paper's Figure 4)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        help="samples per headline row: base, base + CFG, CCA (default 10000)",
    )
    parser.add_argument(
        "--curve-samples", type=int, help="samples per other row: CFG scales, CCA + CFG (2000)"
    )
    parser.add_argument("--steps", type=int, help="CCA optimizer steps")
    parser.add_argument("--lam", type=float, help="CCA lambda")
    parser.add_argument("--beta", type=float, help="CCA beta")
    parser.add_argument("--lr", type=float, help="CCA learning rate")
    parser.add_argument(
        "--dropout",
        choices=("both", "none", "policy-only"),
        help="dropout of policy and reference during CCA (method.dropout)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ccalign.demo.pipeline import DemoSettings, run_demo

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    changes = {
        "out": args.out,
        "sweep": args.sweep,
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    for key in ("samples", "curve_samples", "steps", "lam", "beta", "lr", "dropout"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    settings = DemoSettings.quick(**changes) if args.quick else DemoSettings(**changes)
    result = run_demo(settings)
    print(f"report: {args.out / 'report.md'} ({result['meta']['seconds']:.0f} s)")
    return 0
