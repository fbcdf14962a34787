"""Turning next-token logits into samples: temperature, top-k, top-p, then a categorical draw.

The order and the tie rules are LlamaGen's: divide by max(temperature, 1e-5); top-k keeps every
logit >= the k-th largest; top-p (Hugging Face style) keeps the smallest set of most likely tokens
whose mass reaches ``top_p``, including the token that crosses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-5


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a ValueError naming the bad setting and its valid range."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 ~ greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Set logits below the k-th largest of each row to -inf (ties with it are kept)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep each row's most likely tokens up to and including the one whose mass crosses top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_logits.softmax(dim=-1), dim=-1)
    # sorted token j is dropped when the mass of tokens 0..j-1 already exceeds top_p
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Temperature, then top-k, then top-p, on logits (B, V); float32 result, input untouched."""
    out = logits.float()
    if temperature != 1.0:
        out = out / max(temperature, MIN_TEMPERATURE)
    if top_k > 0:
        out = top_k_filter(out, top_k)
    if top_p < 1.0:
        out = top_p_filter(out, top_p)
    return out


def sample_categorical(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from softmax(logits) (B, V) -> (B,) int64, by inverting the CDF.

    One uniform per row, located in the row's cumulative sums: B random numbers instead of the
    B x V that a Gumbel or exponential race needs (those dominated a small model's decode step),
    and no synchronisation with the host, so it also runs inside captured GPU work. Tokens of
    zero probability (filtered by top-k / top-p) leave the CDF flat and are never picked.
    """
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return picks.squeeze(1).clamp_max_(cdf.shape[1] - 1)
