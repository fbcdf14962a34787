"""A Hugging Face cache laid out by hand (offline), for the tests of names and hf:// URIs."""

from __future__ import annotations

import hashlib
from pathlib import Path

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def put(cache: Path, repo: str, file: str, data: bytes, commit: str = COMMIT_A,
        refs: tuple[str, ...] = ("main",)) -> Path:
    """Place ``data`` as ``file`` of ``repo`` at ``commit`` the way huggingface_hub caches it:
    a blob named by its hash, a snapshot link to it, and refs naming the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / file
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(*[".."] * (len(Path(file).parts) + 1), "blobs", blob.name))
    for ref in refs:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return link
