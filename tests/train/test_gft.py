"""GFT: the beta embedding, the mixed-logit loss against float64, loading, training, sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ccalign.align import gft_token_logprobs
from ccalign.cli import main
from ccalign.conditions import ClassLabels
from ccalign.data.codes import write_flat_codes
from ccalign.models import llamagen
from ccalign.models.family import LogitMix
from ccalign.sample import Sampler, generate
from ccalign.train import TrainConfig, load_config, run_training
from ccalign.train.objectives import GFTObjective
from ccalign.train.state import list_checkpoints
from ccalign.weights import CheckpointMismatchError
from support import REPO
from support.numerics import assert_same_run
from support.processes import Killed, kill_after, launch

TINY = dict(grid=3, dim=32, n_layer=2, n_head=4, vocab_size=40, num_classes=5)
NULL = TINY["num_classes"]
N = TINY["grid"] ** 2


def tiny(beta_embedding: bool = True, trained: bool = False, dropout: float = 0.0, seed: int = 0):
    """A tiny model with a non-zero output head; ``trained``: a non-zero beta embedding too."""
    torch.manual_seed(seed)
    model = llamagen.build(
        "custom",
        beta_embedding=beta_embedding,
        token_dropout=dropout,
        resid_dropout=dropout,
        ffn_dropout=dropout,
        **TINY,
    )
    nn.init.normal_(model.output.weight, std=0.3)
    if trained:
        for layer in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.3)
            nn.init.normal_(layer.bias, std=0.3)
    return model.eval()


def batch(b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NULL, (b,), generator=g)
    return labels, torch.randint(0, TINY["vocab_size"], (b, N), generator=g)


# ---- the beta embedding ----
def test_sinusoidal_features_equal_the_float64_formula():
    """[cos(t f_k), sin(t f_k)], f_k = 10000^(-k/128), k < 128: cos first, as released."""
    t = torch.tensor([0.0, 1.0, 660.0, 1000.0])
    got = llamagen.sinusoidal_features(t)
    k = np.arange(128, dtype=np.float64)
    args = t.double().numpy()[:, None] * np.exp(-math.log(10000.0) * k / 128)[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    assert got.shape == (4, 256) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-4)  # float32 args ~ 1e3
    assert torch.equal(got[0], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_embedding_keys_shapes_and_zero_output_init():
    model = llamagen.build("custom", beta_embedding=True, **TINY)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("t_embedder")}
    assert sd == {
        "t_embedder.mlp.0.weight": (32, 256),
        "t_embedder.mlp.0.bias": (32,),
        "t_embedder.mlp.2.weight": (32, 32),
        "t_embedder.mlp.2.bias": (32,),
    }
    mlp = model.t_embedder.mlp
    assert 0.015 < mlp[0].weight.std().item() < 0.025
    assert not mlp[0].bias.any() and not mlp[2].weight.any() and not mlp[2].bias.any()
    assert "t_embedder.mlp.0.weight" not in llamagen.build("custom", **TINY).state_dict()


def test_embedding_equals_a_float64_transcription_and_is_added_to_the_class_token_only():
    model = tiny(trained=True).double()
    labels, tokens = batch(2)
    beta = torch.tensor([0.3, 0.9], dtype=torch.float64)
    features = llamagen.sinusoidal_features(1000.0 * beta).double()  # float32, tested above
    mlp = model.t_embedder.mlp
    h = features @ mlp[0].weight.T + mlp[0].bias
    expected = nn.functional.silu(h) @ mlp[2].weight.T + mlp[2].bias
    embedded = model._embed(labels, tokens, beta)
    plain = model._embed(labels, tokens)
    torch.testing.assert_close(embedded[:, 0] - plain[:, 0], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(embedded[:, 1:], plain[:, 1:])


def test_zero_initialised_embedding_gives_the_base_models_logits_exactly(tmp_path):
    base = tiny(beta_embedding=False)
    path = tmp_path / "base.safetensors"
    llamagen.save(base, path)
    gft = llamagen.load(path, beta_embedding=True).eval()
    labels, tokens = batch()
    expected = base.logits(labels, tokens)
    for beta in (0.0, 0.37, 1.0, torch.tensor([0.1, 0.5, 0.9, 1.0])):
        assert torch.equal(gft.logits(labels, tokens, beta=beta), expected)
        assert torch.equal(gft(labels, tokens, beta=beta), base(labels, tokens))


def test_beta_as_float_or_tensor_and_null_rows_get_beta_input_one():
    model = tiny(trained=True)
    labels = torch.tensor([0, NULL, 3, NULL])
    _, tokens = batch()
    seen = []
    model.t_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    as_float = model.logits(labels, tokens, beta=0.25)
    as_tensor = model.logits(labels, tokens, beta=torch.full((4,), 0.25))
    assert torch.equal(as_float, as_tensor)
    assert torch.equal(seen[0], torch.tensor([0.25, 1.0, 0.25, 1.0]))
    one = model.logits(labels, tokens, beta=1.0)
    assert torch.equal(as_float[[1, 3]], one[[1, 3]])  # null rows: beta input 1 whatever beta
    assert not torch.allclose(as_float[[0, 2]], one[[0, 2]])
    assert not torch.allclose(as_float, model.logits(labels, tokens))  # None adds nothing


def test_plain_model_given_a_beta_and_bad_beta_shapes_are_errors():
    labels, tokens = batch()
    with pytest.raises(ValueError, match="no beta embedding .* beta_embedding=True"):
        tiny(beta_embedding=False).logits(labels, tokens, beta=0.5)
    with pytest.raises(ValueError, match=r"one value per row \(4,\); got shape \(3,\)"):
        tiny().logits(labels, tokens, beta=torch.ones(3))


# ---- the loss ----
def test_mixed_logprobs_equal_a_float64_hand_computation_and_stop_the_uncond_gradient():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 4, 7, generator=g, requires_grad=True)
    uncond = torch.randn(3, 4, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (3, 4), generator=g)
    beta = torch.tensor([0.2, 0.5, 0.9])
    got = gft_token_logprobs(cond, uncond, targets, beta)
    c, u, b = cond.detach().double().numpy(), uncond.detach().double().numpy(), beta.double()
    expected = np.zeros((3, 4))
    softmax = np.zeros((3, 4, 7))
    for i in range(3):
        for t in range(4):
            mixed = b[i].item() * c[i, t] + (1 - b[i].item()) * u[i, t]
            log_z = math.log(sum(math.exp(v) for v in mixed))
            expected[i, t] = mixed[targets[i, t]] - log_z
            softmax[i, t] = np.exp(mixed - log_z)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    (-got.sum()).backward()
    onehot = np.eye(7)[targets.numpy()]
    hand_grad = b.numpy()[:, None, None] * (softmax - onehot)
    np.testing.assert_allclose(cond.grad.numpy(), hand_grad, rtol=1e-5, atol=1e-6)
    assert uncond.grad is None
    per_token = gft_token_logprobs(cond, uncond, targets, beta[:, None].expand(3, 4))
    assert torch.equal(per_token, got)
    with pytest.raises(ValueError, match=r"beta must be \(3,\) or \(3, 4\)"):
        gft_token_logprobs(cond, uncond, targets, torch.ones(4))


def test_chunked_mixed_forward_equals_the_full_tensor_computation():
    model = tiny(trained=True)
    labels, tokens = batch()
    beta = torch.tensor([0.1, 0.4, 0.7, 1.0])
    with torch.no_grad():
        other = model(torch.full_like(labels, NULL), tokens, beta=1.0, hidden=True)
    mix = LogitMix(weight=beta, other_hidden=other, combine=gft_token_logprobs)
    full = gft_token_logprobs(
        model.logits(labels, tokens, beta=beta), model.output(other).float(), tokens, beta
    )
    for chunk_rows in (5, 4096):
        got = model.token_logprobs(labels, tokens, chunk_rows, beta=beta, mix=mix)
        torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6)


def test_objective_loss_equals_a_float64_hand_computation_with_null_rows():
    """Mean over tokens of -log softmax(beta l(c, beta) + (1 - beta) l(null, 1))[x_t]."""
    model = tiny(trained=True)
    labels, tokens = batch()
    row_mask = torch.tensor([False, True, False, False])
    draws = torch.tensor([0.15, 0.6, 0.8, 0.35])
    objective = GFTObjective(condition=ClassLabels(NULL), class_dropout=0.1)
    out = objective(model, None, labels, tokens, row_mask, row_draws=draws)
    beta = draws.double()
    reference = tiny(trained=True).double()
    shown = torch.where(row_mask, NULL, labels)
    with torch.no_grad():
        cond = reference.logits(shown, tokens, beta=beta)
        uncond = reference.logits(torch.full_like(labels, NULL), tokens, beta=1.0)
    mixed = beta[:, None, None] * cond + (1 - beta[:, None, None]) * uncond
    nll = -mixed.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert out.loss.item() == pytest.approx(nll.mean().item(), rel=1e-6)
    assert out.metrics["beta"].item() == pytest.approx(beta.mean().item(), rel=1e-6)
    # the null row: its beta input is 1, its mixing weight stays its drawn beta
    alone = reference.logits(shown[1:2], tokens[1:2], beta=1.0)[0]
    torch.testing.assert_close(cond[1], alone, rtol=1e-12, atol=1e-12)  # float64: any batch


def test_unconditional_pass_runs_without_dropout_or_gradient_and_mode_is_restored():
    model = tiny(trained=True, dropout=0.5).train()
    calls = []

    def hook(module, args, kwargs):
        calls.append((module.training, torch.is_grad_enabled(), kwargs.get("hidden", False)))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    labels, tokens = batch()
    out = GFTObjective(condition=ClassLabels(NULL), class_dropout=0.1)(
        model, None, labels, tokens, torch.zeros(4, dtype=torch.bool), row_draws=torch.rand(4)
    )
    assert calls == [(False, False, True), (True, True, False)]
    assert model.training
    out.loss.backward()
    assert model.t_embedder.mlp[2].weight.grad.abs().sum() > 0


# ---- files ----
def official_state(model: llamagen.LlamaGen) -> dict[str, torch.Tensor]:
    """The released GFT layout: the model's keys plus the rotary table LlamaGen saves."""
    return {**model.state_dict(), "freqs_cis": torch.zeros(N + 1, 4, 2)}


