"""Pre-extracted token codes: LlamaGen's per-image ``.npy`` folders and the project's flat file.

Both give items ``(tokens int64 (N,), label int64 ())``. When an image has several views (the
ten crops of LlamaGen's extraction), one is picked per item from (seed, epoch, index), so a run
is reproducible and resumable without saving random state.

Flat format (``.safetensors``): tensors ``codes`` (M, V, N) int16/int32 and ``labels`` (M,)
int64, metadata ``format = ccalign.codes.v1``, ``vocab_size`` and ``grid``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ccalign.io import PathLike, atomic_save_safetensors, atomic_write

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
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), "pt") as f:
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
    """``<root>/imagenet<size>_codes/<i>.npy`` (1, V, N) and ``..._labels/<i>.npy`` (1,)."""

    def __init__(self, root: PathLike, seed: int = 0, size: int | None = None):
        super().__init__(seed)
        self.code_dir, self.label_dir = _find_llamagen_dirs(Path(root), size)
        stems = sorted(int(p.stem) for p in self.code_dir.glob("*.npy") if p.stem.isdigit())
        if not stems:
            raise ValueError(f"{self.code_dir} holds no .npy code files")
        missing = [s for s in stems if not (self.label_dir / f"{s}.npy").exists()]
        if missing:
            raise ValueError(
                f"{len(missing)} code files have no label file in {self.label_dir} "
                f"(first: {missing[:5]}); re-run the extraction for them"
            )
        self.stems = stems
        first = np.load(self.code_dir / f"{stems[0]}.npy")
        if first.ndim != 3 or first.shape[0] != 1:
            raise ValueError(
                f"{self.code_dir / f'{stems[0]}.npy'} has shape {first.shape}; LlamaGen codes are "
                "(1, views, N)"
            )
        self.num_views, self.seq_len = first.shape[1], first.shape[2]

    def __len__(self) -> int:
        return len(self.stems)

    def _codes(self, index: int) -> np.ndarray:
        path = self.code_dir / f"{self.stems[index]}.npy"
        arr = np.load(path)
        if arr.shape != (1, self.num_views, self.seq_len):
            raise ValueError(
                f"{path} has shape {arr.shape}, expected {(1, self.num_views, self.seq_len)}"
            )
        return arr[0]

    def _label(self, index: int) -> int:
        return int(np.load(self.label_dir / f"{self.stems[index]}.npy").reshape(-1)[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = self._codes(index)[self.view_index(index)]
        return torch.from_numpy(view.astype(np.int64)), torch.tensor(self._label(index))

    def all_labels(self) -> np.ndarray:
        return np.array([self._label(i) for i in range(len(self))], dtype=np.int64)

    def token_range(self) -> tuple[int, int]:
        lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        for i in range(len(self)):
            codes = self._codes(i)
            lo, hi = min(lo, int(codes.min())), max(hi, int(codes.max()))
        return lo, hi


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
    label_dir = root / found[0].name.replace("_codes", "_labels")
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder missing: {label_dir}")
    return found[0], label_dir


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
        problems.append(
            f"images have {dataset.seq_len} tokens but the model expects {seq_len} "
            f"(grid {int(seq_len**0.5)}); extract codes at the model's image size"
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


def write_flat_codes(path: PathLike, codes, labels, *, vocab_size: int, grid: int) -> Path:
    """Write codes (M, N) or (M, V, N) and labels (M,) as one flat file, atomically."""
    codes = torch.as_tensor(np.asarray(codes))
    labels = torch.as_tensor(np.asarray(labels)).long()
    if codes.dim() == 2:
        codes = codes[:, None, :]
    if codes.dim() != 3 or labels.shape != (codes.shape[0],) or codes.shape[2] != grid * grid:
        raise ValueError(
            f"codes {tuple(codes.shape)} / labels {tuple(labels.shape)} do not form "
            f"(M, V, {grid}^2) and (M,)"
        )
    dtype = torch.int16 if vocab_size <= 2**15 else torch.int32
    meta = {"format": FLAT_FORMAT, "vocab_size": str(vocab_size), "grid": str(grid)}
    return atomic_save_safetensors({"codes": codes.to(dtype), "labels": labels}, path, meta)


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
        atomic_write(folder / f"{index}.npy", lambda tmp, a=array: _save_npy(tmp, a))


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
