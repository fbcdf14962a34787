"""`ccalign train-tokenizer`: train the small VQ tokenizer on Fashion-MNIST or an image folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HELP = (
    "train a small VQ image tokenizer (28x28 grey -> 7x7 codes, or --kind multiscale: VAR's "
    "multi-scale codes) and report its quality"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign.devices import device_flag
    from ccalign.io import output_file
    from ccalign.settings import MAX_SEED, MAX_THREADS, number

    parser.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist' or a folder of images laid out <class>/<image>",
    )
    parser.add_argument(
        "--fashion-mnist-folder",
        default=None,
        help="folder with the Fashion-MNIST idx files (default: "
        "$CCALIGN_FASHION_MNIST, then /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument(
        "--test-data",
        default=None,
        help="image folder to evaluate on (Fashion-MNIST uses its test split)",
    )
    parser.add_argument(
        "--out", type=output_file, required=True, help="tokenizer file to write (.safetensors)"
    )
    parser.add_argument(
        "--kind",
        choices=("vq", "multiscale"),
        default="vq",
        help="vq: LlamaGen-family VQ (7x7 codes); multiscale: VAR's multi-scale "
        "VQVAE (codes of scales 1, 2, 3, 5, 7 for the VAR demo)",
    )
    parser.add_argument(
        "--patch-nums",
        default=None,
        help="multiscale only: comma list of scale sides, the last one the latent "
        "side (default 1,2,3,5,7)",
    )
    parser.add_argument(
        "--image-size",
        type=number(int, ge=1, le=16384),
        default=None,
        help="image side for folders (default: the small VQ's 28)",
    )
    parser.add_argument(
        "--channels",
        type=number(int, ge=1, le=3),
        choices=(1, 3),
        default=None,
        help="1 = grey, 3 = RGB (default: 1)",
    )
    parser.add_argument(
        "--codebook-size", type=number(int, ge=2, le=2**24), default=None, help="default 512"
    )
    parser.add_argument("--steps", type=number(int, ge=1, le=10**9), default=None)
    parser.add_argument("--batch-size", type=number(int, ge=1, le=100_000), default=None)
    parser.add_argument("--lr", type=number(float, gt=0, le=1), default=None)
    parser.add_argument("--seed", type=number(int, ge=0, le=MAX_SEED), default=0)
    parser.add_argument(
        "--threads", type=number(int, ge=1, le=MAX_THREADS), default=2, help="CPU threads for torch"
    )
    parser.add_argument(
        "--device", type=device_flag, default=None, help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--store-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="precision of the stored weights (float16 halves the file)",
    )
    parser.add_argument(
        "--recon-png",
        type=output_file,
        default=None,
        help="write originals (odd rows) vs reconstructions (even rows) here",
    )
    parser.add_argument(
        "--metrics-json", type=output_file, default=None, help="write the test metrics here"
    )


def run(args: argparse.Namespace) -> int:
    from ccalign.devices import pick_device
    from ccalign.tokenizers import files, small_vq

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    train_images, test_images, test_labels = _load_data(args, model.image_size, model.channels)
    settings = small_vq.TrainSettings(
        seed=args.seed,
        **{
            k: v
            for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr))
            if v is not None
        },
    )
    codes = getattr(model, "patch_nums", (model.grid,))
    print(
        f"training the small {args.kind} tokenizer ({model.num_parameters():,} parameters, "
        f"{model.vocab_size} codes, scales {'/'.join(f'{p}x{p}' for p in codes)}) on "
        f"{len(train_images)} images for {settings.steps} steps, device {device}",
        file=sys.stderr,
    )
    history = small_vq.train(model, train_images, settings, log=lambda m: print(m, file=sys.stderr))
    dtype = torch.float16 if args.store_dtype == "float16" else None
    files.save(model, args.out, dtype=dtype)
    stored = files.load(args.out).to(device)  # report what the file holds
    metrics = small_vq.evaluate(stored, test_images)
    metrics.update(
        train_seconds=round(history.seconds, 1),
        steps=settings.steps,
        restarted_codes=history.restarted,
        file_bytes=Path(args.out).stat().st_size,
    )
    print(json.dumps(metrics, indent=1))
    if args.metrics_json:
        from ccalign.io import atomic_write

        atomic_write(args.metrics_json, lambda tmp: Path(tmp).write_text(json.dumps(metrics)))
    if args.recon_png:
        save_comparison_png(stored, test_images, test_labels, args.recon_png)
    return 0


def build_model(args: argparse.Namespace):
    """The untrained tokenizer ``--kind`` names, with the size options applied."""
    from ccalign.tokenizers import small_vq

    if args.kind == "vq":
        if args.patch_nums is not None:
            raise ValueError("--patch-nums applies to --kind multiscale only")
        overrides = {
            k: v
            for k, v in (
                ("image_size", args.image_size),
                ("in_channels", args.channels),
                ("codebook_size", args.codebook_size),
            )
            if v is not None
        }
        return small_vq.build_small(**overrides)
    overrides = {
        k: v
        for k, v in (("in_channels", args.channels), ("vocab_size", args.codebook_size))
        if v is not None
    }
    if args.patch_nums is not None:
        overrides["patch_nums"] = tuple(int(p) for p in args.patch_nums.split(","))
    model = small_vq.build_small_multiscale(**overrides)
    if args.image_size is not None and args.image_size != model.image_size:
        raise ValueError(
            f"the multi-scale VQ with scales {model.patch_nums} encodes {model.image_size} px "
            f"images (4x the last scale); set --patch-nums to give {args.image_size} px"
        )
    return model


def _load_data(args, size: int, channels: int):
    """(train uint8, test uint8, test labels): Fashion-MNIST's splits or image folders."""
    if args.data == "fashion-mnist":
        from ccalign.data import fashion_mnist

        if (size, channels) != (28, 1):
            raise ValueError("Fashion-MNIST is 28x28 grey: leave --image-size/--channels unset")
        train, _ = fashion_mnist.load("train", args.fashion_mnist_folder)
        test, labels = fashion_mnist.load("test", args.fashion_mnist_folder)
        return torch.from_numpy(train), torch.from_numpy(test), labels
    train, train_labels = load_folder_images(args.data, size, channels)
    if args.test_data is None:
        print("note: no --test-data; evaluating on the training images", file=sys.stderr)
        return train, train, train_labels
    test, labels = load_folder_images(args.test_data, size, channels)
    return train, test, labels


