"""Trainer correctness: gradients vs hand-written losses, accumulation, resume, configs, CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccalign.cli import main
from ccalign.models import llamagen
from ccalign.train import (
    LRSchedule,
    NonFiniteLossError,
    Trainer,
    load_config,
    param_groups,
    run_training,
)
from ccalign.train.distributed import BatchPlan, keyed_row_mask
from ccalign.train.state import latest_checkpoint, list_checkpoints
from ccalign.weights import load_weights
from support import REPO
from support.numerics import assert_same_run
from support.processes import Killed, kill_after
from support.tiny import (
    CLASSES,
    GRID,
    VOCAB,
    RandomCodes,
    capture_grads,
    load_final,
    make_config,
    tiny_model,
    write_files,
)


# ---- losses and gradients against independent transcriptions ----
def test_cca_step_gradient_matches_hand_written_loss(tmp_path):
    """Pairs rolled per micro-batch, keyed null rows, loss / accum: the gradient is exact."""
    model, init = tiny_model(), tiny_model()
    data = RandomCodes(16)
    cfg = make_config(
        tmp_path, method={"uncond_ratio": 0.3}, train={"steps": 1}, optim={"grad_clip": 0.0}
    )
    trainer = Trainer(cfg, model, data)
    grads = capture_grads(trainer)
    trainer.fit()

    beta, lam = 0.5, 10.0
    order = np.random.default_rng([0, 0]).permutation(16)[:8]
    null_rows = keyed_row_mask(0, 1, 8, 0.3)
    reference = copy.deepcopy(init).eval()
    total = 0.0
    for chunk in (slice(0, 4), slice(4, 8)):
        tokens, labels = data.tokens[order[chunk]], data.labels[order[chunk]]
        mask = null_rows[chunk]
        pos = torch.where(mask, CLASSES, labels)
        neg = torch.where(mask, CLASSES, labels[[1, 2, 3, 0]])
        is_pos = neg == pos
        with torch.no_grad():
            ref_pos, ref_neg = reference(pos, tokens), reference(neg, tokens)
        d_pos, d_neg = init(pos, tokens) - ref_pos, init(neg, tokens) - ref_neg
        weight = torch.where(is_pos, 1.0, lam)
        sign = torch.where(is_pos, 1.0, -1.0)
        per_row = -F.logsigmoid(beta * d_pos) - weight * F.logsigmoid(sign * beta * d_neg)
        total = total + per_row.mean() / lam / 2
    total.backward()
    for name, param in init.named_parameters():
        scale = param.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[0][name], param.grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.numerics
def test_mle_accumulation_equals_one_big_step_and_hand_written_nll(tmp_path):
    """4 micro-steps of 2 == 1 step of 8 == mean per-token NLL with keyed class dropout (fp64:
    the sums run in other orders, see support.numerics)."""
    data = RandomCodes(16)
    runs = []
    for micro in (8, 2):
        cfg = make_config(
            tmp_path / str(micro),
            method={"name": "mle", "class_dropout": 0.25},
            train={"micro_batch": micro, "steps": 2, "weights_dtype": "fp64"},
            optim={"grad_clip": 0.0},
        )
        trainer = Trainer(cfg, tiny_model(dropout=0.0), data)
        grads = capture_grads(trainer)
        trainer.fit()
        runs.append((grads, trainer.model.state_dict()))
    (big_grads, big_weights), (acc_grads, acc_weights) = runs
    for step in range(2):
        assert_same_run(big_grads[step], acc_grads[step])
    assert_same_run(big_weights, acc_weights)

    model = tiny_model().double()
    order = np.random.default_rng([0, 0]).permutation(16)[:8]
    labels = torch.where(keyed_row_mask(0, 1, 8, 0.25), CLASSES, data.labels[order])
    nll = -model(labels, data.tokens[order]) / (GRID * GRID)
    nll.mean().backward()
    assert_same_run(big_grads[0], {name: p.grad for name, p in model.named_parameters()})


def test_param_groups_decay_only_matrices_and_embeddings():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.wqkv.weight", f"layers.{i}.attention.wo.weight"}
        expected |= {f"layers.{i}.feed_forward.w{j}.weight" for j in (1, 2, 3)}
    assert decayed == expected
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - expected
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_reference_is_frozen_and_d_is_zero_at_step_zero(tmp_path):
    init = tiny_model()
    trainer = Trainer(make_config(tmp_path, train={"steps": 3}), tiny_model(), RandomCodes(32))
    records = []
    trainer.callbacks.append(lambda t, record: records.append(record))
    trainer.fit()
    reference = trainer.reference
    for name, param in reference.named_parameters():
        assert not param.requires_grad and param.grad is None
        assert torch.equal(param, init.state_dict()[name])
    assert records[0]["d_pos"] == 0.0 and records[0]["d_neg"] == 0.0
    assert records[-1]["d_pos"] != 0.0
    assert not torch.equal(trainer.model.output.weight, init.output.weight)

    modes = {"both": (True, True), "none": (False, False), "policy-only": (True, False)}
    for mode, (policy_training, reference_training) in modes.items():
        config = make_config(tmp_path / mode, method={"dropout": mode})
        trainer = Trainer(config, tiny_model(0.1), RandomCodes(32))
        assert trainer.policy.training == policy_training, mode
        assert trainer.reference.training == reference_training, mode


# ---- resume, NaN, checkpoints ----
def test_killed_and_resumed_run_is_bitwise_identical(tmp_path):
    init, codes = write_files(tmp_path, n=16, dropout=0.1)
    sections = dict(
        model={"init": init, "name": "custom"},
        data={"path": codes},
        method={"uncond_ratio": 0.3},
        optim={"schedule": "cosine", "warmup_steps": 2, "ema_decay": 0.9},
        train={"global_batch": 4, "micro_batch": 2, "steps": 6},
    )
    straight = make_config(tmp_path / "straight", checkpoint={"every": 3}, **sections)
    run_training(straight)
    broken = make_config(tmp_path / "broken", checkpoint={"every": 3, "keep": 1}, **sections)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(5)])
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [3]
    run_training(broken, resume=True)

    for name in ("final.safetensors", "final_ema.safetensors"):
        a, b = load_final(tmp_path / "straight" / name), load_final(tmp_path / "broken" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    logs = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("straight", "broken")
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_nan_loss_raises_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    init, codes = write_files(tmp_path)

    def poison(trainer, record):
        if record["step"] == 2:
            with torch.no_grad():
                trainer.model.norm.weight.fill_(float("nan"))

    cfg = make_config(
        tmp_path / "run",
        model={"init": init},
        data={"path": codes},
        train={"steps": 4},
        checkpoint={"every": 1},
    )
    with pytest.raises(NonFiniteLossError, match="step 3"):
        run_training(cfg, callbacks=[poison])
    path, state = latest_checkpoint(tmp_path / "run")
    assert state["step"] == 2 and path.name == "step_00000002.pt"
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "run" / "final.safetensors").exists()


def test_latest_checkpoint_skips_a_damaged_file(tmp_path):
    init, codes = write_files(tmp_path)
    run_training(make_config(tmp_path / "run", model={"init": init}, data={"path": codes}))
    (tmp_path / "run" / "checkpoints" / "step_00000009.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="step_00000009"):
        path, state = latest_checkpoint(tmp_path / "run")
    assert state["step"] == 2 and path.name == "step_00000002.pt"


def test_resume_refuses_when_every_checkpoint_is_unreadable(tmp_path):
    """It started again at step 0 and appended a second run to metrics.jsonl."""
    init, codes = write_files(tmp_path)
    config = make_config(tmp_path / "run", model={"init": init}, data={"path": codes},
                         train={"steps": 4}, checkpoint={"every": 1, "keep": 2})
    with pytest.raises(Killed):
        run_training(config, callbacks=[kill_after(3)])
    log = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    for _, path in list_checkpoints(tmp_path / "run"):
        path.write_bytes(b"damaged")
    with pytest.warns(UserWarning), pytest.raises(
        ValueError, match=r"none of its checkpoints can be read \(step_00000002.pt, "
        r"step_00000003.pt\); restore one, or start over with --restart"
    ):
        run_training(config, resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start_with_one_log(tmp_path):
    init, codes = write_files(tmp_path)
    config = make_config(tmp_path / "run", model={"init": init}, data={"path": codes},
                         train={"steps": 3}, checkpoint={"every": 100})
    with pytest.raises(Killed):
        run_training(config, callbacks=[kill_after(2)])
    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "lo')  # a line the kill cut short
    run_training(config, resume=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_bf16_autocast_on_cpu_changes_the_numerics_slightly(tmp_path):
    losses = []
    for precision in ("fp32", "bf16"):
        trainer = Trainer(
            make_config(
                tmp_path / precision,
                method={"name": "mle"},
                train={"steps": 1, "precision": precision},
            ),
            tiny_model(),
            RandomCodes(16),
        )
        trainer.callbacks.append(lambda t, record: losses.append(record["loss"]))
        trainer.fit()
    assert losses[0] != losses[1] and losses[1] == pytest.approx(losses[0], rel=0.05)


def test_resume_refuses_a_different_reference(tmp_path):
    init, codes = write_files(tmp_path)
    cfg = make_config(tmp_path / "run", model={"init": init}, data={"path": codes})
    run_training(cfg)
    llamagen.save(tiny_model(seed=5), init)
    with pytest.raises(ValueError, match="reference"):
        run_training(cfg, resume=True)


# ---- pieces ----
def test_batch_plan_covers_each_global_batch_once_for_any_layout():
    for world, micro in ((1, 8), (1, 2), (2, 4), (4, 2), (2, 1)):
        plan = BatchPlan(
            dataset_size=20, global_batch=8, micro_batch=micro, world_size=world, seed=3
        )
        assert plan.steps_per_epoch == 2 and plan.accum_steps == 8 // (micro * world)
        order = plan.epoch_order(1)
        for step in range(2):
            chunks = [c for r in range(world) for c in plan.micro_batches(order, step, r)]
            assert np.array_equal(np.concatenate(chunks), order[step * 8 : step * 8 + 8])
    with pytest.raises(ValueError, match="multiple"):
        BatchPlan(dataset_size=20, global_batch=8, micro_batch=3, world_size=1, seed=0)


def test_keyed_row_mask_is_deterministic_with_the_right_rate():
    a, b = keyed_row_mask(7, 11, 100_000, 0.1), keyed_row_mask(7, 11, 100_000, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, keyed_row_mask(7, 12, 100_000, 0.1))
    assert abs(a.float().mean().item() - 0.1) < 0.004
    assert not keyed_row_mask(0, 1, 10, 0.0).any()


def test_lr_schedules_against_closed_forms():
    cosine = LRSchedule(1.0, 10, kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert cosine(1) == 0.5 and cosine(2) == 1.0
    for step in range(3, 11):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8))
        assert cosine(step) == pytest.approx(expected, rel=1e-12)
    linear = LRSchedule(2.0, 5, kind="linear")
    assert [linear(s) for s in range(1, 6)] == pytest.approx([1.6, 1.2, 0.8, 0.4, 0.0])
    assert LRSchedule(3.0, 5)(4) == 3.0


def test_config_rejects_unknown_keys_and_parses_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["lr=1"])
    cfg = load_config(None, ["optim.lr=3e-4", "method.name=dpo", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.method.name == "dpo" and cfg.optim.betas == (0.8, 0.9)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  micro_batch: 2\nmethod:\n  lam: 5\n")
    cfg = load_config(yaml_file)
    assert cfg.train.micro_batch == 2 and cfg.method.lam == 5
    with pytest.raises(ValueError, match="method.name"):
        load_config(None, ["method.name=ppo"])


@pytest.mark.parametrize(
    "size,lam", [("B", 1000), ("L", 300), ("XL", 1000), ("XXL", 1000), ("3B", 500)]
)
def test_paper_recipe_configs(size, lam):
    cfg = load_config(REPO / "configs" / f"llamagen_{size}.toml")
    assert cfg.model.name == f"GPT-{size}" and cfg.model.grid == 24
    assert (cfg.method.name, cfg.method.beta, cfg.method.lam) == ("cca", 0.02, lam)
    assert cfg.method.uncond_ratio == 0.1 and cfg.train.global_batch == 256
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-5, (0.9, 0.95), 0.05)
    # the official clip 1.0 acts on a gradient summed over 16 micro-steps: 1/16 on the mean
    assert (cfg.optim.grad_clip, cfg.optim.schedule, cfg.train.precision) == (
        1.0 / 16,
        "constant",
        "bf16",
    )
    assert cfg.method.dropout == "both"  # the official --keep_dropout
    assert cfg.train.epochs == 1.0 and cfg.train.global_batch % cfg.train.micro_batch == 0


def test_every_shipped_config_loads():
    names = sorted(p.name for p in (REPO / "configs").glob("*.toml"))
    assert "tiny_cpu.toml" in names and "fmnist_pretrain.toml" in names
    for name in names:
        assert load_config(REPO / "configs" / name).train.global_batch >= 1


# ---- command line ----
def test_cli_finetune_end_to_end_and_resume(tmp_path):
    init, codes = write_files(tmp_path)
    out = tmp_path / "run"
    args = [
        "finetune",
        "--set",
        "model.save_official=true",
        "--config",
        str(REPO / "configs" / "tiny_cpu.toml"),
        "--init",
        init,
        "--data",
        codes,
        "--out",
        str(out),
    ]
    assert main(args) == 0
    final = load_final(out / "final.safetensors")
    start = llamagen.load(init).state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in final)
    official = load_weights(tiny_model(), out / "final.pt").state_dict()
    assert all(torch.equal(official[k], final[k]) for k in final)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert main([*args, "--resume", "--steps", "4"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_cli_finetune_rejects_data_that_does_not_fit_the_model(tmp_path, capsys):
    init, codes = write_files(tmp_path, labels=torch.arange(16) % 7)
    code = main(
        [
            "finetune",
            "--config",
            str(REPO / "configs" / "tiny_cpu.toml"),
            "--init",
            init,
            "--data",
            codes,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 1
    assert "labels span [0, 6]" in capsys.readouterr().err


def _finetune(tmp_path, init, codes, *options) -> int:
    return main(["finetune", "--config", str(REPO / "configs" / "tiny_cpu.toml"), "--init", init,
                 "--data", codes, "--out", str(tmp_path / "run"), *options])


@pytest.mark.parametrize("method", ["cca", "dpo", "unlearning"])
def test_contrastive_methods_refuse_data_of_one_class(tmp_path, capsys, method):
    """CCA on one-class codes trained with no negative on any step (neg_is_positive 1.0), rc 0."""
    init, codes = write_files(tmp_path, labels=torch.full((16,), 3))
    assert _finetune(tmp_path, init, codes, "--set", f"method.name={method}") == 1
    err = capsys.readouterr().err
    assert "every item of the training data has label 3" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("method", ["cca", "ddo"])
def test_an_all_null_class_ratio_is_refused(tmp_path, capsys, method):
    init, codes = write_files(tmp_path)
    assert _finetune(tmp_path, init, codes, "--set", f"method.name={method}",
                     "--set", "method.uncond_ratio=1.0") == 1
    assert "leaves " + method + " no conditional row to train" in capsys.readouterr().err


def test_gft_with_lora_is_refused(tmp_path, capsys):
    """Under LoRA the new beta embedding stayed frozen at zero: --gft-beta 0.3 and 1.0 sampled
    the same tokens."""
    init, codes = write_files(tmp_path)
    assert _finetune(tmp_path, init, codes, "--set", "method.name=gft",
                     "--set", "method.lora.enabled=true") == 1
    assert "method gft with method.lora" in capsys.readouterr().err


def test_cli_pretrain_builds_a_fresh_model(tmp_path):
    _, codes = write_files(tmp_path)
    arch = f"{{dim=32, n_layer=1, n_head=4, vocab_size={VOCAB}, num_classes={CLASSES}}}"
    out = tmp_path / "pre"
    code = main(
        [
            "pretrain",
            "--config",
            str(REPO / "configs" / "tiny_cpu.toml"),
            "--set",
            f"model.arch={arch}",
            "--data",
            codes,
            "--out",
            str(out),
            "--steps",
            "2",
        ]
    )
    assert code == 0
    model = llamagen.load(out / "final.safetensors")
    assert model.config.n_layer == 1 and model.num_classes == CLASSES
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["nll_per_token"] > 0


@pytest.mark.numerics
def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    """Recomputed blocks replay the dropout masks: gradients equal the stored-activation ones."""
    grads, calls = [], []
    for enabled in (False, True):
        train = {"steps": 1, "activation_checkpointing": enabled, "weights_dtype": "fp64"}
        cfg = make_config(tmp_path / str(enabled), train=train)
        trainer = Trainer(cfg, tiny_model(dropout=0.1), RandomCodes(16))
        grads.append(capture_grads(trainer))
        count = []
        trainer.model.layers[0].attention.register_forward_hook(lambda *a, c=count: c.append(1))
        trainer.fit()
        calls.append(len(count))
    # one policy forward over [positives; negatives] per micro-step (2 micro-steps); with
    # checkpointing each block runs again in backward
    assert calls == [2, 4]
    assert_same_run(grads[0][0], grads[1][0])
    assert llamagen.load(tmp_path / "True" / "final.safetensors").num_parameters() > 0
