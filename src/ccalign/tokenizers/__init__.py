"""Image tokenizers: LlamaGen's VQ-16 / VQ-8, a small trainable VQ and VAR's multi-scale VQVAE
(:mod:`ccalign.tokenizers.var_vq`, codes of every scale), one interface for all.

``load(path)`` reads any tokenizer file (see :func:`ccalign.tokenizers.files.load`);
``build(name)`` makes an untrained one: "VQ-16", "VQ-8" (LlamaGen) or "small" (28x28 grey ->
7x7 codes). Every tokenizer is an :class:`ImageTokenizer`: ``encode(images) -> codes``,
``decode(codes) -> images`` with images in [-1, 1] and codes in raster order.
"""

from __future__ import annotations

from ccalign.tokenizers.base import ImageTokenizer
from ccalign.tokenizers.files import FMNIST_VQ_PATH, load, save
from ccalign.tokenizers.llamagen_vq import PRESETS, VQConfig, VQModel
from ccalign.tokenizers.llamagen_vq import build as build_llamagen
from ccalign.tokenizers.small_vq import build_small

NAMES = (*PRESETS, "small")


def build(name: str, **overrides) -> VQModel:
    """An untrained tokenizer by name: "VQ-16", "VQ-8" or "small"; overrides change its config."""
    if name == "small":
        return build_small(**overrides)
    if name in PRESETS:
        return build_llamagen(name, **overrides)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {list(NAMES)}")


__all__ = [
    "FMNIST_VQ_PATH", "NAMES", "ImageTokenizer", "VQConfig", "VQModel", "build", "load", "save",
]
