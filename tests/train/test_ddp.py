"""Two processes (gloo, localhost; DDP or FSDP) make the same updates as one accumulating."""

from __future__ import annotations

import json

import pytest
import torch

from ccalign.data.codes import write_flat_codes
from ccalign.models import llamagen
from ccalign.train import run_training
from ccalign.train.state import load_checkpoint
from support.numerics import assert_same_run
from support.processes import launch
from support.tiny import CLASSES, GRID, VOCAB, run_config, tiny_model


@pytest.mark.numerics
@pytest.mark.slow
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
    # fp64: the comparison holds whatever the CPU's kernels (float32 rounding differs by CPU)
    run_training(run_config(tmp_path / "single", init, codes, 4, weights_dtype="fp64"))
    two = {"parallel": parallel, "activation_checkpointing": parallel == "fsdp",
           "weights_dtype": "fp64"}
    launch(run_config(tmp_path / "multi", init, codes, 4, **two))
    for name in ("final.safetensors", "final_ema.safetensors"):
        single = llamagen.load(tmp_path / "single" / name).state_dict()
        multi = llamagen.load(tmp_path / "multi" / name).state_dict()
        assert_same_run(single, multi)
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
