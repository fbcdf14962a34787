"""VAR transformer: official keys / shapes / counts, exact teacher-forced forward against a float64
re-derivation, block-causality, memory-lean scoring, strict files, the frozen quantiser."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccalign.models import var
from ccalign.multiscale import phi_index, phi_ticks
from ccalign.tokenizers import var_vq
from ccalign.train.optim import param_groups
from ccalign.train.trainer import enable_activation_checkpointing
from ccalign.weights import CheckpointMismatchError
from support.resampling import area_matrix, bicubic_matrix, resample
from support.tiny import make_config

#: key count and parameter count of the released files (VAR's README / build_vae_var)
OFFICIAL = {
    "VAR-d16": (220, 310_283_520),
    "VAR-d20": (272, 600_917_136),
    "VAR-d24": (324, 1_033_399_360),
    "VAR-d30": (402, 2_010_020_356),
}
TINY = dict(depth=2, dim=32, n_head=2, patch_nums=(1, 2, 3, 4), vocab_size=16, vae_dim=4,
            num_classes=5)


def tiny(seed: int = 0, **overrides) -> var.VAR:
    """A tiny VAR whose every weight (biases and gates included) is random and O(0.1-1)."""
    torch.manual_seed(seed)
    model = var.build("custom", **{**TINY, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.7 if name.startswith("quantizer.") else 0.2))
    return model.eval()


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_keys_shapes_and_parameter_counts(name):
    with torch.device("meta"):
        model = var.build(name)
    keys, params = OFFICIAL[name]
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.")}
    assert len(sd) + 2 == keys and model.num_parameters() == params  # + the 2 derived keys
    sd.update(var.derived_official_state(model.config.patch_nums))
    depth = model.config.depth
    c = 64 * depth
    expected = {
        "pos_start": (1, 1, c), "pos_1LC": (1, 680, c), "lvl_1L": (1, 680),
        "attn_bias_for_masking": (1, 1, 680, 680), "word_embed.weight": (c, 32),
        "class_emb.weight": (1001, c), "lvl_embed.weight": (10, c),
        "head_nm.ada_lin.1.weight": (2 * c, c), "head.weight": (4096, c), "head.bias": (4096,),
        "blocks.0.attn.scale_mul_1H11": (1, depth, 1, 1), "blocks.0.attn.zero_k_bias": (c,),
        "blocks.0.attn.mat_qkv.weight": (3 * c, c), "blocks.0.ffn.fc1.weight": (4 * c, c),
        f"blocks.{depth - 1}.ada_lin.1.weight": (6 * c, c),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert model.config.drop_path == pytest.approx(0.1 * depth / 24)
    assert {k for k in model.state_dict() if k.startswith("quantizer.")} == {
        "quantizer.embedding.weight",
        *(f"quantizer.quant_resi.qresi_ls.{i}.{w}" for i in range(4) for w in ("weight", "bias")),
    }


def test_d36_is_the_512px_shared_adaln_model():
    with torch.device("meta"):
        model = var.build("VAR-d36")
    assert model.seq_len == 2240 and model.config.image_size == 512
    assert tuple(model.state_dict()["shared_ada_lin.1.weight"].shape) == (6 * 2304, 2304)
    assert tuple(model.state_dict()["blocks.0.ada_gss"].shape) == (1, 1, 6, 2304)


def test_phi_of_each_scale_is_vars_nearest_tick():
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    for count in range(1, 7):  # VAR's ticks: np.linspace, bit for bit
        edge = 1 / 3 / count if count == 4 else 1 / 2 / count
        assert phi_ticks(count) == np.linspace(edge, 1 - edge, count).tolist()


def test_init_follows_vars_init_weights():
    torch.manual_seed(0)
    model = var.build("custom", depth=4, dim=256, n_head=4)
    std = math.sqrt(1 / 256 / 3)
    assert model.class_emb.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.pos_1LC.std().item() == pytest.approx(std, rel=0.02)
    assert model.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.02)
    assert model.head_nm.ada_lin[1].weight.std().item() == pytest.approx(std * 0.5, rel=0.02)
    block = model.blocks[0]
    ada = block.ada_lin[1].weight
    assert ada[:512].std().item() == pytest.approx(std * 1e-5, rel=0.02)
    assert ada[512:].std().item() == pytest.approx(std * 0.5, rel=0.02)
    assert block.attn.proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.03)
    assert block.ffn.fc2.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.03)
    assert torch.equal(block.attn.scale_mul_1H11, torch.full((1, 4, 1, 1), math.log(4.0)))
    for bias in (block.attn.q_bias, block.attn.v_bias, block.attn.proj.bias, model.head.bias):
        assert not bias.any()


# ---- an independent float64 re-derivation of VAR's teacher-forced logits ----


def reference_inputs(model: var.VAR, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing input from the spec, with hand-written resampling: f_hat sums
    phi(bicubic(code map)); the next scale reads its area average."""
    cfg, q = model.config, model.quantizer
    book = q.embedding.weight.double()
    side, pieces, start = cfg.patch_nums[-1], [], 0
    f_hat = torch.zeros(tokens.shape[0], cfg.vae_dim, side, side, dtype=torch.float64)
    for si, pn in enumerate(cfg.patch_nums[:-1]):
        codes = tokens[:, start : start + pn * pn]
        start += pn * pn
        h = book[codes].reshape(-1, pn, pn, cfg.vae_dim).permute(0, 3, 1, 2)
        h = resample(h, bicubic_matrix(pn, side))
        conv = q.phi(si)
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)
        f_hat = f_hat + h
        small = resample(f_hat, area_matrix(side, cfg.patch_nums[si + 1]))
        pieces.append(small.flatten(2).transpose(1, 2))
    return torch.cat(pieces, 1)


