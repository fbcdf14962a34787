"""Resumable training state: checkpoint files, their rotation, and every random state.

A full checkpoint ``<out>/checkpoints/step_<step>.pt`` holds the model, optimizer, schedule,
EMA, the RNG states of every process (torch, CUDA, numpy, python), the step, the data position
(epoch, step within the epoch) and the config. It is written atomically by rank 0, so a file
that exists is complete; ``latest_checkpoint`` still skips files that fail to load, but not a
file refused for holding a pickled object that could run code. Everything is stored as tensors
and plain Python values so that checkpoints load weights-only (no unpickling of objects).
A sharded checkpoint is the folder ``step_<step>/`` (see ``ccalign.train.sharded``); both kinds
may sit side by side and count alike for ``checkpoint.keep``.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ccalign.io import UnsafePickleError, atomic_torch_save, load_torch_file
from ccalign.train import sharded

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)(\.pt)?$")


def checkpoint_path(out: str | Path, step: int, *, folder: bool = False) -> Path:
    """The file of a full checkpoint, or the folder of a sharded one."""
    name = f"step_{step:08d}" if folder else f"step_{step:08d}.pt"
    return Path(out) / CHECKPOINT_DIR / name


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints under ``out`` (files and folders), oldest first.

    Saves that did not finish live under another name and are not listed.
    """
    folder = Path(out) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents on the CPU, loaded weights-only (see :func:`load_torch_file`).

    For a sharded folder: its small state only; the tensors are read by ``sharded.restore``.
    """
    if Path(path).is_dir():
        return sharded.read_state(Path(path))
    try:
        state = load_torch_file(path)
    except UnsafePickleError as exc:
        if "numpy" not in str(exc):
            raise
        raise UnsafePickleError(
            f"{path} comes from a ccalign older than its weights-only checkpoints (it pickles "
            "numpy's random state), so it is not read; start over with --restart (the old run "
            "is moved aside, not deleted)"
        ) from exc
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ValueError(f"{path} is not a ccalign training checkpoint")
    return state


def latest_checkpoint(out: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, or None when there is none.

    A damaged file is skipped with a warning; one refused as unsafe raises, since falling back
    to an older checkpoint would hide that someone planted it, and so does a run whose every
    checkpoint is damaged. Folders of saves that did not finish (a run stopped while saving)
    are skipped with a warning too.
    """
    for partial in sharded.partial_folders(Path(out) / CHECKPOINT_DIR):
        warnings.warn(
            f"skipping incomplete checkpoint {partial}: a save that did not finish (the run "
            "stopped while writing it); the next save removes it",
            stacklevel=2,
        )
    found = list_checkpoints(out)
    for step, path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except UnsafePickleError:
            raise
        except Exception as exc:  # a damaged file: fall back to the previous one
            warnings.warn(
                f"skipping unreadable checkpoint {path} (step {step}): {exc}",
                stacklevel=2,
            )
    if found:  # never start over silently: the log and the outputs would mix two runs
        names = ", ".join(path.name for _, path in found)
        raise ValueError(
            f"cannot resume {out}: none of its checkpoints can be read ({names}); restore one, "
            "or start over with --restart (the run is moved aside, nothing is deleted)"
        )
    return None


def save_checkpoint(state: dict, out: str | Path, keep: int) -> Path:
    """Write ``state`` for its step atomically, then delete all but the newest ``keep``."""
    path = atomic_torch_save(state, checkpoint_path(out, state["step"]))
    prune_checkpoints(out, keep)
    return path


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, files and folders alike."""
    for _, old in list_checkpoints(out)[:-keep]:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)


def capture_rng() -> dict:
    """This process's torch, CUDA, numpy and python random states as tensors and plain values.

    numpy's state tuple holds an array, which a weights-only load refuses: its MT19937 key is
    stored as an int64 tensor beside the position and cached Gaussian.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what ``capture_rng`` recorded."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    key = saved["key"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], key, saved["pos"], saved["has_gauss"], saved["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def tensor_fingerprint(module: torch.nn.Module) -> float:
    """A float64 checksum of a module's state, to detect a changed reference checkpoint."""
    with torch.no_grad():
        return float(
            sum(
                (v.double() * (i + 1)).sum()
                for i, v in enumerate(module.state_dict().values())
                if v.is_floating_point()
            )
        )
