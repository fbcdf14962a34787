"""Training straight from images: each item is encoded by a tokenizer when it is read.

:class:`EncodedImages` is a :class:`~ccalign.data.codes.CodeDataset` over an image source (a
class-per-folder tree or ``fashion-mnist:<split>``) and a tokenizer. Item ``i`` is the codes of
image ``i`` under one view, picked from (seed, epoch, index) exactly as pre-extracted codes pick
theirs, so runs stay reproducible and resumable. The views and their preprocessing are those of
``ccalign extract-codes`` (ADM centre crop to the tokenizer's image size; "flip" adds the
mirror), so training on the fly sees the codes an extraction with the same settings would write;
"var-crop" (VAR's training view) draws a new random crop each epoch, as VAR's loader does.

Encoding runs on the CPU under ``torch.inference_mode``; ``data.num_workers`` spreads it over
DataLoader worker processes. A DataLoader with batches calls :meth:`EncodedImages.__getitems__`,
which encodes the whole micro-batch in one call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ccalign.data.codes import CodeDataset
from ccalign.data.images import encode_views, open_source
from ccalign.data.images import views as image_views
from ccalign.io import PathLike
from ccalign.tokenizers import VQModel, load

#: view mode -> number of views per image (view 0 is the centre crop, view 1 its mirror);
#: "var-crop" is one random crop of VAR's training view, drawn anew each epoch
VIEW_MODES = {"center": 1, "flip": 2, "var-crop": 1}
#: what reading an image can raise when the file is damaged
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class EncodedImages(CodeDataset):
    """Images encoded on the fly: items ``(codes int64 (seq_len,), label int64 ())``; seq_len is
    grid**2, or a multi-scale tokenizer's own (680 for VAR's VQVAE at 256 px)."""

    def __init__(
        self,
        source: str | PathLike,
        tokenizer: str | PathLike | VQModel,
        *,
        views: str = "center",
        seed: int = 0,
        image_size: int | None = None,
        fashion_folder: PathLike | None = None,
    ):
        super().__init__(seed)
        if views not in VIEW_MODES:
            raise ValueError(f"unknown view mode {views!r}; choose one of {list(VIEW_MODES)}")
        self.tokenizer = _open_tokenizer(tokenizer, image_size)
        self.source = open_source(str(source), fashion_folder)
        self.views = views
        self.num_views = VIEW_MODES[views]
        self.image_size = self.tokenizer.image_size
        self.seq_len = getattr(self.tokenizer, "seq_len", self.tokenizer.grid**2)
        self.vocab_size = self.tokenizer.vocab_size
        self._pil_mode = "L" if self.tokenizer.channels == 1 else "RGB"
        self._labels = np.array([item.label for item in self.source.items], dtype=np.int64)

    @property
    def classes(self) -> list[str]:
        """Class names in label order (folder names, or Fashion-MNIST's names)."""
        return list(self.source.classes)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several items with one encoder call (the DataLoader's batched fetch)."""
        pixels = torch.stack([self.view_pixels(i) for i in indices])[:, None]
        with torch.inference_mode():
            codes = encode_views(self.tokenizer, pixels)[:, 0]
        codes = codes.clone()  # a normal tensor: inference tensors cannot be saved for backward
        labels = torch.from_numpy(self._labels[list(indices)])
        return list(zip(codes.unbind(0), labels.unbind(0), strict=True))

    def view_pixels(self, index: int) -> torch.Tensor:
        """The uint8 pixels (H, W[, C]) of the view item ``index`` uses this epoch."""
        try:
            image = self.source.image(index, self._pil_mode)
        except _UNREADABLE as exc:
            raise ValueError(
                f"cannot read training image {self.source.items[index].name}: "
                f"{type(exc).__name__}: {exc}; remove it, or train from codes made by "
                "`ccalign extract-codes` (which skips unreadable images)"
            ) from exc
        rng = np.random.default_rng([self.seed, self.epoch, index])  # var-crop's offsets
        arr = image_views(image, self.image_size, self.views, rng=rng)[self.view_index(index)]
        return torch.from_numpy(np.array(arr))  # a writable copy

    def all_labels(self) -> np.ndarray:
        return self._labels.copy()

    def require_seq_len(self, seq_len: int) -> None:
        """Refuse a model whose sequence length differs from the tokenizer's codes."""
        if self.seq_len == seq_len:
            return
        if not hasattr(self.tokenizer, "seq_len") and math.isqrt(seq_len) ** 2 == seq_len:
            self.require_grid(math.isqrt(seq_len))  # one grid: say which image size fits
        raise ValueError(
            f"the tokenizer encodes {self.image_size}px images to {self.seq_len} tokens but the "
            f"model expects {seq_len}; use the tokenizer the model was trained with (VAR: the "
            "VQVAE with the model's scales)"
        )

    def require_grid(self, grid: int) -> None:
        """Refuse a model whose token grid differs from the tokenizer's, saying what to change."""
        if self.tokenizer.grid == grid:
            return
        factor = self.image_size // self.tokenizer.grid
        raise ValueError(
            f"the tokenizer encodes {self.image_size}px images to a {self.tokenizer.grid}x"
            f"{self.tokenizer.grid} grid ({self.seq_len} tokens) but the model's grid is "
            f"{grid}x{grid} ({grid * grid} tokens); use the tokenizer the model was built for, "
            f"or set data.image_size = {grid * factor} (the tokenizer downsamples by {factor})"
        )

    def token_range(self) -> tuple[int, int]:
        """The tokenizer's code range [0, vocab_size - 1], without encoding the data set.

        Every code comes from the tokenizer, so none can fall outside its codebook; checking
        the range against a model is the same as checking the tokenizer's vocab size.
        """
        return 0, self.vocab_size - 1


def _open_tokenizer(tokenizer: str | PathLike | VQModel, image_size: int | None) -> VQModel:
    """A tokenizer loaded from a file (or "fmnist-vq") or as given, in eval mode on the CPU."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load(tokenizer, image_size=image_size).to("cpu").eval()
    if image_size is not None and image_size != tokenizer.image_size:
        raise ValueError(
            f"image_size {image_size} differs from the given tokenizer's "
            f"{tokenizer.image_size}; load the tokenizer with that image size instead"
        )
    return tokenizer.to("cpu").eval()
