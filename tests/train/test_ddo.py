"""DDO: the loss against float64 hand computation, the objective, negatives, rounds and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ccalign.align import ddo_loss
from ccalign.cli import main
from ccalign.conditions import ClassLabels
from ccalign.data.codes import open_codes, write_flat_codes
from ccalign.models import llamagen
from ccalign.sample import generate
from ccalign.train import TrainConfig, load_config, run_training
from ccalign.train.ddo import (
    FileNegatives,
    OnlineNegatives,
    Precision,
    negative_seed,
    step_rows,
)
from ccalign.train.distributed import BatchPlan
from ccalign.train.objectives import DDOObjective
from ccalign.train.state import list_checkpoints, tensor_fingerprint
from support import REPO
from support.numerics import assert_same_run
from support.processes import Killed, become_rank, free_port, kill_after

GRID, VOCAB, CLASSES = 3, 16, 4

FP32 = Precision(torch.float32, None)  # how the CPU tests score the reference


def tiny_model(seed: int = 0, dropout: float = 0.0) -> llamagen.LlamaGen:
    """A 1-layer model with a non-zero output head."""
    torch.manual_seed(seed)
    model = llamagen.build(
        "custom",
        grid=GRID,
        dim=16,
        n_layer=1,
        n_head=2,
        vocab_size=VOCAB,
        num_classes=CLASSES,
        token_dropout=dropout,
        resid_dropout=dropout,
        ffn_dropout=dropout,
    )
    nn.init.normal_(model.output.weight, std=0.3)
    return model


def write_files(folder: Path, n: int = 12, dropout: float = 0.0) -> tuple[str, str]:
    """An init model and a flat code file of ``n`` random items."""
    init = folder / "init.safetensors"
    llamagen.save(tiny_model(dropout=dropout), init)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (n, GRID * GRID), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    codes = folder / "codes.safetensors"
    write_flat_codes(codes, tokens, labels, vocab_size=VOCAB, grid=GRID)
    return str(init), str(codes)


def ddo_config(out: Path, init: str, codes: str, **method) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"name": "custom", "grid": GRID, "init": init},
            "data": {"path": codes},
            "method": {
                "name": "ddo",
                "beta": 0.5,
                "alpha": 3.0,
                "uncond_ratio": 0.3,
                "dropout": "none",
                "negatives_batch": 2,
                **method,
            },
            "optim": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1},
            "train": {
                "global_batch": 4,
                "micro_batch": 2,
                "steps": 5,
                "device": "cpu",
                "precision": "fp32",
                "progress": False,
            },
            "checkpoint": {"out": str(out), "every": 2, "keep": 1},
        }
    )


def final_state(path: Path) -> dict[str, torch.Tensor]:
    return llamagen.load(path).state_dict()


def same_weights(a: Path, b: Path) -> bool:
    x, y = final_state(a), final_state(b)
    return all(torch.equal(x[k], y[k]) for k in x)


# ---- the loss ----
def hand_ddo(pr, pf, rr, rf, uncond, beta, alpha) -> float:
    """The definition in float64 Python: per-row weights, mean, / max(alpha, 1)."""

    def log_sigmoid(z: float) -> float:
        return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))

    total = 0.0
    for i, null in enumerate(uncond):
        real_w, fake_w = (max(alpha, 1.0), 0.0) if null else (1.0, alpha)
        total -= real_w * log_sigmoid(beta * (pr[i] - rr[i]))
        if fake_w:
            total -= fake_w * log_sigmoid(-beta * (pf[i] - rf[i]))
    return total / len(uncond) / max(alpha, 1.0)


@pytest.mark.parametrize("alpha", [0.4, 1.0, 50.0])
def test_ddo_loss_equals_a_float64_hand_computation(alpha):
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(7, generator=g, dtype=torch.float64) * 40 for _ in range(4)]
    uncond = torch.tensor([False, True, False, False, True, False, True])
    beta = 0.05
    out = ddo_loss(*values, uncond, beta=beta, alpha=alpha)
    expected = hand_ddo(*(v.tolist() for v in values), uncond.tolist(), beta, alpha)
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - expected) <= 1e-13 * max(1.0, abs(expected))
    d_real, d_fake = values[0] - values[2], values[1] - values[3]
    cond = ~uncond
    assert out.metrics["d_pos"].item() == pytest.approx(d_real.mean().item(), abs=1e-12)
    assert out.metrics["d_neg"].item() == pytest.approx(d_fake[cond].mean().item(), abs=1e-12)
    accuracy = (d_real[cond] > d_fake[cond]).double().mean().item()
    assert out.metrics["reward_accuracy"].item() == pytest.approx(accuracy, abs=1e-12)
    assert out.metrics["uncond_fraction"].item() == pytest.approx(3 / 7, abs=1e-12)


def test_uncond_rows_contribute_only_the_real_term():
    """Fake values of null rows never matter: even NaN gives the same loss and zero gradient."""
    g = torch.Generator().manual_seed(1)
    pr, pf, rr, rf = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4))
    uncond = torch.tensor([True, False, True, False, False, True])
    garbage = torch.where(uncond, torch.full_like(pf, float("nan")), pf)
    for fake in (pf, garbage, torch.where(uncond, pf + 1e3, pf)):
        policy_fake = fake.clone().requires_grad_(True)
        policy_real = pr.clone().requires_grad_(True)
        out = ddo_loss(policy_real, policy_fake, rr, rf, uncond, beta=0.3, alpha=5.0)
        out.loss.backward()
        expected = hand_ddo(pr.tolist(), pf.tolist(), rr.tolist(), rf.tolist(), uncond, 0.3, 5.0)
        assert out.loss.item() == pytest.approx(expected, abs=1e-14)
        assert torch.equal(policy_fake.grad[uncond], torch.zeros(3, dtype=torch.float64))
        assert bool((policy_fake.grad[~uncond] != 0).all())
        # real term of a null row: max(alpha, 1) * -log s(beta D) / B / max(alpha, 1)
        z = 0.3 * (pr[0] - rr[0]).item()
        assert policy_real.grad[0].item() == pytest.approx(-0.3 / (1 + math.exp(z)) / 6, abs=1e-15)


def test_ddo_loss_rejects_bad_inputs():
    x = torch.zeros(3)
    mask = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="policy_fake must be a 1-D"):
        ddo_loss(x, torch.zeros(4), x, x, mask, beta=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="uncond_mask must be a bool"):
        ddo_loss(x, x, x, x, mask.long(), beta=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="beta must be positive"):
        ddo_loss(x, x, x, x, mask, beta=0.0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha .* must be >= 0"):
        ddo_loss(x, x, x, x, mask, beta=1.0, alpha=-1.0)


# ---- the objective ----
class FixedNegatives:
    """Hands out given tokens per global row and records what was asked for."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.calls = tokens, []

    def draw(self, reference, labels, row_ids):
        self.calls.append((labels.clone(), row_ids.clone()))
        return self.tokens[row_ids]


