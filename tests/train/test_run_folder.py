"""An output folder holds one run; faults and bad settings end in one line with nothing lost."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from ccalign.cli import describe_error, main
from ccalign.io import atomic_save_safetensors
from ccalign.models import llamagen
from ccalign.train import NonFiniteLossError, load_config, run_training
from ccalign.train.rundir import RunLock
from ccalign.train.state import latest_checkpoint, list_checkpoints
from support import REPO
from support.tiny import load_final, make_config, tiny_model, write_files


def finetune_args(init: str, codes: str, out: Path) -> list[str]:
    config = str(REPO / "configs" / "tiny_cpu.toml")
    return ["finetune", "--config", config, "--init", init, "--data", codes, "--out", str(out)]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_a_second_start_into_a_finished_run_is_refused_and_restart_moves_it_aside(tmp_path, capsys):
    init, codes = write_files(tmp_path)
    out = tmp_path / "run"
    args = finetune_args(init, codes, out)
    assert main(args) == 0
    first = load_final(out / "final.safetensors")
    first_log = (out / "metrics.jsonl").read_text()

    code, err = run_cli([*args, "--set", "optim.lr=1e-2"], capsys)
    assert code == 1 and "already holds a run" in err and "--resume" in err and "--restart" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert (out / "metrics.jsonl").read_text() == first_log  # untouched

    assert main([*args, "--set", "optim.lr=1e-2", "--restart"]) == 0
    (aside,) = tmp_path.glob("run.old-*")
    kept = load_final(aside / "final.safetensors")
    assert all(torch.equal(kept[k], first[k]) for k in first)  # the old run, whole
    assert (aside / "metrics.jsonl").read_text() == first_log
    assert [s for s, _ in list_checkpoints(aside)] == [2, 3]
    new = load_final(out / "final.safetensors")
    assert any(not torch.equal(new[k], first[k]) for k in first)
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-2
    code, err = run_cli([*args, "--resume", "--restart"], capsys)
    assert code == 1 and "pick one" in err


def test_a_folder_being_written_is_locked(tmp_path, capsys):
    init, codes = write_files(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    holder = RunLock(out)  # another run writing here
    try:
        code, err = run_cli(finetune_args(init, codes, out), capsys)
        assert code == 1 and "being written by another ccalign run" in err
        assert not (out / "checkpoints").exists()
    finally:
        holder.release()
    assert main(finetune_args(init, codes, out)) == 0  # free again once released
    holder = RunLock(out)
    try:  # the lock is claimed before any model work: a missing --init is not reached
        code, err = run_cli([*finetune_args(init + ".missing", codes, out), "--resume"], capsys)
        assert code == 1 and "being written by another ccalign run" in err
    finally:
        holder.release()


def test_resume_refuses_a_changed_recipe_and_records_harmless_changes(tmp_path, capsys):
    init, codes = write_files(tmp_path)
    out = tmp_path / "run"
    args = finetune_args(init, codes, out)
    assert main(args) == 0
    llamagen.save(llamagen.load(init), out / "init_copy.safetensors")
    before = (out / "metrics.jsonl").read_text()
    code, err = run_cli([*args, "--resume", "--set", "method.lam=3.0"], capsys)
    assert code == 1 and "method.lam: 10.0 -> 3.0" in err and "different recipe" in err
    code, err = run_cli([*args, "--resume", "--set", "method.dropout='none'"], capsys)
    assert code == 1 and "method.dropout: 'both' -> 'none'" in err
    assert (out / "metrics.jsonl").read_text() == before

    code, err = run_cli([*args, "--resume", "--set", "train.micro_batch=2"], capsys)
    assert code == 1 and "train.micro_batch: 4 -> 2" in err  # negatives roll within it
    llamagen.save(tiny_model(seed=5), init)  # another reference: refused after the recipe check
    code, err = run_cli([*args, "--resume", "--steps", "5"], capsys)
    assert code == 1 and "reference (init) weights differ" in err
    assert not (out / "resumes.jsonl").exists()  # a refused resume is not recorded
    llamagen.save(llamagen.load(out / "init_copy.safetensors"), init)

    assert main([*args, "--resume", "--steps", "5", "--set", "checkpoint.every=1"]) == 0
    (entry,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert entry["step"] == 3
    assert entry["changed"] == {"checkpoint.every": [2, 1], "train.steps": [3, 5]}


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """A step whose update makes the weights NaN fails at the save; the newest checkpoint on
    disk, which the error names, is the last finite one."""
    init, codes = write_files(tmp_path)

    def poison_next_update(trainer, record):
        if record["step"] == 1:

            def hook(optimizer, args, kwargs):
                with torch.no_grad():
                    trainer.model.norm.weight.fill_(float("nan"))

            trainer.optimizer.register_step_post_hook(hook)

    config = make_config(
        tmp_path / "run",
        model={"init": init},
        data={"path": codes},
        train={"steps": 4},
        checkpoint={"every": 1},
    )
    with pytest.raises(NonFiniteLossError, match="step 2: the weights became non-finite") as info:
        run_training(config, callbacks=[poison_next_update])
    assert "step_00000001.pt (step 1)" in str(info.value) and "--resume" in str(info.value)
    path, state = latest_checkpoint(tmp_path / "run")
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    init, codes = write_files(tmp_path)
    out = tmp_path / "run"
    args = finetune_args(init, codes, out)
    real_save = torch.save
    calls = []

    def save_until_full(obj, file, *a, **k):
        calls.append(file)
        if len(calls) > 1:  # the disk fills up during the second checkpoint
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *a, **k)

    monkeypatch.setattr(torch, "save", save_until_full)
    code, err = run_cli(args, capsys)
    assert code == 1 and "No space left on device" in err and "--resume" in err
    assert err.count("\n") == 1
    monkeypatch.undo()
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["step_00000002.pt"]  # no half-written file left
    path, state = latest_checkpoint(out)
    assert state["step"] == 2
    assert main([*args, "--resume"]) == 0  # space is back: the run continues


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "train.steps='many'"], "train.steps = 'many' must be an integer"),
        (["--set", "optim.lr=[1]"], "optim.lr = [1] must be a number"),
        (["--device", "tpu"], "train.device = 'tpu' is not a device"),
        (["--set", "train.micro_batch=1"], "without negatives"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, capsys, extra, message):
    init, codes = write_files(tmp_path)
    code, err = run_cli([*finetune_args(init, codes, tmp_path / "run"), *extra], capsys)
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    init, codes = write_files(tmp_path)
    target = tmp_path / "taken"
    target.write_text("keep me")
    code, err = run_cli(finetune_args(init, codes, target), capsys)
    assert code == 2 and f"argument --out: {target}: {target} is a file, not a folder" in err
    code, err = run_cli(finetune_args(init, codes, target / "sub"), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    code, err = run_cli([*finetune_args(init, codes, tmp_path / "ok"), "--set",
                         f'checkpoint.out="{target}"', "--out", str(target / "sub")], capsys)
    assert code == 2  # the flag wins over --set, and is checked first
    config = load_config(REPO / "configs" / "tiny_cpu.toml", [f'checkpoint.out="{target}"',
                                                              f'model.init="{init}"',
                                                              f'data.path="{codes}"'])
    with pytest.raises(ValueError, match=r"--out .*taken is a file, not a folder"):
        run_training(config)  # the same words for an output set in a config
    assert target.read_text() == "keep me"


def test_system_errors_are_described_with_the_fix():
    full = describe_error(OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.pt"))
    assert full.startswith("No space left on device: /x/ckpt.pt; free some space")
    denied = describe_error(PermissionError(errno.EACCES, "Permission denied", "/ro"))
    assert "Permission denied: /ro" in denied and "write to" in denied
    assert describe_error(ValueError("plain words")) == "plain words"


@pytest.fixture
def small_mount(tmp_path):
    """Mount a tmpfs (64 KiB) under tmp_path; ``remount(ro)`` flips it read-only. Needs root."""
    import shutil
    import subprocess

    point = tmp_path / "mnt"
    point.mkdir()
    mount = shutil.which("mount")
    if (
        mount is None
        or subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(point)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def remount_read_only():
        subprocess.run([mount, "-o", "remount,ro", str(point)], check=True)

    try:
        yield point, remount_read_only
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)  # -l: even if busy


def test_a_real_full_disk_and_a_read_only_folder_are_one_line(tmp_path, capsys, small_mount):
    point, remount_read_only = small_mount
    init, codes = write_files(tmp_path)
    code, err = run_cli(finetune_args(init, codes, point / "full"), capsys)
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1
    leftovers = [p.name for p in (point / "full" / "checkpoints").iterdir()]
    assert leftovers == []  # the half-written checkpoint was removed
    with pytest.raises(OSError) as info:  # safetensors' own I/O error becomes an OSError too
        atomic_save_safetensors({"w": torch.zeros(100_000)}, point / "big.safetensors")
    assert info.value.errno == errno.ENOSPC and not list(point.glob("*big*"))
    remount_read_only()
    code, err = run_cli(finetune_args(init, codes, point / "other"), capsys)
    assert code == 1 and "Read-only file system" in err and err.count("\n") == 1


def test_a_checkpoint_from_before_weights_only_loading_says_so(tmp_path, capsys):
    """Older checkpoints pickled numpy's RNG tuple: refused with the way forward, and the run
    neither falls back to an older file nor starts from scratch."""
    import numpy as np

    init, codes = write_files(tmp_path)
    out = tmp_path / "run"
    args = finetune_args(init, codes, out)
    assert main(args) == 0
    for _, path in list_checkpoints(out):
        state = torch.load(path, weights_only=True)
        state["rng"] = [{**state["rng"][0], "numpy": np.random.get_state()}]  # the old layout
        torch.save(state, path)
    final = (out / "final.safetensors").read_bytes()
    code, err = run_cli([*args, "--resume", "--steps", "4"], capsys)
    assert code == 1 and "older than its weights-only checkpoints" in err and "--restart" in err
    assert (out / "final.safetensors").read_bytes() == final


def test_a_folder_holds_one_kind_of_output(tmp_path, capsys):
    """A sampling run started in a training run's folder (and the reverse) mixed their files."""
    init, codes = write_files(tmp_path)
    assert main(finetune_args(init, codes, tmp_path / "run")) == 0
    capsys.readouterr()
    sample = ["sample", str(tmp_path / "run" / "final.safetensors"), "--out",
              str(tmp_path / "run"), "--per-class", "1", "--device", "cpu", "--quiet"]
    assert main(sample) == 1
    err = capsys.readouterr().err
    assert "holds a training run (config.json); a folder holds one kind of output" in err
    assert not (tmp_path / "run" / "run.json").exists()
    sample[3] = str(tmp_path / "samples")
    assert main(sample) == 0
    capsys.readouterr()
    code, err = run_cli(finetune_args(init, codes, tmp_path / "samples"), capsys)
    assert code == 1 and "holds a sampling run (run.json)" in err
