"""`ccalign demo`: the embedded default, CCA vs CFG on Fashion-MNIST, with a written report."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "CCA (or --methods cca,gft,ddo) on Fashion-MNIST from the bundled LlamaGen (or --family var: "
    "VAR) base model, compared with CFG (report in --out)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign.demo.bundles import BUNDLES

    parser.add_argument(
        "--family",
        choices=tuple(BUNDLES),
        default=next(iter(BUNDLES)),
        help="the bundled model family: LlamaGen (next-token, 49 codes) or VAR (next-scale, "
        "88 codes of a multi-scale VQ)",
    )
    parser.add_argument(
        "--out", type=Path, help="report folder (default runs/demo, runs/demo_<family> for another)"
    )
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
    parser.add_argument(
        "--methods",
        default="cca",
        help="comma list of cca, gft, ddo: fine-tune each at a matched budget and compare them "
        "with CFG in one report (default: cca, the plain demo)",
    )
    parser.add_argument("--gft-lr", type=float, help="GFT learning rate (cosine)")
    parser.add_argument(
        "--gft-scale", type=float, help="GFT's guidance-free row samples at beta = 1 / this"
    )
    parser.add_argument(
        "--gft-curve-scales",
        type=_floats,
        help="comma list of further s (beta = 1/s) for GFT's own curve",
    )
    parser.add_argument("--ddo-alpha", type=float, help="DDO's weight of the reference samples")
    parser.add_argument("--ddo-beta", type=float, help="DDO beta")
    parser.add_argument("--ddo-lr", type=float, help="DDO learning rate (constant)")
    parser.add_argument("--ddo-rounds", type=int, help="DDO rounds sharing the step budget")
    parser.add_argument("--ddo-uncond-ratio", type=float, help="DDO's null-label fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ccalign.demo.bundles import bundle
    from ccalign.demo.pipeline import run_demo
    from ccalign.demo.recipes import parse_methods
    from ccalign.demo.settings import DemoSettings

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    out = args.out or bundle(args.family).default_out
    changes = {
        "out": out,
        "sweep": args.sweep,
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    changes["methods"] = parse_methods(args.methods)
    keys = ("samples", "curve_samples", "steps", "lam", "beta", "lr", "dropout", "gft_lr")
    keys += ("gft_scale", "gft_curve_scales", "ddo_alpha", "ddo_beta", "ddo_lr", "ddo_rounds")
    for key in (*keys, "ddo_uncond_ratio"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    settings = DemoSettings.for_family(args.family, quick=args.quick, **changes)
    result = run_demo(settings)
    print(f"report: {out / 'report.md'} ({result['meta']['seconds']:.0f} s)")
    return 0
