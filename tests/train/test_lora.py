"""LoRA through peft: equals the base at step 0, the reference is the base and never changes,
only adapters train, merged weights equal the adapted model, resume is bitwise, DDP agrees."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model

from ccalign.data.codes import write_flat_codes
from ccalign.io import read_safetensors
from ccalign.models import llamagen
from ccalign.train import TrainConfig, Trainer, load_config, run_training
from ccalign.train import lora as L
from ccalign.train.config import config_changes
from ccalign.train.state import list_checkpoints, load_checkpoint
from ccalign.weights import load_weights
from support.numerics import assert_same_run
from support.processes import Killed, become_rank, free_port, kill_after
from support.tiny import GRID, VOCAB, RandomCodes, tiny_model

ADAPTED = ("wqkv", "wo", "w1", "w2", "w3")


def lora_config(out: Path, lora: dict | None = None, **sections) -> TrainConfig:
    raw = {
        "method": {
            "name": "cca",
            "beta": 0.5,
            "lam": 10.0,
            "dropout": "none",
            "lora": {"enabled": True, "rank": 4, "alpha": 8.0, **(lora or {})},
        },
        "optim": {"lr": 1e-2},
        "train": {
            "global_batch": 8,
            "micro_batch": 4,
            "steps": 3,
            "device": "cpu",
            "precision": "fp32",
            "progress": False,
        },
        "checkpoint": {"out": str(out), "every": 100},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(raw)


def adapter_size(model: llamagen.LlamaGen, names=ADAPTED, rank: int = 4) -> int:
    """rank * (in + out) per adapted linear layer, from the architecture alone."""
    dim, hidden = model.config.dim, model.config.ffn_hidden
    shapes = {"wqkv": (dim, 3 * dim), "wo": (dim, dim), "w1": (dim, hidden)}
    shapes.update(w3=(dim, hidden), w2=(hidden, dim))
    return model.config.n_layer * sum(rank * sum(shapes[n]) for n in names)


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    data = RandomCodes(n, seed=9)
    return data.labels, data.tokens


# ---- step 0, the reference, what trains ----
def test_adapted_model_equals_the_base_exactly_at_step_zero(tmp_path):
    base = tiny_model().eval()
    trainer = Trainer(lora_config(tmp_path), tiny_model(), RandomCodes(16))
    labels, tokens = batch()
    with torch.no_grad():
        expected = base.logits(labels, tokens)
        assert torch.equal(trainer.model.logits(labels, tokens), expected)
        assert torch.equal(trainer.reference(labels, tokens), base(labels, tokens))
    lora_b = [p for n, p in trainer.model.named_parameters() if ".lora_B." in n]
    assert len(lora_b) == 2 * len(ADAPTED) and all(not p.any() for p in lora_b)


def test_only_adapters_train_and_the_reference_is_the_unchanged_base(tmp_path):
    init = tiny_model()
    trainer = Trainer(lora_config(tmp_path), tiny_model(), RandomCodes(32))
    labels, tokens = batch()
    with torch.no_grad():
        ref_before = trainer.reference(labels, tokens)
    grads, records = [], []
    trainer.optimizer.register_step_pre_hook(
        lambda *a: grads.append({n: p.grad for n, p in trainer.model.named_parameters()})
    )
    trainer.callbacks.append(lambda t, record: records.append(record))
    trainer.fit()

    adapter_names = {n for n, _ in trainer.model.named_parameters() if L.is_adapter_key(n)}
    assert len(adapter_names) == 4 * len(ADAPTED)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(trainer.model.named_parameters())
    assert optimized == {id(params[n]) for n in adapter_names}
    for step_grads in grads:
        assert {n for n, g in step_grads.items() if g is not None} == adapter_names
    # the reference: the init weights, bit for bit, in the policy's own storage
    ref_state, base = trainer.reference.state_dict(), init.state_dict()
    assert ref_state.keys() == base.keys()
    assert all(torch.equal(ref_state[k], base[k]) for k in base)
    with torch.no_grad():
        assert torch.equal(trainer.reference(labels, tokens), ref_before)
        assert not torch.equal(trainer.model(labels, tokens), ref_before)
    assert records[0]["d_pos"] == 0.0 and records[0]["d_neg"] == 0.0  # dropout "none"
    assert records[-1]["d_pos"] != 0.0


def test_d_is_exactly_zero_at_step_one_under_bf16_autocast_too(tmp_path):
    """B = 0 adds exact zeros, so adapters on and off give the same bits in any precision."""
    config = lora_config(tmp_path, train={"steps": 1, "precision": "bf16"})
    trainer = Trainer(config, tiny_model(dropout=0.1), RandomCodes(16))
    records = []
    trainer.callbacks.append(lambda t, record: records.append(record))
    trainer.fit()
    assert records[0]["d_pos"] == 0.0 and records[0]["d_neg"] == 0.0


def test_no_second_copy_of_the_weights(tmp_path):
    """The reference owns no tensor: every weight it uses is a policy parameter's storage."""
    trainer = Trainer(lora_config(tmp_path, train={"steps": 1}), tiny_model(), RandomCodes(16))
    assert list(trainer.reference.parameters()) == []
    policy_storages = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    for value in trainer.reference.state_dict().values():
        assert value.untyped_storage().data_ptr() in policy_storages
    base = tiny_model()
    in_memory = sum(p.numel() for p in trainer.model.parameters())
    assert in_memory == base.num_parameters() + adapter_size(base)
    trainer.fit()
    moments = [s[k] for s in trainer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert sum(m.numel() for m in moments) == 2 * adapter_size(base)


def test_policy_only_runs_the_reference_in_eval_mode_and_restores_the_policy(tmp_path):
    config = lora_config(tmp_path, method={"dropout": "policy-only"})
    trainer = Trainer(config, tiny_model(dropout=0.1), RandomCodes(16))
    base = tiny_model(dropout=0.1).eval()
    labels, tokens = batch()
    with torch.no_grad():
        assert torch.equal(trainer.reference(labels, tokens), base(labels, tokens))
    assert trainer.model.training and all(m.training for m in trainer.model.modules())
    assert not trainer.reference.training
    trainable = [p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert trainable and all(trainable)


@pytest.mark.numerics
def test_activation_checkpointing_recomputes_with_the_adapters_on(tmp_path):
    """Blocks recomputed in backward (after the reference ran with adapters off) give the same
    gradients as stored activations, dropout masks included."""
    grads = []
    for enabled in (False, True):
        config = lora_config(
            tmp_path / str(enabled),
            lora={"dropout": 0.1},
            method={"dropout": "both"},
            train={"steps": 2, "activation_checkpointing": enabled, "weights_dtype": "fp64"},
        )
        trainer = Trainer(config, tiny_model(dropout=0.1), RandomCodes(16))
        seen = []
        trainer.optimizer.register_step_pre_hook(
            lambda *a, t=trainer, s=seen: s.append(
                {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
            )
        )
        trainer.fit()
        grads.append(seen)
    for step in range(2):
        assert grads[0][step].keys() == grads[1][step].keys()
        for name, grad in grads[0][step].items():
            torch.testing.assert_close(grads[1][step][name], grad, rtol=1e-12, atol=1e-15)
    assert any(g.abs().max() > 0 for n, g in grads[1][1].items() if ".lora_A." in n)


# ---- merge and files ----
def test_merged_final_model_equals_the_adapted_model_and_peft_merge(tmp_path):
    init = tiny_model()
    config = lora_config(tmp_path, model={"save_official": True})
    trainer = Trainer(config, tiny_model(), RandomCodes(16))
    trainer.fit()
    merged = llamagen.load(tmp_path / "final.safetensors").eval()
    labels, tokens = batch()
    adapted = trainer.model.eval()
    with torch.no_grad():
        want = adapted.logits(labels, tokens)
        torch.testing.assert_close(merged.logits(labels, tokens), want, rtol=1e-5, atol=1e-5)

    # peft's own merge of the same adapters, on a separate copy, gives the same bits
    reference_model = copy.deepcopy(init)
    peft_config = LoraConfig(r=4, lora_alpha=8.0, target_modules=list(ADAPTED))
    peft_model = get_peft_model(reference_model, peft_config)
    adapters = L.adapter_state(trainer.model)
    peft_model.base_model.model.load_state_dict(adapters, strict=False)
    peft_merged = peft_model.merge_and_unload().state_dict()
    assert merged.state_dict().keys() == peft_merged.keys()
    assert all(torch.equal(merged.state_dict()[k], peft_merged[k]) for k in peft_merged)

    official = load_weights(tiny_model(), tmp_path / "final.pt").state_dict()
    assert all(torch.equal(official[k], v) for k, v in merged.state_dict().items())

    # the adapters alone, put back on the base
    rebuilt = L.load_adapters(tiny_model(), tmp_path / "final_lora.safetensors").model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.logits(labels, tokens), want)


def test_bad_target_modules_list_the_layers_there_are(tmp_path):
    for target in ("wq", "output", "tok_embeddings"):
        config = lora_config(tmp_path / target, lora={"target_modules": [target]})
        with pytest.raises(ValueError, match=r"available: \['w1', 'w2', 'w3', 'wo', 'wqkv'\]"):
            Trainer(config, tiny_model(), RandomCodes(16))
    config = lora_config(tmp_path / "full", lora={"target_modules": ["layers.1.attention.wo"]})
    trainer = Trainer(config, tiny_model(), RandomCodes(16))
    assert sorted(L.adapter_state(trainer.model)) == [
        "layers.1.attention.wo.lora_A.default.weight",
        "layers.1.attention.wo.lora_B.default.weight",
    ]


def test_lora_config_keys_and_what_they_refuse(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[method.lora]\nenabled = true\nrank = 8\ntarget_modules = ["wqkv"]\n')
    lora = load_config(toml).method.lora
    assert (lora.enabled, lora.rank, lora.alpha, lora.target_modules) == (True, 8, 16.0, ["wqkv"])
    assert not load_config(None).method.lora.enabled
    cases = {
        "method.lora.rnk=3": "unknown key.*rnk.*method.lora",
        "method.lora.target_modules=[1]": "target_modules = 1 must be a string",
        "method.lora.rank=0": r"method.lora.rank must be in \[1, 65536\], got 0",
        "optim.ema_decay=0.9": "ema_decay",
        'train.parallel="fsdp"': "fsdp",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_config(None, ["method.lora.enabled=true", override])
    # a checkpoint written before method.lora existed resumes as LoRA off
    saved = TrainConfig().to_dict()
    del saved["method"]["lora"]
    assert config_changes(saved, TrainConfig().to_dict()) == {}


# ---- resume ----
def write_files(folder: Path, dropout: float) -> tuple[str, str]:
    init = folder / "init.safetensors"
    llamagen.save(tiny_model(dropout), init)
    data = RandomCodes(16)
    codes = folder / "codes.safetensors"
    write_flat_codes(codes, data.tokens, data.labels, vocab_size=VOCAB, grid=GRID)
    return str(init), str(codes)


def test_lora_run_killed_and_resumed_is_bitwise_identical(tmp_path):
    init, codes = write_files(tmp_path, dropout=0.1)
    sections = dict(
        model={"init": init, "name": "custom"},
        data={"path": codes},
        method={"dropout": "both", "uncond_ratio": 0.3},
        optim={"schedule": "cosine", "warmup_steps": 2},
        train={"global_batch": 4, "micro_batch": 2, "steps": 6},
    )
    lora = {"dropout": 0.1}
    straight = lora_config(tmp_path / "straight", lora, checkpoint={"every": 3}, **sections)
    run_training(straight)
    broken = lora_config(tmp_path / "broken", lora, checkpoint={"every": 3, "keep": 1}, **sections)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(5)])
    [(_, path)] = list_checkpoints(tmp_path / "broken")
    saved = load_checkpoint(path)["model"]
    assert saved and all(L.is_adapter_key(k) for k in saved)  # adapters only
    run_training(broken, resume=True)

    for name in ("final.safetensors", "final_lora.safetensors"):
        a, b = (read_safetensors(tmp_path / run / name) for run in ("straight", "broken"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("straight", "broken")
    ]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert len(logs[1]) == 6


# ---- DDP ----


def worker(rank: int, world: int, port: int, config: TrainConfig) -> None:
    become_rank(rank, world, port)
    run_training(config)


@pytest.mark.numerics
@pytest.mark.slow
def test_two_ddp_processes_match_one_accumulating_process(tmp_path):
    """The reference forward bypasses DDP; the adapters' updates match one process's."""
    init, codes = write_files(tmp_path, dropout=0.0)
    sections = dict(model={"init": init}, data={"path": codes},
                    train={"steps": 2, "weights_dtype": "fp64"})  # compares on any CPU
    run_training(lora_config(tmp_path / "one", **sections))
    double = lora_config(tmp_path / "two", **sections)
    mp.start_processes(
        worker, args=(2, free_port(), double), nprocs=2, join=True, start_method="forkserver"
    )
    a, b = (read_safetensors(tmp_path / run / "final_lora.safetensors") for run in ("one", "two"))
    assert_same_run(a, b)
