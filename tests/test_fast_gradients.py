"""The hand-written gradients that make fused epochs fast on XLA:CPU (``conv2d_nhwc`` for the
CNN, ``lstm_recurrence`` for the LSTM) must compute what autodiff of the plain code computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlight.models import build_model, has_scan_slow_conv
from jaxlight.models.cnn import conv2d_nhwc, max_pool_2x2
from jaxlight.models.rnn import LSTM
from jaxlight.step import default_steps_per_call

NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv, x, k, padding, strides=(1, 1)):
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, NHWC)
    y = conv(x, k, strides, padding, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y))


def _float64(fn, *args):
    """``fn(*args)`` in float64: the reference the float32 sums are measured against."""
    jax.config.update("jax_enable_x64", True)
    try:
        return jax.tree.map(np.asarray, jax.jit(fn)(*(np.asarray(a, np.float64) for a in args)))
    finally:
        jax.config.update("jax_enable_x64", False)


SLOW = pytest.mark.slow  # (larger shapes: each compiles float64 autodiff for a minute of CPU in all)


@pytest.mark.parametrize("shape,kernel,padding", [
    pytest.param((4, 28, 28, 1), (3, 3, 1, 8), ((1, 1), (1, 1)), marks=SLOW),  # (the CNN's layer: parity covers it)
    pytest.param((3, 14, 14, 8), (3, 3, 8, 16), ((1, 1), (1, 1)), marks=SLOW),
    pytest.param((2, 9, 7, 3), (5, 3, 3, 4), ((2, 2), (1, 1)), marks=SLOW),
    ((2, 8, 8, 2), (2, 2, 2, 3), ((0, 1), (1, 0))),
])
def test_forward_and_gradients_match_autodiff(shape, kernel, padding):
    """Inside ``lax.scan`` (the situation the custom gradient exists for), against autodiff in
    float64. Not against autodiff in float32 inside the scan: XLA:CPU's naive loop nest there
    sums the kernel gradient over B*H*W terms less accurately (1.6e-4 off float64 for the first
    case, against 2.5e-5 for the patches matmul)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    k = rng.standard_normal(kernel, np.float32) * 0.3

    def grads(conv, x, k):
        return jax.value_and_grad(lambda x, k: _loss(conv, x, k, padding), argnums=(0, 1))(x, k)

    ours = jax.jit(lambda x, k: jax.lax.scan(lambda c, _: (c, grads(conv2d_nhwc, x, k)), None, None, length=2)[1])(x, k)
    ref = _float64(lambda x, k: grads(jax.lax.conv_general_dilated, x, k), x, k)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        for step in range(2):
            np.testing.assert_allclose(a[step], b, rtol=2e-5, atol=5e-5)


def test_unsupported_arguments_fall_back_to_lax():
    x = jnp.ones((1, 8, 8, 2))
    k = jnp.ones((3, 3, 2, 4))
    ours = jax.grad(lambda k: _loss(conv2d_nhwc, x, k, "SAME", (2, 2)))(k)
    ref = jax.grad(lambda k: _loss(jax.lax.conv_general_dilated, x, k, "SAME", (2, 2)))(k)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def _numpy_conv(x, k, padding):
    """A float64 convolution written out: negative padding crops, positive pads with zeros."""
    x = np.asarray(x, np.float64)
    for axis, (lo, hi) in zip((1, 2), padding):
        n = x.shape[axis]
        x = x.take(range(max(-lo, 0), n - max(-hi, 0)), axis=axis)
        widths = [(0, 0)] * 4
        widths[axis] = (max(lo, 0), max(hi, 0))
        x = np.pad(x, widths)
    kh, kw = k.shape[:2]
    out = np.zeros((x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1, k.shape[3]))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = np.einsum("bhwc,hwco->bo", x[:, i:i + kh, j:j + kw], np.asarray(k, np.float64))
    return out


@pytest.mark.parametrize("pad", [((-1, 1), (0, -1)), pytest.param(((-2, 0), (1, -1)), marks=SLOW),
                                 pytest.param(((0, -1), (-1, 2)), marks=SLOW)])
