"""Folders of labelled images (one sub-folder per class, as ImageNet is laid out) and crops.

Listing order and class indices follow torchvision's ImageFolder (classes sorted by folder name;
files sorted, sub-folders walked in sorted order), so index i here is image i of the official
LlamaGen code extraction. Crops follow ADM's ``center_crop_arr`` and torchvision's ``TenCrop``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccalign.io import PathLike
from ccalign.tokenizers.base import to_model_range

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFolderIndex:
    """The images of a class-per-folder tree: ``samples[i] = (path, class index)``, and the
    links left out (``skipped_links``: see ``list_image_folder``)."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    skipped_links: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def list_image_folder(root: PathLike) -> ImageFolderIndex:
    """Index ``root/<class>/**/<image>`` in ImageFolder order; errors name an empty tree.

    A class folder may be a link (a subset of a larger tree), and so may an image. Inside a
    class, a link to a folder is followed only while it stays in that class and reaches a folder
    not listed yet: a link back to a parent, into another class or out of the data would list
    images twice, under the wrong label or without end. Those are left out and named in
    ``skipped_links``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; lay images out as {root}/<class>/<img>")
    tops = [(root / name).resolve() for name in classes]
    listed, skipped, samples = set(), [], []
    for index, (name, top) in enumerate(zip(classes, tops, strict=True)):
        if top in listed:  # a second link to a class folder listed already
            skipped.append(root / name)
            continue
        listed.add(top)
        for folder, files in _walk_class(root / name, top, set(tops) - {top}, skipped):
            images = [f for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
            samples.extend((Path(folder) / f, index) for f in images)
    if not samples:
        raise ValueError(f"{root} holds no images with extensions {IMG_EXTENSIONS}")
    return ImageFolderIndex(root, classes, samples, skipped)


def _walk_class(folder: Path, top: Path, others: set[Path], skipped: list[Path]):
    """(folder, files) of one class in sorted order; a folder reached through a link that leads
    out of the class ``top``, to another class's folder ``others`` (one linked inside this
    class) or to a folder walked already is pruned."""
    walked, seen = [], set()
    for path, dirs, files in os.walk(folder, followlinks=True):
        real = Path(path).resolve()
        if not real.is_relative_to(top) or real in seen or real in others:
            skipped.append(Path(path))
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # a deterministic walk: which of two paths to a folder is kept
        walked.append((path, files))
    return sorted(walked)


def open_image(path: PathLike, mode: str = "RGB") -> Image.Image:
    """Decode an image fully into ``mode`` ("RGB" or "L"); raises OSError/ValueError if corrupt."""
    with Image.open(path) as image:
        image.load()
        return convert_image(image, mode)


def convert_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` in ``mode`` with 8 bits per channel.

    16-bit greyscale (PIL modes "I;16*", and "I", as which older Pillow opens 16-bit PNGs) is
    scaled by 1/257 (65535 -> 255) instead of being clipped to 255 by ``convert``; float
    greyscale (mode "F", e.g. 32-bit TIFF) is read by its range (``float_to_8_bits``); every
    other mode (LA, P, CMYK, 1, RGBA, ...) goes through PIL's conversion, alpha dropped as
    torchvision's loader does.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(float_to_8_bits(np.asarray(image, dtype=np.float64)), "L")
    return image.convert(mode)


def float_to_8_bits(pixels: np.ndarray) -> np.ndarray:
    """Float pixels as uint8, read by their range: [0, 1] (scaled by 255), [0, 255] (as they
    are) or [0, 65535] (16-bit values, by 1/257); other values are refused (PIL clips them)."""
    if not np.isfinite(pixels).all():
        raise ValueError("a float image with NaN or infinite pixels")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(
            f"a float image with pixels in [{low:g}, {high:g}]; float pixels are read in [0, 1], "
            "[0, 255] or [0, 65535]: rescale the image"
        )
    scale = 255.0 if high <= 1 else 1.0 if high <= 255 else 1 / 257
    return np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: BOX-halve while the short side >= 2*size, BICUBIC to short side = size,
    then crop the centre size x size (offsets rounded down)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def five_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """TenCrop's five views of an (H, W[, C]) array: top-left, top-right, bottom-left,
    bottom-right, centre (centre offsets rounded half to even, as torchvision does)."""
    h, w = arr.shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds the image size {(h, w)}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [arr[y : y + size, x : x + size] for y, x in corners]


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The five crops of the image then the five of its horizontal mirror: (10, size, size[, C])."""
    return np.stack(five_crop(arr, size) + five_crop(arr[:, ::-1], size))


