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
Conditions go through the model family's condition kind (``ccalign.conditions``): class labels
today, caption features with the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ccalign.align import alignment_loss, contrast_pairs, ddo_loss, gft_token_logprobs
from ccalign.conditions import ConditionKind
from ccalign.models.family import LogitMix


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
        labels: Any,
        tokens: Tensor,
        row_mask: Tensor,
    ) -> ObjectiveOutput:
        """Loss of one micro-batch (``labels``: its conditions); ``row_mask`` (B,) bool marks
        rows given the null condition."""


class AlignmentObjective(Objective):
    """CCA, DPO or unlearning: one policy and one reference forward over [positives; negatives]."""

    needs_reference = True

    def __init__(
        self, name: str, *, condition: ConditionKind, beta: float, lam: float, uncond_ratio: float
    ):
        self.name, self.condition, self.beta, self.lam = name, condition, beta, lam
        self.row_mask_ratio = uncond_ratio

    def __call__(self, policy, reference, labels, tokens, row_mask) -> ObjectiveOutput:
        kind = self.condition
        pairs = contrast_pairs(kind, labels, row_mask.to(tokens.device))
        both_labels = kind.cat([pairs.pos_labels, pairs.neg_labels])
        both_tokens = torch.cat([tokens, tokens])
        policy_pos, policy_neg = precise(policy(both_labels, both_tokens)).chunk(2)
        with torch.no_grad():
            ref_pos, ref_neg = precise(reference(both_labels, both_tokens)).chunk(2)
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

    def draw(self, reference: nn.Module, labels: Any, row_ids: Tensor) -> Tensor:
        """Tokens (K, N) int64 of the reference's samples for ``labels`` at rows ``row_ids``."""


class DDOObjective(Objective):
    """DDO: one policy and one reference forward over [data rows; reference samples]."""

    needs_reference = True
    needs_row_ids = True

    def __init__(
        self,
        *,
        condition: ConditionKind,
        beta: float,
        alpha: float,
        uncond_ratio: float,
        negatives: NegativeSource | None = None,
    ):
        self.condition, self.beta, self.alpha = condition, beta, alpha
        self.row_mask_ratio = uncond_ratio
        self.negatives = negatives  # set before training (ccalign.train.ddo does)

    def __call__(self, policy, reference, labels, tokens, row_mask, row_ids) -> ObjectiveOutput:
        if self.negatives is None:
            raise RuntimeError("DDOObjective.negatives is not set: give it a negative source")
        kind = self.condition
        row_mask = row_mask.to(tokens.device)
        cond = ~row_mask
        kept = kind.take(labels, cond)
        with torch.no_grad():
            fakes = self.negatives.draw(reference, kept, row_ids[cond.cpu()])
        real_labels = kind.where(row_mask, kind.null_like(labels), labels)
        all_labels = kind.cat([real_labels, kept])
        all_tokens = torch.cat([tokens, fakes.to(tokens.device)])
        batch = tokens.shape[0]
        policy_all = precise(policy(all_labels, all_tokens))
        with torch.no_grad():
            ref_all = precise(reference(all_labels, all_tokens))
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

    def __init__(self, *, condition: ConditionKind, class_dropout: float):
        self.condition = condition
        self.row_mask_ratio = class_dropout

    def __call__(self, policy, reference, labels, tokens, row_mask) -> ObjectiveOutput:
        kind = self.condition
        labels = kind.where(row_mask.to(tokens.device), kind.null_like(labels), labels)
        nll = -precise(policy(labels, tokens)) / tokens.shape[1]
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

    def __init__(self, *, condition: ConditionKind, class_dropout: float):
        self.condition = condition
        self.row_mask_ratio = class_dropout

    def __call__(
        self, policy, reference, labels, tokens, row_mask, row_draws: Tensor
    ) -> ObjectiveOutput:
        kind = self.condition
        beta = row_draws.float()
        null = kind.null_like(labels)
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad():
                uncond_hidden = policy(null, tokens, beta=1.0, hidden=True)
        finally:
            policy.train(was_training)
        labels = kind.where(row_mask.to(tokens.device), null, labels)
        mix = LogitMix(weight=beta, other_hidden=uncond_hidden, combine=gft_token_logprobs)
        nll = -precise(policy(labels, tokens, beta=beta, mix=mix)) / tokens.shape[1]
        loss = nll.mean()
        return ObjectiveOutput(loss, {"nll_per_token": loss.detach(), "beta": beta.mean()})


def precise(values: Tensor) -> Tensor:
    """Log-likelihoods in float32 at least (float64 ones stay float64: an fp64 run's)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))
