"""Small helpers every family's sampler shares: the device, the generator, eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device (CUDA with its index), refused when CUDA is not there."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("sampling on CUDA was asked for but no GPU is visible; use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """A generator must live on the device the samples are drawn on."""
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but sampling runs on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


class FiniteCheck:
    """Whether every logit a sampler drew from was finite, checked once at the end (one host
    sync per batch, not per token): NaN weights, or a guidance scale whose mix overflows, would
    otherwise draw the last token of the vocabulary everywhere without a word."""

    def __init__(self, device: torch.device):
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def add(self, logits: torch.Tensor) -> FiniteCheck:
        self.finite.logical_and_(torch.isfinite(logits).all())
        return self

    def check(self, scale: str) -> None:
        if not bool(self.finite):
            raise ValueError(
                "the model gave logits that are not finite (NaN or inf): its weights may be "
                f"damaged (load the file again, or check its training), or the guidance ({scale}) "
                "overflows uncond + s (cond - uncond): use a smaller scale"
            )


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while sampling; the caller's train/eval flag is restored afterwards.
    A model already in eval mode is left alone (a transformers model has ~1,000 modules)."""
    was_training = model.training
    if not any(m.training for m in model.modules()):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def autocast_to(device_type: str, dtype: torch.dtype | None, **options):
    """Autocast to ``dtype``, or explicitly off when ``dtype`` is None, so that an enclosing
    autocast (a trainer's) does not reach the sampler."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                          **options)
