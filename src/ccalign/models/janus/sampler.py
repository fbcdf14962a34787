"""Sampling a Janus model's image tokens: guidance-free at B rows, CFG as transformers does it.

transformers' ``generate(..., generation_mode="image")`` always runs 2B rows (the prompts and
their unconditional copies), whatever the guidance. Here the null rows run only when the scale
is not 1, so a model that needs no guidance samples at half the cost. Each step follows
``generate``: a static KV cache over [prompt; image tokens], the attention mask grown by one per
token, positions counting the prompt's pads; CFG mixes raw logits (uncond + (cond - uncond) x
scale), then temperature, top-k and top-p (transformers' warper order), then one draw per row.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ccalign.conditions import CaptionBatch
from ccalign.models.filtering import check_sampling_args, filter_logits, sample_categorical
from ccalign.models.generation import FiniteCheck, check_generator, eval_mode, resolve_device
from ccalign.models.guidance import check_scale, mix_guidance
from ccalign.models.janus.model import JanusImageModel


class JanusSampler:
    """Draws image tokens from a :class:`JanusImageModel`; reuse one for many batches.

    ``device`` defaults to the model's; ``dtype`` to bf16 on CUDA and the model's dtype
    elsewhere (a converted copy is kept unless ``inplace``).
    """

    def __init__(self, model: JanusImageModel, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, inplace: bool = False,
                 autocast: torch.dtype | None = None, **_: Any):
        if autocast is not None:
            raise ValueError("autocast: a Janus model samples in its weights' dtype; give the "
                             "weights' dtype instead (--weights-dtype bfloat16)")
        ref = next(model.parameters())
        self.device = resolve_device(device or ref.device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else ref.dtype)
        if all(p.device == self.device and p.dtype == self.dtype for p in model.parameters()):
            self.model = model
        else:
            self.model = (model if inplace else copy.deepcopy(model)).to(self.device, self.dtype)

    @property
    def seq_len(self) -> int:
        return self.model.seq_len

    def generate(self, prompts: CaptionBatch, *, cfg_scale: float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """(B, N) image tokens, one image per prompt. ``cfg_scale`` 1 is guidance-free (B rows),
        other values run the unconditional prompts beside (2B rows)."""
        check_sampling_args(temperature, top_k, top_p)
        if not isinstance(cfg_scale, int | float):
            raise ValueError("a Janus model takes one guidance scale for every token")
        check_scale(float(cfg_scale))
        check_generator(generator, self.device)
        kind = self.model.condition_kind
        if kind.size(prompts) == 0:
            raise ValueError("no prompts given: pass at least one")
        prompts = kind.to(prompts, self.device)
        guided = cfg_scale != 1.0
        rows = kind.cat([prompts, kind.null_like(prompts)]) if guided else prompts
        with torch.inference_mode(), eval_mode(self.model):
            tokens = self._sample(rows, len(prompts), float(cfg_scale), temperature, top_k,
                                  top_p, generator)
        return tokens.clone()  # a normal tensor: usable later in autograd (e.g. scoring)

    def _sample(self, rows: CaptionBatch, batch: int, scale: float, temperature: float,
                top_k: int, top_p: float, generator) -> Tensor:
        from transformers import StaticCache

        model, n = self.model, self.seq_len
        language = model.hf.language_model
        length = rows.features.shape[1]
        cache = StaticCache(config=language.config, max_cache_len=length + n)
        mask = torch.cat([rows.mask.long(), rows.mask.new_ones(len(rows), n).long()], dim=1)
        out = torch.empty(batch, n, dtype=torch.long, device=self.device)
        finite = FiniteCheck(self.device)
        inputs = model.prompt_embeddings(rows)
        for t in range(n):
            hidden = language(inputs_embeds=inputs, attention_mask=mask[:, : length + t],
                              cache=cache, use_cache=True).last_hidden_state[:, -1]
            logits = model.image_logits(hidden)
            cond = logits[:batch]
            if len(rows) > batch:
                cond = mix_guidance(cond, logits[batch:], scale)
            finite.add(cond)
            out[:, t] = sample_categorical(filter_logits(cond, temperature, top_k, top_p),
                                           generator)
            inputs = model.image_embeddings(out[:, t].repeat(len(rows) // batch)[:, None])
        finite.check(f"scale {scale:g}")
        return out

    def release(self) -> None:
        """Nothing is kept between calls (each builds its own cache)."""
