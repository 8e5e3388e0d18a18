"""PyTorch <-> jaxlight conversion of weights and optimizer state, on plain numpy arrays.

``jaxlight`` never imports torch: the torch side (``state_dict`` <-> numpy, optimizer
``state_dict`` <-> numpy) lives in ``torch_ref.interop``. The exchange format between the two is

- **weights**: ``{torch_name: np.ndarray}``, a ``state_dict`` as numpy, in PyTorch's layout;
- **optimizer state**: ``{"step": int | None, "slots": {slot: {torch_name: np.ndarray}}}``,
  with PyTorch's slot names (``exp_avg`` / ``exp_avg_sq`` for Adam and AdamW,
  ``momentum_buffer`` for SGD with momentum) and, again, PyTorch's layout. ``step`` is Adam's
  step count (torch keeps one per parameter; optax one per optimizer; they are equal); SGD has
  none (``None``): the step then comes from ``TrainState.step``.

Every layout difference is one explicit :class:`Rule` per parameter. A :class:`Layout` (one per
model) lists them. A built-in model's layout is derived from the model and its torch twin
(``jaxlight.bridge.layout_for``, which a model name given to the functions below resolves
through); a user's model pair gets one from :func:`derive_layout` or writes its own rules.

| rule kind | PyTorch | jaxlight | conversion |
| --- | --- | --- | --- |
| ``copy`` | bias ``(n,)`` | bias ``(n,)`` | none |
| ``linear`` | ``Linear.weight (out, in)`` | ``kernel (in, out)`` | transpose |
| ``conv`` | ``Conv2d.weight`` OIHW | ``kernel`` HWIO | ``transpose(2, 3, 1, 0)`` |
| ``flatten_linear`` | ``weight (out, C*H*W)``, inputs flattened from NCHW | ``kernel (H*W*C, out)``, inputs flattened from NHWC | rows permuted (C, H, W) -> (H, W, C), then transpose |
| ``lstm`` | ``weight_ih_l0 (4H, in)``, ``weight_hh_l0 (4H, H)`` | ``kernel_ih (in, 4H)``, ``kernel_hh (H, 4H)`` | transpose; gate order i, f, g, o kept; both biases kept (``bias_ih``, ``bias_hh``) |
| ``embed`` | ``Embedding.weight (num, dim)`` | ``embedding (num, dim)`` | none |
| ``conv1d`` | ``Conv1d.weight`` OIK (``ConvTranspose1d``: IOK) | ``kernel`` KIO (KOI) | ``transpose(2, 1, 0)`` |
| ``array`` | any tensor (a class token, a positional embedding, a buffer) | the same array | none, any shape |
| ``int64`` | an int64 buffer (position ids) | int32 (JAX's default integer) | a cast, refused unless every value fits in int32 |

``conv`` is also ``ConvTranspose2d``'s rule: its ``weight (I, O/groups, kH, kW)`` becomes
``kernel (kH, kW, O/groups, I)`` by the same axis permutation (``jaxlight.bridge.porting.nn``).

BatchNorm maps ``weight``/``bias`` to the ``nnx.Param`` ``scale``/``bias`` (``copy``) and the
buffers ``running_mean``/``running_var`` to the ``nnx.BatchStat`` ``mean``/``var`` (``copy``,
``Rule(variable="batch_stat")``); ``num_batches_tracked`` has no NNX counterpart and is dropped
(``Layout.dropped``): it only matters for ``momentum=None`` (a cumulative average), which
:func:`derive_layout` refuses. Loading back into torch keeps the module's own counter.

A user's own model pair needs no hand-written rules when its layers are ``Linear``, ``Conv2d``,
``BatchNorm1d/2d``, ``LayerNorm``, ``Embedding`` or a one-layer ``LSTM`` (jaxlight's
``jaxlight.models.rnn.LSTM`` on the NNX side): :func:`derive_layout` pairs the layers by name
(``net.0`` with ``net/layers/0`` of an ``nnx.Sequential``) or, when the names differ, by order,
and checks each pair's configuration. :func:`model_from_torch` / :func:`model_to_torch` move
parameters and batch statistics in one call. See ``docs/parity-user-models.md``.

All conversions are permutations of elements, so they are exact in both directions (the round
trip gives back the same bits), and they apply unchanged to every elementwise optimizer slot
(Adam's first and second moments, SGD's momentum): ``m[i]`` moves with ``w[i]``.

Example:
    >>> from jaxlight import build_model
    >>> from jaxlight.interop import params_from_torch, params_to_torch
    >>> from flax import nnx
    >>> template = nnx.state(build_model("mlp"), nnx.Param)
    >>> torch_arrays = params_to_torch(template, "mlp")     # as if from a torch state_dict
    >>> sorted(torch_arrays)
    ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']
    >>> params = params_from_torch(torch_arrays, template, "mlp")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = [
    "ConversionError",
    "Rule",
    "Layout",
    "layout_for",
    "params_from_torch",
    "params_to_torch",
    "opt_state_from_torch",
    "opt_state_to_torch",
    "state_from_torch",
    "state_to_torch",
    "batch_stats_from_torch",
    "batch_stats_to_torch",
    "derive_layout",
    "model_from_torch",
    "model_to_torch",
    "SLOTS",
]

# PyTorch optimizer slot -> (optax state field, optimizer names that have it).
SLOTS = {"exp_avg": "mu", "exp_avg_sq": "nu", "momentum_buffer": "trace"}


class ConversionError(ValueError):
    """Weights or optimizer state that do not fit the target; the message names the parameter."""


@dataclass(frozen=True)
class Rule:
    """How one PyTorch tensor becomes one jaxlight parameter.

    Attributes:
        torch_name: the ``state_dict`` key, e.g. ``"fc1.weight"``.
        jax_path: the path in the ``nnx.State`` of parameters, e.g. ``("fc1", "kernel")``.
        kind: ``copy``, ``linear``, ``conv``, ``flatten_linear``, ``lstm``, ``embed``,
            ``conv1d``, ``array`` or ``int64`` (see the module docstring's table).
        chw: for ``flatten_linear``: the ``(C, H, W)`` of the feature map PyTorch flattens.
        variable: ``"param"`` (an ``nnx.Param``, a torch parameter) or ``"batch_stat"`` (an
            ``nnx.BatchStat``, a torch buffer such as ``running_mean``).
    """

    torch_name: str
    jax_path: tuple[str, ...]
    kind: str = "copy"
    chw: tuple[int, int, int] | None = None
    variable: str = "param"

    def __post_init__(self):
        if self.variable not in ("param", "batch_stat"):
            raise ValueError(f"rule for {self.torch_name!r}: variable must be 'param' or 'batch_stat', "
                             f"got {self.variable!r}")
        if self.kind not in _TO_JAX:
            raise ValueError(f"rule for {self.torch_name!r}: unknown kind {self.kind!r}; choose one of {sorted(_TO_JAX)}")
        if self.kind == "flatten_linear" and (self.chw is None or len(self.chw) != 3):
            raise ValueError(f"rule for {self.torch_name!r}: flatten_linear needs chw=(C, H, W)")

    @property
    def jax_name(self) -> str:
        return "/".join(self.jax_path)

    def to_jax(self, a: np.ndarray) -> np.ndarray:
        """PyTorch layout -> jaxlight layout (a contiguous copy)."""
        _check_ndim(self, a, _TORCH_NDIM[self.kind], "PyTorch")
        if self.kind == "flatten_linear" and a.shape[1] != int(np.prod(self.chw)):
            raise ConversionError(f"{self.torch_name}: shape {a.shape} does not flatten a (C, H, W) = "
                                  f"{self.chw} feature map ({int(np.prod(self.chw))} inputs)")
        return np.ascontiguousarray(_TO_JAX[self.kind](a, self))

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        """jaxlight layout -> PyTorch layout (a contiguous copy)."""
        _check_ndim(self, a, _TORCH_NDIM[self.kind], "jaxlight")
        if self.kind == "flatten_linear" and a.shape[0] != int(np.prod(self.chw)):
            raise ConversionError(f"{self.jax_name}: shape {a.shape} does not take a flattened (H, W, C) = "
                                  f"{self.chw[1:] + self.chw[:1]} feature map")
        return np.ascontiguousarray(_TO_TORCH[self.kind](a, self))


def _check_ndim(rule: Rule, a: np.ndarray, ndim: int | None, side: str) -> None:
    if ndim is not None and np.ndim(a) != ndim:
        name = rule.torch_name if side == "PyTorch" else rule.jax_name
        raise ConversionError(f"{name}: a {rule.kind} parameter has {ndim} dimensions, got shape {np.shape(a)}")


def _flat_to_jax(w, rule):
    c, h, w_ = rule.chw
    out = w.shape[0]
    # Row j of PyTorch's input is feature (c, h, w) = unravel(j, (C, H, W)); jaxlight's input
    # orders the same features (h, w, c).
    return w.reshape(out, c, h, w_).transpose(2, 3, 1, 0).reshape(h * w_ * c, out)


def _flat_to_torch(k, rule):
    c, h, w_ = rule.chw
    out = k.shape[1]
    return k.reshape(h, w_, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * w_)


def _int64_to_jax(a, rule):
    a = np.asarray(a)
    info = np.iinfo(np.int32)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise ConversionError(f"{rule.torch_name}: values outside int32, which JAX's integers hold")
    return a.astype(np.int32)


_TO_JAX = {
    "copy": lambda a, r: a,
    "conv1d": lambda a, r: a.transpose(2, 1, 0),  # OIK -> KIO
    "array": lambda a, r: a,
    "int64": _int64_to_jax,
    "linear": lambda a, r: a.T,
    "conv": lambda a, r: a.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "flatten_linear": _flat_to_jax,
    "lstm": lambda a, r: a.T,  # (4H, in) -> (in, 4H); gate blocks i, f, g, o stay in order
    "embed": lambda a, r: a,
}
_TO_TORCH = {
    "copy": lambda a, r: a,
    "conv1d": lambda a, r: a.transpose(2, 1, 0),  # KIO -> OIK
    "array": lambda a, r: a,
    "int64": lambda a, r: np.asarray(a).astype(np.int64),
    "linear": lambda a, r: a.T,
    "conv": lambda a, r: a.transpose(3, 2, 0, 1),  # HWIO -> OIHW
    "flatten_linear": _flat_to_torch,
    "lstm": lambda a, r: a.T,
    "embed": lambda a, r: a,
}
_TORCH_NDIM = {"copy": 1, "linear": 2, "conv": 4, "flatten_linear": 2, "lstm": 2, "embed": 2, "conv1d": 3,
               "array": None, "int64": None}


@dataclass(frozen=True)
class Layout:
    """The rules for every parameter and batch statistic of one model, in PyTorch's
    ``state_dict`` order.

    Attributes:
        name: for messages and reports.
        rules: one :class:`Rule` per torch tensor that has a jaxlight counterpart.
        dropped: ``state_dict`` keys with no jaxlight counterpart, accepted and ignored on the
            way in (BatchNorm's ``num_batches_tracked``).

    Example (a user's model, written by hand instead of :func:`derive_layout`):
        >>> Layout("mine", (Rule("body.0.weight", ("body", "layers", "0", "kernel"), "linear"),
        ...                 Rule("body.0.bias", ("body", "layers", "0", "bias")),
        ...                 Rule("bn.running_mean", ("bn", "mean"), variable="batch_stat")))
        ... # doctest: +ELLIPSIS
        Layout(name='mine', ...)
    """

    name: str
    rules: tuple[Rule, ...]
    dropped: tuple[str, ...] = ()

    def __post_init__(self):
        for attr in ("torch_name", "jax_path"):
            seen = [getattr(r, attr) for r in self.rules]
            dup = {s for s in seen if seen.count(s) > 1}
            if dup:
                raise ValueError(f"layout {self.name!r}: {attr} used twice: {sorted(map(str, dup))}")

    @property
    def torch_names(self) -> list[str]:
        """The torch names of the parameters (``nnx.Param``), in ``state_dict`` order."""
        return [r.torch_name for r in self.rules if r.variable == "param"]

    @property
    def stat_names(self) -> list[str]:
        """The torch names of the batch statistics (``nnx.BatchStat``), in ``state_dict`` order."""
        return [r.torch_name for r in self.rules if r.variable == "batch_stat"]

    def rules_for(self, variable: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.variable == variable)

    @property
    def modules(self) -> dict[str, tuple[str, ...]]:
        """``{torch module name: jaxlight module path}`` of every layer with a rule, in order:
        where :func:`jaxlight.bridge.parity.check_parity` captures per-layer outputs."""
        out: dict[str, tuple[str, ...]] = {}
        for r in self.rules:
            out.setdefault(r.torch_name.rpartition(".")[0], r.jax_path[:-1])
        return out

    def rule(self, torch_name: str) -> Rule:
        for r in self.rules:
            if r.torch_name == torch_name:
                return r
        raise KeyError(torch_name)


def layout_for(model: str | Layout) -> Layout:
    """A user's own ``Layout``, unchanged, or a built-in model's by its command-line name: that
    one is derived from the model and its torch twin (``jaxlight.bridge.layout_for``; needs the
    ``torch`` extra)."""
    if isinstance(model, Layout):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a built-in model's name or a jaxlight.interop.Layout, got {type(model).__name__}")
    from jaxlight.bridge.layouts import layout_for as builtin_layout

    return builtin_layout(model)


# ----------------------------------------------------------------------------------------- #
# Weights


def _flat_template(template) -> dict[tuple[str, ...], np.ndarray]:
    """``nnx.State`` (or nested dict) -> ``{path: leaf}`` of the parameter arrays."""
    from flax import nnx

    pure = nnx.to_pure_dict(template) if isinstance(template, nnx.State) else template
    out = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, path + (str(k),))
        else:
            out[path] = node

    walk(pure, ())
    return out


def _check_keys(given, expected, what: str) -> None:
    given, expected = list(given), list(expected)
    unknown = [k for k in given if k not in expected]
    missing = [k for k in expected if k not in given]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown key(s) {unknown}")
        if missing:
            parts.append(f"missing key(s) {missing}")
        raise ConversionError(f"{what}: {'; '.join(parts)}")


def _convert_to_jax(arrays: Mapping[str, np.ndarray], layout: Layout, template_flat: dict, what: str,
                    variable: str = "param") -> dict:
    """``{torch_name: array}`` -> ``{jax_path: array}``, every key and shape checked.

    ``arrays`` may be a whole ``state_dict``: the layout's other tensors (batch statistics when
    converting parameters, and the other way round) and its ``dropped`` keys are skipped."""
    rules = layout.rules_for(variable)
    others = {r.torch_name for r in layout.rules if r.variable != variable} | set(layout.dropped)
    _check_keys([k for k in arrays if k not in others], [r.torch_name for r in rules],
                f"{what} for {layout.name!r}")
    _check_keys([r.jax_path for r in rules], template_flat,
                f"layout {layout.name!r} against the jaxlight "
                f"{'parameters' if variable == 'param' else 'batch statistics'} (paths)")
    out = {}
    for rule in rules:
        a = np.asarray(arrays[rule.torch_name])
        converted = rule.to_jax(a)
        want = tuple(np.shape(template_flat[rule.jax_path]))
        if converted.shape != want:
            raise ConversionError(f"{what} {rule.torch_name!r}: shape {a.shape} converts to {converted.shape}, "
                                  f"but jaxlight's {rule.jax_name} is {want}")
        want_dtype = np.dtype(getattr(template_flat[rule.jax_path], "dtype", a.dtype))
        if converted.dtype != want_dtype:
            raise ConversionError(f"{what} {rule.torch_name!r}: dtype {converted.dtype}, but jaxlight's "
                                  f"{rule.jax_name} is {want_dtype} (convert explicitly; a cast would not round-trip)")
        out[rule.jax_path] = converted
    return out


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _to_state(flat: dict, template):
    """A copy of ``template`` (an ``nnx.State``) holding ``flat``'s arrays as jax arrays."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    new = jax.tree.map(lambda a: a, template)  # a fresh container; the template is not mutated
    nnx.replace_by_pure_dict(new, _nest({p: jnp.asarray(a) for p, a in flat.items()}))
    return new


def params_from_torch(arrays: Mapping[str, np.ndarray], template, model: str | Layout):
    """A PyTorch ``state_dict`` (as numpy) -> jaxlight parameters.

    Args:
        arrays: ``{torch_name: np.ndarray}`` in PyTorch's layout
            (``torch_ref.interop.state_dict_to_numpy(model)``).
        template: the jaxlight model's parameters, ``nnx.State`` (e.g. ``state.params`` or
            ``nnx.state(model, nnx.Param)``): gives the structure, shapes and dtypes.
        model: the model's name (``"cnn"``) or a ``Layout``.

    Returns:
        A new ``nnx.State`` shaped like ``template`` holding the converted weights.

    Raises:
        ConversionError: unknown or missing keys, a shape or dtype that does not fit, naming
            the parameter.
    """
    layout = layout_for(model)
    flat = _convert_to_jax(arrays, layout, _flat_template(template), "weight")
    return _to_state(flat, template)


def params_to_torch(params, model: str | Layout) -> dict[str, np.ndarray]:
    """jaxlight parameters (``nnx.State`` or its pure dict) -> ``{torch_name: np.ndarray}``,
    in PyTorch's layout and ``state_dict`` order (load with
    ``torch_ref.interop.load_numpy_state_dict``)."""
    return _convert_to_torch(params, layout_for(model), "param")


def _convert_to_torch(tree, layout: Layout, variable: str) -> dict[str, np.ndarray]:
    rules = layout.rules_for(variable)
    flat = _flat_template(tree)
    what = "parameters" if variable == "param" else "batch statistics"
    _check_keys(flat, [r.jax_path for r in rules], f"jaxlight {what} for {layout.name!r} (paths)")
    return {r.torch_name: r.to_torch(np.asarray(flat[r.jax_path])) for r in rules}


def batch_stats_from_torch(arrays: Mapping[str, np.ndarray], template, model: str | Layout):
    """A PyTorch ``state_dict``'s buffers (``running_mean``/``running_var``) -> the NNX batch
    statistics (``nnx.BatchStat`` ``mean``/``var``), shaped like ``template``
    (``nnx.state(model, nnx.BatchStat)``). ``arrays`` may be the whole ``state_dict``.

    Both frameworks use the running statistics the same way in eval mode,
    ``(x - mean) / sqrt(var + eps) * scale + bias``, so a copy is exact. They *update* them
    differently in train mode (see ``docs/parity-user-models.md``): PyTorch's ``running_var``
    averages the unbiased batch variance, NNX's ``var`` the biased one, and NNX's ``momentum``
    is PyTorch's ``1 - momentum``.
    """
    layout = layout_for(model)
    flat = _convert_to_jax(arrays, layout, _flat_template(template), "batch statistic", "batch_stat")
    return _to_state(flat, template)


def batch_stats_to_torch(stats, model: str | Layout) -> dict[str, np.ndarray]:
    """The NNX batch statistics (``nnx.State`` or its pure dict) -> ``{torch buffer name: array}``
    (``running_mean``/``running_var``; ``num_batches_tracked`` is not produced)."""
    return _convert_to_torch(stats, layout_for(model), "batch_stat")


# ----------------------------------------------------------------------------------------- #
# Users' models: a layout derived from the two models, whole-model conversion

# torch.nn class name -> layer kind. Matched on the class and its bases, so subclasses of
# ``nn.Linear`` count; duck-typed, so jaxlight still never imports torch.
_TORCH_LAYERS = {"Linear": "linear", "Conv2d": "conv", "BatchNorm1d": "batchnorm", "BatchNorm2d": "batchnorm",
                 "LayerNorm": "layernorm", "Embedding": "embedding", "LSTM": "lstm"}


def _torch_kind(module) -> str | None:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") and cls.__name__ in _TORCH_LAYERS:
            return _TORCH_LAYERS[cls.__name__]
    return None


def _nnx_kind(module) -> str | None:
    from flax import nnx

    from jaxlight.models.rnn import LSTM

    for cls, kind in ((nnx.Linear, "linear"), (nnx.Conv, "conv"), (nnx.BatchNorm, "batchnorm"),
                      (nnx.LayerNorm, "layernorm"), (nnx.Embed, "embedding"), (LSTM, "lstm")):
        if isinstance(module, cls):
            return kind
    return None


def _torch_layers(torch_model) -> list[tuple[str, str, object]]:
    """``[(name, kind, module)]`` in registration order; refuses layers with unknown weights."""
    out, unknown = [], []
    for name, m in torch_model.named_modules():
        kind = _torch_kind(m)
        if kind is not None:
            out.append((name, kind, m))
        elif list(m.named_parameters(recurse=False)) or [b for b, v in m.named_buffers(recurse=False) if v is not None]:
            unknown.append(f"{name or '(root)'} ({type(m).__name__})")
    if unknown:
        raise ConversionError(f"no conversion rule for torch layer(s) {', '.join(unknown)}; derive_layout knows "
                              f"{sorted(set(_TORCH_LAYERS))}: write a Layout for these (docs/parity-user-models.md)")
    return out


def _nnx_layers(jax_model) -> list[tuple[tuple[str, ...], str, object]]:
    """``[(path, kind, module)]`` in attribute definition order (``nnx.iter_modules`` sorts by
    name, which would put ``fc10`` before ``fc2``)."""
    from flax import nnx

    out, unknown = [], []

    def walk(node, path):
        kind = _nnx_kind(node)
        if kind is not None:
            out.append((path, kind, node))
            return
        if isinstance(node, nnx.Module) and not isinstance(node, nnx.List):
            own = [k for k, v in vars(node).items() if isinstance(v, (nnx.Param, nnx.BatchStat))]
            if own:
                unknown.append(f"{'/'.join(path) or '(root)'} ({type(node).__name__}: {own})")
            children = [(k, v) for k, v in vars(node).items() if not k.startswith("_pytree__")]
        elif isinstance(node, (list, tuple, nnx.List)):
            children = [(str(i), v) for i, v in enumerate(node)]
        elif isinstance(node, dict):
            children = [(str(k), v) for k, v in node.items()]
        else:
            return
        for k, v in children:
            walk(v, path + (k,))

    walk(jax_model, ())
    if unknown:
        raise ConversionError(f"no conversion rule for NNX module(s) with their own parameters {', '.join(unknown)}: "
                              f"write a Layout for these (docs/parity-user-models.md)")
    return out


def _normalise(path: tuple[str, ...], jax_model) -> tuple[str, ...]:
    """The torch-style name of an NNX path: ``nnx.Sequential``'s ``layers`` level is dropped, so
    ``net/layers/0`` reads as torch's ``net.0``."""
    from flax import nnx

    out, node = [], jax_model
    for k in path:
        if isinstance(node, nnx.Sequential) and k == "layers":
            node = node.layers
            continue
        out.append(k)
        node = node[int(k)] if isinstance(node, (list, tuple, nnx.List)) else (
            node[k] if isinstance(node, dict) else getattr(node, k))
    return tuple(out)


def _pair_rules(tname: str, kind: str, tm, jpath: tuple[str, ...], jm, flatten: Mapping) -> tuple[list, list]:
    """The rules (and dropped keys) of one paired layer, after checking that the two layers are
    configured alike where that changes the numbers."""
    t = (tname + ".") if tname else ""
    where = f"torch {tname or '(root)'} / NNX {'/'.join(jpath) or '(root)'}"
    rules: list[Rule] = []
    dropped: list[str] = []

    def bias(has_torch: bool, has_jax: bool, jax_name: str = "bias"):
        if has_torch != has_jax:
            raise ConversionError(f"{where}: bias in torch {has_torch}, in NNX {has_jax}")
        if has_torch:
            rules.append(Rule(t + "bias", jpath + (jax_name,)))

    if kind == "linear":
        if tname in flatten:
            rules.append(Rule(t + "weight", jpath + ("kernel",), "flatten_linear", chw=tuple(flatten[tname])))
        else:
            rules.append(Rule(t + "weight", jpath + ("kernel",), "linear"))
        bias(tm.bias is not None, jm.bias is not None)
    elif kind == "conv":
        rules.append(Rule(t + "weight", jpath + ("kernel",), "conv"))
        bias(tm.bias is not None, jm.bias is not None)
    elif kind == "embedding":
        rules.append(Rule(t + "weight", jpath + ("embedding",), "embed"))
    elif kind in ("batchnorm", "layernorm"):
        eps_t, eps_j = float(tm.eps), float(jm.epsilon)
        if abs(eps_t - eps_j) > 1e-12 * max(eps_t, 1.0):
            raise ConversionError(f"{where}: eps {eps_t:g} in torch, epsilon {eps_j:g} in NNX")
        affine = tm.weight is not None
        if affine != (jm.scale is not None) or affine != (jm.bias is not None):
            raise ConversionError(f"{where}: torch affine={affine}, NNX use_scale={jm.scale is not None} "
                                  f"use_bias={jm.bias is not None}")
        if affine:
            rules += [Rule(t + "weight", jpath + ("scale",)), Rule(t + "bias", jpath + ("bias",))]
        if kind == "batchnorm":
            if not tm.track_running_stats:
                raise ConversionError(f"{where}: torch track_running_stats=False normalises with batch statistics "
                                      f"in eval mode too; NNX BatchNorm has no such mode")
            if tm.momentum is None:
                raise ConversionError(f"{where}: torch momentum=None (a cumulative average over "
                                      f"num_batches_tracked) has no NNX equivalent; use a momentum")
            if abs((1.0 - float(tm.momentum)) - float(jm.momentum)) > 1e-6:
                raise ConversionError(f"{where}: torch momentum {tm.momentum:g} weighs the new batch; NNX momentum "
                                      f"weighs the old average: use nnx.BatchNorm(momentum={1 - tm.momentum:g}), "
                                      f"got {jm.momentum:g}")
            rules += [Rule(t + "running_mean", jpath + ("mean",), variable="batch_stat"),
                      Rule(t + "running_var", jpath + ("var",), variable="batch_stat")]
            dropped.append(t + "num_batches_tracked")
    elif kind == "lstm":
        if tm.num_layers != 1 or tm.bidirectional or getattr(tm, "proj_size", 0):
            raise ConversionError(f"{where}: only one-layer, unidirectional LSTMs without projection map onto "
                                  f"jaxlight.models.rnn.LSTM (write a Layout, or one LSTM per layer)")
        if not tm.bias:
            raise ConversionError(f"{where}: torch LSTM(bias=False); jaxlight's LSTM has both biases")
        rules += [Rule(t + "weight_ih_l0", jpath + ("kernel_ih",), "lstm"),
                  Rule(t + "weight_hh_l0", jpath + ("kernel_hh",), "lstm"),
                  Rule(t + "bias_ih_l0", jpath + ("bias_ih",)), Rule(t + "bias_hh_l0", jpath + ("bias_hh",))]
    return rules, dropped


def derive_layout(torch_model, jax_model, *, flatten: Mapping[str, tuple[int, int, int]] | None = None,
                  name: str | None = None) -> Layout:
    """The :class:`Layout` of a user's model pair, read off the two models' layers.

    Layers are ``Linear``/``nnx.Linear``, ``Conv2d``/``nnx.Conv``, ``BatchNorm1d|2d``/
    ``nnx.BatchNorm``, ``LayerNorm``/``nnx.LayerNorm``, ``Embedding``/``nnx.Embed`` and a
    one-layer ``LSTM``/``jaxlight.models.rnn.LSTM``. They are paired by name (torch ``net.0``
    with NNX ``net/layers/0``, an ``nnx.Sequential``); when the names differ, by order, if both
    models list the same kinds of layer in the same order. Anything else raises: then write the
    ``Layout`` by hand (``docs/parity-user-models.md``).

    Args:
        torch_model: a ``torch.nn.Module`` (read only; jaxlight does not import torch).
        jax_model: the NNX module meant to compute the same thing.
        flatten: ``{torch Linear name: (C, H, W)}`` for each ``Linear`` that reads a flattened
            NCHW feature map while its NNX twin reads the NHWC one (a CNN's first dense layer).
            The weights alone cannot tell; a wrong guess shows as a forward divergence at that
            layer in ``check_parity``.
        name: the layout's name (default: the torch class name).

    Returns:
        A ``Layout`` with parameter rules, batch-statistic rules and ``dropped`` keys
        (``num_batches_tracked``).

    Raises:
        ConversionError: a layer without a rule, layers that cannot be paired (listing both
            sides), or a pair configured differently (BatchNorm ``eps``/``momentum``, bias, affine).

    Example (the built-in CNN pair, whose ``fc1`` reads a flattened feature map):
        >>> import jaxlight, torch_ref
        >>> from torch_ref.interop import state_dict_to_numpy
        >>> torch_net, nnx_net = torch_ref.build_model("cnn"), jaxlight.build_model("cnn")
        >>> layout = derive_layout(torch_net, nnx_net, flatten={"fc1": (64, 7, 7)})
        >>> [r.kind for r in layout.rules if r.torch_name.endswith("weight")]
        ['conv', 'conv', 'flatten_linear', 'linear']
        >>> jax_net = model_from_torch(state_dict_to_numpy(torch_net), nnx_net, layout)
    """
    flatten = dict(flatten or {})
    tl = _torch_layers(torch_model)
    jl = _nnx_layers(jax_model)
    bad = sorted(set(flatten) - {n for n, k, _ in tl if k == "linear"})
    if bad:
        raise ConversionError(f"flatten names {bad}, which are not torch Linear layers")
    by_name = {_normalise(p, jax_model): (p, k, m) for p, k, m in jl}
    split = lambda n: tuple(n.split(".")) if n else ()  # noqa: E731
    pairs = []
    if len(tl) == len(jl) and all(split(n) in by_name for n, _, _ in tl):
        for n, k, m in tl:
            p, kj, mj = by_name[split(n)]
            if k != kj:
                raise ConversionError(f"torch {n} is a {k} layer, NNX {'/'.join(p)} a {kj} layer")
            pairs.append((n, k, m, p, mj))
    elif [k for _, k, _ in tl] == [k for _, k, _ in jl]:
        pairs = [(n, k, m, p, mj) for (n, k, m), (p, _, mj) in zip(tl, jl)]
    else:
        raise ConversionError(
            "cannot pair the layers by name or by order:\n  torch: "
            + ", ".join(f"{n or '(root)'} ({k})" for n, k, _ in tl) + "\n  NNX:   "
            + ", ".join(f"{'/'.join(p) or '(root)'} ({k})" for p, k, _ in jl)
            + "\nrename them alike, or write a Layout (docs/parity-user-models.md)")
    rules, dropped = [], []
    for n, k, m, p, mj in pairs:
        r, d = _pair_rules(n, k, m, p, mj, flatten)
        rules += r
        dropped += d
    # state_dict order: torch registration order of the tensors.
    order = {key: i for i, key in enumerate(torch_model.state_dict())}
    rules.sort(key=lambda r: order.get(r.torch_name, len(order)))
    return Layout(name or type(torch_model).__name__, tuple(rules), tuple(dropped))


def model_from_torch(arrays: Mapping[str, np.ndarray], jax_model, model: str | Layout):
    """A torch ``state_dict`` (as numpy) -> a new NNX module: ``jax_model``'s structure with the
    torch parameters and batch statistics (``jax_model`` itself is not modified; its other
    state, such as dropout RNG counts, is kept). ``num_batches_tracked`` is ignored.

    Example:
        >>> import jaxlight, torch_ref
        >>> from torch_ref.interop import state_dict_to_numpy
        >>> torch_net, nnx_net = torch_ref.build_model("mlp", seed=1), jaxlight.build_model("mlp")
        >>> nnx_net = model_from_torch(state_dict_to_numpy(torch_net), nnx_net, derive_layout(torch_net, nnx_net))
        >>> bool((nnx_net.fc1.kernel[...] == torch_net.fc1.weight.detach().numpy().T).all())
        True
    """
    from flax import nnx

    layout = layout_for(model)
    graphdef, params, stats, rest = nnx.split(jax_model, nnx.Param, nnx.BatchStat, ...)
    params = params_from_torch(arrays, params, layout)
    stats = batch_stats_from_torch(arrays, stats, layout)
    return nnx.merge(graphdef, params, stats, rest)


def model_to_torch(jax_model, model: str | Layout) -> dict[str, np.ndarray]:
    """An NNX module's parameters and batch statistics -> ``{torch_name: np.ndarray}`` in
    ``state_dict`` order, without ``num_batches_tracked`` (``torch_ref.interop.
    load_numpy_state_dict`` keeps the torch module's own counter)."""
    import jax
    from flax import nnx

    layout = layout_for(model)
    out = {**params_to_torch(jax.device_get(nnx.state(jax_model, nnx.Param)), layout),
           **batch_stats_to_torch(jax.device_get(nnx.state(jax_model, nnx.BatchStat)), layout)}
    return {r.torch_name: out[r.torch_name] for r in layout.rules}


# ----------------------------------------------------------------------------------------- #
# Optimizer state
#
# optax keeps Adam's moments in ``ScaleByAdamState(count, mu, nu)`` and SGD's momentum in
# ``TraceState(trace)``, wherever they sit in a chain (``jaxlight.optim`` wraps them with
# ``add_decayed_weights`` for L2 and with AdamW's decoupled decay, which have no state). The
# functions below find those fields by name, so they work for every optimizer of
# ``jaxlight.optim`` and for user chains with one Adam or one momentum trace.


def _slots_of(opt_state) -> dict[str, str]:
    """``{torch_slot: optax_field}`` present in ``opt_state`` (each at most once)."""
    import optax

    found = {}
    for slot, field in SLOTS.items():
        hits = optax.tree_utils.tree_get_all_with_path(opt_state, field)
        if len(hits) > 1:
            raise ConversionError(f"optimizer state holds {len(hits)} {field!r} fields; conversion supports one "
                                  f"Adam/momentum state per optimizer")
        if hits:
            found[slot] = field
    return found


def opt_state_to_torch(opt_state, model: str | Layout) -> dict:
    """optax state (from ``jaxlight.optim``) -> ``{"step", "slots"}`` in PyTorch's terms.

    Returns:
        ``{"step": int | None, "slots": {slot: {torch_name: np.ndarray}}}``; ``step`` is Adam's
        ``count`` (``None`` for SGD, which has no counter), slots as in ``SLOTS``. Plain SGD
        gives empty ``slots``.
    """
    import optax

    layout = layout_for(model)
    slots = {}
    for slot, field in _slots_of(opt_state).items():
        slots[slot] = params_to_torch(optax.tree_utils.tree_get(opt_state, field), layout)
    step = None
    if optax.tree_utils.tree_get_all_with_path(opt_state, "count") and "exp_avg" in slots:
        step = int(np.asarray(optax.tree_utils.tree_get(opt_state, "count")))
    return {"step": step, "slots": slots}


def opt_state_from_torch(state: Mapping, opt_state, params_template, model: str | Layout):
    """``{"step", "slots"}`` in PyTorch's terms -> a new optax state shaped like ``opt_state``.

    Args:
        state: from ``torch_ref.interop.optimizer_to_numpy`` (or ``opt_state_to_torch``).
            A slot that is absent (PyTorch creates its state lazily, on the first ``step()``)
            starts from zeros, which is what both libraries start from.
        opt_state: a template: ``tx.init(params)`` of the jaxlight optimizer to continue with.
        params_template: the parameters ``nnx.State`` (structure, shapes, dtypes of the slots).
        model: the model's name or a ``Layout``.

    Raises:
        ConversionError: a slot the optimizer does not have (Adam moments into SGD, say), an
            unknown or missing parameter, or a shape mismatch, naming it.
    """
    import jax.numpy as jnp
    import optax

    layout = layout_for(model)
    if not isinstance(state, Mapping) or "slots" not in state:
        raise ConversionError("optimizer state must be a dict {'step': int | None, 'slots': {slot: {name: array}}}")
    have = _slots_of(opt_state)
    unknown = sorted(set(state["slots"]) - set(have))
    if unknown:
        raise ConversionError(f"optimizer state slot(s) {unknown} do not exist in the target optimizer, "
                              f"which has {sorted(have) or 'no slots'} (is it the same optimizer?)")
    template_flat = _flat_template(params_template)
    updates = {}
    for slot, field in have.items():
        if slot in state["slots"]:
            flat = _convert_to_jax(state["slots"][slot], layout, template_flat, f"optimizer slot {slot!r}")
            updates[field] = _to_state(flat, params_template)
        else:
            updates[field] = _to_state({p: np.zeros(np.shape(a), np.asarray(a).dtype) for p, a in template_flat.items()},
                                       params_template)
    if "exp_avg" in have:
        step = state.get("step")
        if step is None:
            raise ConversionError("optimizer state: Adam/AdamW needs 'step' (the bias-correction count)")
        count = optax.tree_utils.tree_get(opt_state, "count")
        updates["count"] = jnp.asarray(int(step), count.dtype)
    return optax.tree_utils.tree_set(opt_state, **updates)


# ----------------------------------------------------------------------------------------- #
# A whole training state, to switch frameworks mid-training


def state_from_torch(state, model: str | Layout, weights: Mapping[str, np.ndarray],
                     optimizer: Mapping | None = None, step: int | None = None):
    """A jaxlight ``TrainState`` that continues a PyTorch run.

    Args:
        state: a ``TrainState`` built with the optimizer to continue with (``create_train_state``):
            gives the structure; its data key is kept.
        model: the model's name or a ``Layout``.
        weights: the torch ``state_dict`` as numpy; BatchNorm's running statistics go to
            ``state.model_state``.
        optimizer: the torch optimizer state as numpy (``torch_ref.interop.optimizer_to_numpy``);
            None keeps a freshly initialised optimizer state.
        step: optimizer steps already taken. Default: Adam's step count; SGD keeps none, so pass
            it (the step decides which epoch's data order comes next in ``jaxlight.loop.fit``).

    Returns:
        The new ``TrainState`` (``state`` itself is not modified).
    """
    import jax.numpy as jnp

    params = params_from_torch(weights, state.params, model)
    model_state = state.model_state
    if layout_for(model).stat_names:  # BatchNorm's running statistics live in model_state
        from flax import nnx

        stats = batch_stats_from_torch(weights, nnx.filter_state(model_state, nnx.BatchStat), model)
        model_state = _to_state(_flat_template(stats), model_state)
    opt_state = state.tx.init(params)
    if optimizer is not None:
        opt_state = opt_state_from_torch(optimizer, opt_state, params, model)
        if step is None:
            step = optimizer.get("step")
    new_step = state.step if step is None else jnp.asarray(int(step), state.step.dtype)
    return state.replace(params=params, opt_state=opt_state, step=new_step, model_state=model_state)


def state_to_torch(state, model: str | Layout) -> tuple[dict[str, np.ndarray], dict]:
    """``(weights, optimizer)`` of a jaxlight ``TrainState`` in PyTorch's terms (weights with the
    running statistics, without ``num_batches_tracked``), to continue the
    run in torch (``torch_ref.interop.load_numpy_state_dict`` / ``load_numpy_optimizer``).
    SGD keeps no step count (``step`` is None): ``state.step`` has it."""
    import jax
    from flax import nnx

    layout = layout_for(model)
    weights = params_to_torch(jax.device_get(state.params), layout)
    if layout.stat_names:
        weights.update(batch_stats_to_torch(jax.device_get(nnx.filter_state(state.model_state, nnx.BatchStat)), layout))
        weights = {r.torch_name: weights[r.torch_name] for r in layout.rules}
    optimizer = opt_state_to_torch(jax.device_get(state.opt_state), layout)
    return weights, optimizer