def test_official_gft_layout_loads_strictly_with_the_embedder(tmp_path):
    source = tiny(trained=True)
    path = tmp_path / "gft.pt"
    torch.save({"model": official_state(source)}, path)
    loaded = llamagen.load(path, "custom", **TINY)
    assert loaded.config.beta_embedding
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    ours = tmp_path / "gft.safetensors"
    llamagen.save(loaded, ours)
    assert llamagen.config_from_file(ours).beta_embedding
    again = llamagen.load(ours)
    labels, tokens = batch()
    assert torch.equal(again.eval().logits(labels, tokens, 0.5), source.logits(labels, tokens, 0.5))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.pop("t_embedder.mlp.2.bias"),
            "1 missing key(s):\n    t_embedder.mlp.2.bias",
        ),
        (
            lambda sd: sd.update({"t_embedder.mlp.0.weight": torch.zeros(32, 128)}),
            "t_embedder.mlp.0.weight: checkpoint (32, 128) vs model (32, 256)",
        ),
        (
            lambda sd: sd.update({"t_embedder.mlp.4.weight": torch.zeros(32, 32)}),
            "1 unexpected key(s):\n    t_embedder.mlp.4.weight",
        ),
    ],
)
def test_a_damaged_gft_file_is_refused_key_by_key(tmp_path, edit, message):
    sd = official_state(tiny(trained=True))
    edit(sd)
    path = tmp_path / "gft.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        llamagen.load(path, "custom", **TINY)
    assert message in str(error.value)


