"""bf16 weights (compensated AdamW, bf16 reference, 8-bit option) and the memory plan."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

from ccalign.cli import main
from ccalign.models import llamagen
from ccalign.train import TrainConfig, Trainer, load_config, make_optimizer, run, run_training
from ccalign.train import lora as L
from ccalign.train import memory as M
from ccalign.train.precision import CompensatedAdamW, cast_parameters, round_stochastic
from ccalign.train.state import latest_checkpoint
from ccalign.train.trainer import enable_activation_checkpointing
from support import REPO
from support.processes import Killed, kill_after, launch
from support.tiny import RandomCodes, load_final, make_config, run_config, tiny_model, write_files

#: parameter counts of the released models (docs: reference-models.md)
PRESET_PARAMETERS = {
    "GPT-B": 110_888_448,
    "GPT-L": 342_910_976,
    "GPT-XL": 774_699_520,
    "GPT-XXL": 1_410_972_672,
    "GPT-3B": 3_096_659_200,
}
PRESET_LAYERS = {"GPT-B": 12, "GPT-L": 24, "GPT-XL": 36, "GPT-XXL": 48, "GPT-3B": 24}


def meta_preset(name: str) -> llamagen.LlamaGen:
    with torch.device("meta"):
        return llamagen.build(name, grid=24)


# ---- the optimizer ----
def gradient_sequence(shapes, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def run_optimizer(params, grads, make) -> list[torch.Tensor]:
    optimizer = make(params)
    for step_grads in grads:
        for p, grad in zip(params, step_grads, strict=True):
            p.grad = grad.to(p.dtype)
        optimizer.step()
    return [p.detach().float() for p in params]


def test_compensated_adamw_on_float32_is_torch_adamw():
    """On float32 weights, the same update as torch.optim.AdamW, bit for bit."""
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    grads = gradient_sequence([t.shape for t in start], steps=6)
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    ours = run_optimizer(
        [t.clone() for t in start], grads, lambda p: CompensatedAdamW(p, **settings)
    )
    torch_ = run_optimizer(
        [t.clone() for t in start], grads, lambda p: torch.optim.AdamW(p, foreach=False, **settings)
    )
    for a, b in zip(ours, torch_, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def bf16_drift(rounding: str, shape=(64, 64), center: float = 0.0) -> tuple[float, float]:
    """(distance moved, distance from the float64 AdamW run), both over the distance the float64
    run travelled, after 100 steps at the recipe's lr 1e-5 on weights of size 0.02. The weight is
    the one the optimizer tracks: bf16 value plus remainder when compensated."""
    torch.manual_seed(0)
    start = (center + 0.02 * torch.randn(shape)).to(torch.bfloat16)
    grads = gradient_sequence([shape], steps=100)
    settings = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.05)
    exact = run_optimizer(
        [start.double()],
        [[g.double() for g in step] for step in grads],
        lambda p: torch.optim.AdamW(p, foreach=False, **settings),
    )[0].double()
    weight = start.float() if rounding == "float32" else start.clone()
    optimizer = CompensatedAdamW(
        [weight], rounding=rounding.replace("float32", "nearest"), **settings
    )
    run_optimizer([weight], grads, lambda p: optimizer)
    ours = weight.double() + optimizer.state[weight].get("remainder", torch.zeros(())).double()
    travelled = (exact - start.double()).norm()
    moved = (ours - start.double()).norm() / travelled
    return float(moved), float((ours - exact).norm() / travelled)


def test_bf16_round_to_nearest_loses_the_updates():
    moved, error = bf16_drift("nearest")
    assert moved < 0.5 and error > 0.5


def test_bf16_compensated_update_follows_the_float64_run():
    moved, error = bf16_drift("compensated")
    assert moved == pytest.approx(1.0, abs=0.01)
    assert error < 0.01


def test_norm_weights_near_one_keep_their_updates():
    """On RMSNorm weights (~1.0) the bf16 pair holds ~2^-18: about as close to the float64 run
    as float32 weights themselves get (2^-24 steps, errors of 1e-5 updates add up there too)."""
    moved, error = bf16_drift("compensated", shape=(256,), center=1.0)
    _, float32_error = bf16_drift("float32", shape=(256,), center=1.0)
    assert moved == pytest.approx(1.0, abs=0.02)
    assert error < float32_error + 0.01


def test_stochastic_rounding_is_unbiased_and_keeps_bf16_values():
    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16
    rounded = round_stochastic(value, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(rounded.mean()) - (1.0 + 2**-10)) < 2e-5
    exact = torch.tensor([1.0, -0.5, 3.0, 0.0])
    assert torch.equal(round_stochastic(exact).float(), exact)


# ---- the trainer with bf16 weights ----
def test_bf16_weights_train_step_matches_float32(tmp_path):
    """bf16 weights, bf16 reference, float32 moments and a bf16 remainder; the first step's loss
    and update agree with the float32 run within bf16 precision."""
    results = {}
    for dtype in ("fp32", "bf16"):
        config = make_config(tmp_path / dtype, train={"weights_dtype": dtype, "steps": 1})
        trainer = Trainer(config, tiny_model(), RandomCodes(8))
        start = [p.detach().float().clone() for p in trainer.model.parameters()]
        batch = RandomCodes(8)
        micro = [(batch.tokens[:4], batch.labels[:4]), (batch.tokens[4:], batch.labels[4:])]
        record = trainer.train_step(micro, 1)
        update = [
            p.detach().float() - s for p, s in zip(trainer.model.parameters(), start, strict=True)
        ]
        results[dtype] = (trainer, record, torch.cat([u.flatten() for u in update]))
    trainer, record, update = results["bf16"]
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    assert trainer.model.rope.dtype == torch.float32
    state = trainer.optimizer.state[next(trainer.model.parameters())]
    assert state["exp_avg"].dtype == torch.float32 and state["remainder"].dtype == torch.bfloat16
    _, record32, update32 = results["fp32"]
    assert record["loss"] == pytest.approx(record32["loss"], rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(update, update32, dim=0)
    assert cosine > 0.97


def test_bf16_weights_run_killed_and_resumed_is_bitwise_identical(tmp_path):
    """The float32 moments and the bf16 remainders survive a checkpoint exactly."""
    init, codes = write_files(tmp_path, n=16, dropout=0.1)
    sections = dict(
        model={"init": init, "name": "custom"},
        data={"path": codes},
        train={"global_batch": 4, "micro_batch": 2, "steps": 4, "weights_dtype": "bf16"},
    )
    straight = make_config(tmp_path / "straight", checkpoint={"every": 2}, **sections)
    run_training(straight)
    broken = make_config(tmp_path / "broken", checkpoint={"every": 2}, **sections)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(3)])
    run_training(broken, resume=True)
    a = load_final(tmp_path / "straight" / "final.safetensors")
    b = load_final(tmp_path / "broken" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state_dtypes(tmp_path / "broken") == state_dtypes(tmp_path / "straight")
    assert set(state_dtypes(tmp_path / "broken").values()) == {torch.float32, torch.bfloat16}


def state_dtypes(run) -> dict:
    """(parameter key, state name) -> dtype in the run's newest checkpoint."""
    _, state = latest_checkpoint(run)
    return {
        (key, name): value.dtype
        for key, entry in state["optimizer"]["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }


def test_reference_dtype_can_differ_from_the_weights(tmp_path):
    config = make_config(tmp_path, train={"weights_dtype": "bf16", "reference_dtype": "fp32"})
    trainer = Trainer(config, tiny_model(), RandomCodes(8))
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.float32}
    config = make_config(tmp_path, train={"reference_dtype": "bf16"})
    trainer = Trainer(config, tiny_model(), RandomCodes(8))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}


