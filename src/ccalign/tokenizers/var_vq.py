"""VAR's multi-scale VQVAE (vae_ch160v4096z32), numerically the released model.

The module tree reproduces the keys and shapes of the released ``vae_ch160v4096z32.pth`` (a raw
state_dict: 324 keys, 108,948,355 parameters), so it loads strictly. Encode: f =
quant_conv(encoder(x)) with x in [-1, 1], then the multi-scale residual quantiser
(:mod:`ccalign.multiscale`) gives the codes of every scale, coarsest first: (B, 680)
at 256 px. Decode: f_hat = sum over scales of phi(upsampled code vectors), then
decoder(post_quant_conv(f_hat)) clamped to [-1, 1]. A smaller :class:`VarVQConfig` (other
scales, codebook, widths) builds a small trainable multi-scale VQ from the same classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccalign.io import PathLike, atomic_save_safetensors, open_safetensors, read_tensor_file
from ccalign.multiscale import MultiScaleQuantizer
from ccalign.tokenizers.llamagen_vq import (  # the same layers, keys "conv"
    Downsample,
    Upsample,
    residual,
)
from ccalign.weights import CheckpointMismatchError, check_state_dict, extract_state_dict

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
METADATA_KIND = "var_vq"


@dataclass(frozen=True)
class VarVQConfig:
    """Architecture of one multi-scale VQVAE (defaults: VAR's vae_ch160v4096z32 at 256 px)."""

    vocab_size: int = 4096
    z_channels: int = 32  # width of the latents and code vectors (VAR's Cvae)
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    num_phi: int = 4
    phi_ratio: float = 0.5
    quant_conv_ks: int = 3
    level_attn: bool = True  # attention after each res block of the lowest-resolution level
    mid_attn: bool = True
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["patch_nums"] = list(self.ch_mult), list(self.patch_nums)
        return d


def silu(x: Tensor) -> Tensor:
    """SiLU of a temporary ``x``: in place without autograd, as VAR's VQVAE runs it."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        return residual(self.nin_shortcut(x), h)


class AttnBlock(nn.Module):
    """Single-head attention over the pixels from one 1x1 ``qkv`` conv, scale 1/sqrt(C)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.scale = int(channels) ** -0.5

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.bmm(q.transpose(1, 2).contiguous(), k.contiguous()).mul(self.scale)
        weights = weights.softmax(dim=2)  # (B, queries, keys)
        out = torch.bmm(v.contiguous(), weights.transpose(1, 2).contiguous())  # (B, C, queries)
        return residual(x, self.proj_out(out.view(b, c, h, w)))


class Level(nn.Module):
    """One resolution: res blocks (``block``), each followed by attention when ``attn`` has any,
    then the optional ``downsample`` / ``upsample``."""

    def __init__(self, widths: list[tuple[int, int]], groups: int, attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, groups) for _, o in widths) if attn else None
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


