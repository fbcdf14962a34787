"""Cached decoding through a Janus language model (transformers' Llama layers), one token a step.

gpt-fast's way over transformers' own modules: a static KV cache per layer, the attention mask
and rotary angles computed once per step and shared by every layer, projections, norms and MLPs
called as transformers' modules, attention by ``scaled_dot_product_attention``. Every shape is
fixed per row count, so a step can be captured in a CUDA graph or compiled.

Cache layout, ``room`` prompt slots then the N image slots: a prompt of L <= room tokens fills
slots room - L .. room - 1, so image token t always sits at slot room + t whatever the prompt's
length, while its rotary position is L + t, as transformers' ``generate`` counts it (every prompt
slot, pads included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: prompt slots are reserved in multiples of this (fewer re-allocations for varying prompts)
ROOM_STEP = 16


def room_for(length: int) -> int:
    """Prompt slots reserved for prompts of ``length`` tokens."""
    return -(-length // ROOM_STEP) * ROOM_STEP


class JanusKVCache:
    """Keys and values of every layer for ``rows`` rows, and which slots each row may attend."""

    def __init__(self, language: nn.Module, rows: int, room: int, image_tokens: int,
                 dtype: torch.dtype, device: torch.device):
        attn = language.layers[0].self_attn
        shape = (rows, language.config.num_key_value_heads, room + image_tokens, attn.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in language.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in language.layers]
        self.room = room
        self.visible = torch.zeros(rows, room + image_tokens, dtype=torch.bool, device=device)
        self.slots = torch.arange(room + image_tokens, device=device)
        self.shift = torch.zeros(1, dtype=torch.long, device=device)  # room - L of this batch

    def start(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Place a batch of prompts (their (B, L) mask); returns their slots (L,) and the
        prefill's attention mask (B, 1, L, room): causal, pads hidden, each query sees itself
        (a left pad sees nothing else, and a row of all-hidden keys would give NaN)."""
        b, length = mask.shape
        if length > self.room:
            raise ValueError(f"a prompt of {length} tokens does not fit the cache's {self.room} "
                             "prompt slots: set the cache up for it (setup_kv_cache)")
        first = self.room - length
        self.shift.fill_(first)
        self.visible[:b] = False
        self.visible[:b, first : self.room] = mask
        self.visible[:b, self.room :] = True
        slots = self.slots[first : self.room]
        causal = slots[None, :] <= slots[:, None]
        allowed = (causal & self.visible[:b, None, first : self.room]) | torch.eye(
            length, dtype=torch.bool, device=mask.device)
        full = torch.zeros(b, 1, length, self.room, dtype=torch.bool, device=mask.device)
        full[:, 0, :, first:] = allowed
        return slots, full

    def step_mask(self, rows: int, slot: Tensor) -> Tensor:
        """(rows, 1, 1, slots) mask of a token at ``slot`` (a (1,) tensor)."""
        return (self.visible[:rows] & (self.slots <= slot))[:, None, None, :]


def run_layers(language: nn.Module, cache: JanusKVCache, x: Tensor, slots: Tensor,
               mask: Tensor) -> Tensor:
    """Embeddings ``x`` (R, S, H) at cache ``slots`` (S,) through every layer, writing their keys
    and values and attending over the cache's first ``mask.shape[-1]`` slots; the final norm's
    output (R, S, H)."""
    rows, keys = x.shape[0], mask.shape[-1]
    positions = (slots - cache.shift)[None]  # rotary positions: slots counted from the prompt
    cos, sin = language.rotary_emb(x, position_ids=positions)
    cos, sin = cos[:, None], sin[:, None]
    for layer, k_cache, v_cache in zip(language.layers, cache.keys, cache.values, strict=True):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (rows, x.shape[1], -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_cache[:rows].index_copy_(2, slots, k.to(k_cache.dtype))
        v_cache[:rows].index_copy_(2, slots, v.to(v_cache.dtype))
        out = F.scaled_dot_product_attention(
            q, k_cache[:rows, :, :keys], v_cache[:rows, :, :keys], attn_mask=mask,
            scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1])
        x = x + attn.o_proj(out.transpose(1, 2).reshape(rows, x.shape[1], -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return language.norm(x)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama's rotary embedding: halves rotated, as transformers' ``apply_rotary_pos_emb``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
