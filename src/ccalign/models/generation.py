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


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while sampling; the caller's train/eval flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
