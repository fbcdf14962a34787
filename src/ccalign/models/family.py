"""The model-family interface: everything the generic layers may ask of a family of AR models.

A family (LlamaGen, VAR, one of your own) is one object implementing :class:`ModelFamily`,
registered with :func:`ccalign.models.families.register`. The trainer, the memory plan, the
sampling command, ``export`` and the demo hold models only through it: they ask
``families.of(model)`` or ``families.identify(spec)`` and never compare family names.

Its models follow :class:`ConditionalModel`: ``model(conditions, tokens)`` is the sequence
log-likelihood that every method differentiates, and ``type(model)(model.config)`` rebuilds the
architecture. :class:`BaseFamily` implements what most families share (the ccalign
safetensors format with the config in its metadata, class-label conditions, the common
sampling options); a family subclasses it and adds its own.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ccalign import hub
from ccalign.conditions import ClassLabels, ConditionKind
from ccalign.io import PathLike, atomic_save_safetensors, open_safetensors, read_tensor_file


@runtime_checkable
class ConditionalModel(Protocol):
    """What a family's model offers to the methods, the trainer and the samplers."""

    config: Any  # a dataclass with ``to_dict()``; ``type(model)(config)`` rebuilds the model
    layers: nn.ModuleList  # the blocks (activation checkpointing and FSDP wrap each one)
    seq_len: int  # tokens per image
    vocab_size: int
    num_classes: int
    null_class: int

    def forward(self, conditions: Any, tokens: Tensor) -> Tensor:
        """(B,) sequence log-likelihoods log p(tokens | conditions)."""

    def num_parameters(self) -> int:
        """Trainable architecture parameters, as the family's papers count them."""


@dataclass(frozen=True)
class ModelSpec:
    """What to build or load, in words every family reads the same way."""

    init: str | None = None  # a file, registry name or hf:// URI; None: a fresh model
    preset: str | None = None  # a preset of the family ("GPT-L", "VAR-d16") or "custom"
    arch: Mapping[str, Any] = field(default_factory=dict)  # config overrides
    options: Mapping[str, Any] = field(default_factory=dict)  # the family's own keys
    family: str | None = None  # None: from the registry entry, the file or the preset


@dataclass(frozen=True)
class Dtypes:
    """Storage of weights and reference, whether the forward runs in bf16, where masks live."""

    weights: torch.dtype = torch.float32
    reference: torch.dtype = torch.float32
    autocast: bool = True  # bf16 autocast of the matrix products
    device_type: str = "cuda"  # dropout masks: bool (1 byte) on CUDA, the tensor's dtype on CPU

    @property
    def weight_bytes(self) -> int:
        return self.weights.itemsize

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the matrix products' outputs."""
        if self.autocast or self.weights.itemsize < 4:
            return 2
        return self.weights.itemsize

    def mask_bytes(self, tensor_bytes: int) -> int:
        return 1 if self.device_type == "cuda" else tensor_bytes


#: positions per chunk of the vocabulary projection (the models' ``forward`` default)
LOGIT_CHUNK = 4096
#: bytes of the CPU generator state that each checkpointed call keeps to replay its dropout
RNG_STATE = 5056


@dataclass(frozen=True)
class Activations:
    """What one micro-batch adds: ``saved`` for backward, ``workspace`` for the peak transient."""

    saved: int
    workspace: int


@dataclass
class LogitMix:
    """A request to score mixed logits ``weight * l + (1 - weight) * stopgrad(other)`` (GFT).

    ``weight`` (B,) per row; ``other_hidden`` (B, N, D) the final hidden states of a second
    pass, projected chunk by chunk with the detached output head; ``combine(logits,
    other_logits, targets, weight)`` gives the per-token log-probabilities (the method's own
    math, ``ccalign.align.gft_token_logprobs``). Models with the ``beta_embedding`` capability
    accept it in ``forward(..., mix=)``.
    """

    weight: Tensor
    other_hidden: Tensor
    combine: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

    def flat(self, batch: int, n: int) -> tuple[Tensor, Tensor]:
        """(B * N,) weights and (B * N, D) hidden states, row-major like the flattened tokens."""
        if self.weight.shape != (batch,) or self.other_hidden.shape[:2] != (batch, n):
            raise ValueError(
                f"LogitMix needs weight ({batch},) and other_hidden ({batch}, {n}, D); got "
                f"{tuple(self.weight.shape)} and {tuple(self.other_hidden.shape)}"
            )
        weight = self.weight.to(at_least_float32(self.other_hidden.dtype)).repeat_interleave(n)
        return weight, self.other_hidden.detach().reshape(batch * n, -1)


