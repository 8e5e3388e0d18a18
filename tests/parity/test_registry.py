"""A built-in model is one model file and one registry entry in each framework: the conversion
layout between the twins is derived from the two registered models, never written by hand."""

import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

import jaxlight
import jaxlight.models
import torch_ref
import torch_ref.models
from jaxlight import interop
from jaxlight.bridge import layout_for
from jaxlight.bridge.parity import check_parity
from jaxlight.data import ArrayDataset
from jaxlight.interop import Layout, Rule
from jaxlight.models.init import torch_bias_init, torch_kernel_init
from torch_ref.interop import load_numpy_state_dict, state_dict_to_numpy


def _dense(name, jax_name=None):
    jp = (jax_name or name,)
    return (Rule(f"{name}.weight", jp + ("kernel",), "linear"), Rule(f"{name}.bias", jp + ("bias",)))


# The layouts as they were written out by hand, rule by rule, from the two architectures: the
# reference the derived ones must equal.
HAND_WRITTEN = {
    "linear": Layout("linear", _dense("linear")),
    "logistic": Layout("logistic", _dense("linear")),
    "softmax": Layout("softmax", _dense("linear")),
    "mlp": Layout("mlp", _dense("fc1") + _dense("fc2")),
    "cnn": Layout("cnn", (Rule("conv1.weight", ("conv1", "kernel"), "conv"), Rule("conv1.bias", ("conv1", "bias")),
                          Rule("conv2.weight", ("conv2", "kernel"), "conv"), Rule("conv2.bias", ("conv2", "bias")),
                          Rule("fc1.weight", ("fc1", "kernel"), "flatten_linear", chw=(64, 7, 7)),
                          Rule("fc1.bias", ("fc1", "bias"))) + _dense("fc2")),
    "lstm": Layout("lstm", (Rule("lstm.weight_ih_l0", ("lstm", "kernel_ih"), "lstm"),
                            Rule("lstm.weight_hh_l0", ("lstm", "kernel_hh"), "lstm"),
                            Rule("lstm.bias_ih_l0", ("lstm", "bias_ih")),
                            Rule("lstm.bias_hh_l0", ("lstm", "bias_hh"))) + _dense("fc")),
}


def test_both_frameworks_register_the_same_builtin_models():
    assert sorted(jaxlight.models.MODELS) == sorted(torch_ref.models.MODELS) == sorted(jaxlight.recipes.RECIPES)


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_builtin_layouts_are_derived_and_equal_the_rules_written_out_by_hand(name):
    assert layout_for(name) == HAND_WRITTEN[name]
    assert interop.layout_for(name) is layout_for(name)  # a name given to interop resolves here


def test_a_name_registered_in_one_framework_only_is_refused_naming_the_other(monkeypatch):
    monkeypatch.setitem(jaxlight.models.MODELS, "half", jaxlight.models.MLP)
    with pytest.raises(ValueError, match=r"'half': it is not in torch_ref\.models\.MODELS"):
        layout_for("half")
    with pytest.raises(ValueError, match=r"'resnet': it is not in jaxlight\.models\.MODELS or torch_ref"):
        interop.params_to_torch({}, "resnet")


class TinyNet(nnx.Module):
    """A new model as a user of the registry adds one: (B, 6) -> Linear 5 -> LayerNorm -> ReLU -> 3."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.input_shape = (6,)
        self.hidden = nnx.Linear(6, 5, kernel_init=torch_kernel_init, bias_init=torch_bias_init(6), rngs=rngs)
        self.norm = nnx.LayerNorm(5, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(5, 3, kernel_init=torch_kernel_init, bias_init=torch_bias_init(5), rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.hidden(x))))


class TorchTinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_shape = (6,)
        self.hidden = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.hidden(x))))


def test_a_model_registered_in_both_frameworks_converts_and_computes_the_same(monkeypatch):
    monkeypatch.setitem(jaxlight.models.MODELS, "tiny", TinyNet)
    monkeypatch.setitem(torch_ref.models.MODELS, "tiny", TorchTinyNet)

    layout = layout_for("tiny")  # derived: nobody wrote a rule for it
    assert [(r.torch_name, r.jax_name, r.kind) for r in layout.rules] == [
        ("hidden.weight", "hidden/kernel", "linear"), ("hidden.bias", "hidden/bias", "copy"),
        ("norm.weight", "norm/scale", "copy"), ("norm.bias", "norm/bias", "copy"),
        ("head.weight", "head/kernel", "linear"), ("head.bias", "head/bias", "copy")]

    tmodel = torch_ref.build_model("tiny", seed=3)
    jmodel = jaxlight.build_model("tiny", seed=4)
    arrays = state_dict_to_numpy(tmodel)
    # torch -> jaxlight -> torch, by the registered name: the same bits back.
    params = interop.params_from_torch(arrays, nnx.state(jmodel, nnx.Param), "tiny")
    back = interop.params_to_torch(params, "tiny")
    assert all(back[k].tobytes() == v.tobytes() and back[k].shape == v.shape for k, v in arrays.items())
    np.testing.assert_array_equal(np.asarray(params["hidden"]["kernel"][...]), arrays["hidden.weight"].T)
    # jaxlight -> torch: the jaxlight model's own weights loaded into the torch twin.
    other = torch_ref.build_model("tiny", seed=5)
    load_numpy_state_dict(other, interop.model_to_torch(jmodel, "tiny"))
    np.testing.assert_array_equal(other.head.weight.detach().numpy(), np.asarray(jmodel.head.kernel[...]).T)

    # One parity run through the shipped step: forward, loss, gradients and one Adam step agree.
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(32, 6)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int32))
    report = check_parity(tmodel, jaxlight.build_model("tiny"), "tiny", task="multiclass", data=data,
                          batch_size=16, steps=1)
    assert report.ok, str(report)
    assert report.steps_checked == 1
