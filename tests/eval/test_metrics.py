"""Metrics against closed forms, independent float64 transcriptions and brute force."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ccalign.eval.metrics import (
    conditional_accuracy,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def _fid_approx(expected: float, s1, s2, precision: float):
    """pytest.approx for a FID: round-off (BLAS order, thread count, CPU) scales with the
    covariance traces, the terms that cancel, not with the FID, which may be ~0."""
    return pytest.approx(expected, abs=precision * (np.trace(s1) + np.trace(s2)))


def _fid_by_eigh(mu1, s1, mu2, s2) -> float:
    """Reference FID: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all symmetric eigh."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_equals_closed_form_for_commuting_gaussians():
    rng = np.random.default_rng(0)
    dim = 6
    a, b = rng.uniform(0.2, 3.0, dim), rng.uniform(0.2, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    rot = _random_rotation(dim, rng)
    s1, s2 = rot @ np.diag(a) @ rot.T, rot @ np.diag(b) @ rot.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == _fid_approx(expected, s1, s2, 1e-10)


def test_frechet_distance_of_scalar_gaussians_and_identical_ones():
    # N(1, 4) vs N(3, 9): (1-3)^2 + 4 + 9 - 2*6 = 5
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, abs=1e-12)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4))
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) == _fid_approx(0.0, sigma, sigma, 1e-10)


def test_fid_from_features_matches_float64_reference_on_random_features():
    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(16, 16))
    a = rng.normal(size=(300, 16)) @ mixing
    b = (rng.normal(size=(200, 16)) + 0.3) @ (mixing + 0.2 * rng.normal(size=(16, 16)))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = (a - mu1).T @ (a - mu1) / (len(a) - 1)
    s2 = (b - mu2).T @ (b - mu2) / (len(b) - 1)
    expected = _fid_by_eigh(mu1, s1, mu2, s2)
    got = fid_from_features(a.astype(np.float32), torch.from_numpy(b))
    assert got == _fid_approx(expected, s1, s2, 1e-6)  # a was rounded to float32
    assert fid_from_features(a, b) == _fid_approx(expected, s1, s2, 1e-10)


def test_frechet_distance_adds_eps_when_the_square_root_fails(monkeypatch):
    rng = np.random.default_rng(3)
    mu1, s1 = feature_statistics(rng.normal(size=(40, 6)))
    mu2, s2 = feature_statistics(rng.normal(size=(30, 6)) + 1.0)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    with pytest.warns(UserWarning, match="singular"):
        got = frechet_distance(mu1, s1, mu2, s2, eps=1e-2)
    eye = np.eye(6) * 1e-2
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye), rtol=1e-12, atol=1e-12)
    expected = _fid_by_eigh(mu1, s1 + eye, mu2, s2 + eye) - 2 * 6 * 1e-2  # traces unregularised
    assert got == _fid_approx(expected, s1, s2, 1e-10)


def test_frechet_distance_ignores_dimensions_constant_in_both_sets(recwarn):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(80, 5)), rng.normal(size=(70, 5)) * 1.3
    pad = np.zeros((1, 3))  # three dead units, e.g. ReLU features that never fire
    with_dead = fid_from_features(np.hstack([a, pad.repeat(80, 0)]),
                                  np.hstack([b, pad.repeat(70, 0) + 2.0]))
    expected = fid_from_features(a, b) + 3 * 2.0**2  # the means still differ there
    assert with_dead == _fid_approx(expected, np.cov(a.T), np.cov(b.T), 1e-10)
    assert not recwarn.list  # no singular-matrix warning


def test_frechet_distance_rejects_mismatched_or_bad_statistics():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="sigma2 has shape"):
        frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="mu2 has shape"):
        frechet_distance(mu, sigma, np.zeros(2), sigma)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, np.array([0, np.nan, 0]), sigma)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))


def _hand_inception_score(logits: list[list[float]]) -> float:
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    n, c = len(probs), len(probs[0])
    marginal = [sum(p[j] for p in probs) / n for j in range(c)]
    kl = [sum(p[j] * math.log(p[j] / marginal[j]) for j in range(c)) for p in probs]
    return math.exp(sum(kl) / n)


