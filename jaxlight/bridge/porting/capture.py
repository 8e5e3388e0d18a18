"""Capture: a torch module's ``forward`` as ``torch.fx`` graphs, one per class, with the shape
and dtype of every value and the torch source line of every operation.

Why ``torch.fx`` (symbolic tracing with a custom ``Tracer``) and not ``torch.export``:

- **Names.** The port must keep torch's ``state_dict`` names, one NNX attribute per torch
  submodule. ``fx`` keeps each supported layer as a leaf (``call_module`` node named
  ``layer1.0.conv1``) and each user class as its own graph, so ``BasicBlock`` becomes one
  generated class and ``self.conv1(x)`` stays ``self.conv1(x)``. ``torch.export`` lowers
  everything to ATen operations on lifted parameters: no modules, no classes, ``conv2d`` /
  ``_native_batch_norm_legit`` instead of ``self.bn1``.
- **Readable source.** ``fx`` records Python-level calls (``x.view(b, -1)``, ``torch.cat``,
  ``F.gelu(x, approximate="tanh")``) with the line of ``forward`` each comes from, so the
  generated ``__call__`` follows ``forward`` line by line and keeps its variable names.
  ``export``'s decomposed graph (``aten.view``, ``aten.expand``, ``aten.native_layer_norm``)
  reads like a compiler's output.
- **Train and eval.** ``fx`` records modules, which the NNX side switches with
  ``model.train()`` / ``model.eval()``; ``export`` specialises batch norm and dropout to the
  mode it was traced in.
- **Refusals with lines.** Every ``fx`` node carries its stack trace, so an unsupported op is
  reported with the ``forward`` line it comes from; a data-dependent ``if`` stops ``fx`` with
  the line of that ``if``. Tracing each user class separately lets one report list the
  problems of every class at once.

The cost of ``fx``: it cannot trace Python control flow on tensor values (refused, with the
line), and ``len()`` / ``int()`` of traced sizes; ``export`` could specialise some of these.

``self.training`` is read at trace time by both, so each class is traced in train and in eval
mode: graphs that differ (beyond dropout written as a function of ``self.training``) are refused.
"""

from __future__ import annotations

import ast
import bisect
import dataclasses
import dis
import inspect
import linecache
import operator
import os
import traceback
from typing import Any


@dataclasses.dataclass(frozen=True)
class Site:
    """Where in the torch source an operation comes from."""

    file: str
    line: int
    text: str = ""

    def __str__(self) -> str:
        return f"{_short(self.file)}:{self.line}"


UNKNOWN = Site("<unknown>", 0)


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path


def _torch_dir() -> str:
    import torch

    return os.path.dirname(os.path.abspath(torch.__file__))


_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_library(path: str) -> bool:
    path = os.path.abspath(path)
    return path.startswith(_torch_dir() + os.sep) or path.startswith(_OWN_DIR + os.sep)


def site_of_stack(stack: str | None) -> Site:
    """The last user frame of an ``fx`` node's ``stack_trace``."""
    if not stack:
        return UNKNOWN
    best = UNKNOWN
    for line in stack.splitlines():
        line = line.strip()
        if line.startswith('File "'):
            try:
                path, rest = line[6:].split('", line ', 1)
                num = int(rest.split(",", 1)[0])
            except ValueError:
                continue
            if not _is_library(path):
                best = Site(path, num, linecache.getline(path, num).strip())
    return best


def site_of_exception(exc: BaseException) -> Site:
    """The last user frame of an exception's traceback (where tracing stopped)."""
    best = UNKNOWN
    for frame in traceback.extract_tb(exc.__traceback__):
        if not _is_library(frame.filename):
            best = Site(frame.filename, frame.lineno or 0, (frame.line or "").strip())
    return best


def assigned_names(site: Site) -> tuple[str | None, list[str | None] | None, bool]:
    """``(name, unpacked names, augmented)`` of the source line: ``x = ...`` gives ``"x"``,
    ``a, b = ...`` gives ``[a, b]``, ``x += ...`` is augmented (an in-place op in torch)."""
    text = site.text
    if not text:
        return None, None, False
    try:
        tree = ast.parse(text.rstrip(":").rstrip("\\"))
    except SyntaxError:
        return None, None, False
    if not tree.body:
        return None, None, False
    stmt = tree.body[0]
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id, None, True
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        if len(targets) != 1:
            return None, None, False
        t = targets[0]
        if isinstance(t, ast.Name):
            return t.id, None, False
        if isinstance(t, (ast.Tuple, ast.List)):
            return None, _target_names(t), False
    if isinstance(stmt, ast.Return):
        return None, None, False
    return None, None, False


def _target_names(t) -> list:
    """``a, (h, c)`` -> ``["a", ["h", "c"]]`` (None for targets that are not names)."""
    return [e.id if isinstance(e, ast.Name) else (_target_names(e) if isinstance(e, (ast.Tuple, ast.List)) else None)
            for e in t.elts]


