"""Classifier-free guidance: per-token scales and the logit mix.

A scale of 1.0 at a token means "conditional logits only"; the unconditional rows are then only
run while some later token still needs them (their KV cache must be complete).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

#: A constant scale, one scale per image token, or a function of the token index.
GuidanceScale = float | Sequence[float] | Callable[[int], float]


def guidance_scales(
    cfg_scale: GuidanceScale, num_tokens: int, cfg_interval: int = -1
) -> list[float]:
    """Scale for each of ``num_tokens`` image tokens.

    ``cfg_interval`` follows LlamaGen: when > -1, tokens after index ``cfg_interval + 1`` use the
    conditional logits only (its decode step i, which emits token i + 1, stops guiding once
    i > cfg_interval; the first token is always guided).
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
        scales = [float(cfg_scale)] * num_tokens
    if cfg_interval < -1:
        raise ValueError(f"cfg_interval must be -1 (guide every token) or >= 0, got {cfg_interval}")
    if cfg_interval > -1:
        scales = [s if t <= cfg_interval + 1 else 1.0 for t, s in enumerate(scales)]
    return scales


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
