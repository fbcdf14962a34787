"""What a training step minimises: an alignment loss against a frozen reference, or MLE.

Alignment (CCA / DPO / unlearning): the batch becomes 2B rows ``[positives; negatives]`` (the
same tokens twice, true labels then rolled labels, null-masked rows keyed by the trainer), and
the policy and the reference each run ONE forward over those 2B rows. MLE (pretraining): the
mean next-token NLL per token, with class dropout to the null class keyed the same way. GFT:
the same NLL of the mixed logits ``beta * cond + (1 - beta) * stopgrad(uncond)`` (see
``ccalign.align.gft``).

DDO: the batch becomes B + K rows ``[data; samples of the reference]``, one sample of the
frozen reference for each of the K conditional rows, with the row's label; null-masked rows
keep only their data term, so no sample is drawn for them.

``row_mask`` is decided by the trainer from (seed, step, global sample position), so the same
sample gets the same draw whatever the number of processes or micro-steps; objectives with
``needs_row_ids`` also get those global positions (``row_ids``), which key DDO's negatives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ccalign.align import alignment_loss, ddo_loss, make_pairs
from ccalign.models.llamagen import LogitMix


@dataclass
class ObjectiveOutput:
    """The micro-batch loss (mean over its rows) and detached scalar metrics to log."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective(ABC):
    """Base: ``needs_reference``, the probability with which a row gets the null class, and
    ``row_draws``: whether ``__call__`` also takes ``row_draws``, (B,) keyed U[0, 1) per row."""

    needs_reference: bool = False
    needs_row_ids: bool = False  # True: called with row_ids (B,), global positions of the rows
    row_mask_ratio: float = 0.0
    row_draws: bool = False

    @abstractmethod
    def __call__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        labels: Tensor,
        tokens: Tensor,
        row_mask: Tensor,
    ) -> ObjectiveOutput:
        """Loss of one micro-batch; ``row_mask`` (B,) bool marks rows given the null class."""


class AlignmentObjective(Objective):
    """CCA, DPO or unlearning: one policy and one reference forward over [positives; negatives]."""

    needs_reference = True

    def __init__(self, name: str, *, null_class: int, beta: float, lam: float, uncond_ratio: float):
        if name not in ("cca", "dpo", "unlearning"):
            raise ValueError(f"unknown alignment loss {name!r}; choose cca, dpo or unlearning")
        self.name, self.null_class, self.beta, self.lam = name, null_class, beta, lam
        self.row_mask_ratio = uncond_ratio

    def __call__(self, policy, reference, labels, tokens, row_mask) -> ObjectiveOutput:
        pairs = make_pairs(
            labels, null_class=self.null_class, uncond_ratio=self.row_mask_ratio, mask=row_mask
        )
        both_labels = torch.cat([pairs.pos_labels, pairs.neg_labels])
        both_tokens = torch.cat([tokens, tokens])
        policy_pos, policy_neg = policy(both_labels, both_tokens).float().chunk(2)
        with torch.no_grad():
            ref_pos, ref_neg = reference(both_labels, both_tokens).float().chunk(2)
        out = alignment_loss(
            self.name,
            policy_pos,
            policy_neg,
            ref_pos,
            ref_neg,
            pairs.neg_is_positive,
            beta=self.beta,
            lam=self.lam,
        )
        metrics = {k: v.detach().float().mean() for k, v in out.metrics.items()}
        return ObjectiveOutput(out.loss, metrics)


class NegativeSource(Protocol):
    """Where DDO's negatives come from: one reference sample per (label, global row)."""

    def draw(self, reference: nn.Module, labels: Tensor, row_ids: Tensor) -> Tensor:
        """Tokens (K, N) int64 of the reference's samples for ``labels`` at rows ``row_ids``."""