def test_objective_equals_the_loss_on_separately_computed_log_likelihoods():
    policy, reference = tiny_model(seed=1), tiny_model(seed=2)
    reference.requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (5, GRID * GRID), generator=g)
    fakes = torch.randint(0, VOCAB, (20, GRID * GRID), generator=g)
    labels = torch.tensor([0, 3, 1, 2, 1])
    row_mask = torch.tensor([False, True, False, True, False])
    row_ids = torch.arange(10, 15)
    source = FixedNegatives(fakes)
    objective = DDOObjective(condition=ClassLabels(CLASSES), beta=0.3, alpha=4.0, uncond_ratio=0.5)
    objective.negatives = source
    out = objective(policy, reference, labels, tokens, row_mask, row_ids)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    cond = ~row_mask
    ((asked_labels, asked_rows),) = source.calls
    assert torch.equal(asked_labels, labels[cond]) and torch.equal(asked_rows, row_ids[cond])
    real_labels = torch.where(row_mask, CLASSES, labels)
    fake_tokens = torch.zeros_like(tokens)
    fake_tokens[cond] = fakes[row_ids[cond]]
    policy_real, ref_real = policy(real_labels, tokens), reference(real_labels, tokens)
    policy_fake, ref_fake = policy(labels, fake_tokens), reference(labels, fake_tokens)
    expected = ddo_loss(
        policy_real, policy_fake, ref_real, ref_fake, row_mask, beta=0.3, alpha=4.0
    ).loss
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_objective_without_a_negative_source_says_so():
    objective = DDOObjective(condition=ClassLabels(CLASSES), beta=0.3, alpha=4.0, uncond_ratio=0.5)
    model = tiny_model()
    labels, tokens = torch.tensor([0, 1]), torch.zeros(2, GRID * GRID, dtype=torch.long)
    with pytest.raises(RuntimeError, match="negatives is not set"):
        objective(model, model, labels, tokens, torch.zeros(2, dtype=torch.bool), torch.arange(2))


