"""Small VQ tokenizers for small images (28x28 grey), trained in minutes on a CPU.

Two kinds, one training loop: the LlamaGen-family VQ (:mod:`ccalign.tokenizers.llamagen_vq`:
L2-normalised codebook, codebook + commitment losses; 7x7 codes) and VAR's multi-scale VQVAE
(:mod:`ccalign.tokenizers.var_vq`: residual quantisation over the scales 1, 2, 3, 5, 7, 88
codes coarsest first). Straight-through gradients, no perceptual or GAN loss. Codes that go
unused for a while are restarted on random vectors the quantiser saw in the current batch
(encoder outputs, or for the multi-scale VQ the residuals of every scale), so most of the
codebook stays in use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ccalign.tokenizers.base import to_model_range
from ccalign.tokenizers.llamagen_vq import VQConfig, VQModel
from ccalign.tokenizers.var_vq import VarVQ, VarVQConfig

#: The 28x28 grey tokenizer of the demo: 512 codes, 7x7 grid.
SMALL_CONFIG = VQConfig(
    codebook_size=512,
    codebook_embed_dim=8,
    ch=16,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    z_channels=32,
    in_channels=1,
    norm_groups=8,
    level_attn=False,
    mid_attn=True,
    usage_window=0,
    image_size=28,
)


#: The 28x28 grey multi-scale VQ of the VAR demo: 512 codes, scales 1, 2, 3, 5, 7 (88 codes).
SMALL_MULTISCALE_CONFIG = VarVQConfig(
    vocab_size=512,
    z_channels=16,
    ch=16,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    in_channels=1,
    patch_nums=(1, 2, 3, 5, 7),
    num_phi=4,
    phi_ratio=0.5,
    level_attn=False,
    mid_attn=True,
    norm_groups=8,
)


def build_small(**overrides) -> VQModel:
    """The small VQ (untrained); overrides change fields of :data:`SMALL_CONFIG`."""
    fields = {**SMALL_CONFIG.__dict__, **overrides}
    return VQModel(VQConfig(**fields))


def build_small_multiscale(**overrides) -> VarVQ:
    """The small multi-scale VQ (untrained); overrides change :data:`SMALL_MULTISCALE_CONFIG`."""
    return VarVQ(VarVQConfig(**{**SMALL_MULTISCALE_CONFIG.to_dict(), **overrides}))


@dataclass
class TrainSettings:
    """Optimisation of the small VQ (defaults: the bundled Fashion-MNIST tokenizer)."""

    steps: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    restart_every: int = 100  # restart codes unused during the last this-many steps
    restart_until: float = 0.8  # ...until this fraction of training, then let the codebook settle
    seed: int = 0
    log_every: int = 100


@dataclass
class TrainHistory:
    """What happened during training, for the report."""

    steps: list[int] = field(default_factory=list)
    recon_mse: list[float] = field(default_factory=list)
    restarted: int = 0
    seconds: float = 0.0


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: VQModel | VarVQ,
    images: torch.Tensor,
    settings: TrainSettings,
    log: Callable[[str], None] = print,
) -> TrainHistory:
    """Train ``model`` on uint8 images (N, H, W[, C]) with reconstruction MSE + VQ losses."""
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model.train()
    device = model.device
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=settings.weight_decay
    )
    hits = torch.zeros(model.vocab_size, dtype=torch.long, device=device)
    history, start = TrainHistory(), time.time()
    order = torch.randperm(len(images), generator=gen)
    cursor = 0
    for step in range(settings.steps):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        batch = images[order[cursor : cursor + settings.batch_size]]
        cursor += settings.batch_size
        x = to_model_range(batch.to(device), model.channels)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        recon, vq_loss, codes = training_pass(model, x)
        mse = F.mse_loss(recon.float(), x)
        opt.zero_grad(set_to_none=True)
        (mse + vq_loss).backward()
        opt.step()
        hits += torch.bincount(codes.flatten(), minlength=model.vocab_size)
        if _restart_due(step, settings):
            history.restarted += restart_dead_codes(model, x, hits == 0, gen)
            hits.zero_()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            history.steps.append(step)
            history.recon_mse.append(mse.item())
            log(f"step {step:5d}  recon mse {mse.item():.4f}  lr {lr_at(step, settings):.2e}  "
                f"restarted {history.restarted}  {time.time() - start:.0f}s")
    history.seconds = time.time() - start
    model.eval()
    return history


def training_pass(model: VQModel | VarVQ, x: torch.Tensor):
    """(reconstruction, VQ loss, codes): VQModel returns codebook and commitment losses apart,
    VarVQ their weighted sum over the scales."""
    if isinstance(model, VarVQ):
        return model(x)
    recon, codebook_loss, commit_loss, codes = model(x)
    return recon, codebook_loss + commit_loss, codes


def _restart_due(step: int, s: TrainSettings) -> bool:
    return (step + 1) % s.restart_every == 0 and step < s.restart_until * s.steps


@torch.no_grad()
def restart_dead_codes(
    model: VQModel | VarVQ, images: torch.Tensor, dead: torch.Tensor, gen: torch.Generator
) -> int:
    """Move each dead code onto a random vector the quantiser sees for ``images`` (encoder
    outputs, L2-normalised as the codebook; for VarVQ every scale's residual); returns how many
    moved."""
    count = int(dead.sum())
    if count == 0:
        return 0
    h = model.latents(images).float()
    if isinstance(model, VarVQ):
        pool = model.quantize.residuals(h)
    else:
        pool = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), dim=-1)
    picks = torch.randint(len(pool), (count,), generator=gen).to(pool.device)
    weight = model.quantize.embedding.weight
    weight[dead.nonzero().squeeze(1)] = pool[picks].to(weight.dtype)
    return count


@torch.no_grad()
def evaluate(
    model: VQModel | VarVQ, images: torch.Tensor, batch_size: int = 500
) -> dict[str, float]:
    """Reconstruction error and codebook statistics of ``model`` on uint8 images.

    ``mse`` is on pixel values scaled to [0, 1] (reconstructions clamped), ``psnr`` in dB from
    it; ``usage`` is the fraction of codes used at least once, ``perplexity`` exp(entropy) of the
    code histogram (= the number of equally used codes that would give the same entropy).
    """
    model.eval()
    squared, pixels = 0.0, 0
    hist = torch.zeros(model.vocab_size, dtype=torch.float64)
    for part in images.split(batch_size):
        x = to_model_range(part.to(model.device), model.channels)
        codes = model.encode(x)
        recon = model.decode(codes).float().clamp(-1, 1)
        squared += ((recon - x) / 2).pow(2).sum().item()
        pixels += x.numel()
        hist += torch.bincount(codes.flatten().cpu(), minlength=model.vocab_size).double()
    mse = squared / pixels
    p = hist / hist.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
        "usage": float((hist > 0).double().mean()),
        "codes_used": int((hist > 0).sum()),
        "perplexity": math.exp(entropy),
    }
