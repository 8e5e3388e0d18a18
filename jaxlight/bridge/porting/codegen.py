"""Code generation: captured fx graphs -> readable NNX source, and the conversion layout.

One generated class per traced class instance (instances whose generated text is the same
share a class); one attribute per torch submodule, named as in torch's ``state_dict``; one
``__call__`` line per step of ``forward`` (nested calls written on one source line stay one
expression, as they were written; variable names are taken from the assignment on that line).

Layouts: values keep torch's layout, except feature maps between channels-last layers
(``jaxlight.bridge.porting.nn``: convolutions, batch norms, pools), which stay channels-last until a
torch-layout operation needs them: the generated code converts explicitly
(``F.channels_last(x)`` / ``F.channels_first(x)``). Every generated class takes and returns
torch's layout; XLA removes the transposes that meet at class boundaries.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
from dataclasses import dataclass, field

from jaxlight.interop import Rule
from jaxlight.bridge.porting import modules as M
from jaxlight.bridge.porting import ops as O
from jaxlight.bridge.porting.capture import Problem, Site, TensorInfo, assigned_names, site_of_stack

_RESERVED = {"self", "jax", "jnp", "nnx", "nn", "F", "math", "jaxlight", "int", "float", "min", "max", "abs",
             "round", "range", "len", "tuple", "list", "dict", "print", "sum", "any", "all", "None", "True", "False"}

_VIEW_METHODS = O.VIEW_OPS
_BINARY_INPLACE = {"operator.add", "operator.sub", "operator.mul", "operator.truediv", "operator.floordiv",
                   "operator.mod", "operator.pow", "operator.and_", "operator.or_", "operator.xor",
                   "operator.matmul", "operator.lshift", "operator.rshift"}


def _ident(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    if not name or name[0].isdigit():
        name = "v_" + name
    if keyword.iskeyword(name) or name in _RESERVED:
        name += "_"
    return name


def torch_dtype_name(d) -> str:
    return str(d).replace("torch.", "")


_DTYPES = {"float32": "jnp.float32", "float": "jnp.float32", "float16": "jnp.float16", "half": "jnp.float16",
           "bfloat16": "jnp.bfloat16", "int64": "jnp.int32", "long": "jnp.int32", "int32": "jnp.int32",
           "int": "jnp.int32", "int16": "jnp.int16", "short": "jnp.int16", "int8": "jnp.int8", "uint8": "jnp.uint8",
           "bool": "jnp.bool_"}


def dtype_expr(d) -> str:
    name = d if isinstance(d, str) else torch_dtype_name(d)
    if name not in _DTYPES:
        raise O.BindError(f"dtype {name} (JAX computes in float32 here; float64 needs jax_enable_x64)")
    return _DTYPES[name]


_PREC = {"**": 14, "*": 12, "/": 12, "//": 12, "%": 12, "@": 12, "+": 11, "-": 11, "<<": 10, ">>": 10, "&": 9,
         "^": 8, "|": 7, "==": 6, "!=": 6, "<": 6, "<=": 6, ">": 6, ">=": 6}
_AST_OPS = {ast.Pow: "**", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@",
            ast.Add: "+", ast.Sub: "-", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitXor: "^",
            ast.BitOr: "|"}


def _precedence(expr: str) -> int:
    """The binding strength of an expression's top-level operator (high: binds tighter)."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return 0
    if isinstance(node, ast.BinOp):
        return _PREC[_AST_OPS[type(node.op)]]
    if isinstance(node, ast.UnaryOp):
        return 13 if not isinstance(node.op, ast.Not) else 5
    if isinstance(node, ast.Compare):
        return 6
    if isinstance(node, (ast.BoolOp, ast.IfExp, ast.Lambda, ast.Tuple)):
        return 1
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and expr.startswith("-"):
        return 13
    return 99


def operand(expr: str, symbol: str, side: str) -> str:
    """``expr`` as the ``side`` operand of ``symbol``, parenthesised only where Python needs it
    (and around comparisons, which chain)."""
    child, parent = _precedence(expr), _PREC[symbol]
    if child < parent or (child == parent and (side == "right" or parent in (6, 14))):
        return f"({expr})"
    return expr


def _needs_parens(expr: str) -> bool:
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return True
    return isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.IfExp, ast.Lambda, ast.Tuple)) \
        or (isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and expr.startswith("-"))


# ----------------------------------------------------------------------------------------- #
# Module paths


def attr_access(root, path: str) -> str:
    """``self.layer1[0].conv1`` for the module path ``layer1.0.conv1`` below ``root``."""
    out, node = "self", root
    if not path:
        return out
    for part in path.split("."):
        kind = M.classify(node)
        if kind in ("sequential", "list") and part.isdigit():
            out += f"[{int(part)}]"
        elif kind in ("dict", "sequential"):
            out += f"[{part!r}]"
        else:
            if not part.isidentifier() or keyword.iskeyword(part):
                raise O.BindError(f"attribute name {part!r} is not a Python identifier")
            out += f".{part}"
        node = node[part] if kind == "dict" else getattr(node, part)
    return out


def resolve(root, path: str):
    """The object at ``path`` (a module, a parameter, a buffer) and its owner module."""
    owner, obj = None, root
    for part in path.split(".") if path else []:
        owner = obj
        obj = getattr(obj, part)
    return owner, obj


# ----------------------------------------------------------------------------------------- #
# One class