#: VAR's training view: the short side resized to round(1.125 size), then a random crop
VAR_MID_RESO = 1.125


def var_crop(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """VAR's training view (its ``build_dataset``): the short side LANCZOS-resized to
    round(1.125 size), the long side to int(that * long / short) as torchvision's Resize
    computes it, then a size x size crop at offsets drawn uniformly from ``rng``."""
    mid = round(VAR_MID_RESO * size)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    other = int(mid * long / short)
    shape = (mid, other) if w <= h else (other, mid)
    arr = np.asarray(image.resize(shape, resample=Image.LANCZOS))
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top : top + size, left : left + size]


def views(
    image: Image.Image,
    size: int,
    mode: str,
    crop_range: float = 1.1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The views an extraction encodes for one image, as uint8 (V, size, size[, C]).

    LlamaGen's: "ten-crop": centre crop to int(size * crop_range), then ten_crop; "flip":
    centre crop to size, the image and its mirror; "center": the centre crop alone. VAR's:
    "var-crop": :func:`var_crop` with offsets from ``rng`` (objects at VAR's pretraining scale,
    about 11% larger than in the centre crop).
    """
    if mode == "var-crop":
        if rng is None:
            raise ValueError("the var-crop view draws its offsets: pass rng")
        return var_crop(image, size, rng)[None]
    if mode == "ten-crop":
        return ten_crop(np.asarray(center_crop_arr(image, int(size * crop_range))), size)
    arr = np.asarray(center_crop_arr(image, size))
    if mode == "flip":
        return np.stack([arr, arr[:, ::-1]])
    if mode == "center":
        return arr[None]
    raise ValueError(f"unknown view mode {mode!r}; choose ten-crop, flip, center or var-crop")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-range images (B, C, H, W) -> uint8 (B, H, W[, C]) for saving, clamped to [-1, 1]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x.movedim(1, -1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


# ---- image sources shared by extract-codes and on-the-fly encoding ----
@dataclass(frozen=True)
class Item:
    """One source image: where it is (for reports) and its class."""

    name: str
    label: int


class FolderSource:
    """Images of a class-per-folder tree, in ImageFolder order."""

    def __init__(self, root):
        index = list_image_folder(root)
        self.items = [Item(str(p), label) for p, label in index.samples]
        self.classes = index.classes
        self.skipped_links = index.skipped_links

    def image(self, index: int, mode: str):
        return open_image(self.items[index].name, mode)


class FashionMNISTSource:
    """One split of Fashion-MNIST held in memory."""

    def __init__(self, split: str, folder):
        from ccalign.data import fashion_mnist

        self.images, labels = fashion_mnist.load(split, folder)
        self.items = [Item(f"fashion-mnist:{split}[{i}]", int(y)) for i, y in enumerate(labels)]
        self.classes = list(fashion_mnist.CLASS_NAMES)
        self.skipped_links: list = []

    def image(self, index: int, mode: str):
        return Image.fromarray(self.images[index]).convert(mode)


class ListSource:
    """Images named by LlamaGen's T2I ``.jsonl`` lists (``image_path`` per line): one list, or
    a folder of lists read in name order. ``entries`` gives each image's (list name, line), which
    names its caption features in LlamaGen's layout (``<features>/<list>/<line>.npy``)."""

    def __init__(self, path):
        path = Path(path)
        lists = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        self.items, self.entries = [], []
        for listing in lists:
            for line, text in enumerate(listing.read_text(encoding="utf-8").splitlines()):
                record = json.loads(text)
                if "image_path" not in record:
                    raise ValueError(f"{listing} line {line + 1} names no image_path")
                self.items.append(Item(str(record["image_path"]), 0))
                self.entries.append((listing.stem, line))
        if not self.items:
            raise ValueError(f"{path}: no images listed (LlamaGen's .jsonl lists: one JSON "
                             "object with image_path per line)")
        self.classes: list[str] = []
        self.skipped_links: list = []

    def image(self, index: int, mode: str):
        return open_image(self.items[index].name, mode)


#: WebDataset members that hold a sample's image, and its caption
SHARD_IMAGES = (".jpg", ".jpeg", ".png", ".webp")
SHARD_CAPTIONS = (".txt", ".caption")


class ShardSource:
    """Images of tar shards in WebDataset's layout (``<key>.jpg`` beside ``<key>.txt``): one
    ``.tar``, or a folder of them in name order. Read by index, not streamed: the shards are
    indexed once (their members' offsets), each image is then one seek and read, so training
    keeps its keyed data order and bit-exact resume. ``captions`` holds each sample's text."""

    def __init__(self, path):
        import tarfile

        path = Path(path)
        shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
        self.items, self.captions, self._where = [], [], []
        for shard in shards:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if member.isfile():  # the key: the name up to the basename's first dot
                        folder, _, base = member.name.rpartition("/")
                        stem, _, ext = base.partition(".")
                        key = f"{folder}/{stem}" if folder else stem
                        samples.setdefault(key, {})[f".{ext.lower()}"] = member
            with open(shard, "rb") as f:
                for key in sorted(samples):
                    self._add(shard, key, samples[key], f)
        if not self.items:
            raise ValueError(f"{path}: no samples with an image ({', '.join(SHARD_IMAGES)}) in "
                             "its tar shards")
        self.classes: list[str] = []
        self.skipped_links: list = []

    def _add(self, shard: Path, key: str, members: dict, f) -> None:
        image = next((members[e] for e in SHARD_IMAGES if e in members), None)
        if image is None:
            return
        caption = next((members[e] for e in SHARD_CAPTIONS if e in members), None)
        text = None
        if caption is not None:
            f.seek(caption.offset_data)
            text = f.read(caption.size).decode("utf-8").strip()
        self.items.append(Item(f"{shard}/{key}{Path(image.name).suffix}", 0))
        self.captions.append(text)
        self._where.append((shard, image.offset_data, image.size))

    def image(self, index: int, mode: str):
        import io

        shard, offset, size = self._where[index]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return convert_image(image, mode)


def is_shard_source(path: Path) -> bool:
    """A ``.tar`` shard, or a folder of them."""
    return path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))


