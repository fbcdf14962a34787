"""What a demo bundle's model is asked to draw and how its pictures are judged.

A task turns the pipeline's generic stages into one bundle's specifics: the training data it
fine-tunes on, the prompts every setting samples (class labels, or captions), their model
conditions batch by batch, the tokens' pictures, and the scores of those pictures against the
test images under both bundled classifiers. The class-conditional bundles (LlamaGen, VAR) share
:class:`ClassTask`; the text-to-image bundle has :class:`~ccalign.demo.scene_task.SceneTask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ccalign.data import fashion_mnist
from ccalign.data.codes import write_flat_codes
from ccalign.data.images import to_uint8
from ccalign.demo import report
from ccalign.eval import (
    bundled_classifier_path,
    conditional_accuracy,
    feature_statistics,
    fid_from_features,
    inception_score,
    load_classifier_extractor,
    manifold_radii,
    precision_recall,
)
from ccalign.tokenizers import load as load_tokenizer

if TYPE_CHECKING:
    from ccalign.demo.settings import DemoSettings

Prompts = Any  # what every setting of a run samples for; its type is the task's business


class DemoTask(Protocol):
    """The bundle-specific stages of a demo run."""

    #: how the report describes the prompts ("balanced over the 10 classes")
    prompt_words: str
    #: what ``accuracy`` measures ("conditional accuracy")
    accuracy_words: str

    def tokenizer(self, name: str):
        """The bundle's image tokenizer from its alias."""

    def training_data(self, tokenizer, settings: DemoSettings, out: Path) -> dict[str, str]:
        """Write (once) what the methods fine-tune on; returns the config's data keys."""

    def prompts(self, count: int, settings: DemoSettings) -> Prompts:
        """The ``count`` prompts every setting samples, in order."""

    def conditions(self, prompts: Prompts, start: int, stop: int):
        """The model conditions of prompts ``start:stop`` (a sampler's input)."""

    def decode(self, tokenizer, tokens: torch.Tensor) -> np.ndarray:
        """uint8 pictures of sampled tokens."""

    def scorer(self, settings: DemoSettings) -> Scorer:
        """The classifiers and reference statistics of the run's split."""

    def grid(self, images: np.ndarray, prompts: Prompts, columns: int) -> np.ndarray:
        """One picture of samples laid out by prompt."""

    def reading(self, runs: list[dict], method: str) -> str:
        """What the report says beyond the generic reading (empty: nothing)."""


class Scorer(Protocol):
    def score(self, images: np.ndarray, prompts: Prompts, manifold_samples: int) -> dict:
        """The metrics of one setting's pictures."""


def classifiers() -> tuple:
    """The two bundled classifiers, trained apart: (the CNN, whose features measure FID, the
    pixel MLP)."""
    return (
        load_classifier_extractor(progress=False),
        load_classifier_extractor(bundled_classifier_path("mlp"), progress=False),
    )


def domain_metrics(features: np.ndarray, reference, reference_radii, manifold_samples: int,
                   logits: np.ndarray) -> dict:
    """FID (with its bootstrap spread), precision and recall of sample features against the
    reference's, and the IS analogue of the classifier's logits.

    Precision and recall use the first ``manifold_samples`` samples of every row (balanced, as
    the prompts cycle): recall's k-NN radii shrink as samples grow, so rows of different sizes
    are only comparable on the same count. FID uses every sample.
    """
    precision, recall = precision_recall(
        reference, features[:manifold_samples], k=3, real_radii=reference_radii
    )
    return {
        "fid": fid_from_features(reference, features),
        "fid_std": bootstrap_fid_std(reference, features),
        "precision": precision,
        "recall": recall,
        "inception_score": inception_score(logits, splits=1),
    }


