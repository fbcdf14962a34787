"""Alignment objectives on per-sample sequence log-probabilities: CCA and the paper's baselines.

Every objective takes the policy's and the frozen reference's log p(x|c) for the positive pair
(true label) and the negative pair (``ContrastPairs.neg_labels``), all (B,) tensors, plus the
``neg_is_positive`` flags from ``make_pairs``. With ``D+ = policy_pos - ref_pos`` and
``D- = policy_neg - ref_neg`` (log-likelihood gains over the reference), each returns the scalar
batch loss and detached metrics. Everything is computed in the inputs' dtype. ``ddo_loss``
(Direct Discriminative Optimization) has the same form, but its negatives are samples of the
reference model for the true label instead of the data under a mismatched label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AlignOutput:
    """The differentiable scalar loss and detached scalar metrics for logging."""

    loss: Tensor
    metrics: dict[str, Tensor]


def cca_loss(
    policy_pos: Tensor,
    policy_neg: Tensor,
    ref_pos: Tensor,
    ref_neg: Tensor,
    neg_is_positive: Tensor,
    *,
    beta: float,
    lam: float,
) -> AlignOutput:
    """CCA: ``-log s(beta D+) - w log s(sign beta D-)``, batch mean, divided by max(lam, 1).

    Real negatives use sign -1 and weight ``lam``; rows flagged ``neg_is_positive`` (null-masked
    or coincident labels) use sign +1 and weight 1, as in the official code. Unlike the official
    LlamaGen code, ``uncond_ratio = 0`` does not switch to the linear unlearning loss, and
    coincident labels are always treated as positives (the official VAR code drops that rule,
    and the division by max(lam, 1), when ``uncond_ratio = 0``): one loss for every setting.
    """
    d_pos, d_neg = _gains(policy_pos, policy_neg, ref_pos, ref_neg, neg_is_positive, beta, lam)
    sign = torch.where(neg_is_positive, 1.0, -1.0).to(d_neg.dtype)
    weight = torch.where(neg_is_positive, 1.0, float(lam)).to(d_neg.dtype)
    per_row = -F.logsigmoid(beta * d_pos) - weight * F.logsigmoid(sign * beta * d_neg)
    loss = per_row.mean() / max(float(lam), 1.0)
    return AlignOutput(loss, _metrics(loss, d_pos, d_neg, neg_is_positive, beta))


def dpo_loss(
    policy_pos: Tensor,
    policy_neg: Tensor,
    ref_pos: Tensor,
    ref_neg: Tensor,
    neg_is_positive: Tensor,
    *,
    beta: float,
    lam: float = 1.0,
) -> AlignOutput:
    """DPO baseline: ``-log s(beta (D+ - D-))``, batch mean, exactly as the official code.

    ``lam`` is accepted for a uniform call signature and unused (the official DPO has no
    weight and no division by max(lam, 1)). Rows flagged ``neg_is_positive`` stay in the mean,
    as in the official code, so the baseline matches the paper's ablation: they are not
    preference pairs, and since their two sequences and labels coincide, D+ = D- (up to
    dropout noise) and they add log 2 with no gradient.
    """
    d_pos, d_neg = _gains(policy_pos, policy_neg, ref_pos, ref_neg, neg_is_positive, beta, lam)
    loss = -F.logsigmoid(beta * (d_pos - d_neg)).mean()
    return AlignOutput(loss, _metrics(loss, d_pos, d_neg, neg_is_positive, beta))


def unlearning_loss(
    policy_pos: Tensor,
    policy_neg: Tensor,
    ref_pos: Tensor,
    ref_neg: Tensor,
    neg_is_positive: Tensor,
    *,
    beta: float,
    lam: float,
) -> AlignOutput:
    """Unlearning baseline: ``-D+ - w sign D-`` (linear), batch mean, divided by max(lam, 1).

    Likelihood ascent on positives and ``lam``-weighted likelihood descent on real negatives;
    ``neg_is_positive`` rows get sign +1 and weight 1. This is the official code's
    ``uncond_ratio > 0`` branch, used for every setting (its ``uncond_ratio = 0`` branch drops
    the coincident-label rule and the division). ``beta`` only scales the logged reward margin:
    the official loss has no beta, and on a linear loss it would merely rescale the gradient.
    """
    d_pos, d_neg = _gains(policy_pos, policy_neg, ref_pos, ref_neg, neg_is_positive, beta, lam)
    signed_weight = torch.where(neg_is_positive, 1.0, -float(lam)).to(d_neg.dtype)
    per_row = -d_pos - signed_weight * d_neg
    loss = per_row.mean() / max(float(lam), 1.0)
    return AlignOutput(loss, _metrics(loss, d_pos, d_neg, neg_is_positive, beta))


def ddo_loss(
    policy_real: Tensor,
    policy_fake: Tensor,
    ref_real: Tensor,
    ref_fake: Tensor,
    uncond_mask: Tensor,
    *,
    beta: float,
    alpha: float,
) -> AlignOutput:
    """DDO: ``-w_r log s(beta D_real) - w_f log s(-beta D_fake)``, batch mean, / max(alpha, 1).

    Row i pairs a data sample (``*_real``) with a sample of the reference model for the same
    label (``*_fake``); D = log p_theta - log p_ref of each. Conditional rows weigh the real term
    1 and the fake term ``alpha``; rows flagged in ``uncond_mask`` (the null label) weigh the real
    term max(alpha, 1) and drop the fake term (ccalign's choice: DDO's AR trainer is not
    public): their fake values are never read (any number, even NaN, gives the same loss and
    zero gradient). The logged ``d_neg`` and
    ``reward_accuracy`` cover the conditional rows only (0 when there are none).
    """
    d_real, d_fake = _ddo_gains(policy_real, policy_fake, ref_real, ref_fake, uncond_mask, beta)
    if not alpha >= 0:
        raise ValueError(f"alpha (the weight of the reference's samples) must be >= 0, got {alpha}")
    scale = max(float(alpha), 1.0)
    real_weight = torch.where(uncond_mask, scale, 1.0).to(d_real.dtype)
    cond = ~uncond_mask
    safe_fake = torch.where(cond, d_fake, torch.zeros_like(d_fake))  # no NaN reaches backward
    fake_term = torch.where(cond, -float(alpha) * F.logsigmoid(-beta * safe_fake), 0.0)
    per_row = -real_weight * F.logsigmoid(beta * d_real) + fake_term
    loss = per_row.mean() / scale
    return AlignOutput(loss, _ddo_metrics(loss, d_real, safe_fake, cond))


def _ddo_gains(
    policy_real: Tensor,
    policy_fake: Tensor,
    ref_real: Tensor,
    ref_fake: Tensor,
    uncond_mask: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """Validate DDO's inputs and return the gains (D_real, D_fake) over the reference."""
    inputs = {
        "policy_real": policy_real,
        "policy_fake": policy_fake,
        "ref_real": ref_real,
        "ref_fake": ref_fake,
        "uncond_mask": uncond_mask,
    }
    _check_per_sample(inputs, mask="uncond_mask", beta=beta)
    return policy_real - ref_real.detach(), policy_fake - ref_fake.detach()


