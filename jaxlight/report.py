"""What both command lines print and write, in one format (pure Python; torch_ref uses it too)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

__all__ = ["library_versions", "epoch_line", "final_line", "progress_bar", "write_json", "write_text_atomic"]


def library_versions(*packages: str) -> dict:
    """``{"python": ..., package: version}`` for the installed packages (missing ones skipped)."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def epoch_line(epoch: int, epochs: int, metrics: dict, seconds: float) -> str:
    """``epoch 1/10  loss 0.2345  accuracy 0.9312  2.41 s``."""
    metric = "accuracy" if "accuracy" in metrics else "mse"
    return (f"epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  "
            f"{metric} {metrics[metric]:.4f}  {seconds:.2f} s")


def final_line(summary: dict) -> str:
    if "test_accuracy" in summary:
        return f"test accuracy {summary['test_accuracy']:.4f}"
    return f"test mse {summary['test_mse']:.4f}  max |W - W_true| {summary['weight_error']:.4f}  |b - b_true| {summary['bias_error']:.4f}"


def progress_bar(epochs: int):
    """A factory for one tqdm bar per epoch; silent when output is not a terminal."""
    from tqdm.auto import tqdm

    def make(total: int, epoch: int):
        return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, disable=None)

    return make


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename.

    A write that fails part way (full disk, ``RLIMIT_FSIZE``, a kill) leaves the previous file
    whole and no half-written one under its name; the temporary file is removed on an error
    (a ``kill -9`` may leave one, named ``.<name>.tmp-<pid>``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json(path: str | Path, payload: dict, **dump_kw) -> Path:
    """``payload`` as JSON (indent 2 unless ``dump_kw`` says otherwise), written atomically
    (:func:`write_text_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(payload, **{"indent": 2, "default": _numpy, **dump_kw}) + "\n")


def _numpy(value):
    """A numpy array or number (a confusion matrix among the metrics) as JSON data."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
