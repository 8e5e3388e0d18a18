"""Users' own models: a layout derived from the two models, BatchNorm's statistics, and
``check_parity`` on a user's loss, in train and eval mode, naming the layer that differs.

The models are written here as a user would write them, once in ``torch.nn`` and once in Flax
NNX, on synthetic data (a few hundred examples: every test takes seconds).

How they are configured for parity (``docs/parity-user-models.md``): ``nnx.BatchNorm(momentum=
0.9)`` is torch's ``momentum=0.1`` (NNX weighs the old average, torch the new batch);
``use_fast_variance=False`` computes the batch variance as torch does, ``E[(x - mean)^2]``;
layers right before a BatchNorm have no bias (BatchNorm removes it, so its gradient is zero up
to rounding, and Adam turns rounding noise into steps of ``lr``).
"""

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch import nn
from torch.nn import functional as F

from jaxlight import interop
from jaxlight.interop import ConversionError, Rule
from jaxlight.models.rnn import LSTM
from jaxlight.bridge.parity import LEVELS, check_parity
from torch_ref.interop import load_numpy_state_dict, state_dict_to_numpy

D, H, K = 12, 32, 3


class TorchMLP(nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, H, bias=False), nn.BatchNorm1d(H, momentum=momentum), nn.ReLU(),
                                  nn.Dropout(0.2), nn.Linear(H, H), nn.ReLU())
        self.head = nn.Linear(H, K)

    def forward(self, x):
        return self.head(self.body(x))


class NnxMLP(nnx.Module):
    def __init__(self, *, rngs, momentum=0.9, middle=nnx.Linear):
        self.body = nnx.Sequential(
            nnx.Linear(D, H, use_bias=False, rngs=rngs),
            nnx.BatchNorm(H, momentum=momentum, use_fast_variance=False, rngs=rngs), jax.nn.relu,
            nnx.Dropout(0.2, rngs=rngs), middle(H, H, rngs=rngs), jax.nn.relu)
        self.head = nnx.Linear(H, K, rngs=rngs)

    def __call__(self, x):
        return self.head(self.body(x))


