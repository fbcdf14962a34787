"""Independent float64 resampling matrices (VAR's bicubic and area resampling), for the VAR
model and VQVAE tests."""

from __future__ import annotations

import math

import torch


def bicubic_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) float64 weights of bicubic resampling (Keys, a = -0.75, half-pixel centres,
    edge taps clamped): resample a map x as M_h x M_w^T."""

    def cubic(d: float) -> float:
        d, a = abs(d), -0.75
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0

    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for o in range(size_out):
        src = (o + 0.5) * size_in / size_out - 0.5
        base = math.floor(src)
        for tap in range(-1, 3):
            m[o, min(max(base + tap, 0), size_in - 1)] += cubic(src - (base + tap))
    return m

def area_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) float64 weights of area downsampling: the mean over cells
    [floor(o in / out), ceil((o + 1) in / out))."""
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for o in range(size_out):
        lo, hi = (o * size_in) // size_out, -(-(o + 1) * size_in // size_out)
        m[o, lo:hi] = 1 / (hi - lo)
    return m

def resample(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return m @ x @ m.T
