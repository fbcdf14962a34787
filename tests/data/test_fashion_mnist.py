"""Fashion-MNIST idx reading: exact round trip of files the test writes, lookup, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from ccalign.data import fashion_mnist
from support.fashion import _idx, write_fake_fashion_mnist


@pytest.mark.parametrize("gz", [True, False])
def test_reads_back_exactly_what_was_written(tmp_path, gz):
    images, labels = write_fake_fashion_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        x, y = fashion_mnist.load(split, tmp_path)
        np.testing.assert_array_equal(x, images[split])
        np.testing.assert_array_equal(y, labels[split])
        assert x.dtype == np.uint8 and y.dtype == np.int64


def test_environment_variable_names_the_folder(tmp_path, monkeypatch):
    images, _ = write_fake_fashion_mnist(tmp_path)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    np.testing.assert_array_equal(fashion_mnist.load("test")[0], images["test"])


def test_missing_data_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist.load("train", tmp_path)
    assert "dataset-fashion-mnist" in str(err.value) and fashion_mnist.ENV_VAR in str(err.value)


def test_wrong_files_give_clear_errors(tmp_path):
    write_fake_fashion_mnist(tmp_path, gz=False)
    name = fashion_mnist.FILES["test"][1]
    (tmp_path / name).write_bytes(_idx(2051, (3,), np.zeros(3)))
    with pytest.raises(ValueError, match="magic 2051"):
        fashion_mnist.load("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load("valid", tmp_path)


def test_a_split_without_images_is_named(tmp_path):
    write_fake_fashion_mnist(tmp_path, test=0)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz holds no images"):
        fashion_mnist.load("test", tmp_path)


@pytest.mark.skipif(not fashion_mnist.SYSTEM_FOLDER.exists(), reason="Debian package missing")
def test_the_installed_data_set():
    x, y = fashion_mnist.load("test", fashion_mnist.SYSTEM_FOLDER)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