class TorchCNN(nn.Module):
    """Input ``(B, 8, 8, 2)`` channels-last, as the NNX twin takes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, K)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x.permute(0, 3, 1, 2)))), 2)
        return self.fc(x.flatten(1))  # (C, H, W) order


class NnxCNN(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(2, 8, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.fc = nnx.Linear(8 * 4 * 4, K, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jax.nn.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
        return self.fc(x.reshape(x.shape[0], -1))  # (H, W, C) order


CNN_FLATTEN = {"fc": (8, 4, 4)}
PAIRS = {"mlp": (TorchMLP, NnxMLP, (D,), None), "cnn": (TorchCNN, NnxCNN, (8, 8, 2), CNN_FLATTEN)}


def jax_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]), {}


def torch_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"), {}


def data(shape, n=136, seed=0):
    """136 examples: batches of 64, 64 and a short 8, so 5 steps cross an epoch boundary."""
    rng = np.random.default_rng(seed)
    return {"x": (rng.normal(size=(n, *shape)) * 2 + 0.5).astype(np.float32),
            "y": rng.integers(0, K, n).astype(np.int32)}


def warmed(torch_cls, shape, **kw):
    """A torch model whose running statistics have moved (three train-mode forwards)."""
    torch.manual_seed(0)
    model = torch_cls(**kw)
    with torch.no_grad():
        for s in range(3):
            model(torch.from_numpy(data(shape, 64, seed=s + 10)["x"]))
    return model


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---- the derived layout ----------------------------------------------------------------------


def test_layout_is_derived_from_both_models():
    layout = interop.derive_layout(TorchMLP(), NnxMLP(rngs=nnx.Rngs(0)))
    assert [(r.torch_name, r.jax_name, r.kind, r.variable) for r in layout.rules] == [
        ("body.0.weight", "body/layers/0/kernel", "linear", "param"),
        ("body.1.weight", "body/layers/1/scale", "copy", "param"),
        ("body.1.bias", "body/layers/1/bias", "copy", "param"),
        ("body.1.running_mean", "body/layers/1/mean", "copy", "batch_stat"),
        ("body.1.running_var", "body/layers/1/var", "copy", "batch_stat"),
        ("body.4.weight", "body/layers/4/kernel", "linear", "param"),
        ("body.4.bias", "body/layers/4/bias", "copy", "param"),
        ("head.weight", "head/kernel", "linear", "param"),
        ("head.bias", "head/bias", "copy", "param"),
    ]
    assert layout.dropped == ("body.1.num_batches_tracked",)
    cnn = interop.derive_layout(TorchCNN(), NnxCNN(rngs=nnx.Rngs(0)), flatten=CNN_FLATTEN)
    assert (cnn.rule("conv.weight").kind, cnn.rule("fc.weight").kind, cnn.rule("fc.weight").chw) == \
        ("conv", "flatten_linear", (8, 4, 4))
    assert cnn.stat_names == ["bn.running_mean", "bn.running_var"]


class Renamed(nnx.Module):
    """The same layers under other names: paired by order."""

    def __init__(self, *, rngs):
        self.a = nnx.Linear(D, H, use_bias=False, rngs=rngs)
        self.b = nnx.BatchNorm(H, momentum=0.9, rngs=rngs)
        self.c = nnx.Linear(H, H, rngs=rngs)
        self.d = nnx.Linear(H, K, rngs=rngs)


def test_layers_with_other_names_pair_by_order():
    layout = interop.derive_layout(TorchMLP(), Renamed(rngs=nnx.Rngs(0)))
    assert layout.modules == {"body.0": ("a",), "body.1": ("b",), "body.4": ("c",), "head": ("d",)}


@pytest.mark.parametrize("torch_model, jax_model, message", [
    (lambda: TorchMLP(momentum=0.1), lambda: NnxMLP(rngs=nnx.Rngs(0), momentum=0.99),
     r"torch body.1 / NNX body/layers/1: .*use nnx.BatchNorm\(momentum=0.9\), got 0.99"),
    (lambda: TorchMLP(momentum=None), lambda: NnxMLP(rngs=nnx.Rngs(0)), r"body.1.*momentum=None.*no NNX equivalent"),
    (lambda: nn.Sequential(nn.Linear(D, H), nn.GRU(H, H)), lambda: NnxMLP(rngs=nnx.Rngs(0)),
     r"no conversion rule for torch layer\(s\) 1 \(GRU\); derive_layout knows"),
    (lambda: nn.Sequential(nn.Linear(D, H), nn.Linear(H, K)), lambda: NnxCNN(rngs=nnx.Rngs(0)),
     r"(?s)cannot pair the layers.*torch: 0 \(linear\), 1 \(linear\)\n"
     r"  NNX:   conv \(conv\), bn \(batchnorm\), fc \(linear\)"),
    (lambda: nn.Sequential(nn.Linear(D, H, bias=False)), lambda: nnx.Sequential(nnx.Linear(D, H, rngs=nnx.Rngs(0))),
     r"torch 0 / NNX layers/0: bias in torch False, in NNX True"),
    (lambda: nn.Sequential(nn.BatchNorm1d(H, eps=1e-3)),
     lambda: nnx.Sequential(nnx.BatchNorm(H, momentum=0.9, rngs=nnx.Rngs(0))),
     r"eps 0.001 in torch, epsilon 1e-05 in NNX"),
], ids=["momentum", "cumulative-average", "unknown-layer", "unpairable", "bias", "eps"])
def test_layouts_that_cannot_be_derived_say_why(torch_model, jax_model, message):
    with pytest.raises(ConversionError, match=message):
        interop.derive_layout(torch_model(), jax_model())


class WithOwnParam(nnx.Module):
    def __init__(self, *, rngs):
        self.fc = nnx.Linear(D, H, rngs=rngs)
        self.gain = nnx.Param(np.ones(H, np.float32))  # no rule can know what this is


def test_an_nnx_module_with_its_own_parameters_needs_a_layout():
    with pytest.raises(ConversionError, match=r"NNX module\(s\) with their own parameters \(root\) "
                                              r"\(WithOwnParam: \['gain'\]\): write a Layout"):
        interop.derive_layout(nn.Sequential(nn.Linear(D, H)), WithOwnParam(rngs=nnx.Rngs(0)))


def test_a_shape_that_does_not_fit_names_the_key():
    torch_model = nn.Sequential(nn.Linear(D, H + 1), nn.BatchNorm1d(H + 1))
    jax_model = nnx.Sequential(nnx.Linear(D, H, rngs=nnx.Rngs(0)), nnx.BatchNorm(H, momentum=0.9, rngs=nnx.Rngs(0)))
    layout = interop.derive_layout(torch_model, jax_model)
    with pytest.raises(ConversionError, match=r"'0.weight': shape \(33, 12\) converts to \(12, 33\), but jaxlight's "
                                              r"layers/0/kernel is \(12, 32\)"):
        interop.model_from_torch(state_dict_to_numpy(torch_model), jax_model, layout)


# ---- conversion both ways ------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS)
def test_weights_and_statistics_round_trip_exactly(pair):
    torch_cls, nnx_cls, shape, flatten = PAIRS[pair]
    tmodel = warmed(torch_cls, shape)
    arrays = state_dict_to_numpy(tmodel)
    assert not np.allclose(arrays[[k for k in arrays if k.endswith("running_var")][0]], 1.0)  # they moved
    layout = interop.derive_layout(tmodel, nnx_cls(rngs=nnx.Rngs(0)), flatten=flatten)
    jmodel = interop.model_from_torch(arrays, nnx_cls(rngs=nnx.Rngs(0)), layout)
    back = interop.model_to_torch(jmodel, layout)
    assert list(back) == [k for k in arrays if not k.endswith("num_batches_tracked")]  # state_dict order
    assert all(same_bits(back[k], arrays[k]) for k in back)
    # jax -> torch -> jax through a fresh torch module, which keeps its own num_batches_tracked.
    other = torch_cls()
    load_numpy_state_dict(other, back)
    again = state_dict_to_numpy(other)
    assert all(same_bits(again[k], arrays[k]) for k in back)
    assert all(int(again[k]) == 0 for k in layout.dropped)
    # The parameters and the statistics as separate states, too.
    stats = interop.batch_stats_from_torch(arrays, nnx.state(nnx_cls(rngs=nnx.Rngs(0)), nnx.BatchStat), layout)
    assert all(same_bits(v, arrays[k]) for k, v in interop.batch_stats_to_torch(stats, layout).items())


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_converted_models_agree_in_train_and_eval_mode(pair, train):
    torch_cls, nnx_cls, shape, flatten = PAIRS[pair]
    tmodel = warmed(torch_cls, shape)
    layout = interop.derive_layout(tmodel, nnx_cls(rngs=nnx.Rngs(0)), flatten=flatten)
    jmodel = interop.model_from_torch(state_dict_to_numpy(tmodel), nnx_cls(rngs=nnx.Rngs(0)), layout)
    x = data(shape, 20, seed=3)["x"]
    tmodel.train(train)
    jmodel.train() if train else jmodel.eval()
    for m in tmodel.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    for _, m in nnx.iter_modules(jmodel):
        if isinstance(m, nnx.Dropout):
            m.deterministic = True
    with torch.no_grad():
        out_t = tmodel(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(jmodel(x)), out_t, rtol=1e-5, atol=2e-6)


def test_a_train_state_takes_and_gives_the_statistics():
    from jaxlight import optim, tasks
    from jaxlight.state import create_train_state

    tmodel = warmed(TorchMLP, (D,))
    layout = interop.derive_layout(tmodel, NnxMLP(rngs=nnx.Rngs(0)))
    arrays = state_dict_to_numpy(tmodel)
    state = create_train_state(NnxMLP(rngs=nnx.Rngs(0)), optim.adam(1e-3), tasks.multiclass(3))
    state = interop.state_from_torch(state, layout, arrays)
    assert same_bits(np.asarray(state.model.body.layers[1].var[...]), arrays["body.1.running_var"])
    weights, _ = interop.state_to_torch(state, layout)
    assert list(weights) == [r.torch_name for r in layout.rules]
    assert all(same_bits(weights[k], arrays[k]) for k in weights)


def test_the_running_variance_differs_by_bessels_correction():
    # What check_parity accounts for, measured on one train-mode call of the first BatchNorm:
    # both average with torch momentum m = 0.1 (NNX momentum 0.9), both take the same mean, but
    # torch averages the unbiased batch variance and NNX the biased one.
    tmodel = warmed(TorchMLP, (D,))
    layout = interop.derive_layout(tmodel, NnxMLP(rngs=nnx.Rngs(0)))
    jmodel = interop.model_from_torch(state_dict_to_numpy(tmodel), NnxMLP(rngs=nnx.Rngs(0)), layout)
    x = data((D,), 64, seed=5)["x"]
    h = (x @ tmodel.body[0].weight.detach().numpy().T).astype(np.float64)  # the BatchNorm's input
    mean0, var0 = tmodel.body[1].running_mean.numpy().copy(), tmodel.body[1].running_var.numpy().copy()
    tmodel.train()
    jmodel.train()
    with torch.no_grad():
        tmodel(torch.from_numpy(x))
    jmodel(x)
    bn_t, bn_j = tmodel.body[1], jmodel.body.layers[1]
    np.testing.assert_allclose(bn_t.running_mean.numpy(), 0.9 * mean0 + 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn_j.mean[...]), 0.9 * mean0 + 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn_t.running_var.numpy(), 0.9 * var0 + 0.1 * h.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn_j.var[...]), 0.9 * var0 + 0.1 * h.var(0, ddof=0), rtol=1e-5)
    assert not np.allclose(np.asarray(bn_j.var[...]), bn_t.running_var.numpy(), rtol=1e-3)


class TorchLSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 16, batch_first=True)
        self.out = nn.Linear(16, K)

    def forward(self, x):
        return self.out(self.rnn(x)[1][0][0])


class NnxLSTMNet(nnx.Module):
    def __init__(self, *, rngs):
        self.rnn = LSTM(5, 16, rngs=rngs)
        self.out = nnx.Linear(16, K, rngs=rngs)

    def __call__(self, x):
        return self.out(self.rnn(x)[1][0])


def test_an_lstm_layer_is_derived_and_converted():
    torch.manual_seed(0)
    tmodel = TorchLSTMNet()
    layout = interop.derive_layout(tmodel, NnxLSTMNet(rngs=nnx.Rngs(0)))
    assert [r.kind for r in layout.rules] == ["lstm", "lstm", "copy", "copy", "linear", "copy"]
    jmodel = interop.model_from_torch(state_dict_to_numpy(tmodel), NnxLSTMNet(rngs=nnx.Rngs(0)), layout)
    x = np.random.default_rng(0).normal(size=(4, 7, 5)).astype(np.float32)
    out_t = tmodel(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(jmodel(x)), out_t, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConversionError, match="only one-layer, unidirectional LSTMs"):
        interop.derive_layout(nn.Sequential(nn.LSTM(5, 16, num_layers=2)),
                              nnx.Sequential(LSTM(5, 16, rngs=nnx.Rngs(0))))


class WrongStepLSTMNet(NnxLSTMNet):
    """A port bug: the classifier reads the next-to-last hidden state."""

    def __call__(self, x):
        return self.out(self.rnn(x)[0][:, -2])


@pytest.mark.slow  # (fast: test_an_lstm_layer_is_derived_and_converted)
def test_an_lstm_pair_passes_and_a_wrong_time_step_is_reported_at_its_reader():
    rng = np.random.default_rng(0)
    # One batch of 64: every step has the same shape, so each program compiles once.
    d = {"x": rng.normal(size=(64, 7, 5)).astype(np.float32), "y": rng.integers(0, K, 64).astype(np.int32)}
    torch.manual_seed(0)
    report = check_parity(TorchLSTMNet(), NnxLSTMNet(rngs=nnx.Rngs(0)), data=d, loss_fn=jax_loss,
                          torch_loss_fn=torch_loss, optimizer="adam", lr=1e-2, steps=3)
    assert report.ok and report.worst["grad"][0] <= 1e-6, str(report)
    torch.manual_seed(0)
    report = check_parity(TorchLSTMNet(), WrongStepLSTMNet(rngs=nnx.Rngs(0)), data=d, loss_fn=jax_loss,
                          torch_loss_fn=torch_loss, optimizer="adam", lr=1e-2, steps=1)
    assert (report.divergence.level, report.divergence.name) == ("forward", "out"), str(report)  # rnn agreed


def test_a_hand_written_layout_converts_the_statistics_too():
    layout = interop.Layout("mine", (
        Rule("0.weight", ("layers", "0", "kernel"), "linear"),
        Rule("1.weight", ("layers", "1", "scale")), Rule("1.bias", ("layers", "1", "bias")),
        Rule("1.running_mean", ("layers", "1", "mean"), variable="batch_stat"),
        Rule("1.running_var", ("layers", "1", "var"), variable="batch_stat"),
    ), dropped=("1.num_batches_tracked",))
    tmodel = nn.Sequential(nn.Linear(D, H, bias=False), nn.BatchNorm1d(H))
    tmodel(torch.randn(16, D))
    jmodel = nnx.Sequential(nnx.Linear(D, H, use_bias=False, rngs=nnx.Rngs(0)), nnx.BatchNorm(H, rngs=nnx.Rngs(0)))
    converted = interop.model_from_torch(state_dict_to_numpy(tmodel), jmodel, layout)
    assert same_bits(np.asarray(converted.layers[1].var[...]), tmodel[1].running_var.numpy())
    with pytest.raises(ValueError, match="variable must be 'param' or 'batch_stat'"):
        Rule("1.running_var", ("layers", "1", "var"), variable="buffer")


# ---- check_parity on a user's loss ---------------------------------------------------------


@pytest.mark.parametrize("pair, opt, kw, lr", [
    pytest.param("mlp", "adam", {}, 1e-2, marks=pytest.mark.slow),  # the MLP pair at every level: test_parity.py
    ("cnn", "sgd", {"momentum": 0.9}, 0.05),
])
def test_user_models_pass_every_level(pair, opt, kw, lr):
    torch_cls, nnx_cls, shape, flatten = PAIRS[pair]
    report = check_parity(warmed(torch_cls, shape), nnx_cls(rngs=nnx.Rngs(0)), data=data(shape),
                          loss_fn=jax_loss, torch_loss_fn=torch_loss, optimizer=opt, lr=lr, optimizer_kwargs=kw,
                          steps=5, flatten=flatten, input_grads=True)
    print(report)
    assert report.ok, str(report)
    assert [lv for lv in LEVELS if lv in report.worst] == list(LEVELS)
    assert report.worst["forward"][0] <= 2e-6 and report.worst["forward_eval"][0] <= 2e-6, str(report)
    assert report.worst["grad"][0] <= 1e-6 and report.worst["input_grad"][0] <= 1e-6, str(report)
    assert report.worst["input_grad"][1] == "['x']"  # (the batch leaf, by its path)
    assert any("num_batches_tracked" in note for note in report.notes)
    assert any("dropout off" in note for note in report.notes) == (pair == "mlp")


def test_a_built_in_task_on_a_batchnorm_model():
    # A built-in task with batch statistics runs on the loss-function step (unpadded batches:
    # padding must not enter BatchNorm's statistics).
    from jaxlight.data import ArrayDataset

    d = data((D,))
    report = check_parity(warmed(TorchMLP, (D,)), NnxMLP(rngs=nnx.Rngs(0)), task="multiclass",
                          data=ArrayDataset(d["x"], d["y"]), optimizer="sgd", lr=0.05, steps=4)
    assert report.ok and report.steps_checked == 4, str(report)


def test_running_statistics_are_compared_each_step():
    # A torch BatchNorm that averages with another momentum than the layout was derived for:
    # the training path is the same, the running statistics are not.
    tmodel = warmed(TorchMLP, (D,))
    layout = interop.derive_layout(tmodel, NnxMLP(rngs=nnx.Rngs(0)))
    tmodel.body[1].momentum = 0.2
    report = check_parity(tmodel, NnxMLP(rngs=nnx.Rngs(0)), layout, data=data((D,)), loss_fn=jax_loss,
                          torch_loss_fn=torch_loss, optimizer="sgd", lr=0.05, steps=2)
    d = report.divergence
    assert (d.level, d.step, d.name) == ("step", 1, "body.1.running_mean"), str(report)
    assert report.worst["grad"][0] <= 1e-6


class DoubleBiasLinear(nnx.Linear):
    """A port bug: the bias added twice."""

    def __call__(self, x):
        return super().__call__(x) + self.bias[...]


def test_a_broken_port_is_reported_at_its_layer():
    report = check_parity(warmed(TorchMLP, (D,)), NnxMLP(rngs=nnx.Rngs(0), middle=DoubleBiasLinear), data=data((D,)),
                          loss_fn=jax_loss, torch_loss_fn=torch_loss, optimizer="sgd", lr=0.05, steps=1)
    d = report.divergence
    assert (d.level, d.name) == ("forward", "body.4"), str(report)
    assert "forward diverges at step 0, layer body.4" in str(report)


def test_swapped_running_statistics_show_in_eval_mode_at_their_layer():
    # A hand-written layout that swaps running_mean and running_var: train mode (batch
    # statistics) cannot see it, eval mode can.
    derived = interop.derive_layout(TorchMLP(), NnxMLP(rngs=nnx.Rngs(0)))
    swap = {"mean": "var", "var": "mean"}
    rules = tuple(Rule(r.torch_name, r.jax_path[:-1] + (swap[r.jax_path[-1]],), variable="batch_stat")
                  if r.variable == "batch_stat" else r for r in derived.rules)
    layout = interop.Layout("swapped", rules, derived.dropped)
    report = check_parity(warmed(TorchMLP, (D,)), NnxMLP(rngs=nnx.Rngs(0)), layout, data=data((D,)),
                          loss_fn=jax_loss, torch_loss_fn=torch_loss, optimizer="sgd", lr=0.05, steps=1)
    assert report.worst["forward"][0] <= 2e-6
    assert (report.divergence.level, report.divergence.name) == ("forward_eval", "body.1"), str(report)


def test_a_missing_flatten_is_reported_at_the_dense_layer():
    # Without flatten=, fc's weight is copied as if both sides flattened alike.
    report = check_parity(warmed(TorchCNN, (8, 8, 2)), NnxCNN(rngs=nnx.Rngs(0)), data=data((8, 8, 2)),
                          loss_fn=jax_loss, torch_loss_fn=torch_loss, optimizer="sgd", lr=0.05, steps=1)
    assert (report.divergence.level, report.divergence.name) == ("forward", "fc"), str(report)


def test_user_loss_arguments_are_checked():
    with pytest.raises(ValueError, match="either task= .* or loss_fn="):
        check_parity(TorchMLP(), NnxMLP(rngs=nnx.Rngs(0)), data=data((D,)))
    with pytest.raises(ValueError, match="loss_fn needs its torch twin"):
        check_parity(TorchMLP(), NnxMLP(rngs=nnx.Rngs(0)), data=data((D,)), loss_fn=jax_loss)
    with pytest.raises(ValueError, match=r"torch_loss_fn must return per-example losses of shape \(B,\), got \(\)"):
        check_parity(TorchMLP(), NnxMLP(rngs=nnx.Rngs(0)), data=data((D,)), loss_fn=jax_loss,
                     torch_loss_fn=lambda m, b: (torch_loss(m, b)[0].mean(), {}), steps=1)
