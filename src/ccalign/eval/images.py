"""Image layout conversion shared by the evaluators: everything becomes uint8 (N, H, W, C)."""

from __future__ import annotations

import numpy as np
import torch

EXPECTED_LAYOUTS = (
    "uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3), or float (N, C, H, W) in [-1, 1] with C 1 or 3"
)


def uint8_nhwc_layout(images: np.ndarray, what: str) -> np.ndarray:
    """Check a uint8 image array and return it as (N, H, W, C) with C 1 or 3 (a view, no copy)."""
    if images.dtype != np.uint8:
        raise ValueError(f"{what}: images have dtype {images.dtype}, expected uint8 (0-255)")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images
    raise ValueError(
        f"{what}: images have shape {images.shape}, expected (N, H, W), (N, H, W, 1) or "
        "(N, H, W, 3) uint8"
    )


def to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any supported image batch as a CPU uint8 (N, H, W, C) tensor.

    uint8 input is taken as (N, H, W[, C]) (or (N, C, H, W) when only that reading fits). Float
    input is the decoders' (N, C, H, W) in [-1, 1] (or (N, H, W) grey), quantised like a saved PNG:
    round((x + 1) * 127.5) clipped to 0-255, so in-memory and file evaluations agree.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a numpy array or torch tensor, got {type(images)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return _uint8_to_nhwc(images)
    if images.is_floating_point():
        return _float_nchw_to_uint8_nhwc(images)
    raise ValueError(f"images have dtype {images.dtype}; expected {EXPECTED_LAYOUTS}")


def _uint8_to_nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W), (N, H, W, C) or unambiguous (N, C, H, W) -> (N, H, W, C)."""
    if images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.permute(0, 2, 3, 1)
    return torch.from_numpy(uint8_nhwc_layout(images.contiguous().numpy(), "images"))


def _float_nchw_to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) or (N, H, W) in [-1, 1] -> quantised uint8 (N, H, W, C)."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"float images have shape {tuple(images.shape)}; expected "
                         "(N, C, H, W) in [-1, 1] with C 1 or 3, or (N, H, W)")
    if not torch.isfinite(images).all():
        raise ValueError("float images contain NaN or infinite values")
    quantised = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return quantised.permute(0, 2, 3, 1).contiguous()
