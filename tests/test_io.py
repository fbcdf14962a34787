"""ccalign.io: atomic writes name the file the user asked for, never their temporary file."""

from __future__ import annotations

import errno

import pytest

from ccalign.cli import describe_error
from ccalign.io import atomic_write


def test_a_failed_atomic_write_names_the_target_not_its_temporary_file(tmp_path):
    def full_disk(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    target = tmp_path / "samples.npz"
    with pytest.raises(OSError) as info:
        atomic_write(target, full_disk)
    assert info.value.filename == str(target) and info.value.errno == errno.ENOSPC
    assert describe_error(info.value).startswith(f"No space left on device: {target}; free some")
    assert list(tmp_path.iterdir()) == []
