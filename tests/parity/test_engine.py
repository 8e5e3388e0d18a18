"""check_parity runs the shipped engine: its final state is loop.fit's, a bug planted in the
step's BatchNorm is caught at its layer, and Adam's near-zero gradients are told apart from
real divergences."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from test_user_models import D, PAIRS, TorchMLP, data, jax_loss, torch_loss, warmed
from torch import nn

import jaxlight
from jaxlight import interop, layers
from jaxlight.bridge.parity import check_parity
from torch_ref.interop import state_dict_to_numpy


def _leaves(state):
    return [np.asarray(a) for a in jax.tree.leaves((state.params, state.model_state))]


def _fit_from(torch_weights, jax_model, layout, loss, tree, epochs, optimizer, lr):
    """loop.fit from the torch weights, converted (what check_parity starts from)."""
    model = interop.model_from_torch(torch_weights, jax_model, layout)
    state = jaxlight.create_train_state(model, jaxlight.make_optimizer(optimizer, lr), loss, seed=0)
    state, _ = jaxlight.loop.fit(state, jaxlight.ArrayDataset(tree), epochs=epochs, batch_size=64)
    return state


def test_the_reported_state_is_bitwise_what_loop_fit_gives_with_batchnorm_and_padding():
    torch_cls, nnx_cls, shape, flatten = PAIRS["cnn"]
    tmodel, tree = warmed(torch_cls, shape), data(shape)  # 136 rows: batches of 64, 64 and a padded 8
    weights = state_dict_to_numpy(tmodel)
    layout = interop.derive_layout(tmodel, nnx_cls(rngs=nnx.Rngs(0)), flatten=flatten)
    report = check_parity(tmodel, nnx_cls(rngs=nnx.Rngs(0)), data=tree, loss_fn=jax_loss, torch_loss_fn=torch_loss,
                          optimizer="sgd", lr=0.05, steps=6, flatten=flatten)
    assert report.ok and report.steps_checked == 6, str(report)
    expected = _fit_from(weights, nnx_cls(rngs=nnx.Rngs(0)), layout, jax_loss, tree, 2, "sgd", 0.05)
    for a, b in zip(_leaves(report.jax_state), _leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_reported_state_is_loop_fits_for_a_built_in_model_and_task(mnist):
    train, _ = mnist
    ds = jaxlight.ArrayDataset(train.images[:150], train.labels[:150])
    import torch_ref

    torch.manual_seed(0)
    tmodel = torch_ref.build_model("mlp")
    weights = state_dict_to_numpy(tmodel)
    report = check_parity(tmodel, jaxlight.build_model("mlp"), "mlp", task="multiclass", data=ds,
                          optimizer="adam", lr=1e-3, steps=6)
    assert report.ok, str(report)
    model = interop.model_from_torch(weights, jaxlight.build_model("mlp"), "mlp")
    state = jaxlight.create_train_state(model, jaxlight.make_optimizer("adam", 1e-3), jaxlight.tasks.multiclass())
    state, _ = jaxlight.loop.fit(state, ds, epochs=2, batch_size=64)
    for a, b in zip(_leaves(report.jax_state), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_statistics_bug_planted_in_the_shipped_step_fails_at_its_layer(monkeypatch):
    """The stand-in the step uses for BatchNorm, made to drop one real row from the statistics:
    check_parity sees it at the BatchNorm layer of the forward pass."""
    torch_cls, nnx_cls, shape, flatten = PAIRS["cnn"]
    honest = layers.PaddedBatchNorm.__init__

    def off_by_one(self, layer, path, mask, axis_name):
        honest(self, layer, path, mask.at[0].set(0.0), axis_name)

    monkeypatch.setattr(layers.PaddedBatchNorm, "__init__", off_by_one)
    report = check_parity(warmed(torch_cls, shape), nnx_cls(rngs=nnx.Rngs(0)), data=data(shape), loss_fn=jax_loss,
                          torch_loss_fn=torch_loss, optimizer="sgd", lr=0.05, steps=2, flatten=flatten)
    d = report.divergence
    assert d is not None and (d.level, d.name) == ("forward", "bn"), str(report)


class BiasedTorchMLP(TorchMLP):
    """A bias right before BatchNorm: its gradient is zero up to rounding."""

    def __init__(self):
        super().__init__()
        self.body[0] = nn.Linear(D, 32, bias=True)


class BiasedNnxMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.body = nnx.Sequential(
            nnx.Linear(D, 32, rngs=rngs), nnx.BatchNorm(32, momentum=0.9, use_fast_variance=False, rngs=rngs),
            jax.nn.relu, nnx.Dropout(0.2, rngs=rngs), nnx.Linear(32, 32, rngs=rngs), jax.nn.relu)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.body(x))


def _biased_pair():
    torch.manual_seed(0)
    return BiasedTorchMLP(), BiasedNnxMLP(rngs=nnx.Rngs(0))


def test_adam_on_a_gradient_within_rounding_of_zero_is_a_note_not_a_divergence():
    tmodel, jmodel = _biased_pair()
    report = check_parity(tmodel, jmodel, data=data((D,)), loss_fn=jax_loss, torch_loss_fn=torch_loss,
                          optimizer="adam", lr=1e-2, steps=6)
    assert report.ok, str(report)
    notes = [n for n in report.notes if "explained by rounding" in n]
    assert notes and all("body.0.bias" in n for n in notes), str(report)
    assert "at the last step jax" in notes[0] and "within rounding of zero" in notes[0]


@pytest.mark.parametrize("kw, level", [({"lr": 1.5e-2}, "step"), ({"betas": (0.9, 0.9)}, "trajectory")],
                         ids=["lr", "beta2"])
def test_adam_still_catches_a_planted_optimizer_bug_at_each_level(kw, level):
    """The looser rule for near-zero gradients leaves real bugs visible: another learning rate
    shows at the first step; another beta2 (the first Adam step does not depend on it) shows
    on the trajectory."""
    tmodel, jmodel = _biased_pair()
    report = check_parity(tmodel, jmodel, data=data((D,)), loss_fn=jax_loss, torch_loss_fn=torch_loss,
                          optimizer="adam", lr=1e-2, steps=8,
                          torch_optimizer=lambda p: torch.optim.Adam(p, **{"lr": 1e-2, **kw}))
    d = report.divergence
    assert d is not None and d.level == level and d.name != "body.0.bias", str(report)
