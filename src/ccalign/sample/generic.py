"""One front for every family's sampler: ``sampler_for(model)`` and one-off ``generate``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ccalign.models import families
from ccalign.models.family import Sampler


def sampler_for(model: nn.Module, **options: Any) -> Sampler:
    """The sampler of ``model``'s family (options: device=, dtype=, inplace=, eager=, ...)."""
    return families.of(model).sampler(model, **options)


def generate(model: nn.Module, conditions: Any, **settings: Any) -> torch.Tensor:
    """One-off sampling: (B, N) tokens, one image per condition, on the model's device and dtype,
    eagerly. ``settings`` are the family sampler's (cfg_scale, top_k, generator, ...). For
    repeated GPU sampling build a sampler once: it keeps bf16 weights, caches and graphs."""
    ref = next(model.parameters())
    sampler = sampler_for(model, device=ref.device, dtype=ref.dtype, eager=True)
    try:
        return sampler.generate(conditions, **settings)
    finally:
        sampler.release()