def test_plain_file_gets_a_fresh_embedder_only_when_asked(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": official_state(tiny(beta_embedding=False))}, path)
    assert llamagen.load(path, "custom", **TINY).t_embedder is None
    fresh = llamagen.load(path, "custom", beta_embedding=True, **TINY)
    assert not fresh.t_embedder.mlp[2].weight.any() and fresh.t_embedder.mlp[0].weight.any()
    gft_file = tmp_path / "gft.pt"
    torch.save({"model": official_state(tiny(trained=True))}, gft_file)
    with pytest.raises(CheckpointMismatchError, match="4 unexpected key"):
        llamagen.load(gft_file, "custom", beta_embedding=False, **TINY)


# ---- sampling ----
def test_sampling_at_beta_one_with_a_zero_embedder_equals_plain_sampling():
    base = tiny(beta_embedding=False)
    gft = tiny(beta_embedding=True)  # zero second layer: the embedding is exactly 0
    gft.load_state_dict({**gft.state_dict(), **base.state_dict()})
    labels = [0, 1, 4, 2]
    for cfg_scale in (1.0, 2.0):
        plain = generate(
            base, labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(3)
        )
        got = generate(
            gft,
            labels,
            cfg_scale=cfg_scale,
            gft_beta=1.0,
            generator=torch.Generator().manual_seed(3),
        )
        assert torch.equal(got, plain)


def test_sampling_uses_beta_in_the_class_token():
    """Greedy samples are the argmax of the teacher-forced logits at the same beta."""
    model = tiny(trained=True)
    labels = torch.tensor([0, 1, 2, 3, 4])
    for beta in (0.5, 1.0):
        tokens = generate(model, labels, top_k=1, gft_beta=beta)
        assert torch.equal(model.logits(labels, tokens, beta=beta).argmax(-1), tokens)
    assert not torch.equal(
        generate(model, labels, top_k=1, gft_beta=0.3), generate(model, labels, top_k=1)
    )


def test_sampler_refuses_a_beta_for_a_plain_model_or_out_of_range():
    with pytest.raises(ValueError, match="no beta embedding"):
        Sampler(tiny(beta_embedding=False)).generate([0], gft_beta=0.7)
    for beta in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
            Sampler(tiny()).generate([0], gft_beta=beta)


def test_cli_sample_takes_gft_beta_and_refuses_it_for_a_plain_model(tmp_path, capsys):
    gft, plain = tmp_path / "gft.safetensors", tmp_path / "plain.safetensors"
    llamagen.save(tiny(trained=True), gft)
    llamagen.save(tiny(beta_embedding=False), plain)

    def sample(path, out, *options) -> int:
        common = ["--device", "cpu", "--quiet", "--classes", "0-2", "--seed", "4"]
        return main(["sample", str(path), "--out", str(tmp_path / out), *common, *options])

    assert sample(gft, "a", "--gft-beta", "0.66") == 0
    assert sample(gft, "none") == 0
    with_beta, without = (np.load(tmp_path / run / "tokens.npz") for run in ("a", "none"))
    assert with_beta["tokens"].shape == (3, N)
    assert not np.array_equal(with_beta["tokens"], without["tokens"])
    recorded = json.loads((tmp_path / "a" / "run.json").read_text())
    assert recorded["sampling"]["gft_beta"] == 0.66
    assert sample(plain, "b", "--gft-beta", "0.7") == 1
    assert "no beta embedding" in capsys.readouterr().err
    assert sample(gft, "c", "--gft-beta", "2") == 2
    assert "argument --gft-beta: must be in (0, 1], got 2" in capsys.readouterr().err


# ---- training ----
def gft_config(out, init, codes, dropout: float = 0.1, **train) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"init": init, "name": "custom", "arch": {"resid_dropout": dropout}},
            "data": {"path": codes},
            "method": {"name": "gft", "class_dropout": 0.3},
            "optim": {"lr": 1e-3, "schedule": "cosine", "min_lr_ratio": 0.05},
            "train": {
                "global_batch": 4,
                "micro_batch": 2,
                "steps": 6,
                "device": "cpu",
                "precision": "fp32",
                "progress": False,
                **train,
            },
            "checkpoint": {"out": str(out), "every": 3, "keep": 1},
        }
    )