def test_inception_score_equals_hand_computation():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [-1.0, 0.0, 3.0], [0.0, 0.0, 0.0],
              [1.0, -2.0, 0.5], [0.3, 0.2, 0.1]]
    assert inception_score(np.array(logits), splits=1) == pytest.approx(
        _hand_inception_score(logits), rel=1e-12)
    halves = (_hand_inception_score(logits[:3]) + _hand_inception_score(logits[3:])) / 2
    as_tensor = torch.tensor(logits, dtype=torch.float64)
    assert inception_score(as_tensor, splits=2) == pytest.approx(halves, rel=1e-12)


def test_inception_score_limits():
    assert inception_score(np.zeros((8, 5)), splits=2) == pytest.approx(1.0, abs=1e-12)
    confident = np.eye(4).repeat(2, axis=0) * 60.0  # each class twice, certain
    assert inception_score(confident, splits=1) == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((3, 5)), splits=4)


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int):
    def radii(points):
        return [sorted(np.linalg.norm(points - p, axis=1))[k] for p in points]

    def coverage(points, centres, centre_radii):
        pairs = list(zip(centres, centre_radii, strict=True))
        inside = [any(np.linalg.norm(p - c) <= r for c, r in pairs) for p in points]
        return sum(inside) / len(points)

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("block_size", [7, 1024])
def test_precision_recall_equals_brute_force(block_size):
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(size=(45, 5)) * 1.4 + 0.5
    expected = _brute_force_precision_recall(real, fake, k=3)
    got = precision_recall(real, fake, k=3, device="cpu", block_size=block_size)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0
    cached = precision_recall(real, fake, k=3, device="cpu", real_radii=manifold_radii(real, 3))
    assert cached == got
    with pytest.raises(ValueError, match="real_radii has shape"):
        precision_recall(real, fake, real_radii=manifold_radii(fake, 3), device="cpu")


def test_precision_recall_exact_small_case():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radius 1 everywhere
    fake = np.array([[0.5], [0.8], [10.0], [10.5]])  # k=1 radii 0.3, 0.3, 0.5, 0.5
    precision, recall = precision_recall(real, fake, k=1, device="cpu")
    assert precision == pytest.approx(0.5)  # 0.5 and 0.8 lie within 1 of a real point
    assert recall == pytest.approx(0.25)  # only real 1 lies within 0.3 of a fake (0.8)


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="feature sizes differ"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)), device="cpu")
    with pytest.raises(ValueError, match="k=3 needs more than 3 points in fake_features, got 3"):
        precision_recall(np.zeros((10, 3)), np.zeros((3, 3)), device="cpu")
    for k in (0, -1):  # k = 0 would make every radius 0: precision = recall = 0, silently
        with pytest.raises(ValueError, match=f"k must be >= 1 .*got {k}"):
            precision_recall(np.zeros((10, 3)), np.zeros((10, 3)), k=k, device="cpu")
        with pytest.raises(ValueError, match="k must be >= 1"):
            manifold_radii(np.zeros((10, 3)), k=k)


def test_conditional_accuracy():
    logits = np.array([[3.0, 1.0], [0.0, 2.0], [5.0, -1.0], [0.1, 0.2]])
    assert conditional_accuracy(logits, np.array([0, 1, 1, 0])) == pytest.approx(0.5)
    assert conditional_accuracy(torch.tensor(logits), torch.tensor([0, 1, 0, 1])) == 1.0
    with pytest.raises(ValueError, match="labels must have shape"):
        conditional_accuracy(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="integers"):
        conditional_accuracy(logits, np.zeros(4))


@pytest.mark.parametrize("labels", [[0, 1, 2, 0], [0, 1, -1, 0]])
def test_conditional_accuracy_rejects_labels_the_classifier_does_not_have(labels):
    logits = np.zeros((4, 2))  # two classes: a label 2 could never be predicted (accuracy 0)
    low, high = min(labels), max(labels)
    with pytest.raises(ValueError, match=rf"labels range from {low} to {high} but the classifier "
                                         r"has 2 classes \(0 to 1\)"):
        conditional_accuracy(logits, np.array(labels))
