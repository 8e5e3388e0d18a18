"""Shared by the parity tests: one jaxlight model per name for the whole session.

Building a jaxlight model initialises eagerly (one small compiled program per parameter shape:
seconds on a busy 2-core CPU), and the parity tests only read a model's structure and initial
weights, so each name is built once.
"""

import functools

import pytest
import torch

import jaxlight

# One torch thread: these tests are about numerics, and on a shared 2-core machine PyTorch's
# OpenMP threads spin against XLA's and each other (measured here under load: an MLP step took
# 130-500 ms with 2 threads, 22 ms with 1).
torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _built(name: str):
    return jaxlight.build_model(name, seed=1)


@pytest.fixture(scope="session")
def jax_model():
    """``jax_model(name)``: the jaxlight model ``name`` built with seed 1 (do not mutate it)."""
    return _built