def reference_logits(model: var.VAR, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    c, h, hd = cfg.dim, cfg.n_head, cfg.head_dim

    def lin(x, name):
        return x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0)

    def ln(x):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + cfg.norm_eps)

    def silu(x):
        return x / (1 + torch.exp(-x))

    cond = p["class_emb.weight"][labels]
    x = torch.cat([cond[:, None] + p["pos_start"], lin(reference_inputs(model, tokens),
                                                       "word_embed")], 1)
    level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)])
    x = x + p["lvl_embed.weight"][level] + p["pos_1LC"]
    allowed = level[:, None] >= level[None, :]
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        if cfg.shared_aln:
            mods = lin(silu(cond), "shared_ada_lin.1").view(-1, 1, 6, c) + p[f"{b}.ada_gss"]
        else:
            mods = lin(silu(cond), f"{b}.ada_lin.1").view(-1, 1, 6, c)
        g1, g2, s1, s2, sh1, sh2 = mods.unbind(2)
        a = ln(x) * (1 + s1) + sh1
        qkv = a @ p[f"{b}.attn.mat_qkv.weight"].T
        qkv = qkv + torch.cat([p[f"{b}.attn.q_bias"], torch.zeros(c, dtype=torch.float64),
                               p[f"{b}.attn.v_bias"]])
        q, k, v = qkv.view(x.shape[0], -1, 3, h, hd).unbind(2)
        heads = []
        for j in range(h):
            qj = q[:, :, j] / q[:, :, j].norm(dim=-1, keepdim=True)
            kj = k[:, :, j] / k[:, :, j].norm(dim=-1, keepdim=True)
            qj = qj * torch.exp(torch.clamp(p[f"{b}.attn.scale_mul_1H11"][0, j, 0, 0],
                                            max=math.log(100)))
            scores = (qj @ kj.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, :, j])
        x = x + lin(torch.cat(heads, -1), f"{b}.attn.proj") * g1
        a = ln(x) * (1 + s2) + sh2
        hidden = lin(a, f"{b}.ffn.fc1")
        gelu = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                              * (hidden + 0.044715 * hidden**3)))
        x = x + lin(gelu, f"{b}.ffn.fc2") * g2
    scale, shift = lin(silu(cond), "head_nm.ada_lin.1").view(-1, 1, 2, c).unbind(2)
    return lin(ln(x) * (1 + scale) + shift, "head")


