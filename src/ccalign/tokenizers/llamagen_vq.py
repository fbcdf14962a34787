"""LlamaGen's VQ tokenizer (VQ-16, VQ-8), numerically the released model, and its family.

The module tree reproduces the state_dict keys and shapes of the released ``vq_ds16_c2i.pt``
(344 keys, 71,883,403 parameters), so official weights load strictly. The same classes, with a
smaller :class:`VQConfig`, make the project's small trainable tokenizer (``small_vq``).

Encode: h = quant_conv(encoder(x)) with x in [-1, 1]; the latents and the codebook are
L2-normalised and each latent takes its nearest code; codes are laid out in raster order
(row-major over the latent grid). Decode: look up the normalised codebook, post_quant_conv, decoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VQConfig:
    """Architecture of one VQ tokenizer (defaults: LlamaGen's VQ-16 at 256 px)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    in_channels: int = 3
    norm_groups: int = 32
    level_attn: bool = True  # attention blocks at the lowest-resolution level
    mid_attn: bool = True  # the attention block between the two middle res blocks
    usage_window: int = 65536  # length of the quantize.codebook_used buffer; 0 = no buffer
    image_size: int = 256
    commit_beta: float = 0.25

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the downsampling factor "
                f"{self.downsample} of ch_mult {self.ch_mult}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> VQConfig:
        return cls(**json.loads(text))


PRESETS: dict[str, dict] = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),
}


def build(name: str = "VQ-16", **overrides) -> VQModel:
    """Build LlamaGen's "VQ-16" or "VQ-8" (give ``image_size=384`` for the 24x24 grid)."""
    if name not in PRESETS:
        raise ValueError(f"unknown LlamaGen VQ {name!r}; choose one of {sorted(PRESETS)}")
    return VQModel(VQConfig(**{**PRESETS[name], **overrides}))


def swish(x: Tensor) -> Tensor:
    """x sigmoid(x), as LlamaGen computes it. Callers pass a temporary: without autograd the
    result reuses its memory (a decoder's activations are the largest tensors it makes)."""
    if torch.is_grad_enabled():
        return x * torch.sigmoid(x)
    return x.mul_(torch.sigmoid(x))


def residual(skip: Tensor, h: Tensor) -> Tensor:
    """skip + h for a temporary ``h``: in place without autograd (the same sums, one large
    allocation fewer per block, which on the CPU saves its page faults)."""
    if torch.is_grad_enabled():
        return skip + h
    return h.add_(skip)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return residual(skip, h)


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels with separate q, k, v, proj_out 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3)  # (B, 1, pixels, C)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c)
        return residual(x, self.proj_out(out.transpose(2, 3).reshape(b, c, h, w)))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (halves each side)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, each followed by attention when present, then the
    level's ``downsample`` (encoder) or ``upsample`` (decoder) when it has one."""

    def __init__(self, widths: list[tuple[int, int]], groups: int, attn: bool):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, groups) for _, o in widths) if attn else None
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


def _middle(channels: int, groups: int, attn: bool) -> nn.ModuleList:
    blocks = [ResnetBlock(channels, channels, groups)]
    if attn:
        blocks.append(AttnBlock(channels, groups))
    blocks.append(ResnetBlock(channels, channels, groups))
    return nn.ModuleList(blocks)


