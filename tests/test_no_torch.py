"""jaxlight imports and trains with torch absent (torch is an optional extra)."""

import ast
import subprocess
import sys

import pytest

from _support import ROOT

SCRIPT = """
import sys
sys.modules["torch"] = None        # any `import torch` now raises ImportError
sys.modules["torchvision"] = None
import numpy as np
import jaxlight
from jaxlight import create_train_state, optim, tasks, loop
from jaxlight.data import make_regression
data = make_regression(n_train=512, n_test=128, seed=0)
state = create_train_state(jaxlight.build_model("linear"), optim.sgd(0.05), tasks.regression())
state, _ = loop.fit(state, data.train, epochs=5, batch_size=64)
err = np.abs(np.asarray(state.params["linear"]["kernel"][...]) - data.weight).max()
assert err < 0.05, err
assert not any(m.startswith("torch") for m, v in sys.modules.items() if v is not None)
print("ok", err)
"""


@pytest.mark.integration
def test_jaxlight_trains_without_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


def _import_time_imports(tree: ast.AST):
    """The modules an import statement names that runs when the module is imported: everything
    outside function bodies (class bodies, ``if`` and ``try`` blocks run at import too)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module
        yield from _import_time_imports(node)


def test_no_jaxlight_module_imports_torch_when_imported():
    """The in-process twin of the test above: no jaxlight module imports torch, torchvision or
    torch_ref (which imports torch) outside a function, so ``import jaxlight...`` never loads
    torch. The planted line shows the check sees such an import."""
    forbidden = ("torch", "torchvision", "torch_ref")
    offenders = []
    for path in sorted((ROOT / "jaxlight").rglob("*.py")):
        for name in _import_time_imports(ast.parse(path.read_text(), str(path))):
            if name.split(".")[0] in forbidden:
                offenders.append(f"{path.relative_to(ROOT)}: import {name}")
    assert offenders == []
    planted = ast.parse("try:\n    import torch.nn as nn\nexcept ImportError:\n    pass\ndef f():\n    import torch\n")
    assert list(_import_time_imports(planted)) == ["torch.nn"]