def bootstrap_fid_std(reference: np.ndarray, samples: np.ndarray, rounds: int = 20) -> float:
    """Spread of FID over resamplings (with replacement) of the samples: its sampling noise.

    Uses tr sqrt(S_r S) = sum sqrt(eig(H^T S H)) with S_r = H H^T: a symmetric eigenproblem
    per round instead of a matrix square root, far faster; the reported FID stays the exact
    one, this only sizes its noise.
    """
    rng = np.random.default_rng(0)
    mu_r, sigma_r = feature_statistics(reference)
    w, v = np.linalg.eigh(sigma_r)
    half = v * np.sqrt(w.clip(min=0))
    fids = []
    for _ in range(rounds):
        mu, sigma = feature_statistics(samples[rng.integers(0, len(samples), len(samples))])
        eig = np.linalg.eigvalsh(half.T @ sigma @ half).clip(min=0)
        trace = np.trace(sigma_r) + np.trace(sigma) - 2 * np.sqrt(eig).sum()
        fids.append(float(np.sum((mu_r - mu) ** 2) + trace))
    return float(np.std(fids))


def balanced_labels(count: int) -> np.ndarray:
    return np.arange(count) % 10


class ClassTask:
    """Class-conditional Fashion-MNIST: balanced labels, one item per picture."""

    prompt_words = "balanced over the 10 classes"
    accuracy_words = "conditional accuracy"

    def tokenizer(self, name: str):
        return load_tokenizer(name).eval()

    def training_data(self, tokenizer, settings: DemoSettings, out: Path) -> dict[str, str]:
        """The first ``train_images`` training images, encoded once (later runs reuse them)."""
        path = out / f"codes_{settings.family}_train{settings.train_images}.safetensors"
        if not path.exists():
            images, labels = fashion_mnist.load("train")
            images, labels = images[: settings.train_images], labels[: settings.train_images]
            write_flat_codes(
                path,
                fashion_mnist.encode(tokenizer, images, progress=settings.progress,
                                     desc="encode train images").numpy(),
                labels,
                vocab_size=tokenizer.vocab_size,
                grid=tokenizer.grid,
                seq_len=getattr(tokenizer, "seq_len", None),  # multi-scale: every scale's codes
            )
        return {"path": str(path)}

    def prompts(self, count: int, settings: DemoSettings) -> np.ndarray:
        return balanced_labels(count)

    def conditions(self, prompts: np.ndarray, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(prompts[start:stop])

    def decode(self, tokenizer, tokens: torch.Tensor) -> np.ndarray:
        return decode_images(tokenizer, tokens)

    def scorer(self, settings: DemoSettings) -> ClassScorer:
        return ClassScorer(settings)

    def grid(self, images: np.ndarray, prompts: np.ndarray, columns: int) -> np.ndarray:
        return report.class_grid(images, prompts, per_row=columns)

    def reading(self, runs: list[dict], method: str) -> str:
        return ""


def decode_images(tokenizer, tokens: torch.Tensor, chunk: int = 2000) -> np.ndarray:
    """uint8 grey images (N, H, W) from tokens, decoded ``chunk`` at a time."""
    with torch.inference_mode():
        return to_uint8(torch.cat([tokenizer.decode(part) for part in tokens.split(chunk)]))


@dataclass
class ClassScorer:
    """Single items against the split's test images, through both classifiers."""

    settings: DemoSettings

    def __post_init__(self):
        self.cnn, self.mlp = classifiers()
        test_images, _ = fashion_mnist.load("test")
        self.reference = self.cnn.extract(test_images[self.settings.reference_slice]).features
        self.radii = manifold_radii(self.reference, k=3)  # once, not per setting

    def score(self, images: np.ndarray, labels: np.ndarray, manifold_samples: int) -> dict:
        return score(images, labels, self.reference, self.radii, self.cnn, manifold_samples,
                     self.mlp)


def score(images, labels, reference, reference_radii, extractor, manifold_samples: int,
          second=None) -> dict:
    """Domain metrics of uint8 items against the reference's classifier features, with the
    conditional accuracy under ``extractor`` (and under ``second`` as ``accuracy_mlp``)."""
    extracted = extractor.extract(images)
    metrics = domain_metrics(extracted.features, reference, reference_radii, manifold_samples,
                             extracted.logits)
    metrics["accuracy"] = conditional_accuracy(extracted.logits, labels)
    if second is not None:
        metrics["accuracy_mlp"] = conditional_accuracy(second.extract(images).logits, labels)
    return {**metrics, "num_samples": int(len(labels))}
