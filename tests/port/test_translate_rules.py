"""The conversion rule kinds the port adds to ``jaxlight.interop``: each a permutation (or,
for int64 buffers, a checked cast) that round-trips to the same bits, against numpy written
out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlight.interop import ConversionError, Layout, Rule, params_from_torch, params_to_torch


def test_conv1d_reverses_the_axes():
    w = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)  # (out, in/groups, k)
    rule = Rule("conv.weight", ("conv", "kernel"), "conv1d")
    k = rule.to_jax(w)
    assert k.shape == (4, 3, 5)
    for o, i, j in [(0, 0, 0), (4, 2, 3), (1, 2, 0)]:
        assert k[j, i, o] == w[o, i, j]
    back = rule.to_torch(k)
    assert back.tobytes() == w.tobytes() and back.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("shape", [(), (7,), (1, 1, 8), (2, 3, 4, 5)])
def test_array_copies_any_shape(shape):
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    rule = Rule("cls_token", ("cls_token",), "array")
    assert rule.to_jax(a).tobytes() == a.tobytes() and rule.to_torch(rule.to_jax(a)).tobytes() == a.tobytes()


def test_int64_buffers_become_int32_only_when_every_value_fits():
    ids = np.arange(-3, 9, dtype=np.int64).reshape(3, 4)
    rule = Rule("pos_ids", ("pos_ids",), "int64", variable="batch_stat")
    j = rule.to_jax(ids)
    assert j.dtype == np.int32 and np.array_equal(j, ids)
    back = rule.to_torch(j)
    assert back.dtype == np.int64 and np.array_equal(back, ids)
    with pytest.raises(ConversionError, match="pos_ids: values outside int32"):
        rule.to_jax(np.array([2**31], np.int64))


def test_the_rules_move_a_state_dict_both_ways():
    rng = np.random.default_rng(2)
    arrays = {"conv.weight": rng.standard_normal((4, 2, 3)).astype(np.float32),
              "pos": rng.standard_normal((1, 5, 4)).astype(np.float32)}
    layout = Layout("mine", (Rule("conv.weight", ("conv", "kernel"), "conv1d"), Rule("pos", ("pos",), "array")))
    template = nnx.state(nnx.Dict(conv=nnx.Dict(kernel=nnx.Param(jnp.zeros((3, 2, 4)))),
                                  pos=nnx.Param(jnp.zeros((1, 5, 4)))), nnx.Param)
    params = params_from_torch(arrays, template, layout)
    back = params_to_torch(params, layout)
    for k in arrays:
        assert back[k].tobytes() == arrays[k].tobytes(), k


def test_a_conv1d_rule_refuses_another_rank():
    with pytest.raises(ConversionError, match="3 dimensions"):
        Rule("w", ("k",), "conv1d").to_jax(np.zeros((2, 2), np.float32))