def test_bad_precision_keys_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"train.weights_dtype = 'fp16' is not one of"):
        make_config(tmp_path, train={"weights_dtype": "fp16"})
    with pytest.raises(ValueError, match=r"optim.optimizer = 'sgd' is not one of"):
        make_config(tmp_path, optim={"optimizer": "sgd"})


def test_adamw8bit_without_torchao_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # import fails as if not installed
    optim = TrainConfig.from_dict({"optim": {"optimizer": "adamw8bit"}}).optim
    with pytest.raises(ImportError, match="pip install torchao"):
        make_optimizer(tiny_model(), optim, torch.device("cpu"))


@pytest.mark.slow
def test_adamw8bit_state_bytes_match_the_plan():
    """torchao's AdamW8bit (compiles its step: slow on CPU) keeps the bytes the plan counts."""
    pytest.importorskip("torchao.optim")
    model = cast_parameters(tiny_model(), torch.bfloat16)
    optim = TrainConfig.from_dict({"optim": {"optimizer": "adamw8bit"}}).optim
    optimizer = make_optimizer(model, optim, torch.device("cpu"))
    model(torch.tensor([0, 1]), torch.randint(0, 32, (2, 16))).sum().backward()
    optimizer.step()
    held = sum(
        sum(t.nbytes for t in _plain_tensors(v))
        for s in optimizer.state.values()
        for k, v in s.items()
        if k != "step"
    )
    assert held == M.optimizer_state_bytes(model.parameters(), "adamw8bit", torch.bfloat16)


