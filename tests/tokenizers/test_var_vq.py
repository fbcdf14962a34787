"""VAR's multi-scale VQVAE: official keys and counts, residual quantisation against a float64
re-derivation, decoding, strict files recognised by their keys."""

import pytest
import torch
import torch.nn.functional as F

from ccalign.multiscale import MultiScaleQuantizer
from ccalign.tokenizers import ImageTokenizer, files, var_vq
from ccalign.weights import CheckpointMismatchError
from support.resampling import area_matrix, bicubic_matrix, resample

TINY = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
            patch_nums=(1, 2, 3, 4))


def tiny_vq(seed: int = 0) -> var_vq.VarVQ:
    torch.manual_seed(seed)
    model = var_vq.VarVQ(var_vq.VarVQConfig(**TINY))
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 0.5)
    return model.eval()


def test_official_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = var_vq.VarVQ(var_vq.VarVQConfig())
    sd = model.state_dict()
    assert len(sd) == 324 and model.num_parameters() == 108_948_355
    expected = {
        "quantize.embedding.weight": (4096, 32), "quantize.ema_vocab_hit_SV": (10, 4096),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quant_conv.weight": (32, 32, 3, 3), "post_quant_conv.weight": (32, 32, 3, 3),
        "encoder.mid.attn_1.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "decoder.up.4.attn.2.proj_out.weight": (640, 640, 1, 1),
        "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "decoder.conv_out.weight": (3, 160, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert "encoder.down.4.downsample.conv.weight" not in sd
    assert var_vq.config_from_state_dict(sd) == model.config
    assert model.image_size == 256 and model.seq_len == 680 and model.grid == 16


def reference_codes(q: MultiScaleQuantizer, f: torch.Tensor) -> torch.Tensor:
    """Residual quantisation from the spec in float64 with hand-written resampling: area average,
    nearest code by explicit squared distance, f_hat += phi(bicubic(code map))."""
    book = q.embedding.weight.double()
    rest, side, codes = f.double().clone(), f.shape[-1], []
    for si, pn in enumerate(q.patch_nums):
        z = resample(rest, area_matrix(side, pn)).permute(0, 2, 3, 1)  # (B, pn, pn, C)
        idx = ((z[..., None, :] - book) ** 2).sum(-1).argmin(-1)  # (B, pn, pn)
        h = book[idx].permute(0, 3, 1, 2)
        if pn != side:
            h = resample(h, bicubic_matrix(pn, side))
        conv = q.phi(si)
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)
        rest = rest - h
        codes.append(idx.flatten(1))
    return torch.cat(codes, 1)


def test_encode_is_residual_quantisation_over_the_scales():
    model = tiny_vq()
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    codes = model.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (3, 30)
    assert torch.equal(codes, reference_codes(model.quantize, model.latents(images)))
    f = torch.randn(4, 4, 4, 4)
    assert torch.equal(model.quantize.encode(f), reference_codes(model.quantize, f))


