"""The small Fashion-MNIST classifiers whose penultimate features and logits give domain metrics.

The CNN's 128-d features replace Inception's for a domain FID, its logits give an Inception Score
analogue and the conditional accuracy of class-conditional samples. A pixel MLP, trained apart
with another seed, gives a second accuracy, so that no claim hangs on one classifier. Stored as
safetensors with the architecture in the metadata; both trained networks ship in
``ccalign/assets``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ccalign.io import atomic_save_safetensors

FORMAT_NAME = "ccalign-fmnist-classifier"
#: the bundled classifiers by architecture: the CNN (features and accuracy), the MLP (accuracy)
BUNDLED = {"cnn": "fmnist_classifier.safetensors", "mlp": "fmnist_mlp_classifier.safetensors"}
ARCHITECTURES = tuple(BUNDLED)


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture: "cnn" (two conv stages of widths ``channels``) or "mlp" (a hidden layer of
    ``hidden`` units on the pixels), then the ReLU feature layer and the head."""

    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128
    num_classes: int = 10
    image_size: int = 28
    dropout: float = 0.3
    arch: str = "cnn"
    hidden: int = 256


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, 2x2 max-pool."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _mlp_stage(pixels: int, hidden: int) -> nn.Sequential:
    """Flatten, linear, ReLU: the MLP's hidden layer on the raw pixels."""
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(inplace=True))


class FashionClassifier(nn.Module):
    """A classifier of grey images scaled to [-1, 1]: conv stages (or the MLP's hidden layer) ->
    ReLU feature layer -> class logits."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        if self.config.arch not in ARCHITECTURES:
            raise ValueError(f"classifier arch {self.config.arch!r}: one of {ARCHITECTURES}")
        if self.config.arch == "mlp":
            self.stages = _mlp_stage(self.config.image_size**2, self.config.hidden)
            width = self.config.hidden
        else:
            width1, width2 = self.config.channels
            self.stages = nn.Sequential(_conv_stage(1, width1), _conv_stage(width1, width2))
            width = width2 * (self.config.image_size // 4) ** 2
        self.feature_layer = nn.Linear(width, self.config.feature_dim)
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, S, S) in [-1, 1] -> penultimate features (N, feature_dim), logits (N, classes)."""
        features = F.relu(self.feature_layer(self.stages(x).flatten(1)))
        return features, self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.features_and_logits(x)[1]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> (N, 1, S, S) in [-1, 1]: channel mean, area-down / bilinear-up."""
        x = images.permute(0, 3, 1, 2).float().mean(dim=1, keepdim=True)
        size = self.config.image_size
        if x.shape[-2] > size or x.shape[-1] > size:
            x = F.adaptive_avg_pool2d(x, size)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x / 127.5 - 1.0


def save_classifier(
    model: FashionClassifier, path: str | Path, extra: dict[str, str] | None = None
) -> Path:
    """Write the weights and architecture (plus ``extra`` notes) as safetensors, atomically."""
    metadata = {"format": FORMAT_NAME, "config": json.dumps(asdict(model.config))}
    metadata.update(extra or {})
    return atomic_save_safetensors(model.state_dict(), path, metadata=metadata)


def bundled_classifier_path(arch: str = "cnn") -> Path:
    """Where the trained classifier of ``arch`` shipped with ccalign lives."""
    return Path(str(resources.files("ccalign") / "assets" / BUNDLED[arch]))


def classifier_metadata(path: str | Path) -> dict[str, str]:
    """The metadata strings stored with a classifier file (format, config, accuracy, ...)."""
    from ccalign.io import open_safetensors

    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


def load_classifier(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> FashionClassifier:
    """Load a classifier file (default: the bundled one) in eval mode on ``device``."""
    from ccalign.io import read_safetensors

    path = Path(path) if path is not None else bundled_classifier_path()
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}; train them with "
                                "`ccalign train-classifier --out PATH` and pass that path")
    metadata = classifier_metadata(path)
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a ccalign Fashion-MNIST classifier (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    config = json.loads(metadata["config"])
    config["channels"] = tuple(config["channels"])
    model = FashionClassifier(ClassifierConfig(**config))
    model.load_state_dict(read_safetensors(path))
    return model.to(device).eval()