def test_gft_finetune_from_a_plain_model_runs_and_resumes_bit_exact(tmp_path):
    init = tmp_path / "init.safetensors"
    llamagen.save(tiny(beta_embedding=False, dropout=0.1), init)
    labels, tokens = batch(12, seed=2)
    codes = tmp_path / "codes.safetensors"
    write_flat_codes(codes, tokens, labels, vocab_size=TINY["vocab_size"], grid=TINY["grid"])
    run_training(gft_config(tmp_path / "straight", str(init), str(codes)))
    broken = gft_config(tmp_path / "broken", str(init), str(codes))
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(5)])
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [3]
    run_training(broken, resume=True)
    a = llamagen.load(tmp_path / "straight" / "final.safetensors")
    b = llamagen.load(tmp_path / "broken" / "final.safetensors")
    assert a.config.beta_embedding and a.t_embedder.mlp[2].weight.any()  # trained from zero
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    logs = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("straight", "broken")
    ]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert all(0.0 < r["beta"] < 1.0 and math.isfinite(r["loss"]) for r in logs[0])


def test_gft_config_refuses_to_drop_the_embedder():
    with pytest.raises(ValueError, match="method gft trains the beta embedding"):
        TrainConfig.from_dict(
            {"method": {"name": "gft"}, "model": {"arch": {"beta_embedding": False}}}
        )


@pytest.mark.parametrize("name", ["llamagen_3B_gft", "llamagen_L_gft"])
def test_recipe_configs_state_the_released_fine_tuning_settings(name):
    config = load_config(REPO / "configs" / f"{name}.toml")
    assert config.method.name == "gft" and config.method.class_dropout == 0.1
    optim = config.optim
    assert (optim.lr, optim.schedule, optim.betas, optim.weight_decay) == (
        2e-4,
        "cosine",
        (0.9, 0.95),
        0.05,
    )
    assert optim.lr * optim.min_lr_ratio == pytest.approx(1e-5)
    assert optim.grad_clip == 1.0 and optim.warmup_steps == 0 and optim.ema_decay == 0.0
    assert config.train.global_batch == 256 and config.train.precision == "bf16"