def load_folder_images(root, size: int, channels: int) -> tuple[torch.Tensor, np.ndarray]:
    """All images of a class folder tree, centre-cropped to size: uint8 (N, H, W[, C]), labels.

    Unreadable images are reported on stderr and left out (their labels with them).
    """
    from ccalign.data.images import center_crop_arr, list_image_folder, open_image

    index = list_image_folder(root)
    arrays, labels = [], []
    for path, label in index.samples:
        try:
            image = open_image(path, "L" if channels == 1 else "RGB")
        except (OSError, ValueError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        arrays.append(np.asarray(center_crop_arr(image, size)))
        labels.append(label)
    if not arrays:
        raise ValueError(f"no readable images in {root}")
    return torch.from_numpy(np.stack(arrays)), np.asarray(labels, dtype=np.int64)


def save_comparison_png(
    model, images: torch.Tensor, labels: np.ndarray, path, per_class: int = 2, scale: int = 3
) -> None:
    """A grid with `per_class` test images of each class: originals above reconstructions."""
    from ccalign.data.images import to_uint8
    from ccalign.io import atomic_write
    from ccalign.tokenizers.base import to_model_range

    classes = [c for c in np.unique(labels) if (labels == c).sum() >= per_class]
    picks = [i for c in classes for i in np.flatnonzero(labels == c)[:per_class]]
    originals = images[picks]
    with torch.no_grad():
        x = to_model_range(originals.to(model.device), model.channels)
        recon = to_uint8(model.decode(model.encode(x)))
    rows = []
    for k in range(per_class):
        columns = slice(k, len(picks), per_class)
        rows.append(np.concatenate(list(originals[columns].numpy()), axis=1))
        rows.append(np.concatenate(list(recon[columns]), axis=1))
    grid = np.concatenate(rows, axis=0)
    image = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), resample=Image.NEAREST
    )
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
