"""Helpers the tests import by name (``from _support import ...``): a module, not conftest, so
that the name is unambiguous with more than one conftest.py on the path."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Parameters trained under a parallel strategy agree with one device's to ``ATOL + RTOL * |p|``:
# splitting a batch only reorders the float32 sums (see tests/test_parallel.py's docstring).
PARALLEL_ATOL = PARALLEL_RTOL = 1e-5


def host_params(state) -> list:
    """The parameter leaves of a state in any layout, as numpy arrays."""
    import jax
    import numpy as np

    from jaxlight import parallel

    return [np.asarray(leaf) for leaf in jax.tree.leaves(parallel.to_host_state(state).params)]


def assert_params_close(actual, expected) -> None:
    """Every parameter of ``actual`` within the parallel tolerance of ``expected``'s."""
    import numpy as np

    for a, e in zip(host_params(actual), host_params(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL)


def userpkg_run(width: int, learning_rate: float, **trainer) -> str:
    """A ``jaxlight fit`` config of the test package's ``Net`` on its blobs, with Adam, as YAML."""
    import yaml

    return yaml.safe_dump({
        "seed": 0,
        "model": {"class_path": "userpkg.nets.Net", "init_args": {"width": width}},
        "loss": "userpkg.nets.loss_fn",
        "data": {"class_path": "userpkg.data.blobs", "init_args": {}},
        "optimizer": {"class_path": "optax.adam", "init_args": {"learning_rate": learning_rate}},
        "trainer": {"batch_size": 64, "logging": {"enable_progress_bar": False}, **trainer},
    })


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 1200,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` against this checkout (not whatever is installed)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("XLA_FLAGS", None) if "XLA_FLAGS" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)


def one_line_error(result, *fragments) -> str:
    """A command line's stderr holds a single ``<program>: error: ...`` line (no traceback)
    with each fragment; returns that line."""
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and ": error: " in errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


BAD_OUTPUT_PATHS = ["out is a file", "out name too long", "out under a file", "ckpt-dir is a file",
                    "ckpt-dir is a symlink loop"]


def bad_output_paths(tmp_path: Path) -> dict:
    """``case -> (flags, the message naming the cause)`` for output paths a run must refuse
    before loading any data; the files and symlinks they need are made under ``tmp_path``."""
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    return {
        "out is a file": (["--out", str(afile)], "is a file, not a folder"),
        "out name too long": (["--out", str(tmp_path / ("x" * 300))], "File name too long"),
        "out under a file": (["--out", str(afile / "sub")], "Not a directory"),
        "ckpt-dir is a file": (["--out", str(tmp_path / "o"), "--ckpt-dir", str(afile)], "is a file, not a folder"),
        "ckpt-dir is a symlink loop": (["--out", str(tmp_path / "o"), "--ckpt-dir", str(tmp_path / "loop1")],
                                       "symlink loop"),
    }


COMPILED = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def count_compilations():
    """Counts the executables jit (or pmap) had to produce inside the block: XLA compilations,
    and programs loaded from JAX's persistent compilation cache instead (``tests/conftest.py``
    turns it on; a program the cache holds is a compilation the code asked for all the same).
    One entry per executable: JAX reports a cache hit and then (jax 0.10) the duration of that
    same load as a compilation; the pair counts once."""
    import jax

    events = []

    def on_duration(event, duration, **kwargs):
        if event == COMPILED:
            if events and events[-1] == CACHE_HIT:
                events[-1] = COMPILED  # (the load just counted as a hit)
            else:
                events.append(event)

    def on_event(event, **kwargs):
        if event == CACHE_HIT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
