"""LlamaGen class-conditional GPT, numerically the released model, readable top to bottom.

State-dict keys and shapes are those of the released c2i checkpoints, so official weights load
strictly. Layout of the sequence: position 0 holds the class embedding, position t >= 1 holds
image token t-1; the output at position t predicts image token t.

With ``beta_embedding`` (GFT, thu-ml/GFT), the class token also gets an embedding of a scalar
beta in [0, 1] (``t_embedder``, the released GFT checkpoints' keys); rows with the null class
get beta 1. ``beta=None`` adds nothing, as the released GFT model does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ccalign.conditions import ClassLabels
from ccalign.models.family import ConfigSizes, LogitMix, at_least_float32
from ccalign.settings import check_fields, ranged


class TransformerShape:
    """Sizes derived from a LlamaGen config's fields (dim, n_head, multiple_of, grid), shared by
    the class- and the text-conditional configs."""

    dim: int
    n_head: int
    multiple_of: int
    grid: int

    def check_heads(self) -> None:
        if self.dim % self.n_head or (self.dim // self.n_head) % 2:
            raise ValueError(
                f"dim {self.dim} must be n_head ({self.n_head}) times an even head width (RoPE "
                "rotates pairs of channels); e.g. dim 768 with 12 heads"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class LlamaGenConfig(TransformerShape):
    """Hyper-parameters of one LlamaGen GPT (defaults: the released c2i models' shared values)."""

    dim: int = ranged(768, ge=1, le=65536)
    n_layer: int = ranged(12, ge=1, le=1000)
    n_head: int = ranged(12, ge=1, le=4096)
    grid: int = ranged(16, ge=1, le=1024)  # image tokens per side: N = grid ** 2
    vocab_size: int = ranged(16384, ge=2, le=2**24)
    num_classes: int = ranged(1000, ge=1, le=10**7)
    rope_base: float = ranged(10000.0, gt=0, le=1e12)
    norm_eps: float = ranged(1e-5, gt=0, le=1)
    multiple_of: int = ranged(256, ge=1, le=65536)
    token_dropout: float = ranged(0.1, ge=0, lt=1)
    resid_dropout: float = ranged(0.1, ge=0, lt=1)
    ffn_dropout: float = ranged(0.1, ge=0, lt=1)
    attn_dropout: float = ranged(0.0, ge=0, lt=1)
    init_std: float = ranged(0.02, ge=0, le=10)
    beta_embedding: bool = False  # GFT: the class token gets an embedding of beta (t_embedder)

    def __post_init__(self):
        check_fields(self)
        self.check_heads()

    @property
    def null_class(self) -> int:
        """Index of the learned unconditional class (class dropout and CFG's second branch)."""
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}


def build(
    name: str = "custom",
    *,
    grid: int,
    num_classes: int = 1000,
    vocab_size: int = 16384,
    **overrides,
) -> LlamaGen:
    """Build a LlamaGen GPT by preset name ("GPT-B" .. "GPT-3B") or "custom" (give dim, ...).

    ``grid`` is image_size / 16 for the released VQ-16 models: 16 at 256 px, 24 at 384 px.
    """
    if name != "custom" and name not in PRESETS:
        raise ValueError(
            f"unknown LlamaGen model {name!r}; choose one of {sorted(PRESETS)} or 'custom'"
        )
    sizes = dict(PRESETS.get(name, {}))
    sizes.update(overrides)
    missing = {"dim", "n_layer", "n_head"} - sizes.keys()
    if missing:
        raise ValueError(f"a custom LlamaGen model needs {sorted(missing)}")
    config = LlamaGenConfig(grid=grid, num_classes=num_classes, vocab_size=vocab_size, **sizes)
    return LlamaGen(config)


Beta = float | Tensor | None


