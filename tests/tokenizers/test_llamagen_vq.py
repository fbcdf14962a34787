"""LlamaGen VQ-16 / VQ-8 layout, float64 references for encode/decode, files, the small VQ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccalign.tokenizers import FMNIST_VQ_PATH, ImageTokenizer, build, load, save
from ccalign.tokenizers.llamagen_vq import VQConfig, VQModel, config_from_state_dict, preset_name
from ccalign.tokenizers.small_vq import TrainSettings, evaluate, restart_dead_codes, train
from ccalign.weights import CheckpointMismatchError
from support.fashion import write_fake_fashion_mnist

TINY = dict(codebook_size=64, codebook_embed_dim=4, ch=16, ch_mult=(1, 2), num_res_blocks=1,
            z_channels=16, norm_groups=4, usage_window=32, image_size=8)


def expected_llamagen_shapes(ch_mult, ch=128, z=256, res=2, k=16384, d=8) -> dict:
    """Every key and shape of a LlamaGen VQ, written out from reference-models.md section B."""
    shapes: dict[str, tuple] = {}

    def conv(name, cin, cout, ks):
        shapes[f"{name}.weight"] = (cout, cin, ks, ks)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels = len(ch_mult)
    conv("encoder.conv_in", 3, ch, 3)
    width = ch
    for i, m in enumerate(ch_mult):
        for r in range(res):
            resblock(f"encoder.conv_blocks.{i}.res.{r}", width, ch * m)
            width = ch * m
            if i == levels - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{r}", width)
        if i < levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", width, width, 3)
    for prefix in ("encoder", "decoder"):
        resblock(f"{prefix}.mid.0", ch * ch_mult[-1], ch * ch_mult[-1])
        attn(f"{prefix}.mid.1", ch * ch_mult[-1])
        resblock(f"{prefix}.mid.2", ch * ch_mult[-1], ch * ch_mult[-1])
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", width, z, 3)
    conv("decoder.conv_in", z, ch * ch_mult[-1], 3)
    width = ch * ch_mult[-1]
    for j, m in enumerate(reversed(ch_mult)):
        for r in range(res + 1):
            resblock(f"decoder.conv_blocks.{j}.res.{r}", width, ch * m)
            width = ch * m
            if j == 0:
                attn(f"decoder.conv_blocks.{j}.attn.{r}", width)
        if j < levels - 1:
            conv(f"decoder.conv_blocks.{j}.upsample.conv", width, width, 3)
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", width, 3, 3)
    conv("quant_conv", z, d, 1)
    conv("post_quant_conv", d, z, 1)
    shapes["quantize.embedding.weight"] = (k, d)
    shapes["quantize.codebook_used"] = (65536,)
    return shapes


def test_vq16_matches_the_released_layout():
    model = build("VQ-16")
    sd = model.state_dict()
    assert len(sd) == 344
    assert model.num_parameters() == 71_883_403
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_llamagen_shapes((1, 1, 2, 2, 4))
    assert sd["quantize.codebook_used"].dtype == torch.float32
    assert "encoder.conv_blocks.2.res.0.nin_shortcut.weight" in sd
    assert tuple(sd["decoder.conv_blocks.3.res.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert (model.vocab_size, model.grid, model.image_size, model.channels) == (16384, 16, 256, 3)
    assert build("VQ-16", image_size=384).grid == 24
    assert isinstance(model, ImageTokenizer)


def test_vq8_differs_only_in_ch_mult():
    model = build("VQ-8")
    shapes = expected_llamagen_shapes((1, 2, 2, 4))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    params = sum(math.prod(s) for k, s in shapes.items() if k != "quantize.codebook_used")
    assert model.num_parameters() == params
    assert model.grid == 32
    inferred = config_from_state_dict(model.state_dict())
    assert inferred == model.config and preset_name(inferred) == "VQ-8"


# ---- float64 transcription of the architecture (functional, from the spec) ----
def _gn(x, sd, name):
    return F.group_norm(x, 4, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _conv(x, sd, name, **kw):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def _ref_res(x, sd, name):
    h = _conv(F.silu(_gn(x, sd, f"{name}.norm1")), sd, f"{name}.conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, f"{name}.norm2")), sd, f"{name}.conv2", padding=1)
    skip = _conv(x, sd, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in sd else x
    return skip + h


def _ref_attn(x, sd, name):
    b, c, hh, ww = x.shape
    n = _gn(x, sd, f"{name}.norm")
    q, k, v = (_conv(n, sd, f"{name}.{p}").reshape(b, c, -1) for p in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
    return x + _conv(out, sd, f"{name}.proj_out")


def _ref_encoder(x, sd):
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    for i in range(2):  # TINY: two levels, one res block each, attention at the last level
        h = _ref_res(h, sd, f"encoder.conv_blocks.{i}.res.0")
        if i == 1:
            h = _ref_attn(h, sd, "encoder.conv_blocks.1.attn.0")
        else:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, "encoder.conv_blocks.0.downsample.conv",
                      stride=2)
    h = _ref_res(h, sd, "encoder.mid.0")
    h = _ref_res(_ref_attn(h, sd, "encoder.mid.1"), sd, "encoder.mid.2")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1)
    return _conv(h, sd, "quant_conv")


def _ref_decoder(z, sd):
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = _ref_res(h, sd, "decoder.mid.0")
    h = _ref_res(_ref_attn(h, sd, "decoder.mid.1"), sd, "decoder.mid.2")
    for j in range(2):
        for r in range(2):
            h = _ref_res(h, sd, f"decoder.conv_blocks.{j}.res.{r}")
            if j == 0:
                h = _ref_attn(h, sd, f"decoder.conv_blocks.0.attn.{r}")
        if j == 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = _conv(h, sd, "decoder.conv_blocks.0.upsample.conv", padding=1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


def _tiny(seed=0, **kw) -> VQModel:
    torch.manual_seed(seed)
    model = VQModel(VQConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():  # give every weight, norms included, a non-trivial value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_encode_decode_match_float64_transcription():
    model = _tiny()
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    h64 = _ref_encoder(x.double(), sd)
    torch.testing.assert_close(model.latents(x).double(), h64, rtol=1e-4, atol=1e-5)
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    emb = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    z = torch.zeros(3, 4, 4, 4, dtype=torch.float64)
    for b in range(3):
        for r in range(4):
            for c in range(4):  # raster order: token r * grid + c sits at row r, column c
                z[b, :, r, c] = emb[codes[b, r * 4 + c]]
    torch.testing.assert_close(model.decode(codes).double(), _ref_decoder(z, sd),
                               rtol=1e-4, atol=1e-5)


def test_encode_picks_nearest_normalised_code_like_brute_force_float64():
    model = _tiny(codebook_size=4096, codebook_embed_dim=8, seed=3)
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    codes = model.encode(x)
    h = model.latents(x).double()
    emb = model.quantize.embedding.weight.double()
    emb = emb / emb.norm(dim=1, keepdim=True)
    checked = 0
    for b in range(8):
        for r in range(4):
            for c in range(4):
                v = h[b, :, r, c] / h[b, :, r, c].norm()
                d = ((emb - v) ** 2).sum(1)
                best, second = torch.topk(d, 2, largest=False).values
                if second - best > 1e-5:  # float32 cannot separate nearer ties
                    assert codes[b, r * 4 + c] == d.argmin()
                    checked += 1
    assert checked >= 120  # of 128: near-ties are rare


def test_decode_rejects_codes_outside_the_vocabulary():
    model = _tiny()
    with pytest.raises(ValueError, match="64 codes"):
        model.decode(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match="square"):
        model.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 9, 9))


def test_saved_and_reloaded_tokenizer_is_identical(tmp_path):
    model = _tiny()
    save(model, tmp_path / "tok.safetensors")
    again = load(tmp_path / "tok.safetensors")
    assert again.config == model.config
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    codes = model.encode(x)
    assert torch.equal(again.encode(x), codes)
    assert torch.equal(again.decode(codes), model.decode(codes))
    # float16 storage: loading and storing again changes nothing further
    save(again, tmp_path / "half.safetensors", dtype=torch.float16)
    half = load(tmp_path / "half.safetensors")
    save(half, tmp_path / "half2.safetensors", dtype=torch.float16)
    half2 = load(tmp_path / "half2.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(half.state_dict().values(),
                                                 half2.state_dict().values(), strict=True))
    assert (tmp_path / "half.safetensors").stat().st_size < (tmp_path / "tok.safetensors").stat(
    ).st_size * 0.6


def test_official_file_layouts_load_strictly(tmp_path):
    official_like = dict(ch=32, z_channels=32, norm_groups=32)  # GroupNorm(32) as released
    model, ema = _tiny(seed=5, **official_like), _tiny(seed=6, **official_like)
    torch.save({"model": model.state_dict(), "optimizer": {}, "steps": 10}, tmp_path / "a.pt")
    loaded = load(tmp_path / "a.pt", image_size=8)
    assert loaded.config == model.config
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    # both present: "model", the weights LlamaGen's samplers decode with; "ema" only alone
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "b.pt")
    assert torch.equal(load(tmp_path / "b.pt", image_size=8).encode(x), model.encode(x))
    assert not torch.equal(model.encode(x), ema.encode(x))
    torch.save({"ema": ema.state_dict(), "steps": 10}, tmp_path / "b2.pt")
    assert torch.equal(load(tmp_path / "b2.pt", image_size=8).encode(x), ema.encode(x))
    torch.save({"weights": model.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointMismatchError, match="ema"):
        load(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not a VQ-16 tokenizer"):
        load(tmp_path / "a.pt", "VQ-16")
    broken = dict(model.state_dict())
    broken.pop("decoder.conv_out.bias")
    torch.save({"model": broken}, tmp_path / "d.pt")
    with pytest.raises(CheckpointMismatchError, match="decoder.conv_out.bias"):
        load(tmp_path / "d.pt")
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 4)}}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="not a LlamaGen-style VQ"):
        load(tmp_path / "e.pt")
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load(tmp_path / "missing.pt")


def test_build_names():
    assert build("small").config.grid == 7
    with pytest.raises(ValueError, match="VQ-16"):
        build("VQ-32")


def test_training_lowers_error_and_restarts_dead_codes():
    torch.manual_seed(0)
    model = VQModel(VQConfig(**{**TINY, "in_channels": 1, "codebook_size": 32}))
    images = (torch.rand(64, 8, 8) * 255).to(torch.uint8)
    images[:, 2:5, :] = 0  # shared structure, so there is something to learn
    before = evaluate(model, images)
    settings = TrainSettings(steps=25, batch_size=16, warmup=5, lr=3e-3, restart_every=5,
                             log_every=100)
    history = train(model, images, settings, log=lambda m: None)
    after = evaluate(model, images)
    assert after["mse"] < 0.8 * before["mse"]
    assert len(history.steps) == 2
    assert 1 <= after["codes_used"] <= 32 and 1 <= after["perplexity"] <= after["codes_used"]


def test_restart_moves_exactly_the_dead_codes_onto_encoder_outputs():
    model = _tiny(seed=7)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 17, 40]] = True
    before = model.quantize.embedding.weight.detach().clone()
    moved = restart_dead_codes(model, x, dead, torch.Generator().manual_seed(0))
    after = model.quantize.embedding.weight.detach()
    assert moved == 3
    assert torch.equal(after[~dead], before[~dead])
    pool = F.normalize(model.latents(x).permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    for row in after[dead]:
        assert torch.isclose(pool, row, atol=1e-6).all(1).any()


def test_evaluate_reports_usage_and_perplexity_of_the_codes():
    model = _tiny(in_channels=1)
    images = (torch.rand(10, 8, 8) * 255).to(torch.uint8)
    x = images.float().div(255).sub(0.5).div(0.5)[:, None]
    codes = model.encode(x)
    counts = torch.bincount(codes.flatten(), minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    recon = model.decode(codes).clamp(-1, 1)
    stats = evaluate(model, images, batch_size=3)
    assert stats["codes_used"] == int((counts > 0).sum())
    assert stats["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
    assert stats["mse"] == pytest.approx(((recon - x) / 2).pow(2).mean().item(), rel=1e-5)


@pytest.mark.skipif(not FMNIST_VQ_PATH.exists(), reason="bundled tokenizer not built")
def test_bundled_fashion_mnist_tokenizer_loads():
    tok = load("fmnist-vq")
    assert (tok.vocab_size, tok.grid, tok.image_size, tok.channels) == (512, 7, 28, 1)
    images = tok.decode(torch.zeros(2, 49, dtype=torch.long))
    assert images.shape == (2, 1, 28, 28)
    assert FMNIST_VQ_PATH.stat().st_size < 600_000


def test_train_tokenizer_command_writes_model_metrics_and_figure(tmp_path, capsys):
    import json

    from PIL import Image

    from ccalign.cli import main

    _, labels = write_fake_fashion_mnist(tmp_path / "fm", train=32, test=20)
    out = tmp_path / "vq.safetensors"
    rc = main(["train-tokenizer", "--fashion-mnist-folder", str(tmp_path / "fm"), "--out",
               str(out), "--steps", "2", "--batch-size", "8", "--codebook-size", "16",
               "--threads", "1", "--recon-png", str(tmp_path / "r.png"), "--metrics-json",
               str(tmp_path / "m.json")])
    assert rc == 0
    tok = load(out)
    assert (tok.vocab_size, tok.grid, tok.channels) == (16, 7, 1)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 2 and 0 < metrics["mse"] < 1 and metrics["codes_used"] <= 16
    assert json.loads(capsys.readouterr().out) == metrics
    classes_with_two = int((np.bincount(labels["test"]) >= 2).sum())
    with Image.open(tmp_path / "r.png") as png:  # 2 x (originals, reconstructions), 3x scale
        assert png.size == (classes_with_two * 28 * 3, 4 * 28 * 3)


def test_train_tokenizer_command_trains_the_multiscale_kind(tmp_path, capsys):
    from ccalign.cli import main
    from ccalign.tokenizers.var_vq import VarVQ

    write_fake_fashion_mnist(tmp_path / "fm", train=32, test=20)
    out = tmp_path / "msvq.safetensors"
    common = ["train-tokenizer", "--fashion-mnist-folder", str(tmp_path / "fm"), "--out",
              str(out), "--steps", "2", "--batch-size", "8", "--codebook-size", "16",
              "--threads", "1"]
    assert main([*common, "--kind", "multiscale", "--patch-nums", "1,3,7"]) == 0
    tok = load(out)
    assert isinstance(tok, VarVQ) and isinstance(tok, ImageTokenizer)
    assert (tok.vocab_size, tok.grid, tok.seq_len, tok.image_size) == (16, 7, 59, 28)
    codes = tok.encode(torch.zeros(2, 1, 28, 28))
    assert codes.shape == (2, 59) and tok.decode(codes).shape == (2, 1, 28, 28)
    capsys.readouterr()
    assert main([*common, "--patch-nums", "1,3,7"]) != 0
    assert "--kind multiscale only" in capsys.readouterr().err
    assert main([*common, "--kind", "multiscale", "--image-size", "32"]) != 0
    assert "encodes 28 px" in capsys.readouterr().err
