"""The registry of model families: which family a model, a file, a preset or a spec belongs to.

LlamaGen (class-conditional and T2I), VAR and Janus register here on import; a family of your
own joins with :func:`register` (see ``examples/own_family.py``). The generic layers ask :func:`of`,
:func:`get` or :func:`identify` and hold the answer through the
:class:`~ccalign.models.family.ModelFamily` interface.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ccalign import hub
from ccalign.io import PathLike
from ccalign.models import janus, llamagen, var
from ccalign.models.family import ModelFamily, ModelSpec, unrecorded_architecture

_REGISTRY: dict[str, ModelFamily] = {}
#: the family of a spec that nothing else identifies (a fresh "custom" model, an official
#: LlamaGen file the index could not be read from)
DEFAULT = llamagen.FAMILY.name
_REQUIRED = ("name", "title", "model_class", "presets", "options", "capabilities", "load",
             "build", "save", "config_for", "recognizes", "sampler", "activations", "condition")


def register(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry (again: a no-op); its name must be new."""
    missing = [attr for attr in _REQUIRED if not hasattr(family, attr)]
    if missing:
        raise TypeError(
            f"{type(family).__name__} is not a model family: it lacks {', '.join(missing)} "
            "(subclass ccalign.models.family.BaseFamily)"
        )
    known = _REGISTRY.get(family.name)
    if known is not None and known is not family:
        raise ValueError(f"a model family named {family.name!r} is registered already")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family from the registry (a no-op for unknown names)."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    return list(_REGISTRY)


def all_families() -> list[ModelFamily]:
    return list(_REGISTRY.values())


def get(name: str) -> ModelFamily:
    """The family called ``name``; unknown names raise ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"no model family {name!r} is registered; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def of(model: nn.Module) -> ModelFamily:
    """The family of a model instance (FSDP's subclasses included)."""
    for family in _REGISTRY.values():
        if isinstance(model, family.model_class):
            return family
    raise ValueError(
        f"{type(model).__name__} is not a model of a registered family ({', '.join(_REGISTRY)}); "
        "register its family with ccalign.models.families.register"
    )


def of_file(path: PathLike) -> ModelFamily | None:
    """The family that recognises the file (its metadata, or an official layout's keys)."""
    for family in _REGISTRY.values():
        if family.recognizes(path):
            return family
    return None


def of_preset(name: str | None) -> ModelFamily | None:
    """The family whose presets include ``name`` ("GPT-L" -> LlamaGen, "VAR-d16" -> VAR)."""
    for family in _REGISTRY.values():
        if name in family.presets:
            return family
    return None


def identify(spec: ModelSpec) -> ModelFamily:
    """The family ``spec`` describes: its ``family``, the registry entry, the file, its preset,
    the family whose options it sets (only VAR reads a ``vae``), else the default (LlamaGen)."""
    if spec.family is not None:
        return get(spec.family)
    release = hub.find(spec.init) if spec.init is not None else None
    if release is not None:
        return _of_release(release)
    if spec.init is not None and Path(spec.init).exists():
        recognised = of_file(spec.init)
        if recognised is not None:
            return recognised
    by_preset = of_preset(spec.preset)
    if by_preset is not None:
        return by_preset
    given = {key for key, value in spec.options.items() if value is not None}
    for family in _REGISTRY.values():
        if given and given <= set(family.options):
            return family
    return get(DEFAULT)


def _of_release(release: hub.Release) -> ModelFamily:
    if release.family not in _REGISTRY:
        raise ValueError(
            f"{release.name} is a {release.title} checkpoint (family {release.family!r}), which "
            "this version of ccalign cannot load: no such family is registered"
        )
    return _REGISTRY[release.family]


def check_options(family: ModelFamily, spec: ModelSpec, where: str = "model.") -> None:
    """Refuse options ``family`` does not read (another family's), naming the key (``where``
    says how: "model." in a config, "--" on the command line)."""
    for key, value in spec.options.items():
        if value is not None and key not in family.options:
            raise ValueError(
                f"{where}{key} is not read by {family.title} models (it belongs to another "
                "family): remove it"
            )


def create(spec: ModelSpec, *, codec=None) -> nn.Module:
    """The model ``spec`` describes: loaded strictly from ``spec.init``, or built fresh."""
    family = identify(spec)
    check_options(family, spec)
    return family.load(spec, codec=codec) if spec.init is not None else family.build(spec)


def load_file(path: PathLike) -> nn.Module:
    """A ccalign safetensors model of whichever family its metadata records. Official files
    lack the architecture and are refused, naming what to give instead."""
    family = of_file(path)
    if family is None:
        raise ValueError(
            f"{path} does not record its model family: give a ccalign .safetensors model"
        )
    if family.config_from_file(path) is None:
        raise unrecorded_architecture(
            path, f"an official {family.title} file: give a ccalign .safetensors model, or "
            "load it with its family's load and preset"
        )
    return family.load(ModelSpec(init=str(path)))


def save(model: nn.Module, path: PathLike, *, official: bool = False) -> None:
    """Write ``model`` with its own family's ``save`` (ccalign safetensors or official layout)."""
    of(model).save(model, path, official=official)


register(llamagen.FAMILY)
register(llamagen.T2I_FAMILY)
register(var.FAMILY)
register(janus.FAMILY)