@torch.no_grad()
def _ddo_metrics(loss: Tensor, d_real: Tensor, d_fake: Tensor, cond: Tensor) -> dict[str, Tensor]:
    """Detached batch means; ``d_pos`` / ``d_neg`` are D on data / on the reference's samples."""
    weight = cond.to(d_real.dtype)
    count = weight.sum().clamp(min=1.0)
    return {
        "loss": loss.detach(),
        "d_pos": d_real.mean(),
        "d_neg": (d_fake * weight).sum() / count,
        "reward_accuracy": ((d_real > d_fake).to(d_real.dtype) * weight).sum() / count,
        "uncond_fraction": 1.0 - weight.mean(),
    }


OBJECTIVES: dict[str, Callable[..., AlignOutput]] = {
    "cca": cca_loss,
    "dpo": dpo_loss,
    "unlearning": unlearning_loss,
}


def alignment_loss(name: str, *args, **kwargs) -> AlignOutput:
    """Dispatch to the objective called ``name`` (one of ``OBJECTIVES``)."""
    if name not in OBJECTIVES:
        raise ValueError(
            f"unknown alignment objective {name!r}; choose one of: {', '.join(OBJECTIVES)}"
        )
    return OBJECTIVES[name](*args, **kwargs)


def _gains(
    policy_pos: Tensor,
    policy_neg: Tensor,
    ref_pos: Tensor,
    ref_neg: Tensor,
    neg_is_positive: Tensor,
    beta: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Validate the inputs and return the log-likelihood gains (D+, D-) over the reference."""
    inputs = {
        "policy_pos": policy_pos,
        "policy_neg": policy_neg,
        "ref_pos": ref_pos,
        "ref_neg": ref_neg,
        "neg_is_positive": neg_is_positive,
    }
    _check_per_sample(inputs, mask="neg_is_positive", beta=beta)
    if not lam >= 0:
        raise ValueError(f"lam (the negative weight) must be >= 0, got {lam}")
    return policy_pos - ref_pos.detach(), policy_neg - ref_neg.detach()


@torch.no_grad()
def _metrics(
    loss: Tensor, d_pos: Tensor, d_neg: Tensor, neg_is_positive: Tensor, beta: float
) -> dict[str, Tensor]:
    """Detached batch means for logging (no host sync: all stay tensors).

    ``reward_margin`` is scaled by beta (the official code logs the raw mean of D+ - D-).
    """
    return {
        "loss": loss.detach(),
        "d_pos": d_pos.mean(),
        "d_neg": d_neg.mean(),
        "reward_margin": (beta * (d_pos - d_neg)).mean(),
        "reward_accuracy": (d_pos > d_neg).to(d_pos.dtype).mean(),
        "neg_is_positive_fraction": neg_is_positive.to(d_pos.dtype).mean(),
    }


def _check_per_sample(inputs: dict[str, Tensor], *, mask: str, beta: float) -> None:
    """Every input a 1-D tensor shaped like the first, ``mask`` boolean, ``beta`` positive."""
    first_name, first = next(iter(inputs.items()))
    for name, tensor in inputs.items():
        if tensor.dim() != 1 or tensor.shape != first.shape:
            raise ValueError(
                f"{name} must be a 1-D per-sample tensor of shape {tuple(first.shape)} "
                f"(like {first_name}), got {tuple(tensor.shape)}"
            )
    if inputs[mask].dtype != torch.bool:
        raise ValueError(f"{mask} must be a bool tensor, got {inputs[mask].dtype}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