@dataclass
class ClassSource:
    qualname: str
    module: object
    init_lines: list
    call_lines: list | None  # None: a holder (its forward is inlined into its parent's)
    call_params: tuple = ()
    child_classes: list = field(default_factory=list)  # qualnames of generated children
    name: str = ""

    def text(self, name: str, top: bool) -> str:
        doc = _class_doc(self.module, self.call_lines is None)
        lines = [f"class {name}(nnx.Module):", f'    """{doc}"""', "",
                 "    def __init__(self, *, rngs: nnx.Rngs):"]
        if top:
            lines.append("        jaxlight.save_hyperparameters(self)")
        lines += ["        " + ln for ln in self.init_lines] or (["        pass"] if not top else [])
        if self.call_lines is not None:
            params = ", ".join(("self",) + self.call_params)
            lines += ["", f"    def __call__({params}):"]
            if top and self.call_params:
                # numpy inputs would keep numpy's operators (x * 2 stays numpy, without .at[]).
                names = ", ".join(self.call_params)
                lines.append(f"        {names} = {', '.join(f'jnp.asarray({p})' for p in self.call_params)}")
            lines += ["        " + ln for ln in self.call_lines]
        return "\n".join(lines)


def _class_doc(module, holder: bool) -> str:
    import inspect

    cls = type(module)
    where = ""
    try:
        if cls.__module__.startswith("torch."):
            raise TypeError  # (torch's own classes: the name says where)
        path = inspect.getsourcefile(cls)
        line = inspect.getsourcelines(cls)[1]
        from jaxlight.bridge.porting.capture import _short

        where = f" ({_short(path)}:{line})"
    except (OSError, TypeError):
        pass
    text = f"Port of torch ``{cls.__module__}.{cls.__qualname__}``{where}."
    if holder:
        text += " Holds the layers; its forward is written into the caller's ``__call__``."
    return text


