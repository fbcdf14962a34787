"""Sharded checkpoints (``checkpoint.format = "sharded"``): every process writes its own shard.

A sharded checkpoint is a folder ``<out>/checkpoints/step_<step>/`` written through
``torch.distributed.checkpoint`` (DCP): ``__<rank>_0.distcp`` holds the model, optimizer and EMA
tensors that rank owns (its FSDP shard), ``.metadata`` says where every piece of every tensor
lies, and ``trainer_state.pt`` holds the small rest (step, data position, every rank's RNG state,
clip count, reference fingerprint, config, optimizer hyper-parameters). No tensor is gathered.

Writing is atomic: the ranks write into ``.step_<step>.partial`` and rank 0 renames it to
``step_<step>`` once every shard, the metadata and the trainer state are on disk. A run killed
during a save leaves that partial folder, which resuming skips (saying so) and the next save
removes; the previous checkpoint stays the newest complete one.

Tensors are keyed by parameter name, so a checkpoint loads into any number of processes, with
FSDP or without: DCP reads for each rank the pieces of its own shard.

DCP reads ``.metadata`` with pickle. It is first read here with an allow-list of DCP's own
metadata classes, and every entry must be a tensor (tensors are read weights-only), so a planted
folder cannot run code.
"""

from __future__ import annotations

import io
import pickle
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ccalign.io import UnsafePickleError, _fsync_dir, atomic_torch_save, load_torch_file
from ccalign.train.distributed import DistInfo, barrier

STATE_FILE = "trainer_state.pt"
METADATA_FILE = ".metadata"
PARTIAL_SUFFIX = ".partial"

#: (module, name) pairs DCP's metadata pickle may import; besides these, torch dtypes
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


def use_sharded(fmt: str, fsdp: bool) -> bool:
    """Whether saves are sharded: ``auto`` shards exactly when the run is FSDP-sharded."""
    return fmt == "sharded" or (fmt == "auto" and fsdp)


def tensor_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema_shadow: dict | None
) -> tuple[dict, list[dict]]:
    """({"model", "optimizer"[, "ema"]} tensors keyed by name, each rank's own shard; the
    optimizer's param_groups). Also the load target: DCP fills these tensors in place."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optimizer": optimizer_state["state"]}
    if ema_shadow is not None:
        tensors["ema"] = ema_shadow
    return tensors, optimizer_state["param_groups"]


def partial_folder(final: Path) -> Path:
    """Where a save to ``final`` is written until it is complete."""
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def partial_folders(folder: Path) -> list[Path]:
    """Folders of saves that did not finish under a checkpoints folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIX) and p.is_dir())


def save(tensors: dict, state: dict, final: Path, info: DistInfo) -> Path:
    """Write ``tensors`` (each rank its shard) and ``state`` (rank 0) as the folder ``final``.

    Every rank calls this. Leftovers of unfinished saves are removed first; the folder appears
    under its name only when complete.
    """
    tmp = partial_folder(final)
    if info.is_main:
        for stale in partial_folders(final.parent):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    barrier(info)
    writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=writer, no_dist=not info.distributed)
    # dcp.save returns on rank 0 only after every rank reported its shard written (and synced)
    if info.is_main:
        atomic_torch_save(state, tmp / STATE_FILE)
        if final.exists():  # a damaged checkpoint of this step that resuming skipped
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(final.parent)
    barrier(info)
    return final


def read_state(folder: Path) -> dict:
    """The trainer state of a sharded checkpoint folder, after checking that it is complete and
    that its metadata is safe to hand to DCP (see the module doc)."""
    state_file = folder / STATE_FILE
    if not state_file.is_file() or not (folder / METADATA_FILE).is_file():
        raise ValueError(
            f"{folder} is an incomplete sharded checkpoint (no {STATE_FILE} or {METADATA_FILE})"
        )
    read_metadata(folder)
    state = load_torch_file(state_file)
    if not isinstance(state, dict) or state.get("format") != "sharded" or "step" not in state:
        raise ValueError(f"{state_file} is not a ccalign sharded checkpoint state")
    return state


def read_metadata(folder: Path) -> Metadata:
    """DCP's ``.metadata`` of ``folder``, unpickled with an allow-list; every entry a tensor
    whose pieces lie in files of the folder."""
    path = folder / METADATA_FILE
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is damaged or not DCP metadata ({exc})") from exc
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path} is not DCP metadata")
    not_tensors = [
        k
        for k, v in metadata.state_dict_metadata.items()
        if not isinstance(v, TensorStorageMetadata)
    ]
    if not_tensors:
        raise UnsafePickleError(
            f"{path} stores pickled objects ({not_tensors[0]}, ...) that DCP would unpickle "
            "(they could run code); ccalign's sharded checkpoints hold tensors only"
        )
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        if Path(name).name != name or not (folder / name).is_file():
            raise ValueError(f"{folder} is incomplete: its metadata names a missing shard {name}")
    return metadata


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing any global outside its classes, torch dtypes and paths."""

    def __init__(self, stream: io.BytesIO, path: Path):
        super().__init__(stream)
        self.path = path

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if _allowed(module, name) else None
        if found is None:
            raise UnsafePickleError(
                f"{self.path} holds a pickled object ({module}.{name}) that is not DCP metadata; "
                "ccalign will not unpickle it (it could run code)"
            )
        return found


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    if module == _METADATA_MODULE:
        return isinstance(getattr(torch.distributed.checkpoint.metadata, name, None), type)
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def load(folder: Path, tensors: dict, info: DistInfo) -> None:
    """Fill ``tensors`` (as :func:`tensor_state` makes them) from the checkpoint ``folder``.

    Each rank reads the pieces of its own shard, whatever the number of processes that saved.
    """
    metadata = read_metadata(folder)
    wanted = {f"{group}.{key}" for group, part in tensors.items() for key in _flat_keys(part)}
    missing = sorted(wanted - set(metadata.state_dict_metadata))
    if missing:
        raise ValueError(
            f"{folder} lacks {len(missing)} tensor(s) this run needs (first {missing[0]}): it "
            "was saved from another model; resume with the run's own --init and config"
        )
    with _quiet_single_process():
        reader = dcp.FileSystemReader(folder)
        dcp.load(tensors, storage_reader=reader, no_dist=not info.distributed)


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process: ``no_dist`` says so on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_shadow: dict | None,
    folder: Path,
    param_groups: list[dict],
    info: DistInfo,
) -> None:
    """Load model, optimizer (and EMA averages, when given) from a sharded checkpoint."""
    tensors, _ = tensor_state(model, optimizer, ema_shadow)
    load(folder, tensors, info)
    optimizer_state = {"state": tensors["optimizer"], "param_groups": param_groups}
    set_state_dict(
        model, optimizer, model_state_dict=tensors["model"], optim_state_dict=optimizer_state
    )


def non_finite(model_state: dict) -> list[str]:
    """Names of floating-point tensors whose part on this rank holds NaN or inf."""
    return [
        k
        for k, v in model_state.items()
        if v.is_floating_point() and not bool(_local(v).isfinite().all())
    ]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
