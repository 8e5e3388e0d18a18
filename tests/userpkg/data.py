"""Three Gaussian blobs in 8 dimensions: tiny, deterministic, learnable in a few epochs."""

import numpy as np

from jaxlight import ArrayDataset


def blobs(n_train: int = 192, n_val: int = 64, n_test: int = 64, in_features: int = 8, num_classes: int = 3,
          seed: int = 0) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset | None]:
    """``(train, val, test)`` of ``{"features": (N, in_features) float32, "label": (N,) int32}``.

    Args:
        n_train: training examples.
        n_val: validation examples (0: no validation set).
        n_test: test examples (0: no test set).
        in_features: features per example.
        num_classes: blobs, one per class.
        seed: draws the centres and the points.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, in_features)) * 1.5

    def make(n):
        if n == 0:
            return None
        y = rng.integers(0, num_classes, n)
        x = centres[y] + rng.normal(size=(n, in_features))
        return ArrayDataset({"features": x.astype(np.float32), "label": y.astype(np.int32)})

    return make(n_train), make(n_val), make(n_test)


def arrays(n: int = 64):
    """Returns bare arrays ``(x, y)``, not datasets: refused, naming the fix."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)
