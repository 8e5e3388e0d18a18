"""Shared test setup: 8 fake CPU devices, the offline MNIST copy, CLI runners.

XLA_FLAGS must be set before jax is imported anywhere, which is why it is set here, at the top
of the first file pytest imports.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from _support import ROOT, run_module  # noqa: E402,F401  (re-exported for fixtures)


def _data_dir() -> Path:
    env = os.environ.get("JAXLIGHT_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline MNIST copy (torchvision layout). Tests never download."""
    path = _data_dir()
    if not (path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"MNIST not found at {path}; set JAXLIGHT_DATA to a folder holding MNIST/raw/")
    return path


@pytest.fixture(scope="session")
def mnist(data_dir):
    from jaxlight.data import load_mnist

    return load_mnist(data_dir, download=False)


@pytest.fixture
def cli():
    """``cli("jaxlight", "train", "--model", "mlp", ...)`` or ``cli("torch-ref", ...)``."""
    modules = {"jaxlight": "jaxlight.cli", "torch-ref": "torch_ref.cli"}

    def run(program: str, *args: str, **kwargs):
        return run_module(modules[program], *args, **kwargs)

    return run


@pytest.fixture(scope="session")
def small_mnist(mnist):
    """``(train, test)`` ArrayDatasets of 320 and 200 real MNIST examples: fast Trainer tests."""
    from jaxlight.data import ArrayDataset

    train, test = mnist
    return ArrayDataset(train.images[:320], train.labels[:320]), ArrayDataset(test.images[:200], test.labels[:200])

