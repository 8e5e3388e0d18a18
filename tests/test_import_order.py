"""The import order is the data flow: data -> models -> state -> step -> parallel -> loop ->
trainer -> cli.

Read from the source with ``ast`` (nothing is imported): every ``import`` of a jaxlight
module, at module level or inside a function. Imports under ``if TYPE_CHECKING:`` are for
annotations only and never run, so they are left out.
"""

import ast
import textwrap
from pathlib import Path

from _support import ROOT

# Bottom first. A module may import modules of its own layer or below, and the helpers that
# belong to no layer (checkpoint, hparams, report, ...), as long as what those load stays
# below it too. ``errors``, ``tasks`` and ``metrics`` (the loss contract) are read by every layer.
LAYERS = [
    ("base", ("jaxlight.errors", "jaxlight.tasks", "jaxlight.metrics")),
    ("data", ("jaxlight.data",)),
    ("models", ("jaxlight.models", "jaxlight.layers")),
    ("state", ("jaxlight.state",)),
    ("step", ("jaxlight.step",)),
    ("parallel", ("jaxlight.parallel",)),
    ("loop", ("jaxlight.loop",)),
    ("trainer", ("jaxlight.trainer", "jaxlight.checkpoint_connector", "jaxlight.signal_connector",
                 "jaxlight.logger_connector", "jaxlight.callbacks", "jaxlight.loggers")),
    ("cli", ("jaxlight.cli", "jaxlight.configcli", "jaxlight.commands", "jaxlight.bridge.compare")),
]


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _with_parents(target: str, importer: str, modules: set) -> list[str]:
    """``jaxlight.data.arrays`` -> itself and the packages it runs first, except the packages
    that hold ``importer`` (they are already running when it runs)."""
    parts = target.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts))]
    return [m for m in parents if m in modules and not importer.startswith(m + ".")] + [target] * (target in modules)


def import_graph(root: Path) -> dict:
    """``{module: [(imported module, line, at_import_time)]}`` over the package at ``root``.

    ``at_import_time`` is False for an import inside a function body (it runs when the function
    does). ``from pkg import name`` counts ``pkg.name`` when that is a module, else ``pkg``.
    """
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        edges = []
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

        def visit(node, eager):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for sub in child.orelse:
                        visit_one(sub, eager)
                    continue
                visit_one(child, eager)

        def visit_one(child, eager):
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package this file is in
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for target in targets:
                for module in _with_parents(target, name, modules):
                    if module != name:
                        edges.append((module, child.lineno, eager))
            inner = eager and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

        visit(ast.parse(path.read_text(), str(path)), True)
        graph[name] = edges
    return graph


def upward_imports(graph: dict) -> list[str]:
    """Every import, eager or inside a function, of a module in a higher layer."""
    found = []
    for module, edges in graph.items():
        rank = layer_of(module)
        for target, line, _ in edges:
            if rank is not None and layer_of(target) is not None and layer_of(target) > rank:
                found.append(f"{module}:{line} imports {target} ({LAYERS[layer_of(target)][0]} is above "
                             f"{LAYERS[rank][0]})")
    return found


def upward_loads(graph: dict) -> list[str]:
    """For every layered module, a chain of import-time imports (through helpers that belong to
    no layer) that loads a module of a higher layer."""
    found = []
    for module in graph:
        rank = layer_of(module)
        if rank is None:
            continue
        parent, todo = {module: None}, [module]
        while todo:
            current = todo.pop()
            for target, _, eager in graph.get(current, ()):
                if eager and target not in parent:
                    parent[target] = current
                    todo.append(target)
        for target in parent:
            if layer_of(target) is not None and layer_of(target) > rank:
                chain, at = [], target
                while at is not None:
                    chain.append(at)
                    at = parent[at]
                found.append(" -> ".join(reversed(chain)))
    return sorted(found)


def cycles_through(graph: dict, modules) -> list[str]:
    """Each module of ``modules`` that some import chain (eager or in a function) leads back
    to, with that chain."""
    found = []
    for module in modules:
        parent, todo = {}, [module]
        while todo:
            current = todo.pop()
            for target, _, _ in graph.get(current, ()):
                if target == module:
                    chain, at = [module, current], current
                    while at != module:
                        at = parent[at]
                        chain.append(at)
                    found.append(" -> ".join(reversed(chain)))
                    todo = []
                    break
                if target not in parent:
                    parent[target] = current
                    todo.append(target)
    return found


GRAPH = import_graph(ROOT / "jaxlight")


def test_every_module_is_read():
    assert {"jaxlight.step", "jaxlight.loop", "jaxlight.trainer", "jaxlight.data.stream", "jaxlight.cli",
            "jaxlight.bridge.compare"} <= set(GRAPH)
    assert "jaxlight.step" in {t for t, *_ in GRAPH["jaxlight.parallel"]}


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(GRAPH) == []


def test_importing_a_layer_loads_nothing_above_it():
    assert upward_loads(GRAPH) == []


def test_no_layered_module_is_on_an_import_cycle():
    layered = [m for m in GRAPH if layer_of(m) is not None]
    assert cycles_through(GRAPH, layered) == []


def test_the_trainer_hands_its_data_to_the_loop_and_never_reads_the_stream():
    targets = {t for t, *_ in GRAPH["jaxlight.trainer"]}
    assert "jaxlight.loop" in targets
    assert not any(t.startswith("jaxlight.data") for t in targets)


def _package(tmp_path: Path, files: dict) -> Path:
    for name, text in files.items():
        path = tmp_path / "jaxlight" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "jaxlight"


def test_the_checks_catch_a_planted_upward_import_load_and_cycle(tmp_path):
    graph = import_graph(_package(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/stream.py": """
            def check(state):
                from jaxlight.step import check_batch   # lazy, still upward
            """,
        "models/__init__.py": "from jaxlight import hparams\n",
        "hparams.py": "from jaxlight import checkpoint as ckpt\n",
        "checkpoint.py": "from jaxlight.state import TrainState\n",
        "state.py": "from jaxlight.tasks import Task\n",
        "tasks.py": "def f():\n    import jaxlight.state\n",
        "step.py": """
            from typing import TYPE_CHECKING
            from jaxlight.state import TrainState
            if TYPE_CHECKING:
                from jaxlight.trainer import Trainer   # annotations only: not counted
            """,
        "trainer.py": "from jaxlight.step import check_batch\n",
        "cli.py": "def main():\n    from jaxlight.compare import run\n",
        "compare.py": "from .cli import main\n",
    }))
    assert upward_imports(graph) == [
        "jaxlight.data.stream:3 imports jaxlight.step (step is above data)",
        "jaxlight.tasks:2 imports jaxlight.state (state is above base)",
    ]
    assert upward_loads(graph) == ["jaxlight.models -> jaxlight.hparams -> jaxlight.checkpoint -> jaxlight.state"]
    assert sorted(cycles_through(graph, ["jaxlight.cli", "jaxlight.state", "jaxlight.step"])) == [
        "jaxlight.cli -> jaxlight.compare -> jaxlight.cli",
        "jaxlight.state -> jaxlight.tasks -> jaxlight.state",
    ]