def random_tokens(model: var.VAR, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, model.seq_len), generator=g)


#: VAR's ten 256 px scales (16 -> 13 and 13 -> 16 resample by non-integer ratios), one block
REAL_SCALES = dict(depth=1, dim=64, n_head=1, patch_nums=var.PATCH_NUMS_256, vocab_size=64,
                   vae_dim=8)


@pytest.mark.parametrize("arch", [{}, {"shared_aln": True}, REAL_SCALES])
def test_logits_equal_float64_reference(arch):
    model = tiny(**arch)
    n, dim, vocab = model.seq_len, model.config.vae_dim, model.vocab_size
    tokens, labels = random_tokens(model, 3), torch.tensor([0, 4, 5])  # 5 = the null class
    inputs = model.quantizer.teacher_forcing_input(tokens)
    assert inputs.dtype == torch.float32 and inputs.shape == (3, n - 1, dim)
    expected = reference_inputs(model, tokens)  # float32 sums over up to 9 scales: ~1e-6 off
    torch.testing.assert_close(inputs.double(), expected, rtol=0, atol=1e-5)
    logits = model.logits(labels, tokens)
    assert logits.dtype == torch.float32 and logits.shape == (3, n, vocab)
    torch.testing.assert_close(logits.double(), reference_logits(model, labels, tokens),
                               rtol=0, atol=2e-5)


def test_block_causal_a_scale_sees_only_earlier_scales():
    model = tiny()
    tokens, labels = random_tokens(model, 2), torch.tensor([1, 2])
    base = model.logits(labels, tokens)
    starts = model.config.scale_starts()
    for si in range(len(model.config.patch_nums)):
        changed = tokens.clone()
        changed[:, starts[si] : starts[si + 1]] = (changed[:, starts[si] : starts[si + 1]] + 1) % 16
        out = model.logits(labels, changed)
        assert torch.equal(out[:, : starts[si + 1]], base[:, : starts[si + 1]])
        if si + 1 < len(model.config.patch_nums):
            assert not torch.allclose(out[:, starts[si + 1] :], base[:, starts[si + 1] :])


@pytest.mark.numerics
def test_sequence_logprob_equals_log_softmax_in_any_chunking_and_trains_no_quantizer():
    model = tiny().train()  # dropout and drop path are 0: train mode changes nothing
    tokens, labels = random_tokens(model, 2), torch.tensor([3, 0])
    exact = tiny().double()  # float64: sums of ~30 terms in another order agree to ~1e-15
    expected = exact.logits(labels, tokens).log_softmax(-1).gather(2, tokens[..., None]).sum((1, 2))
    for rows in (4096, 7):
        torch.testing.assert_close(exact(labels, tokens, chunk_rows=rows), expected,
                                   rtol=1e-12, atol=0)
        # float32: the same up to float32 rounding of ~30 terms of size ~5 (a few ulps of ~100)
        torch.testing.assert_close(model(labels, tokens, chunk_rows=rows), expected.float(),
                                   rtol=2e-6, atol=0)
    model(labels, tokens, chunk_rows=7).sum().backward()
    frozen = [p for k, p in model.named_parameters() if k.startswith("quantizer.")]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p.grad is not None for k, p in model.named_parameters() if p.requires_grad)
    trained = {id(p) for group in param_groups(model, 0.05) for p in group["params"]}
    assert trained.isdisjoint(id(p) for p in frozen)
    assert len(trained) == len(list(model.parameters())) - len(frozen)