# ----------------------------------------------------------------------------------------- #
# Values


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: Any  # a torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def summarize(value):
    """A value of the example run: ``TensorInfo`` for tensors, tuples of summaries for
    tuples and lists, plain Python values for numbers and sizes, else the type's name."""
    import torch

    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (tuple, list)):
        return tuple(summarize(v) for v in value)
    if isinstance(value, dict):
        return {k: summarize(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return value
    return type(value).__name__


def _clone(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------- #
# Tracing


@dataclasses.dataclass
class Graph:
    """One class instance's ``forward`` as traced: the train-mode graph (the eval-mode one was
    compared with it), the instance's qualified name, and the example inputs it was run on."""

    qualname: str
    module: Any
    graph: Any  # torch.fx.Graph (train mode)
    eval_graph: Any
    opaque: dict  # qualname (relative to this module) -> submodule traced as its own graph
    inputs: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    params: tuple[str, ...] = ()  # forward's traced parameter names


@dataclasses.dataclass
class Problem:
    """One thing that cannot be ported, and where it comes from."""

    site: Site
    what: str


def _in_assert(frame) -> bool:
    """Whether ``frame`` is testing the condition of an ``assert`` statement."""
    if frame is None:
        return False
    insts = list(dis.get_instructions(frame.f_code))
    at = bisect.bisect_left([i.offset for i in insts], frame.f_lasti)
    if at + 1 >= len(insts):
        return False
    inst, nxt = insts[at], insts[at + 1]
    jump = inst.opname.startswith("POP_JUMP") and "IF_TRUE" in inst.opname
    raises = nxt.opname == "LOAD_ASSERTION_ERROR" or (nxt.opname == "LOAD_GLOBAL" and nxt.argval == "AssertionError")
    return jump and raises


def make_tracer(classify, root):
    """A ``torch.fx.Tracer`` that keeps the supported torch layers as leaves and traces each
    user class (and ``nn.Sequential``) called with tensors only as a leaf of its own, to be
    traced separately (``opaque``); anything else is traced through."""
    import torch
    import torch.fx as fx

    class Proxy(fx.Proxy):
        """fx's Proxy, plus item assignment (``x[i] = v``), recorded as ``operator.setitem``:
        the codegen writes it as ``x.at[i].set(v)`` and checks that no view of ``x`` sees it."""

        def __setitem__(self, key, value):
            self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

        def __bool__(self):
            # ``assert T <= self.block_size``: recorded as torch._assert (checks of sizes; the
            # port drops them) instead of failing as control flow.
            if _in_assert(inspect.currentframe().f_back):
                self.tracer.create_proxy("call_function", torch._assert, (self, "assertion in forward"), {})
                return True
            return super().__bool__()

    class Tracer(fx.Tracer):
        def proxy(self, node):
            return Proxy(node, self)

        def __init__(self):
            super().__init__()
            self.record_stack_traces = True
            # Buffers as graph values too (a causal mask sliced to the sequence: self.bias[:, :, :T, :T]).
            self.proxy_buffer_attributes = True
            self.opaque: dict[str, Any] = {}
            self.root_module = root

        def is_leaf_module(self, m, qualname):
            return classify(m) in ("layer", "unsupported")

        def call_module(self, m, forward, args, kwargs):
            qual = self.path_of_module(m)
            kind = classify(m)
            if kind in ("layer", "unsupported"):
                return self.create_proxy("call_module", qual, args, kwargs)
            if kind in ("class", "sequential") and m is not self.root_module and _all_proxies(args, kwargs):
                self.opaque[qual] = m
                return self.create_proxy("call_module", qual, args, kwargs)
            return forward(*args, **kwargs)

    def _all_proxies(args, kwargs):
        vals = list(args) + list(kwargs.values())
        return bool(vals) and all(isinstance(v, fx.Proxy) for v in vals)

    return Tracer


def trace_class(classify, module, qualname: str, inputs: tuple, kwargs: dict, problems: list) -> Graph | None:
    """Trace ``module.forward`` in train and eval mode; record problems instead of raising."""
    import inspect

    import torch

    Tracer = make_tracer(classify, module)
    sig = inspect.signature(module.forward)
    names = [p for p in sig.parameters]
    given = set(names[:len(inputs)]) | set(kwargs)
    concrete = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if name in given:
                problems.append(Problem(_forward_site(module), f"{type(module).__name__}.forward takes *{name}"))
                return None
            continue
        if name not in given:
            if p.default is p.empty:
                problems.append(Problem(_forward_site(module), f"{type(module).__name__}.forward: argument {name!r} "
                                                               f"has no example value"))
                return None
            concrete[name] = p.default
    modes = {m: m.training for m in module.modules()}
    graphs, opaque = [], None
    try:
        for train in (True, False):
            module.train(train)
            tracer = Tracer()
            try:
                g = tracer.trace(module, concrete_args=concrete or None)
            except Exception as exc:  # noqa: BLE001 - any failure of tracing is reported with its line
                problems.append(Problem(site_of_exception(exc), _trace_message(exc)))
                return None
            _drop_specialised(g, concrete)
            _take_constants(g, module)
            graphs.append(g)
            if opaque is None:
                opaque = tracer.opaque
    finally:
        for m, t in modes.items():
            m.training = t
    params = tuple(n for n in names if n in given)
    ordered = tuple(inputs[i] if i < len(inputs) else kwargs[n] for i, n in enumerate(params))
    return Graph(qualname, module, graphs[0], graphs[1], opaque, ordered, {}, params)


def _take_constants(g, module) -> None:
    """Keep the tensor constants fx stored on the module while tracing (``_tensor_constant0``)
    in their nodes' ``meta["constant"]``, and take them off the user's module again."""
    for n in g.nodes:
        if n.op == "get_attr" and n.target.startswith("_tensor_constant") and hasattr(module, n.target):
            n.meta["constant"] = getattr(module, n.target)
    for name in [k for k in vars(module) if k.startswith("_tensor_constant")]:
        delattr(module, name)


def _drop_specialised(g, concrete: dict) -> None:
    """Remove what ``concrete_args`` leaves in an fx graph: the guards that the arguments
    not passed still have their default values, and their placeholders."""
    import torch
    from torch.fx._symbolic_trace import _assert_is_none

    for n in list(g.nodes):
        guard = n.op == "call_function" and (n.target is _assert_is_none or (
            n.target is torch._assert and len(n.args) > 1 and "has been specialized" in str(n.args[1])))
        if guard:
            cond = n.args[0]
            g.erase_node(n)
            if hasattr(cond, "users") and not cond.users and cond.op != "placeholder":
                g.erase_node(cond)
    for n in list(g.nodes):
        if n.op == "placeholder" and not n.users and _concrete_name(n.target, concrete):
            g.erase_node(n)


def _concrete_name(target: str, concrete: dict) -> bool:
    base = target
    while base and base not in concrete and "_" in base:
        base = base.rsplit("_", 1)[0]
    return base in concrete


def _forward_site(module) -> Site:
    import inspect

    try:
        fn = type(module).forward
        return Site(inspect.getsourcefile(fn) or "<unknown>", inspect.getsourcelines(fn)[1])
    except (OSError, TypeError):
        return UNKNOWN


def _trace_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, TypeError) and "positional argument" in text and "were given" in text:
        return (f"a size read from a tensor passed as separate arguments of a torch factory ({text}): torch.fx "
                f"cannot trace that; pass the sizes as one tuple, e.g. torch.zeros((B, T))")
    if "control flow" in text or "symbolically traced variables" in text:
        return ("data-dependent Python control flow (an `if`/`while` on a tensor value) cannot be traced: "
                "compute both branches and select with torch.where")
    if "is not supported in symbolic tracing" in text or "len" in text and "Proxy" in text:
        return f"cannot be traced: {text}"
    if "Proxy" in text:
        return f"a traced value used as a Python value (int(), range(), a shape-dependent loop...): {text}"
    return f"tracing failed: {type(exc).__name__}: {text}"


def run_example(graph: Graph):
    """Run the train-mode graph on the example inputs (the module in eval mode, without
    gradients, so nothing of it changes): every node gets ``meta["jl"]`` (its value's
    summary); returns the inputs each opaque submodule was first called with."""
    import torch
    import torch.fx as fx

    module = graph.module
    consts = {n.target: n.meta["constant"] for n in graph.graph.nodes if "constant" in n.meta}
    for name, value in consts.items():
        setattr(module, name, value)
    try:
        gm = fx.GraphModule(module, graph.graph)  # (copies the constants it reads)
    finally:
        for name in consts:
            delattr(module, name)
    calls: dict[str, tuple] = {}

    class Interp(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            n.meta["jl"] = summarize(result)
            return result

        def call_module(self, target, args, kwargs):
            if target in graph.opaque and target not in calls:
                calls[target] = (_clone(args), _clone(kwargs))
            return super().call_module(target, args, kwargs)

    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            Interp(gm).run(*_clone(graph.inputs), **_clone(graph.kwargs))
    finally:
        for m, t in modes.items():
            m.training = t
    return calls


def no_grad_sites(module, inputs: tuple) -> set:
    """The source lines of ``forward`` (and everything it calls) that run with gradients off
    (``with torch.no_grad():``): fx records the operations, not the context manager, so the
    module's own forward is run once with a torch function mode watching the grad mode."""
    import torch
    from torch.overrides import TorchFunctionMode

    sites: set = set()

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not torch.is_grad_enabled():
                for frame in reversed(traceback.extract_stack()):
                    if not _is_library(frame.filename):
                        sites.add((frame.filename, frame.lineno))
                        break
            return func(*args, **(kwargs or {}))

    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.enable_grad():
            # Not leaves: a forward that writes its input in place still runs (and is refused later).
            args = [x.detach().clone().requires_grad_(True).clone() if x.is_floating_point() else x.clone()
                    for x in inputs]
            with Watch():
                module(*args)
    finally:
        for m, t in modes.items():
            m.training = t
    return sites
