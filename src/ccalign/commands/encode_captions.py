"""`ccalign encode-captions`: captions to text-encoder features for text-to-image models.

Reads captions from ``.txt`` files (one per line), LlamaGen's ``.jsonl`` lists (the caption
under ``--caption-key``; a folder of lists is read in name order), an image folder's sidecar
files (``photo.jpg`` -> ``photo.txt``) or WebDataset tar shards (``<key>.txt``), the last two in
the order training reads the images, and encodes them with a
transformers T5 encoder (FLAN-T5-XL by default: LlamaGen T2I's) and writes either one
safetensors file (``features`` (N, 120, 2048), ``mask`` (N, 120) bool, left-padded; what
``ccalign sample --caption-features`` reads) or LlamaGen's layout: one ``.npy`` (1, n, 2048) of
the n real tokens per caption, under a folder named after its list, file ``<line index>.npy``
(``language/extract_t5_feature.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "encode captions with a T5 text encoder (one safetensors file, or LlamaGen's .npy layout)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign.data.text_encoder import CAPTION_TOKENS, DEFAULT_ENCODER
    from ccalign.devices import device_flag
    from ccalign.io import output_path
    from ccalign.settings import number

    parser.add_argument("inputs", nargs="+", type=Path,
                        help=".txt (a caption per line), .jsonl lists, folders of .jsonl lists, "
                        "image folders with a .txt caption beside each image, or WebDataset tar "
                        "shards")
    parser.add_argument("--out", type=output_path, required=True,
                        help="a new .safetensors file, or a new folder with --format npy")
    parser.add_argument("--format", choices=("safetensors", "npy"), default="safetensors",
                        help="one file (default), or npy: LlamaGen's <list>/<line>.npy layout")
    parser.add_argument("--caption-key", default="caption",
                        help="where a .jsonl line holds its caption; dots go deeper (text.blip)")
    parser.add_argument("--text-encoder", default=DEFAULT_ENCODER,
                        help="transformers T5 folder or Hub name (default: %(default)s), or a "
                        "Janus model (folder or registry name): its own prompt token ids")
    parser.add_argument("--length", type=number(int, ge=1, le=4096), default=CAPTION_TOKENS,
                        help="tokens per caption (default: %(default)s, LlamaGen's)")
    parser.add_argument("--batch-size", type=number(int, ge=1, le=65536), default=32)
    parser.add_argument("--device", type=device_flag, help="cuda or cpu (default: cuda when "
                        "available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ccalign.conditions import Captions
    from ccalign.data.text_encoder import open_text_encoder
    from ccalign.devices import pick_device

    check_new_output(args.out, args.format)
    items = read_captions(args.inputs, args.caption_key)
    encoder = open_text_encoder(args.text_encoder, length=args.length,
                                device=pick_device(args.device))
    if args.format == "npy" and encoder.dim == 0:
        raise ValueError("--format npy is LlamaGen's layout of T5 features; a model's own prompt "
                         "ids go in one safetensors file (leave --format out)")
    captions = [caption for _, _, caption in items]
    batches = []
    with tqdm(total=len(captions), unit="caption", disable=args.quiet) as bar:
        for batch in encoder.encode_batches(captions, args.batch_size):
            batches.append(batch)
            bar.update(len(batch))
    encoded = Captions(args.length, encoder.dim).cat(batches)
    written = (write_npy_layout if args.format == "npy" else write_one_file)(
        args.out, items, encoded)
    print(f"{len(captions)} captions encoded by {args.text_encoder}: {written}")
    return 0


def check_new_output(out: Path, form: str) -> None:
    """Nothing the user has is written over: the file (or folder) must not exist yet."""
    if form == "safetensors" and out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the .safetensors file to write")
    if out.exists() and (form == "safetensors" or any(out.iterdir())):
        raise ValueError(f"--out {out} exists already; give a new path (or delete it)")


def read_captions(inputs: list[Path], key: str) -> list[tuple[str, int, str]]:
    """(list name, line index, caption) of every caption, in file and line order; an image
    folder gives its images' sidecar captions in the folder's image order."""
    from ccalign.data.images import is_list_source, is_shard_source

    files: list[Path] = []
    items = []
    for path in inputs:
        if is_shard_source(path):
            items += shard_captions(path)
        elif path.is_dir() and not is_list_source(path):
            items += sidecar_captions(path)
        elif path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix == ".jsonl")
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"captions not found: {path}")
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            if path.suffix == ".jsonl":
                items.append((path.stem, index, _caption_of(json.loads(line), key, path, index)))
            elif line.strip():
                items.append((path.stem, index, line))
    if not items:
        raise ValueError(f"no captions in {', '.join(map(str, inputs))}")
    return items


def sidecar_captions(root: Path) -> list[tuple[str, int, str]]:
    """The caption beside each image of a class-per-folder tree (``photo.jpg`` -> ``photo.txt``),
    in the order training reads the images (ImageFolder's), so row i captions image i."""
    from ccalign.data.images import list_image_folder

    items = []
    for index, (image, _) in enumerate(list_image_folder(root).samples):
        sidecar = Path(image).with_suffix(".txt")
        if not sidecar.is_file():
            raise ValueError(f"{image} has no caption beside it ({sidecar.name}): every image "
                             "of the folder needs its .txt")
        items.append((root.name, index, sidecar.read_text(encoding="utf-8").strip()))
    return items


def shard_captions(path: Path) -> list[tuple[str, int, str]]:
    """Each sample's caption in WebDataset tar shards, in the order training reads them."""
    from ccalign.data.images import ShardSource

    source = ShardSource(path)
    missing = [item.name for item, text in zip(source.items, source.captions, strict=True)
               if text is None]
    if missing:
        raise ValueError(f"{missing[0]} has no caption (.txt) in its shard ({len(missing)} "
                         "samples without one)")
    return [(path.stem, i, text) for i, text in enumerate(source.captions)]


def _caption_of(record: dict, key: str, path: Path, index: int) -> str:
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{path} line {index + 1} has no caption under {key!r}; set "
                             "--caption-key (dots go deeper, e.g. text.blip)")
        value = value[part]
    if not isinstance(value, str):
        raise ValueError(f"{path} line {index + 1}: the caption under {key!r} is not text")
    return value


def write_one_file(out: Path, items, captions) -> Path:
    from ccalign.data.captions import write_caption_file

    return write_caption_file(out, captions.features, captions.mask)


def write_npy_layout(out: Path, items, captions) -> Path:
    """<out>/<list>/<line>.npy (1, n, C) float32 of each caption's real tokens, atomically."""
    import numpy as np

    from ccalign.io import atomic_save_npy

    for (name, index, _), features, mask in zip(items, captions.features, captions.mask,
                                                strict=True):
        real = features[mask].numpy().astype(np.float32)[None]  # (1, n, C): the real tokens
        atomic_save_npy(out / name / f"{index}.npy", real)
    return out