class Emitter:
    """Writes one traced class's ``__call__`` (and collects its problems)."""

    def __init__(self, graph, classes: dict, problems: list):
        self.g = graph
        self.root = graph.module
        self.classes = classes  # qualname -> module of every generated class (for names in calls)
        self.problems = problems
        self.nodes = list(graph.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.site = {n: site_of_stack(n.stack_trace) for n in self.nodes}
        self.extra_attrs: list[tuple[str, str]] = []  # (name, constructor) not from torch (functional dropout)
        self.used_attrs: dict = {}  # numeric attributes of the torch module the code reads (self.heads)
        self.input_writes: dict = {}  # placeholder name -> the in-place node that writes it
        self.mode_info: dict = {}  # node -> (train value, eval value) of a mode-dependent argument
        self.ok = True

    # ------------------------------------------------------------------ problems
    def problem(self, node, what: str) -> None:
        self.ok = False
        self.problems.append(Problem(self.site.get(node, Site("<unknown>", 0)), what))

    # ------------------------------------------------------------------ analysis
    def analyse(self) -> None:
        self.resolved = {}
        for n in self.nodes:
            self.resolved[n] = self._resolve(n)
        self._compare_modes()
        # Asserts go, and what only feeds them (x.shape[1] <= 8): sizes are static under jit.
        for n in reversed(self.nodes):
            kind = self.resolved[n][0]
            if kind in ("op", "special") and n.users and all(self.resolved[u][0] == "drop" for u in n.users) \
                    and not (self.resolved[n][2] is not None and self.resolved[n][2].inplace):
                self.resolved[n] = ("drop", self.resolved[n][1], None)
        for n in reversed(self.nodes):
            if self.resolved[n][0] == "drop":
                self.g.graph.erase_node(n)
        self.nodes = [n for n in self.nodes if self.resolved[n][0] != "drop"]
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self._inplace()

    def _resolve(self, n):
        """``(kind, op name, Op or spec)`` of a node, recording a problem when unsupported."""
        if n.op in ("placeholder", "output"):
            return (n.op, None, None)
        if n.op == "get_attr":
            return ("get_attr", None, None)
        if n.op == "call_module":
            _, mod = resolve(self.root, n.target)
            kind = M.classify(mod)
            if kind == "layer":
                name = M.torch_layer_name(mod)
                spec = M.LAYERS[name]
                for issue in spec.check(mod):
                    self.problem(n, f"torch.nn.{name} {n.target!r}: {issue} is not supported")
                return ("layer", name, spec)
            if kind in ("class", "sequential"):
                return ("class", type(mod).__name__, None)
            self.problem(n, f"module {n.target!r} ({type(mod).__module__}.{type(mod).__qualname__}) is not supported")
            return ("bad", None, None)
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_assert" and \
                getattr(n.target, "__module__", "").startswith("torch"):
            return ("drop", "assert", None)  # an assert on sizes: static under jit, nothing to compute
        if n.op == "call_function":
            name = O.function_name(n.target)
            label = _function_label(n.target)
        else:
            name = O.method_name(n.target)
            label = f"Tensor.{n.target}"
        if name in O.RANDOM:
            self.problem(n, f"{label}: random numbers in forward (JAX's and torch's generators differ)")
            return ("bad", name, None)
        if name in ("getitem", "getattr", "setitem"):
            return ("special", name, None)
        op = O.OPS.get(name) if name else None
        if op is None:
            self.problem(n, f"{label} is not supported")
            return ("bad", name, None)
        return ("op", name, op)

    def _compare_modes(self) -> None:
        """Train- and eval-mode graphs must be the same but for dropout written as a function
        of ``self.training``: those become an ``nnx.Dropout`` of their own."""
        a, b = self.nodes, list(self.g.eval_graph.nodes)
        ia = {n: i for i, n in enumerate(a)}
        ib = {n: i for i, n in enumerate(b)}

        def norm(v, index):
            if hasattr(v, "op") and hasattr(v, "users"):
                return ("node", index[v])
            if isinstance(v, (tuple, list)):
                return tuple(norm(x, index) for x in v)
            if isinstance(v, dict):
                return tuple((k, norm(x, index)) for k, x in sorted(v.items()))
            if isinstance(v, slice):
                return ("slice", norm(v.start, index), norm(v.stop, index), norm(v.step, index))
            try:
                hash(v)
                return v
            except TypeError:
                return repr(v)

        for k, (na, nb) in enumerate(zip(a, b)):
            same_call = na.op == nb.op and (na.target == nb.target or (
                na.op == "call_function" and na.target is nb.target))
            if na.op == nb.op == "get_attr" and "constant" in na.meta and "constant" in nb.meta:
                ca, cb = na.meta["constant"], nb.meta["constant"]
                same_call = ca.shape == cb.shape and ca.dtype == cb.dtype and bool((ca == cb).all())
            if not same_call:
                self.problem(na, f"forward takes a different path in train and eval mode (self.training): "
                                 f"{_describe(na)} in train mode, {_describe(nb)} in eval mode")
                return
            name = self.resolved[na][1]
            if name in ("dropout", "scaled_dot_product_attention"):
                self._mode_dropout_info(na, nb, name)
                continue
            if norm(na.args, ia) != norm(nb.args, ib) or norm(na.kwargs, ia) != norm(nb.kwargs, ib):
                self.problem(na, f"forward calls {_describe(na)} with different arguments in train and eval mode "
                                 f"(self.training)")
                return
        if len(a) != len(b):
            extra = (a if len(a) > len(b) else b)[min(len(a), len(b))]
            self.problem(extra if extra in self.site else a[-1],
                         "forward takes a different path in train and eval mode (self.training)")

    def _mode_dropout_info(self, na, nb, name):
        op = self.resolved[na][2]
        try:
            ba = op.sig.bind(na.args, na.kwargs)
            bb = op.sig.bind(nb.args, nb.kwargs)
        except O.BindError:
            return
        if name == "dropout":
            pa = ba["p"] if ba["training"] else 0.0
            pb = bb["p"] if bb["training"] else 0.0
        else:
            pa, pb = ba["dropout_p"], bb["dropout_p"]
        if not isinstance(pa, (int, float)) or not isinstance(pb, (int, float)):
            self.problem(na, f"{name}: a dropout probability computed in forward is not supported")
            return
        if pb:
            self.problem(na, f"{name}: dropout with p={pb} is applied in eval mode too (pass "
                             f"training=self.training / dropout_p=... if self.training else 0.0)")
            return
        self.mode_info[na] = float(pa)

    # ------------------------------------------------------------------ in-place ops
    def _inplace(self) -> None:
        for n in self.nodes:
            target = self._inplace_target(n)
            if target is None:
                continue
            if not (hasattr(target, "op") and isinstance(target.meta.get("jl"), TensorInfo)):
                continue
            if n.meta.get("jl") is None:  # x[i] = v returns None: its value is the updated x
                n.meta["jl"] = target.meta["jl"]
            base = self._alias_root(target)
            group = [m for m in self.nodes if m is not target and self._alias_root(m) is base]
            after = [u for m in group for u in m.users if self.pos[u] > self.pos[n] and u is not n]
            if after:
                self.problem(n, f"{_describe(n)} writes in place to a view whose other views or base are used "
                                f"afterwards (line {self.site[after[0]].line}); not supported")
                continue
            if base.op == "placeholder" and self.g.qualname and base is target:
                # A submodule writing its own input (nn.Sequential(nn.ReLU(inplace=True), ...)):
                # the caller's value changes; translate.py checks at each call site that nothing
                # reads that value afterwards.
                self.input_writes[base.target] = n
            elif base.op in ("placeholder", "get_attr"):
                what = "an input of forward" if base.op == "placeholder" else f"parameter/buffer {base.target!r}"
                self.problem(n, f"{_describe(n)} writes in place to {what}" +
                             (" (through a view)" if base is not target else "") + "; not supported")
                continue
            for u in list(target.users):
                if u is not n and self.pos[u] > self.pos[n]:
                    u.replace_input_with(target, n)
            self.inplace_nodes = getattr(self, "inplace_nodes", {})
            self.inplace_nodes[n] = target

    def check_input_writes(self, call, params: tuple, written: set) -> set:
        """At ``call`` (this graph calling a submodule that writes its inputs ``written``): the
        values passed there must not be read afterwards, nor be this graph's parameters or
        buffers. Returns the names of this graph's own inputs passed through (written too)."""
        passed = set()
        for i, name in enumerate(params):
            if name not in written:
                continue
            arg = call.args[i] if i < len(call.args) else call.kwargs.get(name)
            if not _is_node(arg):
                continue
            base = self._alias_root(arg)
            group = [m for m in self.nodes if self._alias_root(m) is base]
            after = [u for m in group for u in m.users if self.pos.get(u, -1) > self.pos[call]]
            if base.op == "get_attr":
                self.problem(call, f"{_describe(call)} writes in place to parameter/buffer {base.target!r}; "
                                   f"not supported")
            elif after:
                self.problem(call, f"{_describe(call)} writes its input in place, and that value is read again "
                                   f"afterwards (line {self.site[after[0]].line}); not supported")
            elif base.op == "placeholder":
                if self.g.qualname:
                    passed.add(base.target)
                else:
                    self.problem(call, f"{_describe(call)} writes in place to an input of forward; not supported")
        return passed

    def _inplace_target(self, n):
        kind, name, op = self.resolved.get(n, (None, None, None))
        if kind == "special" and name == "setitem":
            return n.args[0]
        if kind == "op":
            if op.inplace:
                return n.args[0]
            try:
                b = op.sig.bind(n.args, n.kwargs)
            except O.BindError:
                return None
            if b.get("inplace") is True:
                return b.get("input")
            if name in _BINARY_INPLACE:
                _, _, aug = assigned_names(self.site[n])
                if aug and not any(self.site[u] == self.site[n] and u.op != "output" for u in n.users):
                    return n.args[0]
        if kind == "layer":
            _, mod = resolve(self.root, n.target)
            if getattr(mod, M.INPLACE_ATTR, False) and n.args:
                return n.args[0]
        return None

    def _alias_root(self, n):
        seen = 0
        while hasattr(n, "op") and seen < 10000:
            seen += 1
            kind, name, _ = self.resolved.get(n, (None, None, None))
            if n.op == "call_method" and n.target in _VIEW_METHODS or (
                    kind == "op" and name in _VIEW_METHODS):
                n = n.args[0]
            elif kind == "special" and name == "getitem" and hasattr(n.args[0], "op") and not _advanced(n.args[1]):
                n = n.args[0]
            else:
                return n
        return n

    # ------------------------------------------------------------------ emission
    def emit(self) -> list[str]:
        self.layout: dict = {}
        self.expr: dict = {}
        self.inline: set = set()
        self.var: dict = {}
        self.name_numbers()
        self.plan_inline()
        self.plan_names()
        lines = []
        for n in self.nodes:
            if n.op == "placeholder":
                self.layout[n] = "cf"
                continue
            try:
                text = self.node_expr(n)
            except O.BindError as exc:
                self.problem(n, f"{_describe(n)}: {exc}")
                text = "None"
            inner = n.users and all(u.meta.get("no_grad") and self.site[u] == self.site[n] for u in n.users)
            if n.meta.get("no_grad") and not inner and self.resolved[n][1] not in _NO_GRAD_ANYWAY:
                text = f"jax.lax.stop_gradient({text})"  # computed under torch.no_grad() in forward
            self.expr[n] = text
            if n.op == "output":
                lines.append(f"return {text[1:-1] if isinstance(n.args[0], tuple) and len(n.args[0]) > 1 else text}")
                continue
            if n in self.inline or n in self.absorbed:
                continue
            target = self.unpack.get(n) or self.var[n]
            lines.append(f"{target} = {text}")
        return lines

    # Which nodes are written inside the expression of their user.
    def plan_inline(self) -> None:
        cand = set()
        for n in self.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":
                cand.add(n)
                continue
            if len(n.users) != 1:
                continue
            (u,) = n.users
            if getattr(self, "inplace_nodes", {}).get(u) is n:
                continue  # the target of an in-place op keeps its name
            returned = u.op == "output" and self.site[n].text.startswith("return")
            if self._is_shape(n) or self._same_statement(n, u) or returned:
                cand.add(n)
        changed = True
        while changed:
            changed = False
            for n in list(cand):
                if n.op == "get_attr":
                    continue
                s = self._statement(n, cand)
                between = self.nodes[self.pos[n] + 1:self.pos[s]]
                if any(k not in cand or self._statement(k, cand) is not s for k in between if k.op != "get_attr"):
                    cand.discard(n)
                    changed = True
        self.inline = cand

    def _statement(self, n, cand):
        while n in cand and n.users:
            n = next(iter(n.users))
        return n

    def _is_shape(self, n) -> bool:
        kind, name, _ = self.resolved.get(n, (None, None, None))
        return (kind == "special" and name == "getattr" and n.args[1] in ("shape", "dtype", "device", "ndim")) or (
            kind == "op" and name in ("size", "dim")) or (
            kind == "special" and name == "getitem" and not isinstance(n.args[0].meta.get("jl"), TensorInfo)
            and hasattr(n.args[0], "op") and self._is_shape(n.args[0]))

    def _emit_pos(self, n) -> int:
        return self.pos[self._statement(n, self.inline)]

    def plan_names(self) -> None:
        self.unpack: dict = {}
        self.absorbed: set = set()
        holder: dict[str, object] = {}
        for n in self.nodes:
            if n.op == "placeholder":
                self.var[n] = _ident(n.target)
                holder[self.var[n]] = n
        statements = [n for n in self.nodes if n.op not in ("placeholder", "output") and n not in self.inline]
        for n in statements:
            if n in self.absorbed:
                continue
            site = self.site[n]
            name, names, aug = assigned_names(site)
            finals = [s for s in statements if self.site[s] == site and not any(
                self._same_statement(s, u) and u.op != "output" and (u in statements or u in self.inline)
                for u in s.users)]
            want = None
            if names and self._unpackable(n, names):
                self._plan_unpack(n, names, holder)
                continue
            if names and self._unpackable(n, names, inlined=True):
                # B, T = x.size(): name the sizes even where each is used once.
                for u in n.users:
                    self.inline.discard(u)
                self._plan_unpack(n, names, holder)
                continue
            if n in finals and name and (n is finals[-1] or self._loop_iteration(n, finals[-1])):
                want = name
            elif names and len(finals) == len(names) and n in finals and isinstance(names[finals.index(n)], str):
                want = names[finals.index(n)]  # q, k, v = qkv[0], qkv[1], qkv[2]
            inplace_target = getattr(self, "inplace_nodes", {}).get(n)
            if want is None and inplace_target is not None and inplace_target in self.var:
                want = self.var[inplace_target]
            self.var[n] = self._claim(want or n.name, n, holder)

    def _iterations(self) -> dict:
        """``{node: k}``: the iteration of a Python loop a node comes from. A line run several
        times (``for blk in self.blocks: x = x + blk(self.ln(x))``) leaves the same sequence of
        operations on it again and again (modules compared up to their index in a list); each
        repetition is written as a statement of its own. A single op repeated (``a + b + c``)
        is one expression, not a loop."""
        pattern = lambda t: re.sub(r"\.\d+(?=\.|$)", ".*", t)  # noqa: E731
        by_site: dict = {}
        for n in self.nodes:
            if n.op in ("call_module", "call_function", "call_method"):
                by_site.setdefault(self.site[n], []).append(n)
        out = {}
        for site, nodes in by_site.items():
            sig = [(n.op, pattern(n.target) if n.op == "call_module" else n.target) for n in nodes]
            for p in range(1, len(sig) // 2 + 1):
                if len(sig) % p or sig != sig[:p] * (len(sig) // p):
                    continue
                if p == 1 and sig[0][0] != "call_module":
                    break
                for i, n in enumerate(nodes):
                    out[n] = i // p
                break
        return out

    def _loop_iteration(self, n, u) -> bool:
        """Whether ``u`` comes from a later iteration of the loop ``n`` is in (see :meth:`_iterations`)."""
        if not hasattr(self, "_iteration"):
            self._iteration = self._iterations()
        return self.site[n] == self.site[u] and self._iteration.get(n, 0) != self._iteration.get(u, 0)

    def _same_statement(self, n, u) -> bool:
        return self.site[u] == self.site[n] and not self._loop_iteration(n, u)

    def _unpackable(self, n, names, inlined: bool = False) -> bool:
        users = list(n.users)
        if not users or not isinstance(n.meta.get("jl"), tuple):
            return False
        for u in users:
            kind, name, _ = self.resolved.get(u, (None, None, None))
            if not (kind == "special" and name == "getitem" and isinstance(u.args[1], int) and u.args[0] is n
                    and self.site[u] == self.site[n] and (inlined or u not in self.inline)):
                return False
            if inlined and u in self.inline and not self._is_shape(u):
                return False
            if not 0 <= u.args[1] < len(names):
                return False
        return len(n.meta["jl"]) == len(names)

    def _plan_unpack(self, n, names, holder) -> None:
        """``a, (h, c) = ...``: the value's getitem users take the names of the assignment's
        targets, nested tuples included; ``_`` stays ``_`` where nothing reads it."""
        self.unpack[n] = self._pattern(n, names, holder)
        self.var[n] = "(" + self.unpack[n] + ")"

    def _pattern(self, n, names, holder) -> str:
        parts = []
        by_index = {u.args[1]: u for u in n.users}
        for i, nm in enumerate(names):
            u = by_index.get(i)
            if u is None:
                parts.append("_")
                continue
            self.absorbed.add(u)
            if isinstance(nm, list) and self._unpackable(u, nm):
                inner = self._pattern(u, nm, holder)
                self.var[u] = "(" + inner + ")"
                parts.append(self.var[u])
                continue
            if nm == "_" and not u.users:
                self.var[u] = "_"
            elif isinstance(nm, str) and nm != "_":
                self.var[u] = self._claim(nm, u, holder)
            else:
                self.var[u] = self._claim(u.name, u, holder)
            parts.append(self.var[u])
        return ", ".join(parts)

    def _claim(self, want: str, n, holder: dict) -> str:
        base = _ident(want)
        candidate, k = base, 0
        while True:
            h = holder.get(candidate)
            if h is None or h is n or not any(self._emit_pos(u) > self.pos[n] for u in h.users):
                if not self._name_used_later_by_other(candidate, n, holder):
                    holder[candidate] = n
                    return candidate
            k += 1
            candidate = f"{base}_{k}"

    def _name_used_later_by_other(self, name, n, holder) -> bool:
        return False

    # ------------------------------------------------------------------ expressions
    def ref(self, v, want: str, wrap: bool = False) -> str:
        """The expression of an argument value in layout ``want``."""
        if hasattr(v, "op") and hasattr(v, "users"):
            text = self.expr[v] if v in self.inline else self.var[v]
            info = v.meta.get("jl")
            have = self.layout.get(v, "cf")
            if isinstance(info, TensorInfo) and info.ndim >= 3 and have != want:
                return f"F.channels_{'last' if want == 'cl' else 'first'}({text})"
            return f"({text})" if wrap and v in self.inline and _needs_parens(text) else text
        return self.literal(v, wrap)

    def name_numbers(self) -> None:
        """Numbers the source line reads from the module's own attributes (``self.heads``,
        ``x * self.scale``): fx sees only their values; the generated code keeps the names
        (and ``__init__`` sets them). A number is named only where the line's syntax puts
        ``self.<attr>`` in that very argument, so a ``2`` elsewhere on the line stays ``2``."""
        for n in self.nodes:
            if n.op not in ("call_function", "call_method") or not self._in_own_forward(self.site[n]):
                continue
            uses = _self_attribute_arguments(self.site[n].text)
            if not uses:
                continue
            if n.op == "call_method":
                key, offset = n.target, 1
            else:
                key, offset = _callable_key(n.target), 0
            args = list(n.args)
            for i in range(offset, len(args)):
                args[i] = self._named(args[i], uses.get((key, i - offset)))
            kwargs = {k: self._named(v, uses.get((key, k))) for k, v in n.kwargs.items()}
            n.args, n.kwargs = tuple(args), kwargs

    def _named(self, value, attr):
        if attr is None:
            return value
        if isinstance(attr, tuple):  # a tuple argument: element by element
            if isinstance(value, (tuple, list)) and len(value) == len(attr):
                return type(value)(self._named(v, a) for v, a in zip(value, attr))
            return value
        own = self.root.__dict__.get(attr)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and type(own) is type(value) \
                and own == value:
            self.used_attrs[attr] = own
            return (_NamedInt if isinstance(value, int) else _NamedFloat)(value, f"self.{attr}")
        return value

    def _in_own_forward(self, site) -> bool:
        import inspect

        if not hasattr(self, "_forward_lines"):
            try:
                fn = type(self.root).forward
                lines, start = inspect.getsourcelines(fn)
                self._forward_lines = (inspect.getsourcefile(fn), start, start + len(lines))
            except (OSError, TypeError):
                self._forward_lines = None
        f = self._forward_lines
        return f is not None and site.file == f[0] and f[1] <= site.line < f[2]

    def literal(self, v, wrap: bool = False) -> str:
        import torch

        if isinstance(v, bool) or v is None:
            return repr(v)
        if isinstance(v, (_NamedInt, _NamedFloat)):
            return v.expr
        if isinstance(v, float):
            if math.isinf(v):
                text = "math.inf" if v > 0 else "-math.inf"
            elif math.isnan(v):
                text = "math.nan"
            else:
                text = repr(v)
            return f"({text})" if wrap and text.startswith("-") else text
        if isinstance(v, int):
            return f"({v})" if wrap and v < 0 else repr(v)
        if isinstance(v, str):
            return repr(v)
        if isinstance(v, torch.dtype):
            return dtype_expr(v)
        if isinstance(v, torch.device):
            return "None"
        if isinstance(v, torch.Size):
            v = tuple(v)
        if isinstance(v, tuple):
            items = [self.ref(x, "cf") for x in v]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if isinstance(v, list):
            return "[" + ", ".join(self.ref(x, "cf") for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {self.ref(x, 'cf')}" for k, x in v.items()) + "}"
        if isinstance(v, slice):
            return "slice(" + ", ".join(self.ref(x, "cf") for x in (v.start, v.stop, v.step)) + ")"
        if v is Ellipsis:
            return "..."
        if isinstance(v, torch.Tensor):
            return self.tensor_literal(v)
        raise O.BindError(f"a constant of type {type(v).__name__} ({v!r:.40}) is not supported")

    def tensor_literal(self, t) -> str:
        if t.numel() > 0 and bool((t == t.reshape(-1)[0]).all()):
            return f"jnp.full({tuple(t.shape)!r}, {t.reshape(-1)[0].item()!r}, dtype={dtype_expr(t.dtype)})"
        expanded = [st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)]
        if any(expanded):  # an expanded constant: the small one, broadcast
            base = t[tuple(slice(0, 1) if e else slice(None) for e in expanded)].clone()
            return f"jnp.broadcast_to({self.tensor_literal(base)}, {tuple(t.shape)!r})"
        if t.numel() > 256:
            raise O.BindError(f"a constant tensor of {t.numel()} elements inside forward is not supported "
                              f"(register it as a buffer)")
        return f"jnp.asarray({t.tolist()!r}, dtype={dtype_expr(t.dtype)})"

    def node_expr(self, n) -> str:
        kind, name, spec = self.resolved[n]
        if n.op == "output":
            self.layout[n] = "cf"
            return self.ref(n.args[0], "cf") if hasattr(n.args[0], "op") else self.literal(n.args[0])
        if kind == "get_attr":
            self.layout[n] = "cf"
            return self.get_attr(n)
        if kind == "bad":
            return "None"
        info = n.meta.get("jl")
        if kind == "layer":
            mod = resolve(self.root, n.target)[1]
            mode = self._mode_for(spec.layout, [a for a in n.args if _is_node(a)], n)
            call = attr_access(self.root, n.target)
            args = [self.ref(a, mode) for a in n.args] + [f"{k}={self.ref(v, mode)}" for k, v in n.kwargs.items()]
            self._check_layer_call(n, mod, spec)
            self._set_layout(n, mode)
            return f"{call}({', '.join(args)})"
        if kind == "class":
            call = attr_access(self.root, n.target)
            args = [self.ref(a, "cf") for a in n.args] + [f"{k}={self.ref(v, 'cf')}" for k, v in n.kwargs.items()]
            self.layout[n] = "cf"
            return f"{call}({', '.join(args)})"
        if kind == "special":
            return getattr(self, "_" + name)(n, info)
        op = spec
        bound = op.sig.bind(n.args, n.kwargs)
        tensors = []
        for key in op.tensor_args:
            v = bound.get(key)
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if _is_node(x):
                    tensors.append(x)
        mode = self._mode_for(op.layout, tensors, n)
        ctx = _Ctx(self, mode, name.split(".")[-1], n)
        text = op.emit(ctx, bound)
        self._set_layout(n, mode)
        return text

    def _set_layout(self, n, mode):
        info = n.meta.get("jl")
        self.layout[n] = mode if isinstance(info, TensorInfo) and info.ndim >= 3 else "cf"

    def _mode_for(self, layout: str, tensors: list, n) -> str:
        infos = [t.meta.get("jl") for t in tensors]
        big = [(t, i) for t, i in zip(tensors, infos) if isinstance(i, TensorInfo) and i.ndim >= 3]
        if layout == "cl":
            return "cl"
        if layout in ("any", "cat"):
            out = n.meta.get("jl")
            if not big or not isinstance(out, TensorInfo) and layout == "any":
                return "cf"
            ranks = {i.ndim for _, i in big}
            others = [i for t, i in zip(tensors, infos) if isinstance(i, TensorInfo) and 0 < i.ndim < 3]
            if len(ranks) == 1 and not others and all(self.layout.get(t) == "cl" for t, _ in big):
                if layout == "cat" or (isinstance(out, TensorInfo) and out.ndim == next(iter(ranks))):
                    return "cl"
            return "cf"
        return "cf"

    def _check_layer_call(self, n, mod, spec) -> None:
        import inspect

        names = list(inspect.signature(type(mod).forward).parameters)[1:]
        for issue in spec.call_check(mod, {**dict(zip(names, n.args)), **n.kwargs}):
            raise O.BindError(issue)
        if spec.layout == "cl" and n.args and _is_node(n.args[0]):
            info = n.args[0].meta.get("jl")
            name = type(mod).__name__
            want = {"1d": (2, 3), "2d": (4,), "3d": (5,)}
            for suffix, ranks in want.items():
                if name.endswith(suffix) and isinstance(info, TensorInfo) and info.ndim not in ranks:
                    raise O.BindError(f"{name} on an input of shape {info.shape}: unbatched input is not supported")

    # getattr / getitem / setitem
    def _getattr(self, n, info) -> str:
        obj, attr = n.args[0], n.args[1]
        self.layout[n] = "cf"
        if attr in ("shape", "ndim"):
            return f"{self.ref(obj, 'cf', wrap=True)}.{attr}"
        if attr == "dtype":
            return f"{self.ref(obj, self.layout.get(obj, 'cf'), wrap=True)}.dtype"
        if attr in ("device", "is_cuda"):
            return "None" if attr == "device" else "False"
        if attr == "T":
            return f"jnp.transpose({self.ref(obj, 'cf')})"
        if attr == "mT":
            return f"jnp.swapaxes({self.ref(obj, 'cf')}, -1, -2)"
        if attr == "data":
            return f"jax.lax.stop_gradient({self.ref(obj, 'cf')})"
        if attr in ("values", "indices") and not isinstance(obj.meta.get("jl"), TensorInfo):
            return f"{self.ref(obj, 'cf', wrap=True)}.{attr}"
        raise O.BindError("this attribute is not supported")

    def _getitem(self, n, info) -> str:
        obj, idx = n.args
        src = obj.meta.get("jl") if _is_node(obj) else None
        self.layout[n] = "cf"
        if isinstance(src, TensorInfo):
            if _bool_index(idx):
                raise O.BindError("indexing with a boolean mask has a data-dependent shape (use torch.where)")
            return f"{self.ref(obj, 'cf', wrap=True)}[{self.index(idx)}]"
        return f"{self.ref(obj, 'cf', wrap=True)}[{self.index(idx)}]"

    def _setitem(self, n, info) -> str:
        obj, idx, value = n.args
        if _bool_index(idx):
            raise O.BindError("assignment through a boolean mask is not supported (use torch.where)")
        self.layout[n] = "cf"
        return f"{self.ref(obj, 'cf', wrap=True)}.at[{self.index(idx)}].set({self.ref(value, 'cf')})"

    def index(self, idx) -> str:
        if isinstance(idx, tuple):
            if not idx:
                return "()"
            return ", ".join(self.index(i) for i in idx) + ("," if len(idx) == 1 else "")
        if isinstance(idx, slice):
            parts = ["" if v is None else self.ref(v, "cf") for v in (idx.start, idx.stop, idx.step)]
            text = f"{parts[0]}:{parts[1]}"
            return text + (f":{parts[2]}" if parts[2] else "")
        if idx is Ellipsis:
            return "..."
        if idx is None:
            return "None"
        return self.ref(idx, "cf")

    def get_attr(self, n) -> str:
        import torch

        if "constant" in n.meta:
            return self.tensor_literal(n.meta["constant"])
        owner, obj = resolve(self.root, n.target)

        path, _, attr = n.target.rpartition(".")
        owner_mod = resolve(self.root, path)[1] if path else self.root
        kind = M.classify(owner_mod) if owner_mod is not self.root else "class"
        if kind == "layer":
            spec = M.LAYERS[M.torch_layer_name(owner_mod)]
            rules, _ = spec.rules(owner_mod, "", ())
            for r in rules:
                if r.torch_name == attr:
                    base = f"{attr_access(self.root, path)}.{'.'.join(r.jax_path)}[...]"
                    return _torch_layout_expr(r, base)
            raise O.BindError(f"{n.target}: attribute of a torch.nn layer not supported")
        if isinstance(obj, torch.nn.Parameter) or (attr in owner_mod._buffers and obj is not None):
            if attr in owner_mod._buffers and attr in getattr(owner_mod, "_non_persistent_buffers_set", ()):
                if obj.numel() <= 64:
                    return self.tensor_literal(obj)
                raise O.BindError(f"non-persistent buffer {n.target!r} ({obj.numel()} elements) is not in the "
                                  f"state_dict; register it as a persistent buffer")
            return f"{attr_access(self.root, path)}.{attr}[...]" if path else f"self.{attr}[...]"
        if isinstance(obj, torch.Tensor):
            return self.tensor_literal(obj)
        raise O.BindError(f"attribute {n.target!r} of type {type(obj).__name__} is not supported")

    def dropout_layer(self, node, p: float) -> str:
        taken = {a for a, _ in self.extra_attrs} | set(dict(self.root.named_children())) | set(
            dict(self.root.named_parameters(recurse=False))) | set(dict(self.root.named_buffers(recurse=False)))
        base = "dropout_fn"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        self.extra_attrs.append((name, f"nn.Dropout({p!r}, rngs=rngs)  # {_describe(node)} of forward, "
                                       f"switched by model.train() / model.eval()"))
        return f"self.{name}"


class _NamedInt(int):
    """An int that came from ``self.<attr>``: behaves as the number, written as the name."""

    def __new__(cls, value, expr):
        obj = super().__new__(cls, value)
        obj.expr = expr
        return obj


class _NamedFloat(float):
    def __new__(cls, value, expr):
        obj = super().__new__(cls, value)
        obj.expr = expr
        return obj


_AST_NAMES = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv", ast.FloorDiv: "floordiv",
              ast.Mod: "mod", ast.Pow: "pow", ast.MatMult: "matmul"}


def _self_attribute_arguments(text: str) -> dict:
    """``{(callable, position or keyword): attr}`` for each argument of a call or operand of an
    arithmetic operator on the line that is exactly ``self.<attr>`` (tuples element by element:
    the value is then a tuple of attrs or None)."""
    try:
        tree = ast.parse(text.strip().rstrip(":"))
    except SyntaxError:
        return {}

    def attr_of(node):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return node.attr
        if isinstance(node, (ast.Tuple, ast.List)):
            inner = tuple(attr_of(e) for e in node.elts)
            return inner if any(a is not None for a in inner) else None
        return None

    uses: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else None)
            if name is None:
                continue
            for i, a in enumerate(node.args):
                if attr_of(a) is not None:
                    uses.setdefault((name, i), attr_of(a))
            for kw in node.keywords:
                if kw.arg and attr_of(kw.value) is not None:
                    uses.setdefault((name, kw.arg), attr_of(kw.value))
        elif isinstance(node, ast.BinOp) and type(node.op) in _AST_NAMES:
            name = _AST_NAMES[type(node.op)]
            for i, a in enumerate((node.left, node.right)):
                if attr_of(a) is not None:
                    uses.setdefault((name, i), attr_of(a))
    return uses


