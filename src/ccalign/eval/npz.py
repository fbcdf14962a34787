"""Readers for the OpenAI (ADM) evaluator's ``.npz`` layouts: sample batches and reference batches.

Samples: ``arr_0`` uint8 images (N, H, W, 3) (grey (N, H, W) or (N, H, W, 1) accepted) and
optional integer class labels (N,): ``labels`` (as ``ccalign sample`` writes them) or ``arr_1``
(``np.savez(path, images, labels)``); when both are stored they must agree. Reference batches:
``arr_0`` images and/or precomputed feature statistics ``mu`` (D,) and ``sigma`` (D, D); the
spatial statistics ``mu_s`` / ``sigma_s`` that ADM also stores are not used.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccalign.eval.images import uint8_nhwc_layout


@dataclass
class SampleBatch:
    """Generated images (N, H, W, C) uint8 and, when stored, the labels they were drawn for."""

    images: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class ReferenceBatch:
    """Reference images (N, H, W, C) uint8 and/or their feature mean (D,) and covariance (D, D)."""

    images: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None


def load_samples(path: str | Path) -> SampleBatch:
    """Read a samples ``.npz`` (``arr_0`` images, optional ``labels`` or ``arr_1`` labels)."""
    arrays, stored = _read_npz(path, ("arr_0", "labels", "arr_1"))
    if "arr_0" not in arrays:
        raise ValueError(f"{path}: no 'arr_0' array (found {stored}); a samples file "
                         "stores its images as arr_0, e.g. np.savez(path, images, labels)")
    images = uint8_nhwc_layout(arrays["arr_0"], f"{path} arr_0")
    found = {key: _check_labels(arrays[key], images.shape[0], f"{path} {key}")
             for key in ("labels", "arr_1") if key in arrays}
    if len(found) == 2 and not np.array_equal(found["labels"], found["arr_1"]):
        raise ValueError(f"{path}: 'labels' and 'arr_1' both hold labels but they differ; keep "
                         "the right one (or store them under one key)")
    return SampleBatch(images=images, labels=next(iter(found.values()), None))


def load_reference(path: str | Path) -> ReferenceBatch:
    """Read a reference ``.npz`` (``arr_0`` images and/or ``mu`` + ``sigma`` statistics)."""
    arrays, stored = _read_npz(path, ("arr_0", "mu", "sigma"))
    images = arrays.get("arr_0")
    if images is not None:
        images = uint8_nhwc_layout(images, f"{path} arr_0")
    has_mu, has_sigma = "mu" in arrays, "sigma" in arrays
    if has_mu != has_sigma:
        raise ValueError(f"{path}: has {'mu' if has_mu else 'sigma'} without "
                         f"{'sigma' if has_mu else 'mu'}; reference statistics need both")
    if images is None and not has_mu:
        raise ValueError(f"{path}: neither reference images 'arr_0' nor statistics 'mu'/'sigma' "
                         f"(found {stored})")
    mu, sigma = (_check_statistics(arrays["mu"], arrays["sigma"], path) if has_mu
                 else (None, None))
    return ReferenceBatch(images=images, mu=mu, sigma=sigma)


def check_reference_statistics(path: str | Path) -> None:
    """A reference ``.npz`` holds valid ``mu`` and ``sigma`` (read without its images: a check
    before hours of sampling)."""
    arrays, stored = _read_npz(path, ("mu", "sigma"))
    if len(arrays) < 2:
        raise ValueError(f"{path} holds no mu/sigma statistics (found {stored}); an ADM "
                         "reference batch (VIRTUAL_imagenet256_labeled.npz) stores them")
    _check_statistics(arrays["mu"], arrays["sigma"], path)


def _read_npz(
    path: str | Path, names: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Those of the arrays ``names`` that an ``.npz`` holds (others stay unread), all its names.

    Missing files and files that are not ``.npz`` archives get a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: is a single .npy array, expected an .npz archive of named "
                         "arrays (np.savez)")
    with loaded as npz:
        return {name: npz[name] for name in names if name in npz.files}, sorted(npz.files)


def _check_labels(labels: np.ndarray, count: int, what: str) -> np.ndarray:
    """Labels must be (count,) integers >= 0."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: labels have dtype {labels.dtype}, expected integers")
    if labels.shape != (count,):
        raise ValueError(f"{what}: labels have shape {labels.shape}, expected ({count},) "
                         "(one per image)")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what}: labels contain negative class {labels.min()}")
    return labels.astype(np.int64)


def _check_statistics(
    mu: np.ndarray, sigma: np.ndarray, path: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and sigma (D, D), floating point and finite, returned as float64."""
    for name, value in (("mu", mu), ("sigma", sigma)):
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{path}: {name} has dtype {value.dtype}, expected floating point")
        if not np.isfinite(value).all():
            raise ValueError(f"{path}: {name} contains NaN or infinite values")
    if mu.ndim != 1:
        raise ValueError(f"{path}: mu has shape {mu.shape}, expected a vector (D,)")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: sigma has shape {sigma.shape}, expected "
                         f"({mu.shape[0]}, {mu.shape[0]}) to match mu {mu.shape}")
    return mu.astype(np.float64), sigma.astype(np.float64)
