"""Tiny VAR models, their tiny VQVAE and code files shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from ccalign.data.codes import write_flat_codes
from ccalign.models import var
from ccalign.tokenizers import var_vq
from support import REPO

TINY = dict(depth=2, dim=32, n_head=2, patch_nums=(1, 2, 3, 4), vocab_size=16, vae_dim=4,
            num_classes=5, drop_path=0.1)

VQ = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
          patch_nums=(1, 2, 3, 4))

SEQ = sum(p * p for p in TINY["patch_nums"])  # 30

CONFIGS = REPO / "configs"

SAMPLER_TINY = dict(depth=2, dim=32, n_head=2, patch_nums=(1, 2, 3, 4), vocab_size=16, vae_dim=4,
            num_classes=5)

def tiny_pair(seed: int = 0) -> tuple[var.VAR, var_vq.VarVQ]:
    """A tiny VAR and the tiny VQVAE whose quantiser it carries."""
    torch.manual_seed(seed)
    vae = var_vq.VarVQ(var_vq.VarVQConfig(**VQ)).eval()
    with torch.no_grad():
        vae.quantize.embedding.weight.normal_(0, 0.5)
    model = var.build("custom", vae=vae, **TINY)
    return model, vae

def write_var_files(folder: Path, n: int = 16) -> dict[str, str]:
    """init (ccalign VAR file), the same as an official .pth, the VQVAE and a code file."""
    model, vae = tiny_pair()
    var.save(model, folder / "init.safetensors")
    var.save(model, folder / "var_d16.pth", official=True)
    var_vq.save(vae, folder / "vae.safetensors")
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (n, SEQ), generator=g)
    labels = torch.arange(n) % 5
    write_flat_codes(folder / "codes.safetensors", codes, labels, vocab_size=16, grid=4,
                     seq_len=SEQ)
    return {k: str(folder / f) for k, f in (("init", "init.safetensors"),
                                            ("official", "var_d16.pth"),
                                            ("vae", "vae.safetensors"),
                                            ("codes", "codes.safetensors"))}

def random_var(seed: int = 0) -> var.VAR:
    torch.manual_seed(seed)
    model = var.build("custom", **SAMPLER_TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.7 if name.startswith("quantizer.") else 0.2))
    return model.eval()