class DDOObjective(Objective):
    """DDO: one policy and one reference forward over [data rows; reference samples]."""

    needs_reference = True
    needs_row_ids = True

    def __init__(
        self,
        *,
        null_class: int,
        beta: float,
        alpha: float,
        uncond_ratio: float,
        negatives: NegativeSource | None = None,
    ):
        self.null_class, self.beta, self.alpha = null_class, beta, alpha
        self.row_mask_ratio = uncond_ratio
        self.negatives = negatives  # set before training (ccalign.train.ddo does)

    def __call__(self, policy, reference, labels, tokens, row_mask, row_ids) -> ObjectiveOutput:
        if self.negatives is None:
            raise RuntimeError("DDOObjective.negatives is not set: give it a negative source")
        row_mask = row_mask.to(labels.device)
        cond = ~row_mask
        with torch.no_grad():
            fakes = self.negatives.draw(reference, labels[cond], row_ids[cond.cpu()])
        real_labels = torch.where(row_mask, self.null_class, labels)
        all_labels = torch.cat([real_labels, labels[cond]])
        all_tokens = torch.cat([tokens, fakes.to(tokens.device)])
        batch = labels.shape[0]
        policy_all = policy(all_labels, all_tokens).float()
        with torch.no_grad():
            ref_all = reference(all_labels, all_tokens).float()
        out = ddo_loss(
            policy_all[:batch],
            _spread(policy_all[batch:], cond),
            ref_all[:batch],
            _spread(ref_all[batch:], cond),
            row_mask,
            beta=self.beta,
            alpha=self.alpha,
        )
        metrics = {k: v.detach().float().mean() for k, v in out.metrics.items()}
        return ObjectiveOutput(out.loss, metrics)


def _spread(values: Tensor, rows: Tensor) -> Tensor:
    """(B,) with ``values`` at the True rows of ``rows`` and 0 elsewhere (differentiable)."""
    return values.new_zeros(rows.shape[0]).masked_scatter(rows, values)


class MLEObjective(Objective):
    """Next-token negative log-likelihood per token, with class dropout to the null class."""

    def __init__(self, *, null_class: int, class_dropout: float):
        self.null_class = null_class
        self.row_mask_ratio = class_dropout

    def __call__(self, policy, reference, labels, tokens, row_mask) -> ObjectiveOutput:
        labels = torch.where(row_mask.to(labels.device), self.null_class, labels)
        nll = -policy(labels, tokens).float() / tokens.shape[1]
        loss = nll.mean()
        return ObjectiveOutput(loss, {"nll_per_token": loss.detach()})


class GFTObjective(Objective):
    """Guidance-Free Training: next-token NLL per token of GFT's mixed logits, no reference.

    beta ~ U(0, 1) per row (no clamp, as the official code) is ``row_draws``, keyed by the
    trainer like the null-class rows. The unconditional pass (null class, beta = 1) runs without
    gradient and with dropout off; the conditional pass (beta input, class dropout to the null
    class on ``row_mask`` rows, whose beta input is then 1 while their mixing weight stays beta,
    as in the official code) trains in the policy's own mode. Both go through the wrapped
    policy's forward (DDP / FSDP hooks run), which chunks the vocabulary projection.
    """

    row_draws = True

    def __init__(self, *, null_class: int, class_dropout: float):
        self.null_class = null_class
        self.row_mask_ratio = class_dropout

    def __call__(
        self, policy, reference, labels, tokens, row_mask, row_draws: Tensor
    ) -> ObjectiveOutput:
        beta = row_draws.float()
        null = torch.full_like(labels, self.null_class)
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad():
                uncond_hidden = policy(null, tokens, beta=1.0, hidden=True)
        finally:
            policy.train(was_training)
        labels = torch.where(row_mask.to(labels.device), self.null_class, labels)
        mix = LogitMix(weight=beta, other_hidden=uncond_hidden)
        nll = -policy(labels, tokens, beta=beta, mix=mix).float() / tokens.shape[1]
        loss = nll.mean()
        return ObjectiveOutput(loss, {"nll_per_token": loss.detach(), "beta": beta.mean()})


def make_objective(method, *, null_class: int) -> Objective:
    """The objective a ``MethodSection`` describes."""
    if method.name == "mle":
        return MLEObjective(null_class=null_class, class_dropout=method.class_dropout)
    if method.name == "gft":
        return GFTObjective(null_class=null_class, class_dropout=method.class_dropout)
    if method.name == "ddo":
        return DDOObjective(
            null_class=null_class,
            beta=method.beta,
            alpha=method.alpha,
            uncond_ratio=method.uncond_ratio,
        )
    return AlignmentObjective(
        method.name,
        null_class=null_class,
        beta=method.beta,
        lam=method.lam,
        uncond_ratio=method.uncond_ratio,
    )
