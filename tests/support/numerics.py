"""Comparing two runs that compute the same thing in another order."""

from __future__ import annotations

#: What two fp64 runs that compute the same updates in another order may differ by. Sums in
#: another order differ by a few float64 ulps (~1e-16 relative); Adam's update is scale-free, so
#: a weight moves by about lr per step whatever the gradient's size, and reordering moves it by
#: ~1e-16 of that. 1e-9 relative (+1e-12 absolute) is far above that noise and far below what a
#: real difference does (another negative, row or batch moves weights by ~lr = 1e-3..1e-2).
FP64_RTOL, FP64_ATOL = 1e-9, 1e-12


def assert_same_run(a: dict, b: dict) -> None:
    """Two state dicts of fp64 runs hold the same weights up to float64 summation order."""
    import torch

    assert a.keys() == b.keys()
    assert any(v.dtype == torch.float64 for v in a.values()), "run the comparison in fp64"
    for key, value in a.items():  # float32 left (frozen or constant tensors) must agree too
        torch.testing.assert_close(b[key], value, rtol=FP64_RTOL, atol=FP64_ATOL, msg=key)