def test_labels_are_never_dropped_and_bad_inputs_are_named():
    model = tiny()
    tokens = random_tokens(model, 4)
    labels = torch.tensor([0, 1, 2, 3])
    first = model.logits(labels, tokens)
    assert torch.equal(model.train().logits(labels, tokens), first)
    null = model.logits(torch.full((4,), 5), tokens)
    assert not torch.allclose(null, first)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\]"):
        model.logits(torch.tensor([0, 1, 2, 6]), tokens)
    with pytest.raises(ValueError, match="hold 30"):
        model.logits(labels, tokens[:, :29])
    with pytest.raises(ValueError, match="codebook has 16"):
        model.logits(labels, tokens + 16)
    with pytest.raises(ValueError, match="unknown VAR model"):
        var.build("VAR-d17")


def test_activation_checkpointing_and_meta_rebuild_keep_the_model():
    model = tiny()
    tokens, labels = random_tokens(model, 2), torch.tensor([1, 4])
    model(labels, tokens).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    enable_activation_checkpointing(model)
    model(labels, tokens).sum().backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=0, atol=1e-6)
    with torch.device("meta"):
        copy = type(model)(model.config)  # what the trainer does to save
    copy.to_empty(device="cpu").load_state_dict(model.state_dict())
    assert torch.equal(copy.eval().logits(labels, tokens), model.logits(labels, tokens))


