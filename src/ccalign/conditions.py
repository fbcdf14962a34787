"""What a model is conditioned on, behind the few operations that methods and samplers need.

A condition kind says how a batch of conditions is masked to the unconditional input, paired
with negatives (each row gets the next row's condition, the official roll), compared, joined
and moved. Class labels are int64 tensors (B,) whose null condition is the extra class
``num_classes``; a text family brings its own kind (caption features and their mask) with the
same operations, and the objectives in ``ccalign.train`` work unchanged.
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
