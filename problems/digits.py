"""The digits data set and the helpers of label-noise experiments.

The data are scikit-learn's bundled copy of the UCI optical-digits test set: 1797 grey-level
8x8 images (64 features with values 0..16) of the digits 0-9. They ship inside the scikit-learn
wheel, so nothing is downloaded.

Every random choice here is a numpy ``Generator(PCG64(seed))`` draw, so the same seed gives the
same splits and the same corrupted labels on every machine.
"""
from __future__ import annotations

import importlib
from typing import Sequence, Tuple

import numpy as np

N_SAMPLES, N_FEATURES, N_CLASSES = 1797, 64, 10


def _rng(seed) -> np.random.Generator:
    """A PCG64 generator; ``seed`` is an int or a sequence of ints (numpy's SeedSequence entropy)."""
    return np.random.Generator(np.random.PCG64(seed))


def load_sklearn_bundled(loader: str, label: str) -> Tuple[np.ndarray, np.ndarray]:
    """Features (float64) and labels (int64) of a data set bundled inside scikit-learn's wheel,
    read by ``sklearn.datasets.<loader>`` (no download)."""
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError as exc:
        raise ImportError(
            f"the {label} data set ships with scikit-learn (sklearn.datasets.{loader}, no "
            "download); install it with `pip install scikit-learn`"
        ) from exc
    data = getattr(datasets, loader)()
    return np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """Features, float64 of shape (1797, 64), and labels, int64 of shape (1797,)."""
    return load_sklearn_bundled("load_digits", "digits")


def split_indices(n: int, sizes: Sequence[int], seed) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three disjoint index arrays of sizes ``(n_train, n_val, n_test)`` drawn from range(n).

    They are consecutive slices of one seeded permutation of range(n); samples left over when
    the sizes sum to less than n are unused.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 3 or any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be three non-negative ints (n_train, n_val, n_test), got {sizes}")
    if sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} sum to {sum(sizes)}, more than the {n} samples available")
    permutation = _rng(seed).permutation(n)
    ends = np.cumsum(sizes)
    return permutation[:ends[0]], permutation[ends[0]:ends[1]], permutation[ends[1]:ends[2]]


def corrupt_labels(labels: np.ndarray, noise_rate: float, n_classes: int, seed) -> Tuple[np.ndarray, np.ndarray]:
    """Relabel a fixed random subset of exactly ``round(noise_rate * n)`` samples.

    Each chosen label y becomes ``(y + r) mod n_classes`` with r uniform in {1, ..., n_classes-1},
    i.e. a uniformly chosen *different* class. Returns ``(noisy_labels, corrupted_mask)``; the
    input is not modified.
    """
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1), got {noise_rate}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    n_corrupted = int(round(noise_rate * n))
    rng = _rng(seed)
    chosen = rng.choice(n, size=n_corrupted, replace=False)
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + rng.integers(1, n_classes, size=n_corrupted)) % n_classes
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return noisy, mask


def standardize(train: np.ndarray, *others: np.ndarray, floor: float = 1e-8) -> Tuple[np.ndarray, ...]:
    """(a - mean) / std for ``train`` and each of ``others``, with mean and std of ``train`` only.

    A pixel whose train std is below ``floor`` (constant on the train split) is only centred
    (divided by 1, as scikit-learn's StandardScaler does): dividing by the floor itself would turn
    the rare non-constant values of that pixel in the other splits into features of size 1e8.
    """
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std < floor, 1.0, std)
    return tuple((a - mean) / std for a in (train, *others))
