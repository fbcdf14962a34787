"""From tokens to pictures: decoding through an ImageTokenizer, uint8 conversion, grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ccalign.models import families
from ccalign.tokenizers.base import ImageTokenizer


def check_tokenizer(tokenizer: ImageTokenizer, seq_len: int, vocab_size: int) -> None:
    """Raise when the tokenizer cannot decode a model's tokens (length or codebook mismatch).

    A tokenizer decodes ``grid ** 2`` tokens, or ``seq_len`` when it has one (VAR's multi-scale
    VQVAE: every scale's codes)."""
    grid = tokenizer.grid
    length = getattr(tokenizer, "seq_len", grid**2)
    if length != seq_len:
        shape = f"{grid}x{grid} = {length}" if length == grid**2 else f"{length}"
        raise ValueError(
            f"the tokenizer decodes {shape} tokens per image but the model samples {seq_len}; "
            "use the tokenizer the model was trained with"
        )
    if tokenizer.vocab_size < vocab_size:
        raise ValueError(
            f"the model samples codes up to {vocab_size - 1} but the tokenizer has only "
            f"{tokenizer.vocab_size}; use the tokenizer the model was trained with"
        )


#: how decoded images become 8 bits (the official samplers differ)
UINT8_ROUNDING = ("round", "floor")


def to_uint8(images: Tensor, rounding: str = "round") -> Tensor:
    """Images (B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8.

    "round": LlamaGen's samplers, clamp(127.5 x + 128) truncated (x to the nearest level);
    "floor": VAR's samplers, 255 (clamp(x) + 1) / 2 truncated."""
    x = images.float()
    if rounding == "floor":
        x = (x.clamp(-1.0, 1.0) + 1.0) * 0.5 * 255.0
    elif rounding == "round":
        x = torch.clamp(127.5 * x + 128.0, 0, 255)
    else:
        raise ValueError(f"rounding {rounding!r}: choose one of {', '.join(UINT8_ROUNDING)}")
    return x.permute(0, 2, 3, 1).to(torch.uint8)


def decode_tokens(
    tokenizer: ImageTokenizer,
    tokens: Tensor,
    *,
    size: int | None = None,
    batch_size: int = 64,
    rounding: str = "round",
) -> np.ndarray:
    """Tokens (B, N) -> uint8 images (B, H, W, C); ``size`` resizes bicubically (384 -> 256);
    ``rounding`` as :func:`to_uint8`."""
    device = _tokenizer_device(tokenizer)
    pieces = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            images = tokenizer.decode(tokens[start : start + batch_size].to(device)).float()
            if size is not None and images.shape[-1] != size:
                images = F.interpolate(images, size=(size, size), mode="bicubic")
            pieces.append(to_uint8(images, rounding).cpu().numpy())
    return np.concatenate(pieces)


def image_grid(
    images: np.ndarray | Sequence[np.ndarray], nrow: int | None = None, padding: int = 2
) -> Image.Image:
    """uint8 images (B, H, W, C) tiled into one picture, ``nrow`` per row (default: square-ish)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (B, H, W, C); got {images.dtype} {images.shape}")
    count, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    canvas = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8
    )
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        canvas[top : top + h, left : left + w] = image
    return to_pil(canvas)


def to_pil(image: np.ndarray) -> Image.Image:
    """One uint8 (H, W, C) array as a PIL image (grey when C == 1)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _tokenizer_device(tokenizer: ImageTokenizer) -> torch.device:
    if isinstance(tokenizer, torch.nn.Module):
        for tensor in tokenizer.parameters():
            return tensor.device
        for tensor in tokenizer.buffers():
            return tensor.device
    return torch.device("cpu")


def sample_grid(
    model_or_sampler,
    tokenizer: ImageTokenizer,
    labels: Tensor | Sequence[int],
    *,
    nrow: int | None = None,
    size: int | None = None,
    seed: int | None = None,
    **sampling,
) -> Image.Image:
    """Sample one image per label and return them tiled in one picture (handy in a notebook).

    ``model_or_sampler``: a model of any family or its sampler; ``sampling`` takes the sampler's
    ``generate`` settings (cfg_scale, top_k, ...); ``seed`` makes the picture reproducible.
    """
    sampler = model_or_sampler
    if isinstance(sampler, torch.nn.Module):
        sampler = families.of(sampler).sampler(sampler)
    check_tokenizer(tokenizer, sampler.seq_len, sampler.model.vocab_size)
    if seed is not None:
        sampling["generator"] = torch.Generator(sampler.device).manual_seed(seed)
    tokens = sampler.generate(labels, **sampling)
    return image_grid(decode_tokens(tokenizer, tokens, size=size), nrow=nrow)
