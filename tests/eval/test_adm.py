"""ADM's evaluator's conventions: the Inception Score over consecutive 5000-sample splits, the
metrics in a fixed random order, and the bootstrap spread."""

from __future__ import annotations

import numpy as np
import pytest

from ccalign.eval import feature_statistics, frechet_distance, precision_recall
from ccalign.eval.adm import adm_inception_score, adm_metrics


def split_score(logits: np.ndarray) -> float:
    """exp(E KL(p(y|x) || p(y))) of one split, in float64 from the formula."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1))))


def test_inception_score_splits_are_consecutive_5000s_the_last_one_short():
    logits = np.random.default_rng(0).normal(size=(12_000, 7)) * 3
    expected = np.mean([split_score(logits[:5000]), split_score(logits[5000:10_000]),
                        split_score(logits[10_000:])])
    assert adm_inception_score(logits) == pytest.approx(expected, rel=1e-12)
    assert adm_inception_score(logits[:300]) == pytest.approx(split_score(logits[:300]),
                                                              rel=1e-12)


def test_metrics_equal_the_plain_ones_and_the_spread_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 5))
    mu, sigma = feature_statistics(rng.normal(size=(2000, 5)))
    small = rng.normal(0.3, 1.0, size=(200, 5))
    large = rng.normal(0.3, 1.0, size=(3200, 5))
    report = adm_metrics(small, small[:, :4] * 2, mu, sigma, real, rounds=30, seed=3)
    assert report.measured["fid"] == pytest.approx(
        frechet_distance(*feature_statistics(small), mu, sigma), rel=1e-9)
    assert report.measured["is"] == pytest.approx(split_score(small[:, :4] * 2), rel=1e-9)
    assert (report.measured["precision"], report.measured["recall"]) == pytest.approx(
        precision_recall(real, small, k=3))
    wide = adm_metrics(large, None, mu, sigma, None, rounds=30, seed=3)
    assert wide.measured["is"] is None and wide.measured["precision"] is None
    assert 0 < wide.spread["fid"] < report.spread["fid"]  # ~1/sqrt(N): 16x the samples
    assert adm_metrics(small, None, mu, sigma, None, rounds=0).spread["fid"] is None