def _callable_key(target) -> str:
    return getattr(target, "__name__", "")


# Ops whose result never has a gradient in torch: no need to say so again.
_NO_GRAD_ANYWAY = {"detach", "new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like",
                   "full_like", "empty_like", "getattr", "size", "dim"}


def _torch_layout_expr(rule: Rule, base: str) -> str:
    """The expression giving a converted NNX parameter back in torch's layout."""
    if rule.kind in ("linear", "lstm"):
        return f"{base}.T"
    if rule.kind == "conv":
        return f"jnp.transpose({base}, (3, 2, 0, 1))"
    if rule.kind == "conv1d":
        return f"jnp.transpose({base}, (2, 1, 0))"
    return base


class _Ctx:
    """What an :class:`jaxlight.bridge.porting.ops.Op` sees while writing its expression."""

    def __init__(self, emitter: Emitter, mode: str, name: str, node):
        self.em, self.mode, self.name, self.node = emitter, mode, name, node

    def e(self, v, wrap: bool = False) -> str:
        return self.em.ref(v, self.mode, wrap)

    def operand(self, v, symbol: str, side: str) -> str:
        return operand(self.em.ref(v, self.mode), symbol, side)

    def kw(self, b, key, default) -> str:
        v = b[key]
        return "" if v == default else f", {key}={self.e(v)}"

    def axis(self, dim) -> str:
        if isinstance(dim, (tuple, list)):
            return self.tuple_expr(dim)
        return self.e(dim)

    def tuple_expr(self, seq) -> str:
        seq = tuple(seq) if isinstance(seq, (tuple, list)) else (seq,)
        if len(seq) == 1 and _is_node(seq[0]) and isinstance(seq[0].meta.get("jl"), tuple):
            return self.e(seq[0])
        items = [self.e(x) for x in seq]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"

    def cat_axis(self, b) -> str:
        dim = b["dim"]
        if self.mode != "cl":
            return self.e(dim)
        first = next(t for t in b["tensors"] if _is_node(t))
        ndim = first.meta["jl"].ndim
        d = dim % ndim
        return str(0 if d == 0 else (ndim - 1 if d == 1 else d - 1))

    def is_tensor(self, v) -> bool:
        return _is_node(v) and isinstance(v.meta.get("jl"), TensorInfo)

    def is_dtype(self, v) -> bool:
        import torch

        return isinstance(v, torch.dtype) or (_is_node(v) and isinstance(v.meta.get("jl"), torch.dtype))

    def is_device(self, v) -> bool:
        import torch

        return isinstance(v, (torch.device, str)) or (_is_node(v) and v.meta.get("jl") == "device")

    def dtype_expr(self, name: str) -> str:
        return dtype_expr(name)

    def mode_dropout(self, b, param: str = "p"):
        p = self.em.mode_info.get(self.node)
        if not p:
            return None
        return self.em.dropout_layer(self.node, p)


