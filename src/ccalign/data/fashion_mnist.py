"""Fashion-MNIST (60k train + 10k test, 28x28 grey, 10 classes) from its four idx files.

The files come from the Debian package ``dataset-fashion-mnist`` (installed under
``/usr/share/datasets/fashion-mnist``) or from any folder holding the same files, gzipped or not,
named by the ``folder`` argument or the ``CCALIGN_FASHION_MNIST`` environment variable.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ccalign.io import PathLike

if TYPE_CHECKING:
    import torch

ENV_VAR = "CCALIGN_FASHION_MNIST"
SYSTEM_FOLDER = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28


def find_folder(folder: PathLike | None = None) -> Path:
    """The folder holding the idx files: ``folder``, else $CCALIGN_FASHION_MNIST, else Debian's."""
    candidates = [Path(folder)] if folder else []
    if not candidates and os.environ.get(ENV_VAR):
        candidates = [Path(os.environ[ENV_VAR])]
    if not candidates:
        candidates = [SYSTEM_FOLDER]
    for candidate in candidates:
        if _idx_path(candidate, FILES["train"][0]) is not None:
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {candidates[0]}. Either install the Debian package "
        f"(`apt-get install dataset-fashion-mnist`, files land in {SYSTEM_FOLDER}) or put the "
        f"four idx files (train-images-idx3-ubyte[.gz], ...) in a folder and pass it as the "
        f"data folder or set {ENV_VAR} to it"
    )


def load(split: str = "train", folder: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of the "train" or "test" split."""
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    root = find_folder(folder)
    image_name, label_name = FILES[split]
    image_path = _require(root, image_name)
    images = _read_idx(image_path, IMAGE_MAGIC, 16)
    labels = _read_idx(_require(root, label_name), LABEL_MAGIC, 8)
    count = int.from_bytes(images[1][4:8], "big")
    if count == 0:
        raise ValueError(f"{image_path} holds no images; replace it with the full {split} file")
    rows, cols = int.from_bytes(images[1][8:12], "big"), int.from_bytes(images[1][12:16], "big")
    if (rows, cols) != (SIDE, SIDE) or images[0].size != count * rows * cols:
        raise ValueError(f"{image_path}: header says {count}x{rows}x{cols}, data disagrees")
    if labels[0].size != count:
        raise ValueError(f"{root}: {count} images but {labels[0].size} labels in the {split} split")
    return images[0].reshape(count, rows, cols).copy(), labels[0].astype(np.int64)


def encode(tokenizer, images: np.ndarray, batch: int = 1000, progress: bool = False,
           desc: str = "encode images") -> torch.Tensor:
    """int64 codes of uint8 grey images (N, 28, 28), ``batch`` at a time, in [-1, 1] as the
    tokenizers take them."""
    import torch
    from tqdm import tqdm

    codes = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch), desc=desc, disable=not progress):
            pixels = torch.from_numpy(images[start : start + batch]).float()[:, None] / 127.5 - 1
            codes.append(tokenizer.encode(pixels))
    return torch.cat(codes)


def _idx_path(root: Path, name: str) -> Path | None:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return None


def _require(root: Path, name: str) -> Path:
    path = _idx_path(root, name)
    if path is None:
        raise FileNotFoundError(f"{root} lacks {name}[.gz]; it needs all four Fashion-MNIST files")
    return path


def _read_idx(path: Path, magic: int, header: int) -> tuple[np.ndarray, bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); the file is damaged") from None
    found = int.from_bytes(raw[:4], "big") if len(raw) >= header else None
    if found != magic:
        raise ValueError(f"{path} is not an idx file of this kind (magic {found}, want {magic})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header), raw[:header]
