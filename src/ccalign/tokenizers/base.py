"""The interface every image <-> token codec implements (LlamaGen VQ-16/VQ-8, the small VQ, VAR's
multi-scale VQVAE). A multi-scale tokenizer also has ``seq_len``: its codes hold every scale, not
just the grid (680 for VAR at 256 px); consumers read ``getattr(tokenizer, "seq_len", grid**2)``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images in [-1, 1], shape (B, C, H, W) <-> codes (B, N) in raster order, N = grid ** 2."""

    vocab_size: int  # number of codes
    grid: int  # codes per side
    image_size: int  # pixels per side of the images encode() expects and decode() returns
    channels: int  # 3 for RGB, 1 for grey

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> int64 codes (B, grid * grid)."""
        ...

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, grid * grid) -> images (B, C, H, W), roughly in [-1, 1] (clamp to convert)."""
        ...


def to_model_range(pixels: Tensor, channels: int) -> Tensor:
    """uint8 (..., H, W) grey or (..., H, W, 3) RGB -> float32 (..., C, H, W) in [-1, 1].

    Computed as (x / 255 - 0.5) / 0.5, the ToTensor + Normalize(0.5, 0.5) of the original.
    """
    x = pixels.float() / 255.0
    x = x.unsqueeze(-3) if channels == 1 else x.movedim(-1, -3)
    return (x - 0.5) / 0.5
