"""The metrics as OpenAI's ADM evaluator reports them, with their bootstrap spread.

ADM's ``evaluator.py`` (the one LlamaGen, VAR, CCA, DDO and GFT all report with) computes FID
against the reference batch's stored statistics, the Inception Score over consecutive splits of
5000 samples in the file's order, and k = 3 precision/recall between all the samples and the
reference's own images (10,000 in VIRTUAL_imagenet256_labeled.npz). The official VAR samplers
shuffle their class-ordered samples before saving, so the splits mix classes; here the samples
are taken in one fixed random order for the same reason. The spread is the standard deviation
over bootstrap resamples: of the samples for FID, IS and precision (FID and IS recomputed, the
reference statistics held fixed; precision as the mean of its per-sample mask), of the reference
points for recall (the mean of its per-reference mask, the samples' manifold held fixed).
ADM's Inception Score softmaxes the pool features times the classifier's weights without its
bias; an Inception file whose logits carry the bias gives a slightly different IS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ccalign.eval.metrics import (
    as_float64,
    feature_statistics,
    frechet_distance,
    precision_recall,
)

#: ADM's Inception Score split: consecutive chunks of this many samples (the last may be short)
IS_SPLIT_SIZE = 5000
#: precision/recall neighbourhood of ADM's evaluator
ADM_K = 3
METRICS = ("fid", "is", "precision", "recall")


@dataclass
class AdmReport:
    """Measured metrics, their bootstrap standard deviations, and what they were computed on."""

    measured: dict[str, float | None]
    spread: dict[str, float | None]
    num_samples: int
    num_reference_images: int
    rounds: int


def adm_inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """IS as ADM computes it: mean over consecutive ``split_size`` chunks of exp(E KL)."""
    probs = _softmax(as_float64(logits, "logits", 2))
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def adm_metrics(
    features: np.ndarray,
    logits: np.ndarray | None,
    reference_mu: np.ndarray,
    reference_sigma: np.ndarray,
    reference_features: np.ndarray | None,
    *,
    rounds: int = 20,
    seed: int = 0,
    device=None,
) -> AdmReport:
    """FID, IS, precision and recall of sample ``features`` (N, D) (``logits`` (N, C) for IS),
    against the reference statistics and (for precision/recall) its images' features; with the
    standard deviation over ``rounds`` bootstrap resamples (0: none)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(features))
    features = as_float64(features, "features", 2)[order]
    logits = None if logits is None else as_float64(logits, "logits", 2)[order]
    measured: dict[str, float | None] = {
        "fid": frechet_distance(*feature_statistics(features), reference_mu, reference_sigma),
        "is": None if logits is None else adm_inception_score(logits),
        "precision": None, "recall": None,
    }
    masks = None
    if reference_features is not None:
        masks = precision_recall(reference_features, features, k=ADM_K, device=device,
                                 masks=True)
        measured["precision"], measured["recall"] = (float(m.mean()) for m in masks)
    draws = {name: [] for name in METRICS}
    for _ in range(rounds):
        rows = rng.integers(0, len(features), len(features))
        stats = feature_statistics(features[rows])
        draws["fid"].append(frechet_distance(*stats, reference_mu, reference_sigma))
        if logits is not None:
            draws["is"].append(adm_inception_score(logits[rows]))
        if masks is not None:
            draws["precision"].append(masks[0][rows].mean())
            draws["recall"].append(masks[1][rng.integers(0, len(masks[1]), len(masks[1]))].mean())
    spread = {name: float(np.std(values, ddof=1)) if len(values) > 1 else None
              for name, values in draws.items()}
    return AdmReport(measured, spread, len(features),
                     0 if reference_features is None else len(reference_features), rounds)
