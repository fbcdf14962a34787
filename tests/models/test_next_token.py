"""The sampling engine against independent references: teacher-forced logits, float64 filters,
exact enumerated distributions (chi-square), row counting, seeding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from ccalign.sample import (
    Sampler,
    filter_logits,
    generate,
    guidance_scales,
    linear_ramp,
)
from support.tiny import random_model

# ---- KV cache vs teacher forcing ----


@pytest.mark.numerics
@pytest.mark.parametrize("cache_rows", [3, 8])
def test_cached_decode_matches_teacher_forced_logits(cache_rows):
    model = random_model()
    labels = torch.tensor([1, 7, 10])  # 10 = null class
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    model.setup_kv_cache(cache_rows)
    with torch.no_grad():
        steps = [model.prefill(labels)]
        for t in range(15):
            steps.append(model.decode(tokens[:, t], torch.tensor([t + 1])))
        reference = model.logits(labels, tokens)
    cached = torch.stack(steps, dim=1)
    assert reference.abs().max() > 1.0  # logits are not trivially zero
    torch.testing.assert_close(cached, reference, rtol=1e-5, atol=2e-5)


# ---- guidance-free runs only conditional rows ----


class RowCounter:
    """Wraps prefill/decode to record the labels and row counts the model actually ran."""

    def __init__(self, model):
        self.prefill_labels, self.decode_rows = [], []
        prefill, decode = model.prefill, model.decode

        def counting_prefill(labels):
            self.prefill_labels.append(labels.clone())
            return prefill(labels)

        def counting_decode(tokens, position):
            self.decode_rows.append(tokens.shape[0])
            return decode(tokens, position)

        model.prefill, model.decode = counting_prefill, counting_decode


def test_guidance_free_never_runs_unconditional_rows():
    model = random_model()
    counter = RowCounter(model)
    labels = torch.tensor([0, 3, 5, 9])
    tokens = Sampler(model).generate(labels, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 16)
    assert len(counter.prefill_labels) == 1
    assert torch.equal(counter.prefill_labels[0], labels)  # no null-class row
    assert counter.decode_rows == [4] * 15


def test_cfg_runs_null_rows_only_while_guidance_lies_ahead():
    model = random_model()
    counter = RowCounter(model)
    labels = torch.tensor([0, 3, 5])
    Sampler(model).generate(labels, cfg_scale=3.0, cfg_interval=3)
    assert torch.equal(counter.prefill_labels[0], torch.tensor([0, 3, 5, 10, 10, 10]))
    # tokens 0..4 are guided (LlamaGen: decode step i stops guiding once i > cfg_interval),
    # so positions 1..4 run 6 rows and the 11 later positions only the 3 conditional ones
    assert counter.decode_rows == [6] * 4 + [3] * 11


def test_guidance_schedules():
    assert guidance_scales(2.0, 4) == [2.0] * 4
    assert guidance_scales(2.0, 6, cfg_interval=2) == [2.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    assert guidance_scales(lambda t: 1.0 + t, 3) == [1.0, 2.0, 3.0]
    assert guidance_scales([1.5, 1.0, 2.0], 3) == [1.5, 1.0, 2.0]
    assert linear_ramp(3.0, 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match="one scale per image token"):
        guidance_scales([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="cfg_interval"):
        guidance_scales(2.0, 3, cfg_interval=-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.5])
def test_non_finite_or_negative_guidance_scales_are_rejected(bad):
    model = random_model()
    with pytest.raises(ValueError, match=f"cfg_scale must be finite and >= 0, got {bad}: 1 is"):
        generate(model, [1, 2], cfg_scale=bad)
    schedule = [2.0] * 16
    schedule[3] = bad
    with pytest.raises(ValueError, match=f"got {bad} at token 3 of the schedule"):
        Sampler(model).generate([1], cfg_scale=schedule)
    with pytest.raises(ValueError, match=f"got {bad} at token 5 of the schedule"):
        guidance_scales(lambda t: bad if t == 5 else 1.0, 16)
    with pytest.raises(ValueError, match="got nan at token 0 of the schedule"):
        guidance_scales(linear_ramp(float("nan"), 16), 16)


@pytest.mark.parametrize("interval", [float("nan"), 2.5, "3"])
def test_cfg_interval_must_be_an_integer(interval):
    with pytest.raises(ValueError, match="cfg_interval must be an integer"):
        guidance_scales(2.0, 4, cfg_interval=interval)
    assert guidance_scales(2.0, 4, cfg_interval=np.int64(1)) == [2.0, 2.0, 2.0, 1.0]


def test_schedule_equal_to_constant_gives_same_samples():
    model = random_model()
    labels = torch.tensor([2, 4])
    sampler = Sampler(model)
    a, b, c = (
        sampler.generate(labels, cfg_scale=scale, generator=torch.Generator().manual_seed(5))
        for scale in (2.5, [2.5] * 16, lambda t: 2.5)
    )
    assert torch.equal(a, b) and torch.equal(a, c)


# ---- top-k / top-p against a float64 transcription ----


def reference_filter(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """Row by row in float64: the kept set of LlamaGen's filters, -inf elsewhere."""
    out = np.full_like(logits, -np.inf, dtype=np.float64)
    for r, row in enumerate(logits.astype(np.float64) / max(temperature, 1e-5)):
        keep = np.ones(row.size, dtype=bool)
        if top_k > 0:
            kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
            keep &= row >= kth
        if top_p < 1.0:
            masked = np.where(keep, row, -np.inf)
            order = np.argsort(-masked, kind="stable")
            probs = np.exp(masked[order] - masked[order][0])
            probs /= probs.sum()
            mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
            assert np.min(np.abs(mass_before[1:] - top_p)) > 1e-5  # no knife-edge case
            keep_sorted = mass_before <= top_p
            keep_p = np.zeros(row.size, dtype=bool)
            keep_p[order[keep_sorted]] = True
            keep &= keep_p
        out[r, keep] = row[keep]
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 5, 1.0), (1.0, 0, 0.9), (0.7, 20, 0.5), (1.3, 0, 0.3), (1.0, 1, 1.0), (1.0, 2000, 0.95)],
)
def test_filters_match_float64_transcription(temperature, top_k, top_p):
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(top_k)) * 3
    got = filter_logits(logits, temperature, top_k, top_p).double().numpy()
    want = reference_filter(logits.numpy(), temperature, top_k, top_p)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    kept = ~np.isinf(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
    if top_p < 1.0:  # the crossing token is kept, so the kept mass reaches top_p
        probs = torch.softmax(logits.double() / temperature, -1).numpy()
        if top_k == 0:
            assert np.all((probs * kept).sum(1) >= top_p)


def test_filter_leaves_input_untouched_and_rejects_bad_settings():
    logits = torch.randn(2, 10)
    before = logits.clone()
    filter_logits(logits, 0.5, 3, 0.5)
    assert torch.equal(logits, before)
    model = random_model()
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            generate(model, [1], **bad)


# ---- exact distribution (chi-square) ----


def exact_distribution(model, label: int, scale: float, top_k: int = 0) -> dict[tuple, float]:
    """P(sequence) for every sequence of a tiny model, from teacher-forced logits in float64.

    Per step: mix cond and null logits at the prefix, filter, softmax (the CFG sampling chain).
    """
    vocab, n = model.vocab_size, model.seq_len
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=n)))
    with torch.no_grad():
        cond = model.logits(torch.full((len(seqs),), label), seqs).double()
        null = model.logits(torch.full((len(seqs),), model.null_class), seqs).double()
    mixed = null + (cond - null) * scale
    if top_k:
        mixed = filter_logits(mixed.reshape(-1, vocab), 1.0, top_k, 1.0).double().view_as(mixed)
    logp = torch.log_softmax(mixed, -1).gather(2, seqs[..., None]).squeeze(2).sum(1)
    return {tuple(s.tolist()): float(p) for s, p in zip(seqs, logp.exp(), strict=True)}


