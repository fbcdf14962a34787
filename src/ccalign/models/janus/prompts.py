"""Captions to Janus prompts, as transformers builds them for image generation.

Each caption goes through the checkpoint's chat template as a user turn with the generation
prompt ("<|User|>: {caption}\\n\\n<|Assistant|>:"), then the processor in image mode, which
adds BOS and ``<begin_of_image>``; rows are left-padded with the pad token to ``length`` tokens
(0: the longest caption of the call). Too long a prompt is refused, not cut: cutting would drop
its ``<begin_of_image>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ccalign.conditions import CaptionBatch
from ccalign.errors import UserError


class JanusPrompts:
    """A Janus checkpoint's processor; ``encode(captions)`` -> CaptionBatch of token ids."""

    dim = 0  # token ids, not features

    def __init__(self, source: str, *, length: int = 0, **_):
        from transformers import AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(source)
        except OSError as exc:
            raise UserError(f"the processor of {source!r} could not be loaded "
                            f"({str(exc).splitlines()[0]}): give the Janus model's folder or a "
                            "cached Hub name") from None
        self.source, self.length = source, length

    def prompt(self, caption: str) -> str:
        turn = [{"role": "user", "content": [{"type": "text", "text": caption.strip()}]}]
        return self.processor.apply_chat_template(turn, add_generation_prompt=True)

    def encode(self, captions: Sequence[str]) -> CaptionBatch:
        """Left-padded prompt ids (B, length) and their masks."""
        texts = [self.prompt(c) for c in captions]
        plain = self.processor(text=texts, generation_mode="image", padding=True,
                               return_tensors="pt")
        longest = plain["input_ids"].shape[1]
        if self.length and longest > self.length:
            raise ValueError(f"a prompt takes {longest} tokens, more than --length "
                             f"{self.length}: raise --length")
        ids, mask = plain["input_ids"], plain["attention_mask"].to(torch.bool)
        if self.length > longest:
            pad = self.length - longest
            ids = torch.cat([ids.new_full((len(texts), pad), self.pad_id), ids], dim=1)
            mask = torch.cat([mask.new_zeros(len(texts), pad), mask], dim=1)
        return CaptionBatch.of(ids, mask)

    @property
    def pad_id(self) -> int:
        return self.processor.tokenizer.pad_token_id

    def encode_batches(self, captions: Sequence[str], batch_size: int) -> Iterator[CaptionBatch]:
        for start in range(0, len(captions), batch_size):
            yield self.encode(captions[start : start + batch_size])