@dataclass(frozen=True)
class SamplingOption:
    """A flag a family adds to ``ccalign sample``, and the ``generate`` setting it gives.

    ``setting`` None: an option of the sampler or the model (``--compile``, ``--grid``), read by
    the family itself. ``always``: the setting is passed (and recorded) even at its default.
    """

    flags: tuple[str, ...]
    argparse: Mapping[str, Any]  # add_argument keywords; "default" is what "not given" means
    setting: str | None = None
    always: bool = False

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")

    @property
    def default(self) -> Any:
        return self.argparse.get("default", False if "action" in self.argparse else None)

    def given(self, args: argparse.Namespace) -> bool:
        return getattr(args, self.dest) != self.default


@dataclass(frozen=True)
class OwnGuidance:
    """A family's own guidance number besides ccalign's scale, as its users run it (VAR's cfg:
    a ramp over the scales), so reports can compare with the guidance a family is known by."""

    setting: str  # the ``generate`` keyword that takes the number ("official_cfg")
    label: str  # how reports name it ("VAR ramp cfg")
    key: str  # a short word for row names ("varcfg")


class Sampler(Protocol):
    """A family's sampler: one image's tokens per condition, reusable across batches."""

    model: nn.Module
    device: torch.device
    seq_len: int

    def generate(self, conditions: Any, *, generator: torch.Generator | None = None,
                 **settings: Any) -> Tensor:
        """(B, seq_len) int64 tokens on ``device``."""

    def release(self) -> None:
        """Free caches between calls."""


class ModelFamily(Protocol):
    """One family of models: files, building, sampling, memory and what it can train."""

    name: str  # the registry word ("llamagen", "var"), also in files and registry entries
    title: str  # for messages and reports ("LlamaGen", "VAR")
    model_class: type[nn.Module]
    presets: Mapping[str, Mapping[str, Any]]
    official_suffix: str  # the official layout's file suffix (".pt", ".pth")
    options: tuple[str, ...]  # the ModelSpec.options keys it reads ("grid", "vae")
    capabilities: frozenset[str]  # what it offers ("beta_embedding", "retokenize", "own_tokenizer")
    lora_targets: tuple[str, ...]  # default LoRA target layers
    lora_excluded: tuple[str, ...]  # linear layers the forward applies by weight
    sampling_options: tuple[SamplingOption, ...]  # its own flags of ``ccalign sample``
    own_guidance: OwnGuidance | None  # its own guidance number, where it has one
    text_encoder: str | None  # captioned families: the encoder of their captions (Hub name)

    def recognizes(self, path: PathLike) -> bool:
        """Whether a file holds a model of this family (ccalign metadata or official keys)."""

    def config_for(self, spec: ModelSpec) -> Any:
        """The architecture ``spec`` describes, without reading any weights."""

    def build(self, spec: ModelSpec) -> nn.Module:
        """A fresh model (its own init); runs under ``torch.device("meta")`` too."""

    def load(self, spec: ModelSpec, *, codec: Any = None) -> nn.Module:
        """The model of ``spec.init``, loaded strictly; ``codec`` is a loaded tokenizer."""

    def save(self, model: nn.Module, path: PathLike, *, official: bool = False) -> None:
        """Write atomically: ccalign safetensors, or the official layout."""

    def load_tokenizer(self, source: PathLike, config: Any) -> Any:
        """The image tokenizer at ``source``, sized for models of ``config``."""

    def codec_for(self, spec: ModelSpec, purpose: str) -> Any:
        """The tokenizer the model of ``spec`` was trained with, loaded (``purpose`` names who
        needs it, for the error when the spec does not say)."""

    def load_with_tokenizer(self, spec: ModelSpec, tokenizer: PathLike | None) -> tuple:
        """(model, tokenizer or None): the model of ``spec.init`` and the tokenizer that decodes
        its tokens, in the order the family needs them (VAR builds its model with it)."""

    def condition(self, model: nn.Module) -> ConditionKind:
        """The kind of condition the model takes."""

    def token_grid(self, model: nn.Module) -> int:
        """Tokens per side of the (last) token grid, as code files record it."""

    def describe(self, model: nn.Module) -> str:
        """A few words on the geometry ("grid 24", "680 tokens")."""

    def sampler(self, model: nn.Module, **options: Any) -> Sampler:
        """The family's sampler over ``model`` (device=, dtype=, inplace=, ...)."""

    def sampling_settings(self, args: argparse.Namespace) -> dict:
        """``generate`` settings from ``ccalign sample``'s options; refuses what it lacks."""

    def activations(
        self, model: nn.Module, rows: int, dtypes: Dtypes, checkpointing: bool
    ) -> Activations:
        """Bytes autograd saves for ``rows`` sequences, and the peak transient."""

    def missing(self, capability: str) -> str:
        """Why the family lacks ``capability`` (for refusals)."""


