"""The translation table: each torch function, tensor method and operator the port supports,
as the JAX expression it becomes.

An :class:`Op` binds the call's arguments to torch's signature (so ``x.sum(1, keepdim=True)``
and ``torch.sum(x, dim=1, keepdim=True)`` are one case), then writes one expression with the
codegen context (``ctx.e(value)``: an argument's expression). ``layout`` says how the op treats
channels-last feature maps (``jaxlight.bridge.porting.nn``): ``"any"`` for elementwise ops (they run in
whatever layout their inputs are in), ``"cl"`` for pools (channels-last in and out), ``"cf"``
for everything else (torch's layout; the codegen converts channels-last inputs first).

Anything not in this table is refused by ``translate()`` with its source line.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Callable

REQUIRED = object()


class BindError(ValueError):
    """Arguments that do not fit the op's signature (or a value the port cannot take)."""


@dataclass
class Sig:
    params: list  # [(name, default, kind)] kind: "pos", "var", "kw"

    @classmethod
    def parse(cls, text: str) -> "Sig":
        params, kwonly = [], False
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            if part == "*":
                kwonly = True
                continue
            if part.startswith("*"):
                params.append((part[1:], (), "var"))
                kwonly = True
                continue
            name, _, default = part.partition("=")
            value = REQUIRED if not default else eval(default, {"math": math})  # noqa: S307 - our literals
            params.append((name.strip(), value, "kw" if kwonly else "pos"))
        return cls(params)

    def bind(self, args, kwargs) -> dict:
        out, args = {}, list(args)
        kwargs = {_ALIASES.get(k, k): v for k, v in kwargs.items()}
        for name, default, kind in self.params:
            if kind == "var":
                rest = args
                args = []
                if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                    rest = list(rest[0])
                if name in kwargs:
                    rest = list(kwargs.pop(name))
                out[name] = tuple(rest)
            elif kind == "pos" and args:
                out[name] = args.pop(0)
            elif name in kwargs:
                out[name] = kwargs.pop(name)
            elif default is REQUIRED:
                raise BindError(f"missing argument {name!r}")
            else:
                out[name] = default
        ignored = {k for k in kwargs if k in _IGNORED_KWARGS or (k == "out" and kwargs[k] is None)}
        for k in ignored:
            kwargs.pop(k)
        if args:
            raise BindError(f"{len(args)} more positional argument(s) than supported")
        if kwargs:
            raise BindError(f"argument(s) {sorted(kwargs)} not supported")
        return out


_ALIASES = {"axis": "dim", "keepdims": "keepdim", "x": "input", "self": "input"}
# Placement and memory arguments: nothing to translate on the JAX side.
_IGNORED_KWARGS = {"device", "layout", "pin_memory", "memory_format", "requires_grad", "non_blocking", "copy"}


@dataclass
class Op:
    sig: Sig
    emit: Callable  # (ctx, bound) -> str
    layout: str = "cf"  # "cf", "any" (elementwise), "cl" (channels-last pools), "cat"
    inplace: bool = False  # the op writes its first argument (x.add_(y), x[i] = v)
    tensor_args: tuple = ("input",)
    pure: bool = True


OPS: dict[str, Op] = {}


def op(names, sig: str, layout: str = "cf", inplace: bool = False, tensor_args=("input",)):
    def deco(fn):
        for n in names.split():
            OPS[n] = Op(Sig.parse(sig), fn, layout, inplace, tuple(tensor_args))
        return fn

    return deco


def simple(names: str, template: str, sig: str = "input", layout: str = "cf", tensor_args=("input",)):
    """An op written as a template over its bound arguments' expressions (a ``*sizes``
    argument as one tuple)."""
    varargs = {name for name, _, kind in Sig.parse(sig).params if kind == "var"}

    def emit(ctx, b):
        return template.format(**{k: ctx.tuple_expr(v) if k in varargs else ctx.e(v) for k, v in b.items()})

    for n in names.split():
        OPS[n] = Op(Sig.parse(sig), emit, layout, False, tuple(tensor_args))


# ----------------------------------------------------------------------------------------- #
# Elementwise, one tensor

for _name, _fn in {
    "relu": "jax.nn.relu", "sigmoid": "jax.nn.sigmoid", "tanh": "jnp.tanh", "exp": "jnp.exp", "log": "jnp.log",
    "log2": "jnp.log2", "log10": "jnp.log10", "log1p": "jnp.log1p", "expm1": "jnp.expm1", "sqrt": "jnp.sqrt",
    "rsqrt": "jax.lax.rsqrt", "abs": "jnp.abs", "sin": "jnp.sin", "cos": "jnp.cos", "tan": "jnp.tan",
    "asin": "jnp.arcsin", "acos": "jnp.arccos", "atan": "jnp.arctan", "sinh": "jnp.sinh", "cosh": "jnp.cosh",
    "floor": "jnp.floor", "ceil": "jnp.ceil", "trunc": "jnp.trunc", "sign": "jnp.sign", "square": "jnp.square",
    "erf": "jax.scipy.special.erf", "erfc": "jax.scipy.special.erfc", "silu": "jax.nn.silu",
    "logical_not": "jnp.logical_not", "isnan": "jnp.isnan", "isinf": "jnp.isinf", "isfinite": "jnp.isfinite",
    "bitwise_not": "jnp.invert", "selu": "jax.nn.selu", "mish": "F.mish", "hardswish": "F.hardswish",
    "hardsigmoid": "F.hardsigmoid", "relu6": "F.relu6", "logsigmoid": "F.logsigmoid", "softsign": "jax.nn.soft_sign",
    "exp2": "jnp.exp2", "frac": "(lambda v: v - jnp.trunc(v))", "sgn": "jnp.sign",
}.items():
    simple(_name, _fn + "({input})", "input, *, inplace=False", "any")
    # The in-place method (x.relu_(), x.exp_()) writes its input.
    OPS[_name + "_"] = Op(Sig.parse("input"), (lambda f: lambda ctx, b: f"{f}({ctx.e(b['input'])})")(_fn), "any", True)

