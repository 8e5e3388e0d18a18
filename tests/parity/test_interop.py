"""Conversion torch <-> jaxlight: exact round trips, the layouts, clear errors."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref
from jaxlight import interop, optim
from jaxlight.interop import ConversionError, Rule
from torch_ref.interop import (load_numpy_optimizer, load_numpy_state_dict, optimizer_to_numpy,
                               state_dict_to_numpy)

MODELS = ["linear", "logistic", "softmax", "mlp", "cnn", "lstm"]


@pytest.fixture
def template(jax_model):
    """``template(name)``: a fresh copy of the jaxlight parameters of ``name``."""
    return lambda name: jax.tree.map(lambda a: a, nnx.state(jax_model(name), nnx.Param))


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", MODELS)
def test_weights_round_trip_exactly_both_ways(name, template):
    arrays = state_dict_to_numpy(torch_ref.build_model(name, seed=0))
    params = interop.params_from_torch(arrays, template(name), name)
    back = interop.params_to_torch(params, name)
    assert list(back) == list(arrays)  # state_dict order kept
    assert all(same_bits(back[k], arrays[k]) for k in arrays)
    # jax -> torch -> jax, through a real torch module.
    own = template(name)
    tmodel = torch_ref.build_model(name, seed=5)
    load_numpy_state_dict(tmodel, interop.params_to_torch(own, name))
    again = interop.params_from_torch(state_dict_to_numpy(tmodel), template(name), name)
    for (path, a), (_, b) in zip(nnx.to_flat_state(own), nnx.to_flat_state(again)):
        assert same_bits(np.asarray(a[...]), np.asarray(b[...])), path


@pytest.mark.parametrize("name", MODELS)
def test_converted_models_compute_the_same_outputs(name, jax_model):
    tmodel = torch_ref.build_model(name, seed=0)
    graphdef, tmpl, rest = nnx.split(jax_model(name), nnx.Param, ...)
    params = interop.params_from_torch(state_dict_to_numpy(tmodel), tmpl, name)
    x = np.random.default_rng(0).random((5, *tmodel.input_shape), dtype=np.float32)
    out_j = np.asarray(nnx.merge(graphdef, params, rest)(x))
    out_t = tmodel(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out_j, out_t, rtol=1e-5, atol=1e-6)


def test_cnn_flatten_permutation_maps_each_feature():
    # Column j of torch's fc1 reads feature (c, h, w) = unravel(j, (64, 7, 7)); after conversion
    # the row of jaxlight's kernel that reads (h, w, c) must hold it.
    rule = interop.layout_for("cnn").rule("fc1.weight")
    w = np.arange(256 * 3136, dtype=np.float32).reshape(256, 3136)
    k = rule.to_jax(w)
    for c, h, w_ in [(0, 0, 0), (63, 6, 6), (5, 2, 3), (17, 6, 0)]:
        np.testing.assert_array_equal(k[(h * 7 + w_) * 64 + c], w[:, c * 49 + h * 7 + w_])


@pytest.mark.parametrize("kind, torch_shape, jax_shape", [
    ("linear", (3, 5), (5, 3)),
    ("conv", (32, 1, 3, 3), (3, 3, 1, 32)),
    ("lstm", (512, 28), (28, 512)),
    ("copy", (7,), (7,)),
])
def test_rule_shapes(kind, torch_shape, jax_shape):
    a = np.random.default_rng(0).random(torch_shape).astype(np.float32)
    rule = Rule("p", ("p",), kind)
    assert rule.to_jax(a).shape == jax_shape
    assert same_bits(rule.to_torch(rule.to_jax(a)), a)


def test_lstm_gate_blocks_keep_torch_order():
    # Rows [0:H) of weight_ih are the input gate, [H:2H) forget, [2H:3H) cell, [3H:4H) output.
    w = np.repeat(np.arange(4, dtype=np.float32), 128)[:, None] * np.ones((1, 28), np.float32)
    k = interop.layout_for("lstm").rule("lstm.weight_ih_l0").to_jax(w)
    assert [float(k[0, g * 128]) for g in range(4)] == [0.0, 1.0, 2.0, 3.0]


def _arrays(name="mlp"):
    return state_dict_to_numpy(torch_ref.build_model(name, seed=0))


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop("fc2.bias"), r"missing key\(s\) \['fc2.bias'\]"),
    (lambda a: a.update({"fc3.weight": np.zeros((2, 2), np.float32)}), r"unknown key\(s\) \['fc3.weight'\]"),
    (lambda a: a.update({"fc1.weight": np.zeros((256, 785), np.float32)}), r"'fc1.weight'.*\(256, 785\).*fc1/kernel is \(784, 256\)"),
    (lambda a: a.update({"fc1.bias": np.zeros((256, 1), np.float32)}), r"fc1.bias.*shape \(256, 1\)"),
    (lambda a: a.update({"fc2.bias": np.zeros((10,), np.float64)}), r"'fc2.bias': dtype float64"),
])
def test_bad_weights_name_the_parameter(edit, message, template):
    arrays = _arrays()
    edit(arrays)
    with pytest.raises(ConversionError, match=message):
        interop.params_from_torch(arrays, template("mlp"), "mlp")


def test_bad_weights_into_torch_name_the_parameter():
    arrays = _arrays()
    arrays["fc2.weight"] = np.zeros((10, 255), np.float32)
    with pytest.raises(ConversionError, match=r"fc2.weight: shape \(10, 255\).*\(10, 256\)"):
        load_numpy_state_dict(torch_ref.build_model("mlp"), arrays)
    arrays.pop("fc2.weight")
    with pytest.raises(ConversionError, match=r"missing key\(s\) \['fc2.weight'\]"):
        load_numpy_state_dict(torch_ref.build_model("mlp"), arrays)


def test_cnn_flatten_shape_error_names_the_feature_map(template):
    arrays = _arrays("cnn")
    arrays["fc1.weight"] = np.zeros((256, 3000), np.float32)
    with pytest.raises(ConversionError, match=r"fc1.weight.*\(C, H, W\) = \(64, 7, 7\)"):
        interop.params_from_torch(arrays, template("cnn"), "cnn")


def test_unknown_model_and_bad_layout():
    with pytest.raises(ValueError, match="no conversion layout for model 'resnet'"):
        interop.layout_for("resnet")
    with pytest.raises(ValueError, match="unknown kind 'conv3d'"):
        Rule("w", ("w",), "conv3d")
    with pytest.raises(ValueError, match="torch_name used twice"):
        interop.Layout("x", (Rule("w", ("a",)), Rule("w", ("b",))))


# ---- optimizer state ----------------------------------------------------------------------

OPTIMIZERS = [("sgd", {"momentum": 0.9}), ("adam", {}), ("adamw", {}), ("adam", {"weight_decay": 0.1}),
              ("sgd", {"momentum": 0.9, "weight_decay": 0.1})]


def _trained_torch(name, opt, kw, steps=3):
    model = torch_ref.build_model(name, seed=0)
    optimizer = torch_ref.optim.make_optimizer(opt, model.parameters(), 1e-2, **kw)
    x = torch.rand(8, *model.input_shape, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm"])
@pytest.mark.parametrize("opt, kw", OPTIMIZERS)
def test_optimizer_state_round_trips_exactly(name, opt, kw, template):
    model, optimizer = _trained_torch(name, opt, kw)
    state = optimizer_to_numpy(optimizer, model)
    assert state["step"] == (3 if opt.startswith("adam") else None)
    assert set(state["slots"]) == ({"exp_avg", "exp_avg_sq"} if opt.startswith("adam") else {"momentum_buffer"})
    tmpl = template(name)
    tx = optim.make_optimizer(opt, 1e-2, **kw)
    opt_state = interop.opt_state_from_torch(state, tx.init(tmpl), tmpl, name)
    back = interop.opt_state_to_torch(opt_state, name)
    assert back["step"] == state["step"]
    for slot, arrays in state["slots"].items():
        assert all(same_bits(back["slots"][slot][k], arrays[k]) for k in arrays), slot
    fresh = torch_ref.optim.make_optimizer(opt, model.parameters(), 1e-2, **kw)
    load_numpy_optimizer(fresh, model, back)
    again = optimizer_to_numpy(fresh, model)
    assert again["step"] == state["step"]
    for slot, arrays in state["slots"].items():
        assert all(same_bits(again["slots"][slot][k], arrays[k]) for k in arrays), slot


def test_plain_sgd_has_no_state_and_fresh_torch_state_starts_from_zeros(template):
    model, optimizer = _trained_torch("mlp", "sgd", {})
    assert optimizer_to_numpy(optimizer, model) == {"step": None, "slots": {}}
    # Adam before its first step: torch has no state yet; jaxlight gets zeros and count 0.
    tmpl = template("mlp")
    tx = optim.adam(1e-3)
    tmodel = torch_ref.build_model("mlp")
    assert optimizer_to_numpy(torch.optim.Adam(tmodel.parameters()), tmodel) == {"step": None, "slots": {}}
    state = interop.opt_state_from_torch({"step": 0, "slots": {}}, tx.init(tmpl), tmpl, "mlp")
    back = interop.opt_state_to_torch(state, "mlp")
    assert back["step"] == 0
    assert all(not a.any() for a in back["slots"]["exp_avg"].values())


def test_optimizer_state_errors_name_the_culprit(template):
    model, optimizer = _trained_torch("mlp", "adam", {})
    state = optimizer_to_numpy(optimizer, model)
    tmpl = template("mlp")
    with pytest.raises(ConversionError, match=r"slot\(s\) \['exp_avg', 'exp_avg_sq'\] do not exist.*momentum_buffer"):
        interop.opt_state_from_torch(state, optim.sgd(0.1, momentum=0.9).init(tmpl), tmpl, "mlp")
    state["slots"]["exp_avg"]["fc1.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"slot 'exp_avg' 'fc1.bias'.*shape \(3,\)"):
        interop.opt_state_from_torch(state, optim.adam(1e-3).init(tmpl), tmpl, "mlp")
    del state["slots"]["exp_avg"]["fc1.bias"]
    with pytest.raises(ConversionError, match=r"missing key\(s\) \['fc1.bias'\]"):
        interop.opt_state_from_torch(state, optim.adam(1e-3).init(tmpl), tmpl, "mlp")
    with pytest.raises(ConversionError, match="missing parameter"):
        load_numpy_optimizer(torch.optim.Adam(model.parameters()), model, state)
    with pytest.raises(ConversionError, match=r"slot\(s\) \['momentum_buffer'\] do not exist in Adam"):
        load_numpy_optimizer(torch.optim.Adam(model.parameters()), model, {"step": 1, "slots": {"momentum_buffer": {}}})


def test_amsgrad_state_is_refused_not_dropped():
    model = torch_ref.build_model("softmax")
    optimizer = torch.optim.Adam(model.parameters(), amsgrad=True)
    model(torch.rand(2, 28, 28)).sum().backward()
    optimizer.step()
    with pytest.raises(ConversionError, match="max_exp_avg_sq"):
        optimizer_to_numpy(optimizer, model)


@pytest.mark.integration  # (a fresh interpreter; in-process: tests/test_no_torch.py)
def test_jaxlight_never_imports_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    code = ("import sys, jaxlight, jaxlight.interop, jaxlight.bridge.parity, jaxlight.bridge.compare, jaxlight.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root}, cwd=root)
    assert out.stdout.strip() == "False"