class ConfigSizes:
    """The sizes every consumer (trainer, sampler, data validation) reads off a model, all
    from its ``config``; a model class lists this base first."""

    config: Any

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def null_class(self) -> int:
        """Index of the learned unconditional class (class dropout, CFG's second branch)."""
        return self.config.null_class


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions and float32, float64 for float64: the dtype of precise sums."""
    return torch.promote_types(dtype, torch.float32)


#: ``ccalign sample`` options every family takes (guidance in ccalign's convention, filters)
COMMON_SAMPLING = ("cfg_scale", "top_k", "top_p")


class BaseFamily:
    """Shared parts of a family: the ccalign safetensors format, specs read from presets or a
    file's recorded config, class labels, the common sampling options.

    A subclass sets the class attributes of :class:`ModelFamily` plus ``config_class`` (a
    dataclass with ``to_dict``) and implements ``sampler`` and ``activations``; the rest has
    defaults here that a family overrides where its files or specs say more (an official layout,
    a grid, a VQVAE).
    """

    config_class: type
    official_suffix = ".pt"
    options: tuple[str, ...] = ()
    capabilities: frozenset[str] = frozenset()
    lora_targets: tuple[str, ...] = ()
    lora_excluded: tuple[str, ...] = ()
    sampling_options: tuple[SamplingOption, ...] = ()
    own_guidance: OwnGuidance | None = None
    text_encoder: str | None = None
    #: capability -> why this family lacks it (the default reason is generic)
    lacks: Mapping[str, str] = {}

    @property
    def metadata_key(self) -> str:
        """The safetensors metadata key that holds the config ("ccalign.<name>.config")."""
        return f"ccalign.{self.name}.config"

    def config_from_file(self, path: PathLike) -> Any | None:
        """The config a ccalign safetensors file of this family records, or None.

        A damaged ``.safetensors`` file raises ValueError naming it.
        """
        if not str(path).endswith(".safetensors") or not Path(path).is_file():
            return None
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
        if self.metadata_key not in meta:
            return None
        try:
            return self.make_config(json.loads(meta[self.metadata_key]), where=str(path))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{path} records an architecture ccalign cannot build ({exc}); the file is "
                "damaged or from a newer ccalign"
            ) from None

    def recognizes(self, path: PathLike) -> bool:
        return self.config_from_file(path) is not None

    def config_for(self, spec: ModelSpec) -> Any:
        """A ccalign file's recorded config, else the spec's preset; ``arch`` overrides."""
        path = local_file(spec.init)
        recorded = self.config_from_file(path) if path is not None else None
        if recorded is not None:
            return self.make_config({**recorded.to_dict(), **spec.arch})
        if spec.preset not in self.presets and spec.preset != "custom":
            raise ValueError(
                f"{spec.preset!r} is not a {self.title} preset; choose one of "
                f"{sorted(self.presets)} or 'custom' with model.arch"
            )
        return self.make_config({**self.presets.get(spec.preset, {}), **spec.arch})

    def make_config(self, values: dict, where: str = "model.arch") -> Any:
        """The family's config from plain values (a preset, a file's record, ``model.arch``):
        unknown keys, wrong types and numbers out of range are refused by name."""
        from ccalign.settings import build_table

        return build_table(where, values, self.config_class)

    def build(self, spec: ModelSpec) -> nn.Module:
        """A fresh model of the spec's architecture (the model class's own init)."""
        return self.model_class(self.config_for(spec))

    def load(self, spec: ModelSpec, *, codec: Any = None) -> nn.Module:
        """The model of a ccalign safetensors file, loaded strictly."""
        from ccalign.io import read_safetensors
        from ccalign.weights import load_weights

        path = hub.resolve(spec.init, kind="model")
        if self.config_from_file(path) is None:
            raise ValueError(
                f"{path} is not a ccalign {self.title} file (its metadata records no "
                f"{self.metadata_key}); save models of this family with its save()"
            )
        model = self.build(ModelSpec(init=str(path), arch=spec.arch))
        weights = with_tied_weights(path, read_safetensors(path))
        return load_weights(keep_float64(model, weights), weights)

    def load_tokenizer(self, source: PathLike, config: Any) -> Any:
        """The image tokenizer file at ``source`` (``ccalign.tokenizers.load``)."""
        from ccalign import tokenizers

        return tokenizers.load(source)

    def save(self, model: nn.Module, path: PathLike, *, official: bool = False) -> None:
        if official:
            self.save_official(model, path)
            return
        state, tied = untied_state(model)
        meta = {self.metadata_key: json.dumps(model.config.to_dict())}
        if tied:
            meta[TIED_KEY] = json.dumps(tied)
        atomic_save_safetensors(state, path, metadata=meta)

    def save_official(self, model: nn.Module, path: PathLike) -> None:
        raise ValueError(f"{self.title} models have no official layout: save as safetensors")

    def condition(self, model: nn.Module) -> ConditionKind:
        return ClassLabels(model.num_classes)

    def describe(self, model: nn.Module) -> str:
        return f"({model.seq_len} tokens)"

    def token_grid(self, model: nn.Module) -> int:
        return round(model.seq_len**0.5)

    def missing(self, capability: str) -> str:
        return self.lacks.get(capability, f"{self.title} models have no {capability}")

    def sampling_settings(self, args: argparse.Namespace) -> dict:
        """The common settings, and those of the family's own options that apply."""
        settings = {name: getattr(args, name) for name in COMMON_SAMPLING}
        for option in self.sampling_options:
            if option.setting is not None and (option.always or option.given(args)):
                settings[option.setting] = getattr(args, option.dest)
        return settings

    def sampler_options(self, args: argparse.Namespace) -> dict:
        """The sampler's own options from ``ccalign sample``'s flags (none by default)."""
        return {}

    def check_sampling(self, model: nn.Module | None, settings: dict) -> None:
        """Refuse settings the family (``model`` None: before loading) or the loaded model
        cannot sample with, before any work; each message starts with the setting's name."""

    def codec_for(self, spec: ModelSpec, purpose: str) -> Any:
        raise ValueError(f"{purpose}: {self.title} models name no tokenizer of their own")

    def load_with_tokenizer(self, spec: ModelSpec, tokenizer: PathLike | None) -> tuple:
        """The model first (a file is checked before anything else is read), then the
        tokenizer sized for it."""
        model = self.load(spec)
        if tokenizer is None:
            return model, None
        return model, self.load_tokenizer(tokenizer, model.config)