OPS["neg"] = OPS["negative"] = Op(Sig.parse("input"), lambda ctx, b: "-" + ctx.operand(b["input"], "**", "right"),
                                  "any")
OPS["pos"] = Op(Sig.parse("input"), lambda ctx, b: "+" + ctx.operand(b["input"], "**", "right"), "any")
OPS["invert"] = Op(Sig.parse("input"), lambda ctx, b: "~" + ctx.operand(b["input"], "**", "right"), "any")
OPS["reciprocal"] = Op(Sig.parse("input"), lambda ctx, b: "1 / " + ctx.operand(b["input"], "/", "right"), "any")
simple("sigmoid_", "jax.nn.sigmoid({input})", layout="any")


@op("gelu", "input, approximate='none'", "any")
def _gelu(ctx, b):
    return f"F.gelu({ctx.e(b['input'])}{ctx.kw(b, 'approximate', 'none')})"


@op("leaky_relu", "input, negative_slope=0.01, inplace=False", "any")
def _leaky(ctx, b):
    return f"jax.nn.leaky_relu({ctx.e(b['input'])}{ctx.kw(b, 'negative_slope', 0.01)})"


@op("elu celu", "input, alpha=1.0, inplace=False", "any")
def _elu(ctx, b):
    return f"F.{ctx.name}({ctx.e(b['input'])}{ctx.kw(b, 'alpha', 1.0)})"


@op("softplus", "input, beta=1.0, threshold=20.0", "any")
def _softplus(ctx, b):
    return f"F.softplus({ctx.e(b['input'])}{ctx.kw(b, 'beta', 1.0)}{ctx.kw(b, 'threshold', 20.0)})"


@op("hardtanh", "input, min_val=-1.0, max_val=1.0, inplace=False", "any")
def _hardtanh(ctx, b):
    return f"jnp.clip({ctx.e(b['input'])}, {ctx.e(b['min_val'])}, {ctx.e(b['max_val'])})"


@op("clamp clip", "input, min=None, max=None", "any", tensor_args=("input", "min", "max"))
def _clamp(ctx, b):
    return f"jnp.clip({ctx.e(b['input'])}, {ctx.e(b['min'])}, {ctx.e(b['max'])})"


@op("clamp_min", "input, min", "any")
def _clamp_min(ctx, b):
    return f"jnp.maximum({ctx.e(b['input'])}, {ctx.e(b['min'])})"


@op("clamp_max", "input, max", "any")
def _clamp_max(ctx, b):
    return f"jnp.minimum({ctx.e(b['input'])}, {ctx.e(b['max'])})"


@op("nan_to_num", "input, nan=0.0, posinf=None, neginf=None", "any")
def _nan_to_num(ctx, b):
    return f"jnp.nan_to_num({ctx.e(b['input'])}, nan={ctx.e(b['nan'])}, posinf={ctx.e(b['posinf'])}, " \
           f"neginf={ctx.e(b['neginf'])})"


# relu/sigmoid... also come as F.relu(x, inplace=True): the generic inplace flag.
OPS["relu"] = Op(Sig.parse("input, inplace=False"), OPS["relu"].emit, "any")

# ----------------------------------------------------------------------------------------- #
# Elementwise, two tensors (and Python numbers)

_BINARY = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
           "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "and_": "&", "or_": "|",
           "xor": "^", "lshift": "<<", "rshift": ">>"}


def _binop(symbol):
    def emit(ctx, b):
        return f"{ctx.operand(b['input'], symbol, 'left')} {symbol} {ctx.operand(b['other'], symbol, 'right')}"

    return emit


for _name, _sym in _BINARY.items():
    OPS["operator." + _name] = Op(Sig.parse("input, other"), _binop(_sym), "any", tensor_args=("input", "other"))

for _name, _sym in {"mul": "*", "multiply": "*", "true_divide": "/", "floor_divide": "//", "remainder": "%",
                    "eq": "==", "ne": "!=", "not_equal": "!=", "lt": "<", "less": "<", "le": "<=", "gt": ">",
                    "greater": ">", "ge": ">=", "bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^",
                    "pow": "**", "float_power": "**"}.items():
    OPS[_name] = Op(Sig.parse("input, other"), _binop(_sym), "any", tensor_args=("input", "other"))
    OPS[_name + "_"] = Op(Sig.parse("input, other"), _binop(_sym), "any", True, tensor_args=("input", "other"))
OPS["pow"] = Op(Sig.parse("input, exponent"), lambda ctx, b: f"{ctx.operand(b['input'], '**', 'left')} ** "
                f"{ctx.operand(b['exponent'], '**', 'right')}", "any", tensor_args=("input", "exponent"))
