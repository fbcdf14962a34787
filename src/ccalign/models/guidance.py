"""Classifier-free guidance: per-token scales and the logit mix.

A token's logits are ``uncond + (cond - uncond) * scale``: 1.0 means "conditional logits only",
> 1 guides towards the class, 0 is the unconditional model and scales in (0, 1) interpolate
between the two (LlamaGen's sampler instead treats every scale <= 1 as guidance-free). Negative
scales (sampling away from the class) and non-finite ones are rejected. Unconditional rows are
only run while some later token still needs them (their KV cache must be complete).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral

from torch import Tensor

#: A constant scale, one scale per image token, or a function of the token index.
GuidanceScale = float | Sequence[float] | Callable[[int], float]


def guidance_scales(
    cfg_scale: GuidanceScale, num_tokens: int, cfg_interval: int = -1
) -> list[float]:
    """Scale for each of ``num_tokens`` image tokens.

    ``cfg_interval`` follows LlamaGen: when > -1, tokens after index ``cfg_interval + 1`` use the
    conditional logits only (its decode step i, which emits token i + 1, stops guiding once
    i > cfg_interval; the first token is always guided). Every scale must be finite and >= 0.
    """
    if callable(cfg_scale):
        scales = [float(cfg_scale(t)) for t in range(num_tokens)]
    elif isinstance(cfg_scale, Sequence) and not isinstance(cfg_scale, str):
        if len(cfg_scale) != num_tokens:
            raise ValueError(
                f"a guidance schedule needs one scale per image token: got {len(cfg_scale)} "
                f"scales for {num_tokens} tokens"
            )
        scales = [float(s) for s in cfg_scale]
    else:
        check_scale(float(cfg_scale))
        scales = [float(cfg_scale)] * num_tokens
    for t, scale in enumerate(scales):
        check_scale(scale, f" at token {t} of the schedule")
    if not isinstance(cfg_interval, Integral) or cfg_interval < -1:
        raise ValueError(
            f"cfg_interval must be an integer, -1 (guide every token) or >= 0; got {cfg_interval!r}"
        )
    if cfg_interval > -1:
        scales = [s if t <= cfg_interval + 1 else 1.0 for t, s in enumerate(scales)]
    return scales


def check_scale(scale: float, where: str = "") -> None:
    """Raise when a guidance scale is NaN, infinite or negative (``where`` names the token)."""
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(
            f"cfg_scale must be finite and >= 0, got {scale}{where}: 1 is guidance-free, > 1 "
            "guides, 0 samples the unconditional model, (0, 1) interpolates between them"
        )


def last_guided_token(scales: Sequence[float]) -> int:
    """Index of the last token whose scale differs from 1.0, or -1 when none does."""
    guided = [t for t, s in enumerate(scales) if s != 1.0]
    return guided[-1] if guided else -1


def mix_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """LlamaGen's CFG on raw logits: uncond + (cond - uncond) * scale."""
    return uncond + (cond - uncond) * scale


def linear_ramp(max_scale: float, num_tokens: int) -> list[float]:
    """Scale rising linearly from 1.0 at the first token to ``max_scale`` at the last."""
    if num_tokens == 1:
        return [float(max_scale)]
    return [1.0 + (max_scale - 1.0) * t / (num_tokens - 1) for t in range(num_tokens)]