@pytest.mark.numerics
def test_keyed_beta_draws_are_the_rows_own_whatever_the_micro_batch(tmp_path):
    """beta comes from (seed, step, global position): 4 micro-steps of 1 = 1 step of 4."""
    init = tmp_path / "init.safetensors"
    llamagen.save(tiny(beta_embedding=False), init)
    labels, tokens = batch(8, seed=2)
    codes = tmp_path / "codes.safetensors"
    write_flat_codes(codes, tokens, labels, vocab_size=TINY["vocab_size"], grid=TINY["grid"])
    finals = []
    for micro in (4, 1):
        out = tmp_path / f"micro{micro}"
        run_training(gft_config(out, str(init), str(codes), 0.0, micro_batch=micro, steps=2,
                                weights_dtype="fp64"))
        finals.append(llamagen.load(out / "final.safetensors").state_dict())
    assert_same_run(*finals)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, parallel):
    """Both passes go through the wrapped forward: DDP and FSDP make one process's updates."""
    init = tmp_path / "init.safetensors"
    llamagen.save(tiny(beta_embedding=False), init)
    labels, tokens = batch(16, seed=2)
    codes = tmp_path / "codes.safetensors"
    write_flat_codes(codes, tokens, labels, vocab_size=TINY["vocab_size"], grid=TINY["grid"])
    sizes = dict(global_batch=8, micro_batch=4, steps=3, weights_dtype="fp64")
    run_training(gft_config(tmp_path / "single", str(init), str(codes), 0.0, **sizes))
    launch(gft_config(tmp_path / "multi", str(init), str(codes), 0.0, parallel=parallel, **sizes))
    single = llamagen.load(tmp_path / "single" / "final.safetensors").state_dict()
    multi = llamagen.load(tmp_path / "multi" / "final.safetensors").state_dict()
    assert multi["t_embedder.mlp.2.weight"].any()
    assert_same_run(single, multi)


def released_sampler_embedding(t_embedder, beta: float, rows: int) -> torch.Tensor:
    """GFT's released sampler transcribed (thu-ml/GFT LlamaGen/autoregressive/models/gpt.py
    :286-291,409-411): beta a float, the embedding's dtype throughout, frequencies on the CPU."""
    dtype = t_embedder.mlp[0].weight.dtype
    betas = torch.ones(rows).to(dtype) * beta
    t = betas * 1000
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def test_released_sampler_numerics_are_gfts_sampler_and_differ_from_training():
    model = tiny(trained=True).to(torch.bfloat16)
    labels = torch.tensor([0, NULL, 3])
    for beta in (0.66, 0.7):
        got = model.t_embedder.released(beta, 3)
        assert torch.equal(got, released_sampler_embedding(model.t_embedder, beta, 3))
    scaled = torch.ones(1).to(torch.bfloat16) * 0.66 * 1000
    assert scaled.item() == 660.0  # bf16(0.66) = 0.66015625, times 1000 rounds to 660
    with torch.no_grad():
        model.setup_kv_cache(3, torch.bfloat16)
        released = model.prefill(labels, 0.66, "released")
        training = model.prefill(labels, 0.66)
    assert not torch.equal(released[0], training[0])  # other numerics
    assert not torch.equal(released[1], training[1])  # the null row: beta 0.66, not 1


def test_cli_gft_numerics_released_is_recorded_and_needs_a_beta(tmp_path, capsys):
    path = tmp_path / "gft.safetensors"
    llamagen.save(tiny(trained=True), path)
    common = ["--device", "cpu", "--quiet", "--classes", "0-2", "--weights-dtype", "bfloat16"]
    assert main(["sample", str(path), "--out", str(tmp_path / "r"), *common, "--gft-beta",
                 "0.66", "--gft-numerics", "released"]) == 0
    recorded = json.loads((tmp_path / "r" / "run.json").read_text())
    assert recorded["sampling"]["gft_numerics"] == "released"
    assert main(["sample", str(path), "--out", str(tmp_path / "x"), *common, "--gft-numerics",
                 "released"]) == 1
    assert "--gft-numerics: sets how GFT's beta is computed; give --gft-beta too" in \
        capsys.readouterr().err
