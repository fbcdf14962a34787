"""`ccalign demo`: the embedded default, CCA vs CFG on Fashion-MNIST, with a written report."""

from __future__ import annotations

import argparse

HELP = (
    "CCA (or --methods cca,gft,ddo) on Fashion-MNIST from the bundled LlamaGen (or --family var: "
    "VAR; --family t2i: text-to-image) base model, compared with CFG (report in --out)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign.demo.bundles import BUNDLES
    from ccalign.demo.settings import DemoSettings
    from ccalign.io import output_folder
    from ccalign.settings import MAX_THREADS, declared_range, number, numbers

    def setting(name: str, kind: type = float):
        """A flag that sets the demo setting ``name``: its type and declared range."""
        return number(kind, within=declared_range(DemoSettings, name))

    parser.add_argument(
        "--family",
        choices=tuple(BUNDLES),
        default=next(iter(BUNDLES)),
        help="the bundled model family: LlamaGen (next-token, 49 codes), VAR (next-scale, "
        "88 codes of a multi-scale VQ) or t2i (LlamaGen T2I: two-item scenes drawn from "
        "captions, 98 codes)",
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        help="report folder (default runs/demo, runs/demo_<family> for another)",
    )
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="add a lambda sweep for CCA and a scale sweep for CFG (the paper's Figure 4)",
    )
    parser.add_argument(
        "--samples",
        type=setting("samples", int),
        help="samples per headline row: base, base + CFG, CCA (default 10000)",
    )
    parser.add_argument(
        "--curve-samples",
        type=setting("curve_samples", int),
        help="samples per other row: CFG scales, CCA + CFG (2000)",
    )
    parser.add_argument("--steps", type=setting("steps", int), help="CCA optimizer steps")
    parser.add_argument("--lam", type=setting("lam"), help="CCA lambda")
    parser.add_argument("--beta", type=setting("beta"), help="CCA beta")
    parser.add_argument("--lr", type=setting("lr"), help="CCA learning rate")
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
    parser.add_argument("--gft-lr", type=setting("gft_lr"), help="GFT learning rate (cosine)")
    parser.add_argument(
        "--gft-scale",
        type=setting("gft_scale"),
        help="GFT's guidance-free row samples at beta = 1 / this",
    )
    parser.add_argument(
        "--gft-curve-scales",
        type=numbers(float, within=declared_range(DemoSettings, "gft_curve_scales")),
        help="comma list of further s (beta = 1/s) for GFT's own curve",
    )
    parser.add_argument(
        "--ddo-alpha", type=setting("ddo_alpha"), help="DDO's weight of the reference samples"
    )
    parser.add_argument("--ddo-beta", type=setting("ddo_beta"), help="DDO beta")
    parser.add_argument("--ddo-lr", type=setting("ddo_lr"), help="DDO learning rate (constant)")
    parser.add_argument(
        "--ddo-rounds", type=setting("ddo_rounds", int), help="DDO rounds sharing the step budget"
    )
    parser.add_argument(
        "--ddo-uncond-ratio", type=setting("ddo_uncond_ratio"), help="DDO's null-label fraction"
    )
    parser.add_argument("--seed", type=setting("seed", int), default=0)
    parser.add_argument(
        "--split", choices=("report", "tune"), default="report",
        help="report (default): the first half of the test images and the run's seeds; tune: "
        "the other half and other sampling seeds, to choose recipes on data the report never "
        "shows",
    )
    parser.add_argument(
        "--threads", type=number(int, ge=1, le=MAX_THREADS), help="CPU threads (default: all cores)"
    )
    parser.add_argument("--no-progress", action="store_true")


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
        "split": args.split,
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
