"""The torch layers the port keeps as layers: for each, the ``jaxlight.bridge.porting.nn`` constructor
call that rebuilds it, the conversion rules of its parameters (``jaxlight.interop.Rule``), the
layout it runs in, and the configurations it refuses.

Every other module is either a container (``Sequential``, ``ModuleList``, ``ModuleDict``) or a
class whose ``forward`` is traced and written as a class of its own (a user's class, or a torch
module built from other modules such as ``TransformerEncoderLayer``); a torch layer without
children that is not listed here is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from jaxlight.interop import Rule


@dataclass
class LayerSpec:
    nn_name: str
    ctor: Callable  # module -> (args list, kwargs dict) of the jaxlight.bridge.porting.nn constructor
    rules: Callable  # (module, torch prefix, jax path) -> (rules, dropped)
    layout: str = "cf"  # "cl": channels-last feature maps in and out; "any": elementwise; "cf": torch layout
    check: Callable = lambda m: []  # module -> [problem]
    rngs: bool = True  # the constructor takes rngs=
    call_check: Callable = lambda m, kwargs: []  # (module, the call's keyword arguments) -> [problem]


def _bias_rules(m, t, j, weight_kind):
    rules = [Rule(t + "weight", j + ("kernel",), weight_kind)]
    if getattr(m, "bias", None) is not None:
        rules.append(Rule(t + "bias", j + ("bias",)))
    return rules, []


def _opt(kwargs: dict, name: str, value, default):
    if value != default:
        kwargs[name] = value


def _linear(m):
    kw = {}
    _opt(kw, "bias", m.bias is not None, True)
    return [m.in_features, m.out_features], kw


def _conv(m):
    kw = {"kernel_size": tuple(m.kernel_size)}
    nd = len(m.kernel_size)
    _opt(kw, "stride", tuple(m.stride), (1,) * nd)
    pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
    _opt(kw, "padding", pad, (0,) * nd)
    _opt(kw, "dilation", tuple(m.dilation), (1,) * nd)
    _opt(kw, "groups", m.groups, 1)
    _opt(kw, "bias", m.bias is not None, True)
    _opt(kw, "padding_mode", m.padding_mode, "zeros")
    return [m.in_channels, m.out_channels], kw


def _conv_transpose(m):
    args, kw = _conv(m)
    nd = len(m.kernel_size)
    _opt(kw, "output_padding", tuple(m.output_padding), (0,) * nd)
    return args, kw


def _conv_check(m):
    return _issues((getattr(m, "padding_mode", "zeros") != "zeros" and type(m).__name__.startswith("ConvTranspose"),
                    f"padding_mode={getattr(m, 'padding_mode', None)!r}"))


def _batchnorm(m):
    kw = {}
    _opt(kw, "eps", m.eps, 1e-5)
    _opt(kw, "momentum", m.momentum, 0.1)
    _opt(kw, "affine", m.affine, True)
    return [m.num_features], kw


def _batchnorm_check(m):
    return _issues((m.momentum is None, "momentum=None (a cumulative average over num_batches_tracked)"),
                   (not m.track_running_stats, "track_running_stats=False (batch statistics in eval mode too)"))


def _batchnorm_rules(m, t, j):
    rules = []
    if m.affine:
        rules += [Rule(t + "weight", j + ("scale",)), Rule(t + "bias", j + ("bias",))]
    rules += [Rule(t + "running_mean", j + ("mean",), variable="batch_stat"),
              Rule(t + "running_var", j + ("var",), variable="batch_stat")]
    return rules, [t + "num_batches_tracked"]


def _layernorm(m):
    kw = {}
    _opt(kw, "eps", m.eps, 1e-5)
    _opt(kw, "elementwise_affine", m.elementwise_affine, True)
    if m.elementwise_affine:
        _opt(kw, "bias", m.bias is not None, True)
    return [tuple(m.normalized_shape)], kw


def _norm_rules(m, t, j):
    rules = []
    kind = "copy" if getattr(m, "weight", None) is None or m.weight.ndim == 1 else "array"
    if getattr(m, "weight", None) is not None:
        rules.append(Rule(t + "weight", j + ("scale",), kind))
    if getattr(m, "bias", None) is not None:
        rules.append(Rule(t + "bias", j + ("bias",), kind))
    return rules, []


def _groupnorm(m):
    kw = {}
    _opt(kw, "eps", m.eps, 1e-5)
    _opt(kw, "affine", m.affine, True)
    return [m.num_groups, m.num_channels], kw


def _embedding(m):
    kw = {}
    _opt(kw, "padding_idx", m.padding_idx, None)
    return [m.num_embeddings, m.embedding_dim], kw


def _issues(*pairs) -> list:
    """The messages whose condition holds: a layer configuration without a translation."""
    return [message for condition, message in pairs if condition]


def _embedding_check(m):
    return _issues((m.max_norm is not None, "max_norm (renormalises the weight in place during forward)"),
                   (m.scale_grad_by_freq, "scale_grad_by_freq=True"))


def _embedding_bag(m):
    kw = {"mode": m.mode}
    _opt(kw, "padding_idx", m.padding_idx, None)
    return [m.num_embeddings, m.embedding_dim], kw


def _embedding_bag_check(m):
    return _embedding_check(m) + _issues((getattr(m, "include_last_offset", False), "include_last_offset=True"))


def _rnn(m):
    kw = {}
    if type(m).__name__ == "RNN":
        _opt(kw, "nonlinearity", m.nonlinearity, "tanh")
    _opt(kw, "num_layers", m.num_layers, 1)
    _opt(kw, "bias", m.bias, True)
    _opt(kw, "batch_first", m.batch_first, False)
    _opt(kw, "dropout", float(m.dropout), 0.0)
    _opt(kw, "bidirectional", m.bidirectional, False)
    return [m.input_size, m.hidden_size], kw


def _rnn_check(m):
    return ["proj_size > 0"] if getattr(m, "proj_size", 0) else []


def _rnn_rules(m, t, j):
    rules = []
    for layer in range(m.num_layers):
        for sfx in [f"_l{layer}"] + ([f"_l{layer}_reverse"] if m.bidirectional else []):
            rules += [Rule(t + "weight_ih" + sfx, j + ("kernel_ih" + sfx,), "lstm"),
                      Rule(t + "weight_hh" + sfx, j + ("kernel_hh" + sfx,), "lstm")]
            if m.bias:
                rules += [Rule(t + "bias_ih" + sfx, j + ("bias_ih" + sfx,)),
                          Rule(t + "bias_hh" + sfx, j + ("bias_hh" + sfx,))]
    return rules, []


def _mha(m):
    kw = {}
    _opt(kw, "dropout", float(m.dropout), 0.0)
    _opt(kw, "bias", m.in_proj_bias is not None, True)
    _opt(kw, "kdim", m.kdim, m.embed_dim)
    _opt(kw, "vdim", m.vdim, m.embed_dim)
    _opt(kw, "batch_first", m.batch_first, False)
    return [m.embed_dim, m.num_heads], kw


def _mha_check(m):
    return _issues((m.bias_k is not None, "add_bias_kv=True"), (m.add_zero_attn, "add_zero_attn=True"))


def _mha_rules(m, t, j):
    if m._qkv_same_embed_dim:
        rules = [Rule(t + "in_proj_weight", j + ("in_proj_kernel",), "linear")]
    else:
        rules = [Rule(t + f"{p}_proj_weight", j + (f"{p}_proj_kernel",), "linear") for p in "qkv"]
    if m.in_proj_bias is not None:
        rules.append(Rule(t + "in_proj_bias", j + ("in_proj_bias",)))
    rules.append(Rule(t + "out_proj.weight", j + ("out_proj", "kernel"), "linear"))
    if m.out_proj.bias is not None:
        rules.append(Rule(t + "out_proj.bias", j + ("out_proj", "bias")))
    return rules, []


def _encoder_layer(m):
    kw = {"dim_feedforward": m.linear1.out_features}
    _opt(kw, "dropout", float(m.dropout.p), 0.1)
    _opt(kw, "activation", _activation_name(m), "relu")
    _opt(kw, "layer_norm_eps", m.norm1.eps, 1e-5)
    _opt(kw, "batch_first", m.self_attn.batch_first, False)
    _opt(kw, "norm_first", m.norm_first, False)
    _opt(kw, "bias", m.linear1.bias is not None, True)
    return [m.self_attn.embed_dim, m.self_attn.num_heads], kw


def _activation_name(m) -> str | None:
    import torch.nn.functional as TF

    act = m.activation
    if act is TF.relu or type(act).__name__ == "ReLU":
        return "relu"
    if (act is TF.gelu) or (type(act).__name__ == "GELU" and getattr(act, "approximate", "none") == "none"):
        return "gelu"
    return None


def _encoder_layer_check(m):
    out = [] if _activation_name(m) else [f"activation {m.activation!r} (relu or exact gelu only)"]
    return out + [f"self_attn: {issue}" for issue in _mha_check(m.self_attn)]


def _encoder_layer_rules(m, t, j):
    rules = _mha_rules(m.self_attn, t + "self_attn.", j + ("self_attn",))[0]
    for name in ("linear1", "linear2"):
        rules += _bias_rules(getattr(m, name), f"{t}{name}.", j + (name,), "linear")[0]
    for name in ("norm1", "norm2"):
        rules += _norm_rules(getattr(m, name), f"{t}{name}.", j + (name,))[0]
    return rules, []


def _encoder(m):
    from jaxlight.bridge.porting.translate import _layer_ctor  # (the nested layer's constructor text)

    kw = {"norm": _Raw(_layer_ctor(m.norm) if m.norm is not None else "None")}
    return [_Raw(_layer_ctor(m.layers[0])), m.num_layers], kw


def _encoder_check(m):
    out = _encoder_layer_check(m.layers[0])
    first = _encoder_layer(m.layers[0])
    if any(_encoder_layer(layer) != first for layer in m.layers):
        out.append("layers configured differently from one another")
    if m.norm is not None and type(m.norm).__name__ != "LayerNorm":
        out.append(f"a final norm of type {type(m.norm).__name__}")
    return out


def _encoder_rules(m, t, j):
    rules = []
    for i, layer in enumerate(m.layers):
        rules += _encoder_layer_rules(layer, f"{t}layers.{i}.", j + ("layers", str(i)))[0]
    if m.norm is not None:
        rules += _norm_rules(m.norm, t + "norm.", j + ("norm",))[0]
    return rules, []


def _encoder_call_check(m, kwargs: dict):
    if getattr(m, "use_nested_tensor", False) and kwargs.get("src_key_padding_mask") is not None:
        return ["with a src_key_padding_mask and enable_nested_tensor=True, torch returns zeros at the padded "
                "positions in eval mode without gradients (nested tensors); build it with enable_nested_tensor=False"]
    return []


class _Raw(str):
    """Constructor text written as it is (a nested layer)."""

    def __repr__(self):
        return str(self)


def _none(m, t, j):
    return [], []


def _attrs(*names, defaults=None):
    """A parameter-free layer rebuilt from the torch module's attributes of these names (those
    at their default left out; a pool's ``stride`` equal to its kernel too)."""
    defaults = defaults or {}

    def ctor(m):
        kw = {}
        for n in names:
            v = getattr(m, n)
            if isinstance(v, list):
                v = tuple(v)
            if (n in defaults and defaults[n] == v) or (n == "stride" and v == getattr(m, "kernel_size", None)):
                continue
            kw[n] = v
        return [], kw

    return ctor