# ---- negatives ----
def test_online_negatives_are_keyed_samples_of_the_reference_and_leave_it_untouched():
    reference = tiny_model(seed=5, dropout=0.1).train()
    reference.requires_grad_(False)
    labels, rows = torch.tensor([2, 0, 3]), torch.tensor([8, 9, 11])
    source = OnlineNegatives(seed=7, round_index=2, sampling={"temperature": 1.0}, precision=FP32)
    rng = torch.get_rng_state()
    first = source.draw(reference, labels, rows)
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout stream is not consumed
    assert reference.training and reference.layers[0].attention.kv_cache is None
    assert torch.equal(first, source.draw(reference, labels, rows))
    key = torch.Generator().manual_seed(negative_seed(7, 2, 8))
    assert torch.equal(first, generate(reference, labels, generator=key))
    other_round = OnlineNegatives(seed=7, round_index=3, sampling={}, precision=FP32)
    assert not torch.equal(first, other_round.draw(reference, labels, rows))
    assert source.draw(reference, labels[:0], rows[:0]).shape == (0, GRID * GRID)


def test_file_negatives_cover_the_conditional_rows_with_their_labels(tmp_path):
    """A round's file: one reference sample per conditional row, labelled like the data row."""
    init, codes = write_files(tmp_path)
    config = ddo_config(tmp_path / "run", init, codes)
    run_training(config)
    path = tmp_path / "run" / "negatives.safetensors"
    negatives, data = FileNegatives(path), open_codes(codes)
    plan = BatchPlan(len(data), 4, 2, 1, config.data.seed)
    per_step = [step_rows(data.all_labels(), plan, s, 0, 0.3) for s in range(1, 6)]
    rows, labels = zip(*per_step, strict=True)
    assert torch.equal(negatives.rows, torch.from_numpy(np.concatenate(rows)))
    assert torch.equal(negatives.labels, torch.from_numpy(np.concatenate(labels)))
    assert 0 < len(negatives.rows) < 5 * 4  # some rows were null-masked and have no negative
    # the same (step, chunk) key draws the same tokens from the reference
    key = torch.Generator().manual_seed(negative_seed(0, 1, 1, 0))
    drawn = generate(llamagen.load(init), torch.from_numpy(labels[0][:2]), generator=key)
    assert torch.equal(negatives.tokens[:2], drawn)
    assert len(open_codes(path)) == len(negatives.rows)  # an ordinary code file too
    with pytest.raises(ValueError, match="labels differ"):
        negatives.draw(None, (negatives.labels[:1] + 1) % CLASSES, negatives.rows[:1])
    with pytest.raises(ValueError, match="no negative for global row 999"):
        negatives.draw(None, torch.tensor([0]), torch.tensor([999]))


def test_a_resume_with_more_steps_samples_only_the_new_steps(tmp_path):
    init, codes = write_files(tmp_path)
    run_training(ddo_config(tmp_path / "run", init, codes))
    before = FileNegatives(tmp_path / "run" / "negatives.safetensors")
    longer = ddo_config(tmp_path / "run", init, codes)
    longer.train.steps = 7
    run_training(longer, resume=True)
    after = FileNegatives(tmp_path / "run" / "negatives.safetensors")
    assert after.meta["steps"] == "7" and len(after.rows) > len(before.rows)
    kept = len(before.rows)
    assert torch.equal(after.rows[:kept], before.rows)
    assert torch.equal(after.tokens[:kept], before.tokens)
    assert int(after.rows[-1]) // 4 == 6  # a row of step 7


