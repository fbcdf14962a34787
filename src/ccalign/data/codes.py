"""Pre-extracted token codes: LlamaGen's per-image ``.npy`` folders and the project's flat file.

Both give items ``(tokens int64 (N,), label int64 ())``. When an image has several views (the
ten crops of LlamaGen's extraction), one is picked per item from (seed, epoch, index), so a run
is reproducible and resumable without saving random state.

LlamaGen layout (its ``extract_codes_c2i.py``): ``<root>/imagenet<size>_codes/<i>.npy`` int64
(1, V, N) and ``<root>/imagenet<size>_labels/<i>.npy`` int64 (1,). With ``--ten-crop`` the V = 10
views are TenCrop of the centre crop at ``int(size * crop_range)`` (crop range 1.1), else V = 2
(the image and its mirror). The official recipe extracts a second set at crop range 1.05 into a
sibling root: ``.../<name>_ten_crop`` and ``.../<name>_ten_crop_105``, same inner layout. When
that sibling holds ``imagenet<size>_codes``, each item comes from either set with probability
1/2 (as the official data set does), then one of that set's views; its label is that set's.

Flat format (``.safetensors``): tensors ``codes`` (M, V, N) int16/int32 and ``labels`` (M,)
int64, metadata ``format = ccalign.codes.v1``, ``vocab_size`` and ``grid``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ccalign.io import (
    PathLike,
    atomic_save_npy,
    atomic_save_safetensors,
    open_safetensors,
)

FLAT_FORMAT = "ccalign.codes.v1"


class CodeDataset(Dataset):
    """Base class: (M images) x (V views) x (N tokens) with one label per image."""

    seq_len: int
    num_views: int
    vocab_size: int | None = None  # recorded by the file, when it records one

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Views picked from now on depend on this epoch (call once per pass over the data)."""
        self.epoch = epoch

    def view_index(self, index: int) -> int:
        if self.num_views == 1:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(self.num_views))

    def all_labels(self) -> np.ndarray:
        raise NotImplementedError

    def token_range(self) -> tuple[int, int]:
        """(min, max) token over the whole data set (reads everything once)."""
        raise NotImplementedError


class FlatCodes(CodeDataset):
    """The project's single-file format, read fully into memory (int16 keeps ImageNet-256 ~7 GB)."""

    def __init__(self, path: PathLike, seed: int = 0):
        super().__init__(seed)
        path = Path(path)
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("format") != FLAT_FORMAT or not {"codes", "labels"} <= names:
                raise ValueError(
                    f"{path} is not a ccalign code file (format {meta.get('format')!r}, tensors "
                    f"{sorted(names)}); write one with ccalign extract-codes or write_flat_codes()"
                )
            self.codes = f.get_tensor("codes")
            self.labels = f.get_tensor("labels").long()
        if self.codes.dim() == 2:
            self.codes = self.codes[:, None, :]
        if self.codes.dim() != 3 or self.labels.shape != (self.codes.shape[0],):
            raise ValueError(
                f"{path}: codes {tuple(self.codes.shape)} and labels {tuple(self.labels.shape)} "
                "do not match; expected (M, V, N) and (M,)"
            )
        if self.codes.numel() == 0:
            raise ValueError(
                f"{path} holds no codes (shape {tuple(self.codes.shape)}); extract codes from a "
                "non-empty image set"
            )
        self.num_views, self.seq_len = self.codes.shape[1], self.codes.shape[2]
        self.vocab_size = int(meta["vocab_size"]) if "vocab_size" in meta else None

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[index, self.view_index(index)].long(), self.labels[index]

    def all_labels(self) -> np.ndarray:
        return self.labels.numpy()

    def token_range(self) -> tuple[int, int]:
        return int(self.codes.min()), int(self.codes.max())