def is_list_source(path: Path) -> bool:
    """A ``.jsonl`` list, or a folder holding such lists: .jsonl files whose first record names
    an ``image_path`` (an image folder's own metadata.jsonl does not make it one)."""
    lists = [path] if path.suffix == ".jsonl" else sorted(path.glob("*.jsonl")) if \
        path.is_dir() else []
    for listing in lists[:1]:
        with open(listing, encoding="utf-8") as f:
            first = f.readline()
        try:
            return "image_path" in json.loads(first)
        except (ValueError, TypeError):
            return False
    return False


def open_source(spec: str, fashion_folder=None):
    """An image folder, LlamaGen's T2I ``.jsonl`` lists, WebDataset tar shards, or
    "fashion-mnist:<split>"."""
    if spec.startswith("fashion-mnist"):
        split = spec.partition(":")[2] or "train"
        return FashionMNISTSource(split, fashion_folder)
    if is_list_source(Path(spec)):
        return ListSource(spec)
    if is_shard_source(Path(spec)):
        return ShardSource(spec)
    return FolderSource(spec)


def encode_views(tokenizer, views: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """uint8 views (B, V, H, W[, C]) -> int64 codes (B, V, N) on the CPU."""
    b, v = views.shape[:2]
    x = to_model_range(views.to(tokenizer.device).flatten(0, 1), tokenizer.channels)
    use_bf16 = precision == "bf16" and x.device.type == "cuda"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        codes = tokenizer.encode(x)
    return codes.reshape(b, v, -1).cpu()
