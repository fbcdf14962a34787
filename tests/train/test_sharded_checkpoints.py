"""Sharded checkpoints (torch.distributed.checkpoint): each process writes its own shard, a run
resumes on the same or another number of processes, and a kill during a save loses nothing."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from ccalign.data.codes import write_flat_codes
from ccalign.io import UnsafePickleError
from ccalign.models import llamagen
from ccalign.train import TrainConfig, Trainer, run_training
from ccalign.train.build import model_from_config, open_training_data
from ccalign.train.sharded import read_metadata
from ccalign.train.state import latest_checkpoint, list_checkpoints, load_checkpoint
from support.numerics import assert_same_run
from support.processes import Killed, become_rank, free_port, kill_after
from support.tiny import CLASSES, GRID, VOCAB, tiny_model

#: every test here runs worker processes and compares runs across them
pytestmark = [pytest.mark.slow, pytest.mark.numerics]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, str]:
    """A tiny model without dropout and 24 random code sequences."""
    folder = tmp_path_factory.mktemp("files")
    model = tiny_model()  # seed 0, no dropout
    init = str(folder / "init.safetensors")
    llamagen.save(model, init)
    g = torch.Generator().manual_seed(1)
    codes = str(folder / "codes.safetensors")
    write_flat_codes(
        codes,
        torch.randint(0, VOCAB, (24, GRID * GRID), generator=g),
        torch.randint(0, CLASSES, (24,), generator=g),
        vocab_size=VOCAB,
        grid=GRID,
    )
    return init, codes


def run_config(
    out, files, dropout: float = 0.0, parallel: str = "fsdp", **checkpoint
) -> TrainConfig:
    """6 steps of 8 rows, checkpoints every 2; 2 processes x 4 rows or 1 process x 2 x 4."""
    init, codes = files
    return TrainConfig.from_dict(
        {
            "model": {"init": init, "arch": {"resid_dropout": dropout}},
            "data": {"path": codes},
            "method": {"name": "cca", "beta": 0.5, "lam": 10.0, "uncond_ratio": 0.3},
            "optim": {"lr": 1e-3, "grad_clip": 0.5, "ema_decay": 0.5, "schedule": "cosine"},
            "train": {
                "global_batch": 8,
                "micro_batch": 4,
                "steps": 6,
                "device": "cpu",
                "precision": "fp32",
                "weights_dtype": "fp64",  # runs summed in another order compare on any CPU
                "parallel": parallel,
                "progress": False,
            },
            "checkpoint": {"out": str(out), "every": 2, **checkpoint},
        }
    )


def die_in_second_save(rank: int) -> None:
    """Rank 1 dies right after writing its shard of the second checkpoint (before the rename)."""
    original, saves = FileSystemWriter.write_data, []

    def write_data(self, plan, planner):
        written = original(self, plan, planner)
        saves.append(plan)
        if rank == 1 and len(saves) == 2:
            written.wait()
            os._exit(3)
        return written

    FileSystemWriter.write_data = write_data


def worker(rank: int, port: int, config: TrainConfig, resume: bool, die: bool) -> None:
    become_rank(rank, 2, port)
    if die:
        die_in_second_save(rank)
    run_training(config, resume=resume)


def launch(config: TrainConfig, resume: bool = False, die: bool = False) -> None:
    """Two FSDP workers (fork: they inherit the imported torch and this worktree's code)."""
    args = (free_port(), config, resume, die)
    mp.start_processes(worker, args=args, nprocs=2, join=True, start_method="forkserver")


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """An uninterrupted 2-process FSDP run with the default checkpoint format."""
    out = tmp_path_factory.mktemp("straight")
    launch(run_config(out, files))
    return out


def final_states(out) -> list[dict]:
    return [
        llamagen.load(out / n).state_dict() for n in ("final.safetensors", "final_ema.safetensors")
    ]


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_each_process_writes_its_own_shard(straight):
    saved = list_checkpoints(straight)
    assert [s for s, _ in saved] == [2, 4, 6] and all(p.is_dir() for _, p in saved)
    folder = saved[0][1]
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.pt"]
    metadata = read_metadata(folder)
    weight = "model.layers.0.attention.wqkv.weight"  # (96, 32): rows split over the 2 ranks
    pieces = {
        i.offset: info.relative_path for i, info in metadata.storage_data.items() if i.fqn == weight
    }
    assert pieces == {torch.Size([0, 0]): "__0_0.distcp", torch.Size([48, 0]): "__1_0.distcp"}
    for key in (weight, "optimizer.layers.0.attention.wqkv.weight.exp_avg", "ema." + weight[6:]):
        holders = [info.relative_path for i, info in metadata.storage_data.items() if i.fqn == key]
        assert sorted(holders) == ["__0_0.distcp", "__1_0.distcp"], key
    state = load_checkpoint(folder)
    assert state["format"] == "sharded" and state["step"] == 2 and len(state["rng"]) == 2
    assert "model" not in state and "optimizer" not in state  # the small state holds no tensors


def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resumes_bit_exact(files, tmp_path):
    # with dropout, so every process's RNG stream must come back too
    launch(run_config(tmp_path / "straight", files, dropout=0.1))
    broken = run_config(tmp_path / "broken", files, dropout=0.1)
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        launch(broken, die=True)
    checkpoints = tmp_path / "broken" / "checkpoints"
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [2]
    assert (checkpoints / ".step_00000004.partial" / "__1_0.distcp").exists()
    with pytest.warns(UserWarning, match="incomplete checkpoint .*step_00000004.partial"):
        path, state = latest_checkpoint(tmp_path / "broken")
    assert path.name == "step_00000002" and state["step"] == 2

    launch(broken, resume=True)
    straight = tmp_path / "straight"
    for a, b in zip(final_states(straight), final_states(tmp_path / "broken"), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "broken") == losses(straight)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]