OPS["pow_"] = Op(OPS["pow"].sig, OPS["pow"].emit, "any", True, tensor_args=("input", "exponent"))
OPS["rpow"] = Op(Sig.parse("input, other"), lambda ctx, b: f"{ctx.operand(b['other'], '**', 'left')} ** "
                 f"{ctx.operand(b['input'], '**', 'right')}", "any", tensor_args=("input", "other"))


def _add_sub(symbol):
    def emit(ctx, b):
        other = ctx.operand(b["other"], symbol, "right")
        if not (isinstance(b["alpha"], (int, float)) and b["alpha"] == 1):
            other = f"{ctx.operand(b['alpha'], '*', 'left')} * {ctx.operand(b['other'], '*', 'right')}"
        return f"{ctx.operand(b['input'], symbol, 'left')} {symbol} {other}"

    return emit


for _name, _sym in {"add": "+", "sub": "-", "subtract": "-"}.items():
    OPS[_name] = Op(Sig.parse("input, other, *, alpha=1"), _add_sub(_sym), "any", tensor_args=("input", "other"))
    OPS[_name + "_"] = Op(Sig.parse("input, other, *, alpha=1"), _add_sub(_sym), "any", True,
                          tensor_args=("input", "other"))
OPS["rsub"] = Op(Sig.parse("input, other, *, alpha=1"),
                 lambda ctx, b: _add_sub("-")(ctx, {"input": b["other"], "other": b["input"], "alpha": b["alpha"]}),
                 "any", tensor_args=("input", "other"))


@op("div divide", "input, other, *, rounding_mode=None", "any", tensor_args=("input", "other"))
def _div(ctx, b):
    if b["rounding_mode"] is None:
        return f"{ctx.operand(b['input'], '/', 'left')} / {ctx.operand(b['other'], '/', 'right')}"
    return f"F.div({ctx.e(b['input'])}, {ctx.e(b['other'])}, rounding_mode={b['rounding_mode']!r})"


for _name, _fn in {"maximum": "jnp.maximum", "minimum": "jnp.minimum", "fmod": "jnp.fmod", "atan2": "jnp.arctan2",
                   "logical_and": "jnp.logical_and", "logical_or": "jnp.logical_or",
                   "logical_xor": "jnp.logical_xor", "hypot": "jnp.hypot", "fmax": "jnp.fmax", "fmin": "jnp.fmin",
                   "logaddexp": "jnp.logaddexp"}.items():
    simple(_name, _fn + "({input}, {other})", "input, other", "any", ("input", "other"))


@op("where", "condition, input=None, other=None", "any", tensor_args=("condition", "input", "other"))
def _where(ctx, b):
    if b["input"] is None:
        raise BindError("torch.where(condition) (nonzero) has a data-dependent shape")
    return f"jnp.where({ctx.e(b['condition'])}, {ctx.e(b['input'])}, {ctx.e(b['other'])})"


@op("masked_fill", "input, mask, value", "any", tensor_args=("input", "mask", "value"))
def _masked_fill(ctx, b):
    return f"F.masked_fill({ctx.e(b['input'])}, {ctx.e(b['mask'])}, {ctx.e(b['value'])})"


@op("lerp", "input, end, weight", "any", tensor_args=("input", "end", "weight"))
def _lerp(ctx, b):
    return f"{ctx.e(b['input'], wrap=True)} + {ctx.e(b['weight'], wrap=True)} * " \
           f"({ctx.e(b['end'])} - {ctx.e(b['input'], wrap=True)})"


# The in-place methods (x.clamp_(0), x.masked_fill_(m, v), x.div_(2)) write their input.
for _name in ("clamp", "clip", "masked_fill", "div"):
    OPS[_name + "_"] = dataclasses.replace(OPS[_name], inplace=True)

# ----------------------------------------------------------------------------------------- #
# Casts and no-ops

_DTYPE_METHODS = {"float": "float32", "double": "float64", "half": "float16", "bfloat16": "bfloat16",
                  "int": "int32", "long": "int64", "short": "int16", "bool": "bool", "byte": "uint8", "char": "int8"}

for _name, _dt in _DTYPE_METHODS.items():
    OPS["method." + _name] = Op(Sig.parse("input"),
                                (lambda d: lambda ctx, b: f"{ctx.e(b['input'], wrap=True)}.astype("
                                                          f"{ctx.dtype_expr(d)})")(_dt), "any")


@op("to type", "input, *args, dtype=None", "any")
def _to(ctx, b):
    target = b["dtype"]
    for a in b["args"]:
        if ctx.is_dtype(a):
            target = a
        elif ctx.is_tensor(a):
            return f"{ctx.e(b['input'], wrap=True)}.astype({ctx.e(a, wrap=True)}.dtype)"
        elif not ctx.is_device(a) and not isinstance(a, bool):
            raise BindError(f"to({a!r}) is not supported")
    if target is None:
        return ctx.e(b["input"])
    return f"{ctx.e(b['input'], wrap=True)}.astype({ctx.e(target)})"


@op("type_as", "input, other", "any", tensor_args=("input",))
def _type_as(ctx, b):
    return f"{ctx.e(b['input'], wrap=True)}.astype({ctx.e(b['other'], wrap=True)}.dtype)"


@op("contiguous clone cpu cuda requires_grad_ float_ identity", "input, *args", "any")
def _same(ctx, b):
    return ctx.e(b["input"])


