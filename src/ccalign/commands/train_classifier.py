"""`ccalign train-classifier`: train the Fashion-MNIST evaluation classifier and save it."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

HELP = "train the Fashion-MNIST classifier used for domain FID / IS / conditional accuracy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from ccalign.devices import device_flag
    from ccalign.io import output_file
    from ccalign.settings import MAX_SEED, MAX_THREADS, number

    parser.add_argument(
        "--out",
        type=output_file,
        default=Path("fmnist_classifier.safetensors"),
        help="output .safetensors file (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the four Fashion-MNIST idx files (default: "
        "$CCALIGN_FASHION_MNIST, else /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument(
        "--arch", choices=("cnn", "mlp"), default="cnn",
        help="cnn (the demos' features and first accuracy) or mlp (a pixel MLP: the second, "
        "independent accuracy); default: %(default)s",
    )
    parser.add_argument("--epochs", type=number(int, ge=1, le=10_000), default=5)
    parser.add_argument("--batch-size", type=number(int, ge=1, le=60_000), default=128)
    parser.add_argument(
        "--lr", type=number(float, gt=0, le=1), default=3e-3, help="peak one-cycle learning rate"
    )
    parser.add_argument("--seed", type=number(int, ge=0, le=MAX_SEED), default=0)
    parser.add_argument(
        "--threads",
        type=number(int, ge=1, le=MAX_THREADS),
        default=2,
        help="CPU threads (default: 2)",
    )
    parser.add_argument(
        "--device", type=device_flag, default=None, help="cpu or cuda (default: cuda if present)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    """Train, report the test accuracy and write the weights atomically."""
    import torch

    from ccalign.devices import pick_device
    from ccalign.eval.classifier import save_classifier
    from ccalign.eval.classifier_training import train_classifier

    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be positive")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    report = train_classifier(
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=device,
        progress=not args.no_progress,
        arch=args.arch,
    )
    notes = {
        "test_accuracy": f"{report.test_accuracy:.4f}",
        "train_seconds": f"{report.seconds:.0f}",
        "recipe": f"arch={args.arch} epochs={args.epochs} batch_size={args.batch_size} "
        f"lr={args.lr} seed={args.seed} device={device} threads={args.threads}",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    save_classifier(report.model, args.out, extra=notes)
    print(
        f"test accuracy {report.test_accuracy:.4f} after {report.epochs} epochs "
        f"({report.seconds:.0f} s); saved {args.out}"
    )
    return 0