def test_negative_padding_crops_then_pads(pad):
    """Negative padding crops the input. Checked against a float64 convolution written out (the
    forward) and against autodiff of an explicit crop + zero pad + VALID convolution (the
    gradients): XLA:CPU's own convolution with negative padding is not a reference, its sums
    change from one process to the next."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 2), np.float32)
    k = rng.standard_normal((3, 3, 2, 4), np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, NHWC)
    forward = jax.jit(lambda x, k: conv2d_nhwc(x, k, (1, 1), pad, dimension_numbers=dn))
    np.testing.assert_allclose(forward(x, k), _numpy_conv(x, k, pad), rtol=1e-5, atol=1e-5)

    def explicit(x, k, padding):
        x = jax.lax.pad(x, 0.0, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
        return jax.lax.conv_general_dilated(x, k, strides, "VALID", dimension_numbers=dn)

    strides = (1, 1)
    ours = jax.jit(jax.value_and_grad(lambda x, k: _loss(conv2d_nhwc, x, k, pad), argnums=(0, 1)))(x, k)
    ref = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(explicit(x, k, pad))), argnums=(0, 1)))(x, k)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_other_backends_use_lax_and_autodiff(monkeypatch):
    """On a GPU or TPU the vendor convolution runs, with autodiff's gradient: the patches path
    is for XLA:CPU. Checked through the jaxpr, since this machine has only a CPU."""
    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    pad = ((1, 1), (1, 1))

    def ops(backend):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        jaxpr = jax.make_jaxpr(jax.grad(lambda k: _loss(conv2d_nhwc, x, k, pad)))(k)
        return {str(e.primitive) for e in jaxpr.eqns}

    gpu, cpu = ops("gpu"), ops("cpu")
    assert "conv_general_dilated" in gpu
    assert "conv_general_dilated" not in cpu and "dot_general" in cpu


class PlainConv(nnx.Module):
    def __init__(self):
        self.conv = nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("model,slow,backend,expected", [
    (lambda: build_model("cnn"), False, "cpu", 938),  # scan-friendly convolutions: fused on the CPU too
    (lambda: build_model("mlp"), False, "cpu", 938),
    (PlainConv, True, "cpu", 1),                      # autodiff's kernel gradient: one step per call
    (PlainConv, True, "gpu", 938),
])
def test_default_steps_per_call(model, slow, backend, expected):
    model = model()  # (built in the test, not while pytest collects the module)
    assert has_scan_slow_conv(model) == slow
    assert default_steps_per_call(model, 938, backend) == expected


def _reference_lstm(p, x):
    """The LSTM as plain autodiff sees it: torch's equations, one ``lax.scan``."""
    gates_x = x @ p["kernel_ih"] + p["bias_ih"]

    def cell(carry, gx):
        h, c = carry
        i, f, g, o = jnp.split(gx + (h @ p["kernel_hh"] + p["bias_hh"]), 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], p["kernel_hh"].shape[0]))
    (h, c), hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1))
    return jnp.swapaxes(hs, 0, 1), (h, c)


@pytest.mark.parametrize("batch,steps,features,hidden,uses", [
    pytest.param(4, 28, 28, 16, "h_T", marks=SLOW),  # the classifier's use: only the last hidden state
    (1, 1, 3, 4, "all"),         # every step's output, h_T and c_T together; one step
])
def test_lstm_gradients_match_autodiff(batch, steps, features, hidden, uses):
    lstm = LSTM(features, hidden, rngs=nnx.Rngs(0))
    params = {name: getattr(lstm, name)[...] for name in ("kernel_ih", "kernel_hh", "bias_ih", "bias_hh")}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, steps, features), np.float32)
    w = rng.standard_normal((batch, steps, hidden), np.float32)

    def loss(forward, p, x):
        hs, (h, c) = forward(p, x)
        terms = {"h_T": jnp.sum(jnp.sin(h)), "outputs": jnp.sum(hs * w), "all": jnp.sum(hs * w) + jnp.sum(h * c)}
        return terms[uses]

    graphdef, state = nnx.split(lstm)

    def ours(p, x):
        replaced = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(replaced, p)
        return nnx.merge(graphdef, replaced)(x)

    got = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(lambda p, x: loss(_reference_lstm, p, x), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lstm(x)[0], _reference_lstm(params, x)[0], rtol=1e-6, atol=1e-6)


def _first_max_pool_grad(x, dy):
    """What torch's max_pool2d backward does, in loops: each window's gradient to its first
    maximum in row-major order."""
    out = np.zeros_like(x)
    b, h, w, c = x.shape
    for n, i, j, k in np.ndindex(b, h // 2, w // 2, c):
        window = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k].reshape(-1)
        di, dj = divmod(int(np.argmax(window)), 2)  # argmax: the first maximum
        out[n, 2 * i + di, 2 * j + dj, k] = dy[n, i, j, k]
    return out


@pytest.mark.parametrize("levels", [2, pytest.param(3, marks=SLOW), pytest.param(1000, marks=SLOW)])
def test_max_pool_gives_ties_gradient_to_the_first_maximum_like_torch(levels):
    """Inputs from a few levels: most windows hold ties (levels=1000: almost none)."""
    rng = np.random.default_rng(levels)
    x = rng.integers(0, levels, (3, 8, 6, 4)).astype(np.float32)
    dy = rng.normal(size=(3, 4, 3, 4)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * dy)))(x)
    np.testing.assert_array_equal(grad, _first_max_pool_grad(x, dy))
    np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), nnx.max_pool(x, (2, 2), strides=(2, 2)))


@pytest.mark.parametrize("shape", [pytest.param((2, 28, 28, 3), marks=SLOW), pytest.param((3, 14, 14, 5), marks=SLOW),
                                   (1, 2, 4, 1)])
def test_max_pool_matches_flax_values_and_gradients(shape):
    x = np.random.default_rng(3).standard_normal(shape, np.float32)  # distinct values: a unique max per window
    ref = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), jax.jit(ref)(x))
    loss = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)) * jnp.arange(pool(x).size).reshape(pool(x).shape))))  # noqa: E731
    np.testing.assert_array_equal(loss(max_pool_2x2)(x), loss(ref)(x))