class Encoder(nn.Module):
    """conv_in, one level per ch_mult entry (downsampling after all but the last), mid, out."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        blocks, width = [], cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            widths = [(width if i == 0 else out, out) for i in range(cfg.num_res_blocks)]
            last = level == n - 1
            blocks.append(Level(widths, g, cfg.level_attn and last))
            if not last:
                blocks[-1].downsample = Downsample(out)
            width = out
        self.conv_blocks = nn.ModuleList(blocks)
        self.mid = _middle(width, g, cfg.mid_attn)
        self.norm_out = nn.GroupNorm(g, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in, mid, levels from the lowest resolution up (upsampling after all but the last)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_groups
        width = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = _middle(width, g, cfg.mid_attn)
        blocks = []
        for index, mult in enumerate(reversed(cfg.ch_mult)):
            out = cfg.ch * mult
            widths = [(width if i == 0 else out, out) for i in range(cfg.num_res_blocks + 1)]
            blocks.append(Level(widths, g, cfg.level_attn and index == 0))
            if index < n - 1:
                blocks[-1].upsample = Upsample(out)
            width = out
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(g, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """L2-normalised codebook; nearest code by squared distance between normalised vectors."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        with torch.no_grad():
            bound = 1.0 / cfg.codebook_size
            self.embedding.weight.uniform_(-bound, bound)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.usage_window:
            self.register_buffer("codebook_used", torch.zeros(cfg.usage_window))

    def codebook(self) -> Tensor:
        """The normalised codebook (K, D) in float32."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def nearest(self, z: Tensor, chunk_rows: int = 8192) -> Tensor:
        """Indices (M,) of the nearest normalised code for each row of z (M, D).

        Distances are |z|^2 + |e|^2 - 2 z.e on normalised vectors, in chunks of rows so that
        the (rows x K) matrix stays small.
        """
        z = F.normalize(z.float(), dim=-1)
        emb = self.codebook()
        e_sq = emb.pow(2).sum(1)
        out = []
        for part in z.split(chunk_rows):
            d = part.pow(2).sum(1, keepdim=True) + e_sq - 2 * part @ emb.t()
            out.append(d.argmin(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def lookup(self, codes: Tensor) -> Tensor:
        """Normalised code vectors for an integer tensor of indices (adds a trailing D axis)."""
        return self.codebook()[codes]


class VQModel(nn.Module):
    """Images in [-1, 1] (B, C, H, W) <-> codes (B, grid * grid); an ``ImageTokenizer``."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def channels(self) -> int:
        return self.config.in_channels

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def latents(self, images: Tensor) -> Tensor:
        """Pre-quantisation latents (B, D, h, w): quant_conv(encoder(x))."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images.to(self.device)))

    def quantize_latents(self, h: Tensor) -> Tensor:
        """Latents (B, D, h, w) -> codes (B, h * w) in raster order."""
        b, d, gh, gw = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(b * gh * gw, d)
        return self.quantize.nearest(flat).reshape(b, gh * gw)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> int64 codes (B, (H/f) * (W/f)), raster order."""
        return self.quantize_latents(self.latents(images))

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        """Codes (B, N) with N a square -> normalised code vectors (B, D, g, g)."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be (batch, tokens), got shape {tuple(codes.shape)}")
        side = int(round(codes.shape[1] ** 0.5))
        if side * side != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} codes per image do not form a square grid")
        codes = codes.to(self.device).long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(
                f"codes span [{int(codes.min())}, {int(codes.max())}] but this tokenizer has "
                f"{self.vocab_size} codes; decode with the tokenizer the codes came from"
            )
        vectors = self.quantize.lookup(codes)  # (B, N, D)
        return vectors.reshape(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Quantised latents (B, D, g, g) -> images (B, C, g*f, g*f)."""
        z = z.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, N) -> images (B, C, H, W), roughly in [-1, 1] (clamp when converting)."""
        return self.decode_latents(self.codes_to_latents(codes))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction, codebook loss, commitment loss, codes).

        Codebook loss = mean |e - sg(z)|^2, commitment = beta * mean |sg(e) - z|^2 on the
        normalised vectors; gradients reach the encoder by the straight-through estimator.
        """
        h = self.latents(images).float()
        b, d, gh, gw = h.shape
        codes = self.quantize_latents(h.detach())
        z = F.normalize(h, dim=1)
        e = self.quantize.lookup(codes).reshape(b, gh, gw, d).permute(0, 3, 1, 2)
        codebook_loss = (e - z.detach()).pow(2).mean()
        commit_loss = self.config.commit_beta * (e.detach() - z).pow(2).mean()
        quantised = z + (e - z).detach()
        return self.decode_latents(quantised), codebook_loss, commit_loss, codes

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"images must be (batch, {self.channels}, H, W) in [-1, 1], got shape "
                f"{tuple(images.shape)}"
            )
        f = self.config.downsample
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image sides {tuple(images.shape[2:])} must be multiples of {f} for this tokenizer"
            )


def config_from_state_dict(sd: dict[str, Tensor], image_size: int = 256) -> VQConfig:
    """Read the architecture of a LlamaGen-style VQ from its weights' names and shapes."""
    try:
        ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(
            int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")
        )
        ch_mult = tuple(
            sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)
        )
        num_res = 1 + max(
            int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.0.res.")
        )
        k_size, dim = sd["quantize.embedding.weight"].shape
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"these weights are not a LlamaGen-style VQ tokenizer (could not read {exc}); "
            "expected keys such as encoder.conv_in.weight and quantize.embedding.weight"
        ) from None
    used = sd.get("quantize.codebook_used")
    return VQConfig(
        codebook_size=k_size,
        codebook_embed_dim=dim,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res,
        z_channels=sd["quant_conv.weight"].shape[1],
        in_channels=in_ch,
        level_attn=any(k.startswith(f"encoder.conv_blocks.{levels - 1}.attn.") for k in sd),
        mid_attn="encoder.mid.1.q.weight" in sd,
        usage_window=0 if used is None else used.shape[0],
        image_size=image_size,
    )


def preset_name(config: VQConfig) -> str | None:
    """'VQ-16' / 'VQ-8' when the config has that preset's architecture (any image size)."""
    for name, fields in PRESETS.items():
        reference = VQConfig(
            **fields,
            image_size=config.image_size,
            usage_window=config.usage_window,
            commit_beta=config.commit_beta,
        )
        if reference == config:
            return name
    return None
