"""Seeded training of the Fashion-MNIST evaluation classifier (`ccalign train-classifier`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ccalign.data import fashion_mnist
from ccalign.eval.classifier import ClassifierConfig, FashionClassifier


@dataclass
class TrainingReport:
    """What a training run produced: the network, its test accuracy and the time it took."""

    model: FashionClassifier
    test_accuracy: float
    seconds: float
    epochs: int


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1], the classifier's input scale."""
    return torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1.0


def _random_flips(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (garments keep their class when mirrored)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def classifier_accuracy(
    model: FashionClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` on uint8 (N, 28, 28) images."""
    model.eval()
    device = next(model.parameters()).device
    x, y = _to_input(images), torch.from_numpy(labels)
    correct = sum(
        int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    return correct / len(labels)


def train_classifier(
    data_dir: Path | None = None,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    arch: str = "cnn",
) -> TrainingReport:
    """Train a fresh classifier of ``arch`` on the 60k training images (AdamW, one-cycle lr,
    flips).

    ``data_dir`` holds the idx files (default: see :func:`ccalign.data.fashion_mnist.find_folder`).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = fashion_mnist.load("train", data_dir)
    test_images, test_labels = fashion_mnist.load("test", data_dir)
    model = FashionClassifier(ClassifierConfig(arch=arch)).to(device)
    x, y = _to_input(train_images), torch.from_numpy(train_labels)
    steps_per_epoch = -(-len(y) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        desc = f"epoch {epoch + 1}/{epochs}"
        bar = tqdm(order.split(batch_size), desc=desc, disable=not progress)
        for idx in bar:
            inputs = _random_flips(x[idx], generator).to(device)
            loss = F.cross_entropy(model(inputs), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(model, test_images, test_labels)
    return TrainingReport(model.eval(), test_accuracy=accuracy, seconds=seconds, epochs=epochs)