@op("detach", "input", "any")
def _detach(ctx, b):
    return f"jax.lax.stop_gradient({ctx.e(b['input'])})"


# ----------------------------------------------------------------------------------------- #
# Reductions


def _reduce(fn):
    def emit(ctx, b):
        args = [ctx.e(b["input"])]
        if b.get("dim") not in (None, ()):
            args.append(f"axis={ctx.axis(b['dim'])}")
        if b.get("keepdim"):
            args.append("keepdims=True")
        if b.get("dtype") is not None:
            args.append(f"dtype={ctx.e(b['dtype'])}")
        return f"{fn}({', '.join(args)})"

    return emit


for _name, _fn in {"sum": "jnp.sum", "mean": "jnp.mean", "prod": "jnp.prod", "nansum": "jnp.nansum",
                   "nanmean": "jnp.nanmean"}.items():
    OPS[_name] = Op(Sig.parse("input, dim=None, keepdim=False, *, dtype=None"), _reduce(_fn), "cf")
for _name, _fn in {"amax": "jnp.max", "amin": "jnp.min", "all": "jnp.all", "any": "jnp.any",
                   "logsumexp": "jax.nn.logsumexp", "argmax": "jnp.argmax", "argmin": "jnp.argmin"}.items():
    OPS[_name] = Op(Sig.parse("input, dim=None, keepdim=False"), _reduce(_fn), "cf")


@op("max min", "input, dim=None, keepdim=False, *, other=None", "cf", tensor_args=("input", "dim", "other"))
def _max(ctx, b):
    dim = b["dim"]
    if ctx.is_tensor(dim):  # torch.max(a, b): elementwise
        return f"jnp.{'maximum' if ctx.name == 'max' else 'minimum'}({ctx.e(b['input'])}, {ctx.e(dim)})"
    if b["other"] is not None:
        return f"jnp.{'maximum' if ctx.name == 'max' else 'minimum'}({ctx.e(b['input'])}, {ctx.e(b['other'])})"
    if dim is None:
        return f"jnp.{ctx.name}({ctx.e(b['input'])})"
    keep = ", keepdim=True" if b["keepdim"] else ""
    return f"F.{ctx.name}({ctx.e(b['input'])}, {ctx.e(dim)}{keep})"


@op("var std", "input, dim=None, unbiased=None, keepdim=False, *, correction=None", "cf")
def _var(ctx, b):
    args = [ctx.e(b["input"])]
    if b["dim"] is not None:
        args.append(ctx.e(b["dim"]))
    if isinstance(b["unbiased"], bool) and not isinstance(b["dim"], bool):
        args.append(f"unbiased={b['unbiased']}")
    elif isinstance(b["dim"], bool):  # torch.var(x, False): the unbiased flag in dim's place
        args = [ctx.e(b["input"]), f"unbiased={b['dim']}"]
    if b["keepdim"]:
        args.append("keepdim=True")
    if b["correction"] is not None:
        args.append(f"correction={ctx.e(b['correction'])}")
    return f"F.{ctx.name}({', '.join(args)})"


@op("norm", "input, p='fro', dim=None, keepdim=False, *, dtype=None", "cf")
def _norm(ctx, b):
    p = b["p"]
    if p in ("fro", 2, 2.0) and b["dim"] is None:
        return f"jnp.sqrt(jnp.sum(jnp.square({ctx.e(b['input'])})))"
    if b["dim"] is None:
        raise BindError(f"norm(p={p!r}) without dim is not supported")
    ordv = 2 if p == "fro" else p
    keep = ", keepdims=True" if b["keepdim"] else ""
    return f"jnp.linalg.norm({ctx.e(b['input'])}, ord={ctx.e(ordv)}, axis={ctx.axis(b['dim'])}{keep})"


simple("cumsum", "jnp.cumsum({input}, axis={dim})", "input, dim, *, dtype=None")
simple("cumprod", "jnp.cumprod({input}, axis={dim})", "input, dim, *, dtype=None")


def _softmax(fn):
    def emit(ctx, b):
        x = ctx.e(b["input"]) if b["dtype"] is None else f"{ctx.e(b['input'], wrap=True)}.astype({ctx.e(b['dtype'])})"
        if b["dim"] is None:  # torch's legacy implicit dimension
            return f"F.{fn}({x})"
        return f"jax.nn.{fn}({x}, axis={ctx.e(b['dim'])})"

    return emit


for _name in ("softmax", "log_softmax"):
    OPS[_name] = Op(Sig.parse("input, dim=None, _stacklevel=3, dtype=None"), _softmax(_name), "cf")


@op("glu", "input, dim=-1", "cf")
def _glu(ctx, b):
    return f"F.glu({ctx.e(b['input'])}, {ctx.e(b['dim'])})"


# ----------------------------------------------------------------------------------------- #
# Products


for _name in ("matmul", "mm", "bmm", "operator.matmul"):
    OPS[_name] = Op(Sig.parse("input, other"), _binop("@"), "cf", tensor_args=("input", "other"))
simple("outer ger", "jnp.outer({input}, {vec2})", "input, vec2", "cf", ("input", "vec2"))
simple("dot inner", "jnp.dot({input}, {other})", "input, other", "cf", ("input", "other"))


@op("einsum", "equation, *operands", "cf", tensor_args=("operands",))
def _einsum(ctx, b):
    return f"jnp.einsum({b['equation']!r}, {', '.join(ctx.e(o) for o in b['operands'])})"


