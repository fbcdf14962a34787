"""The ADM .npz readers: accepted layouts and clear errors for malformed files."""

import numpy as np
import pytest

from ccalign.eval.npz import load_reference, load_samples


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_samples_rgb_with_labels(tmp_path):
    images, labels = _images((4, 8, 8, 3)), np.array([0, 3, 1, 2], dtype=np.int32)
    np.savez(tmp_path / "s.npz", images, labels)
    batch = load_samples(tmp_path / "s.npz")
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(batch.labels, labels)
    assert batch.labels.dtype == np.int64


def test_samples_labels_key_as_ccalign_sample_writes_it(tmp_path):
    images, labels = _images((3, 4, 4, 3)), np.array([2, 0, 1])
    np.savez(tmp_path / "s.npz", arr_0=images, labels=labels)
    np.testing.assert_array_equal(load_samples(tmp_path / "s.npz").labels, labels)
    np.savez(tmp_path / "both.npz", arr_0=images, arr_1=labels, labels=labels)
    np.testing.assert_array_equal(load_samples(tmp_path / "both.npz").labels, labels)


@pytest.mark.parametrize("shape", [(3, 6, 6), (3, 6, 6, 1)])
def test_samples_grey_layouts_become_one_channel(tmp_path, shape):
    images = _images(shape)
    np.savez(tmp_path / "s.npz", images)
    batch = load_samples(tmp_path / "s.npz")
    assert batch.images.shape == (3, 6, 6, 1) and batch.labels is None
    np.testing.assert_array_equal(batch.images.reshape(shape), images)


def test_reference_adm_layout_with_spatial_statistics(tmp_path):
    images, mu = _images((5, 8, 8, 3)), np.arange(4, dtype=np.float64)
    sigma = np.eye(4, dtype=np.float32)
    np.savez(tmp_path / "r.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2],
             sigma_s=np.eye(2))
    ref = load_reference(tmp_path / "r.npz")
    np.testing.assert_array_equal(ref.images, images)
    np.testing.assert_array_equal(ref.mu, mu)
    assert ref.sigma.dtype == np.float64 and ref.sigma.shape == (4, 4)


def test_reference_statistics_only_or_images_only(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    ref = load_reference(tmp_path / "stats.npz")
    assert ref.images is None and ref.mu.shape == (3,)
    np.savez(tmp_path / "imgs.npz", _images((2, 4, 4)))
    ref = load_reference(tmp_path / "imgs.npz")
    assert ref.mu is None and ref.images.shape == (2, 4, 4, 1)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "dtype float32, expected uint8"),
        ({"arr_0": np.zeros((2, 4), np.uint8)}, r"shape \(2, 4\), expected"),
        ({"arr_0": np.zeros((2, 4, 4, 2), np.uint8)}, r"shape \(2, 4, 4, 2\), expected"),
        ({"arr_0": _images((2, 4, 4, 3)), "arr_1": np.array([1, 2, 3])},
         r"labels have shape \(3,\), expected \(2,\)"),
        ({"arr_0": _images((2, 4, 4, 3)), "arr_1": np.array([0.0, 1.0])}, "expected integers"),
        ({"arr_0": _images((2, 4, 4, 3)), "arr_1": np.array([0, -1])}, "negative"),
        ({"images": _images((2, 4, 4, 3))}, r"no 'arr_0' array \(found \['images'\]\)"),
        ({"arr_0": _images((2, 4, 4, 3)), "labels": np.array([0, 1, 2])},
         r"bad.npz labels: labels have shape \(3,\), expected \(2,\)"),
        ({"arr_0": _images((2, 4, 4, 3)), "labels": np.array([0, 1]), "arr_1": np.array([1, 0])},
         "'labels' and 'arr_1' both hold labels but they differ"),
    ],
)
def test_samples_rejected_with_clear_message(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_samples(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"mu": np.zeros(3)}, "mu without sigma"),
        ({"sigma": np.eye(3)}, "sigma without mu"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"sigma has shape \(4, 4\), expected \(3, 3\)"),
        ({"mu": np.zeros((3, 1)), "sigma": np.eye(3)}, r"mu has shape \(3, 1\), expected a vect"),
        ({"mu": np.zeros(2), "sigma": np.array([[1.0, np.nan], [0, 1]])}, "sigma contains NaN"),
        ({"mu": np.zeros(2, np.int64), "sigma": np.eye(2)}, "mu has dtype int64"),
        ({"arr_0": np.zeros((2, 4, 4, 3), np.float64)}, "dtype float64, expected uint8"),
        ({"mu_s": np.zeros(2)}, "neither reference images"),
    ],
)
def test_reference_rejected_with_clear_message(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_reference(tmp_path / "bad.npz")


def test_missing_and_non_npz_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="npz file not found"):
        load_samples(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        load_reference(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", _images((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="single .npy array"):
        load_samples(tmp_path / "single.npy")
