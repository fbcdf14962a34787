"""LoRA fine-tuning through peft: adapters on the policy, the reference is the same network.

``add_adapters`` injects peft LoRA layers into the model in place (``peft.LoraModel``): the
base weights are frozen, only the adapters train, and B starts at zero so the adapted model
equals the base exactly at step 0. The frozen reference (``BaseReference``) runs the very same
modules with every adapter switched off, so the weights exist once in memory. It calls the
model itself, never a DDP wrapper, and only under ``no_grad``.

Checkpoints hold the adapters only (the base comes from ``model.init``, checked by its
fingerprint). The final model is written merged (base + B A * alpha / rank, as peft merges) in
the normal layout, and the adapters alone in ``final_lora.safetensors`` (peft's key names).
peft is imported on first use: it pulls in transformers, which takes seconds.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ccalign.errors import UserError
from ccalign.models import families

ADAPTER = "default"
LORA_METADATA_KEY = "ccalign.lora.config"
_ADAPTER_PART = ".lora_"
_BASE_PART = ".base_layer."


def add_adapters(model: nn.Module, section, seed: int) -> nn.Module:
    """Inject LoRA adapters (A drawn from ``seed``, B = 0) into ``model``; returns the tuner.

    ``section.target_modules`` empty: the model family's default targets."""
    try:
        from peft import LoraConfig, LoraModel
    except ImportError as exc:
        raise UserError(
            "method.lora needs the peft package: pip install peft (or ccalign[lora])"
        ) from exc

    family = families.of(model)
    targets = list(section.target_modules) or list(family.lora_targets)
    check_targets(model, targets, family.lora_excluded)
    config = LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoraModel(model, config, ADAPTER)


def check_targets(model: nn.Module, targets: list[str], excluded: tuple[str, ...] = ()) -> None:
    """Refuse a target that names no adaptable linear layer, listing the ones there are;
    ``excluded``: layers the model applies by weight (its family's ``lora_excluded``)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    allowed = [n for n in names if n.rsplit(".", 1)[-1] not in excluded]
    for target in targets:
        if not any(_matches(name, target) for name in allowed):
            available = sorted({n.rsplit(".", 1)[-1] for n in allowed})
            raise ValueError(
                f"method.lora.target_modules: {target!r} matches no linear layer LoRA can adapt "
                f"in {type(model).__name__}; available: {available} (or a full name such as "
                f"{allowed[0]!r}); layers applied by weight ({', '.join(excluded)}) cannot be "
                "adapted"
            )


def _matches(name: str, target: str) -> bool:
    """peft's rule for a string target: the module's full name or its dotted suffix."""
    return name == target or name.endswith("." + target)


def is_adapter_key(key: str) -> bool:
    """Whether a state_dict key belongs to a LoRA adapter (lora_A / lora_B)."""
    return _ADAPTER_PART in key


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors (what checkpoints hold), keyed as in ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The frozen base weights under the model's own keys (shared storage, not copies)."""
    return {
        k.replace(_BASE_PART, "."): v
        for k, v in model.state_dict().items()
        if not is_adapter_key(k)
    }


def merged_state(model: nn.Module) -> dict[str, Tensor]:
    """Base weights with each adapter merged in (peft's delta B A * alpha / rank), new tensors."""
    from peft.tuners.lora import LoraLayer

    state = base_state(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                key = f"{name}.weight"
                state[key] = state[key] + module.get_delta_weight(ADAPTER)
    return state


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter tensors saved by ``adapter_state``; their keys must be exactly the model's."""
    expected, given = set(adapter_state(model)), set(state)
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise ValueError(
            f"the checkpoint's LoRA adapters do not fit this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); resume with the run's own method.lora settings"
        )
    model.load_state_dict(state, strict=False)


def save_adapters(tuner: nn.Module, path: str | Path) -> None:
    """Write the adapters alone (peft's key names) with their LoRA settings as metadata."""
    from peft import get_peft_model_state_dict

    from ccalign.io import atomic_save_safetensors

    state = get_peft_model_state_dict(tuner.model, adapter_name=ADAPTER)
    config = tuner.peft_config[ADAPTER]
    settings = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }
    atomic_save_safetensors(state, path, metadata={LORA_METADATA_KEY: json.dumps(settings)})


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapters of a ``save_adapters`` file into ``model`` (its base); the tuner."""
    from peft import LoraConfig, LoraModel, set_peft_model_state_dict

    from ccalign.io import open_safetensors

    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if LORA_METADATA_KEY not in meta:
        raise ValueError(f"{path} holds no ccalign LoRA adapters (no {LORA_METADATA_KEY})")
    tuner = LoraModel(model, LoraConfig(**json.loads(meta[LORA_METADATA_KEY])), ADAPTER)
    result = set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapters for layers this model lacks: {result.unexpected_keys}")
    return tuner


class BaseReference(nn.Module):
    """The policy's network with its adapters off: the frozen reference, sharing every weight.

    The model is held, not registered, so ``train()`` here sets the reference's own mode (used
    for its forward only) and leaves the policy's alone; ``state_dict`` is the base weights.
    """

    def __init__(self, tuner: nn.Module):
        super().__init__()
        object.__setattr__(self, "tuner", tuner)  # not a submodule: no second registration

    def forward(self, labels: Tensor, tokens: Tensor) -> Tensor:
        model = self.tuner.model
        with _adapters_off(self.tuner), _mode(model, self.training):
            return model(labels, tokens)

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        """The base weights (the reference's weights) under the plain model's keys."""
        return base_state(self.tuner.model)


@contextmanager
def _adapters_off(tuner: nn.Module):
    """Every adapter off inside (peft's disable/enable; the adapters stay trainable after)."""
    tuner.disable_adapter_layers()
    try:
        yield
    finally:
        tuner.enable_adapter_layers()


@contextmanager
def _mode(model: nn.Module, training: bool):
    """``model`` in train/eval mode inside; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was in modes:
            module.training = was
