"""`ccalign extract-codes`: labelled images -> token codes, as LlamaGen lays them out and flat.

Each image is centre-cropped the ADM way and cut into views ("ten-crop": crop to
int(size * 1.1) then TenCrop(size) = four corners + centre, then the same of the mirror image;
"flip": the centre crop and its mirror; "center": the centre crop; or VAR's training view,
"var-crop": the short side resized to 1.125x the size and one random crop, seeded per image),
every view is encoded, and
the (1, V, N) codes of image i go to ``<out>/imagenet<size>_codes/i.npy`` with its label in
``..._labels/i.npy`` (i = the image's ImageFolder index). ``--flat`` also writes the project's
single-file format. Work is split over torchrun ranks (rank r takes i % world == r), batched on
the GPU when there is one, and resumable: a re-run skips what is already written. Unreadable
images are reported (path and reason, also in ``extract-skipped.tsv``) and left out; they keep
their index, so no other image's label moves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ccalign.data.images import encode_views, open_source
from ccalign.devices import device_flag, pick_device
from ccalign.errors import shorten
from ccalign.io import OUTPUT_KINDS, changed_keys, check_output_kind, read_json_record
from ccalign.sample.runner import tokenizer_fingerprint

HELP = "encode a folder of labelled images (or Fashion-MNIST) into token codes"
CONFIG_NAME = OUTPUT_KINDS["code extraction"][0]
SKIPPED_NAME = "extract-skipped.tsv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign.io import output_file, output_folder
    from ccalign.settings import MAX_SEED, MAX_THREADS, declared_range, number
    from ccalign.train.config import DataSection

    parser.add_argument(
        "source",
        help="image folder laid out <class>/<image> (ImageNet style), "
        "or fashion-mnist:train / fashion-mnist:test",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer file (LlamaGen vq_ds16_c2i.pt, a ccalign .safetensors), fmnist-vq for "
        "the bundled one, a registry name (llamagen-vq16) or hf://owner/repo/file; or a model "
        "that carries its own (janus-pro-1B or a Janus transformers folder: its VQ, in float32)",
    )
    parser.add_argument(
        "--tokenizer-name",
        default=None,
        help="VQ-16 or VQ-8 for official files (inferred from the weights when left out)",
    )
    parser.add_argument(
        "--out", type=output_folder, default=None, help="LlamaGen code folder to write"
    )
    parser.add_argument(
        "--flat", type=output_file, default=None, help="also (or only) write one flat .safetensors"
    )
    parser.add_argument(
        "--image-size",
        type=number(int, within=declared_range(DataSection, "image_size")),
        default=None,
        help="crop size (default: the tokenizer's; 256 or 384 for VQ-16)",
    )
    parser.add_argument(
        "--views",
        choices=("ten-crop", "flip", "center", "var-crop"),
        default="ten-crop",
        help="LlamaGen's views (ten-crop, flip, center; ADM centre crops) or VAR's training view "
        "(var-crop: short side to 1.125x the size, one random crop per image from --seed)",
    )
    parser.add_argument(
        "--seed",
        type=number(int, ge=0, le=MAX_SEED),
        default=0,
        help="var-crop: image i's crop offsets come from (seed, i)",
    )
    parser.add_argument(
        "--crop-range",
        type=number(float, ge=1, le=4),
        default=1.1,
        help="ten-crop's centre crop is int(size * this); LlamaGen's second set uses 1.05",
    )
    parser.add_argument(
        "--batch-size",
        type=number(int, ge=1, le=100_000),
        default=16,
        help="images per encoder batch",
    )
    parser.add_argument(
        "--workers", type=number(int, ge=0, le=1024), default=4, help="image decoding processes"
    )
    parser.add_argument(
        "--chunk",
        type=number(int, ge=1, le=10**8),
        default=4096,
        help="images per resumable chunk of the flat output",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "tf32", "bf16"),
        default=None,
        help="encoder arithmetic on CUDA (default tf32, as LlamaGen's script)",
    )
    parser.add_argument(
        "--device", type=device_flag, default=None, help="default: cuda:<LOCAL_RANK> if available"
    )
    parser.add_argument("--fashion-mnist-folder", default=None)
    parser.add_argument(
        "--threads",
        type=number(int, ge=1, le=MAX_THREADS),
        default=None,
        help="CPU threads for torch",
    )
    parser.add_argument("--no-progress", action="store_true")


class ViewDataset(Dataset):
    """The views of the pending images: (index, uint8 views or None, label, error or None)."""

    def __init__(
        self,
        source,
        indices: list[int],
        size: int,
        mode: str,
        crop_range: float,
        channels: int,
        seed: int = 0,
    ):
        self.source, self.indices = source, indices
        self.size, self.mode, self.crop_range, self.seed = size, mode, crop_range, seed
        self.pil_mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        from ccalign.data.images import views

        index = self.indices[k]
        try:
            image = self.source.image(index, self.pil_mode)
            rng = np.random.default_rng([self.seed, index])  # var-crop's offsets, per image
            arr = views(image, self.size, self.mode, self.crop_range, rng)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return index, None, self.source.items[index].label, f"{type(exc).__name__}: {exc}"
        label = self.source.items[index].label
        return index, torch.from_numpy(np.array(arr)), label, None


def _collate(batch):
    return batch


class LlamaGenSink:
    """Per-image ``.npy`` files; an image is done when its code and label files both exist."""

    def __init__(self, root: Path, size: int):
        self.root, self.size = root, size
        self.code_dir = root / f"imagenet{size}_codes"
        self.label_dir = root / f"imagenet{size}_labels"

    def done(self) -> set[int]:
        return _stems(self.code_dir) & _stems(self.label_dir)

    def write(self, indices: list[int], codes: np.ndarray, labels: list[int]) -> None:
        from ccalign.data.codes import write_llamagen_code

        for index, view_codes, label in zip(indices, codes, labels, strict=True):
            write_llamagen_code(self.root, self.size, index, view_codes, label)

    def flush(self) -> None:
        """Nothing is buffered: every image is written as it comes."""


class FlatSink:
    """Chunks of codes under ``<flat>.parts/``, merged into the flat file once all ranks finish."""

    def __init__(self, path: Path, rank: int, chunk: int, record: dict):
        self.path, self.rank, self.chunk, self.record = path, rank, chunk, record
        self.parts = path.with_name(path.name + ".parts")
        self.buffer: list[tuple[int, np.ndarray, int]] = []

    def done(self) -> set[int]:
        found: set[int] = set()
        for part in self.parts.glob("*.npz"):
            with np.load(part) as data:
                found.update(int(i) for i in data["indices"])
        return found

    def write(self, indices: list[int], codes: np.ndarray, labels: list[int]) -> None:
        self.buffer.extend(zip(indices, codes, labels, strict=True))
        if len(self.buffer) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        from ccalign.io import atomic_write

        indices = np.array([b[0] for b in self.buffer], dtype=np.int64)
        codes = np.stack([b[1] for b in self.buffer]).astype(np.int32)
        labels = np.array([b[2] for b in self.buffer], dtype=np.int64)
        name = f"rank{self.rank}-{int(indices.min()):010d}-{time.time_ns()}.npz"
        atomic_write(self.parts / name, lambda tmp: _save_npz(tmp, indices, codes, labels))
        self.buffer = []

    def mark_finished(self, world: int) -> None:
        self.flush()
        (self.parts / f"rank{self.rank}-of-{world}.done").touch()

    def merge(
        self, world: int, vocab_size: int, grid: int, seq_len: int | None, record: dict
    ) -> int:
        """Wait for every rank's marker, then write the flat file (with the settings ``record``)
        and remove the parts."""
        from ccalign.data.codes import write_flat_codes

        markers = [self.parts / f"rank{r}-of-{world}.done" for r in range(world)]
        while not all(m.exists() for m in markers):
            time.sleep(5)
        indices, codes, labels = [], [], []
        for part in sorted(self.parts.glob("*.npz")):
            with np.load(part) as data:
                indices.append(data["indices"])
                codes.append(data["codes"])
                labels.append(data["labels"])
        if not indices:
            raise ValueError("no image could be encoded; see the skipped-image report")
        indices = np.concatenate(indices)
        order = np.argsort(indices, kind="stable")
        _, first = np.unique(indices[order], return_index=True)  # a resumed chunk may repeat one
        keep = order[first]
        write_flat_codes(
            self.path,
            np.concatenate(codes)[keep],
            np.concatenate(labels)[keep],
            vocab_size=vocab_size,
            grid=grid,
            seq_len=seq_len,
            record=record,
        )
        shutil.rmtree(self.parts)
        return len(keep)


def _save_npz(path: str, indices, codes, labels) -> None:
    with open(path, "wb") as f:
        np.savez(f, indices=indices, codes=codes, labels=labels)


def _stems(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(n[:-4]) for n in os.listdir(folder) if n.endswith(".npy") and n[:-4].isdigit()}


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _record_config(folder: Path, config: dict) -> None:
    """Refuse to resume into a folder written with different settings."""
    from ccalign.io import atomic_write

    path = folder / CONFIG_NAME
    check_output_kind(folder, "code extraction")
    if path.exists():
        previous = read_json_record(path)
        if previous != config:
            changed = changed_keys(previous, config)
            raise ValueError(
                f"{folder} holds codes extracted with other settings ({', '.join(changed)} "
                f"differ: {previous} vs {config}); use another output folder or delete it"
            )
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))


def open_tokenizer(source: str, name: str | None, image_size: int | None):
    """A tokenizer file or registry name; or a model whose checkpoint carries its own tokenizer
    (a Janus model's VQ: family capability "own_tokenizer"), by name or folder, in float32."""
    from ccalign import hub
    from ccalign.models import families
    from ccalign.models.family import ModelSpec
    from ccalign.tokenizers import load

    release = hub.find(source)
    family = None
    if release is not None and release.kind == "model":
        family = families.identify(ModelSpec(init=source))
    elif release is None and Path(source).is_dir():
        family = families.of_file(source)
    if family is None or "own_tokenizer" not in family.capabilities:
        return load(source, name, image_size=image_size)
    if name is not None:
        raise ValueError(f"--tokenizer-name: {source} decodes with its own VQ; leave it out")
    codec = family.codec_for(ModelSpec(init=source), "--tokenizer").float()
    if image_size not in (None, codec.image_size):
        raise ValueError(f"--image-size {image_size}: {source}'s VQ codes {codec.image_size} px "
                         f"images ({codec.grid} x {codec.grid} codes, as its model reads them); "
                         "leave it out")
    return codec


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.flat:
        raise ValueError("give --out (LlamaGen code folder), --flat (one file) or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, local_rank = distributed_rank()
    device = pick_device(args.device, local_rank)
    precision = args.precision or ("tf32" if device.type == "cuda" else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    tokenizer = open_tokenizer(args.tokenizer, args.tokenizer_name, args.image_size).to(device)
    size = args.image_size or tokenizer.image_size
    source = open_source(args.source, args.fashion_mnist_folder)
    if source.skipped_links:
        print(
            f"left out {len(source.skipped_links)} link(s) that leave their class folder or lead "
            f"to one listed already (first: {source.skipped_links[0]})",
            file=sys.stderr,
        )
    config = {
        "source": _source_name(args.source),
        "tokenizer": str(args.tokenizer),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "image_size": size,
        "views": args.views,
        "crop_range": args.crop_range if args.views == "ten-crop" else None,
        **({"seed": args.seed} if args.views == "var-crop" else {}),
        "vocab_size": tokenizer.vocab_size,
        "images": len(source.items),
    }
    sinks = _open_sinks(args, size, rank, config)
    if not sinks:
        return 0
    done = set.intersection(*(s.done() for s in sinks))
    pending = [i for i in range(rank, len(source.items), world) if i not in done]
    print(
        f"rank {rank}/{world}: {len(pending)} of {len(source.items)} images to encode "
        f"({len(source.classes)} classes, views {args.views}, {size}px, device {device})",
        file=sys.stderr,
    )
    skipped = _encode_all(args, tokenizer, source, pending, sinks, size, precision, rank)
    return _finish(args, sinks, world, rank, tokenizer, size, skipped)


def _open_sinks(args, size: int, rank: int, config: dict) -> list:
    sinks = []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _record_config(out, config)
        sinks.append(LlamaGenSink(out, size))
    if args.flat:
        flat = FlatSink(_flat_path(args.flat, args.source), rank, args.chunk, config)
        if flat.path.exists() and not flat.parts.exists():
            _check_complete_flat(flat.path, config)
            print(f"{flat.path} holds these codes already; nothing to do", file=sys.stderr)
        else:
            flat.parts.mkdir(parents=True, exist_ok=True)
            _record_config(flat.parts, config)
            sinks.append(flat)
    return sinks


def _source_name(source: str) -> str:
    """The source as recorded: fashion-mnist:<split>, or the folder's absolute path."""
    return source if source.startswith("fashion-mnist") else str(Path(source).resolve())


def _flat_path(flat: str, source: str) -> Path:
    """``--flat`` checked: a file to write, outside the image folder (its parts folder would
    read as one more class)."""
    path = Path(flat)
    if not source.startswith("fashion-mnist") and path.resolve().is_relative_to(
        Path(source).resolve()
    ):
        raise ValueError(
            f"--flat {shorten(flat)} lies inside the image folder {shorten(source)}; write the "
            "codes outside it"
        )
    return path


def _check_complete_flat(path: Path, config: dict) -> None:
    """A finished flat file is reused only when it was extracted with these very settings."""
    from ccalign.data.codes import flat_record

    recorded = flat_record(path)
    if recorded is None:
        raise ValueError(
            f"{path} exists but records no extraction settings (another tool or an older "
            "ccalign wrote it); choose another --flat, or delete it to extract again"
        )
    changed = changed_keys(recorded, config)
    if changed:
        raise ValueError(
            f"{path} holds codes extracted with other settings ({', '.join(changed)} differ); "
            "choose another --flat, or delete it to extract again"
        )


def _encode_all(args, tokenizer, source, pending, sinks, size, precision, rank) -> int:
    from tqdm import tqdm

    dataset = ViewDataset(
        source, pending, size, args.views, args.crop_range, tokenizer.channels, args.seed
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=_collate,
        pin_memory=tokenizer.device.type == "cuda",
    )
    skipped = 0
    report = skip_report_path(args)
    bar = tqdm(total=len(pending), unit="img", disable=args.no_progress or rank != 0)
    for batch in loader:
        good = [b for b in batch if b[3] is None]
        for index, _, _, error in (b for b in batch if b[3] is not None):
            skipped += 1
            _report_skip(report, source.items[index].name, index, error, bar)
        if good:
            codes = encode_views(tokenizer, torch.stack([b[1] for b in good]), precision).numpy()
            for sink in sinks:
                sink.write([b[0] for b in good], codes, [b[2] for b in good])
        bar.update(len(batch))
    bar.close()
    for sink in sinks:
        sink.flush()
    return skipped


def skip_report_path(args) -> Path:
    """``<out>/extract-skipped.tsv``, or ``<flat>.skipped.tsv`` when only a flat file is made."""
    return Path(args.out) / SKIPPED_NAME if args.out else Path(f"{args.flat}.skipped.tsv")


def _report_skip(report: Path, name: str, index: int, error: str, bar) -> None:
    bar.write(f"skipped image {index} {name}: {error}", file=sys.stderr)
    with open(report, "a") as f:
        f.write(f"{index}\t{name}\t{error}\n")


def _finish(args, sinks, world, rank, tokenizer, size, skipped) -> int:
    for sink in sinks:
        if isinstance(sink, FlatSink):
            sink.mark_finished(world)
            if rank == 0:
                grid = size // (tokenizer.image_size // tokenizer.grid)
                # a multi-scale tokenizer (VAR's VQVAE) writes every scale's codes: seq_len
                seq_len = getattr(tokenizer, "seq_len", grid * grid)
                count = sink.merge(world, tokenizer.vocab_size, grid, seq_len, sink.record)
                print(f"wrote {count} images to {sink.path}", file=sys.stderr)
    if skipped:
        print(
            f"rank {rank}: {skipped} unreadable images skipped (listed in "
            f"{skip_report_path(args)})",
            file=sys.stderr,
        )
    return 0
