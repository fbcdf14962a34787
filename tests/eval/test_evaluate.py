"""evaluate() wiring, the `ccalign eval` and `train-classifier` commands, the bundled network."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from ccalign.cli import main
from ccalign.data import fashion_mnist
from ccalign.eval import (
    FeatureExtractor,
    ReferenceBatch,
    SampleBatch,
    bundled_classifier_path,
    conditional_accuracy,
    evaluate,
    evaluate_files,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    load_classifier,
    load_classifier_extractor,
    precision_recall,
)
from ccalign.eval.classifier import ClassifierConfig, FashionClassifier, save_classifier
from ccalign.eval.classifier_training import classifier_accuracy


def _pixel_extractor() -> FeatureExtractor:
    """Features = the first 6 pixels, logits = the next 3 (of 3x3 grey images)."""
    return FeatureExtractor(lambda x: (x[:, :6], x[:, 6:9]), lambda b: b.flatten(1).float(),
                            "pixels", "cpu", batch_size=7, progress=False)


def _images(n, shape=(3, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _fid_approx(expected: float, *features: np.ndarray, precision: float = 1e-10):
    """pytest.approx for a FID: round-off (BLAS order, thread count, CPU kernels) scales with the
    covariance traces, the terms that cancel, not with the FID, which may be ~0. ``precision``
    1e-10 suits float64 paths; float32 features need ~1e-6."""
    scale = sum(np.trace(np.cov(np.asarray(f, np.float64), rowvar=False)) for f in features)
    return pytest.approx(expected, abs=precision * scale)


def test_evaluate_combines_the_metrics_on_the_extracted_features():
    fake, real = _images(30, seed=1), _images(25, seed=2)
    labels = np.random.default_rng(3).integers(0, 3, size=30)
    got = evaluate(SampleBatch(fake, labels), real, _pixel_extractor())
    fake_flat, real_flat = fake.reshape(30, 9).astype(np.float64), real.reshape(25, 9)
    precision, recall = precision_recall(real_flat[:, :6], fake_flat[:, :6], k=3, device="cpu")
    assert got["fid"] == _fid_approx(fid_from_features(fake_flat[:, :6], real_flat[:, :6]),
                                     fake_flat[:, :6], real_flat[:, :6])
    assert got["is"] == pytest.approx(inception_score(fake_flat[:, 6:], splits=10), rel=1e-9)
    assert got["accuracy"] == conditional_accuracy(fake_flat[:, 6:], labels)
    assert (got["precision"], got["recall"]) == (precision, recall)
    assert (got["num_samples"], got["num_reference_images"], got["features"]) == (30, 25, "pixels")


def test_evaluate_uses_stored_reference_statistics():
    fake = _images(20, seed=4)
    mu, sigma = np.full(6, 100.0), np.eye(6) * 300.0
    got = evaluate(fake, ReferenceBatch(mu=mu, sigma=sigma), _pixel_extractor(), is_splits=2)
    fake_mu, fake_sigma = feature_statistics(fake.reshape(20, 9)[:, :6])
    expected = frechet_distance(fake_mu, fake_sigma, mu, sigma)
    assert got["fid"] == pytest.approx(expected, abs=1e-10 * np.trace(fake_sigma + sigma))
    assert got["precision"] is None and got["recall"] is None and got["accuracy"] is None
    with pytest.raises(ValueError, match="statistics are 4-d but the pixels features are 6-d"):
        evaluate(fake, ReferenceBatch(mu=np.zeros(4), sigma=np.eye(4)), _pixel_extractor())


@pytest.fixture
def tiny_classifier(tmp_path):
    torch.manual_seed(0)
    model = FashionClassifier(ClassifierConfig(channels=(4, 8), feature_dim=16)).eval()
    return save_classifier(model, tmp_path / "clf.safetensors")


def test_eval_command_prints_and_writes_the_metrics(tmp_path, tiny_classifier, capsys):
    np.savez(tmp_path / "samples.npz", _images(30, (28, 28), 5),
             np.random.default_rng(6).integers(0, 10, size=30))
    np.savez(tmp_path / "ref.npz", _images(40, (28, 28, 1), 7))
    out = tmp_path / "metrics.json"
    argv = ["eval", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
            "--features", "fmnist", "--classifier", str(tiny_classifier), "--device", "cpu",
            "--batch-size", "16", "--is-splits", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    written = json.loads(out.read_text())
    extractor = load_classifier_extractor(tiny_classifier, device="cpu", batch_size=16,
                                          progress=False)
    expected = evaluate_files(tmp_path / "samples.npz", tmp_path / "ref.npz", extractor,
                              is_splits=3)
    assert set(written) == set(expected) >= {"fid", "is", "precision", "recall", "accuracy"}
    # float32 features: the FID (~0.002 here) is compared on the scale of the covariance traces,
    # the Inception Score (~1 + 7e-5) relatively; the rest are counts or fractions of counts
    fake, real = extractor(_images(30, (28, 28), 5)), extractor(_images(40, (28, 28, 1), 7))
    assert written.pop("fid") == _fid_approx(expected.pop("fid"), fake, real, precision=1e-6)
    assert written.pop("is") == pytest.approx(expected.pop("is"), rel=1e-7)
    assert written == expected
    assert "fid" in capsys.readouterr().out


def test_evaluate_rejects_an_unusable_k_before_running_the_network():
    def unreachable(x):
        raise AssertionError("the feature network ran before k was checked")

    extractor = FeatureExtractor(unreachable, lambda b: b.float(), "never", "cpu", progress=False)
    fake, real = _images(30), _images(25)
    for k, message in ((0, "k must be >= 1"), (-2, "k must be >= 1"),
                       (25, "k=25 needs more than 25 points in the reference images, got 25"),
                       (30, "k=30 needs more than 30 points in the samples, got 30")):
        with pytest.raises(ValueError, match=message):
            evaluate(fake, real, extractor, k=k)


def _eval_argv(tmp_path, classifier, *extra):
    return ["eval", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
            "--features", "fmnist", "--classifier", str(classifier), "--device", "cpu",
            "--is-splits", "2", "--no-progress", *extra]


def test_eval_command_reads_the_labels_key_that_sample_writes(tmp_path, tiny_classifier, capsys):
    images, labels = _images(12, (28, 28), 5), np.random.default_rng(6).integers(0, 10, size=12)
    np.savez(tmp_path / "samples.npz", arr_0=images, labels=labels)  # ccalign sample's layout
    np.savez(tmp_path / "ref.npz", _images(12, (28, 28), 7))
    out = tmp_path / "metrics.json"
    assert main(_eval_argv(tmp_path, tiny_classifier, "--out", str(out))) == 0
    extractor = load_classifier_extractor(tiny_classifier, device="cpu", progress=False)
    want = conditional_accuracy(extractor.extract(images).logits, labels)
    assert json.loads(out.read_text())["accuracy"] == want  # not None ("n/a")
    assert "n/a" not in capsys.readouterr().out


def test_eval_command_rejects_bad_k_and_labels_outside_the_classes(
    tmp_path, tiny_classifier, capsys
):
    np.savez(tmp_path / "samples.npz", _images(12, (28, 28), 5), np.arange(12))  # labels 0..11
    np.savez(tmp_path / "ref.npz", _images(12, (28, 28), 7))
    assert main(_eval_argv(tmp_path, tiny_classifier, "--k", "0")) == 2  # a usage error
    assert "argument --k: must be in [1, 10000], got 0" in capsys.readouterr().err
    assert main(_eval_argv(tmp_path, tiny_classifier, "--k", "12")) == 1
    assert "k=12 needs more than 12 points in the samples" in capsys.readouterr().err
    assert main(_eval_argv(tmp_path, tiny_classifier)) == 1
    err = capsys.readouterr().err.strip()
    assert "labels range from 0 to 11 but the classifier has 10 classes (0 to 9)" in err
    assert "\n" not in err  # one line, no traceback


def test_eval_refuses_samples_and_references_of_different_sizes(tmp_path, tiny_classifier, capsys):
    """The feature network resized both to its input: a 384 px set against 256 px references
    gave a FID, exit 0."""
    np.savez(tmp_path / "samples.npz", _images(6, (32, 32)))
    np.savez(tmp_path / "ref.npz", _images(6, (28, 28), 7))
    assert main(_eval_argv(tmp_path, tiny_classifier)) == 1
    err = capsys.readouterr().err
    assert "the samples are 32x32x1 but the reference images are 28x28x1" in err


def test_eval_command_reports_bad_files(tmp_path, tiny_classifier, capsys):
    np.savez(tmp_path / "samples.npz", np.zeros((4, 28, 28, 3), np.float32))
    np.savez(tmp_path / "ref.npz", _images(4, (28, 28)))
    argv = ["eval", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
            "--features", "fmnist", "--classifier", str(tiny_classifier), "--no-progress"]
    assert main(argv) == 1
    assert "dtype float32, expected uint8" in capsys.readouterr().err


def _write_idx(path, array, magic):
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(
        struct.pack(">I", side) for side in array.shape[1:])
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion_mnist(folder, n_train=256, n_test=128):
    """Bright-top vs bright-bottom images (mirror-proof), labelled 0 / 1, as four idx files."""
    rng = np.random.default_rng(8)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 2, size=n)
        images = rng.integers(0, 60, size=(n, 28, 28))
        images[labels == 0, :14] += 180
        images[labels == 1, 14:] += 180
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels, 2049)
        data[split] = (images.astype(np.uint8), labels)
    return data


def test_train_classifier_command_on_tiny_idx_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the session's threads
    data = _write_fake_fashion_mnist(tmp_path)
    images, labels = data["t10k"]
    out = tmp_path / "clf.safetensors"
    argv = ["train-classifier", "--data-dir", str(tmp_path), "--epochs", "2", "--batch-size",
            "32", "--threads", "1", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    model = load_classifier(out)
    accuracy = classifier_accuracy(model, images, labels)
    assert accuracy > 0.9  # the halves are trivially separable
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_train_classifier_reports_missing_data(tmp_path, capsys):
    argv = ["train-classifier", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c.st")]
    assert main(argv) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (fashion_mnist.SYSTEM_FOLDER / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
@pytest.mark.parametrize("arch, floor", [("cnn", 0.91), ("mlp", 0.88)])
def test_bundled_classifiers_reach_their_recorded_test_accuracy(arch, floor):
    from ccalign.eval.classifier import classifier_metadata

    images, labels = fashion_mnist.load("test", fashion_mnist.SYSTEM_FOLDER)
    model = load_classifier(bundled_classifier_path(arch))
    assert model.config.arch == arch
    accuracy = classifier_accuracy(model, images, labels)
    assert accuracy >= floor
    recorded = float(classifier_metadata(bundled_classifier_path(arch))["test_accuracy"])
    assert accuracy == pytest.approx(recorded, abs=3e-4)  # 3 of 10,000 may flip on other CPUs


@pytest.mark.slow
@pytest.mark.skipif(not (fashion_mnist.SYSTEM_FOLDER / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
def test_the_two_bundled_classifiers_err_apart():
    """Independent judges: on the test images they get wrong, they mostly differ."""
    images, labels = fashion_mnist.load("test", fashion_mnist.SYSTEM_FOLDER)
    x = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1.0
    with torch.no_grad():
        cnn, mlp = (load_classifier(bundled_classifier_path(a))(x).argmax(1).numpy()
                    for a in ("cnn", "mlp"))
    both_wrong = np.mean((cnn != labels) & (mlp != labels))
    assert both_wrong < 0.6 * np.mean(mlp != labels)  # not the same mistakes