# 0.0 = the unconditional model, 0.5 interpolates (LlamaGen would sample both guidance-free)
@pytest.mark.slow
@pytest.mark.parametrize("scale,top_k", [(1.0, 0), (2.5, 0), (3.0, 2), (0.5, 0), (0.0, 0)])
def test_sample_distribution_is_exact(scale, top_k):
    model = random_model(seed=3, std=0.5, grid=2, dim=16, n_head=2, vocab_size=3, num_classes=2)
    exact = exact_distribution(model, label=1, scale=scale, top_k=top_k)
    assert abs(sum(exact.values()) - 1) < 1e-9
    n = 20000
    tokens = generate(
        model, torch.ones(n, dtype=torch.long), cfg_scale=scale, top_k=top_k,
        generator=torch.Generator().manual_seed(11),
    )
    counts: dict[tuple, int] = {}
    for row in map(tuple, tokens.tolist()):
        counts[row] = counts.get(row, 0) + 1
    assert set(counts) <= {s for s, p in exact.items() if p > 0}  # never an impossible sequence
    cells = chi_square_cells(exact, n)
    observed = np.array([sum(counts.get(s, 0) for s in cell) for cell in cells], dtype=float)
    expected = np.array([sum(exact[s] for s in cell) for cell in cells]) * n
    assert len(cells) >= 15  # enough cells for the test to mean something
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    if scale != 1.0:  # the test has power: guidance-free probabilities are rejected
        plain = exact_distribution(model, label=1, scale=1.0, top_k=top_k)
        wrong = np.array([sum(plain[s] for s in cell) for cell in cells])
        assert stats.chisquare(observed, wrong / wrong.sum() * n).pvalue < 1e-6


