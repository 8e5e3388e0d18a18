"""Helpers the tests import by name (``from _support import ...``): a module, not conftest, so
that the name is unambiguous with more than one conftest.py on the path."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 1200,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` against this checkout (not whatever is installed)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("XLA_FLAGS", None) if "XLA_FLAGS" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)
