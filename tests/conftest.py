"""Shared test setup: 8 fake CPU devices, the offline MNIST copy, CLI runners (in-process for
the fast tier, subprocesses for the integration tier).

XLA_FLAGS must be set before jax is imported anywhere, which is why it is set here, at the top
of the first file pytest imports.

Compiled programs are kept in JAX's persistent compilation cache under
``.pytest_cache/d/jax-compilation-cache`` (both xdist workers and the subprocesses share it), so a
second run compiles only what changed: most of the fast tier's time is XLA compiling small
programs. JAX keys each entry by the program, the compile options and the jax/jaxlib version,
so a stale entry is never used. ``pytest --cache-clear`` (or deleting the folder) gives a cold
run; setting ``JAX_COMPILATION_CACHE_DIR`` yourself overrides the folder.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "d" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402

from _support import ROOT, run_module  # noqa: E402,F401  (re-exported for fixtures)


def pytest_ignore_collect(collection_path, config):
    """The helper scripts and packages beside the tests (jobs run as subprocesses, userpkg, the
    port zoo) are not collected: --doctest-modules, on for the library's examples, would import
    them, and a job script runs when imported."""
    if collection_path.suffix == ".py" and not collection_path.name.startswith(("test_", "conftest")):
        return True
    return None


# (LLVM's expensive passes off: a further ~13% of the tier's CPU. Neither flag turns on fast math.)
FAST_TIER_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def pytest_configure(config):
    """The fast tier (the default marker expression) compiles with XLA's backend optimisation
    level 0: its time is mostly XLA compiling small programs, which level 0 compiles in about
    half the CPU time, and its programs run on small data (level 0 runs a convolution step about
    1.5x slower, which the slow tier's minutes of training would feel). XLA:CPU's fast math
    stays off at every level. Every other selection (``-m "slow or integration"``, ``-m ""``)
    keeps XLA's default. Called before collection, so before any test module imports jax."""
    flags = os.environ.get("XLA_FLAGS", "")
    if config.getoption("markexpr") == "not slow and not integration" and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_TIER_XLA_FLAGS}".strip()


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


@pytest.fixture
def cli_main(capsys, monkeypatch):
    """In-process twin of ``cli``: ``cli_main("jaxlight", "train", ...)`` calls the program's
    ``main([...])`` in this process and returns a ``CompletedProcess`` (exit code, stdout,
    stderr), as ``cli`` does for a subprocess, without its seconds of imports.

    ``env`` entries are set for the call. What ``main`` changes process-wide (the root logger's
    handlers and level, the thread and unraisable hooks, warning filters, torch's thread count)
    is put back afterwards, so the next test sees the process as it was.
    """
    import importlib
    import logging
    import subprocess
    import sys
    import threading
    import warnings

    modules = {"jaxlight": "jaxlight.cli", "torch-ref": "torch_ref.cli"}

    def run(program: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        main = importlib.import_module(modules[program]).main
        root = logging.getLogger()
        saved = (root.handlers[:], root.level, logging.raiseExceptions, threading.excepthook, sys.unraisablehook)
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else None
        capsys.readouterr()
        try:
            with warnings.catch_warnings():
                code = main(list(args))
        except SystemExit as exc:  # argparse and usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            for handler in set(root.handlers) - set(saved[0]):  # (<out>/train.log)
                handler.close()
            root.handlers[:], level, logging.raiseExceptions, threading.excepthook, sys.unraisablehook = saved
            root.setLevel(level)
            if threads is not None:
                sys.modules["torch"].set_num_threads(threads)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([program, *args], code, out, err)

    return run


@pytest.fixture(scope="session")
def small_mnist(mnist):
    """``(train, test)`` ArrayDatasets of 320 and 200 real MNIST examples: fast Trainer tests."""
    from jaxlight.data import ArrayDataset

    train, test = mnist
    return ArrayDataset(train.images[:320], train.labels[:320]), ArrayDataset(test.images[:200], test.labels[:200])

