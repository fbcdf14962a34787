"""What a model is conditioned on, behind the few operations that methods and samplers need.

A condition kind says how a batch of conditions is masked to the unconditional input, paired
with negatives (each row gets the next row's condition, the official roll), compared, joined
and moved. Class labels are int64 tensors (B,) whose null condition is the extra class
``num_classes``. Captions are text-encoder features with their token mask (:class:`CaptionBatch`)
whose null condition is a flag per row: the model puts its learned null caption there, and the
row keeps its own mask, as LlamaGen's T2I sampler does. A model that embeds its text itself
(Janus) takes the caption as token ids in the same batch, its null rows built by the model. The
objectives in ``ccalign.train`` work on any of them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

Conditions = Any  # one batch of conditions; its type is the kind's business


class ConditionKind(Protocol):
    """The operations on a batch of conditions (B rows) that the generic layers use."""

    name: str

    def size(self, conds: Conditions) -> int:
        """The number of rows."""

    def null_like(self, conds: Conditions) -> Conditions:
        """The unconditional input for every row of ``conds``."""

    def where(self, rows: Tensor, a: Conditions, b: Conditions) -> Conditions:
        """Row i of ``a`` where ``rows[i]`` (bool (B,)), else row i of ``b``."""

    def roll(self, conds: Conditions) -> Conditions:
        """Row i gets row (i + 1) % B: a mismatched condition for every row."""

    def same(self, a: Conditions, b: Conditions) -> Tensor:
        """bool (B,): whether row i of ``a`` equals row i of ``b``."""

    def cat(self, parts: Sequence[Conditions]) -> Conditions:
        """The batches one after another."""

    def take(self, conds: Conditions, rows: Tensor) -> Conditions:
        """The rows selected by a bool mask or an index tensor."""

    def to(self, conds: Conditions, device: torch.device | str) -> Conditions:
        """The batch on ``device``."""


@dataclass(frozen=True)
class ClassLabels:
    """Class ids in [0, num_classes); the null (unconditional) class is ``num_classes``."""

    num_classes: int
    name: str = "class"

    @property
    def null_class(self) -> int:
        return self.num_classes

    def size(self, conds: Tensor) -> int:
        return conds.shape[0]

    def null_like(self, conds: Tensor) -> Tensor:
        return torch.full_like(conds, self.null_class)

    def where(self, rows: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.where(rows, a, b)

    def roll(self, conds: Tensor) -> Tensor:
        return torch.roll(conds, shifts=-1, dims=0)

    def same(self, a: Tensor, b: Tensor) -> Tensor:
        return a == b

    def cat(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(parts))

    def take(self, conds: Tensor, rows: Tensor) -> Tensor:
        return conds[rows]

    def to(self, conds: Tensor, device: torch.device | str) -> Tensor:
        return conds.to(device, non_blocking=True)


@dataclass(frozen=True)
class CaptionBatch:
    """B captions as the model reads them: ``features`` (B, L, C) float from a text encoder, or
    (B, L) int64 token ids for a model that embeds them itself (Janus); ``mask`` (B, L) bool
    (True on real tokens; left-padded: real tokens last) and ``null`` (B,) bool: rows whose
    caption the model replaces by its null caption (LlamaGen T2I: a learned one; Janus: the
    prompt blanked to pad tokens)."""

    features: Tensor
    mask: Tensor
    null: Tensor

    def __post_init__(self):
        b, length = self.features.shape[:2]
        if self.features.dim() not in (2, 3) or self.mask.shape != (b, length) or \
                self.null.shape != (b,):
            raise ValueError(
                f"captions must be features (B, L, C) or token ids (B, L), with mask (B, L) "
                f"and null (B,); got {tuple(self.features.shape)}, {tuple(self.mask.shape)}, "
                f"{tuple(self.null.shape)}"
            )

    @classmethod
    def of(cls, features: Tensor, mask: Tensor) -> CaptionBatch:
        """Real captions (no null rows); the mask as bool."""
        null = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        return cls(features, mask.to(torch.bool), null)

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class Captions:
    """Caption batches of ``length`` tokens of ``dim`` features (LlamaGen T2I: 120 x 2048); dim
    0: token ids, and length 0: any length (Janus' prompts)."""

    length: int
    dim: int
    name: str = "caption"

    def size(self, conds: CaptionBatch) -> int:
        return len(conds)

    def null_like(self, conds: CaptionBatch) -> CaptionBatch:
        return CaptionBatch(conds.features, conds.mask, torch.ones_like(conds.null))

    def where(self, rows: Tensor, a: CaptionBatch, b: CaptionBatch) -> CaptionBatch:
        return CaptionBatch(
            torch.where(rows.view(-1, *[1] * (a.features.dim() - 1)), a.features, b.features),
            torch.where(rows[:, None], a.mask, b.mask),
            torch.where(rows, a.null, b.null),
        )

    def roll(self, conds: CaptionBatch) -> CaptionBatch:
        return CaptionBatch(*(torch.roll(t, shifts=-1, dims=0) for t in _parts(conds)))

    def same(self, a: CaptionBatch, b: CaptionBatch) -> Tensor:
        """Equal masks and null flags, and equal features unless both rows are null (the model
        ignores a null row's features)."""
        features = (a.features == b.features).flatten(1).all(1) | (a.null & b.null)
        return features & (a.mask == b.mask).all(1) & (a.null == b.null)

    def cat(self, parts: Sequence[CaptionBatch]) -> CaptionBatch:
        return CaptionBatch(*(torch.cat(list(ts)) for ts in zip(*map(_parts, parts), strict=True)))

    def take(self, conds: CaptionBatch, rows: Tensor) -> CaptionBatch:
        return CaptionBatch(*(t[rows] for t in _parts(conds)))

    def to(self, conds: CaptionBatch, device: torch.device | str) -> CaptionBatch:
        return CaptionBatch(*(t.to(device, non_blocking=True) for t in _parts(conds)))


def _parts(conds: CaptionBatch) -> tuple[Tensor, Tensor, Tensor]:
    return conds.features, conds.mask, conds.null