def chi_square_cells(probs: dict, n: int) -> list[list[tuple]]:
    """One cell per sequence expected >= 5 times in n draws; all rarer sequences share one."""
    cells = [[s] for s, p in probs.items() if p * n >= 5]
    rare = [s for s, p in probs.items() if 0 < p * n < 5]
    return cells + [rare] if rare else cells


# ---- seeding and API behaviour ----


def test_same_seed_same_tokens_and_different_seed_differs():
    model = random_model()
    labels = [1, 2, 3, 4]
    a = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(42))
    b = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(42))
    c = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampler_reuse_matches_fresh_sampler_and_restores_train_mode():
    model = random_model().train()
    sampler = Sampler(model)
    sampler.generate([1, 2, 3, 4, 5], cfg_scale=2.0)  # a bigger cache first
    a = sampler.generate([3, 4], generator=torch.Generator().manual_seed(7))
    b = generate(model, [3, 4], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert model.training  # dropout was off while sampling, the flag is restored


def test_two_samplers_over_one_model_each_set_up_the_cache_they_need():
    """The model holds one cache: a Sampler whose cache another replaced sets up again (it
    raised a shape error, and on CUDA would replay graphs over a freed cache)."""
    model = random_model()
    first, second = Sampler(model), Sampler(model)

    def draw(sampler, labels, scale):
        return sampler.generate(labels, cfg_scale=scale, generator=torch.Generator().manual_seed(3))

    expected = [draw(Sampler(random_model()), [1, 2, 3], 2.0),
                draw(Sampler(random_model()), [4], 1.0)]
    for _ in range(2):
        assert torch.equal(draw(first, [1, 2, 3], 2.0), expected[0])
        assert torch.equal(draw(second, [4], 1.0), expected[1])
    second.release()  # not its cache any more: the first keeps its own
    first.release()
    assert torch.equal(draw(first, [1, 2, 3], 2.0), expected[0])


def test_bad_labels_and_generator_are_named():
    model = random_model()
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 9\]"):
        generate(model, [3, 11])
    with pytest.raises(ValueError, match="no labels"):
        generate(model, [])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator lives on"):
            generate(model, [1], generator=torch.Generator("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error messages")
def test_gpu_options_without_gpu_are_named():
    model = random_model()
    with pytest.raises(ValueError, match="no GPU is visible"):
        Sampler(model, device="cuda")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        Sampler(model, cuda_graph=True)


def test_null_class_label_samples_unconditionally():
    model = random_model()
    tokens = generate(model, [10, 10], generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 16) and int(tokens.max()) < 64


def test_sampled_tokens_can_be_scored_with_gradients():
    model = random_model()
    tokens = Sampler(model).generate([1, 2], generator=torch.Generator().manual_seed(0))
    model(torch.tensor([1, 2]), tokens).sum().backward()  # e.g. training on own samples
    assert model.output.weight.grad is not None


def test_non_finite_logits_are_refused_not_sampled():
    """NaN weights, or a finite scale whose guided mix overflows, used to give tokens V - 1
    everywhere and exit 0."""
    model = random_model()
    with pytest.raises(ValueError, match="logits that are not finite .* guidance \\(largest "
                                         "scale 3e\\+38\\)"):
        generate(model, [1, 2], cfg_scale=3e38)
    broken = random_model()
    with torch.no_grad():
        broken.output.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights may be damaged"):
        generate(broken, [1, 2])
    assert generate(model, [1, 2], cfg_scale=3.0).shape == (2, 16)  # large but finite: fine


# ---- compiled decode steps ----


def test_a_compiled_sampler_compiles_every_row_count_past_dynamos_default_limit(monkeypatch):
    """Each row count is a recompile of the one decode function: with dynamo's default limit (8)
    the ninth would run eagerly without a word. Dynamo's "eager" backend, counted, stands in
    for inductor (the same recompiles, without kernel builds)."""
    import torch._dynamo

    from ccalign.models import next_token

    compiled_graphs, real_compile = [], torch.compile

    def counting(graph, inputs):
        compiled_graphs.append(graph)
        return graph.forward

    limit = next_token.recompile_limit_name()
    monkeypatch.setattr(torch._dynamo.config, limit, 8)  # the default, restored
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting, **kw))
    torch._dynamo.reset()
    try:
        sampler = Sampler(random_model(), compile=True)
        assert getattr(torch._dynamo.config, limit) == next_token.COMPILED_SHAPES
        for rows in range(10, 0, -1):
            sampler.generate(torch.arange(rows) % 10, generator=torch.Generator().manual_seed(0))
        assert len(compiled_graphs) == 10
    finally:
        torch._dynamo.reset()
