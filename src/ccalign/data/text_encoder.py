"""Captions to text-encoder features, as LlamaGen's T2I pipeline makes them (transformers' T5).

LlamaGen encodes captions with FLAN-T5-XL's encoder (``language/t5.py``): the tokenizer pads to
``model_max_length`` 120 and truncates, the encoder's last hidden state is the feature. For its
T2I models the features are then left-padded (``sample_t2i.py``: each row's real tokens moved to
the end, the mask flipped) and padded slots zeroed. Captions are lower-cased and stripped (the
T5Embedder's path without its ftfy / HTML clean-up, which plain prompts do not need).

The encoder comes from a local folder in transformers' format or a Hub name (huggingface_hub's
cache and offline flags apply); nothing else is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ccalign.conditions import CaptionBatch
from ccalign.errors import UserError

DEFAULT_ENCODER = "google/flan-t5-xl"
CAPTION_TOKENS = 120


def normalize(caption: str) -> str:
    """What the encoder reads: the caption lower-cased and stripped."""
    return caption.lower().strip()


def left_pad(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded (B, L, C) features and (B, L) mask -> left-padded, padded features zero:
    each row's first n (real) slots moved to its end, as LlamaGen's sampler does."""
    counts = mask.sum(dim=1)
    length = mask.shape[1]
    order = (torch.arange(length)[None, :] + counts[:, None].cpu()) % length
    order = order.to(features.device)
    moved = torch.gather(features, 1, order[..., None].expand_as(features))
    flipped = mask.to(torch.bool).flip(1)
    return moved * flipped[..., None].to(moved.dtype), flipped


class TextEncoder:
    """A transformers T5 encoder and its tokenizer; ``encode(captions)`` -> CaptionBatch."""

    def __init__(
        self,
        source: str | Path = DEFAULT_ENCODER,
        *,
        length: int = CAPTION_TOKENS,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise UserError(
                "encoding captions needs transformers: pip install 'ccalign[text]'"
            ) from None
        self.source, self.length, self.device = str(source), length, torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            model = T5EncoderModel.from_pretrained(self.source)
        except OSError as exc:
            raise UserError(
                f"text encoder {self.source!r} could not be loaded ({_first_line(exc)}): give a "
                "folder in transformers' format, or a Hub name that is cached here (or "
                "reachable)"
            ) from None
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> CaptionBatch:
        """Left-padded features (B, length, dim) float32 and their masks."""
        tokens = self.tokenizer(
            [normalize(c) for c in captions], max_length=self.length, padding="max_length",
            truncation=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        features, flipped = left_pad(hidden, mask)
        return CaptionBatch.of(features.cpu(), flipped.cpu())

    def encode_batches(self, captions: Sequence[str], batch_size: int) -> Iterator[CaptionBatch]:
        for start in range(0, len(captions), batch_size):
            yield self.encode(captions[start : start + batch_size])


def open_text_encoder(source: str | Path = DEFAULT_ENCODER, *, length: int = CAPTION_TOKENS,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The caption encoder ``source`` names: a model whose family builds its own prompts
    (``prompt_encoder``: Janus' processor) when it is one, else a transformers T5 encoder."""
    family = _prompt_family(str(source))
    if family is not None:
        return family.prompt_encoder(str(source), length=length)
    return TextEncoder(source, length=length, device=device, dtype=dtype)


def _prompt_family(source: str):
    """The family of a model folder or registry name that encodes its own prompts, or None."""
    from ccalign import hub
    from ccalign.models import families
    from ccalign.models.family import ModelSpec

    if hub.find(source) is None and not Path(source).exists():
        return None
    family = families.identify(ModelSpec(init=source))
    return family if hasattr(family, "prompt_encoder") else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
