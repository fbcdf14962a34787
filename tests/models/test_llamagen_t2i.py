"""LlamaGen T2I: the released layout, the official masking of left-padded captions (against an
independent re-implementation: the official code cannot ship here), greedy sampling with and
without CFG, the caption condition kind, caption files and `ccalign sample --caption-features`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccalign import tokenizers
from ccalign.cli import main
from ccalign.conditions import CaptionBatch, Captions
from ccalign.data.captions import CaptionFile, write_caption_file
from ccalign.models import families
from ccalign.models.family import ModelSpec
from ccalign.models.llamagen import T2I_FAMILY, LlamaGenT2I, LlamaGenT2IConfig, rope_2d_table
from ccalign.sample import Sampler

L, C, GRID, VOCAB = 7, 12, 3, 40
TINY = dict(dim=32, n_layer=2, n_head=4, grid=GRID, vocab_size=VOCAB, caption_len=L,
            caption_dim=C)


def tiny(seed: int = 0, std: float = 0.1, dtype=torch.float32, **changes) -> LlamaGenT2I:
    torch.manual_seed(seed)
    model = LlamaGenT2I(LlamaGenT2IConfig(**{**TINY, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.to(dtype).eval()


def captions(lengths, seed: int = 1, dtype=torch.float32) -> CaptionBatch:
    """Left-padded captions of the given token counts, padded features zero."""
    g = torch.Generator().manual_seed(seed)
    features = torch.zeros(len(lengths), L, C, dtype=dtype)
    mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    for row, n in enumerate(lengths):
        features[row, L - n :] = torch.randn(n, C, generator=g, dtype=dtype)
        mask[row, L - n :] = True
    return CaptionBatch.of(features, mask)


# ---- an independent transcription of the official T2I forward ----
def official_mask(caption_mask: torch.Tensor, length: int) -> torch.Tensor:
    """dataset/t2i.py and generate(): tril * caption mask on the first L columns, then
    mask * (1 - eye) + eye, as bool (B, 1, S, S)."""
    masks = []
    for row in caption_mask.float():
        m = torch.tril(torch.ones(length, length))
        m[:, :L] = m[:, :L] * row[None, :]
        eye = torch.eye(length)
        masks.append((m * (1 - eye) + eye).bool())
    return torch.stack(masks)[:, None]


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    xs = x.reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    return torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                        xs[..., 1] * cos + xs[..., 0] * sin], -1).flatten(3)


def reference_logits(model: LlamaGenT2I, conds: CaptionBatch, prefix: torch.Tensor) -> torch.Tensor:
    """Logits at every position of [caption; image tokens ``prefix``], recomputed from the
    weights: CaptionEmbedder (null rows: uncond_embedding), blocks, norm, output."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    cap = torch.where(conds.null[:, None, None], sd["cls_embedding.uncond_embedding"],
                      conds.features.double())
    x = F.gelu(cap @ sd["cls_embedding.cap_proj.fc1.weight"].T, approximate="tanh")
    h = torch.cat([x @ sd["cls_embedding.cap_proj.fc2.weight"].T,
                   sd["tok_embeddings.weight"][prefix]], dim=1)
    s, hd = h.shape[1], cfg.dim // cfg.n_head
    table = rope_2d_table(cfg.grid, hd, cfg.rope_base, L, cfg.width)[:s].double()
    mask = official_mask(conds.mask, s)

    def norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        a = norm(h, sd[p + "attention_norm.weight"])
        q, k, v = (a @ sd[p + "attention.wqkv.weight"].T).split(cfg.dim, -1)
        q, k = (rotate(t.view(*t.shape[:2], cfg.n_head, hd), table) for t in (q, k))
        v = v.view(*v.shape[:2], cfg.n_head, hd)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                             attn_mask=mask)
        h = h + out.transpose(1, 2).reshape(h.shape) @ sd[p + "attention.wo.weight"].T
        f = norm(h, sd[p + "ffn_norm.weight"])
        w1, w3 = sd[p + "feed_forward.w1.weight"], sd[p + "feed_forward.w3.weight"]
        gate = F.silu(f @ w1.T) * (f @ w3.T)
        h = h + gate @ sd[p + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


def reference_greedy(model: LlamaGenT2I, conds: CaptionBatch, cfg_scale: float) -> torch.Tensor:
    """generate() with top-k 1: the null rows are the null caption under the same masks."""
    kind = Captions(L, C)
    rows = kind.cat([conds, kind.null_like(conds)]) if cfg_scale > 1 else conds
    b = len(conds)
    tokens = torch.zeros(b, 0, dtype=torch.long)
    for _ in range(model.seq_len):
        logits = reference_logits(model, rows, tokens.repeat(len(rows) // b, 1))[:, -1]
        if cfg_scale > 1:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + (cond - uncond) * cfg_scale
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_keys_and_shapes_are_the_released_layout():
    state = tiny().state_dict()
    outside = sorted(k for k in state if not k.startswith("layers."))
    assert outside == ["cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
                       "cls_embedding.uncond_embedding", "norm.weight", "output.weight",
                       "tok_embeddings.weight"]
    assert state["cls_embedding.cap_proj.fc1.weight"].shape == (32, C)
    assert state["cls_embedding.uncond_embedding"].shape == (L, C)
    assert "cls_embedding.uncond_embedding" not in dict(tiny().named_parameters())  # a buffer


@pytest.mark.numerics
def test_teacher_forced_logits_equal_the_official_masking_in_float64():
    model = tiny().double()
    conds = captions([L, 3, 1], dtype=torch.float64)
    conds = CaptionBatch(conds.features, conds.mask, torch.tensor([False, False, True]))
    tokens = torch.randint(0, VOCAB, (3, GRID * GRID), generator=torch.Generator().manual_seed(2))
    expected = reference_logits(model, conds, tokens[:, :-1])[:, L - 1 :]
    torch.testing.assert_close(model.logits(conds, tokens), expected, rtol=1e-10, atol=1e-10)
    logp = model(conds, tokens)
    expected_logp = expected.log_softmax(-1).gather(2, tokens[..., None]).squeeze(-1).sum(1)
    torch.testing.assert_close(logp, expected_logp, rtol=1e-10, atol=1e-10)


def test_padded_caption_tokens_do_not_reach_the_image():
    model = tiny()
    conds = captions([3, 3])
    noisy = conds.features.clone()
    noisy[:, : L - 3] = torch.randn(2, L - 3, C)  # padding slots, masked
    tokens = torch.randint(0, VOCAB, (2, GRID * GRID))
    with torch.no_grad():
        clean = model.logits(conds, tokens)
        dirty = model.logits(CaptionBatch(noisy, conds.mask, conds.null), tokens)
    torch.testing.assert_close(clean, dirty, rtol=0, atol=0)


@pytest.mark.parametrize("cfg_scale", [1.0, 7.5])
def test_greedy_tokens_equal_the_official_generate(cfg_scale):
    model = tiny(std=0.08)
    conds = captions([L, 4, 1])
    got = Sampler(model, eager=True).generate(conds, cfg_scale=cfg_scale, top_k=1)
    assert torch.equal(got, reference_greedy(model, conds, cfg_scale))
    assert len(set(got.flatten().tolist())) > 5  # not a degenerate repeat


def test_rope_table_of_a_rectangular_grid_turns_by_row_then_column():
    """Image position p = r * width + c gets angles r * f on its first half-pairs and c * f on
    the rest, f_j = base^(-4j / hd); caption positions are not turned."""
    hd, base, rows, width = 8, 100.0, 2, 3
    table = rope_2d_table(rows, hd, base, L, width).double()
    freqs = base ** (-4.0 * torch.arange(hd // 4, dtype=torch.float64) / hd)
    for p in range(rows * width):
        r, c = divmod(p, width)
        angles = torch.cat([r * freqs, c * freqs])
        expected = torch.stack([angles.cos(), angles.sin()], -1)
        torch.testing.assert_close(table[L + p], expected, rtol=0, atol=1e-6)
    assert table[:L].abs().max() == 0
    assert torch.equal(rope_2d_table(GRID, hd, base, L), rope_2d_table(GRID, hd, base, L, GRID))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_rectangular_grid_samples_and_scores_as_the_reference(cfg_scale):
    model = tiny(std=0.08, grid=2, grid_width=3)
    assert model.seq_len == 6
    conds = captions([L, 2])
    got = Sampler(model, eager=True).generate(conds, cfg_scale=cfg_scale, top_k=1)
    assert got.shape == (2, 6) and torch.equal(got, reference_greedy(model, conds, cfg_scale))
    double = model.double()
    conds64 = CaptionBatch(conds.features.double(), conds.mask, conds.null)
    expected = reference_logits(double, conds64, got[:, :-1])[:, L - 1 :]
    torch.testing.assert_close(double.logits(conds64, got), expected, rtol=1e-10, atol=1e-10)


def test_guidance_free_sampling_runs_only_the_conditional_rows():
    model = tiny()
    rows = []
    model.output.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    Sampler(model, eager=True).generate(captions([2, 5]), top_k=1)
    assert set(rows) == {2}
    rows.clear()
    Sampler(model, eager=True).generate(captions([2, 5]), cfg_scale=3.0, top_k=1)
    assert set(rows) == {4}


def test_caption_kind_null_roll_where_same():
    kind, conds = Captions(L, C), captions([2, 5, 7])
    null = kind.null_like(conds)
    assert null.null.all() and torch.equal(null.mask, conds.mask)
    rolled = kind.roll(conds)
    assert torch.equal(rolled.features[0], conds.features[1])
    assert kind.same(conds, conds).all() and not kind.same(conds, rolled).any()
    mixed = kind.where(torch.tensor([True, False, True]), null, conds)
    assert mixed.null.tolist() == [True, False, True]
    assert kind.same(kind.take(kind.cat([conds, null]), torch.tensor([3])), kind.take(null, [0])
                     ).all()


def test_caption_files_are_checked_and_read_by_rows(tmp_path):
    conds = captions([2, 5, 7])
    path = write_caption_file(tmp_path / "c.safetensors", conds.features, conds.mask)
    source = CaptionFile(path, L, C)
    batch = source.batch([2, 0])
    assert len(source) == 3 and torch.equal(batch.features[0], conds.features[2])
    assert torch.equal(batch.mask[1], conds.mask[0]) and not batch.null.any()
    with pytest.raises(ValueError, match="the model takes 9 x 12"):
        CaptionFile(path, 9, C)
    right = conds.mask.flip(1)
    with pytest.raises(ValueError, match="caption 0 is not left-padded"):
        write_caption_file(tmp_path / "r.safetensors", conds.features, right)


def official_file(model: LlamaGenT2I, path) -> None:
    torch.save({"model": model.state_dict()}, path)


def test_official_files_load_strictly_by_family_and_name(tmp_path):
    model = tiny()
    official_file(model, tmp_path / "t2i.pt")
    spec = ModelSpec(init=str(tmp_path / "t2i.pt"), preset="custom",
                     arch={k: v for k, v in TINY.items() if k != "grid"},
                     options={"grid": GRID}, family="llamagen-t2i")
    loaded = families.create(spec).eval()
    assert families.of(loaded) is T2I_FAMILY and T2I_FAMILY.recognizes(tmp_path / "t2i.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    broken = model.state_dict()
    broken.pop("cls_embedding.uncond_embedding")
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="uncond_embedding"):
        families.create(ModelSpec(**{**spec.__dict__, "init": str(tmp_path / "broken.pt")}))


def tiny_vq():
    torch.manual_seed(0)
    return tokenizers.build("VQ-16", ch=32, ch_mult=(1, 1), z_channels=32, num_res_blocks=1,
                            codebook_size=VOCAB, usage_window=0).eval()


def test_cli_samples_from_caption_features(tmp_path, capsys):
    model_path, vq_path = tmp_path / "t2i.safetensors", tmp_path / "vq.safetensors"
    T2I_FAMILY.save(tiny(std=0.08), model_path)
    tokenizers.save(tiny_vq(), vq_path)
    conds = captions([2, 5, 7])
    features = write_caption_file(tmp_path / "caps.safetensors", conds.features, conds.mask)
    common = ["--tokenizer", str(vq_path), "--device", "cpu", "--quiet", "--no-png"]
    out = tmp_path / "s"
    assert main(["sample", str(model_path), "--caption-features", str(features), "--out",
                 str(out), "--top-k", "1", "--cfg-scale", "4", *common]) == 0
    tokens = np.load(out / "tokens.npz")
    assert tokens["tokens"].shape == (3, GRID * GRID)
    assert tokens["caption_index"].tolist() == [0, 1, 2]
    greedy = reference_greedy(tiny(std=0.08), conds, 4.0)
    np.testing.assert_array_equal(tokens["tokens"], greedy.numpy())
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].shape == (3, 2 * GRID, 2 * GRID, 3)
    assert json.loads((out / "run.json").read_text())["conditions"]  # the file's fingerprint
    assert main(["sample", str(model_path), "--classes", "1", "--out", str(tmp_path / "x"),
                 *common]) == 1
    assert "--classes: a text-to-image model samples from captions" in capsys.readouterr().err
    assert main(["sample", str(model_path), "--out", str(tmp_path / "y"), *common]) == 1
    assert "give --caption-features FILE.safetensors" in capsys.readouterr().err


# ---- captions encoded with a transformers T5 encoder ----
def test_text_encoder_left_pads_as_llamagens_sampler(tmp_path):
    from ccalign.data.text_encoder import TextEncoder, left_pad
    from support.text import save_tiny_text_encoder

    encoder = TextEncoder(save_tiny_text_encoder(tmp_path / "t5", C), length=L)
    got = encoder.encode(["A sneaker to the left of a bag", "  Boot  "])
    assert got.features.shape == (2, L, C) and got.mask.sum(1).tolist() == [L, 2]  # truncated
    assert got.mask[1].tolist() == [False] * (L - 2) + [True, True]
    tokens = encoder.tokenizer(["boot"], max_length=L, padding="max_length",
                               return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**tokens).last_hidden_state[0]
    torch.testing.assert_close(got.features[1, L - 2 :], hidden[:2])  # "boot </s>", lower-cased
    assert not got.features[1, : L - 2].any()
    features = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)
    moved, mask = left_pad(features, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert moved[:, :, 0].tolist() == [[0, 0, 0, 1], [4, 5, 6, 7]]
    assert mask.tolist() == [[False, False, True, True], [True] * 4]


@pytest.mark.slow
def test_encode_captions_writes_both_layouts_and_sample_takes_prompts(tmp_path, capsys):
    from support.text import save_tiny_text_encoder

    t5 = str(save_tiny_text_encoder(tmp_path / "t5", C))
    (tmp_path / "lists").mkdir()
    lines = [{"image_path": "a.png", "caption": "a red shirt"},
             {"image_path": "b.png", "caption": "a boot on the right of a bag"}]
    (tmp_path / "lists" / "part0.jsonl").write_text("\n".join(map(json.dumps, lines)))
    (tmp_path / "prompts.txt").write_text("a red shirt\na boot on the right of a bag\n")
    common = ["--text-encoder", t5, "--length", str(L), "--device", "cpu", "--quiet"]
    assert main(["encode-captions", str(tmp_path / "lists"), "--out",
                 str(tmp_path / "caps.safetensors"), *common]) == 0
    assert main(["encode-captions", str(tmp_path / "lists"), "--format", "npy", "--out",
                 str(tmp_path / "t5_feat"), *common]) == 0
    source = CaptionFile(tmp_path / "caps.safetensors", L, C)
    batch = source.batch([0, 1])
    npy = np.load(tmp_path / "t5_feat" / "part0" / "1.npy")
    assert npy.shape == (1, int(batch.mask[1].sum()), C)
    np.testing.assert_array_equal(npy[0], batch.features[1][batch.mask[1]].numpy())
    assert main(["encode-captions", str(tmp_path / "lists"), "--out",
                 str(tmp_path / "caps.safetensors"), *common]) == 1
    assert "exists already" in capsys.readouterr().err

    model_path, vq_path = tmp_path / "t2i.safetensors", tmp_path / "vq.safetensors"
    T2I_FAMILY.save(tiny(std=0.08), model_path)
    tokenizers.save(tiny_vq(), vq_path)
    sample = ["sample", str(model_path), "--tokenizer", str(vq_path), "--device", "cpu",
              "--quiet", "--no-png", "--top-k", "1"]
    by_prompts, by_file = tmp_path / "p", tmp_path / "f"
    assert main([*sample, "--prompts", str(tmp_path / "prompts.txt"), "--text-encoder", t5,
                 "--out", str(by_prompts)]) == 0
    assert main([*sample, "--caption-features", str(tmp_path / "caps.safetensors"),
                 "--out", str(by_file)]) == 0
    np.testing.assert_array_equal(np.load(by_prompts / "tokens.npz")["tokens"],
                                  np.load(by_file / "tokens.npz")["tokens"])
    assert main([*sample, "--prompts", str(tmp_path / "prompts.txt"), "--text-encoder", t5,
                 "--out", str(by_prompts)]) == 0  # resumed: the same prompts and encoder
    assert "(0 batches sampled now)" in capsys.readouterr().out
    (tmp_path / "prompts.txt").write_text("a boot\n")
    assert main([*sample, "--prompts", str(tmp_path / "prompts.txt"), "--text-encoder", t5,
                 "--out", str(by_prompts)]) == 1
    assert "holds a run of other captions" in capsys.readouterr().err
    wide = str(save_tiny_text_encoder(tmp_path / "t5wide", 2 * C))
    assert main([*sample, "--prompts", str(tmp_path / "prompts.txt"), "--text-encoder", wide,
                 "--out", str(tmp_path / "w")]) == 1
    assert "gives 24-wide features but the model takes 12" in capsys.readouterr().err
    assert not (tmp_path / "w" / "captions.safetensors").exists()
    assert main([*sample, "--caption-features", str(tmp_path / "caps.safetensors"),
                 "--text-encoder", t5, "--out", str(tmp_path / "e")]) == 1
    assert "--text-encoder encodes --prompts" in capsys.readouterr().err


def test_a_failed_prompt_encoding_releases_every_rank(tmp_path):
    """Under torchrun, rank 0 encodes --prompts: if it fails, it still meets the other ranks at
    the barrier, and they stop with a line instead of waiting for the timeout."""
    import argparse

    from ccalign.commands.sample import encode_prompts
    from support.text import save_tiny_text_encoder

    (tmp_path / "prompts.txt").write_text("a boot\n")
    args = argparse.Namespace(prompts=str(tmp_path / "prompts.txt"), caption_features=None,
                              text_encoder=str(save_tiny_text_encoder(tmp_path / "t5", 2 * C)),
                              weights_dtype=None, out=tmp_path / "run")
    met = []
    kind = Captions(L, C)
    with pytest.raises(ValueError, match="gives 24-wide features but the model takes 12"):
        encode_prompts(args, T2I_FAMILY, kind, "cpu", 0, lambda: met.append(0))
    assert met == [0]  # rank 0 met the others at the barrier before failing
    with pytest.raises(ValueError, match="rank 0 could not encode --prompts"):
        encode_prompts(args, T2I_FAMILY, kind, "cpu", 1, lambda: met.append(1))
    assert met == [0, 1]
