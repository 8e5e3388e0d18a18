"""``translate()`` on the zoo: each torch model against its port, the torch side computed by
torch itself.

For every model: the weights convert exactly (bitwise, after the permutation) and the layout
covers every ``state_dict`` key; the forward pass matches in eval mode and in train mode
(dropout off on both sides: the two frameworks draw different masks; batch norm on batch
statistics, its running statistics updated as torch updates them); the gradients of a fixed
random projection of the outputs match, with respect to every parameter and every float
input. Tolerances: float32, ``rtol=1e-4``, ``atol=1e-5`` (gradients: ``atol`` scaled by the
gradient's magnitude, since they sum over the batch and the outputs).
"""

import copy
import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from zoo import SLOW, ZOO

from jaxlight import interop
from jaxlight.bridge.porting.translate import translate

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def ported(name):
    build = ZOO.get(name) or SLOW[name]
    model, inputs = build()
    return model, inputs, translate(model, inputs)


# The fast tier ports one model of each kind (convolution + batch norm, recurrent, attention with
# dropout and a padding mask, sequence-first attention, embeddings); the slow tier runs the whole
# zoo (each entry's ops are also checked one by one in test_translate_ops.py).
FAST = {"small_cnn", "gru_tagger", "encoder_block", "attention_seq_first", "bag_classifier"}
ALL = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in sorted(ZOO)] + [
    pytest.param(name, marks=pytest.mark.slow) for name in sorted(SLOW)]

# Gradient atol, as a fraction of the largest gradient. resnet18: 20 layers of train-mode batch
# norm whose last ones see 8 values per channel (batch 2, 2x2 maps) amplify float32 rounding:
# one weight in 10^5 differs by ~1e-5 of the largest gradient (measured: torch's own float32
# gradient is 2e-5 of it away from its float64 one).
GRAD_ATOL = {"resnet18": 5e-5}


def _np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _leaves(o)]
    return []


def _torch_train(model):
    """torch's train mode with dropout off (as jaxlight.bridge.parity does)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
        if isinstance(m, (torch.nn.MultiheadAttention, torch.nn.RNNBase)):
            m.dropout = 0.0  # their dropout is a float, applied whenever the module trains
    return model


def _nnx_train(model):
    model = nnx.clone(model)
    model.train()
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Dropout):
            m.deterministic = True
    return model


def _cotangents(outs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g) if o.is_floating_point() else None for o in outs]


def _assert_close(got, want, what, rtol=1e-4, atol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != torch's {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("name", ALL)
def test_weights_convert_exactly(name):
    model, _, t = ported(name)
    state = model.state_dict()
    covered = [r.torch_name for r in t.layout.rules] + list(t.layout.dropped)
    assert sorted(covered) == sorted(state), "the layout covers every state_dict key once"
    back = interop.model_to_torch(t.model, t.layout)
    for key, value in back.items():
        want = state[key].detach().numpy()
        want = want.astype(np.int32).astype(np.int64) if want.dtype == np.int64 else want
        assert value.dtype == want.dtype and value.shape == want.shape, key
        assert np.array_equal(value.view(np.uint8), want.view(np.uint8)), f"{key} is not bit-identical"


@pytest.mark.parametrize("name", ALL)
def test_forward_eval_and_train_match_torch(name):
    model, inputs, t = ported(name)
    arrays = [x.numpy() for x in inputs]
    # Eval mode.
    tm = copy.deepcopy(model).eval()
    jm = nnx.clone(t.model)
    jm.eval()
    with torch.no_grad():
        want = _leaves(tm(*inputs))
    got = jax.tree.leaves(jm(*arrays))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, _np(w), f"{name} eval output {i}")
    # Train mode: batch statistics, running statistics updated.
    tm = _torch_train(copy.deepcopy(model))
    jm = _nnx_train(t.model)
    with torch.no_grad():
        want = _leaves(tm(*inputs))
    got = jax.tree.leaves(jm(*arrays))
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, _np(w), f"{name} train output {i}")
    if t.layout.stat_names:
        stats = interop.batch_stats_to_torch(nnx.state(jm, nnx.BatchStat), t.layout)
        torch_state = tm.state_dict()
        for key in t.layout.stat_names:
            _assert_close(stats[key], _np(torch_state[key]), f"{name} {key} after a train step", atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_torch(name):
    model, inputs, t = ported(name)
    tm = _torch_train(copy.deepcopy(model))
    tin = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = _leaves(tm(*tin))
    cots = _cotangents(outs)
    loss = sum((o * c).sum() for o, c in zip(outs, cots) if c is not None)
    loss.backward()

    jm = _nnx_train(t.model)
    graphdef, params, rest = nnx.split(jm, nnx.Param, ...)
    floats = [i for i, x in enumerate(inputs) if x.is_floating_point()]
    arrays = [x.numpy() for x in inputs]
    jcots = [None if c is None else c.numpy() for c in cots]

    def f(params, float_inputs, rest):
        args = list(arrays)
        for i, a in zip(floats, float_inputs):
            args[i] = a
        out = jax.tree.leaves(nnx.merge(graphdef, params, rest, copy=True)(*args))
        return sum((o * c).sum() for o, c in zip(out, jcots) if c is not None)

    g_params, g_inputs = jax.jit(jax.grad(f, argnums=(0, 1)))(params, [arrays[i] for i in floats], rest)
    g_torch = interop.params_to_torch(g_params, t.layout)
    named = dict(tm.named_parameters())
    for key, g in g_torch.items():
        want = named[key].grad
        want = np.zeros_like(g) if want is None else want.numpy()
        scale = max(1.0, float(np.abs(want).max()))
        _assert_close(g, want, f"{name} d/d {key}", atol=GRAD_ATOL.get(name, 1e-5) * scale)
    for i, g in zip(floats, g_inputs):
        want = tin[i].grad.numpy()
        _assert_close(g, want, f"{name} d/d input {i}", atol=1e-5 * max(1.0, float(np.abs(want).max())))