def test_save_load_round_trip_and_official_layout(tmp_path):
    model = tiny()
    tokens, labels = random_tokens(model, 2), torch.tensor([1, 4])
    # the state is finite floats only (trainer checks, EMA): the derived keys are not state
    assert all(v.is_floating_point() and v.isfinite().all() for v in model.state_dict().values())
    var.save(model, tmp_path / "m.safetensors")
    again = var.load(tmp_path / "m.safetensors").eval()
    assert again.config == model.config
    assert torch.equal(again.logits(labels, tokens), model.logits(labels, tokens))
    var.save(model, tmp_path / "official.pth", official=True)
    raw = torch.load(tmp_path / "official.pth", weights_only=True)
    assert set(raw) == {k for k in model.state_dict() if not k.startswith("quantizer.")} | {
        "attn_bias_for_masking", "lvl_1L"}
    assert raw["lvl_1L"].tolist() == [[0, 1, 1, 1, 1] + [2] * 9 + [3] * 16]
    mask = raw["attn_bias_for_masking"][0, 0]  # VAR's: 0 where the query's scale >= the key's
    level = torch.tensor([0, 1, 1, 1, 1] + [2] * 9 + [3] * 16)
    assert torch.equal(mask == 0, level[:, None] >= level[None, :]) and mask.min() == -math.inf
    with pytest.raises(ValueError, match="preset name"):
        var.load(tmp_path / "official.pth", "custom")
    loaded = var.load(tmp_path / "official.pth", "custom", vae=model.quantizer, **TINY).eval()
    assert torch.equal(loaded.logits(labels, tokens), model.logits(labels, tokens))
    vae = var_vq.VarVQ(var_vq.VarVQConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2),
                                           num_res_blocks=1, patch_nums=(1, 2, 3, 4)))
    vae.quantize.load_state_dict(model.quantizer.state_dict(), strict=False)
    torch.save(vae.state_dict(), tmp_path / "vae.pth")  # VAR's raw VQVAE layout
    vae = var_vq.load(tmp_path / "vae.pth", patch_nums=TINY["patch_nums"])
    from_path = var.load(tmp_path / "official.pth", "custom", vae=vae, **TINY)
    assert torch.equal(from_path.eval().logits(labels, tokens), model.logits(labels, tokens))
    other = tiny(seed=5)
    with pytest.raises(ValueError, match="different quantiser"):
        var.load(tmp_path / "m.safetensors", vae=other.quantizer)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    model = tiny()
    raw = var.official_state_dict(model)
    raw.pop("blocks.1.ffn.fc2.bias")
    raw["blocks.0.attn.extra"] = torch.zeros(1)
    raw["head.weight"] = torch.zeros(17, 32)
    torch.save(raw, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        var.load(tmp_path / "bad.pth", "custom", vae=model.quantizer, **TINY)
    text = str(err.value)
    pieces = ("blocks.1.ffn.fc2.bias", "blocks.0.attn.extra", "head.weight: checkpoint (17, 32)")
    for piece in (*pieces, "VAR-d16"):
        assert piece in text
    good = var.official_state_dict(model)
    for bad, message in (({k: v for k, v in good.items() if k != "attn_bias_for_masking"},
                          "missing key"),
                         ({**good, "attn_bias_for_masking": torch.zeros(1, 1, 30, 30)},
                          "attn_bias_for_masking .* is not VAR's"),
                         ({**good, "lvl_1L": torch.zeros(1, 30, dtype=torch.long)},
                          "lvl_1L .* is not VAR's")):
        torch.save(bad, tmp_path / "bad_mask.pth")
        with pytest.raises(CheckpointMismatchError, match=message):
            var.load(tmp_path / "bad_mask.pth", "custom", vae=model.quantizer, **TINY)
    with pytest.raises(ValueError, match="does not fit this VAR"):
        var.build("custom", **{**TINY, "vae_dim": 8}, vae=model.quantizer)


def test_chunked_logprob_never_keeps_full_vocab_tensor_and_matches_gradients():
    model = tiny(vocab_size=2048).train()
    tokens, labels = random_tokens(model, 2), torch.tensor([0, 1])
    sizes, params = [], {p.data_ptr() for p in model.parameters()}

    def pack(t):
        if t.data_ptr() not in params:  # weights are saved by reference: not activations
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(labels, tokens, chunk_rows=8).sum().backward()
    chunked = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    full = 2 * 30 * 2048
    assert max(sizes) <= full / 8, max(sizes)
    model.zero_grad()
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model.logits(labels, tokens)
        logits.log_softmax(-1).gather(2, tokens[..., None]).sum().backward()
    assert max(sizes) >= full  # the naive path does keep it: the probe sees it
    for k, p in model.named_parameters():
        if p.requires_grad:
            scale = chunked[k].abs().max().item()
            torch.testing.assert_close(p.grad, chunked[k], rtol=1e-4, atol=1e-5 * scale + 1e-9)


def test_drop_path_only_in_training_and_bf16_autocast_runs_vars_way():
    model = tiny(drop_path=0.5)
    tokens, labels = random_tokens(model, 4), torch.tensor([0, 1, 2, 3])
    assert torch.equal(model.logits(labels, tokens), model.logits(labels, tokens))
    model.train()
    torch.manual_seed(1)
    first = model(labels, tokens)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(labels, tokens))
    torch.manual_seed(1)
    assert torch.equal(first, model(labels, tokens))  # the same seed, the same branches dropped
    model.eval()
    exact = model.logits(labels, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.logits(labels, tokens)
        scores = model(labels, tokens)
    assert low.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=0, atol=0.1)
    assert (low - exact).abs().max() > 0  # it did run in bf16


def test_trainer_fine_tunes_a_var_model_like_llamagen(tmp_path):
    """CCA steps with activation checkpointing and an EMA: the transformer moves, the frozen
    quantiser does not, and every saved float stays finite."""
    from ccalign.train.trainer import Trainer

    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, labels = random_tokens(model, 16), torch.arange(16) % 5
    config = make_config(tmp_path / "run", train={"steps": 2, "activation_checkpointing": True},
                         method={"uncond_ratio": 0.25}, optim={"ema_decay": 0.9})
    trainer = Trainer(config, model, list(zip(tokens, labels, strict=True)))
    trainer.fit()
    after = trainer.model.state_dict()
    frozen = [k for k in before if k.startswith("quantizer.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [k for k, p in model.named_parameters() if p.requires_grad]
    assert all(not torch.equal(before[k], after[k]) for k in moved)
    assert all(v.isfinite().all() for v in trainer.ema.state_dict()["shadow"].values())
