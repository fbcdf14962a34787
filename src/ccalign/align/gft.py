"""GFT (Guidance-Free Training, thu-ml/GFT): the loss on per-token logits, as pure functions.

The model is trained on the mixed logits ``beta * l(x_<t | c, beta) + (1 - beta) *
stopgrad(l(x_<t | null, beta = 1))`` with plain next-token cross-entropy; sampled with one
conditional pass at beta = 1 / s, it behaves like classifier-free guidance at scale s.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gft_logits(cond_logits: Tensor, uncond_logits: Tensor, beta: Tensor) -> Tensor:
    """``beta * cond + (1 - beta) * stopgrad(uncond)``; ``beta`` has one value per leading row."""
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(
            f"cond_logits {tuple(cond_logits.shape)} and uncond_logits "
            f"{tuple(uncond_logits.shape)} must have the same shape"
        )
    if beta.dim() != 1 or beta.shape[0] != cond_logits.shape[0]:
        raise ValueError(
            f"beta must be (B,) with B = {cond_logits.shape[0]} (one per row), got "
            f"{tuple(beta.shape)}"
        )
    weight = beta.to(cond_logits.dtype).view(-1, *([1] * (cond_logits.dim() - 1)))
    return weight * cond_logits + (1 - weight) * uncond_logits.detach()


def gft_token_logprobs(
    cond_logits: Tensor, uncond_logits: Tensor, targets: Tensor, beta: Tensor
) -> Tensor:
    """log softmax of ``gft_logits`` at ``targets``: logits (B, ..., V), targets (B, ...).

    ``beta`` is (B,) (one per row) or has the targets' shape (one per token).
    """
    if targets.shape != cond_logits.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must be the logits' shape without the vocabulary "
            f"axis, {tuple(cond_logits.shape[:-1])}"
        )
    if beta.shape not in (targets.shape, targets.shape[:1]):
        raise ValueError(
            f"beta must be ({targets.shape[0]},) or {tuple(targets.shape)}, got {tuple(beta.shape)}"
        )
    per_token = beta.view(*beta.shape, *[1] * (targets.dim() - beta.dim())).expand(targets.shape)
    flat_cond = cond_logits.reshape(-1, cond_logits.shape[-1])
    flat_uncond = uncond_logits.reshape(flat_cond.shape)
    mixed = gft_logits(flat_cond, flat_uncond, per_token.reshape(-1))
    picked = mixed.gather(1, targets.reshape(-1, 1)).squeeze(1)
    return (picked - torch.logsumexp(mixed, dim=-1)).view(targets.shape)
