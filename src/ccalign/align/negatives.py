"""Negative conditions for CCA: the rolled label of the next sample, plus null-class masking.

Follows the official thu-ml/CCA recipe: the negative label of row i is the true label of row
i + 1 (a roll, so with distinct neighbours no sample is ever paired with itself, unlike a random
permutation), and a random ``uncond_ratio`` fraction of rows gets BOTH labels replaced by the
null class so the unconditional branch keeps being trained (CCA + CFG still works). Rows whose
negative label equals the positive one (null-masked rows, or a rolled label that happens to be
the same class) are not negatives; they are flagged in ``neg_is_positive`` and the losses treat
them as positives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ccalign.conditions import ClassLabels, ConditionKind


@dataclass
class ContrastPairs:
    """Positive and negative labels for one batch, and which negatives are really positives."""

    pos_labels: Any  # (B,) int64 class ids, or a batch of another condition kind
    neg_labels: Any
    neg_is_positive: Tensor  # (B,) bool


def roll_labels(labels: Tensor) -> Tensor:
    """Negative labels by rolling the batch by one: ``neg[i] = labels[(i + 1) % B]``."""
    _check_labels(labels)
    return torch.roll(labels, shifts=-1, dims=0)


def make_pairs(
    labels: Tensor,
    *,
    null_class: int,
    uncond_ratio: float = 0.1,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ContrastPairs:
    """Rolled negatives with null-masking; ``mask`` (bool, (B,)) replaces the random draws.

    A distributed trainer passes ``mask`` so the draws can be keyed to global sample positions;
    otherwise each row is masked with probability ``uncond_ratio`` using ``generator``.
    """
    _check_labels(labels)
    if labels.device.type == "cpu" and bool((labels == null_class).any()):  # no device sync
        raise ValueError(
            f"labels contain the null class id {null_class}; pass the real class labels and let "
            "make_pairs do the null-masking (uncond_ratio or mask)"
        )
    null_mask = _null_mask(labels, uncond_ratio, mask, generator)
    return contrast_pairs(ClassLabels(null_class), labels, null_mask)


def contrast_pairs(kind: ConditionKind, conds: Any, null_rows: Tensor) -> ContrastPairs:
    """Positives and rolled negatives of any condition kind, ``null_rows`` masked in both."""
    null = kind.null_like(conds)
    pos = kind.where(null_rows, null, conds)
    neg = kind.where(null_rows, null, kind.roll(conds))
    return ContrastPairs(pos_labels=pos, neg_labels=neg, neg_is_positive=kind.same(neg, pos))


def _null_mask(
    labels: Tensor, uncond_ratio: float, mask: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """The rows to mask to the null class: the given ``mask`` or independent random draws."""
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != labels.shape:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(labels.shape)} (one flag per row), "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        return mask.to(labels.device)
    if not 0.0 <= uncond_ratio <= 1.0:
        raise ValueError(f"uncond_ratio must be in [0, 1], got {uncond_ratio}")
    if uncond_ratio == 0.0:
        return torch.zeros_like(labels, dtype=torch.bool)
    device = generator.device if generator is not None else labels.device
    draws = torch.rand(labels.shape[0], generator=generator, device=device)
    return (draws < uncond_ratio).to(labels.device)


def _check_labels(labels: Tensor) -> None:
    """Labels must be a non-empty 1-D integer tensor (one class id per sample)."""
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D tensor (B,), got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
