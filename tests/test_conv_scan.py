"""``conv2d_nhwc``: the convolution whose hand-written gradient keeps CNN epochs fusable on the
CPU. It must compute exactly what autodiff of ``lax.conv_general_dilated`` computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlight.models import build_model, has_scan_slow_conv
from jaxlight.models.cnn import conv2d_nhwc
from jaxlight.step import default_steps_per_call

NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv, x, k, padding, strides=(1, 1)):
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, NHWC)
    y = conv(x, k, strides, padding, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("shape,kernel,padding", [
    ((4, 28, 28, 1), (3, 3, 1, 8), ((1, 1), (1, 1))),
    ((3, 14, 14, 8), (3, 3, 8, 16), ((1, 1), (1, 1))),
    ((2, 9, 7, 3), (5, 3, 3, 4), ((2, 2), (1, 1))),
    ((2, 8, 8, 2), (2, 2, 2, 3), ((0, 1), (1, 0))),
])
@pytest.mark.parametrize("in_scan", [False, True])
def test_forward_and_gradients_match_autodiff(shape, kernel, padding, in_scan):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    k = jax.random.normal(kk, kernel) * 0.3

    def grads(conv):
        fn = jax.value_and_grad(lambda x, k: _loss(conv, x, k, padding), argnums=(0, 1))
        if in_scan:  # the situation the custom gradient exists for
            return jax.lax.scan(lambda c, _: (c, fn(x, k)), None, None, length=2)[1]
        return fn(x, k)

    ours = jax.jit(lambda: grads(conv2d_nhwc))()
    ref = jax.jit(lambda: grads(jax.lax.conv_general_dilated))()
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_unsupported_arguments_fall_back_to_lax():
    x = jnp.ones((1, 8, 8, 2))
    k = jnp.ones((3, 3, 2, 4))
    ours = jax.grad(lambda k: _loss(conv2d_nhwc, x, k, "SAME", (2, 2)))(k)
    ref = jax.grad(lambda k: _loss(jax.lax.conv_general_dilated, x, k, "SAME", (2, 2)))(k)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


class PlainConv(nnx.Module):
    def __init__(self):
        self.conv = nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("model,slow,backend,expected", [
    (build_model("cnn"), False, "cpu", 938),  # scan-friendly convolutions: fused on the CPU too
    (build_model("mlp"), False, "cpu", 938),
    (PlainConv(), True, "cpu", 1),            # autodiff's kernel gradient: one step per call
    (PlainConv(), True, "gpu", 938),
])
def test_default_steps_per_call(model, slow, backend, expected):
    assert has_scan_slow_conv(model) == slow
    assert default_steps_per_call(model, 938, backend) == expected