# ---- rounds, resume ----
@pytest.mark.parametrize("source", ["file", "online"])
def test_killed_and_resumed_round_is_bitwise_identical(tmp_path, source):
    init, codes = write_files(tmp_path, dropout=0.1)
    method = {"negatives": source, "dropout": "both"}
    run_training(ddo_config(tmp_path / "straight", init, codes, **method))
    broken = ddo_config(tmp_path / "broken", init, codes, **method)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(3)])
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [2]
    run_training(broken, resume=True)
    final = "final.safetensors"
    assert same_weights(tmp_path / "straight" / final, tmp_path / "broken" / final)
    logs = [
        [json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("straight", "broken")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 5


def test_rounds_chain_and_resume_skips_finished_rounds(tmp_path):
    """Round 2 starts from and is measured against round 1's model; the run resumes mid-round."""
    init, codes = write_files(tmp_path)
    out = tmp_path / "rounds"
    config = ddo_config(out, init, codes, rounds=2)

    def kill_in_round_2(trainer, record):
        if trainer.config.method.round == 2 and record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_training(config, callbacks=[kill_in_round_2])
    assert (out / "round_1" / "final.safetensors").exists()
    assert not (out / "round_2" / "final.safetensors").exists()
    run_training(config, resume=True)
    first, second = out / "round_1" / "final.safetensors", out / "round_2" / "final.safetensors"
    saved = json.loads((out / "round_2" / "config.json").read_text())
    assert saved["model"]["init"] == str(first) and saved["method"]["round"] == 2
    assert saved["data"]["seed"] == 1  # round 2 reads the data in another order
    manifest = json.loads(FileNegatives(out / "round_2" / "negatives.safetensors").meta["manifest"])
    assert manifest["reference"] == repr(tensor_fingerprint(llamagen.load(first)))
    assert same_weights(second, out / "final.safetensors")
    assert not same_weights(first, second)
    # the same rounds straight through give the same model
    run_training(ddo_config(tmp_path / "straight", init, codes, rounds=2))
    assert same_weights(second, tmp_path / "straight" / "final.safetensors")
    # one round by hand: --init round 1's model, method.round = 2, the round's data seed
    by_hand = ddo_config(tmp_path / "by_hand", str(first), codes, round=2)
    by_hand.data.seed = 1
    run_training(by_hand)
    assert same_weights(second, tmp_path / "by_hand" / "final.safetensors")


def test_a_killed_multi_round_run_is_resumed_only_with_its_own_init_and_recipe(tmp_path):
    """The folder holds the run from its start: a rerun without --resume is refused (it reused
    round 1 of another init and exited 0), a resume with another init or recipe is refused (round
    1 kept the old recipe, round 2 took the new one), and --restart moves the run aside."""
    init, codes = write_files(tmp_path)
    out = tmp_path / "rounds"
    config = ddo_config(out, init, codes, rounds=2)

    def kill_in_round_2(trainer, record):
        if trainer.config.method.round == 2 and record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_training(config, callbacks=[kill_in_round_2])
    other_init = tmp_path / "other.safetensors"
    llamagen.save(tiny_model(seed=5), other_init)
    again = ddo_config(out, str(other_init), codes, rounds=2)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        run_training(again)
    with pytest.raises(ValueError, match="the init weights .* differ from those its first round"):
        run_training(again, resume=True)
    changed = ddo_config(out, init, codes, rounds=2, beta=0.05)
    changed.optim.lr = 1e-3
    with pytest.raises(ValueError, match=r"different recipe \(method.beta: 0.5 -> 0.05; "
                                         r"optim.lr: 0.01 -> 0.001\)"):
        run_training(changed, resume=True)
    assert json.loads((out / "config.json").read_text())["method"]["beta"] == 0.5
    run_training(again, restart=True)  # moved aside, started over from the other init
    assert json.loads((out / "config.json").read_text())["model"]["init"] == str(other_init)
    (aside,) = tmp_path.glob("rounds.old-*")
    assert (aside / "round_1" / "final.safetensors").exists()


def test_step_one_gap_is_zero_without_dropout(tmp_path):
    init, codes = write_files(tmp_path)
    run_training(ddo_config(tmp_path / "run", init, codes, negatives="online"))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["d_pos"] == 0.0 and first["d_neg"] == 0.0
    # D = 0: a conditional row costs (1 + alpha) log 2, a null row max(alpha, 1) log 2
    u, alpha = first["uncond_fraction"], 3.0
    expected = math.log(2) * ((1 - u) * (1 + alpha) + u * alpha) / alpha
    assert first["loss"] == pytest.approx(expected, rel=1e-6)


# ---- config and command line ----
def test_config_checks_ddo_keys(tmp_path):
    init, codes = write_files(tmp_path)
    with pytest.raises(ValueError, match="method.negatives = 'disk' is not one of"):
        ddo_config(tmp_path, init, codes, negatives="disk")
    with pytest.raises(ValueError, match=r"method.rounds must be in \[1, 1000\], got 0"):
        ddo_config(tmp_path, init, codes, rounds=0)
    with pytest.raises(ValueError, match="negatives_top_p must be in"):
        ddo_config(tmp_path, init, codes, negatives_top_p=0.0)
    raw = ddo_config(tmp_path, init, codes, negatives="online").to_dict()
    raw["train"]["parallel"] = "fsdp"
    with pytest.raises(ValueError, match="sharded .FSDP. reference cannot"):
        TrainConfig.from_dict(raw)


def test_cli_finetune_method_ddo_and_the_recipe_config(tmp_path):
    init, codes = write_files(tmp_path)
    out = tmp_path / "cli"
    args = ["finetune", "--config", str(REPO / "configs" / "tiny_cpu.toml"), "--method", "ddo"]
    assert main([*args, "--init", init, "--data", codes, "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"]["name"] == "ddo" and (out / "negatives.safetensors").exists()
    recipe = load_config(REPO / "configs" / "llamagen_L_ddo.toml")
    assert recipe.method.name == "ddo" and recipe.method.alpha == 50.0
    assert recipe.method.beta == 0.02 and recipe.method.uncond_ratio == 0.5
    assert recipe.method.dropout == "none" and recipe.optim.lr == 4e-6


# ---- several processes ----
def ddo_worker(rank: int, world: int, port: int, config: TrainConfig) -> None:
    become_rank(rank, world, port)
    run_training(config)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "source"), [("ddp", "online"), ("fsdp", "file")])
def test_two_processes_draw_the_same_negatives_and_updates(tmp_path, parallel, source):
    """1 process x 2 micro-batches vs 2 processes x 1: the same negatives, the same model."""
    init, codes = write_files(tmp_path)
    single = ddo_config(tmp_path / "single", init, codes, negatives=source, rounds=2)
    single.train.weights_dtype = "fp64"  # the comparison holds on any CPU's kernels
    run_training(single)
    multi = ddo_config(tmp_path / "multi", init, codes, negatives=source, rounds=2)
    multi.train.parallel, multi.train.weights_dtype = parallel, "fp64"
    port = free_port()
    args = (2, port, multi)
    mp.start_processes(ddo_worker, args=args, nprocs=2, join=True, start_method="forkserver")
    a = final_state(tmp_path / "single" / "final.safetensors")
    b = final_state(tmp_path / "multi" / "final.safetensors")
    assert_same_run(a, b)
    if source == "file":
        for r in (1, 2):
            x, y = (
                FileNegatives(tmp_path / run / f"round_{r}" / "negatives.safetensors")
                for run in ("single", "multi")
            )
            assert torch.equal(x.tokens, y.tokens) and torch.equal(x.rows, y.rows)


def test_negatives_are_sampled_at_the_precision_the_loss_scores_them_with(tmp_path):
    """bf16 autocast scoring: the negatives' forward runs under bf16 autocast over the
    reference's own float32 weights (no bf16 copy), and the file's manifest says so."""
    reference = tiny_model(seed=5).eval().requires_grad_(False)
    seen = []
    reference.output.register_forward_hook(lambda m, i, o: seen.append((o.dtype, m.weight.dtype)))
    source = OnlineNegatives(seed=7, round_index=2, sampling={},
                             precision=Precision(torch.float32, torch.bfloat16))
    source.draw(reference, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}
    assert Precision(torch.float32, torch.bfloat16).record() == "torch.float32 autocast " \
        "torch.bfloat16"
    assert FP32.record() is None  # the CPU default: earlier negatives files stay valid
    init, codes = write_files(tmp_path)
    config = ddo_config(tmp_path / "run", init, codes)
    config.train.precision = "bf16"
    run_training(config)
    meta = FileNegatives(tmp_path / "run" / "negatives.safetensors").meta
    assert json.loads(meta["manifest"])["precision"] == "torch.float32 autocast torch.bfloat16"
