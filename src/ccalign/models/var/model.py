"""VAR (next-scale prediction), numerically the released model, readable top to bottom.

The sequence holds the codes of every scale of the multi-scale VQVAE, coarsest first, raster
order within a scale: L = sum(pn^2) = 680 at 256 px. Teacher forcing: position 0 holds the class
embedding (the "sos" of scale 0); the positions of scale si + 1 hold word_embed(f_hat after
scales 0..si, area-downsampled to the side of scale si + 1); the output at a position predicts
the code there. Attention is block-causal: a position sees its own scale and every earlier one.
Each block is modulated by the class embedding (AdaLN).

Keys and shapes are those of the released ``var_d16.pth`` .. ``var_d36.pth`` (raw state_dicts),
so official weights load strictly. Two official keys hold no weights but follow from the scales:
``lvl_1L`` (each position's scale) and ``attn_bias_for_masking`` (the block-causal mask). They
are checked on load, rebuilt at each forward and written back in the official layout, but not
kept as state: the mask's -inf entries break finite-weight checks and running averages, and an
integer tensor has no place in an EMA of the weights.

The teacher-forcing input comes from the VQVAE's quantiser (codebook and phi convs), so the
model carries a frozen copy of it, ``model.quantizer`` (keys ``quantizer.*``, absent from the
official layout). Its parameters have ``requires_grad`` False and it runs under ``no_grad``: it
receives no gradient, so an optimizer (AdamW skips parameters without a gradient) never changes
it; ``num_parameters`` counts the transformer alone, as VAR reports it.

VAR drops labels (class dropout) inside its forward, even in eval mode; this model never does:
label dropout is the trainer's business (it passes ``null_class`` in ``labels``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ccalign.models.family import ConfigSizes, at_least_float32
from ccalign.multiscale import MultiScaleQuantizer
from ccalign.settings import check_fields, ranged

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
#: Cap of the per-head attention scale's log: ln(100) rounded to float32, as VAR computes it.
MAX_SCALE_MUL = torch.tensor(100.0, device="cpu").log().item()


@dataclass(frozen=True)
class VARConfig:
    """Hyper-parameters of one VAR transformer (defaults: VAR-d16 at 256 px)."""

    depth: int = ranged(16, ge=1, le=1000)
    dim: int = ranged(1024, ge=1, le=65536)
    n_head: int = ranged(16, ge=1, le=4096)
    patch_nums: tuple[int, ...] = ranged(PATCH_NUMS_256, ge=1, le=1024)
    vocab_size: int = ranged(4096, ge=2, le=2**24)
    vae_dim: int = ranged(32, ge=1, le=65536)  # width of the VQVAE's code vectors (Cvae)
    num_classes: int = ranged(1000, ge=1, le=10**7)
    mlp_ratio: float = ranged(4.0, gt=0, le=64)
    norm_eps: float = ranged(1e-6, gt=0, le=1)
    # stochastic depth of the last block (linear from 0 over blocks)
    drop_path: float = ranged(0.0, ge=0, lt=1)
    dropout: float = ranged(0.0, ge=0, lt=1)  # after the attention projection and the MLP
    attn_dropout: float = ranged(0.0, ge=0, lt=1)
    attn_l2_norm: bool = True
    shared_aln: bool = False  # one AdaLN projection shared by all blocks (VAR-d36)
    num_phi: int = ranged(4, ge=1, le=64)  # shared phi convs of the quantiser
    phi_ratio: float = ranged(0.5, ge=0, le=1)
    init_adaln: float = ranged(0.5, ge=0, le=10)
    init_adaln_gamma: float = ranged(1e-5, ge=0, le=10)
    init_head: float = ranged(0.02, ge=0, le=10)
    init_std: float = ranged(-1.0, ge=-1, le=10)  # < 0: sqrt(1 / (3 dim)), VAR's automatic choice

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        check_fields(self)
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not a multiple of n_head {self.n_head}")
        if not self.patch_nums or any(a >= b for a, b in pairwise(self.patch_nums)):
            raise ValueError(
                f"patch_nums {list(self.patch_nums)} must grow scale by scale, e.g. 1,2,3,4,5,6,8,"
                "10,13,16 (VAR at 256 px)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return round(self.dim * self.mlp_ratio)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_len(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def null_class(self) -> int:
        """Index of the learned unconditional class (class dropout and CFG's second branch)."""
        return self.num_classes

    @property
    def image_size(self) -> int:
        """Pixels per side with the 16x-downsampling VQVAE."""
        return 16 * self.patch_nums[-1]

    def scale_starts(self) -> list[int]:
        """Sequence index where each scale's codes begin, plus the total length at the end."""
        starts = [0]
        for pn in self.patch_nums:
            starts.append(starts[-1] + pn * pn)
        return starts

    def to_dict(self) -> dict:
        return {**asdict(self), "patch_nums": list(self.patch_nums)}


def _preset(depth: int, **extra) -> dict:
    """VAR's build_vae_var: width 64 per layer, one head per layer, drop path 0.1 depth / 24."""
    return dict(depth=depth, dim=64 * depth, n_head=depth, drop_path=0.1 * depth / 24, **extra)


PRESETS: dict[str, dict] = {
    "VAR-d16": _preset(16),
    "VAR-d20": _preset(20),
    "VAR-d24": _preset(24),
    "VAR-d30": _preset(30),
    "VAR-d36": _preset(36, shared_aln=True, patch_nums=PATCH_NUMS_512),  # 512 px, "d36-s"
}


def build(name: str = "VAR-d16", *, vae=None, **overrides) -> VAR:
    """Build a VAR transformer with the official init by preset name or "custom".

    A custom model needs ``depth``, ``dim`` and ``n_head``. ``vae`` (a ``VarVQ`` or a path to
    one) fills the frozen quantiser; without it the quantiser holds placeholder weights until
    :meth:`VAR.set_quantizer` (or :func:`load`) gives it the VQVAE's.
    """
    if name != "custom" and name not in PRESETS:
        raise ValueError(f"unknown VAR model {name!r}; choose one of {sorted(PRESETS)} or 'custom'")
    fields = {**PRESETS.get(name, {}), **overrides}
    missing = {"depth", "dim", "n_head"} - fields.keys()
    if missing:
        raise ValueError(f"a custom VAR model needs {sorted(missing)}")
    model = VAR(VARConfig(**fields))
    if vae is not None:
        model.set_quantizer(quantizer_of(vae))
    return model


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a row's branch with probability p, scale by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class ScaleKVCache(nn.Module):
    """Preallocated keys and values (B, H, L, hd); a scale writes its slice, reads the prefix."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        # uninitialised: a scale reads only the prefix that it and the earlier scales wrote
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor, row: int = 0) -> tuple[Tensor, Tensor]:
        """Write k, v (b, H, n, hd) at positions start.. of rows row..row + b; return those
        rows' keys and values up to the end of the write."""
        rows, end = slice(row, row + k.shape[0]), start + k.shape[2]
        self.k[rows, :, start:end] = k
        self.v[rows, :, start:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]


class SelfAttention(nn.Module):
    """Multi-head attention; with ``attn_l2_norm`` q and k are unit vectors, q scaled per head by
    exp(min(scale_mul, ln 100)) and the softmax scale is 1. The k bias is a fixed zero buffer."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        c, self.n_head, self.head_dim = cfg.dim, cfg.n_head, cfg.head_dim
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, cfg.n_head, 1, 1), 4.0).log())
            self.max_scale_mul = MAX_SCALE_MUL
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.proj = nn.Linear(c, c)
        self.proj_drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attn_dropout
        self.kv_cache: ScaleKVCache | None = None

    def forward(
        self, x: Tensor, attn_bias: Tensor | None, cache_start: int | None = None,
        cache_row: int = 0,
    ) -> Tensor:
        """``cache_start``: the cached path (x holds positions cache_start.., of the cache's
        rows cache_row..); None: x is the whole sequence."""
        b, n, c = x.shape
        zero = self.zero_k_bias.to(self.q_bias.dtype)  # a float32 buffer: bf16 weights need bf16
        bias = torch.cat((self.q_bias, zero, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, hd) each
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache_start is not None:
            k, v = self.kv_cache.update(cache_start, k, v, cache_row)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=dropout, scale=self.scale
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class FeedForward(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_hidden)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    """AdaLN block: x += g1 attn(LN(x)(1 + s1) + b1); x += g2 ffn(LN(x)(1 + s2) + b2), where
    (g1, g2, s1, s2, b1, b2) come from the class embedding (own projection, or shared + ada_gss)."""

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        self.dim, self.shared = cfg.dim, cfg.shared_aln
        self.drop_path = DropPath(drop_path)
        self.attn = SelfAttention(cfg)
        self.ffn = FeedForward(cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        if self.shared:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, cfg.dim) / cfg.dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def modulation(self, cond: Tensor) -> Tensor:
        """(B, 1, 6, D) gates, scales and shifts from ``cond``: the class embedding (B, D), or
        (B, 1, 6, D) from the shared projection."""
        if self.shared:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.dim)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        attn_bias: Tensor | None = None,
        cache_start: int | None = None,
        mods: Tensor | None = None,
        cache_row: int = 0,
    ) -> Tensor:
        """``cond`` as :meth:`modulation` takes it; ``mods``: its result, when already known;
        ``cache_start`` and ``cache_row`` as :class:`SelfAttention` takes them."""
        mods = self.modulation(cond) if mods is None else mods
        cache = (cache_start, cache_row)
        if not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            return self._forward_in_place(x, attn_bias, cache, mods)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        h = self.attn(self.norm(x) * (scale1 + 1) + shift1, attn_bias, *cache)
        x = x + self.drop_path(h * gamma1)
        h = self.ffn(self.norm(x) * (scale2 + 1) + shift2)
        return x + self.drop_path(h * gamma2)

    def _forward_in_place(self, x: Tensor, attn_bias: Tensor | None,
                          cache: tuple[int | None, int], mods: Tensor) -> Tensor:
        """The same values as :meth:`forward` with the modulation and gates applied in place
        (as VAR's own block does): half the large temporaries, which on the CPU each cost the
        kernel's page faults. Only without autograd and outside autocast (in place, a float32
        gate would be rounded to autocast's narrower activation)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        h = self.attn(self.norm(x).mul_(scale1 + 1).add_(shift1), attn_bias, *cache)
        x = x + self.drop_path(h.mul_(gamma1))
        h = self.ffn(self.norm(x).mul_(scale2 + 1).add_(shift2))
        return x + self.drop_path(h.mul_(gamma2))


class HeadNorm(nn.Module):
    """LayerNorm modulated by the class embedding before the output head (VAR's head_nm)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.dim = cfg.dim
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))

    def modulation(self, cond: Tensor) -> Tensor:
        """(B, 1, 2, D) scale and shift from the class embedding (B, D)."""
        return self.ada_lin(cond).view(-1, 1, 2, self.dim)

    def forward(self, x: Tensor, cond: Tensor, mods: Tensor | None = None) -> Tensor:
        scale, shift = (self.modulation(cond) if mods is None else mods).unbind(2)
        return self.norm(x) * (scale + 1) + shift


class VAR(ConfigSizes, nn.Module):
    """Class-conditional next-scale model; ``forward`` returns sequence log-likelihoods."""

    #: parameters VAR's trainer exempts from weight decay besides 1-D ones (its nowd_keys that
    #: name VAR parameters): position and level embeddings, shared gates, attention scales
    no_weight_decay = ("pos_start", "pos_1LC", "lvl_embed", "ada_gss", "scale_mul")
    #: parameters that stay float32 when the trainer casts the weights to bf16: the frozen
    #: quantiser, so the teacher-forcing input is the VQVAE's exactly
    float32_parameters = ("quantizer.",)

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        c, n = config.dim, config.seq_len
        self.word_embed = nn.Linear(config.vae_dim, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.empty(1, config.first_len, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, n, c))
        self.lvl_embed = nn.Embedding(len(config.patch_nums), c)
        if config.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        rates = torch.linspace(0, config.drop_path, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.head_nm = HeadNorm(config)
        self.head = nn.Linear(c, config.vocab_size)
        self.quantizer = MultiScaleQuantizer(
            config.vocab_size, config.vae_dim, config.patch_nums, config.num_phi,
            config.phi_ratio, usage_buffer=False,
        ).requires_grad_(False)
        self.reset_parameters()

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks (activation checkpointing and FSDP wrap each one)."""
        return self.blocks

    def num_parameters(self) -> int:
        """Parameters of the transformer (the frozen quantiser copy excluded), as VAR counts."""
        return sum(p.numel() for k, p in self.named_parameters() if is_official_key(k))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VAR's init_weights: truncated normal (std sqrt(1/(3 dim))) for linear and embedding
        weights, zero biases; head x init_head; AdaLN scales/shifts x init_adaln and gates x
        init_adaln_gamma; attention and MLP output weights / sqrt(2 depth)."""
        cfg = self.config
        std = cfg.init_std if cfg.init_std >= 0 else (1 / cfg.dim / 3) ** 0.5
        frozen = set(self.quantizer.modules())
        for module in self.modules():
            if module in frozen:
                continue
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
        for param in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(param, std=std)
        self.head.weight.mul_(cfg.init_head)
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        depth, c = len(self.blocks), cfg.dim
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if block.attn.l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            if block.shared:
                block.ada_gss.normal_().div_(c**0.5)
                block.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
                block.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * c :].mul_(cfg.init_adaln)
                block.ada_lin[-1].weight[: 2 * c].mul_(cfg.init_adaln_gamma)

    @torch.no_grad()
    def set_quantizer(self, quantizer: MultiScaleQuantizer) -> None:
        """Copy the VQVAE quantiser's codebook and phis into the frozen copy (shapes must match)."""
        mine = self.quantizer.state_dict()
        theirs = {k: v for k, v in quantizer.state_dict().items() if k in mine}
        if quantizer.patch_nums != self.config.patch_nums or theirs.keys() != mine.keys() or any(
            theirs[k].shape != mine[k].shape for k in mine
        ):
            raise ValueError(
                f"the VQVAE's quantiser (codebook {tuple(quantizer.embedding.weight.shape)}, "
                f"{len(quantizer.quant_resi.qresi_ls)} phis, scales {quantizer.patch_nums}) does "
                f"not fit this VAR (codebook ({self.config.vocab_size}, {self.config.vae_dim}), "
                f"{self.config.num_phi} phis, scales {self.config.patch_nums})"
            )
        self.quantizer.load_state_dict(theirs)

    # ---- teacher-forced path ----
    def _embed(self, labels: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Input sequence (B, L, D) and class embedding (B, D), in float32 as VAR builds them
        (its trainer computes the teacher-forcing input outside autocast too)."""
        b, first = labels.shape[0], self.config.first_len
        with torch.autocast(tokens.device.type, enabled=False):
            inputs = self.quantizer.teacher_forcing_input(tokens)
            cond = self.class_emb(labels)
            sos = cond[:, None].expand(b, first, -1) + self.pos_start.expand(b, first, -1)
            x = torch.cat([sos, self.word_embed(inputs.to(self.word_embed.weight.dtype))], dim=1)
            levels = self._levels(tokens.device)
            x = x + (self.lvl_embed(levels.expand(b, -1)) + self.pos_1LC)
        return x, cond

    def _block_cond(self, cond: Tensor) -> Tensor:
        if not self.config.shared_aln:
            return cond
        return self.shared_ada_lin(cond).view(-1, 1, 6, self.config.dim)

    def hidden_states(self, labels: Tensor, tokens: Tensor) -> Tensor:
        """Final head-normalised hidden states (B, L, D) in float32; position t predicts token t."""
        self._check_inputs(labels, tokens)
        x, cond = self._embed(labels, tokens)
        dtype = _compute_dtype(x)  # the autocast dtype when autocast is on, as VAR runs
        x, block_cond = x.to(dtype), self._block_cond(cond).to(dtype)
        mask = block_causal_mask(self._levels(x.device), dtype)
        for block in self.blocks:
            x = block(x, block_cond, mask)
        return self.head_nm(x.to(at_least_float32(x.dtype)), cond)

    def logits(self, labels: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced float32 logits (B, L, V); position t predicts ``tokens[:, t]``."""
        return self._head(self.hidden_states(labels, tokens))

    def forward(self, labels: Tensor, tokens: Tensor, chunk_rows: int = 4096) -> Tensor:
        """Sequence log-likelihood (B,) = sum_t log p(tokens[:, t] | earlier scales, label).

        The vocabulary projection runs in chunks of ``chunk_rows`` positions and is recomputed in
        the backward pass, so peak memory holds one chunk of logits, not B x L x V.
        """
        return self.token_logprobs(labels, tokens, chunk_rows).sum(dim=1)

    sequence_logprob = forward

    def token_logprobs(self, labels: Tensor, tokens: Tensor, chunk_rows: int = 4096) -> Tensor:
        """Per-token log-probabilities (B, L) of the given tokens, computed chunk by chunk."""
        hidden = self.hidden_states(labels, tokens)
        b, n, d = hidden.shape
        flat_h, flat_t = hidden.reshape(b * n, d), tokens.reshape(b * n)
        weight, bias = self.head.weight, self.head.bias
        pieces = []
        for start in range(0, b * n, chunk_rows):
            h_chunk = flat_h[start : start + chunk_rows]
            t_chunk = flat_t[start : start + chunk_rows]
            if torch.is_grad_enabled() and h_chunk.requires_grad:
                pieces.append(
                    checkpoint(_chunk_logprob, h_chunk, t_chunk, weight, bias, use_reentrant=False)
                )
            else:
                pieces.append(_chunk_logprob(h_chunk, t_chunk, weight, bias))
        return torch.cat(pieces).view(b, n)

    def _head(self, hidden: Tensor) -> Tensor:
        """float32 logits from the float32 head-normalised states (a bf16 model: in bf16)."""
        logits = self.head(hidden.to(self.head.weight.dtype))
        return logits.to(at_least_float32(logits.dtype))

    def _check_inputs(self, labels: Tensor, tokens: Tensor) -> None:
        if tokens.dim() != 2 or labels.dim() != 1 or labels.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"expected labels (B,) and tokens (B, L); got {tuple(labels.shape)} and "
                f"{tuple(tokens.shape)}"
            )
        if tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"{tokens.shape[1]} tokens per image but this VAR's scales "
                f"{self.config.patch_nums} hold {self.seq_len}; give every scale's codes, "
                "coarsest first"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_class):
            raise ValueError(
                f"labels must lie in [0, {self.null_class}] ({self.null_class} = null class); "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )

    # ---- cached generation path (used by ccalign.sample.var) ----
    def setup_kv_cache(
        self, batch: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Allocate a KV cache for ``batch`` rows and the whole sequence; any fewer rows can run."""
        ref = self.head.weight
        dtype, device = dtype or ref.dtype, torch.device(device or ref.device)
        for block in self.blocks:
            block.attn.kv_cache = ScaleKVCache(
                batch, self.config.n_head, self.seq_len, self.config.head_dim, dtype, device
            )

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def first_scale_input(self, cond: Tensor) -> Tensor:
        """Scale 0's input (B, first_len, D) from the class embedding ``cond`` (B, D)."""
        b, first = cond.shape[0], self.config.first_len
        sos = cond[:, None].expand(b, first, -1) + self.pos_start.expand(b, first, -1)
        return sos + self._level_position(0)

    def scale_input(self, si: int, vectors: Tensor) -> Tensor:
        """Input of scale ``si`` >= 1 from the quantiser's (B, pn^2, vae_dim) rows."""
        return self.word_embed(vectors.to(self.word_embed.weight.dtype)) + self._level_position(si)

    def _level_position(self, si: int) -> Tensor:
        start, end = self.config.scale_starts()[si : si + 2]
        levels = self._levels(self.pos_1LC.device)[:, start:end]
        return self.lvl_embed(levels) + self.pos_1LC[:, start:end]

    def _levels(self, device: torch.device) -> Tensor:
        """VAR's lvl_1L: the scale index of every position, (1, L) int64."""
        return scale_levels(self.config.patch_nums).to(device)

    def modulations(self, cond: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every block's AdaLN modulation and the head's from the class embedding (B, D): the
        same at every scale, so the sampler computes them once per batch, not once per scale."""
        block_cond = self._block_cond(cond)
        blocks = [block.modulation(block_cond) for block in self.blocks]
        return blocks, self.head_nm.modulation(cond)

    def forward_scale(
        self, si: int, x: Tensor, mods: tuple[list[Tensor], Tensor], chunk_tokens: int = 0
    ) -> Tensor:
        """Run scale ``si``'s inputs x (B, pn^2, D) through the cache with the batch's
        :meth:`modulations`; float32 logits (B, pn^2, V).

        Scales must come in order from 0; each attends to itself and the cached earlier scales.
        ``chunk_tokens`` > 0 runs the blocks on chunks of whole rows holding about that many
        positions, one chunk after the other: each row's computation is the same (in float32
        the matrix products may round differently for very small chunks, which pick other
        kernels), and on the CPU small chunks stay in the caches and reuse freed memory
        (``sampler.CPU_CHUNK_BYTES``).
        """
        if self.blocks[0].attn.kv_cache is None:
            raise RuntimeError("call setup_kv_cache(batch) before forward_scale")
        block_mods, head_mods = mods
        start = self.config.scale_starts()[si]
        rows = max(1, chunk_tokens // x.shape[1]) if chunk_tokens > 0 else x.shape[0]
        if rows < x.shape[0]:
            x = torch.cat([
                self._blocks(x[r : r + rows], start, [m[r : r + rows] for m in block_mods], r)
                for r in range(0, x.shape[0], rows)
            ])
        else:
            x = self._blocks(x, start, block_mods, 0)
        hidden = self.head_nm(x.to(at_least_float32(x.dtype)), None, head_mods)
        return self._head(hidden)

    def _blocks(self, x: Tensor, start: int, block_mods: list[Tensor], row: int) -> Tensor:
        """Positions start.. of the cache's rows row..row + len(x) through every block."""
        for block, block_mod in zip(self.blocks, block_mods, strict=True):
            x = block(x, None, None, start, block_mod, row)
        return x


def scale_levels(patch_nums: tuple[int, ...]) -> Tensor:
    """Scale index of every position, (1, L) int64 (VAR's lvl_1L)."""
    level = torch.cat([torch.full((p * p,), i, device="cpu") for i, p in enumerate(patch_nums)])
    return level.view(1, -1)


def block_causal_mask(levels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive mask (1, 1, L, L): 0 where the query's scale >= the key's, -inf elsewhere.

    VAR stores it as ``attn_bias_for_masking``; here it is rebuilt at each forward (see the
    module doc).
    """
    level = levels.reshape(-1)
    visible = level[:, None] >= level[None, :]
    mask = torch.zeros(visible.shape, dtype=dtype, device=levels.device)
    return mask.masked_fill(~visible, float("-inf"))[None, None]


def is_official_key(key: str) -> bool:
    """True for keys of VAR's released layout (everything but the quantiser copy)."""
    return not key.startswith("quantizer.")


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _chunk_logprob(h: Tensor, targets: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    logits = F.linear(h.to(weight.dtype), weight, bias)
    logits = logits.to(at_least_float32(logits.dtype))
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def quantizer_of(vae: nn.Module) -> MultiScaleQuantizer:
    """The quantiser of a VQVAE (``VarVQ``), or the quantiser itself."""
    if isinstance(vae, MultiScaleQuantizer):
        return vae
    quantizer = getattr(vae, "quantize", None)
    if not isinstance(quantizer, MultiScaleQuantizer):
        raise TypeError(
            f"vae must be VAR's VQVAE (ccalign.tokenizers.var_vq.VarVQ) or its quantiser, not "
            f"{type(vae).__name__}; load a VQVAE file with ccalign.tokenizers.var_vq.load"
        )
    return quantizer
