"""A synthetic regression problem with known answers: ``y = x @ W + b + noise``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxlight.data.arrays import ArrayDataset

__all__ = ["RegressionData", "make_regression"]


@dataclass(frozen=True)
class RegressionData:
    """Train and test sets plus the true parameters that generated them.

    Attributes:
        train, test: ``x (N, D) float32``, ``y (N, 1) float32``.
        weight: ``(D, 1) float32``, the true ``W``.
        bias: ``(1,) float32``, the true ``b``.
    """

    train: ArrayDataset
    test: ArrayDataset
    weight: np.ndarray
    bias: np.ndarray


def make_regression(
    n_train: int = 8192,
    n_test: int = 2048,
    n_features: int = 8,
    noise: float = 0.1,
    seed: int = 0,
) -> RegressionData:
    """Draw ``x ~ N(0, 1)``, ``W ~ N(0, 1)``, ``b ~ U(-1, 1)``, noise ``~ N(0, noise^2)``.

    Seeded with ``numpy.random.default_rng(seed)``, so both frameworks train on the same numbers.

    Example:
        >>> data = make_regression(seed=0)
        >>> data.train.x.shape, data.weight.shape
        ((8192, 8), (8, 1))
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_features, 1)).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, size=(1,)).astype(np.float32)
    n = n_train + n_test
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    y = (x @ weight + bias + noise * rng.standard_normal((n, 1))).astype(np.float32)
    return RegressionData(
        train=ArrayDataset(x[:n_train], y[:n_train]),
        test=ArrayDataset(x[n_train:], y[n_train:]),
        weight=weight,
        bias=bias,
    )
