"""Two processes (gloo, localhost; DDP or FSDP) make the same updates as one accumulating."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from _support import Killed, become_rank, free_port, kill_after
from ccalign.data.codes import write_flat_codes
from ccalign.models import llamagen
from ccalign.train import TrainConfig, run_training
from ccalign.train.state import load_checkpoint
from test_train import CLASSES, GRID, VOCAB, tiny_model


def run_config(out, init, codes, micro_batch: int, **train) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"init": init},
            "data": {"path": codes},
            "method": {"name": "cca", "beta": 0.5, "lam": 10.0, "uncond_ratio": 0.3},
            "optim": {"lr": 1e-3, "grad_clip": 0.5, "ema_decay": 0.5},
            "train": {
                "global_batch": 8,
                "micro_batch": micro_batch,
                "steps": 3,
                "device": "cpu",
                "precision": "fp32",
                "progress": False,
                **train,
            },
            "checkpoint": {"out": str(out), "every": 2, "format": "full"},  # sharded: own tests
        }
    )


def worker(rank: int, world: int, port: int, config: TrainConfig, kill: int, resume: bool) -> None:
    become_rank(rank, world, port)
    try:
        run_training(config, resume=resume, callbacks=[kill_after(kill)] if kill else [])
    except Killed:
        pass


def launch(config: TrainConfig, kill: int = 0, resume: bool = False) -> None:
    """Two workers started by a fork server: a clean process that imported torch once, so the
    workers start fast without inheriting the test process's threads (a plain fork deadlocked a
    worker on a lock another thread held, once in a full suite run)."""
    args = (2, free_port(), config, kill, resume)
    mp.start_processes(worker, args=args, nprocs=2, join=True, start_method="forkserver")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_single_process_accumulation(tmp_path, parallel):
    model = tiny_model()  # seed 0, no dropout
    init = str(tmp_path / "init.safetensors")
    llamagen.save(model, init)
    g = torch.Generator().manual_seed(1)
    codes = str(tmp_path / "codes.safetensors")
    write_flat_codes(
        codes,
        torch.randint(0, VOCAB, (24, GRID * GRID), generator=g),
        torch.randint(0, CLASSES, (24,), generator=g),
        vocab_size=VOCAB,
        grid=GRID,
    )

    # 1 process x 2 micro-batches of 4 vs 2 processes x 1 micro-batch of 4: the same chunks.
    # FSDP also recomputes blocks in backward (activation checkpointing inside the shards).
    run_training(run_config(tmp_path / "single", init, codes, micro_batch=4))
    two = {"parallel": parallel, "activation_checkpointing": parallel == "fsdp"}
    launch(run_config(tmp_path / "multi", init, codes, 4, **two))
    for name in ("final.safetensors", "final_ema.safetensors"):
        single = llamagen.load(tmp_path / "single" / name).state_dict()
        multi = llamagen.load(tmp_path / "multi" / name).state_dict()
        for key, value in single.items():
            torch.testing.assert_close(multi[key], value, rtol=1e-5, atol=1e-6)
    logs = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("single", "multi")
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "grad_norm", "d_pos", "d_neg", "neg_is_positive_fraction"):
            assert abs(a[key] - b[key]) <= 1e-5 * (1 + abs(a[key])), (key, a[key], b[key])
    checkpoint = load_checkpoint(tmp_path / "multi" / "checkpoints" / "step_00000002.pt")
    assert len(checkpoint["rng"]) == 2  # every process's dropout RNG is saved
    assert checkpoint["parallel"] == ("fsdp" if parallel == "fsdp" else "replicated")

    if parallel == "fsdp":  # killed after step 3 (checkpoint at 2) and resumed: bitwise equal
        broken = run_config(tmp_path / "broken", init, codes, 4, **two)
        launch(broken, kill=3)
        launch(broken, resume=True)
        for name in ("final.safetensors", "final_ema.safetensors"):
            a = llamagen.load(tmp_path / "multi" / name).state_dict()
            b = llamagen.load(tmp_path / "broken" / name).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), name