def _beta_rows(beta: float | Tensor, labels: Tensor, null_class: int) -> Tensor:
    """Beta per row as float32 (B,), 1 on rows with the null class (as GFT trains them)."""
    beta = torch.as_tensor(beta, dtype=torch.float32, device=labels.device)
    if beta.dim() == 0:
        beta = beta.expand(labels.shape[0])
    if beta.shape != labels.shape:
        raise ValueError(
            f"beta must be a number or one value per row ({labels.shape[0]},); got shape "
            f"{tuple(beta.shape)}"
        )
    return torch.where(labels == null_class, 1.0, beta.float())


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in float32 (float64 for a float64 model), cast back,
    times a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(at_least_float32(x.dtype))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_2d_table(
    grid: int, head_dim: int, base: float, cls_positions: int = 1, width: int | None = None
) -> Tensor:
    """(cls_positions + grid * width, head_dim/2, 2) table of (cos, sin); class positions are all
    zero. ``width`` (default ``grid``): tokens per row of a grid that is not square.

    Cell (r, c) gets the angles [r * freqs, c * freqs] with freqs = 1 / base^(k/half), k = 0, 2,
    ..., written as the official expression: base^(-k/half) differs in the last float32 bit.
    """
    width = grid if width is None else width
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    rows = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # (grid, half/2)
    cols = torch.outer(torch.arange(width, dtype=torch.float32), freqs)  # (width, half/2)
    angles = torch.cat(
        [rows[:, None, :].expand(grid, width, -1), cols[None, :, :].expand(grid, width, -1)],
        dim=-1,
    ).reshape(grid * width, half)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(cls_positions, half, 2), table], dim=0)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate pairs (x[2m], x[2m+1]) of x (B, S, H, hd) by the table rows (S, hd/2, 2)."""
    xf = x.to(at_least_float32(x.dtype)).reshape(*x.shape[:-1], -1, 2)
    cos = table[None, :, None, :, 0]
    sin = table[None, :, None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values (B, H, S, hd), written at given positions; never saved."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        batch = k.shape[0]
        self.k[:batch].index_copy_(2, positions, k.to(self.k.dtype))
        self.v[:batch].index_copy_(2, positions, v.to(self.v.dtype))
        return self.k[:batch], self.v[:batch]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: Tensor, rope: Tensor, positions: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        if self.kv_cache is not None and positions is not None:
            return self._forward_cached(x, rope, positions, mask)
        b, s, d = x.shape
        q, k, v = self.wqkv(x).split(d, dim=-1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(b, s, self.n_head, self.head_dim), rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v.view(b, s, self.n_head, self.head_dim)))
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, d)))

    def _forward_cached(self, x: Tensor, rope: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """Generation step through the KV cache with few kernels (the per-step cost at small batch).

        ``rope`` is (2, S, hd): cos and signed sin spread over the interleaved pairs, so rotating
        q and k together is x * cos + swap_pairs(x) * sin (what ``apply_rope`` computes).
        """
        b, s, d = x.shape
        qkv = self.wqkv(x).view(b, s, 3, self.n_head, self.head_dim)
        qk = qkv[:, :, :2].to(at_least_float32(x.dtype))
        swapped = qk.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        cos, sin = rope[:, :, None, None, :]
        q, k = (qk * cos + swapped * sin).to(x.dtype).transpose(1, 3).unbind(2)
        k, v = self.kv_cache.update(positions, k, qkv[:, :, 2].transpose(1, 2))
        k, v, mask = k.to(q.dtype), v.to(q.dtype), mask.to(q.dtype)
        if q.is_cuda:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = _few_query_attention(q, k, v, mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, d)))


def _few_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v as three batched products: on CPU much cheaper than
    SDPA's kernel for the one or few queries of a decoding step. ``mask`` is (1, 1, S, keys),
    or (B, 1, S, keys) for masks that differ per row (captions)."""
    b, h, s, hd = q.shape
    keys = k.shape[2]
    if mask.shape[0] > 1:  # per-row masks broadcast over the heads
        scores = torch.matmul(q, k.mT) * hd**-0.5 + mask
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(weights, v)
    scores = torch.baddbmm(
        mask.reshape(-1, s, keys), q.reshape(b * h, s, hd), k.reshape(b * h, keys, hd).mT,
        alpha=hd**-0.5,
    )
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(weights, v.reshape(b * h, keys, hd)).view(b, h, s, hd)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, rope: Tensor, positions=None, mask=None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, positions, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedding(nn.Module):
    """num_classes + 1 rows: the last row is the learned null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


#: sinusoidal features of GFT's beta input, and the scale of beta before them (as released)
BETA_FEATURES = 256
BETA_SCALE = 1000.0
BETA_MAX_PERIOD = 10000.0


def sinusoidal_features(t: Tensor, features: int = BETA_FEATURES) -> Tensor:
    """(B,) -> float32 (B, features): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half)."""
    half = features // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(BETA_MAX_PERIOD) * exponent)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class BetaEmbedding(nn.Module):
    """GFT's beta input: sinusoidal features of 1000 * beta -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(BETA_FEATURES, dim), nn.SiLU(), nn.Linear(dim, dim))

    def reset_parameters(self, std: float) -> None:
        """N(0, std) first weight, zero biases, zero second layer: the embedding starts at 0."""
        nn.init.normal_(self.mlp[0].weight, std=std)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, beta: Tensor) -> Tensor:
        features = sinusoidal_features(BETA_SCALE * beta)
        return self.mlp(features.to(self.mlp[0].weight.dtype))

    def released(self, beta: float, rows: int) -> Tensor:
        """(rows, D) embeddings of one ``beta`` as GFT's released sampler computes them: beta,
        1000 beta and the sinusoid all in the weights' dtype (bf16 there), the frequencies made
        on the CPU (thu-ml/GFT LlamaGen/autoregressive/models/gpt.py:286-291,409-411)."""
        weight = self.mlp[0].weight
        dtype, device = weight.dtype, weight.device
        scaled = torch.ones(rows, dtype=dtype, device=device) * beta * BETA_SCALE
        half = BETA_FEATURES // 2
        exponent = -math.log(BETA_MAX_PERIOD) * torch.arange(half, dtype=dtype) / half
        args = scaled[:, None] * torch.exp(exponent).to(device)[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LlamaGen(ConfigSizes, nn.Module):
    """Class-conditional next-token image model; ``forward`` returns sequence log-likelihoods."""

    # set by setup_kv_cache: additive causal mask over the cache, rotary tables for generation
    kv_mask: Tensor | None = None
    kv_rope: Tensor | None = None

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = ClassEmbedding(config.num_classes, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.t_embedder = BetaEmbedding(config.dim) if config.beta_embedding else None
        rope = rope_2d_table(config.grid, config.head_dim, config.rope_base)
        self.register_buffer("rope", rope, persistent=False)
        self.reset_parameters()

    @property
    def condition_kind(self) -> ClassLabels:
        return ClassLabels(self.config.num_classes)

    @property
    def prefix_len(self) -> int:
        """Positions before the first image token's input: the class token."""
        return 1

    @property
    def positions(self) -> int:
        """Sequence positions of a teacher-forced pass: the class token and N - 1 tokens."""
        return self.seq_len

    @property
    def accepts_beta(self) -> bool:
        """Whether the model takes GFT's beta input (it has the beta embedding)."""
        return self.t_embedder is not None

    def reset_parameters(self) -> None:
        """LlamaGen's init: N(0, 0.02) for linear and embedding weights, zero output head."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.output.weight)
        if self.t_embedder is not None:
            self.t_embedder.reset_parameters(self.config.init_std)

    # ---- teacher-forced path ----
    def _class_token(self, labels: Tensor, beta: Beta, beta_numerics: str = "training") -> Tensor:
        """Class embeddings (B, D), plus the beta embedding when ``beta`` is given (GFT).

        ``beta_numerics`` "released": GFT's released sampler's (see ``BetaEmbedding.released``;
        null-class rows get the same beta there, not 1)."""
        cls = self.cls_embedding(labels)
        if beta is None:
            return cls
        if self.t_embedder is None:
            raise ValueError(
                "beta was given but this model has no beta embedding (it is not a GFT model): "
                "pass beta=None, or build/load it with beta_embedding=True"
            )
        if beta_numerics == "released":
            return cls + self.t_embedder.released(float(beta), labels.shape[0]).to(cls.dtype)
        if beta_numerics != "training":
            raise ValueError(f"beta numerics {beta_numerics!r}: 'training' or 'released'")
        beta = _beta_rows(beta, labels, self.null_class)
        return cls + self.t_embedder(beta).to(cls.dtype)

    def _embed(self, labels: Tensor, tokens: Tensor, beta: Beta = None) -> Tensor:
        """[class token; embeddings of tokens[:, :-1]] -> (B, N, D)."""
        cls = self._class_token(labels, beta)[:, None, :]
        h = torch.cat([cls, self.tok_embeddings(tokens[:, :-1])], dim=1)
        return self.tok_dropout(h)

    def hidden_states(self, labels: Tensor, tokens: Tensor, beta: Beta = None) -> Tensor:
        """Final normalised hidden states (B, N, D); position t predicts token t."""
        self._check_inputs(labels, tokens)
        h = self._embed(labels, tokens, beta)
        rope = self.rope[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope)
        return self.norm(h)

    def logits(self, labels: Tensor, tokens: Tensor, beta: Beta = None) -> Tensor:
        """Teacher-forced float32 logits (B, N, V) (float64 for a float64 model); position t
        predicts ``tokens[:, t]``."""
        logits = self.output(self.hidden_states(labels, tokens, beta))
        return logits.to(at_least_float32(logits.dtype))

    def forward(
        self,
        labels: Tensor,
        tokens: Tensor,
        chunk_rows: int = 4096,
        *,
        beta: Beta = None,
        mix: LogitMix | None = None,
        hidden: bool = False,
    ) -> Tensor:
        """Sequence log-likelihood (B,) = sum_t log p(tokens[:, t] | tokens[:, :t], label).

        The vocabulary projection runs in chunks of ``chunk_rows`` token positions and is
        recomputed in the backward pass, so peak memory holds one chunk of logits, not B x N x V.
        ``beta``: GFT's beta input (a float or (B,)); ``mix``: score GFT's mixed logits instead
        (see ``LogitMix``); ``hidden=True`` returns the final hidden states (B, N, D) instead.
        Both go through ``forward`` so that DDP and FSDP hooks run.
        """
        if hidden:
            return self.hidden_states(labels, tokens, beta)
        return self.token_logprobs(labels, tokens, chunk_rows, beta=beta, mix=mix).sum(dim=1)

    sequence_logprob = forward

    def token_logprobs(
        self,
        labels: Tensor,
        tokens: Tensor,
        chunk_rows: int = 4096,
        *,
        beta: Beta = None,
        mix: LogitMix | None = None,
    ) -> Tensor:
        """Per-token log-probabilities (B, N) of the given tokens, computed chunk by chunk."""
        hidden = self.hidden_states(labels, tokens, beta)
        return chunked_logprobs(hidden, tokens, self.output.weight, chunk_rows, mix)

    def _check_inputs(self, labels: Tensor, tokens: Tensor) -> None:
        if tokens.dim() != 2 or labels.dim() != 1 or labels.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"expected labels (B,) and tokens (B, N); got {tuple(labels.shape)} and "
                f"{tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.seq_len:
            raise ValueError(
                f"{tokens.shape[1]} tokens per image but the model's grid holds {self.seq_len} "
                f"({self.config.grid}x{self.config.grid}); build the model with the matching grid"
            )

    # ---- cached generation path (used by ccalign.sample) ----
    def setup_kv_cache(
        self, batch: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Allocate a static KV cache for ``batch`` rows and the full sequence (class + N).

        Any ``batch' <= batch`` rows can then be decoded; the cache tensors never move, so a CUDA
        graph captured over them stays valid until the next ``setup_kv_cache``. On GPU the length
        is padded to a multiple of 16 (masked keys) so attention kernels get aligned rows.
        """
        install_kv_cache(self, batch, dtype, device)

    def clear_kv_cache(self) -> None:
        remove_kv_cache(self)

    def forward_cached(self, x: Tensor, positions: Tensor) -> Tensor:
        """Run embeddings ``x`` (B, S, D) at sequence ``positions`` (S,) through the cache.

        Returns float32 logits (B, S, V). Each position attends to all cached positions <= itself.
        Shapes do not depend on the position, so the step can be captured in a CUDA graph.
        """
        if self.kv_mask is None:
            raise RuntimeError("call setup_kv_cache(batch) before prefill/decode")
        mask = self.kv_mask[positions][None, None]  # (1, 1, S, max_len) additive
        rope = self.kv_rope[:, positions]  # (2, S, head_dim)
        h = x
        for layer in self.layers:
            h = layer(h, rope, positions, mask)
        return self.output(self.norm(h)).float()

    def prefill(self, labels: Tensor, beta: Beta = None, beta_numerics: str = "training") -> Tensor:
        """Feed the class token at position 0; returns logits (B, V) for image token 0."""
        x = self._class_token(labels, beta, beta_numerics)[:, None, :]
        positions = torch.zeros(1, dtype=torch.long, device=labels.device)
        return self.forward_cached(x, positions)[:, -1]

    def decode(self, tokens: Tensor, position: Tensor) -> Tensor:
        """Feed tokens (B,) at sequence ``position`` (a (1,) tensor); logits (B, V) of the next."""
        x = self.tok_embeddings(tokens)[:, None, :]
        return self.forward_cached(x, position)[:, -1]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def interleaved_rope(table: Tensor) -> Tensor:
    """(S, hd/2, 2) (cos, sin) table -> float32 (2, S, hd): [cos, cos] and [-sin, sin] per pair."""
    cos, sin = table.float().unbind(-1)
    return torch.stack([cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)])


def causal_mask_table(max_len: int, dtype: torch.dtype, device=None) -> Tensor:
    """(max_len, max_len) additive mask, row i: 0 for keys <= i, -inf after.

    Additive rather than boolean: it is added straight into the scores, and SDPA's fast kernels
    take it as is (boolean masks send SDPA on CPU to a much slower kernel).
    """
    keys = torch.arange(max_len, device=device)
    visible = keys[None, :] <= keys[:, None]
    zeros = torch.zeros(max_len, max_len, dtype=dtype, device=device)
    return zeros.masked_fill(~visible, float("-inf"))


def install_kv_cache(model: nn.Module, batch: int, dtype=None, device=None) -> int:
    """Give every block of ``model`` (a LlamaGen GPT, class- or caption-conditioned) a KV cache
    of ``batch`` rows for its whole sequence (``prefix_len + seq_len`` positions, padded to a
    multiple of 16 on GPU: aligned rows for the attention kernels, the padding masked), and the
    model its causal mask and rotary tables for generation; returns the cache length."""
    cfg, ref = model.config, model.output.weight
    device = torch.device(device or ref.device)
    multiple = 16 if device.type == "cuda" else 1
    max_len = -(-(model.prefix_len + model.seq_len) // multiple) * multiple
    for layer in model.layers:
        layer.attention.kv_cache = KVCache(batch, cfg.n_head, max_len, cfg.head_dim,
                                           dtype or ref.dtype, device)
    model.kv_mask = causal_mask_table(max_len, ref.dtype, device)
    model.kv_rope = interleaved_rope(model.rope).to(device)
    return max_len


def remove_kv_cache(model: nn.Module) -> None:
    """Drop what :func:`install_kv_cache` gave the model."""
    for layer in model.layers:
        layer.attention.kv_cache = None
    model.kv_mask = model.kv_rope = None


def chunked_logprobs(
    hidden: Tensor, tokens: Tensor, weight: Tensor, chunk_rows: int, mix: LogitMix | None = None
) -> Tensor:
    """Per-token log-probabilities (B, N) of ``tokens`` under the head ``weight`` applied to
    ``hidden`` (B, N, D), ``chunk_rows`` positions at a time, each chunk recomputed in backward
    (GFT's ``mix``: its mixed logits instead)."""
    b, n, d = hidden.shape
    flat_h, flat_t = hidden.reshape(b * n, d), tokens.reshape(b * n)
    extra = () if mix is None else mix.flat(b, n)
    combine = () if mix is None else (mix.combine,)
    pieces = []
    for start in range(0, b * n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        args = (flat_h[rows], flat_t[rows], weight, *(x[rows] for x in extra), *combine)
        if torch.is_grad_enabled() and args[0].requires_grad:
            pieces.append(checkpoint(chunk_logprob, *args, use_reentrant=False))
        else:
            pieces.append(chunk_logprob(*args))
    return torch.cat(pieces).view(b, n)


def chunk_logprob(
    h: Tensor,
    targets: Tensor,
    weight: Tensor,
    mix_weight: Tensor | None = None,
    other_hidden: Tensor | None = None,
    combine=None,
) -> Tensor:
    precise = at_least_float32(h.dtype)
    logits = F.linear(h, weight).to(precise)
    if other_hidden is not None:
        other = F.linear(other_hidden.to(h.dtype), weight.detach()).to(precise)
        return combine(logits, other, targets, mix_weight)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
