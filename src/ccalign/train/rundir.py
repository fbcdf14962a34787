"""One output folder holds one run: claim it before writing, lock it while writing.

A folder that already holds a run (its config, checkpoints, metrics or final model) is only
written to again when the user says how: ``resume`` continues that run, ``restart`` moves it
aside to ``<out>.old-<time>`` (never deleted) and starts over. A lock file held for the whole run
keeps a second process from writing into the same folder at the same time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ccalign.io import OUTPUT_KINDS, check_output_kind, check_output_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the checks still apply
    fcntl = None

LOCK_NAME = ".lock"
RUN_MARKERS = OUTPUT_KINDS["training run"]


class RunLock:
    """An exclusive advisory lock on ``<out>/.lock``, released by ``release`` (or at exit)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self._file = open(self.path, "a+")  # noqa: SIM115 - held for the run's lifetime
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ValueError(
                f"{out} is being written by another ccalign run ({holder}); wait for it to end "
                "or choose another --out"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock


def holds_run(out: Path) -> bool:
    """Whether ``out`` already has what a training run writes."""
    return any((out / name).exists() for name in RUN_MARKERS)


def check_output_folder(out: Path, *, resume: bool, restart: bool) -> None:
    """Refuse a folder that cannot hold this run; read-only, so every process can call it."""
    if resume and restart:
        raise ValueError("--resume continues the run in --out and --restart starts over: pick one")
    check_output_path(out, folder=True)
    check_output_kind(out, "training run")
    if holds_run(out) and not (resume or restart):
        raise ValueError(
            f"{out} already holds a run; pass --resume to continue it, --restart to move it "
            f"aside (to {out}.old-<time>) and start over, or choose a new --out"
        )


def claim_output_folder(out: Path, *, restart: bool) -> RunLock:
    """Move an old run aside when restarting, then lock ``out`` for this run (main process)."""
    out = Path(out)
    if restart and holds_run(out):
        old_lock = RunLock(out)  # never move a folder another run is writing to
        try:
            aside = _aside_name(out)
            out.rename(aside)
        finally:
            old_lock.release()
        print(f"moved the previous run in {out} to {aside}")
    out.mkdir(parents=True, exist_ok=True)
    return RunLock(out)


def _aside_name(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        candidate = out.with_name(f"{out.name}.old-{stamp}-{n}")
        n += 1
    return candidate