def _is_node(v) -> bool:
    return hasattr(v, "op") and hasattr(v, "users")


def _advanced(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(_is_node(i) and isinstance(i.meta.get("jl"), TensorInfo) or isinstance(i, list) for i in items)


def _bool_index(idx) -> bool:
    import torch

    items = idx if isinstance(idx, tuple) else (idx,)
    return any(_is_node(i) and isinstance(i.meta.get("jl"), TensorInfo) and i.meta["jl"].dtype == torch.bool
               for i in items)


def _function_label(target) -> str:
    """How the user wrote a function: ``torch.nonzero``, ``F.gelu``, ``torch.fft.fft``..."""
    import operator

    import torch
    import torch.nn.functional as TF

    for label, ns in (("torch", torch), ("F", TF), ("torch.fft", torch.fft), ("torch.linalg", torch.linalg),
                      ("torch.special", torch.special), ("math", math), ("operator", operator)):
        for name in dir(ns):
            if not name.startswith("_") and getattr(ns, name, None) is target:
                return f"{label}.{name}"
    mod = getattr(target, "__module__", "") or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    return f"{mod + '.' if mod else ''}{name}"


def _describe(n) -> str:
    if n.op == "call_module":
        return f"self.{n.target}(...)"
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    if n.op == "call_function":
        import builtins
        import operator

        if n.target is builtins.getattr:
            return f"Tensor.{n.args[1]}"
        if n.target is operator.getitem:
            return "indexing"
        if n.target is operator.setitem:
            return "item assignment"
        return _function_label(n.target)
    return f"{n.op} {n.target}"
