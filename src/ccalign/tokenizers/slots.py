"""Scenes of items side by side, each coded on its own by an item tokenizer.

A scene ``slots`` items wide (B, C, H, slots * W) is cut into its items, each item is coded by
the item tokenizer into a grid x grid block, and the blocks are joined into one grid x
(slots * grid) code image read in raster order: row r of the scene's codes is row r of every
item's codes, left to right. Coding items apart keeps a scene's codes (and so a model's tokens)
exactly those of its items, whatever stands beside them, and decoding cuts the rows back up.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SlotTokenizer(nn.Module):
    """``slots`` items of ``item`` side by side: images (B, C, H, slots * W) <-> codes
    (B, grid * slots * grid)."""

    def __init__(self, item: nn.Module, slots: int):
        super().__init__()
        if slots < 1:
            raise ValueError(f"a scene has at least one slot, not {slots}")
        self.item, self.slots = item, slots
        self.vocab_size, self.grid, self.channels = item.vocab_size, item.grid, item.channels
        self.image_size = item.image_size  # the scene's height; its width is slots times that

    @property
    def width(self) -> int:
        """Codes per row of a scene."""
        return self.slots * self.grid

    @property
    def seq_len(self) -> int:
        return self.grid * self.width

    def encode(self, images: Tensor) -> Tensor:
        """Scenes (B, C, H, slots * H) -> codes (B, grid * slots * grid)."""
        size = self.image_size
        if images.shape[-2:] != (size, self.slots * size):
            raise ValueError(
                f"scenes must be {size} x {self.slots * size} pixels ({self.slots} items of "
                f"{size} side by side); got {tuple(images.shape[-2:])}"
            )
        return self.join([self.item.encode(x) for x in images.split(size, dim=-1)])

    def join(self, items: list[Tensor]) -> Tensor:
        """Each slot's item codes (B, grid * grid), left to right -> the scenes' codes."""
        if len(items) != self.slots:
            raise ValueError(f"a scene has {self.slots} slots, got codes of {len(items)}")
        blocks = [codes.reshape(-1, self.grid, self.grid) for codes in items]
        return torch.cat(blocks, dim=-1).flatten(1)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, grid * slots * grid) -> scenes (B, C, H, slots * H)."""
        if codes.shape[-1] != self.seq_len:
            raise ValueError(f"scene codes are {self.seq_len} per image, got {codes.shape[-1]}")
        rows = codes.reshape(-1, self.grid, self.width).split(self.grid, dim=-1)
        return torch.cat([self.item.decode(r.flatten(1)) for r in rows], dim=-1)
