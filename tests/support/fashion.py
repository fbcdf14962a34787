"""Fake Fashion-MNIST idx files, for the data and command tests."""

from __future__ import annotations

import gzip

import numpy as np

from ccalign.data import fashion_mnist


def _idx(magic: int, dims: tuple[int, ...], data: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + data.astype(np.uint8).tobytes()

def write_fake_fashion_mnist(folder, train: int = 5, test: int = 3, gz: bool = True):
    """Write the four idx files with random content; returns the images and labels per split."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = {}, {}
    for split, count in (("train", train), ("test", test)):
        images[split] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels[split] = rng.integers(0, 10, count).astype(np.int64)
        image_name, label_name = fashion_mnist.FILES[split]
        for name, blob in ((image_name, _idx(2051, (count, 28, 28), images[split])),
                           (label_name, _idx(2049, (count,), labels[split]))):
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(blob)
            else:
                (folder / name).write_bytes(blob)
    return images, labels
