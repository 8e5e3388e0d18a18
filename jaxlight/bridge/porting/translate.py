"""``translate()``: a torch module -> readable Flax NNX source, the NNX model built from it
holding the torch weights, and the conversion layout.

    >>> import torch
    >>> from jaxlight.bridge.porting.translate import translate
    >>> t = translate(torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh()), (torch.randn(8, 6),))
    >>> t.class_name, [(r.torch_name, r.jax_name, r.kind) for r in t.layout.rules]
    ('Sequential', [('0.weight', '0/kernel', 'linear'), ('0.bias', '0/bias', 'copy')])
    >>> t.model(torch.randn(2, 6).numpy()).shape     # torch's layout in and out
    (2, 3)

The steps, one module each:

1. **Capture** (:mod:`jaxlight.bridge.porting.capture`): ``torch.fx`` traces ``forward`` with the supported
   layers kept as leaves and every user class traced on its own, in train and eval mode,
   and runs the graph on the example inputs for every value's shape and dtype.
2. **Check**: every op (:mod:`jaxlight.bridge.porting.ops`), layer (:mod:`jaxlight.bridge.porting.modules`), in-place
   write and mode-dependent branch is checked; whatever cannot be ported is collected, with
   the torch source line it comes from, and raised as one :class:`UnsupportedError` before
   anything is generated.
3. **Generate** (:mod:`jaxlight.bridge.porting.codegen`): one NNX class per torch class, built from
   ``jaxlight.bridge.porting.nn`` layers; ``__call__`` follows ``forward`` line by line.
4. **Convert**: the layout (``jaxlight.interop.Layout``: every ``state_dict`` key -> NNX path and
   permutation) moves the weights and buffers into the model built from the source.

``jaxlight`` stays free of torch at import time: torch is imported inside these functions.
"""

from __future__ import annotations

import keyword
import linecache
import re
import types
from dataclasses import dataclass, field
from typing import Any

from jaxlight.interop import Layout, Rule

__all__ = ["translate", "Translation", "PortError", "UnsupportedError"]


class PortError(ValueError):
    """A torch module that cannot be ported, or arguments that do not fit ``translate``."""


class UnsupportedError(PortError):
    """Ops or constructs the port cannot translate; the message lists every one with the torch
    source line it comes from (``problems``: ``[(file:line, what)]``)."""

    def __init__(self, problems: list):
        self.problems = [(str(p.site), p.what) for p in problems]
        lines = []
        seen = set()
        for p in problems:
            key = (str(p.site), p.what)
            if key in seen:
                continue
            seen.add(key)
            where = str(p.site) if p.site.line else "(no source line)"
            text = f"  {where}: {p.what}"
            if p.site.text:
                text += f"\n      {p.site.text}"
            lines.append(text)
        super().__init__(f"cannot port: {len(lines)} unsupported op(s) or construct(s):\n" + "\n".join(lines))


@dataclass
class Translation:
    """What :func:`translate` returns.

    Attributes:
        model: the ``nnx.Module`` built from :attr:`source`, holding the torch module's
            parameters and buffers converted exactly (permutations only), in train mode.
        source: importable Python source of the NNX module class(es).
        module_name: the module's name (the file ``<module_name>.py``).
        class_name: the top class in :attr:`source`, named after the torch class.
        layout: every torch ``state_dict`` key -> NNX path and permutation kind
            (``num_batches_tracked`` in ``layout.dropped``).
        init_args: what the generated ``__init__`` records with ``save_hyperparameters``.
    """

    model: Any
    source: str
    module_name: str
    class_name: str
    layout: Layout
    init_args: dict = field(default_factory=dict)


