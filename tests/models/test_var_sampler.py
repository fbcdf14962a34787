"""VAR sampling: the cache reproduces teacher forcing, guidance-free runs B rows, VAR's cfg ramp,
top-k / top-p, the Gumbel path, seeds."""

import math

import pytest
import torch

from ccalign.models import var
from ccalign.models.var import sampler as var_sample
from support.tiny_var import SAMPLER_TINY
from support.tiny_var import random_var as tiny


def recording(model: var.VAR) -> list[torch.Tensor]:
    """Record the raw logits (rows, pn^2, V) of every cached scale forward."""
    seen, forward = [], model.forward_scale

    def wrapped(si, x, mods, chunk_tokens=0):
        out = forward(si, x, mods, chunk_tokens)
        seen.append(out.clone())
        return out

    model.forward_scale = wrapped
    return seen


def per_scale(model: var.VAR, logits: torch.Tensor) -> list[torch.Tensor]:
    starts = model.config.scale_starts()
    return [logits[:, a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


@pytest.mark.numerics
def test_cached_generation_reproduces_teacher_forced_logits():
    model = tiny()
    seen = recording(model)
    labels = torch.tensor([0, 3, 5])
    g = torch.Generator().manual_seed(0)
    tokens = var_sample.generate(model, labels, generator=g)
    assert tokens.shape == (3, 30) and tokens.dtype == torch.int64
    assert [s.shape[0] for s in seen] == [3] * 4  # guidance-free: the B conditional rows only
    for cached, forced in zip(seen, per_scale(model, model.logits(labels, tokens)), strict=True):
        torch.testing.assert_close(cached, forced, rtol=0, atol=2e-5)


def test_cfg_runs_null_rows_matching_teacher_forcing_with_the_null_class():
    model = tiny()
    seen = recording(model)
    labels = torch.tensor([1, 2])
    tokens = var_sample.generate(model, labels, official_cfg=1.5,
                                 generator=torch.Generator().manual_seed(1))
    assert [s.shape[0] for s in seen] == [4] * 4
    cond = per_scale(model, model.logits(labels, tokens))
    uncond = per_scale(model, model.logits(torch.full((2,), 5), tokens))
    for cached, c, u in zip(seen, cond, uncond, strict=True):
        torch.testing.assert_close(cached[:2], c, rtol=0, atol=2e-5)
        torch.testing.assert_close(cached[2:], u, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kwargs", [{}, {"official_cfg": 0.0}, {"cfg_scale": [1.0] * 4}])
def test_guidance_free_never_runs_unconditional_rows(kwargs):
    model = tiny()
    seen = recording(model)
    var_sample.generate(model, [0, 1, 2, 3], **kwargs)
    assert [s.shape[0] for s in seen] == [4] * 4
    seen.clear()
    var_sample.generate(model, [0, 1, 2, 3], double_batch=True, **kwargs)  # VAR's own behaviour
    assert [s.shape[0] for s in seen] == [8] * 4


@pytest.mark.numerics
@pytest.mark.parametrize("shared_aln", [False, True])
def test_rows_run_in_chunks_give_each_rows_values_and_the_same_draws(shared_aln):
    """Chunks of rows through the blocks (the CPU's default at large batches) against the whole
    batch at once, in float64: each chunk writes and reads its own rows of the KV cache."""
    torch.manual_seed(0)
    model = var.build("custom", **{**SAMPLER_TINY, "shared_aln": shared_aln}).double().eval()
    labels = torch.tensor([0, 3, 4, 1, 2])
    outs = {}
    for chunk_tokens in (0, 1, 9, 20):  # the whole batch; one row per chunk; uneven chunks
        seen = recording(model)
        tokens = var_sample.generate(model, labels, official_cfg=1.5, top_k=8, top_p=0.9,
                                     chunk_tokens=chunk_tokens,
                                     generator=torch.Generator().manual_seed(5))
        outs[chunk_tokens] = tokens, torch.cat([s.flatten(1) for s in seen], 1)
        del model.forward_scale
    whole_tokens, whole_logits = outs.pop(0)
    assert whole_logits.shape[0] == 10  # CFG: the 5 null-class rows ran too
    for tokens, logits in outs.values():
        assert torch.equal(tokens, whole_tokens)
        torch.testing.assert_close(logits, whole_logits, rtol=0, atol=1e-12)


def test_cpu_default_chunks_rows_and_zero_runs_whole_batches():
    model = tiny()
    asked = []
    forward = model.forward_scale
    model.forward_scale = lambda si, x, mods, chunk: asked.append(chunk) or forward(si, x, mods,
                                                                                  chunk)
    var_sample.generate(model, [0, 1])
    var_sample.generate(model, [0, 1], chunk_tokens=0)
    assert asked == [var_sample.cpu_chunk_tokens(model)] * 4 + [0] * 4
    d16_width = var.build("custom", depth=1, dim=1024, n_head=16)  # MLP 4096 wide
    assert var_sample.cpu_chunk_tokens(d16_width) == 1024  # 16 MiB of float32
    assert var_sample.cpu_chunk_tokens(d16_width.bfloat16()) == 2048


def test_official_cfg_is_a_ramp_from_one_to_one_plus_cfg():
    scales = var_sample.official_cfg_scales(1.5, 10)
    assert scales[0] == 1.0 and scales[-1] == 2.5
    assert scales == pytest.approx([1 + 1.5 * si / 9 for si in range(10)], abs=1e-15)
    assert var_sample.guidance_weights(1.0, 1.5, 4) == [0.0, 0.5, 1.0, 1.5]
    assert var_sample.guidance_weights(2.0, None, 4) == [1.0] * 4
    assert var_sample.guidance_weights(lambda si: 1 + si, None, 4) == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="not both"):
        var_sample.guidance_weights(2.0, 1.5, 4)
    with pytest.raises(ValueError, match="official_cfg -2"):
        var_sample.guidance_weights(1.0, -2, 4)


def test_guided_logits_are_vars_mix():
    model = tiny()
    seen = recording(model)
    tokens = var_sample.generate(model, [4], cfg_scale=[1.0, 1.0, 1.0, 3.0], top_k=1)
    mixed = 3.0 * seen[-1][:1] - 2.0 * seen[-1][1:]  # (1 + t) cond - t uncond, t = 2
    assert torch.equal(tokens[:, 14:], mixed.argmax(-1))
    assert torch.equal(tokens[:, :14], torch.cat([s[:1].argmax(-1) for s in seen[:-1]], 1))


def test_var_filter_exact_small_cases():
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    inf = -math.inf
    keep = var_sample.var_filter(logits, top_k=2)
    assert torch.equal(keep.isinf(), torch.tensor([[True, True, False, False]]))
    assert var_sample.var_filter(logits, top_p=0.65).isinf().tolist() == [[True, True, False,
                                                                             False]]
    assert var_sample.var_filter(logits, top_p=0.75).isinf().tolist() == [[True, False, False,
                                                                             False]]
    assert var_sample.var_filter(logits, top_p=0.01).isinf().sum() == 3  # the top one stays
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert var_sample.var_filter(ties, top_k=1).tolist() == [[inf, 2.0, 2.0, inf]]
    for bad in ({"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="top_p"):
            var_sample.var_filter(logits, **bad)


def test_same_seed_same_tokens_and_the_smooth_path():
    model = tiny()
    runs = [var_sample.generate(model, [0, 1, 2], official_cfg=1.0, top_k=8, top_p=0.9,
                                generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    hard = var_sample.generate(model, [0, 1], return_fhat=True,
                               generator=torch.Generator().manual_seed(3))
    smooth = var_sample.generate(model, [0, 1], more_smooth=True, return_fhat=True,
                                 generator=torch.Generator().manual_seed(3))
    again = var_sample.generate(model, [0, 1], more_smooth=True, return_fhat=True,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(hard[1], model.quantizer.codes_to_fhat(hard[0]))
    assert torch.equal(smooth[1], again[1]) and smooth[1].isfinite().all()
    assert not torch.allclose(smooth[1], hard[1])
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        var_sample.generate(model, [6])


def test_bf16_model_samples_and_scores_like_the_float32_one():
    model = tiny()
    labels = torch.tensor([0, 1, 2])
    sampler = var_sample.VarSampler(model, dtype=torch.bfloat16)
    assert sampler.model is not model and sampler.model.head.weight.dtype == torch.bfloat16
    assert sampler.model.quantizer.embedding.weight.dtype == torch.float32
    assert torch.equal(sampler.model.quantizer.embedding.weight, model.quantizer.embedding.weight)
    tokens = sampler.generate(labels, official_cfg=1.0, generator=torch.Generator().manual_seed(0))
    low = sampler.model.logits(labels, tokens)
    torch.testing.assert_close(low, model.logits(labels, tokens), rtol=0, atol=0.1)
    torch.testing.assert_close(sampler.model(labels, tokens), model(labels, tokens),
                               rtol=0.02, atol=0.5)


def test_non_finite_logits_are_refused_before_the_draw():
    """VAR's draw raised torch's multinomial error on NaN; now one clear line."""
    model = tiny()
    with pytest.raises(ValueError, match="logits that are not finite .*\\(t 3e\\+38 at scale 0\\)"):
        var_sample.generate(model, [0, 1], cfg_scale=3e38)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights may be damaged"):
        var_sample.generate(model, [0, 1])


def test_autocast_scope_blocks_keeps_the_scale_inputs_float32():
    """DDO's negatives ("blocks", the default): the word embedding of every scale input runs in
    float32 as the teacher-forced forward builds it; ``ccalign sample`` ("all") autocasts it
    too, as the official VAR samplers do. The head runs autocast either way."""
    from ccalign.models.var.sampler import VarSampler
    from support.tiny_var import random_var

    model = random_var()
    for scope, embedded in (("blocks", torch.float32), ("all", torch.bfloat16)):
        seen = {"word": set(), "head": set()}

        def record(name, found=seen):
            return lambda module, inputs, output: found[name].add(output.dtype)

        hooks = [model.word_embed.register_forward_hook(record("word")),
                 model.head.register_forward_hook(record("head"))]
        sampler = VarSampler(model, autocast=torch.bfloat16, autocast_scope=scope)
        sampler.generate([0, 1], generator=torch.Generator().manual_seed(0))
        for hook in hooks:
            hook.remove()
        assert seen["word"] == {embedded} and seen["head"] == {torch.bfloat16}, scope


def test_a_sampler_over_the_callers_model_leaves_it_trainable():
    from ccalign.models.var.sampler import VarSampler
    from support.tiny_var import random_var

    model = random_var().requires_grad_(True)
    tokens = VarSampler(model).generate([0, 1], generator=torch.Generator().manual_seed(0))
    assert model.head.weight.requires_grad and model.layers[0].attn.proj.weight.requires_grad
    assert not tokens.requires_grad


def test_with_autocast_scope_all_the_re_encoding_takes_the_samplers_dtype():
    """"all": the re-encoding runs in the sampler's own autocast dtype (float16 here), not the
    device's default autocast dtype; "blocks": in float32."""
    from ccalign.models.var.sampler import VarSampler
    from support.tiny_var import tiny_pair

    model, vae = tiny_pair(seed=1)
    for scope, expected in (("all", torch.float16), ("blocks", torch.float32)):
        seen = set()
        conv = next(m for m in vae.modules() if isinstance(m, torch.nn.Conv2d))
        hook = conv.register_forward_hook(lambda m, i, o, found=seen: found.add(o.dtype))
        sampler = VarSampler(model, autocast=torch.float16, autocast_scope=scope, retokenize=vae)
        sampler.generate([0, 1], generator=torch.Generator().manual_seed(0))
        hook.remove()
        assert seen == {expected}, scope


def test_blocks_without_autograd_give_the_same_values_in_place_and_leave_the_input():
    """Sampling's in-place modulation and gates (VAR's own block) against the autograd path,
    bit for bit; under autocast (bf16 gates, float32 residual) it keeps the out-of-place ops."""
    model = tiny().eval()
    block, cond = model.blocks[1], model.class_emb(torch.tensor([0, 3]))
    x = torch.randn(2, 5, model.config.dim, generator=torch.Generator().manual_seed(0))
    kept = x.clone()
    with torch.no_grad():
        fast = block(x, cond)
    assert torch.equal(x, kept)
    assert torch.equal(fast, block(x, cond).detach())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = block(x, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mixed, block(x, cond).detach())
    mods = block.modulation(cond).detach()  # float32 gates given to a block under autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        given = block(x, None, mods=mods)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(given, block(x, None, mods=mods).detach())

