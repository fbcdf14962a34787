"""The one place that knows the model families: which module builds, loads and saves a model.

A family module (``ccalign.models.llamagen``, ``ccalign.models.var``) offers ``PRESETS``,
``build``, ``load``, ``save(model, path, official=)`` and ``config_from_file``. Consumers (the
trainer, ``ccalign export``, the memory plan) ask here instead of branching on the family.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from ccalign.models import llamagen, var

#: family name -> (module, model class)
FAMILIES: dict[str, tuple[ModuleType, type]] = {
    "llamagen": (llamagen, llamagen.LlamaGen),
    "var": (var, var.VAR),
}


def family_of(model: nn.Module) -> str:
    """The family of a model instance (FSDP's subclasses included)."""
    for name, (_, model_class) in FAMILIES.items():
        if isinstance(model, model_class):
            return name
    raise ValueError(
        f"{type(model).__name__} is not a model of a known family ({sorted(FAMILIES)})"
    )


def module_of(model: nn.Module) -> ModuleType:
    """The family module of a model instance (its ``save``, ``load``, ...)."""
    return FAMILIES[family_of(model)][0]


def family_of_file(path) -> str | None:
    """The family a ccalign safetensors file records in its metadata, "var" for an official
    VAR state_dict (it holds VAR's ``lvl_1L``), or None (LlamaGen's official files say nothing)."""
    for name, (module, _) in FAMILIES.items():
        if module.config_from_file(path) is not None:
            return name
    if str(path).endswith(".safetensors"):
        return None
    return "var" if VAR_MARKER in _torch_file_keys(path) else None


#: a key every official VAR file holds and no LlamaGen file does
VAR_MARKER = "lvl_1L"


def _torch_file_keys(path) -> set[str]:
    """Top-level keys of a torch file, memory-mapped (nothing read but the index); empty when
    it is not a memory-mappable weights-only dict."""
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not recognised here
        return set()
    return set(loaded) if isinstance(loaded, dict) else set()


def family_of_preset(name: str | None) -> str | None:
    """The family whose presets include ``name`` ("GPT-L" -> llamagen, "VAR-d16" -> var)."""
    for family, (module, _) in FAMILIES.items():
        if name in module.PRESETS:
            return family
    return None


def load_file(path) -> nn.Module:
    """A ccalign safetensors model of whichever family its metadata records. Official files
    lack the architecture: an official VAR file gets var.load's error asking for the preset,
    other files an error saying their family is unknown."""
    family = family_of_file(path)
    if family is None:
        raise ValueError(
            f"{path} does not record its model family: give a ccalign .safetensors model, or load "
            "an official file with ccalign.models.llamagen.load / var.load and its preset"
        )
    return FAMILIES[family][0].load(path)


def save(model: nn.Module, path, *, official: bool = False) -> None:
    """Write ``model`` with its own family's ``save`` (ccalign safetensors or official layout)."""
    module_of(model).save(model, path, official=official)
