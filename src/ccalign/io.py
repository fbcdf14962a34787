"""File helpers shared by every module: atomic writes and reading checkpoint files of any layout.

Torch files are read weights-only: unpickling an arbitrary object can run code hidden in it, so
only tensors, plain containers and the few classes in :data:`SAFE_GLOBALS` are accepted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ccalign.errors import shorten

PathLike = str | os.PathLike

#: Classes torch files may hold besides tensors and containers: LlamaGen's trainers pickle their
#: argparse options under "args" (GPT checkpoints and the VQ tokenizer vq_ds16_c2i.pt alike).
SAFE_GLOBALS = (argparse.Namespace,)
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: Modules whose globals ordinary weight files import (tensor rebuilds, OrderedDict).
_WEIGHT_MODULES = ("torch", "collections")
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}


#: How much of a legacy torch file is scanned for globals: its pickles come first and are small.
_LEGACY_PICKLE_BYTES = 1 << 24


class UnsafePickleError(ValueError):
    """A torch file holds a pickled object outside the weights-only allow-list (could run code)."""


def check_output_path(path: PathLike, *, folder: bool, flag: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a folder is
    needed (``path`` itself for a folder, or a folder above it), or a folder where the file
    should go. Every command says it in the same words."""
    problem = _output_problem(Path(path), folder)
    if problem:
        raise ValueError(f"{flag} {shorten(str(path), 200)}{problem}")
    return Path(path)


#: the files that mark a folder as one kind of ccalign output: a folder holds one kind only
OUTPUT_KINDS = {
    "training run": ("config.json", "metrics.jsonl", "final.safetensors", "checkpoints"),
    "sampling run": ("run.json",),
    "code extraction": ("ccalign-extract.json",),
}


def check_output_kind(out: PathLike, kind: str) -> None:
    """Refuse to start a ``kind`` of output in a folder that holds another kind (a sampling
    run in a training run's folder would mix their files and their resumes)."""
    for other, markers in OUTPUT_KINDS.items():
        found = [name for name in markers if (Path(out) / name).exists()]
        if other != kind and found:
            raise ValueError(
                f"{out} holds a {other} ({found[0]}); a folder holds one kind of output: "
                f"choose another --out for this {kind}"
            )


def read_json_record(path: PathLike) -> dict:
    """A JSON object ccalign wrote beside its outputs (run.json, config.json, ...); a damaged
    one is named with the fix."""
    try:
        record = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise ValueError(
            f"{path} is damaged (not a JSON object); the folder it is in cannot be resumed: "
            "choose another --out, or delete that folder to start over"
        )
    return record


def changed_keys(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between a record and what a run wants, sorted (a key
    missing on one side differs when the other side's value is not None)."""
    return sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))


def output_file(text: str) -> Path:
    """argparse ``type`` of a file to write (``check_output_path``, as a usage error)."""
    return _output_flag(text, folder=False)


def output_folder(text: str) -> Path:
    """argparse ``type`` of a folder to write into (``check_output_path``, as a usage error)."""
    return _output_flag(text, folder=True)


def output_path(text: str) -> Path:
    """argparse ``type`` of a file or a folder to write, as the command decides: every folder
    above it must be a folder."""
    problem = _output_problem(Path(text).parent, folder=True)
    if problem:
        raise argparse.ArgumentTypeError(f"{shorten(text, 200)}{problem}")
    return Path(text)


def _output_flag(text: str, *, folder: bool) -> Path:
    problem = _output_problem(Path(text), folder)
    if problem:
        raise argparse.ArgumentTypeError(f"{shorten(text, 200)}{problem}")
    return Path(text)


