"""Caption features in one safetensors file, as text-to-image models take them.

``features`` (N, L, C) float (FLAN-T5-XL for LlamaGen T2I: L = 120, C = 2048), or (N, L) int64
prompt token ids for a model that embeds its text itself (Janus), and ``mask`` (N, L) bool,
left-padded: each row's real tokens are its last ones (LlamaGen's T2I sampler and training data
put them there) and its padded features are zero (padded ids stay the pad token). Rows are read
lazily, a contiguous range at a time, so files of many captions never sit in memory whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ccalign.conditions import CaptionBatch
from ccalign.io import PathLike, atomic_save_safetensors, open_safetensors

FEATURES, MASK = "features", "mask"
#: the random stream of the short-caption draws (apart from the view draws of the codes)
SHORT_STREAM = 0x5C0DE
FORMAT = "ccalign-captions"


def check_left_padded(mask: Tensor, where: str) -> None:
    """Every row holds at least one real token, all after its padding (left padding)."""
    mask = mask.to(torch.bool)
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"{where}: caption {int(empty.nonzero()[0])} has no token in its mask")
    later = mask.int().cummax(dim=1).values.bool()  # True from a row's first real token on
    if not torch.equal(later, mask):
        row = int((later != mask).any(dim=1).nonzero()[0])
        raise ValueError(
            f"{where}: caption {row} is not left-padded (a padded slot follows a real token); "
            "LlamaGen's T2I models take the real tokens last: flip each row's tokens there "
            "(ccalign encode-captions writes them so)"
        )


def caption_file_metadata(path: PathLike) -> dict[str, str]:
    """The strings a caption file records (its format; for ``--prompts``, their digest and
    encoder)."""
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


def write_caption_file(path: PathLike, features: Tensor, mask: Tensor,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write captions atomically, checked; padded features are zeroed as LlamaGen's data are
    (token ids are written as they are)."""
    ids = features.dim() == 2 and not features.is_floating_point()
    if not (features.dim() == 3 or ids) or mask.shape != features.shape[:2]:
        raise ValueError(f"caption features (N, L, C) or token ids (N, L), and mask (N, L) "
                         f"expected; got {tuple(features.shape)} and {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    check_left_padded(mask, str(path))
    if not ids:
        features = features * mask[..., None].to(features.dtype)
    return atomic_save_safetensors({FEATURES: features, MASK: mask}, path,
                                   metadata={**(metadata or {}), "format": FORMAT})


class CaptionFile:
    """The captions of a file, by row: ``batch(indices)`` gives a :class:`CaptionBatch`.

    ``length`` and ``dim`` (the model's caption length and width) are checked when given; dim
    0 asks for token ids, length 0 takes any length.
    """

    key = "caption_index"  # what the sampling run's npz files call the row of each image

    def __init__(self, path: PathLike, length: int | None = None, dim: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption features not found: {self.path}")
        with open_safetensors(self.path) as f:
            keys = set(f.keys())
            if not {FEATURES, MASK} <= keys:
                raise ValueError(
                    f"{self.path} holds {sorted(keys)}, not caption features: expected "
                    f"'{FEATURES}' (N, L, C) and '{MASK}' (N, L) (ccalign encode-captions "
                    "writes them)"
                )
            shape = tuple(f.get_slice(FEATURES).get_shape())
            mask_shape = tuple(f.get_slice(MASK).get_shape())
            mask = f.get_tensor(MASK)
        if len(shape) not in (2, 3) or mask_shape != shape[:2]:
            raise ValueError(f"{self.path}: features {shape} and mask {mask_shape} do not "
                             "describe (N, L, C) captions or (N, L) ids with an (N, L) mask")
        found = (shape[1], shape[2] if len(shape) == 3 else 0)
        if dim is not None and (found[1] != dim or (length and found[0] != length)):
            said = f"{found[0]} tokens x {found[1]} features" if found[1] else \
                f"token ids of {found[0]}"
            wanted = f"{length} x {dim}" if dim else "token ids"
            raise ValueError(
                f"{self.path} holds captions of {said} but the model takes {wanted}: encode "
                "them with the model's text encoder (ccalign encode-captions --text-encoder)"
            )
        check_left_padded(mask, str(self.path))
        self.count, (self.length, self.dim) = shape[0], found

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: Sequence[int]) -> CaptionBatch:
        """The captions of rows ``indices``: a contiguous run is read in one slice, scattered
        rows (a shuffled training batch) one by one, so a batch never reads the whole file."""
        if not len(indices):
            raise ValueError("no caption rows asked for")
        low, high = min(indices), max(indices) + 1
        if low < 0 or high > self.count:
            raise ValueError(f"caption rows {low}..{high - 1} outside {self.path}'s {self.count}")
        with open_safetensors(self.path) as f:
            features, mask = f.get_slice(FEATURES), f.get_slice(MASK)
            if high - low <= 2 * len(indices):
                rows = torch.as_tensor(list(indices)) - low
                return CaptionBatch.of(_readable(features[low:high][rows]),
                                       mask[low:high][rows])
            return CaptionBatch.of(_readable(torch.cat([features[i : i + 1] for i in indices])),
                                   torch.cat([mask[i : i + 1] for i in indices]))

    def fingerprint(self) -> str:
        """SHA-256 of the file's bytes (a run's samples belong to these captions)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        return digest.hexdigest()


def _readable(features: Tensor) -> Tensor:
    """Stored features as float32 (they may be kept in half precision); token ids unchanged."""
    return features.float() if features.is_floating_point() else features.long()


class CaptionFolder:
    """Caption features in LlamaGen's layout: ``<root>/<list>/<line>.npy``, (1, n, C) float32
    of a caption's n real tokens (``language/extract_t5_feature.py``), for the images of its
    ``.jsonl`` lists; ``entries`` names each item's (list, line). Rows are cut to ``length``
    tokens and left-padded, as LlamaGen's T2I dataset does (``dataset/t2i.py``)."""

    def __init__(self, root: PathLike, entries, length: int, dim: int):
        self.root, self.entries = Path(root), list(entries)
        self.length, self.dim = length, dim
        if not self.root.is_dir():
            raise FileNotFoundError(f"caption feature folder not found: {self.root}")
        missing = [e for e in self.entries if not self._path(e).is_file()]
        if missing:
            raise ValueError(f"{self._path(missing[0])} is missing ({len(missing)} of "
                             f"{len(self.entries)}): the feature folder holds one .npy per "
                             "listed image (ccalign encode-captions --format npy)")

    def _path(self, entry) -> Path:
        listing, line = entry
        return self.root / listing / f"{line}.npy"

    def __len__(self) -> int:
        return len(self.entries)

    def batch(self, indices: Sequence[int]) -> CaptionBatch:
        import numpy as np

        features = torch.zeros(len(indices), self.length, self.dim)
        mask = torch.zeros(len(indices), self.length, dtype=torch.bool)
        for row, index in enumerate(indices):
            path = self._path(self.entries[index])
            array = np.load(path)
            if array.ndim != 3 or array.shape[:1] != (1,) or array.shape[2] != self.dim or \
                    array.shape[1] == 0:
                raise ValueError(f"{path}: features {array.shape}, expected (1, n >= 1, "
                                 f"{self.dim})")
            n = min(self.length, array.shape[1])
            features[row, self.length - n :] = torch.from_numpy(array[0, :n])
            mask[row, self.length - n :] = True
        return CaptionBatch.of(features, mask)


class CaptionedCodes:
    """Training data of a text-to-image model: the codes of a code data set, each with the
    caption in the same row of a caption file. Items are (tokens, (features, mask)); ``collate``
    stacks them into (tokens (M, N), CaptionBatch).

    ``short``: a second source of shorter captions for the same images, taken by a share
    ``short_share`` of the items (LlamaGen's T2I training: 30%, ``dataset/t2i.py``), drawn per
    (seed, epoch, item) so that a resumed run draws the same ones."""

    def __init__(self, codes, captions: CaptionFile | CaptionFolder,
                 short: CaptionFile | CaptionFolder | None = None, short_share: float = 0.3,
                 seed: int = 0):
        for source in (captions, short):
            if source is not None and len(codes) != len(source):
                raise ValueError(
                    f"{len(codes)} images of codes but {len(source)} captions in "
                    f"{getattr(source, 'path', getattr(source, 'root', ''))}: give one caption "
                    "per image, in the same order"
                )
        self.codes, self.captions, self.short = codes, captions, short
        self.short_share, self.seed, self.epoch = short_share, seed, 0
        self.seq_len, self.num_views = codes.seq_len, codes.num_views
        self.vocab_size = codes.vocab_size

    def __len__(self) -> int:
        return len(self.codes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.codes.set_epoch(epoch)

    def takes_short(self, index: int) -> bool:
        """Whether item ``index`` takes its short caption this epoch."""
        if self.short is None:
            return False
        import numpy as np

        rng = np.random.default_rng([self.seed, self.epoch, index, SHORT_STREAM])
        return bool(rng.random() < self.short_share)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        """Several items with one caption read (and one encoder call for images)."""
        fetch = getattr(self.codes, "__getitems__", None)
        pairs = fetch(indices) if fetch is not None else [self.codes[i] for i in indices]
        short = [self.takes_short(i) for i in indices]
        rows: list = [None] * len(indices)
        for source, chosen in ((self.captions, False), (self.short, True)):
            picked = [k for k, s in enumerate(short) if s == chosen]
            if picked:
                batch = source.batch([indices[k] for k in picked])
                for j, k in enumerate(picked):
                    rows[k] = (batch.features[j], batch.mask[j])
        return [(tokens, rows[k]) for k, (tokens, _) in enumerate(pairs)]

    @staticmethod
    def collate(items) -> tuple[Tensor, CaptionBatch]:
        tokens = torch.stack([tokens for tokens, _ in items])
        features = torch.stack([features for _, (features, _) in items])
        mask = torch.stack([mask for _, (_, mask) in items])
        return tokens, CaptionBatch.of(features, mask)

    def all_labels(self):
        """No class labels: the conditions are the captions."""
        import numpy as np

        return np.zeros(0, dtype=np.int64)

    def token_range(self) -> tuple[int, int]:
        return self.codes.token_range()
