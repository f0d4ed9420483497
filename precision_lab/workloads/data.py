"""Data for the stress suites: scikit-learn's handwritten digits and synthetic look-alikes.

Both datasets have the same shape, 64 features (an 8 x 8 image) and 10 classes, so every
model runs on either. The digits (1,797 images bundled with scikit-learn, no download)
are split once, with a fixed seed, into 1,437 training and 360 test images; features are
standardized with the training set's mean and standard deviation. Synthetic data has a
controlled input covariance: its condition number is ``10 ** (2 * decades)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import Tensor

from precision_lab.workloads.models import NUM_CLASSES, NUM_FEATURES

SPLIT_SEED = 0
TEST_SIZE = 360


@dataclass(frozen=True)
class Dataset:
    """Features ``(n, 64)`` float32 and labels ``(n,)`` int64, for training and testing.

    Attributes:
        name: ``digits`` or ``synthetic``.
        real: Whether the test accuracy measures learning on real data (the summary's
            ``accuracy`` is null for synthetic data).
    """

    name: str
    real: bool
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def map_features(self, fn) -> Dataset:
        """The same dataset with ``fn`` applied to the training and test features."""
        return replace(self, train_x=fn(self.train_x), test_x=fn(self.test_x))

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless minibatches of the training set, reshuffled each epoch from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        n = len(self.train_y)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                yield self.train_x[idx], self.train_y[idx]


@cache
def digits() -> Dataset:
    """The scikit-learn digits, split 1,437 / 360 (stratified, seed 0), standardized."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels
    )
    x_train, x_test = (torch.as_tensor(x, dtype=torch.float32) for x in (x_train, x_test))
    mean = x_train.mean(dim=0)
    # Border pixels are always 0: a unit std keeps them at 0 instead of dividing by zero.
    std = x_train.std(dim=0)
    std = torch.where(std > 0, std, torch.ones(()))
    return Dataset(
        name="digits",
        real=True,
        train_x=(x_train - mean) / std,
        train_y=torch.as_tensor(y_train, dtype=torch.int64),
        test_x=(x_test - mean) / std,
        test_y=torch.as_tensor(y_test, dtype=torch.int64),
    )


@cache
def synthetic(decades: float = 4.0, n_train: int = 1_440, n_test: int = 360) -> Dataset:
    """Gaussian features whose scales span ``decades`` decades, labels from a linear teacher.

    Feature ``j`` is ``z_j * 10 ** s_j`` with ``z ~ N(0, 1)`` and ``s_j`` evenly spaced in
    ``[-decades / 2, decades / 2]``, so the input covariance is diagonal with condition
    number ``10 ** (2 * decades)``. The label is ``argmax(z W)`` for a fixed Gaussian
    ``W``: every feature matters equally to the target whatever its scale, so an optimizer
    must undo the conditioning to learn. Fixed seed: the same data for every run.
    """
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    z = torch.randn(n_train + n_test, NUM_FEATURES, generator=generator)
    teacher = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
    labels = (z @ teacher).argmax(dim=1)
    scales = 10.0 ** torch.linspace(-decades / 2, decades / 2, NUM_FEATURES)
    x = z * scales
    return Dataset(
        name="synthetic",
        real=False,
        train_x=x[:n_train],
        train_y=labels[:n_train],
        test_x=x[n_train:],
        test_y=labels[n_train:],
    )