@op("baddbmm addmm addbmm", "input, batch1, batch2, *, beta=1, alpha=1", "cf",
    tensor_args=("input", "batch1", "batch2"))
def _addmm(ctx, b):
    prod = f"{ctx.e(b['batch1'], wrap=True)} @ {ctx.e(b['batch2'], wrap=True)}"
    if b["alpha"] != 1:
        prod = f"{ctx.e(b['alpha'])} * ({prod})"
    base = ctx.e(b["input"], wrap=True)
    if b["beta"] != 1:
        base = f"{ctx.e(b['beta'])} * {base}"
    return f"{base} + {prod}"


@op("linear", "input, weight, bias=None", "cf", tensor_args=("input", "weight", "bias"))
def _linear(ctx, b):
    bias = "" if b["bias"] is None else f", {ctx.e(b['bias'])}"
    return f"F.linear({ctx.e(b['input'])}, {ctx.e(b['weight'])}{bias})"


# ----------------------------------------------------------------------------------------- #
# Shapes


@op("view reshape", "input, *shape", "cf")
def _view(ctx, b):
    shape = b["shape"]
    if len(shape) == 1 and ctx.is_dtype(shape[0]):
        raise BindError("view(dtype) reinterprets bits; not supported")
    return f"jnp.reshape({ctx.e(b['input'])}, {ctx.tuple_expr(shape)})"


@op("view_as reshape_as", "input, other", "cf", tensor_args=("input", "other"))
def _view_as(ctx, b):
    return f"jnp.reshape({ctx.e(b['input'])}, {ctx.e(b['other'], wrap=True)}.shape)"


@op("flatten", "input, start_dim=0, end_dim=-1", "cf")
def _flatten(ctx, b):
    end = "" if b["end_dim"] == -1 else f", {ctx.e(b['end_dim'])}"
    return f"F.flatten({ctx.e(b['input'])}, {ctx.e(b['start_dim'])}{end})"


@op("unflatten", "input, dim, sizes", "cf")
def _unflatten(ctx, b):
    return f"F.unflatten({ctx.e(b['input'])}, {ctx.e(b['dim'])}, {ctx.tuple_expr(b['sizes'])})"


@op("permute", "input, *dims", "cf")
def _permute(ctx, b):
    return f"jnp.transpose({ctx.e(b['input'])}, {ctx.tuple_expr(b['dims'])})"


@op("transpose swapaxes swapdims", "input, dim0, dim1", "cf")
def _transpose(ctx, b):
    return f"jnp.swapaxes({ctx.e(b['input'])}, {ctx.e(b['dim0'])}, {ctx.e(b['dim1'])})"


@op("t", "input", "cf")
def _t(ctx, b):
    return f"jnp.transpose({ctx.e(b['input'])})"


@op("movedim moveaxis", "input, source, destination", "cf")
def _movedim(ctx, b):
    return f"jnp.moveaxis({ctx.e(b['input'])}, {ctx.e(b['source'])}, {ctx.e(b['destination'])})"


@op("squeeze", "input, dim=None", "cf")
def _squeeze(ctx, b):
    dim = "" if b["dim"] is None else f", {ctx.e(b['dim'])}"
    return f"F.squeeze({ctx.e(b['input'])}{dim})"


simple("unsqueeze", "jnp.expand_dims({input}, {dim})", "input, dim")
simple("expand", "F.expand({input}, {size})", "input, *size")
simple("broadcast_to", "F.expand({input}, {size})", "input, *size")
simple("repeat", "F.repeat({input}, {repeats})", "input, *repeats")
simple("tile", "jnp.tile({input}, {dims})", "input, *dims")
simple("flip", "jnp.flip({input}, {dims})", "input, *dims")


@op("expand_as broadcast_as", "input, other", "cf", tensor_args=("input", "other"))
def _expand_as(ctx, b):
    return f"jnp.broadcast_to({ctx.e(b['input'])}, {ctx.e(b['other'], wrap=True)}.shape)"


@op("repeat_interleave", "input, repeats, dim=None, *, output_size=None", "cf")
def _repeat_interleave(ctx, b):
    if ctx.is_tensor(b["repeats"]):
        raise BindError("repeat_interleave with tensor repeats has a data-dependent shape")
    dim = "" if b["dim"] is None else f", {ctx.e(b['dim'])}"
    return f"F.repeat_interleave({ctx.e(b['input'])}, {ctx.e(b['repeats'])}{dim})"


def _sequence(ctx, tensors) -> str:
    """A list of tensors as written (``[a, b]``), or a value that is a tuple of them."""
    if isinstance(tensors, (tuple, list)):
        return "[" + ", ".join(ctx.e(t) for t in tensors) + "]"
    return ctx.e(tensors)


@op("cat concat concatenate", "tensors, dim=0", "cat", tensor_args=("tensors",))
def _cat(ctx, b):
    return f"jnp.concatenate({_sequence(ctx, b['tensors'])}, axis={ctx.cat_axis(b)})"


@op("stack", "tensors, dim=0", "cf", tensor_args=("tensors",))
def _stack(ctx, b):
    return f"jnp.stack({_sequence(ctx, b['tensors'])}, axis={ctx.e(b['dim'])})"