def only_first_checkpoint(source, out) -> None:
    """``out`` holds ``source``'s run as it was after its first checkpoint (step 2)."""
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    shutil.copytree(source / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")


def test_two_process_checkpoint_resumes_on_one_process(files, straight, tmp_path):
    out = tmp_path / "one"
    only_first_checkpoint(straight, out)
    config = run_config(out, files)
    model = model_from_config(config.model)
    trainer = Trainer(config, model, open_training_data(config, model))
    assert trainer.resume() and trainer.step == 2 and not trainer.fsdp

    dcp_to_torch_save(out / "checkpoints" / "step_00000002", tmp_path / "whole.pt")
    saved = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in trainer.model.state_dict().items())
    optimizer = get_optimizer_state_dict(trainer.model, trainer.optimizer)["state"]
    for name, moments in optimizer.items():
        assert all(torch.equal(v, saved["optimizer"][name][k]) for k, v in moments.items())
    assert all(torch.equal(v, saved["ema"][k]) for k, v in trainer.ema.shadow.items())

    trainer.fit()  # the data position carried over: the same updates, summed in another order
    trainer.close()
    for a, b in zip(final_states(straight), final_states(out), strict=True):
        assert_same_run(a, b)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_one_process_checkpoint_resumes_on_two_processes(files, straight, tmp_path, parallel):
    config = run_config(tmp_path / "run", files, parallel=parallel, format="sharded")
    with pytest.raises(Killed):
        run_training(config, callbacks=[kill_after(3)])
    assert [p.name for _, p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]
    launch(config, resume=True)
    last = tmp_path / "run" / "checkpoints" / "step_00000006"  # under DDP: each rank writes half
    assert {p.name for p in last.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    for a, b in zip(final_states(straight), final_states(tmp_path / "run"), strict=True):
        assert_same_run(a, b)


def test_full_file_checkpoints_still_resume_and_rotate_with_folders(files, tmp_path):
    straight = run_config(tmp_path / "straight", files, format="full")
    run_training(straight)
    old = run_config(tmp_path / "run", files, format="full", keep=2)
    with pytest.raises(Killed):
        run_training(old, callbacks=[kill_after(3)])
    run_training(run_config(tmp_path / "run", files, format="sharded", keep=2), resume=True)
    for a, b in zip(
        final_states(tmp_path / "straight"), final_states(tmp_path / "run"), strict=True
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)
    kept = [p.name for _, p in list_checkpoints(tmp_path / "run")]
    assert kept == ["step_00000004", "step_00000006"]  # the file at step 2 rotated out
    changes = json.loads((tmp_path / "run" / "resumes.jsonl").read_text())["changed"]
    assert changes["checkpoint.format"] == ["full", "sharded"]


def test_a_damaged_folder_is_skipped_and_a_planted_one_refused(files, tmp_path):
    config = run_config(tmp_path / "run", files, format="sharded", every=1)
    with pytest.raises(Killed):
        run_training(config, callbacks=[kill_after(2)])
    second = tmp_path / "run" / "checkpoints" / "step_00000002"
    (second / "__0_0.distcp").unlink()
    with pytest.warns(UserWarning, match="step_00000002.*missing shard __0_0.distcp"):
        path, state = latest_checkpoint(tmp_path / "run")
    assert state["step"] == 1

    class Planted:
        def __reduce__(self):
            return (os.system, ("echo planted",))

    (path / ".metadata").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(UnsafePickleError, match="posix.system"), pytest.warns(UserWarning):
        latest_checkpoint(tmp_path / "run")  # refused, not skipped: someone planted it