#: safetensors metadata of a model with tied weights: {key: the key whose tensor it shares}
TIED_KEY = "ccalign.tied_weights"


def untied_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (safetensors refuses shared memory: a
    transformers LM head tied to its embedding), and {dropped key: the key it shares}."""
    state: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, tensor in model.state_dict().items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if where in first:
            tied[key] = first[where]
        else:
            first[where] = key
            state[key] = tensor.detach().cpu()
    return state, tied


def with_tied_weights(path: PathLike, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` of a ccalign file with its tied keys back, each the tensor it shares."""
    with open_safetensors(path) as f:
        tied = json.loads((f.metadata() or {}).get(TIED_KEY, "{}"))
    return {**weights, **{key: weights[kept] for key, kept in tied.items() if kept in weights}}


def spec_release(spec: ModelSpec) -> hub.Release | None:
    """The registry entry ``spec.init`` names, or None."""
    return hub.find(spec.init) if spec.init is not None else None


def official_keys(path: PathLike) -> set[str]:
    """The weight names of a torch file, under any container ("model", "ema", ...), read
    memory-mapped (only the index); empty for safetensors and unreadable files."""
    from ccalign.weights import extract_state_dict

    if str(path).endswith(".safetensors") or not Path(path).is_file():
        return set()
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return set(extract_state_dict(loaded))
    except Exception:  # noqa: BLE001 - an unreadable file is simply not recognised here
        return set()