class LlamaGenCodeFolder(CodeDataset):
    """LlamaGen's ``.npy`` folders under ``root``, plus the crop-range 1.05 set beside it if any."""

    def __init__(self, root: PathLike, seed: int = 0, size: int | None = None):
        super().__init__(seed)
        root = Path(root)
        self.sets = [_NpySet(*_find_llamagen_dirs(root, size))]
        self.stems = self.sets[0].stems()
        self.num_views, self.seq_len = self.sets[0].views_and_tokens(self.stems[0])
        second = _crop_105_set(root, self.sets[0].code_dir.name)
        if second is not None:
            self._check_matches(second)
            self.sets.append(second)

    def _check_matches(self, second: _NpySet) -> None:
        """The second set must hold the same images, with codes of the same shape."""
        first, stems = self.sets[0], second.stems()
        if stems != self.stems:
            only = sorted(set(stems) ^ set(self.stems))
            raise ValueError(
                f"{second.code_dir} holds {len(stems)} images but {first.code_dir} holds "
                f"{len(self.stems)} ({len(only)} indices are in one only, first: {only[:5]}); "
                f"finish extracting the crop-range 1.05 set, or rename {second.code_dir.parent} "
                "to train on the first set alone"
            )
        shape = second.views_and_tokens(stems[0])
        if shape != (self.num_views, self.seq_len):
            raise ValueError(
                f"{second.code_dir} has (views, tokens) {shape} but {first.code_dir} has "
                f"{(self.num_views, self.seq_len)}; extract both sets with the same tokenizer, "
                "image size and --ten-crop setting"
            )

    def __len__(self) -> int:
        return len(self.stems)

    def pick(self, index: int) -> tuple[int, int]:
        """(set, view) item ``index`` reads this epoch, from (seed, epoch, index).

        With two sets the set is drawn first (1/2 each), then a uniform view; with one set the
        single draw is the view, as :meth:`CodeDataset.view_index` draws it.
        """
        if len(self.sets) == 1:
            return 0, super().view_index(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        which = int(rng.integers(len(self.sets)))
        return which, int(rng.integers(self.num_views))

    def view_index(self, index: int) -> int:
        """The view of :meth:`pick`, so callers see the view items really read."""
        return self.pick(index)[1]

    def _codes(self, which: int, index: int) -> np.ndarray:
        return self.sets[which].codes(self.stems[index], (1, self.num_views, self.seq_len))[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        which, view = self.pick(index)
        codes = self._codes(which, index)[view]
        label = self.sets[which].label(self.stems[index])
        return torch.from_numpy(codes.astype(np.int64)), torch.tensor(label)

    def all_labels(self) -> np.ndarray:
        """Labels of the first set; an error if the second set's labels differ from them."""
        labels = [
            np.array([s.label(stem) for stem in self.stems], dtype=np.int64) for s in self.sets
        ]
        differ = np.flatnonzero(labels[0] != labels[-1])
        if differ.size:
            raise ValueError(
                f"{differ.size} labels in {self.sets[1].label_dir} differ from those in "
                f"{self.sets[0].label_dir} (first at indices {[self.stems[i] for i in differ[:5]]})"
                "; both sets must be extracted from the same image folder"
            )
        return labels[0]

    def token_range(self) -> tuple[int, int]:
        lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        for which in range(len(self.sets)):
            for i in range(len(self)):
                codes = self._codes(which, i)
                lo, hi = min(lo, int(codes.min())), max(hi, int(codes.max()))
        return lo, hi


@dataclass(frozen=True)
class _NpySet:
    """One LlamaGen extraction: ``imagenet<size>_codes`` and ``imagenet<size>_labels``."""

    code_dir: Path
    label_dir: Path

    def stems(self) -> list[int]:
        """Image indices, sorted; every code file must have its label file."""
        stems = sorted(int(p.stem) for p in self.code_dir.glob("*.npy") if p.stem.isdigit())
        if not stems:
            raise ValueError(
                f"{self.code_dir} holds no <index>.npy code files; extract codes into it "
                "(ccalign extract-codes) or point at the folder that holds them"
            )
        missing = [s for s in stems if not (self.label_dir / f"{s}.npy").exists()]
        if missing:
            raise ValueError(
                f"{len(missing)} code files have no label file in {self.label_dir} "
                f"(first: {missing[:5]}); re-run the extraction for them"
            )
        return stems

    def views_and_tokens(self, stem: int) -> tuple[int, int]:
        path = self.code_dir / f"{stem}.npy"
        first = np.load(path)
        if first.ndim != 3 or first.shape[0] != 1:
            raise ValueError(f"{path} has shape {first.shape}; LlamaGen codes are (1, views, N)")
        return first.shape[1], first.shape[2]

    def codes(self, stem: int, shape: tuple[int, int, int]) -> np.ndarray:
        path = self.code_dir / f"{stem}.npy"
        arr = np.load(path)
        if arr.shape != shape:
            raise ValueError(f"{path} has shape {arr.shape}, expected {shape}")
        return arr

    def label(self, stem: int) -> int:
        return int(np.load(self.label_dir / f"{stem}.npy").reshape(-1)[0])


def _find_llamagen_dirs(root: Path, size: int | None) -> tuple[Path, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"code folder not found: {root}")
    pattern = re.compile(r"imagenet(\d+)_codes$")
    found = sorted(p for p in root.iterdir() if p.is_dir() and pattern.match(p.name))
    if size is not None:
        found = [p for p in found if p.name == f"imagenet{size}_codes"]
    if len(found) != 1:
        names = [p.name for p in found] or "none"
        raise ValueError(
            f"{root} must hold exactly one imagenet<size>_codes folder (found {names}); "
            "pass the image size to choose"
        )
    return found[0], _label_dir(found[0])


def _label_dir(code_dir: Path) -> Path:
    label_dir = code_dir.with_name(code_dir.name.replace("_codes", "_labels"))
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder missing: {label_dir}")
    return label_dir


def _crop_105_set(root: Path, code_name: str) -> _NpySet | None:
    """The crop-range 1.05 set: ``<root>_105/<code_name>`` for a root named ``..._ten_crop``.

    The official loader swaps ``ten_crop/`` for ``ten_crop_105/`` in the code folder's path;
    only the root's own name is swapped here.
    """
    root = Path(os.path.abspath(root))  # "." has a name once made absolute
    if not root.name.endswith("ten_crop"):
        return None
    code_dir = root.with_name(f"{root.name}_105") / code_name
    return _NpySet(code_dir, _label_dir(code_dir)) if code_dir.is_dir() else None


def open_codes(path: PathLike, seed: int = 0) -> CodeDataset:
    """Open a flat ``.safetensors`` code file or a LlamaGen code folder (decided by what it is)."""
    path = Path(path)
    if path.is_dir():
        return LlamaGenCodeFolder(path, seed=seed)
    if not path.exists():
        raise FileNotFoundError(f"code data not found: {path}")
    return FlatCodes(path, seed=seed)


def validate_codes(
    dataset: CodeDataset, *, num_classes: int, vocab_size: int, seq_len: int
) -> None:
    """Check labels, token range and sequence length against a model before training starts."""
    problems = []
    if dataset.seq_len != seq_len:
        side = math.isqrt(seq_len)
        shape = f"grid {side}" if side * side == seq_len else "every scale's codes"
        problems.append(
            f"images have {dataset.seq_len} tokens but the model expects {seq_len} "
            f"({shape}); extract codes at the model's image size with its tokenizer"
        )
    if dataset.vocab_size is not None and dataset.vocab_size != vocab_size:
        problems.append(
            f"codes come from a tokenizer with {dataset.vocab_size} codes but the model's vocab is "
            f"{vocab_size}; use the tokenizer the model was trained with"
        )
    lo, hi = dataset.token_range()
    if lo < 0 or hi >= vocab_size:
        problems.append(
            f"token ids span [{lo}, {hi}] but the model's vocab is [0, {vocab_size - 1}]"
        )
    labels = dataset.all_labels()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        problems.append(
            f"labels span [{labels.min()}, {labels.max()}] but the model has {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    if problems:
        raise ValueError("code data does not fit the model:\n  " + "\n  ".join(problems))


#: metadata key of the settings a flat file was extracted with (``ccalign extract-codes``)
EXTRACT_RECORD = "ccalign.extract"


def write_flat_codes(
    path: PathLike,
    codes,
    labels,
    *,
    vocab_size: int,
    grid: int,
    seq_len: int | None = None,
    record: dict | None = None,
) -> Path:
    """Write codes (M, N) or (M, V, N) and labels (M,) as one flat file, atomically.

    N is ``seq_len``: grid**2 by default, a multi-scale tokenizer's own length otherwise (VAR's
    680 codes of every scale, ``grid`` being the last scale's side). ``record``: the settings
    the codes were extracted with, kept in the metadata (``flat_record`` reads them back).
    """
    seq_len = grid * grid if seq_len is None else seq_len
    codes = torch.as_tensor(np.asarray(codes))
    labels = torch.as_tensor(np.asarray(labels)).long()
    if codes.dim() == 2:
        codes = codes[:, None, :]
    if codes.dim() != 3 or labels.shape != (codes.shape[0],) or codes.shape[2] != seq_len:
        raise ValueError(
            f"codes {tuple(codes.shape)} / labels {tuple(labels.shape)} do not form "
            f"(M, V, {seq_len}) and (M,)"
        )
    dtype = torch.int16 if vocab_size <= 2**15 else torch.int32
    meta = {"format": FLAT_FORMAT, "vocab_size": str(vocab_size), "grid": str(grid)}
    if seq_len != grid * grid:  # multi-scale codes; LlamaGen files keep their three keys
        meta["seq_len"] = str(seq_len)
    if record is not None:
        meta[EXTRACT_RECORD] = json.dumps(record, sort_keys=True)
    return atomic_save_safetensors({"codes": codes.to(dtype), "labels": labels}, path, meta)


def flat_record(path: PathLike) -> dict | None:
    """The extraction settings a flat code file records, or None (none recorded)."""
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    return json.loads(meta[EXTRACT_RECORD]) if EXTRACT_RECORD in meta else None


def write_llamagen_code(root: PathLike, size: int, index: int, codes, label: int) -> None:
    """Write one image's (V, N) codes and its label in LlamaGen's layout, each file atomically."""
    root = Path(root)
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim == 2:
        codes = codes[None]
    for folder, array in (
        (root / f"imagenet{size}_codes", codes),
        (root / f"imagenet{size}_labels", np.array([label], dtype=np.int64)),
    ):
        atomic_save_npy(folder / f"{index}.npy", array)