def test_decode_sums_phis_of_upsampled_code_maps():
    model = tiny_vq()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (2, 30), generator=g)
    book, q = model.quantize.embedding.weight.double(), model.quantize
    f_hat, start = torch.zeros(2, 4, 4, 4, dtype=torch.float64), 0
    for si, pn in enumerate(q.patch_nums):
        h = book[codes[:, start : start + pn * pn]].view(2, pn, pn, 4).permute(0, 3, 1, 2)
        start += pn * pn
        h = resample(h, bicubic_matrix(pn, 4)) if pn != 4 else h
        conv = q.phi(si)
        f_hat += 0.5 * h + 0.5 * F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)
    torch.testing.assert_close(q.codes_to_fhat(codes).double(), f_hat, rtol=0, atol=1e-6)
    images = model.decode(codes)
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1
    with torch.no_grad():
        expected = model.decoder(model.post_quant_conv(f_hat.float())).clamp(-1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert isinstance(model, ImageTokenizer)


def test_bad_inputs_are_named():
    model = tiny_vq()
    with pytest.raises(ValueError, match=r"\(batch, 3, 8, 8\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="codebook has 16"):
        model.decode(torch.full((1, 30), 16))
    with pytest.raises(ValueError, match=r"\(B, 30\)"):
        model.decode(torch.zeros(1, 29, dtype=torch.long))


def test_files_recognise_official_and_ccalign_layouts(tmp_path):
    model = tiny_vq()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.save(model.state_dict(), tmp_path / "vae.pth")  # VAR's raw state_dict layout
    official = files.load(tmp_path / "vae.pth")
    assert isinstance(official, var_vq.VarVQ)  # recognised by its keys
    # the file does not record the scales: the 256 px ones are assumed unless told
    assert official.config.patch_nums == var_vq.PATCH_NUMS_256
    told = var_vq.load(tmp_path / "vae.pth", patch_nums=(1, 2, 3, 4))
    assert torch.equal(told.encode(images), model.encode(images))
    files.save(told, tmp_path / "vae.safetensors")
    again = files.load(tmp_path / "vae.safetensors")
    assert again.config == model.config
    assert torch.equal(again.encode(images), model.encode(images))
    assert not any(p.requires_grad for p in again.parameters())


def test_mismatched_file_lists_every_problem(tmp_path):
    sd = tiny_vq().state_dict()
    sd.pop("decoder.conv_out.bias")
    sd["quant_conv.weight"] = torch.zeros(4, 4, 1, 1)
    sd["encoder.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        var_vq.load(tmp_path / "bad.pth", patch_nums=(1, 2, 3, 4))
    text = str(err.value)
    assert "bad.pth" in text and "decoder.conv_out.bias" in text and "encoder.extra" in text
    with pytest.raises(ValueError, match="not a VAR multi-scale VQVAE"):
        var_vq.config_from_state_dict({"encoder.conv_in.weight": torch.zeros(1)})


def test_training_pass_straight_through_and_vq_loss():
    model = tiny_vq().train().requires_grad_(True)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    recon, loss, codes = model(images)
    assert recon.shape == images.shape and torch.equal(codes, model.encode(images))
    f = model.latents(images).detach()
    q = model.quantize
    fhats, start, total = [], 0, 0.0
    f_hat = torch.zeros_like(f)
    for si, pn in enumerate(q.patch_nums):
        f_hat = f_hat + q.upsampled(si, q.code_map(codes[:, start : start + pn * pn])).detach()
        start += pn * pn
        total += 1.25 * F.mse_loss(f_hat, f).item()
        fhats.append(f_hat)
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)
    torch.testing.assert_close(model.quantize(f)[0], fhats[-1], rtol=0, atol=1e-6)
    (recon.square().mean() + loss).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.0.weight", "decoder.conv_out.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_residuals_are_the_vectors_each_scale_quantises():
    q = tiny_vq().quantize
    f = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    rows = q.residuals(f)
    assert rows.shape == (3 * q.seq_len, 4)
    torch.testing.assert_close(rows[:3], f.mean((2, 3)))  # scale 1x1: the area-pooled latent
    nearest = torch.cdist(rows.double(), q.embedding.weight.double()).argmin(1)
    codes = q.encode(f)
    assert torch.equal(nearest, torch.cat([codes[:, s].reshape(-1) for s in q.scale_slices()]))
    f_hat_before_last = q.codes_to_fhat(
        torch.cat([codes[:, : 1 + 4 + 9], torch.zeros(3, 16, dtype=torch.long)], 1)
    ) - q.upsampled(3, q.code_map(torch.zeros(3, 16, dtype=torch.long)))
    last = (f - f_hat_before_last).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(rows[-48:], last, rtol=0, atol=1e-5)


def test_small_multiscale_vq_trains_and_restarts_dead_codes_on_residuals():
    from ccalign.tokenizers import small_vq

    torch.manual_seed(0)
    model = small_vq.build_small_multiscale(
        vocab_size=32, z_channels=4, ch=8, norm_groups=4, patch_nums=(1, 2)
    )
    assert model.image_size == 8 and model.seq_len == 5
    images = (torch.rand(64, 8, 8) * 255).to(torch.uint8)
    images[:, 2:5, :] = 0  # shared structure, so there is something to learn
    before = small_vq.evaluate(model, images)
    settings = small_vq.TrainSettings(
        steps=25, batch_size=16, warmup=5, lr=3e-3, restart_every=5, log_every=100
    )
    small_vq.train(model, images, settings, log=lambda m: None)
    after = small_vq.evaluate(model, images)
    assert after["mse"] < 0.8 * before["mse"] and 1 <= after["codes_used"] <= 32

    x = images[:4].float().div(127.5).sub(1)[:, None]
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[2, 9, 30]] = True
    book = model.quantize.embedding.weight
    old = book.detach().clone()
    assert small_vq.restart_dead_codes(model, x, dead, torch.Generator().manual_seed(0)) == 3
    assert torch.equal(book[~dead], old[~dead])
    with torch.no_grad():
        pool = model.quantize.residuals(model.latents(x))
    for row in book[dead].detach():
        assert torch.isclose(pool, row, atol=1e-6).all(1).any()
