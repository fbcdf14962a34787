"""The ``--device`` flag of every command: one spelling, and one refusal when the device asked
for is not there."""

from __future__ import annotations

import argparse
import re

import torch

from ccalign.errors import shorten

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d{1,3})?)$")


def device_flag(text: str) -> str:
    """argparse ``type`` of ``--device``: cpu, cuda, cuda:N or mps."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(
            f"expected cpu, cuda, cuda:N or mps, got {shorten(repr(text))}"
        )
    return text


def pick_device(flag: str | None, local_rank: int = 0) -> torch.device:
    """The device ``--device`` names, or this process's GPU when there is one, else the CPU;
    a device that is not there is refused in one line."""
    if flag is None:
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(flag)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {flag}: MPS is not available here; use --device cpu")
    return device