def _dropout(m):
    return [float(m.p)], {}


def _prelu(m):
    return [], {"num_parameters": m.num_parameters}


def _pool_check(m):
    return ["return_indices=True"] if getattr(m, "return_indices", False) else []


def _upsample_check(m):
    sf = m.scale_factor
    return _issues((m.mode != "nearest", f"mode={m.mode!r} (nearest only)"),
                   (sf is not None and any(float(f) != int(f) for f in (sf if isinstance(sf, (tuple, list)) else (sf,))),
                    "a non-integer scale_factor"))


_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "count_include_pad": True,
                  "divisor_override": None, "return_indices": False}


def _pool_ctor(*names):
    return _attrs(*names, defaults=_POOL_DEFAULTS)


LAYERS: dict[str, LayerSpec] = {
    "Linear": LayerSpec("Linear", _linear, lambda m, t, j: _bias_rules(m, t, j, "linear")),
    "Conv1d": LayerSpec("Conv1d", _conv, lambda m, t, j: _bias_rules(m, t, j, "conv1d"), "cl", _conv_check),
    "Conv2d": LayerSpec("Conv2d", _conv, lambda m, t, j: _bias_rules(m, t, j, "conv"), "cl", _conv_check),
    "ConvTranspose1d": LayerSpec("ConvTranspose1d", _conv_transpose,
                                 lambda m, t, j: _bias_rules(m, t, j, "conv1d"), "cl", _conv_check),
    "ConvTranspose2d": LayerSpec("ConvTranspose2d", _conv_transpose,
                                 lambda m, t, j: _bias_rules(m, t, j, "conv"), "cl", _conv_check),
    "BatchNorm1d": LayerSpec("BatchNorm1d", _batchnorm, _batchnorm_rules, "cl", _batchnorm_check),
    "BatchNorm2d": LayerSpec("BatchNorm2d", _batchnorm, _batchnorm_rules, "cl", _batchnorm_check),
    "BatchNorm3d": LayerSpec("BatchNorm3d", _batchnorm, _batchnorm_rules, "cl", _batchnorm_check),
    "LayerNorm": LayerSpec("LayerNorm", _layernorm, _norm_rules),
    "GroupNorm": LayerSpec("GroupNorm", _groupnorm, _norm_rules),
    "Embedding": LayerSpec("Embedding", _embedding,
                           lambda m, t, j: ([Rule(t + "weight", j + ("embedding",), "embed")], []),
                           check=_embedding_check),
    "EmbeddingBag": LayerSpec("EmbeddingBag", _embedding_bag,
                              lambda m, t, j: ([Rule(t + "weight", j + ("embedding",), "embed")], []),
                              check=_embedding_bag_check),
    "LSTM": LayerSpec("LSTM", _rnn, _rnn_rules, check=_rnn_check),
    "GRU": LayerSpec("GRU", _rnn, _rnn_rules),
    "RNN": LayerSpec("RNN", _rnn, _rnn_rules),
    "MultiheadAttention": LayerSpec("MultiheadAttention", _mha, _mha_rules, check=_mha_check),
    "TransformerEncoderLayer": LayerSpec("TransformerEncoderLayer", _encoder_layer, _encoder_layer_rules,
                                         check=_encoder_layer_check),
    "TransformerEncoder": LayerSpec("TransformerEncoder", _encoder, _encoder_rules, check=_encoder_check,
                                    call_check=_encoder_call_check),
    "Dropout": LayerSpec("Dropout", _dropout, _none, "any"),
    "Dropout1d": LayerSpec("Dropout1d", _dropout, _none, "cl"),
    "Dropout2d": LayerSpec("Dropout2d", _dropout, _none, "cl"),
    "PReLU": LayerSpec("PReLU", _prelu, lambda m, t, j: ([Rule(t + "weight", j + ("weight",))], []), rngs=False),
    "MaxPool1d": LayerSpec("MaxPool1d", _pool_ctor("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                           _none, "cl", _pool_check, rngs=False),
    "MaxPool2d": LayerSpec("MaxPool2d", _pool_ctor("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                           _none, "cl", _pool_check, rngs=False),
    "AvgPool1d": LayerSpec("AvgPool1d", _pool_ctor("kernel_size", "stride", "padding", "ceil_mode",
                                                   "count_include_pad"), _none, "cl", rngs=False),
    "AvgPool2d": LayerSpec("AvgPool2d", _pool_ctor("kernel_size", "stride", "padding", "ceil_mode",
                                                   "count_include_pad", "divisor_override"), _none, "cl", rngs=False),
    "AdaptiveAvgPool1d": LayerSpec("AdaptiveAvgPool1d", _attrs("output_size"), _none, "cl", rngs=False),
    "AdaptiveAvgPool2d": LayerSpec("AdaptiveAvgPool2d", _attrs("output_size"), _none, "cl", rngs=False),
    "AdaptiveMaxPool1d": LayerSpec("AdaptiveMaxPool1d", _attrs("output_size"), _none, "cl", _pool_check, rngs=False),
    "AdaptiveMaxPool2d": LayerSpec("AdaptiveMaxPool2d", _attrs("output_size"), _none, "cl", _pool_check, rngs=False),
    "Upsample": LayerSpec("Upsample", _attrs("size", "scale_factor", defaults={"size": None, "scale_factor": None}),
                          _none, "cl", _upsample_check, rngs=False),
    "Flatten": LayerSpec("Flatten", _attrs("start_dim", "end_dim", defaults={"start_dim": 1, "end_dim": -1}), _none,
                         rngs=False),
    "Unflatten": LayerSpec("Unflatten", lambda m: ([m.dim, tuple(m.unflattened_size)], {}), _none, rngs=False),
    "PixelShuffle": LayerSpec("PixelShuffle", lambda m: ([m.upscale_factor], {}), _none, rngs=False),
    "Softmax": LayerSpec("Softmax", _attrs("dim", defaults={"dim": None}), _none, rngs=False),
    "LogSoftmax": LayerSpec("LogSoftmax", _attrs("dim", defaults={"dim": None}), _none, rngs=False),
    "GLU": LayerSpec("GLU", _attrs("dim", defaults={"dim": -1}), _none, rngs=False),
    "GELU": LayerSpec("GELU", _attrs("approximate", defaults={"approximate": "none"}), _none, "any", rngs=False),
    "LeakyReLU": LayerSpec("LeakyReLU", _attrs("negative_slope", defaults={"negative_slope": 0.01}), _none, "any",
                           rngs=False),
    "ELU": LayerSpec("ELU", _attrs("alpha", defaults={"alpha": 1.0}), _none, "any", rngs=False),
    "CELU": LayerSpec("CELU", _attrs("alpha", defaults={"alpha": 1.0}), _none, "any", rngs=False),
    "Softplus": LayerSpec("Softplus", _attrs("beta", "threshold", defaults={"beta": 1.0, "threshold": 20.0}), _none,
                          "any", rngs=False),
    "Hardtanh": LayerSpec("Hardtanh", _attrs("min_val", "max_val", defaults={"min_val": -1.0, "max_val": 1.0}),
                          _none, "any", rngs=False),
}
for _name in ("ReLU", "ReLU6", "SiLU", "Tanh", "Sigmoid", "SELU", "Mish", "Hardswish", "Hardsigmoid", "LogSigmoid",
              "Tanhshrink", "Softsign", "Identity"):
    LAYERS[_name] = LayerSpec(_name, lambda m: ([], {}), _none, "any", rngs=False)

# Layers whose inplace=True makes them write their input (as ReLU(inplace=True) does).
INPLACE_ATTR = "inplace"

_CONTAINERS = {"ModuleList": "list", "ModuleDict": "dict", "ParameterList": "plist", "ParameterDict": "pdict"}


def torch_layer_name(m) -> str | None:
    """The name of the supported torch layer ``m`` is (its class or a base whose ``forward`` it
    keeps), or None."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn") and cls.__name__ in LAYERS:
            if cls is type(m) or type(m).forward is cls.forward:
                return cls.__name__
            return None
    return None


def classify(m) -> str:
    """``"layer"`` (kept as a ``jaxlight.bridge.porting.nn`` layer), ``"sequential"``, ``"list"``,
    ``"dict"`` (containers), ``"class"`` (its ``forward`` traced as a class of its own) or
    ``"unsupported"`` (a torch layer without a translation)."""
    import torch.nn as tnn

    if torch_layer_name(m) is not None:
        return "layer"
    if isinstance(m, tnn.Sequential) and type(m).forward is tnn.Sequential.forward:
        return "sequential"
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn") and cls.__name__ in _CONTAINERS:
            if type(m).forward is not tnn.Module.forward:
                return "class"  # a ModuleDict subclass with a forward of its own (densenet's _DenseBlock)
            return _CONTAINERS[cls.__name__]
    if type(m).__module__.startswith("torch.") and not list(m.children()):
        if type(m).forward is tnn.Module.forward:
            return "class"
        return "unsupported"
    return "class"
