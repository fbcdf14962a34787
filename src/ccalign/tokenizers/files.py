"""Tokenizer files: ccalign safetensors (config in the metadata), LlamaGen's official .pt and
VAR's multi-scale VQVAE .pth (recognised by its keys)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ccalign.hub import resolve
from ccalign.io import PathLike, atomic_save_safetensors, open_safetensors, read_tensor_file
from ccalign.tokenizers import var_vq
from ccalign.tokenizers.llamagen_vq import (
    PRESETS,
    VQConfig,
    VQModel,
    config_from_state_dict,
    preset_name,
)
from ccalign.weights import check_state_dict, extract_state_dict

METADATA_KEY = "ccalign.tokenizer"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: The small VQ trained on Fashion-MNIST that ships with the package (see docs/assets.md).
FMNIST_VQ_PATH = ASSETS / "fmnist_vq.safetensors"
#: The small multi-scale VQ of the VAR demo (scales 1, 2, 3, 5, 7; see docs/assets.md).
FMNIST_MSVQ_PATH = ASSETS / "fmnist_msvq.safetensors"
ALIASES = {"fmnist-vq": FMNIST_VQ_PATH, "fmnist-msvq": FMNIST_MSVQ_PATH}
#: Where LlamaGen's trainer keeps the weights of a VQ checkpoint, in order of preference. Its
#: samplers decode with ``checkpoint["model"]``, so the GPTs were trained on codes of those
#: weights; "ema" is only a fallback for files without "model".
OFFICIAL_WEIGHT_KEYS = ("model", "ema")


def save(model: VQModel | var_vq.VarVQ, path: PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a tokenizer as safetensors with its config as metadata, atomically.

    ``dtype`` (e.g. ``torch.float16``) stores floating tensors at that precision to keep small
    assets small; :func:`load` always returns float32 weights.
    """
    if isinstance(model, var_vq.VarVQ):
        return var_vq.save(model, path, dtype)
    sd = model.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    meta = {METADATA_KEY: json.dumps({"kind": "vq", "config": json.loads(model.config.to_json())})}
    return atomic_save_safetensors(sd, path, metadata=meta)


def load(
    path: PathLike, name: str | None = None, *, image_size: int | None = None
) -> VQModel | var_vq.VarVQ:
    """Load a tokenizer from a file, detecting its kind from the contents.

    A ccalign ``.safetensors`` file carries its config. LlamaGen's official ``.pt`` (weights
    under "model", else "ema", or a raw state_dict) is read weights-only by key names and
    shapes; a damaged or unsafe file raises ValueError naming it. Give ``name``
    ("VQ-16", "VQ-8") to insist on that architecture and ``image_size`` (default 256) for the
    grid the sampler should assume. ``"fmnist-vq"`` names the bundled Fashion-MNIST tokenizer;
    registry names (``llamagen-vq16``, ``var-vae``) and ``hf://`` URIs come through
    :mod:`ccalign.hub`. The model is returned in eval mode on the CPU. VAR's VQVAE
    (vae_ch160v4096z32.pth, or a ccalign file of one) loads as a multi-scale
    :class:`~ccalign.tokenizers.var_vq.VarVQ`; ``image_size`` 512 selects VAR's 512 px scales.
    """
    path = resolve_file(path)
    if var_vq.metadata_config(path) is not None:
        return var_vq.load(path, image_size=image_size)
    config = _config_from_metadata(path)
    sd = _state_dict(path, official=config is None)
    if config is None and var_vq.is_var_vq_state_dict(sd):
        return var_vq.from_state_dict(sd, path, image_size=image_size)
    if config is None:
        config = _official_config(sd, name, image_size or 256, path)
    elif image_size is not None:
        config = VQConfig(**{**json.loads(config.to_json()), "image_size": image_size})
    model = VQModel(config)
    sd = check_state_dict(model, sd)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


def resolve_file(path: PathLike) -> Path:
    """The tokenizer file a path, bundled alias, registry name or hf:// URI stands for."""
    if str(path) in ALIASES and not Path(path).exists():
        path = ALIASES[str(path)]
        if not Path(path).exists():
            raise FileNotFoundError(
                f"the bundled tokenizer {path} is missing; rebuild it with "
                "`ccalign train-tokenizer` (the command is in docs/assets.md)"
            )
    path = resolve(path, kind="tokenizer")
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (give a LlamaGen vq_ds16_c2i.pt, a ccalign "
            f".safetensors tokenizer, one of {sorted(ALIASES)}, a registry name such as "
            "llamagen-vq16 (`ccalign models`) or hf://owner/repo/file)"
        )
    return path


def _config_from_metadata(path: Path) -> VQConfig | None:
    if path.suffix != ".safetensors":
        return None
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        return None
    record = json.loads(meta[METADATA_KEY])
    if record.get("kind") != "vq":
        raise ValueError(f"{path} holds a tokenizer of unknown kind {record.get('kind')!r}")
    return VQConfig(**record["config"])


def _state_dict(path: Path, official: bool) -> dict[str, torch.Tensor]:
    obj = read_tensor_file(path)
    prefer = OFFICIAL_WEIGHT_KEYS if official else ()
    return extract_state_dict(obj, prefer=prefer)


def _official_config(sd: dict, name: str | None, image_size: int, path: Path) -> VQConfig:
    inferred = config_from_state_dict(sd, image_size=image_size)
    if name is None:
        return inferred
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(PRESETS)}")
    if preset_name(inferred) != name:
        raise ValueError(
            f"{path} is not a {name} tokenizer: its weights have codebook "
            f"{inferred.codebook_size}x{inferred.codebook_embed_dim}, ch {inferred.ch}, "
            f"ch_mult {list(inferred.ch_mult)} (that is {preset_name(inferred) or 'no preset'})"
        )
    return inferred