simple("split", "F.split({input}, {split_size_or_sections}, dim={dim})", "input, split_size_or_sections, dim=0")
simple("chunk", "F.chunk({input}, {chunks}, dim={dim})", "input, chunks, dim=0")
simple("unbind", "F.unbind({input}, {dim})", "input, dim=0")
simple("narrow", "F.narrow({input}, {dim}, {start}, {length})", "input, dim, start, length")
simple("select", "jnp.take({input}, {index}, axis={dim})", "input, dim, index")
simple("index_select", "F.index_select({input}, {dim}, {index})", "input, dim, index", tensor_args=("input", "index"))
simple("gather", "F.gather({input}, {dim}, {index})", "input, dim, index, *, sparse_grad=False",
       tensor_args=("input", "index"))


@op("roll", "input, shifts, dims=None", "cf")
def _roll(ctx, b):
    dims = "" if b["dims"] is None else f", {ctx.e(b['dims'])}"
    return f"jnp.roll({ctx.e(b['input'])}, {ctx.e(b['shifts'])}{dims})"


@op("tril triu", "input, diagonal=0", "cf")
def _tri(ctx, b):
    k = "" if b["diagonal"] == 0 else f", k={ctx.e(b['diagonal'])}"
    return f"jnp.{ctx.name}({ctx.e(b['input'])}{k})"


@op("diagonal", "input, offset=0, dim1=0, dim2=1", "cf")
def _diagonal(ctx, b):
    return f"jnp.diagonal({ctx.e(b['input'])}, {ctx.e(b['offset'])}, {ctx.e(b['dim1'])}, {ctx.e(b['dim2'])})"


@op("sort", "input, dim=-1, descending=False, stable=False", "cf")
def _sort(ctx, b):
    x = ctx.e(b["input"])
    return f"F.sort({x}, {ctx.e(b['dim'])}, descending={b['descending']})"


@op("topk", "input, k, dim=-1, largest=True, sorted=True", "cf")
def _topk(ctx, b):
    return f"F.topk({ctx.e(b['input'])}, {ctx.e(b['k'])}, {ctx.e(b['dim'])}, largest={b['largest']})"


@op("argsort", "input, dim=-1, descending=False, stable=False", "cf")
def _argsort(ctx, b):
    return f"jnp.argsort({ctx.e(b['input'])}, axis={ctx.e(b['dim'])}, descending={b['descending']}, stable=True)"


# ----------------------------------------------------------------------------------------- #
# Sizes


@op("size", "input, dim=None", "cf")
def _size(ctx, b):
    x = ctx.e(b["input"], wrap=True)
    return f"{x}.shape" if b["dim"] is None else f"{x}.shape[{ctx.e(b['dim'])}]"


@op("dim ndimension", "input", "cf")
def _dim(ctx, b):
    return f"{ctx.e(b['input'], wrap=True)}.ndim"


@op("numel nelement", "input", "cf")
def _numel(ctx, b):
    return f"{ctx.e(b['input'], wrap=True)}.size"


# ----------------------------------------------------------------------------------------- #
# Creation (static shapes)


def _dtype_kw(ctx, b, default=None):
    d = b.get("dtype")
    if d is None:
        return "" if default is None else f", dtype={default}"
    return f", dtype={ctx.e(d)}"


def _zeros_like(fn):
    def emit(ctx, b):
        return f"{fn}({ctx.e(b['input'])}{_dtype_kw(ctx, b)})"

    return emit


for _name in ("zeros ones empty".split()):
    OPS[_name] = Op(Sig.parse("*size, dtype=None, out=None"),
                    (lambda n: lambda ctx, b: f"jnp.{'zeros' if n == 'empty' else n}({ctx.tuple_expr(b['size'])}"
                                              f"{_dtype_kw(ctx, b, 'jnp.float32')})")(_name), "cf", tensor_args=())
    OPS[_name + "_like"] = Op(Sig.parse("input, *, dtype=None"),
                              _zeros_like(f"jnp.{'zeros' if _name == 'empty' else _name}_like"), "cf")
    OPS["new_" + _name] = Op(Sig.parse("input, *size, dtype=None"),
                             (lambda n: lambda ctx, b: f"jnp.{'zeros' if n == 'empty' else n}("
                                                       f"{ctx.tuple_expr(b['size'])}, dtype="
                                                       f"{ctx.e(b['dtype']) if b['dtype'] is not None else ctx.e(b['input'], wrap=True) + '.dtype'})")(_name),
                             "cf")


@op("full", "size, fill_value, *, dtype=None, out=None", "cf", tensor_args=())
def _full(ctx, b):
    return f"F.full({ctx.tuple_expr(b['size'])}, {ctx.e(b['fill_value'])}{_dtype_kw(ctx, b)})"


@op("full_like", "input, fill_value, *, dtype=None", "cf")
def _full_like(ctx, b):
    return f"jnp.full_like({ctx.e(b['input'])}, {ctx.e(b['fill_value'])}{_dtype_kw(ctx, b)})"


@op("new_full", "input, size, fill_value, *, dtype=None", "cf")
def _new_full(ctx, b):
    dtype = ctx.e(b["dtype"]) if b["dtype"] is not None else f"{ctx.e(b['input'], wrap=True)}.dtype"
    return f"jnp.full({ctx.tuple_expr(b['size'])}, {ctx.e(b['fill_value'])}, dtype={dtype})"


