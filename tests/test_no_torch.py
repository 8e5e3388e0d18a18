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


def _all_imports(tree: ast.AST):
    """``(module, name)`` of every import statement anywhere, function bodies included
    (``name`` is None for ``import module``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield from ((node.module, alias.name) for alias in node.names)


def test_only_the_bridge_imports_torch_or_torch_ref():
    """One direction between the packages: the cross-framework code lives in jaxlight/bridge/,
    and no other jaxlight module imports torch, torchvision or torch_ref, not even inside a
    function. The planted source shows the check sees a function-level import."""
    forbidden = ("torch", "torchvision", "torch_ref")
    offenders = []
    for path in sorted((ROOT / "jaxlight").rglob("*.py")):
        if (ROOT / "jaxlight" / "bridge") in path.parents:
            continue
        for module, _ in _all_imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in forbidden:
                offenders.append(f"{path.relative_to(ROOT)}: import {module}")
    assert offenders == []
    assert any((ROOT / "jaxlight" / "bridge").rglob("*.py"))
    planted = ast.parse("def f():\n    from torch_ref.interop import state_dict_to_numpy\n")
    assert [m for m, _ in _all_imports(planted)] == ["torch_ref.interop"]


def _private(module: str, name: str | None) -> bool:
    return any(part.startswith("_") for part in module.split(".")) or (name or "").startswith("_")


def test_torch_ref_imports_only_public_jaxlight_names():
    """torch_ref depends on jaxlight through its public surface only: no ``_private`` name and
    no ``_private`` module, at any level."""
    offenders = []
    for path in sorted((ROOT / "torch_ref").rglob("*.py")):
        for module, name in _all_imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] == "jaxlight" and _private(module, name):
                offenders.append(f"{path.relative_to(ROOT)}: from {module} import {name}")
    assert offenders == []
    assert _private("jaxlight.data.mnist", "_md5") and _private("jaxlight._impl", "x")
    assert not _private("jaxlight.data.mnist", "verify_checksum")