def _snake(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    s = re.sub(r"(?<=[A-Z])([A-Z][a-z])", r"_\1", s)
    return re.sub(r"\W", "_", s).lower()


def translate(torch_module, example_inputs: tuple, *, module_name: str | None = None) -> Translation:
    """Translate ``torch_module`` into NNX source and an NNX model holding its weights.

    Args:
        torch_module: a ``torch.nn.Module`` (not modified: its train/eval flags are restored,
            the example run is in eval mode without gradients).
        example_inputs: a tuple of tensors, ``forward``'s positional arguments (a single
            tensor is taken as a 1-tuple). Their shapes and dtypes are those of the example run;
            the generated code reads sizes from its inputs, so other batch sizes work.
        module_name: the generated module's name (default ``ported_<torch class in snake case>``).

    Returns:
        A :class:`Translation`. ``model`` is in train mode (NNX's default), whatever mode the
        torch module is in.

    Raises:
        UnsupportedError: one message listing every unsupported op, layer, in-place write on a
            view or mode-dependent branch, each with its torch source ``file:line``.
        PortError: arguments that are not a module and a tuple of tensors.
    """
    import torch

    if not isinstance(torch_module, torch.nn.Module):
        raise PortError(f"translate needs a torch.nn.Module, got {type(torch_module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise PortError("example_inputs must be a tuple of torch tensors (forward's positional arguments), got "
                        f"{type(example_inputs).__name__}")
    example_inputs = tuple(example_inputs)
    cls_name = type(torch_module).__name__
    module_name = module_name or "ported_" + _snake(cls_name)
    if not module_name.isidentifier() or keyword.iskeyword(module_name):
        raise PortError(f"module_name {module_name!r} is not a Python identifier")
    return _Translator(torch_module, example_inputs, module_name).run()


class _Translator:
    def __init__(self, root, inputs: tuple, module_name: str):
        self.root, self.inputs, self.module_name = root, inputs, module_name
        self.problems: list = []

    def run(self) -> Translation:
        from jaxlight.bridge.porting import codegen

        from jaxlight.bridge.porting.modules import classify

        graphs = self.capture()
        emitters = {}
        for q, g in graphs.items():
            em = codegen.Emitter(g, graphs, self.problems)
            em.analyse()
            emitters[q] = em
        self.check_input_writes(graphs, emitters)
        # Every graph is written out before anything is raised, so that the problems found while
        # writing (an argument an op does not take) are listed with the others. A Sequential's
        # forward is nn.Sequential's own loop: its graph is checked, not used.
        calls = {q: em.emit() for q, em in emitters.items()}
        calls = {q: lines for q, lines in calls.items() if classify(graphs[q].module) == "class"}
        self.check_modules(emitters)
        self.raise_problems()
        source, class_name = self.write_source(graphs, emitters, calls)
        self.raise_problems()
        layout = self.layout()
        model = self.build(source, class_name, layout)
        return Translation(model, source, self.module_name, class_name, layout, {})

    # ---------------------------------------------------------------- capture
    def capture(self) -> dict:
        from jaxlight.bridge.porting import capture
        from jaxlight.bridge.porting.modules import classify

        graphs: dict[str, capture.Graph] = {}
        if classify(self.root) == "layer":  # a single torch layer: nothing of it to trace
            from jaxlight.bridge.porting.modules import LAYERS, torch_layer_name

            name = torch_layer_name(self.root)
            for issue in LAYERS[name].check(self.root):
                self.problems.append(capture.Problem(capture.UNKNOWN, f"torch.nn.{name}: {issue} is not supported"))
            return graphs
        try:
            self.no_grad = capture.no_grad_sites(self.root, self.inputs)
        except Exception:  # noqa: BLE001 - the traced run below reports the user's error with its line
            self.no_grad = set()
        queue = [("", self.root, self.inputs, {})]
        while queue:
            qual, mod, args, kwargs = queue.pop(0)
            if qual in graphs:
                continue
            g = capture.trace_class(classify, mod, qual, args, kwargs, self.problems)
            if g is None:
                continue
            try:
                calls = capture.run_example(g)
            except Exception as exc:  # noqa: BLE001 - the user's forward failed on its example
                self.problems.append(capture.Problem(capture.site_of_exception(exc),
                                                     f"running forward on the example inputs failed: "
                                                     f"{type(exc).__name__}: {exc}"))
                continue
            graphs[qual] = g
            for n in g.graph.nodes:
                site = capture.site_of_stack(n.stack_trace)
                if (site.file, site.line) in self.no_grad:
                    n.meta["no_grad"] = True
            for sub, m in g.opaque.items():
                full = f"{qual}.{sub}" if qual else sub
                if sub in calls and full not in graphs:
                    a, k = calls[sub]
                    queue.append((full, m, tuple(a), dict(k)))
        return graphs

    def check_input_writes(self, graphs: dict, emitters: dict) -> None:
        """Submodules that write their inputs in place: at every call, the caller must not read
        the value again (deepest first, as a module passing its own input on writes it too)."""
        for qual in sorted(graphs, key=lambda q: -q.count(".") if q else 1):
            written = set(emitters[qual].input_writes)
            if not written or not qual:
                continue
            parent, _, sub = qual.rpartition(".")
            while parent not in emitters and parent:
                parent, _, head = parent.rpartition(".")
                sub = f"{head}.{sub}"
            em = emitters.get(parent)
            if em is None:
                continue
            for call in [n for n in em.nodes if n.op == "call_module" and n.target == sub]:
                passed = em.check_input_writes(call, graphs[qual].params, written)
                for name in passed:
                    em.input_writes.setdefault(name, call)

    def raise_problems(self) -> None:
        if self.problems:
            raise UnsupportedError(sorted(self.problems, key=lambda p: (p.site.file, p.site.line)))

    # ---------------------------------------------------------------- module-level checks
    def check_modules(self, emitters: dict) -> None:
        from jaxlight.bridge.porting import capture
        from jaxlight.bridge.porting.modules import classify

        called = {f"{q}.{n.target}" if q else n.target for q, em in emitters.items() for n in em.nodes
                  if n.op == "call_module"}

        seen: dict[int, str] = {}
        for name, t in self.root.state_dict(keep_vars=True).items():
            if id(t) in seen and t.numel() > 0:
                self.problems.append(capture.Problem(capture.UNKNOWN, f"{name!r} and {seen[id(t)]!r} are one tied "
                                                     f"tensor; tied parameters are not supported"))
            seen.setdefault(id(t), name)
        for qual, m in self.root.named_modules():
            kind = classify(m)
            own = [n for n, p in m.named_parameters(recurse=False)] + [
                n for n, b in m.named_buffers(recurse=False)]
            if kind == "unsupported" and own and qual not in called:
                self.problems.append(capture.Problem(capture._forward_site(m),
                                                     f"module {qual!r} ({type(m).__module__}.{type(m).__qualname__}) "
                                                     f"holds parameters and has no translation"))
            if kind in ("list", "dict") and type(m).__name__.startswith("Parameter"):
                self.problems.append(capture.Problem(capture.UNKNOWN, f"{qual!r}: {type(m).__name__} is not "
                                                                      f"supported"))
            for n in [n for n, _ in m.named_children()] + own:
                if kind == "class" and (not n.isidentifier() or keyword.iskeyword(n)):
                    self.problems.append(capture.Problem(capture.UNKNOWN, f"{qual!r}: attribute name {n!r} is not "
                                                                          f"a Python identifier"))

    # ---------------------------------------------------------------- source
    def write_source(self, graphs: dict, emitters: dict, calls: dict):
        """One class per group of instances of a torch class whose generated text is the same
        up to numbers in their constructors: those numbers that differ between instances become
        the class's ``__init__`` arguments (``BasicBlock(in_channels=64, out_channels=128)``)."""
        from jaxlight.bridge.porting.modules import classify

        root_name = _ident_class(type(self.root).__name__)
        instances = self.class_instances()
        height: dict[str, int] = {}  # 0: no generated class below it
        for qual in sorted(instances, key=lambda q: -(q.count(".") + 1) if q else 0):
            below = [h for q, h in height.items() if q.startswith(qual + ".") or (qual == "" and q)]
            height[qual] = 1 + max(below, default=-1)
        # Deepest classes first: a parent's text holds its children's class names and arguments.
        self.name_of: dict[str, tuple[str, list]] = {}
        texts: dict[str, str] = {}
        order: list[str] = []
        used_names: set[str] = {root_name}
        for level in sorted(set(height.values())):
            groups: dict[tuple, list] = {}
            for qual in [q for q in instances if height[q] == level]:
                m = instances[qual]
                if qual == "" and classify(m) in ("sequential", "layer"):
                    self.name_of[qual] = (root_name, [])
                    texts[root_name] = self.subclass_root(m).replace("@@NAME@@", root_name)
                    order.append(root_name)
                    continue
                slots = _Slots()
                src = self.class_source(qual, m, graphs.get(qual), emitters.get(qual), calls.get(qual), slots)
                template = src.text("@@NAME@@", qual == "")
                groups.setdefault((type(m), template, qual == ""), []).append((qual, slots))
            for (cls, template, top), members in groups.items():
                name = root_name if top else _ident_class(cls.__name__)
                k = 1
                while not top and name in used_names:
                    k += 1
                    name = f"{_ident_class(cls.__name__)}{k}"
                used_names.add(name)
                text, params = _parametrise(template, [slots for _, slots in members])
                for qual, slots in members:
                    self.name_of[qual] = (name, [(p, slots.values[cols[0]]) for p, cols in params])
                texts[name] = text.replace("@@NAME@@", name)
                order.append(name)
        header = _HEADER.format(cls=f"{type(self.root).__module__}.{type(self.root).__qualname__}")
        source = header + "\n\n\n".join(texts[n] for n in order) + "\n"
        return source, root_name

    def class_instances(self) -> dict:
        """``{qualname: module}`` of every module written as a generated class (the root, user
        classes, torch modules built from others), found through containers."""
        from jaxlight.bridge.porting.modules import classify

        found = {"": self.root}

        def walk(qual: str, m) -> None:
            for cname, child in m.named_children():
                cq = f"{qual}.{cname}" if qual else cname
                kind = classify(child)
                if kind == "class":
                    found[cq] = child
                if kind in ("class", "sequential", "list", "dict"):
                    walk(cq, child)

        walk("", self.root)
        return found

    def subclass_root(self, m) -> str:
        """A torch ``nn.Sequential`` or a single layer as the top module: a subclass of its
        ``jaxlight.bridge.porting.nn`` class whose ``__init__`` passes the arguments (the parameter names
        stay torch's: ``"0"``, ``"1"``... of a Sequential, ``kernel`` of a Linear)."""
        from jaxlight.bridge.porting import codegen
        from jaxlight.bridge.porting.modules import LAYERS, classify, torch_layer_name

        lines = self.ctor(m, "", None, "")
        head = lines[0]
        base = head[:head.index("(")]
        # nn.Sequential(\n    layer,\n ...) or one line: the arguments go to super().__init__.
        body = ["super().__init__(" + head[head.index("(") + 1:]] + lines[1:]
        body.append("jaxlight.save_hyperparameters(self)")
        doc = codegen._class_doc(m, False)
        lines = [f"class @@NAME@@({base}):", f'    """{doc}"""', "",
                 "    def __init__(self, *, rngs: nnx.Rngs):"] + ["        " + ln for ln in body]
        if classify(m) == "layer" and LAYERS[torch_layer_name(m)].layout == "cl":
            # The model takes and returns torch's layout; the layer runs channels-last.
            lines += ["", "    def __call__(self, x):",
                      "        return F.channels_first(super().__call__(F.channels_last(jnp.asarray(x))))"]
        return "\n".join(lines)

    def class_source(self, qual: str, m, graph, emitter, call_lines, slots):
        from jaxlight.bridge.porting import codegen

        init = []
        for pname, p in m._parameters.items():
            if p is None:
                init.append(f"self.{pname} = None")
            else:
                init.append(f"self.{pname} = nnx.Param(jnp.zeros({slots.lit(tuple(p.shape), pname, 'shape')}, "
                            f"{codegen.dtype_expr(p.dtype)}))")
        for bname, b in m._buffers.items():
            if b is None or bname in getattr(m, "_non_persistent_buffers_set", ()):
                continue
            init.append(f"self.{bname} = nn.Buffer(jnp.zeros({slots.lit(tuple(b.shape), bname, 'shape')}, "
                        f"{_buffer_dtype(b)}))")
        if emitter is not None:
            for aname, value in emitter.used_attrs.items():
                init.append(f"self.{aname} = {slots.lit(value, aname, aname)}")
        for cname, child in m.named_children():
            cq = f"{qual}.{cname}" if qual else cname
            lines = self.ctor(child, cq, slots, cname)
            init.append(f"self.{cname} = {lines[0]}")
            init.extend(lines[1:])
        if emitter is not None:
            for aname, ctor in emitter.extra_attrs:
                init.append(f"self.{aname} = {ctor}")
        params = tuple(codegen._ident(p) for p in graph.params) if graph is not None else ()
        return codegen.ClassSource(qual, m, init, call_lines, params)

    def ctor(self, m, qual: str, slots, attr: str) -> list[str]:
        """The constructor expression of a submodule, as lines (the first one follows ``=``);
        numbers go through ``slots`` (None: written as they are)."""
        import inspect

        from jaxlight.bridge.porting import nn as pnn
        from jaxlight.bridge.porting.modules import LAYERS, classify, torch_layer_name

        lit = slots.lit if slots is not None else (lambda v, a, p: _lit(v))
        kind = classify(m)
        if kind == "layer":
            spec = LAYERS[torch_layer_name(m)]
            args, kwargs = spec.ctor(m)
            names = [p for p in inspect.signature(getattr(pnn, spec.nn_name).__init__).parameters][1:]
            parts = [lit(a, attr, names[i] if i < len(names) else str(i)) for i, a in enumerate(args)]
            parts += [f"{k}={lit(v, attr, k)}" for k, v in kwargs.items()]
            if spec.rngs:
                parts.append("rngs=rngs")
            return [f"nn.{spec.nn_name}({', '.join(parts)})"]
        if kind in ("sequential", "list", "dict"):
            items = []
            for cname, child in m.named_children():
                sub = self.ctor(child, f"{qual}.{cname}", slots, f"{attr}_{cname}")
                prefix = f"{cname!r}: " if kind == "dict" else ""
                items.append([prefix + sub[0]] + sub[1:])
            if kind == "sequential" and _named_sequential(m):
                kind = "dict"
                items = [[f"{cname!r}: " + item[0]] + item[1:]
                         for cname, item in zip([c for c, _ in m.named_children()], items)]
                opener, closer = "nn.NamedSequential({", "})"
            else:
                opener, closer = {"sequential": ("nn.Sequential(", ")"), "list": ("nnx.List([", "])"),
                                  "dict": ("nnx.Dict({", "})")}[kind]
            if not items:
                return [opener + closer]
            lines = [opener]
            for item in items:
                lines += ["    " + item[0]] + ["    " + ln for ln in item[1:]]
                lines[-1] += ","
            lines.append(closer)
            return lines
        if kind == "class":
            name, params = self.name_of[qual]
            parts = [f"{p}={lit(v, attr, p)}" for p, v in params] + ["rngs=rngs"]
            return [f"{name}({', '.join(parts)})"]
        return [f"None  # {type(m).__module__}.{type(m).__qualname__}: not called by forward, no translation"]

    # ---------------------------------------------------------------- layout
    def layout(self) -> Layout:
        from jaxlight.bridge.porting import capture
        from jaxlight.bridge.porting.modules import LAYERS, classify, torch_layer_name

        rules: list[Rule] = []
        dropped: list[str] = []

        def walk(m, t: str, j: tuple) -> None:
            kind = classify(m)
            if kind == "layer":
                r, d = LAYERS[torch_layer_name(m)].rules(m, t, j)
                rules.extend(r)
                dropped.extend(d)
                return
            if kind == "class":
                for pname, p in m._parameters.items():
                    if p is not None:
                        rules.append(Rule(t + pname, j + (pname,), "copy" if p.ndim == 1 else "array"))
                for bname, b in m._buffers.items():
                    if b is None or bname in getattr(m, "_non_persistent_buffers_set", ()):
                        continue
                    kind_b = "int64" if str(b.dtype) == "torch.int64" else ("copy" if b.ndim == 1 else "array")
                    rules.append(Rule(t + bname, j + (bname,), kind_b, variable="batch_stat"))
            for cname, child in m.named_children():
                walk(child, f"{t}{cname}.", j + (cname,))

        walk(self.root, "", ())
        order = {k: i for i, k in enumerate(self.root.state_dict())}
        covered = {r.torch_name for r in rules} | set(dropped)
        missing = [k for k in order if k not in covered]
        if missing:
            self.problems.append(capture.Problem(capture.UNKNOWN, f"no translation for state_dict entries {missing}"))
            self.raise_problems()
        rules = [r for r in rules if r.torch_name in order]
        dropped = [d for d in dropped if d in order]
        rules.sort(key=lambda r: order[r.torch_name])
        return Layout(type(self.root).__name__, tuple(rules), tuple(dropped))

    # ---------------------------------------------------------------- build
    def build(self, source: str, class_name: str, layout: Layout):
        from flax import nnx

        from jaxlight import interop

        module = load_source(source, self.module_name)
        cls = getattr(module, class_name)
        model = cls(rngs=nnx.Rngs(0))
        arrays = {k: _to_numpy(v) for k, v in self.root.state_dict().items()}
        return interop.model_from_torch(arrays, model, layout)


def load_source(source: str, module_name: str) -> types.ModuleType:
    """Execute generated source as a fresh module named ``module_name`` (its classes record
    that name as their ``__module__``; it is not put in ``sys.modules``). The source is kept in
    ``linecache`` so tracebacks and ``inspect`` show its lines."""
    filename = f"<jaxlight.port {module_name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - our own generated source
    return module


def _to_numpy(t):
    import numpy as np
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise PortError("bfloat16 weights: convert the torch module to float32 first")
    return np.asarray(t.numpy())


def _buffer_dtype(b) -> str:
    from jaxlight.bridge.porting.codegen import dtype_expr

    return dtype_expr(b.dtype)


class _Slots:
    """The numbers of one class instance's constructor text, each replaced by a placeholder
    (``@@S0@@``...), with where it came from (attribute, argument) to name it if it becomes an
    argument of the class."""

    def __init__(self):
        self.values: list = []
        self.hints: list[tuple[str, str]] = []

    def lit(self, v, attr: str, param: str) -> str:
        if isinstance(v, tuple):
            items = [self.lit(x, attr, param) for x in v]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            self.values.append(v)
            self.hints.append((attr, param))
            return f"@@S{len(self.values) - 1}@@"
        return _lit(v)


_WIDTHS = {"in_channels", "out_channels", "num_features", "num_channels", "in_features", "out_features",
           "embed_dim", "embedding_dim", "hidden_size", "input_size", "normalized_shape", "channels", "features",
           "width"}


def _parametrise(template: str, members: list) -> tuple[str, list]:
    """The class text for instances sharing ``template``: each number that is the same in all
    of them written as it is, the others as ``__init__`` arguments (numbers that vary together
    share one). Returns ``(text, [(argument name, [slot indices])])``."""
    columns = list(zip(*[m.values for m in members])) if members[0].values else []
    hints = members[0].hints
    params: list[tuple[str, list]] = []
    by_values: dict[tuple, int] = {}
    replace: dict[int, str] = {}
    for j, col in enumerate(columns):
        if len(set(map(repr, col))) == 1:
            replace[j] = _lit(col[0])
            continue
        key = tuple(map(repr, col))
        if key in by_values:
            params[by_values[key]][1].append(j)
        else:
            by_values[key] = len(params)
            params.append(("", [j]))
    named, taken = [], {"self", "rngs"}
    for _, cols in params:
        names = [hints[j][1] for j in cols]
        if len(set(names)) == 1:
            name = names[0]
        elif all(n in _WIDTHS for n in names):
            name = "width"
        else:
            attr, param = hints[cols[0]]
            name = f"{attr}_{param}"
        name = re.sub(r"\W", "_", name).strip("_") or "arg"
        base, k = name, 1
        while name in taken or keyword.iskeyword(name) or not name.isidentifier():
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        named.append((name, cols))
        for j in cols:
            replace[j] = name
    text = re.sub(r"@@S(\d+)@@", lambda mt: replace[int(mt.group(1))], template)
    if named:
        sig = ", ".join(f"{n}: {type(members[0].values[cols[0]]).__name__}" for n, cols in named)
        text = text.replace("def __init__(self, *, rngs: nnx.Rngs):", f"def __init__(self, {sig}, *, rngs: nnx.Rngs):", 1)
    return text, named


def _layer_ctor(m) -> str:
    """The one-line ``jaxlight.bridge.porting.nn`` constructor of a supported torch layer (for layers
    built from another layer: ``nn.TransformerEncoder(nn.TransformerEncoderLayer(...), 2)``)."""
    from jaxlight.bridge.porting.modules import LAYERS, torch_layer_name

    spec = LAYERS[torch_layer_name(m)]
    args, kwargs = spec.ctor(m)
    parts = [_lit(a) for a in args] + [f"{k}={_lit(v)}" for k, v in kwargs.items()]
    if spec.rngs:
        parts.append("rngs=rngs")
    return f"nn.{spec.nn_name}({', '.join(parts)})"


def _named_sequential(m) -> bool:
    """Whether a torch Sequential names its layers (``OrderedDict``) rather than 0, 1, ..."""
    return [n for n, _ in m.named_children()] != [str(i) for i in range(len(list(m.children())))]


def _lit(v) -> str:
    if isinstance(v, float) and v != v:
        return "math.nan"
    return repr(v)


def _ident_class(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return name if name.isidentifier() and not keyword.iskeyword(name) else "Ported_" + name


_HEADER = '''"""Flax NNX port of ``{cls}``, written by ``jaxlight.port``.

Inputs and outputs are in torch's layout (NCHW stays NCHW); feature maps run channels-last
between convolutions, batch norms and pools (``F.channels_last`` / ``F.channels_first``).
``model.train()`` / ``model.eval()`` switch dropout and batch norm as torch's modes do.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

import jaxlight
from jaxlight.bridge.porting import functional as F
from jaxlight.bridge.porting import nn


'''
