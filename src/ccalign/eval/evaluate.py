"""One call for all metrics of a sample set against a reference set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ccalign.eval.extractors import FeatureExtractor
from ccalign.eval.metrics import (
    check_neighbourhood,
    conditional_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from ccalign.eval.npz import ReferenceBatch, SampleBatch, load_reference, load_samples

Images = np.ndarray | torch.Tensor


def evaluate(
    samples: Images | SampleBatch,
    reference: Images | ReferenceBatch,
    extractor: FeatureExtractor,
    labels: np.ndarray | torch.Tensor | None = None,
    k: int = 3,
    is_splits: int = 10,
) -> dict[str, float | int | str | None]:
    """FID, IS, precision, recall and conditional accuracy of ``samples`` against ``reference``.

    FID uses the reference's stored ``mu``/``sigma`` when it has them (ADM semantics: they may
    summarise more images than it stores), else the statistics of its images. Metrics that the
    inputs cannot give are None: IS and accuracy need a network with logits (accuracy also the
    labels), precision/recall need reference images.
    """
    if isinstance(samples, SampleBatch):
        labels = samples.labels if labels is None else labels
        samples = samples.images
    if not isinstance(reference, ReferenceBatch):
        reference = ReferenceBatch(images=reference)
    _check_k(k, samples, reference)
    _check_same_size(samples, reference)
    fake = extractor.extract(samples)
    real = extractor(reference.images) if reference.images is not None else None
    mu, sigma = _reference_statistics(reference, real, fake.features.shape[1], extractor.name)
    precision, recall = (
        precision_recall(real, fake.features, k=k, device=extractor.device)
        if real is not None else (None, None)
    )
    has_logits = fake.logits is not None
    return {
        "features": extractor.name,
        "num_samples": int(fake.features.shape[0]),
        "num_reference_images": 0 if real is None else int(real.shape[0]),
        "fid": frechet_distance(*feature_statistics(fake.features), mu, sigma),
        "is": inception_score(fake.logits, is_splits) if has_logits else None,
        "precision": precision,
        "recall": recall,
        "accuracy": (conditional_accuracy(fake.logits, labels)
                     if has_logits and labels is not None else None),
    }


def _check_k(k: int, samples: Images, reference: ReferenceBatch) -> None:
    """Reject an unusable precision/recall k before any feature network runs (the set sizes
    only matter when there are reference images to compute precision/recall with)."""
    sizes = {} if reference.images is None else {
        "the samples": len(samples), "the reference images": len(reference.images)}
    check_neighbourhood(k, sizes)


def _check_same_size(samples: Images, reference: ReferenceBatch) -> None:
    """The metrics compare two sets at one resolution: the feature network resizes either to
    its input, which would hide a mismatch (and bias FID)."""
    if reference.images is None:
        return
    got, want = tuple(samples.shape[1:]), tuple(reference.images.shape[1:])
    if got != want:
        raise ValueError(
            f"the samples are {got[0]}x{got[1]}x{got[2]} but the reference images are "
            f"{want[0]}x{want[1]}x{want[2]}: compare sets of one size (e.g. ccalign sample "
            "--resize 256 for ImageNet 256 references)"
        )


def _reference_statistics(
    reference: ReferenceBatch, real: np.ndarray | None, dim: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stored reference statistics (checked against the feature size), else computed ones."""
    if reference.mu is None:
        return feature_statistics(real)
    if reference.mu.shape[0] != dim:
        raise ValueError(
            f"the reference statistics are {reference.mu.shape[0]}-d but the {name} features are "
            f"{dim}-d: they come from another feature network; use a reference with images "
            "only, or the feature network the statistics were made with"
        )
    return reference.mu, reference.sigma


def evaluate_files(
    samples_path: str | Path,
    reference_path: str | Path,
    extractor: FeatureExtractor,
    k: int = 3,
    is_splits: int = 10,
) -> dict[str, float | int | str | None]:
    """:func:`evaluate` on a samples ``.npz`` and a reference ``.npz`` in the ADM layouts."""
    return evaluate(load_samples(samples_path), load_reference(reference_path), extractor,
                    k=k, is_splits=is_splits)