@op("arange", "start, end=None, step=1, *, dtype=None, out=None", "cf", tensor_args=())
def _arange(ctx, b):
    args = [ctx.e(b["start"])]
    if b["end"] is not None:
        args.append(ctx.e(b["end"]))
    if b["step"] != 1:
        args.append(ctx.e(b["step"]))
    return f"jnp.arange({', '.join(args)}{_dtype_kw(ctx, b)})"


@op("linspace", "start, end, steps, *, dtype=None", "cf", tensor_args=())
def _linspace(ctx, b):
    return f"jnp.linspace({ctx.e(b['start'])}, {ctx.e(b['end'])}, {ctx.e(b['steps'])}{_dtype_kw(ctx, b, 'jnp.float32')})"


@op("eye", "n, m=None, *, dtype=None", "cf", tensor_args=())
def _eye(ctx, b):
    m = "" if b["m"] is None else f", {ctx.e(b['m'])}"
    return f"jnp.eye({ctx.e(b['n'])}{m}{_dtype_kw(ctx, b, 'jnp.float32')})"


@op("tensor as_tensor", "data, *, dtype=None", "cf", tensor_args=("data",))
def _tensor(ctx, b):
    return f"jnp.asarray({ctx.e(b['data'])}{_dtype_kw(ctx, b)})"


# ----------------------------------------------------------------------------------------- #
# Layers written as functions


@op("dropout", "input, p=0.5, training=True, inplace=False", "any")
def _dropout(ctx, b):
    layer = ctx.mode_dropout(b)
    if layer is None:
        return ctx.e(b["input"])
    return f"{layer}({ctx.e(b['input'])})"


@op("scaled_dot_product_attention",
    "query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False", "cf",
    tensor_args=("query", "key", "value", "attn_mask"))
def _sdpa(ctx, b):
    args = [ctx.e(b["query"]), ctx.e(b["key"]), ctx.e(b["value"])]
    if b["attn_mask"] is not None:
        args.append(f"attn_mask={ctx.e(b['attn_mask'])}")
    if b["is_causal"]:
        args.append("is_causal=True")
    if b["scale"] is not None:
        args.append(f"scale={ctx.e(b['scale'])}")
    if b["enable_gqa"]:
        args.append("enable_gqa=True")
    layer = ctx.mode_dropout({"input": None, "p": b["dropout_p"], "training": True}, param="dropout_p")
    if layer is not None:
        args.append(f"dropout={layer}")
    return f"F.scaled_dot_product_attention({', '.join(args)})"


@op("layer_norm", "input, normalized_shape, weight=None, bias=None, eps=1e-05", "cf",
    tensor_args=("input", "weight", "bias"))
def _layer_norm(ctx, b):
    return (f"F.layer_norm({ctx.e(b['input'])}, {ctx.tuple_expr(b['normalized_shape'])}, {ctx.e(b['weight'])}, "
            f"{ctx.e(b['bias'])}, {ctx.e(b['eps'])})")


@op("normalize", "input, p=2.0, dim=1, eps=1e-12, out=None", "cf")
def _normalize(ctx, b):
    return f"F.normalize({ctx.e(b['input'])}, {ctx.e(b['p'])}, {ctx.e(b['dim'])}, {ctx.e(b['eps'])})"


@op("embedding", "input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, "
                 "sparse=False", "cf", tensor_args=("input", "weight"))
def _embedding(ctx, b):
    if b["max_norm"] is not None or b["scale_grad_by_freq"]:
        raise BindError("embedding(max_norm / scale_grad_by_freq) is not supported")
    return f"F.embedding({ctx.e(b['input'])}, {ctx.e(b['weight'])})"


@op("one_hot", "input, num_classes=-1", "cf")
def _one_hot(ctx, b):
    if b["num_classes"] == -1:
        raise BindError("one_hot without num_classes has a data-dependent shape")
    return f"F.one_hot({ctx.e(b['input'])}, {ctx.e(b['num_classes'])})"


@op("pad", "input, pad, mode='constant', value=None", "cf")
def _pad(ctx, b):
    extra = "" if b["mode"] == "constant" else f", mode={b['mode']!r}"
    if b["value"] not in (None, 0, 0.0):
        extra += f", value={ctx.e(b['value'])}"
    return f"F.pad({ctx.e(b['input'])}, {ctx.tuple_expr(b['pad'])}{extra})"


@op("prelu", "input, weight", "cf", tensor_args=("input", "weight"))
def _prelu(ctx, b):
    return f"F.prelu({ctx.e(b['input'])}, {ctx.e(b['weight'])})"


@op("pixel_shuffle", "input, upscale_factor", "cf")
def _pixel_shuffle(ctx, b):
    return f"F.pixel_shuffle({ctx.e(b['input'])}, {ctx.e(b['upscale_factor'])})"


def _pool(name, sig, defaults):
    def emit(ctx, b):
        args = [ctx.e(b["input"])]
        for k, v in b.items():
            if k == "input":
                continue
            if k in ("return_indices",) and v:
                raise BindError(f"{name}(return_indices=True) is not supported")
            if k in defaults and defaults[k] == v:
                continue
            args.append(f"{k}={ctx.e(v)}")
        return f"F.{name}({', '.join(args)})"

    OPS[name] = Op(Sig.parse(sig), emit, "cl")