class Middle(nn.Module):
    """block_1, attn_1 (or nothing), block_2."""

    def __init__(self, channels: int, groups: int, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """conv_in, one level per ch_mult entry (downsampling after all but the last), mid, out."""

    def __init__(self, cfg: VarVQConfig):
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, width = [], cfg.ch
        for index, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            widths = [(width if i == 0 else out, out) for i in range(cfg.num_res_blocks)]
            levels.append(Level(widths, g, cfg.level_attn and index == n - 1))
            if index < n - 1:
                levels[-1].downsample = Downsample(out)
            width = out
        self.down = nn.ModuleList(levels)
        self.mid = Middle(width, g, cfg.mid_attn)
        self.norm_out = nn.GroupNorm(g, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """conv_in, mid, then ``up[i]`` from the lowest resolution (i = last) to the highest (0)."""

    def __init__(self, cfg: VarVQConfig):
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_groups
        width = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = Middle(width, g, cfg.mid_attn)
        levels = []
        for index in reversed(range(n)):
            out = cfg.ch * cfg.ch_mult[index]
            widths = [(width if i == 0 else out, out) for i in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(widths, g, cfg.level_attn and index == n - 1))
            if index > 0:
                levels[0].upsample = Upsample(out)
            width = out
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(silu(self.norm_out(h)))


class VarVQ(nn.Module):
    """Images in [-1, 1] (B, C, H, W) <-> codes (B, L) of every scale; an ``ImageTokenizer``
    whose ``grid`` is the last scale's side and whose sequence is ``seq_len`` long."""

    def __init__(self, config: VarVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = MultiScaleQuantizer(
            config.vocab_size, config.z_channels, config.patch_nums, config.num_phi,
            config.phi_ratio,
        )
        ks, z = config.quant_conv_ks, config.z_channels
        self.quant_conv = nn.Conv2d(z, z, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(z, z, ks, padding=ks // 2)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid(self) -> int:
        return self.config.patch_nums[-1]

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

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
        """Pre-quantisation latents f (B, Cvae, n, n) = quant_conv(encoder(x))."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images.to(self.device)))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> int64 codes (B, L), scale by scale (VAR's
        img_to_idxBl, concatenated)."""
        return self.quantize.encode(self.latents(images))

    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """f_hat (B, Cvae, n, n) -> images clamped to [-1, 1] (VAR's fhat_to_img)."""
        f_hat = f_hat.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, L) -> images (B, C, H, W) in [-1, 1] (VAR's idxBl_to_img, last image)."""
        return self.decode_fhat(self.quantize.codes_to_fhat(codes.to(self.device).long()))

    def forward(self, images: Tensor, beta: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass (VAR's VQVAE.forward): (reconstruction, VQ loss, codes); the encoder
        gets gradients through the straight-through f_hat (see ``MultiScaleQuantizer.forward``)."""
        f_hat, vq_loss, codes = self.quantize(self.latents(images), beta)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, codes

    def _check_images(self, images: Tensor) -> None:
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.channels, size, size):
            raise ValueError(
                f"images must be (batch, {self.channels}, {size}, {size}) in [-1, 1] for scales "
                f"{self.patch_nums}; got shape {tuple(images.shape)} (resize or crop first)"
            )


# ---- files ----
def is_var_vq_state_dict(sd: dict[str, Tensor]) -> bool:
    """True for weights laid out as VAR's VQVAE (its shared phis and ``encoder.down`` levels)."""
    return all(
        key in sd
        for key in ("quantize.quant_resi.qresi_ls.0.weight", "encoder.down.0.block.0.conv1.weight")
    )


def config_from_state_dict(
    sd: dict[str, Tensor], patch_nums: tuple[int, ...] | None = None
) -> VarVQConfig:
    """Read the architecture from the weights' names and shapes (scales: ``patch_nums``, by
    default VAR's 256 px ones; the file does not record them)."""
    if not is_var_vq_state_dict(sd):
        raise ValueError(
            "these weights are not a VAR multi-scale VQVAE: expected keys such as "
            "encoder.down.0.block.0.conv1.weight and quantize.quant_resi.qresi_ls.0.weight"
        )
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    vocab, z = sd["quantize.embedding.weight"].shape
    last = levels - 1
    return VarVQConfig(
        vocab_size=vocab,
        z_channels=z,
        ch=ch,
        ch_mult=tuple(
            sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)
        ),
        num_res_blocks=1 + max(
            int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")
        ),
        in_channels=in_ch,
        patch_nums=tuple(patch_nums or PATCH_NUMS_256),
        num_phi=1 + max(
            int(k.split(".")[3]) for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")
        ),
        quant_conv_ks=sd["quant_conv.weight"].shape[-1],
        level_attn=f"encoder.down.{last}.attn.0.qkv.weight" in sd,
        mid_attn="encoder.mid.attn_1.qkv.weight" in sd,
    )


def save(model: VarVQ, path: PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a multi-scale VQVAE as safetensors with its config as metadata, atomically.

    ``dtype`` stores floating tensors at that precision (small assets); :func:`load` always
    returns float32 weights.
    """
    sd = model.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    record = {"kind": METADATA_KIND, "config": model.config.to_dict()}
    return atomic_save_safetensors(sd, path, metadata={"ccalign.tokenizer": json.dumps(record)})


def metadata_config(path: PathLike) -> VarVQConfig | None:
    """The config a ccalign multi-scale VQ safetensors file records, else None."""
    if not str(path).endswith(".safetensors"):
        return None
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    record = json.loads(meta.get("ccalign.tokenizer", "{}"))
    return VarVQConfig(**record["config"]) if record.get("kind") == METADATA_KIND else None


def load(
    path: PathLike, *, patch_nums: tuple[int, ...] | None = None, image_size: int | None = None
) -> VarVQ:
    """Load VAR's VQVAE (raw state_dict such as vae_ch160v4096z32.pth, or a ccalign safetensors
    file) strictly, weights-only; eval mode, CPU, gradients off.

    Official files do not record their scales: give ``patch_nums``, or ``image_size`` 512 for
    VAR's 512 px scales (default: the 256 px ones).
    """
    config = metadata_config(path)
    sd = extract_state_dict(read_tensor_file(path))
    return from_state_dict(sd, path, config=config, patch_nums=patch_nums, image_size=image_size)


def from_state_dict(
    sd: dict[str, Tensor],
    source: PathLike = "weights",
    *,
    config: VarVQConfig | None = None,
    patch_nums: tuple[int, ...] | None = None,
    image_size: int | None = None,
) -> VarVQ:
    """Build the VQVAE that ``sd`` describes (or ``config``) and load it strictly."""
    if config is not None and image_size is not None and patch_nums is None:
        if image_size != config.image_size:
            raise ValueError(
                f"{source} encodes {config.image_size} px images (scales {config.patch_nums}), "
                f"not {image_size} px"
            )
        image_size = None
    if patch_nums is None and image_size is not None:
        if image_size not in (256, 512):
            raise ValueError(f"VAR's scales exist for 256 and 512 px, not {image_size}")
        patch_nums = PATCH_NUMS_512 if image_size == 512 else PATCH_NUMS_256
    if config is None:
        config = config_from_state_dict(sd, patch_nums)
    elif patch_nums is not None:
        config = VarVQConfig(**{**config.to_dict(), "patch_nums": patch_nums})
    model = VarVQ(config)
    usage = "quantize.ema_vocab_hit_SV"
    if usage in sd and sd[usage].shape != model.quantize.ema_vocab_hit_SV.shape:
        sd = {**sd, usage: model.quantize.ema_vocab_hit_SV}  # a statistic of other scales
    try:
        sd = check_state_dict(model, sd)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{source}: {exc}") from None
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval().requires_grad_(False)