def _output_problem(path: Path, folder: bool) -> str | None:
    for above in (path, *path.parents) if folder else path.parents:
        if above.exists():
            if not above.is_dir():
                return f": {shorten(str(above), 200)} is a file, not a folder; choose another path"
            break
    if not folder and path.is_dir():
        return " is a folder; give the file to write"
    return None


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
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename == tmp:  # name the file the user asked for
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save_npy(path: PathLike, array) -> Path:
    """One array as a ``.npy`` file, written atomically (``atomic_write``)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def atomic_save_npz(path: PathLike, arrays: Mapping[str, Any]) -> Path:
    """Named arrays as an uncompressed ``.npz`` file, written atomically."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


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
    """``torch.save`` that never leaves a half-written file at ``path``.

    It writes through a Python file so a full disk surfaces as ``OSError`` (ENOSPC) rather than
    torch's opaque "unexpected pos" RuntimeError.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as exc:
                raise _os_error_behind(exc, path) from exc

    return atomic_write(path, write)


def _os_error_behind(exc: BaseException, path: PathLike) -> BaseException:
    """The OSError a library error was raised while handling (with ``path``), else ``exc``."""
    seen = exc.__context__ or exc.__cause__
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__context__ or seen.__cause__
    if seen is None or seen.errno is None:
        return exc
    return OSError(seen.errno, os.strerror(seen.errno), str(path))


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as safetensors atomically (tensors are made contiguous CPU copies)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(flat, tmp, metadata=metadata)
        except SafetensorError as exc:  # "I/O error: ... (os error 28)": a system error
            code = re.search(r"\(os error (\d+)\)", str(exc))
            if code is None:
                raise
            number = int(code.group(1))
            raise OSError(number, os.strerror(number), str(path)) from exc

    return atomic_write(path, write)


@contextmanager
def open_safetensors(path: PathLike) -> Iterator[Any]:
    """``safetensors.safe_open`` (torch, CPU) that turns a damaged file into a ValueError naming it.

    Truncated or random bytes otherwise surface as safetensors' own SafetensorError tracebacks.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise ValueError(f"{path} is damaged or not a safetensors file ({exc})") from exc


def read_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file on the CPU (a damaged file: ValueError naming it)."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def load_torch_file(path: PathLike) -> object:
    """``torch.load`` onto the CPU that never runs pickled code: weights only, plus SAFE_GLOBALS.

    A file needing any other global raises :class:`UnsafePickleError` naming the file and that
    global; a damaged file raises ValueError naming it.
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        name = found.group(1) if found else _first_unsafe_global(Path(path))
        if name is None:
            raise ValueError(f"{path} is damaged or not a torch file (read weights-only)") from exc
        raise UnsafePickleError(
            f"{path} holds a pickled object ({name}) that ccalign will not unpickle "
            "(it could run code); only tensors, plain containers and "
            f"{', '.join(_qualname(c) for c in SAFE_GLOBALS)} are read. If you trust the file, "
            "re-save its weights as a plain state_dict or .safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:  # a truncated zip archive raises any of these
        if isinstance(exc, OSError) and exc.filename is not None:
            raise  # the file could not be opened at all (permissions, ...): not damage
        raise ValueError(f"{path} is damaged or not a torch file ({_first_sentence(exc)})") from exc


def _first_unsafe_global(path: Path) -> str | None:
    """The first global outside torch, collections and SAFE_GLOBALS that the file's pickles import.

    Read statically, for what torch's loader refuses without naming a global (pickle protocol
    4 and up); None for a file that is not a readable pickle at all.
    """
    safe = {_qualname(c) for c in SAFE_GLOBALS}
    for name in _pickled_globals(path):
        if name.split(".")[0] not in _WEIGHT_MODULES and name not in safe:
            return name
    return None


def _pickled_globals(path: Path) -> list[str]:
    """module.name of every global imported by the pickles of a torch file (zip or legacy)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    except (zipfile.BadZipFile, StopIteration):
        with open(path, "rb") as f:  # legacy format: a few pickles, then the raw storages
            data = f.read(_LEGACY_PICKLE_BYTES)
    stream, names = io.BytesIO(data), []
    try:
        while stream.tell() < len(data):
            names += _globals_in_one_pickle(stream)
    except ValueError:  # garbage, or the storage bytes after a legacy file's pickles
        pass
    return names


def _globals_in_one_pickle(stream: io.BytesIO) -> list[str]:
    """The globals of the pickle at the stream's position, following memoized strings."""
    strings: list[str] = []  # strings pushed so far, for STACK_GLOBAL's module and name
    memo: dict[int, str | None] = {}
    names, last = [], None
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(".".join(strings[-2:]))
        pushed = arg if op.name in _STRING_OPS else None
        if op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(int(arg))
        if isinstance(pushed, str):
            strings.append(pushed)
        last = pushed
    return names


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _first_sentence(exc: BaseException) -> str:
    return str(exc).split(". ")[0].strip()


def read_tensor_file(path: PathLike) -> object:
    """Load a ``.safetensors`` file (a flat dict) or a torch file (weights only) onto the CPU."""
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
        return read_safetensors(path)
    return load_torch_file(path)
