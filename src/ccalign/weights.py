"""Strict loading of weights from checkpoint files of any released layout (models and codecs)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ccalign.io import PathLike, read_tensor_file

#: Container keys under which trainers store model weights, in order of preference.
WEIGHT_KEYS = ("model", "ema", "module", "state_dict")
#: Prefixes that wrappers add to every key (DDP, torch.compile, FSDP).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model; the message lists every difference."""


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def extract_state_dict(obj: object, prefer: Iterable[str] = WEIGHT_KEYS) -> dict[str, torch.Tensor]:
    """Find the weights in a loaded checkpoint: a raw state_dict or a dict holding one.

    The layout is read from the contents: a mapping of tensors is the state_dict itself
    (LlamaGen's FSDP ``consolidated.pth``, VAR's files, safetensors); otherwise the first of
    ``prefer`` present ("model" for LlamaGen's DDP trainer) is taken.
    """
    if _is_state_dict(obj):
        sd = dict(obj)
    elif isinstance(obj, Mapping):
        for key in prefer:
            if key in obj and _is_state_dict(obj[key]):
                sd = dict(obj[key])
                break
        else:
            raise CheckpointMismatchError(
                "no model weights found in the checkpoint: expected a state_dict or a dict "
                f"with one of {list(prefer)}; top-level keys are {sorted(map(str, obj))[:20]}"
            )
    else:
        raise CheckpointMismatchError(f"checkpoint holds a {type(obj).__name__}, not weights")
    return {_strip_prefixes(k): v for k, v in sd.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` without ignored keys, or raise listing every key/shape mismatch."""
    ignore = set(ignore)
    sd = {k: v for k, v in state_dict.items() if k not in ignore}
    expected = model.state_dict()
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    wrong = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected.keys() & sd.keys()
        if sd[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = [f"checkpoint does not fit {type(model).__name__}:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if items:
                shown = "\n    ".join(items[:30])
                more = f"\n    ... and {len(items) - 30} more" if len(items) > 30 else ""
                parts.append(f"  {len(items)} {title} key(s):\n    {shown}{more}")
        parts.append(
            "  Check the model size/grid/vocab you built against the file (e.g. GPT-L vs GPT-B, "
            "256 vs 384 px)."
        )
        raise CheckpointMismatchError("\n".join(parts))
    return sd


def load_weights(
    model: nn.Module, source: PathLike | object, ignore: Iterable[str] = (), prefer=WEIGHT_KEYS
) -> nn.Module:
    """Load a checkpoint file (any layout, read weights-only) or loaded object into ``model``.

    Loading is strict: every key and shape must match (see :func:`check_state_dict`).
    """
    obj = read_tensor_file(source) if isinstance(source, str | os.PathLike) else source
    sd = check_state_dict(model, extract_state_dict(obj, prefer), ignore)
    model.load_state_dict(sd, strict=True)
    return model
