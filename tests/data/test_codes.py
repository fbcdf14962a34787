"""Code data: LlamaGen's per-image folders, the flat file, deterministic views, validation."""

import numpy as np
import pytest
import torch

from ccalign.data.codes import (
    FlatCodes,
    LlamaGenCodeFolder,
    open_codes,
    validate_codes,
    write_flat_codes,
    write_llamagen_code,
)


def make_folder(root, n_images=6, views=10, n=16, vocab=50, classes=4):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, vocab, size=(n_images, views, n))
    labels = rng.integers(0, classes, size=n_images)
    for i in range(n_images):
        write_llamagen_code(root, 256, i, codes[i], int(labels[i]))
    return codes, labels


def test_llamagen_folder_layout_and_items(tmp_path):
    codes, labels = make_folder(tmp_path)
    raw = np.load(tmp_path / "imagenet256_codes" / "3.npy")
    assert raw.shape == (1, 10, 16) and raw.dtype == np.int64
    lab = np.load(tmp_path / "imagenet256_labels" / "3.npy")
    assert lab.shape == (1,) and lab.dtype == np.int64
    ds = open_codes(tmp_path, seed=7)
    assert isinstance(ds, LlamaGenCodeFolder) and len(ds) == 6 and ds.seq_len == 16
    for i in range(6):
        tokens, label = ds[i]
        assert tokens.dtype == torch.int64 and int(label) == labels[i]
        view = ds.view_index(i)
        assert np.array_equal(tokens.numpy(), codes[i, view])
    np.testing.assert_array_equal(ds.all_labels(), labels)


def test_views_are_deterministic_per_epoch_and_cover_all_views(tmp_path):
    make_folder(tmp_path, n_images=2)
    ds = open_codes(tmp_path, seed=3)
    first = [ds.view_index(0) for _ in range(3)]
    assert len(set(first)) == 1  # same (seed, epoch, index) -> same view
    seen = set()
    for epoch in range(60):
        ds.set_epoch(epoch)
        seen.add(ds.view_index(0))
    assert seen == set(range(10))


def test_flat_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16384, size=(5, 2, 9))
    labels = rng.integers(0, 1000, size=5)
    write_flat_codes(tmp_path / "c.safetensors", codes, labels, vocab_size=16384, grid=3)
    ds = open_codes(tmp_path / "c.safetensors")
    assert isinstance(ds, FlatCodes) and ds.codes.dtype == torch.int16
    assert (len(ds), ds.num_views, ds.seq_len, ds.vocab_size) == (5, 2, 9, 16384)
    for i in range(5):
        tokens, label = ds[i]
        assert np.array_equal(tokens.numpy(), codes[i, ds.view_index(i)]) and label == labels[i]
    assert ds.token_range() == (codes.min(), codes.max())


def test_validation_names_each_problem(tmp_path):
    write_flat_codes(tmp_path / "c.safetensors", [[0, 5, 63, 2]], [12], vocab_size=64, grid=2)
    ds = open_codes(tmp_path / "c.safetensors")
    validate_codes(ds, num_classes=13, vocab_size=64, seq_len=4)
    with pytest.raises(ValueError) as err:
        validate_codes(ds, num_classes=10, vocab_size=32, seq_len=9)
    msg = str(err.value)
    assert "4 tokens but the model expects 9" in msg
    assert "64 codes but the model's vocab is 32" in msg
    assert "token ids span [0, 63]" in msg
    assert "labels span [12, 12]" in msg and "10 classes" in msg


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_codes(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a ccalign code file"):
        open_codes(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="do not form"):
        write_flat_codes(tmp_path / "x.safetensors", np.zeros((2, 5)), [0, 1], vocab_size=8, grid=2)
    make_folder(tmp_path / "f", n_images=3)
    (tmp_path / "f" / "imagenet256_labels" / "1.npy").unlink()
    with pytest.raises(ValueError, match="no label file"):
        open_codes(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="imagenet<size>_codes"):
        open_codes(tmp_path / "empty")


def test_empty_data_sets_name_the_path_and_what_is_missing(tmp_path):
    write_flat_codes(tmp_path / "none.safetensors", np.zeros((0, 4)), [], vocab_size=8, grid=2)
    with pytest.raises(ValueError, match=r"none.safetensors holds no codes \(shape \(0, 1, 4\)\)"):
        open_codes(tmp_path / "none.safetensors")
    for name in ("imagenet256_codes", "imagenet256_labels"):
        (tmp_path / "f" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"f/imagenet256_codes holds no <index>.npy code files"):
        open_codes(tmp_path / "f")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_a_damaged_flat_file_is_named(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    write_flat_codes(path, np.zeros((3, 4)), [0, 1, 2], vocab_size=8, grid=2)
    whole = path.read_bytes()
    broken = {
        "truncated": whole[:-5],
        "random": np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes(),
        "empty": b"",
    }[damage]
    path.write_bytes(broken)
    with pytest.raises(ValueError, match=r"c.safetensors is damaged or not a safetensors file"):
        open_codes(path)


def test_atomic_writes_get_the_default_file_mode(tmp_path):
    import os

    from ccalign.io import atomic_write

    atomic_write(tmp_path / "f.txt", lambda tmp: open(tmp, "w").write("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
