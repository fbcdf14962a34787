"""LlamaGen's text-to-image GPT, numerically the released model, readable top to bottom.

State-dict keys and shapes are those of the released T2I checkpoints (peizesun/llamagen_t2i),
so official weights load strictly. The condition is a caption of ``caption_len`` (120)
text-encoder features (FLAN-T5-XL: 2048 wide), projected by an MLP (fc1, tanh-GELU, fc2, no
biases) into the first ``caption_len`` positions; image token t-1 sits at position
``caption_len + t - 1`` and the output there predicts image token t. Captions are left-padded
(real tokens last). The attention mask is causal, hides padded caption tokens from every query,
and keeps the diagonal, so a padded position attends to itself (LlamaGen's dataset and
``generate()`` build it so). The null caption is a learned (buffered) embedding of the same
shape, taken by rows flagged null; they keep their row's mask. Caption positions get an all-zero
rotary table, as the official model pads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ccalign.conditions import CaptionBatch, Captions
from ccalign.models.family import ConfigSizes, at_least_float32
from ccalign.models.llamagen.model import (
    Block,
    RMSNorm,
    TransformerShape,
    chunked_logprobs,
    install_kv_cache,
    remove_kv_cache,
    rope_2d_table,
)
from ccalign.settings import check_fields, ranged


@dataclass(frozen=True)
class LlamaGenT2IConfig(TransformerShape):
    """Hyper-parameters of one LlamaGen T2I GPT (defaults: the released models' shared values)."""

    dim: int = ranged(1280, ge=1, le=65536)
    n_layer: int = ranged(36, ge=1, le=1000)
    n_head: int = ranged(20, ge=1, le=4096)
    grid: int = ranged(16, ge=1, le=1024)  # image tokens per side: 16 at 256 px, 32 at 512 px
    # tokens per row when the image is not square (0: square, ``grid``); rows stay ``grid``
    grid_width: int = ranged(0, ge=0, le=1024)
    vocab_size: int = ranged(16384, ge=2, le=2**24)
    caption_len: int = ranged(120, ge=1, le=65536)  # text tokens (T5's model_max_length)
    caption_dim: int = ranged(2048, ge=1, le=65536)  # text-encoder width (FLAN-T5-XL)
    rope_base: float = ranged(10000.0, gt=0, le=1e12)
    norm_eps: float = ranged(1e-5, gt=0, le=1)
    multiple_of: int = ranged(256, ge=1, le=65536)
    token_dropout: float = ranged(0.1, ge=0, lt=1)
    resid_dropout: float = ranged(0.1, ge=0, lt=1)
    ffn_dropout: float = ranged(0.1, ge=0, lt=1)
    attn_dropout: float = ranged(0.0, ge=0, lt=1)
    init_std: float = ranged(0.02, ge=0, le=10)

    def __post_init__(self):
        check_fields(self)
        self.check_heads()

    @property
    def width(self) -> int:
        """Image tokens per row."""
        return self.grid_width or self.grid

    @property
    def seq_len(self) -> int:
        return self.grid * self.width

    def to_dict(self) -> dict:
        return asdict(self)


class CaptionEmbedding(nn.Module):
    """Caption features (B, L, C) -> (B, L, D); rows flagged null take the null caption."""

    def __init__(self, caption_len: int, caption_dim: int, dim: int):
        super().__init__()
        self.cap_proj = nn.Sequential()  # named fc1 / fc2 as the released keys
        self.cap_proj.add_module("fc1", nn.Linear(caption_dim, dim, bias=False))
        self.cap_proj.add_module("act", nn.GELU(approximate="tanh"))
        self.cap_proj.add_module("fc2", nn.Linear(dim, dim, bias=False))
        null = torch.randn(caption_len, caption_dim) / caption_dim**0.5
        self.register_buffer("uncond_embedding", null)

    def forward(self, captions: CaptionBatch) -> Tensor:
        weight = self.cap_proj.fc1.weight
        features = captions.features.to(weight.dtype)
        null = self.uncond_embedding.to(weight.dtype).expand_as(features)
        return self.cap_proj(torch.where(captions.null[:, None, None], null, features))


def attention_mask(caption_mask: Tensor, length: int) -> Tensor:
    """bool (B, 1, S, S): causal, padded caption keys hidden, the diagonal kept (S = length)."""
    b, captions = caption_mask.shape
    positions = torch.arange(length, device=caption_mask.device)
    causal = positions[None, :] <= positions[:, None]
    visible_keys = torch.ones(b, length, dtype=torch.bool, device=caption_mask.device)
    visible_keys[:, :captions] = caption_mask
    mask = causal[None] & visible_keys[:, None, :]
    return (mask | torch.eye(length, dtype=torch.bool, device=mask.device))[:, None]


class LlamaGenT2I(ConfigSizes, nn.Module):
    """Caption-conditional next-token image model; ``forward`` returns sequence log-likelihoods."""

    # set by setup_kv_cache: additive causal mask over the cache, the rows' additive caption
    # masks (B, caption_len), rotary tables for generation
    kv_mask: Tensor | None = None
    kv_caption: Tensor | None = None
    kv_rope: Tensor | None = None

    def __init__(self, config: LlamaGenT2IConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = CaptionEmbedding(config.caption_len, config.caption_dim, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        rope = rope_2d_table(
            config.grid, config.head_dim, config.rope_base, config.caption_len, config.width
        )
        self.register_buffer("rope", rope, persistent=False)
        self.reset_parameters()

    @property
    def condition_kind(self) -> Captions:
        return Captions(self.config.caption_len, self.config.caption_dim)

    @property
    def prefix_len(self) -> int:
        """Positions before the first image token's input: the caption."""
        return self.config.caption_len

    @property
    def positions(self) -> int:
        """Sequence positions of a teacher-forced pass: the caption and N - 1 image tokens."""
        return self.config.caption_len + self.seq_len - 1

    @property
    def num_classes(self) -> int:
        return 0  # conditioned on captions, not classes

    def reset_parameters(self) -> None:
        """LlamaGen's init: N(0, 0.02) for linear and embedding weights, zero output head."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.output.weight)

    # ---- teacher-forced path ----
    def hidden_states(self, captions: CaptionBatch, tokens: Tensor) -> Tensor:
        """Final normalised hidden states (B, N, D) of the image positions; position t
        predicts token t."""
        self._check_inputs(captions, tokens)
        prefix = self.cls_embedding(captions)
        h = self.tok_dropout(torch.cat([prefix, self.tok_embeddings(tokens[:, :-1])], dim=1))
        mask = attention_mask(captions.mask, h.shape[1])
        rope = self.rope[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope, mask=mask)
        return self.norm(h[:, self.config.caption_len - 1 :])

    def logits(self, captions: CaptionBatch, tokens: Tensor) -> Tensor:
        """Teacher-forced float32 logits (B, N, V); position t predicts ``tokens[:, t]``."""
        logits = self.output(self.hidden_states(captions, tokens))
        return logits.to(at_least_float32(logits.dtype))

    def forward(
        self, captions: CaptionBatch, tokens: Tensor, chunk_rows: int = 4096, *,
        hidden: bool = False,
    ) -> Tensor:
        """Sequence log-likelihood (B,) = sum_t log p(tokens[:, t] | tokens[:, :t], caption);
        the vocabulary projection runs in recomputed chunks of ``chunk_rows`` positions.
        ``hidden=True`` returns the final hidden states (B, N, D) instead."""
        if hidden:
            return self.hidden_states(captions, tokens)
        return self.token_logprobs(captions, tokens, chunk_rows).sum(dim=1)

    def token_logprobs(self, captions: CaptionBatch, tokens: Tensor,
                       chunk_rows: int = 4096) -> Tensor:
        """Per-token log-probabilities (B, N) of the given tokens, computed chunk by chunk."""
        hidden = self.hidden_states(captions, tokens)
        return chunked_logprobs(hidden, tokens, self.output.weight, chunk_rows)

    def _check_inputs(self, captions: CaptionBatch, tokens: Tensor) -> None:
        cfg = self.config
        if captions.features.shape[1:] != (cfg.caption_len, cfg.caption_dim):
            raise ValueError(
                f"caption features are {tuple(captions.features.shape[1:])} per row but the model "
                f"takes ({cfg.caption_len}, {cfg.caption_dim}): encode the captions with the "
                "model's text encoder and length"
            )
        if tokens.dim() != 2 or tokens.shape[0] != len(captions) or tokens.shape[1] > self.seq_len:
            raise ValueError(
                f"expected tokens (B, <= {self.seq_len}) for {len(captions)} captions; got "
                f"{tuple(tokens.shape)}"
            )

    # ---- cached generation path (used by ccalign.sample) ----
    def setup_kv_cache(
        self, batch: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Allocate a static KV cache for ``batch`` rows and the whole sequence (caption + N)."""
        max_len = install_kv_cache(self, batch, dtype, device)
        self.kv_caption = self.kv_mask.new_zeros(batch, max_len)

    def clear_kv_cache(self) -> None:
        remove_kv_cache(self)
        self.kv_caption = None

    def forward_cached(self, x: Tensor, positions: Tensor) -> Tensor:
        """Run embeddings ``x`` (B, S, D) at image positions ``positions`` (S,) through the
        cache: causal, with each row's hidden caption keys; float32 logits (B, S, V)."""
        if self.kv_mask is None:
            raise RuntimeError("call setup_kv_cache(batch) before prefill/decode")
        b = x.shape[0]
        mask = (self.kv_mask[positions][None] + self.kv_caption[:b, None, :])[:, None]
        return self._through_layers(x, positions, mask)

    def _through_layers(self, x: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        rope = self.kv_rope[:, positions]
        h = x
        for layer in self.layers:
            h = layer(h, rope, positions, mask)
        return self.output(self.norm(h)).float()

    def prefill(self, captions: CaptionBatch) -> Tensor:
        """Feed the captions at positions 0 .. L-1 (recording their masks for the decode steps);
        returns logits (B, V) for image token 0."""
        b, length = len(captions), self.prefix_len
        hidden = torch.zeros_like(self.kv_caption[:b, :length])
        self.kv_caption[:b, :length] = hidden.masked_fill(~captions.mask, float("-inf"))
        positions = torch.arange(length, device=captions.mask.device)
        visible = attention_mask(captions.mask, length)  # the diagonal for padded queries
        keys = self.kv_mask.shape[1]
        mask = torch.zeros(b, 1, length, keys, dtype=self.kv_mask.dtype, device=visible.device)
        mask[..., length:] = float("-inf")
        mask[..., :length] = mask[..., :length].masked_fill(~visible, float("-inf"))
        x = self.cls_embedding(captions)
        return self._through_layers(x, positions, mask)[:, -1]

    def decode(self, tokens: Tensor, position: Tensor) -> Tensor:
        """Feed tokens (B,) at sequence ``position`` (a (1,) tensor); logits (B, V) of the next."""
        x = self.tok_embeddings(tokens)[:, None, :]
        return self.forward_cached(x, position)[:, -1]

    def num_parameters(self) -> int:
        """Trainable parameters (the null caption is a buffer, as released)."""
        return sum(p.numel() for p in self.parameters())


def build(name: str = "custom", *, grid: int, **overrides) -> LlamaGenT2I:
    """A T2I GPT by preset name ("GPT-XL" for the released models, any LlamaGen size) or
    "custom" (give dim, n_layer, n_head)."""
    from ccalign.models.llamagen.model import PRESETS

    if name != "custom" and name not in PRESETS:
        raise ValueError(f"unknown LlamaGen model {name!r}; choose one of {sorted(PRESETS)}")
    sizes = {**PRESETS.get(name, {}), **overrides}
    missing = {"dim", "n_layer", "n_head"} - sizes.keys()
    if missing:
        raise ValueError(f"a custom LlamaGen T2I model needs {sorted(missing)}")
    return LlamaGenT2I(LlamaGenT2IConfig(grid=grid, **sizes))

