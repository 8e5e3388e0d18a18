"""The six models: output shapes, parameter counts from the architecture, and the same
parameter structure (up to layout) as their torch_ref twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlight.models import MODELS, build_model, count_params, has_conv

# Counted from the architecture, by hand.
EXPECTED_PARAMS = {
    "linear": 8 * 1 + 1,
    "logistic": 784 * 1 + 1,
    "softmax": 784 * 10 + 10,
    "mlp": 784 * 256 + 256 + 256 * 10 + 10,
    "cnn": (3 * 3 * 1 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (7 * 7 * 64 * 256 + 256) + (256 * 10 + 10),
    "lstm": (28 * 512 + 128 * 512 + 512 + 512) + (128 * 10 + 10),  # both LSTM biases, as torch
}
OUTPUT_WIDTH = {"linear": 1, "logistic": 1, "softmax": 10, "mlp": 10, "cnn": 10, "lstm": 10}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_parameter_count(name):
    model = build_model(name)
    x = jnp.zeros((3,) + model.input_shape)
    assert jax.eval_shape(model, x).shape == (3, OUTPUT_WIDTH[name])
    assert count_params(model) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_count_and_shapes_up_to_layout_as_torch(name):
    torch_models = pytest.importorskip("torch_ref.models")
    jax_model, torch_model = build_model(name), torch_models.build_model(name)
    assert torch_models.count_params(torch_model) == count_params(jax_model)
    # Same multiset of parameter sizes: the layouts differ (transposes, HWIO vs OIHW), the
    # number of scalars in each tensor does not. Both LSTM biases exist on both sides.
    jax_sizes = sorted(leaf.size for leaf in jax.tree.leaves(nnx.state(jax_model, nnx.Param)))
    torch_sizes = sorted(p.numel() for p in torch_model.parameters())
    assert jax_sizes == torch_sizes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seed_fixes_the_weights(name):
    leaves = lambda seed: jax.tree.leaves(nnx.state(build_model(name, seed), nnx.Param))  # noqa: E731
    for a, b in zip(leaves(0), leaves(0)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(0), leaves(1)))


def test_only_the_cnn_has_a_convolution():
    assert [n for n in sorted(MODELS) if has_conv(build_model(n))] == ["cnn"]


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")


def test_the_uniform_initialiser_is_jax_uniform_of_that_shape():
    """jaxlight draws a weight flat and reshapes it (a faster compile); the numbers are those of
    ``jax.random.uniform`` drawn in the weight's own shape, to the bit."""
    from jaxlight.models.init import uniform_init

    key, shape = jax.random.key(4), (3, 2, 5)
    want = jax.random.uniform(key, shape, jnp.float32, -0.25, 0.25)
    got = uniform_init(0.25)(key, shape, jnp.float32)
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
