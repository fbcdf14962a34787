"""File helpers shared by every module: atomic writes and reading checkpoint files of any layout."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

PathLike = str | os.PathLike


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the result over ``path``.

    The temporary file lives in the same folder, is fsynced before the rename, and is removed if
    ``write`` fails: a reader sees either the old complete file or the new complete one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual default mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: object, path: PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file at ``path``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as safetensors atomically (tensors are made contiguous CPU copies)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def read_tensor_file(path: PathLike) -> object:
    """Load a ``.safetensors`` file (a flat dict) or a torch pickle (any object) onto the CPU."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "consolidated.pth"
        if not candidate.exists():
            raise FileNotFoundError(
                f"{path} is a folder without consolidated.pth; give the checkpoint file itself"
            )
        path = candidate
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # older pickles with argparse.Namespace args etc.
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=False)
