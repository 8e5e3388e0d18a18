"""PyTorch's default initialisation, written for Flax.

Both frameworks draw every model's initial weights from the same distributions, so two runs
initialised independently are the same experiment. We use PyTorch's defaults in both (the
tutorial's, and what most ported models were trained with), not Flax's:

| layer | weight | bias |
| --- | --- | --- |
| ``nn.Linear`` / ``nn.Conv2d`` | ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kaiming-uniform, a=sqrt(5)) | same bound |
| ``nn.LSTM`` | ``U(-1/sqrt(hidden), 1/sqrt(hidden))`` for all weights and both biases | same |

Flax's own defaults differ (lecun-normal kernels, zero biases); see ``tests/test_models.py``
for the test that the distributions match.

Any model, after it is built (a run config's ``init:`` does the same):

- :func:`init_torch` gives every ``nnx.Linear``, ``nnx.Conv``, ``nnx.LSTMCell`` /
  ``nnx.OptimizedLSTMCell`` and ``nnx.Embed`` PyTorch's default initialisation;
- :func:`init_params` sets the parameters whose path matches a pattern with any
  ``jax.nn.initializers`` initialiser.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxlight.models.init import init_params, init_torch
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    >>> model = init_torch(model, seed=0)
    >>> model = init_params(model, {"layers.0.kernel": jax.nn.initializers.orthogonal()}, seed=0)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["init_params", "init_torch", "param_paths", "torch_kernel_init", "torch_bias_init", "uniform_init"]


def uniform_init(bound: float):
    """``U(-bound, bound)`` for any shape."""

    def init(key, shape, dtype=jnp.float32):
        # Drawn flat, then reshaped: the same numbers (each element's bits depend on its flat
        # index alone), but XLA compiles one program per size, and a flat draw compiles 2-4x
        # faster than one of a shape such as (256, 10) on the CPU.
        return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)

    return init


def torch_kernel_init(key, shape, dtype=jnp.float32):
    """Kernel of shape ``(..., fan_in_part, out)`` (Linear ``(in, out)``, Conv ``HWIO``):
    ``fan_in`` is the product of every dimension but the last, as PyTorch computes it."""
    fan_in = int(np.prod(shape[:-1]))
    return uniform_init(1.0 / math.sqrt(fan_in))(key, shape, dtype)


def torch_bias_init(fan_in: int):
    """A bias initialiser with PyTorch's bound, which depends on the layer's fan-in."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def _lstm_bias_init(hidden: int):
    """PyTorch's LSTM has two biases per gate (``b_ih + b_hh``), each ``U(-1/sqrt(H), 1/sqrt(H))``;
    Flax's cells have one, so it is drawn as that sum (the same distribution of the effective bias)."""
    bound = 1.0 / math.sqrt(hidden)

    def init(key, shape, dtype=jnp.float32):
        a, b = jax.random.split(key)
        return uniform_init(bound)(a, shape, dtype) + uniform_init(bound)(b, shape, dtype)

    return init


def _torch_rules(module):
    """``{attribute: initialiser}`` for one layer PyTorch initialises by default, or None."""
    from flax import nnx

    if isinstance(module, (nnx.LSTMCell, nnx.OptimizedLSTMCell)):
        return "lstm"
    if isinstance(module, nnx.Embed):
        return {"embedding": jax.nn.initializers.normal(1.0)}  # torch.nn.Embedding: N(0, 1)
    if isinstance(module, (nnx.Linear, nnx.Conv)):
        fan_in = int(np.prod(module.kernel.shape[:-1]))  # Linear (in, out); Conv (..., in/groups, out)
        return {"kernel": torch_kernel_init, "bias": torch_bias_init(fan_in)}
    return None


def _key(seed_or_key):
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    return seed_or_key


def _set(param, init, key) -> None:
    value = param[...]
    param[...] = init(key, value.shape, value.dtype)


def init_torch(model, seed=0):
    """Give every Linear, Conv, LSTM cell and Embed layer of ``model`` PyTorch's default
    initialisation, in place; returns ``model``.

    ``nnx.Linear`` / ``nnx.Conv``: kernel and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    (fan_in = in_features, or in_channels / groups x kernel size). ``nnx.LSTMCell`` /
    ``nnx.OptimizedLSTMCell``: every kernel ``U(-1/sqrt(H), 1/sqrt(H))`` and each gate's one
    bias the sum of two such draws (torch's ``b_ih + b_hh``). ``nnx.Embed``: ``N(0, 1)``. Other
    layers (normalisation scales and offsets, your own ``nnx.Param``) keep their values.

    Args:
        model: any NNX module.
        seed: an int or a JAX key; parameter ``i`` in graph order draws from ``fold_in(key, i)``.
    """
    from flax import nnx

    key = _key(seed)
    done: set[tuple] = set()
    counter = 0
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or any(path[:len(d)] == d for d in done):
            continue
        rules = _torch_rules(node)
        if rules is None:
            continue
        if rules == "lstm":
            done.add(tuple(path))
            hidden = node.hidden_features
            for sub_path, param in nnx.iter_graph(node):
                if isinstance(param, nnx.Param):
                    init = _lstm_bias_init(hidden) if sub_path[-1] == "bias" else uniform_init(1 / math.sqrt(hidden))
                    _set(param, init, jax.random.fold_in(key, counter))
                    counter += 1
            continue
        for name, init in rules.items():
            param = getattr(node, name, None)
            if isinstance(param, nnx.Param):
                _set(param, init, jax.random.fold_in(key, counter))
                counter += 1
    return model


def param_paths(model) -> list[str]:
    """Every ``nnx.Param``'s dotted path in ``model`` (``"encoder.layers.0.kernel"``), the names
    :func:`init_params` and ``jaxlight.optim.freeze`` match patterns against."""
    from flax import nnx

    return [".".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]


def init_params(model, initializers: dict, seed=0):
    """Re-initialise the parameters whose dotted path matches a pattern, in place; returns ``model``.

    Args:
        model: any NNX module.
        initializers: ``{pattern: initializer}``; a pattern is an ``fnmatch`` pattern over
            :func:`param_paths` (``*`` also matches dots: ``"encoder.*.kernel"``), an initialiser
            ``init(key, shape, dtype)`` (``jax.nn.initializers.orthogonal()``). When several
            patterns match one parameter, the last one given wins.
        seed: an int or a JAX key; parameter ``i`` in graph order draws from ``fold_in(key, i)``.

    Raises:
        ValueError: a pattern matches no parameter (the message lists some that exist).
    """
    import fnmatch

    from flax import nnx

    key = _key(seed)
    params = [(".".join(map(str, p)), node) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]
    for pattern in initializers:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in params):
            raise ValueError(f"init pattern {pattern!r} matches no parameter of {type(model).__name__}; its "
                             f"parameters: {', '.join(n for n, _ in params[:8])}{'...' if len(params) > 8 else ''}")
    for i, (name, param) in enumerate(params):
        chosen = [init for pattern, init in initializers.items() if fnmatch.fnmatchcase(name, pattern)]
        if chosen:
            _set(param, chosen[-1], jax.random.fold_in(key, i))
    return model