def keep_float64(model: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """``model`` with float64 parameters when the file stores its parameters in float64 (an fp64
    run's), so that loading them loses nothing; otherwise unchanged. Parameters the model keeps
    in float32 (its ``float32_parameters`` prefixes: VAR's frozen quantiser) stay float32."""
    kept = tuple(getattr(model, "float32_parameters", ()))
    names = [name for name, _ in model.named_parameters() if not (kept and name.startswith(kept))]
    stored = [weights[name] for name in names if name in weights]
    if stored and all(t.dtype == torch.float64 for t in stored):
        for name, param in model.named_parameters():
            if name in names:
                param.data = param.data.double()
    return model


def local_file(init: str | None) -> Path | None:
    """``init`` as an existing local file, else None (registry names resolve through the hub)."""
    if init is None or hub.find(init) is not None or not Path(init).is_file():
        return None
    return Path(init)


def unrecorded_architecture(path: PathLike, advice: str) -> ValueError:
    """The error for a file that does not say its architecture: what the file is, when it is
    something other than a model (a tokenizer, LoRA adapters, a training checkpoint), else
    ``advice`` on what to give with it."""
    other = other_kind_of_file(Path(path))
    if other is not None:
        return ValueError(f"{path} is {other}")
    return ValueError(f"{path} does not record its architecture: {advice}")


def other_kind_of_file(path: Path) -> str | None:
    """What a weights file holds when it is not a model, in words that say what to give."""
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        from ccalign.tokenizers.files import METADATA_KEY as TOKENIZER_KEY

        with open_safetensors(path) as f:
            meta, keys = f.metadata() or {}, list(f.keys())
        if TOKENIZER_KEY in meta:
            return "an image tokenizer, not a model: give it as --tokenizer (data.tokenizer)"
        if any("lora_A" in key for key in keys):
            return (
                "LoRA adapters alone (final_lora.safetensors), not a model: give the run's "
                "final.safetensors, which holds the adapters merged into the base model"
            )
        return None
    state = read_tensor_file(path)
    if isinstance(state, dict) and {"step", "optimizer", "model"} <= state.keys():
        return (
            f"a training checkpoint (step {state['step']}: the state to resume from), not a "
            "model: give the run's final.safetensors, or continue the run with --resume"
        )
    weights = state.get("model", state) if isinstance(state, dict) else {}
    if isinstance(weights, dict) and any(str(k).startswith("quantize.") for k in weights):
        return "an image tokenizer (a VQ's weights), not a model: give it as --tokenizer"
    return None
