"""Tiny random models standing in for released checkpoints: their files placed in an offline
Hugging Face cache in the released layouts, their registry entries pointed at tiny presets (the
protocols stay the releases' own)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ccalign import hub, tokenizers
from ccalign.models import llamagen, var
from support.hub import put
from support.tiny_var import TINY as VAR_TINY
from support.tiny_var import tiny_pair

GPT_TINY = dict(n_layer=1, n_head=2, dim=32)


def tiny_llamagen_release(name: str, cache: Path, monkeypatch, tmp_path: Path, seed: int = 0):
    """The registry's LlamaGen release ``name`` as a tiny GPT at grid 4 (official ``.pt``), and
    its tokenizer (llamagen-vq16) as a tiny VQ; returns the model."""
    monkeypatch.setitem(llamagen.PRESETS, "GPT-tiny", GPT_TINY)
    entry = hub.REGISTRY[name]
    monkeypatch.setitem(hub.REGISTRY, name,
                        dataclasses.replace(entry, preset="GPT-tiny", grid=4))
    torch.manual_seed(seed)
    model = llamagen.build("GPT-tiny", grid=4, **dict(entry.options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    vq = tokenizers.build("VQ-16", ch=32, ch_mult=(1, 1), z_channels=32, num_res_blocks=1,
                          usage_window=0).eval()
    codec = hub.REGISTRY[entry.tokenizer]
    _put_torch(cache, entry, {"model": model.state_dict()}, tmp_path)
    _put_torch(cache, codec, {"model": vq.state_dict()}, tmp_path)
    return model


def tiny_var_release(name: str, cache: Path, monkeypatch, tmp_path: Path, seed: int = 2):
    """The registry's VAR release ``name`` as a tiny VAR (official ``.pth``) with a tiny VQVAE
    as var-vae (VAR's raw layout); returns the model."""
    monkeypatch.setitem(var.PRESETS, "VAR-tiny", dict(VAR_TINY))
    entry = hub.REGISTRY[name]
    monkeypatch.setitem(hub.REGISTRY, name, dataclasses.replace(entry, preset="VAR-tiny"))
    model, vae = tiny_pair(seed=seed)
    var.save(model, tmp_path / "official.pth", official=True)
    put(cache, entry.repo, entry.file, (tmp_path / "official.pth").read_bytes())
    _put_torch(cache, hub.REGISTRY[entry.tokenizer], vae.state_dict(), tmp_path)
    return model.eval()


def _put_torch(cache: Path, release, obj, tmp_path: Path) -> None:
    path = tmp_path / "put.pt"
    torch.save(obj, path)
    put(cache, release.repo, release.file, path.read_bytes())


def tiny_t2i_release(name: str, cache: Path, monkeypatch, tmp_path: Path, seed: int = 0):
    """The registry's T2I release ``name`` as a tiny GPT (released caption size: 120 x 2048)
    at its grid, official ``.pt``, with a tiny VQ as its tokenizer; returns the model."""
    from ccalign.models.llamagen import t2i

    monkeypatch.setitem(llamagen.PRESETS, "GPT-tiny", GPT_TINY)
    entry = hub.REGISTRY[name]
    monkeypatch.setitem(hub.REGISTRY, name, dataclasses.replace(entry, preset="GPT-tiny", grid=4))
    torch.manual_seed(seed)
    model = t2i.build("GPT-tiny", grid=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    vq = tokenizers.build("VQ-16", ch=32, ch_mult=(1, 1), z_channels=32, num_res_blocks=1,
                          usage_window=0).eval()
    _put_torch(cache, entry, {"model": model.state_dict()}, tmp_path)
    _put_torch(cache, hub.REGISTRY[entry.tokenizer], {"model": vq.state_dict()}, tmp_path)
    return model