_pool("max_pool1d", "input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False",
      {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
_pool("max_pool2d", "input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False",
      {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
_pool("avg_pool1d", "input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True",
      {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True})
_pool("avg_pool2d", "input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, "
                    "divisor_override=None",
      {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
for _n in ("adaptive_avg_pool1d", "adaptive_avg_pool2d"):
    _pool(_n, "input, output_size", {})
for _n in ("adaptive_max_pool1d", "adaptive_max_pool2d"):
    _pool(_n, "input, output_size, return_indices=False", {"return_indices": False})


@op("interpolate upsample", "input, size=None, scale_factor=None, mode='nearest', align_corners=None, "
                            "recompute_scale_factor=None, antialias=False", "cl")
def _interpolate(ctx, b):
    if b["mode"] != "nearest":
        raise BindError(f"interpolate(mode={b['mode']!r}) is not supported (nearest only)")
    args = [ctx.e(b["input"])]
    if b["size"] is not None:
        args.append(f"size={ctx.e(b['size'])}")
    if b["scale_factor"] is not None:
        sf = b["scale_factor"]
        if any(float(f) != int(f) for f in (sf if isinstance(sf, (tuple, list)) else (sf,))):
            raise BindError("interpolate with a non-integer scale_factor is not supported")
        args.append(f"scale_factor={ctx.e(sf)}")
    return f"F.interpolate({', '.join(args)})"


# ----------------------------------------------------------------------------------------- #
# math on Python numbers (sizes)

for _name in ("sqrt", "log", "exp", "ceil", "floor", "log2", "pow", "sin", "cos", "isqrt", "prod", "gcd"):
    OPS["math." + _name] = Op(Sig.parse("*args"),
                              (lambda n: lambda ctx, b: f"math.{n}({', '.join(ctx.e(a) for a in b['args'])})")(_name),
                              "cf", tensor_args=())

for _name in ("int", "float", "abs", "min", "max", "round"):
    OPS["builtins." + _name] = Op(Sig.parse("*args"),
                                  (lambda n: lambda ctx, b: f"{n}({', '.join(ctx.e(a) for a in b['args'])})")(_name),
                                  "cf", tensor_args=())


# ----------------------------------------------------------------------------------------- #
# Which callables are which op

# Tensor methods whose name is an op above but means something else as a method.
METHOD_NAMES = {n: "method." + n for n in _DTYPE_METHODS}
METHOD_NAMES.update({"__and__": "operator.and_", "__or__": "operator.or_", "__xor__": "operator.xor"})

# Tensor methods that return a view of their input (an in-place op on one writes the other).
VIEW_OPS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "permute", "t",
            "expand", "expand_as", "narrow", "select", "chunk", "split", "unbind", "view_as", "reshape_as",
            "contiguous", "detach", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "broadcast_to",
            "getitem", "identity"}

# Random numbers in forward have no torch-equal JAX counterpart (different generators).
RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
          "normal", "randperm", "uniform_", "normal_", "bernoulli_", "exponential_", "random_"}


def function_name(target) -> str | None:
    """The op name of an fx ``call_function`` target (a torch function, an operator...)."""
    import builtins

    import torch
    import torch.nn.functional as TF

    key = _FUNCS.get(id(target))
    if key is not None:
        return key
    if not _FUNCS:
        for n in set(OPS) | RANDOM | {"nonzero", "masked_select", "unique"}:
            base = n.split(".", 1)[-1]
            if n.startswith("operator."):
                obj = getattr(operator, base, None)
                if obj is not None:
                    _FUNCS[id(obj)] = n
                continue
            if n.startswith("math."):
                _FUNCS[id(getattr(math, base))] = n
                continue
            if n.startswith("builtins."):
                _FUNCS[id(getattr(builtins, base))] = n
                continue
            if n.startswith("method."):
                continue
            for ns in (torch, TF, torch.special, torch.linalg):
                obj = getattr(ns, n, None)
                if callable(obj) and id(obj) not in _FUNCS:
                    _FUNCS[id(obj)] = n
        _FUNCS[id(operator.neg)] = "neg"
        _FUNCS[id(operator.pos)] = "pos"
        _FUNCS[id(operator.invert)] = "invert"
        _FUNCS[id(operator.not_)] = "logical_not"
        _FUNCS[id(operator.getitem)] = "getitem"
        _FUNCS[id(operator.setitem)] = "setitem"
        _FUNCS[id(builtins.getattr)] = "getattr"
        _FUNCS[id(TF.relu6)] = "relu6"
        _FUNCS[id(TF.hardtanh)] = "hardtanh"
        _FUNCS[id(torch.max)] = "max"
        _FUNCS[id(torch.min)] = "min"
        _FUNCS[id(torch.reshape)] = "reshape"
        _FUNCS[id(TF.softmax)] = "softmax"
        _FUNCS[id(TF.log_softmax)] = "log_softmax"
        _FUNCS[id(torch.softmax)] = "softmax"
        _FUNCS[id(torch.log_softmax)] = "log_softmax"
        _FUNCS[id(TF.dropout)] = "dropout"
        _FUNCS[id(TF.gelu)] = "gelu"
        _FUNCS[id(TF.interpolate)] = "interpolate"
        return _FUNCS.get(id(target))
    return None


_FUNCS: dict[int, str] = {}


def method_name(name: str) -> str:
    """The op name of an fx ``call_method`` target (a tensor method's name)."""
    return METHOD_NAMES.get(name, name)


@dataclass
class OpRef:
    """A resolved graph node: the op's name and its entry (None when unsupported)."""

    name: str
    op: Op | None = None
    extra: dict = field(default_factory=dict)