def _plain_tensors(tensor):
    """The plain tensors inside a torchao quantised state (codes, scale, map) or the tensor."""
    names = getattr(tensor, "tensor_attrs", None)
    return [getattr(tensor, n) for n in names] if names else [tensor]


# ---- the plan: exact counts ----
@pytest.mark.parametrize("name", sorted(PRESET_PARAMETERS))
def test_plan_counts_weights_and_optimizer_exactly_for_presets(name):
    model = meta_preset(name)
    assert next(model.parameters()).is_meta
    n, tensors = PRESET_PARAMETERS[name], 7 * PRESET_LAYERS[name] + 4
    fp32 = M.plan_memory(model, micro_batch=2, dtypes=M.Dtypes())
    assert (fp32.parameters, fp32.weights, fp32.gradients) == (n, 4 * n, 4 * n)
    assert fp32.optimizer == 8 * n + 4 * tensors  # two float32 moments, a float32 step each
    assert fp32.reference == 4 * n
    bf16 = M.plan_memory(
        model, micro_batch=2, dtypes=M.Dtypes(weights=torch.bfloat16, reference=torch.bfloat16)
    )
    assert (bf16.weights, bf16.gradients, bf16.reference) == (2 * n, 2 * n, 2 * n)
    assert bf16.optimizer == 10 * n  # two float32 moments and a bf16 remainder
    assert bf16.autocast_copies == 0


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_plan_optimizer_bytes_equal_a_real_optimizer_state(tmp_path, weights):
    config = make_config(tmp_path, train={"weights_dtype": weights})
    trainer = Trainer(config, tiny_model(), RandomCodes(8))
    batch = RandomCodes(8)
    trainer.train_step(
        [(batch.tokens[:4], batch.labels[:4]), (batch.tokens[4:], batch.labels[4:])], 1
    )
    held = sum(
        v.nbytes
        for s in trainer.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    assert held == M.optimizer_state_bytes(trainer.model.parameters(), "adamw", dtype)


# ---- the plan: activations against measured saved tensors ----
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16-weights"])
def test_activation_estimate_matches_saved_tensor_bytes(mode, checkpointing):
    """The estimate equals (to 1%) the bytes autograd keeps for backward, counted storage by
    storage with a saved-tensor hook, for float32, bf16 autocast and bf16 weights, dropout on."""
    torch.manual_seed(0)
    model = llamagen.build(
        "custom", grid=6, dim=64, n_layer=3, n_head=4, vocab_size=128, num_classes=10
    )
    if mode == "bf16-weights":
        cast_parameters(model, torch.bfloat16)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    rows = 6
    tokens, labels = torch.randint(0, 128, (rows, 36)), torch.randint(0, 10, (rows,))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            return model(labels.clone(), tokens.clone())

    measured = M.saved_activation_bytes(forward, [*model.parameters(), *model.buffers()])
    dtypes = M.Dtypes(
        weights=torch.bfloat16 if mode == "bf16-weights" else torch.float32,
        autocast=mode != "fp32",
        device_type="cpu",
    )
    estimate = llamagen.FAMILY.activations(model, rows, dtypes, checkpointing).saved
    if mode == "autocast" and not checkpointing:  # the blocks' bf16 weight copies are saved too
        block_linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
        estimate += 2 * sum(m.weight.numel() for m in block_linears)
    assert estimate == pytest.approx(measured, rel=0.01)


def test_largest_micro_batch_is_the_boundary():
    model = meta_preset("GPT-L")
    model.train()
    dtypes = M.Dtypes()
    plan = M.plan_memory(model, micro_batch=8, dtypes=dtypes, gpu_memory=80 * M.GIB)
    best = plan.max_micro_batch
    usable = 80 * M.GIB * (1 - M.HEADROOM)
    assert M.plan_memory(model, micro_batch=best, dtypes=dtypes).total <= usable
    assert M.plan_memory(model, micro_batch=best + 1, dtypes=dtypes).total > usable
    checkpointed = M.plan_memory(
        model, micro_batch=8, dtypes=dtypes, activation_checkpointing=True, gpu_memory=80 * M.GIB
    )
    assert checkpointed.max_micro_batch > 4 * best
    assert checkpointed.activations_other == plan.activations


def test_3b_on_one_80gib_gpu_needs_bf16_weights_for_a_useful_micro_batch():
    """The issue's goal: full CCA fine-tuning of GPT-3B at 384 px on one 80 GiB GPU; float32
    weights leave room for the official micro-batch of 2 at most."""
    model = meta_preset("GPT-3B")
    model.train()
    plain = M.plan_memory(model, micro_batch=2, dtypes=M.Dtypes(), gpu_memory=80 * M.GIB)
    lean = M.plan_memory(
        model,
        micro_batch=2,
        dtypes=M.Dtypes(weights=torch.bfloat16, reference=torch.bfloat16),
        activation_checkpointing=True,
        gpu_memory=80 * M.GIB,
    )
    assert plain.max_micro_batch <= 2
    assert lean.max_micro_batch >= 16


def test_parse_memory():
    assert M.parse_memory("80GiB") == 80 * 2**30
    assert M.parse_memory("141GB") == 141 * 2**30
    assert M.parse_memory("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="80GiB"):
        M.parse_memory("lots")


def test_unknown_model_family_is_named():
    with pytest.raises(ValueError, match="Linear is not a model of a registered family"):
        M.plan_memory(nn.Linear(2, 2), micro_batch=2, dtypes=M.Dtypes())


# ---- the command ----
def test_finetune_dry_run_prints_the_plan_without_files(capsys):
    code = main(
        [
            "finetune",
            "--config",
            str(REPO / "configs" / "llamagen_3B.toml"),
            "--dry-run",
            "--gpu-memory",
            "80GiB",
            "--set",
            'train.weights_dtype="bf16"',
            "--set",
            "train.activation_checkpointing=true",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "GPT-3B grid 24, 3,096,659,200 parameters" in out
    assert "largest micro-batch that fits:" in out
    plan = M.plan_from_config(
        load_config(
            REPO / "configs" / "llamagen_3B.toml",
            ['train.weights_dtype="bf16"', "train.activation_checkpointing=true"],
        ),
        80 * M.GIB,
    )
    assert f"{plan.total / M.GIB:.2f} GiB" in out


def test_a_run_that_does_not_fit_is_refused_before_anything_is_allocated(tmp_path, monkeypatch,
                                                                         capsys):
    """A huge micro-batch or model grew memory until the machine gave out."""
    init, codes = write_files(tmp_path)
    batch = ["train.micro_batch=512", "train.global_batch=512"]
    args = ["finetune", "--config", str(REPO / "configs" / "tiny_cpu.toml"), "--init", init,
            "--data", codes, "--out", str(tmp_path / "run"), *(f for b in batch
                                                              for f in ("--set", b))]
    config = load_config(REPO / "configs" / "tiny_cpu.toml", [
        f'model.init="{init}"', f'data.path="{codes}"', *batch])
    eight = TrainConfig.from_dict({**config.to_dict(), "train": {
        **config.to_dict()["train"], "micro_batch": 8, "global_batch": 8}})
    free = int(M.plan_from_config(eight).total / (1 - M.HEADROOM)) + 1
    assert M.plan_from_config(config).total > free * M.FIT_MARGIN
    monkeypatch.setattr(M, "free_memory", lambda device_type: free)
    built = []
    monkeypatch.setattr(run, "model_from_config", lambda *a: built.append(a))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.search(r"the run needs about [\d.]+ MiB of cpu memory \(micro-batch 512; ", err)
    assert "lower train.micro_batch (at most 8 fits)" in err and not built
    monkeypatch.setattr(M, "free_memory", lambda device_type: 0)
    assert main(args) == 1
    assert "no micro-batch fits beside the weights" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(M, "free_memory", lambda device_type: 0)
    monkeypatch.setenv(M.SKIP_CHECK_ENV, "1")
    assert main(args[:-4]) == 0  # the configured batch, trained: the check skipped


def test_the_plan_follows_the_method_gft_holds_no_reference_and_one_row_per_image():
    """GFT trains one conditional row per image and holds no reference copy (the plan charged
    CCA's two rows and a reference); its beta embedding is counted."""
    gft = M.plan_from_config(load_config(REPO / "configs" / "llamagen_3B_gft.toml"))
    cca = M.plan_from_config(load_config(REPO / "configs" / "llamagen_3B.toml",
                                         ["train.micro_batch=16"]))
    assert (gft.rows, cca.rows) == (16, 32) and gft.micro_batch == cca.micro_batch == 16
    assert gft.reference == 0 and cca.reference == cca.weights
    beta_mlp = 256 * 3200 + 3200 + 3200 * 3200 + 3200  # t_embedder: two linear layers
    assert gft.parameters == cca.parameters + beta_mlp
    held = 16 * 576 * 3200 * 4  # the unconditional pass's hidden states, float32
    plain = llamagen.FAMILY.activations(
        meta_preset("GPT-3B").train(), 16, M.Dtypes(device_type="cpu"), False
    )
    assert gft.activations == plain.saved + held
    ddo = M.plan_from_config(load_config(REPO / "configs" / "llamagen_L_ddo.toml"))
    assert ddo.rows == round(ddo.micro_batch * (2 - 0.5)) and ddo.reference == ddo.weights


def test_the_plan_counts_lora_adapters_only_as_trainable():
    """With LoRA only the adapters have gradients and optimizer state, and the reference is the
    same weights with the adapters off (the plan ignored LoRA)."""
    config = load_config(REPO / "configs" / "llamagen_L.toml", ["method.lora.enabled=true"])
    plan = M.plan_from_config(config)
    with torch.device("meta"):
        model = llamagen.build("GPT-L", grid=24)
        base = model.num_parameters()
        L.add_adapters(model, config.method.lora, seed=0)
    adapters = sum(p.numel() for n, p in model.named_parameters() if L.is_adapter_key(n))
    assert plan.trainable == adapters and plan.parameters == base + adapters
    assert plan.gradients == 4 * adapters and plan.reference == 0
    assert plan.optimizer == M.optimizer_state_bytes(
        [p for n, p in model.named_parameters() if L.is_adapter_key(n)], "adamw", torch.float32
    )
    assert plan.weights == 4 * (base + adapters)
    full = M.plan_from_config(load_config(REPO / "configs" / "llamagen_L.toml"))
    assert plan.activations > full.activations  # the adapters' rank-wide products


@pytest.mark.slow
def test_fsdp_with_bf16_weights_resumes_bitwise(tmp_path):
    """Two FSDP processes (gloo) with bf16 weights: the sharded float32 moments and remainders
    go through a gathered checkpoint and back, and the resumed run ends bitwise equal."""

    init, codes = write_files(tmp_path, n=24)
    two = {"parallel": "fsdp", "weights_dtype": "bf16"}
    launch(run_config(tmp_path / "straight", init, codes, 4, **two))
    broken = run_config(tmp_path / "broken", init, codes, 4, **two)
    launch(broken, kill=3)
    launch(broken, resume=True)
    a = load_final(tmp_path / "straight" / "final.safetensors")
    b = load_final(tmp_path / "broken" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state_dtypes(tmp_path / "broken") == state_dtypes(tmp_path / "straight")


# ---- the GPU check script ----
def test_gpu_check_script_parses():
    import subprocess

    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)


def test_gpu_report_joins_stages_with_the_official_figures(tmp_path):
    """The report reads what the stages wrote and puts the official figures beside them."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_report

    (tmp_path / "stages.tsv").write_text("train_GPT-L_mb8\t0\t12000\tpython ...\n")
    (tmp_path / "env.json").write_text(json.dumps({"machine": "test GPU"}))
    result = {"variant": "ccalign", "images_per_s": 120.0, "peak_mib": 9000.0}
    result.update(memory_kind="total", plan_mib={"total": 9500.0})
    args = {"model": "GPT-L", "micro_batch": 8, "weights_dtype": "fp32"}
    args["activation_checkpointing"] = False
    train = {"args": args, "machine": "test GPU", "results": [result]}
    (tmp_path / "train_GPT-L_mb8.json").write_text(json.dumps(train))
    row = {"model": "GPT-L", "mode": "graph", "batch": 256, "free_img_s": 300.0}
    row.update(free_latency_s=0.85, cfg_img_s=160.0, cfg_cost=1.9, free_setup_s=1.0)
    row.update(cfg_setup_s=1.0)
    (tmp_path / "sample_GPT-L_graph.json").write_text(json.dumps([row]))
    gpu_report.main([str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["train"][0]["official_images_per_s"] == 57.3
    assert report["sample"][0]["official_free_img_s"] == 19.2
    assert len(report["plans"]) == 10
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| train_GPT-L_mb8 | 0 | 12 |" in text and "test GPU" in text


def test_the_saved_bytes_probe_skips_tensors_without_a_real_storage():
    """Fake tensors left alive by a torch.compile elsewhere in the process (a test before this
    one) have no data pointer: the probe's scan of live tensors must pass them by."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ccalign.train.memory import _live_tensors

    with FakeTensorMode():
        fake = torch.empty(3)
    real = torch.zeros(2)
    live = _live_tensors()
    assert any(t is real for t in live) and not any(t is fake for t in live)
