"""The parity report of ``jaxlight.port``: it holds for a correct port, and names the layer of a
broken one.

The report runs ``check_parity`` (the engine's own steps) against torch; these tests check what
users rely on: a correct port passes every row; a weight perturbed in the port, or a weight moved
with the wrong permutation, is found at its layer with ``.ok`` False; the default loss follows the
model's outputs; the NNX model's outputs equal torch's (numpy, outside the report).
"""

import copy

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

import jaxlight
from jaxlight.bridge.porting.report import check_port, resolve_loss

torch.set_num_threads(1)


class SmallNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> pool -> Linear -> Dropout -> Linear: a classifier."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 3 * 3, 12)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc2(self.drop(torch.relu(self.fc1(x.flatten(1)))))


class TwoInputs(nn.Module):
    """Two inputs, one of them token ids; a regression head (B, 1)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(5, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, ids, features):
        return self.head(torch.tanh(self.embed(ids).mean(1) + self.proj(features)))


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():  # running statistics away from their initial 0 / 1, as after training
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def ported():
    net = small_net()
    net.eval()
    x = torch.randn(6, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = jaxlight.port(net, (x,), steps=2)
    # The report trains copies: the user's module keeps its weights, statistics and mode.
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    return net, x, p


def test_a_correct_port_passes_every_check(ported):
    net, x, p = ported
    report = p.report
    print(report)
    assert report.ok and report.first_difference is None, str(report)
    checks = [r.check for r in report.rows]
    assert checks == ["weights", "forward (train)", "forward (eval)", "loss", "input gradient",
                      "parameter gradients", "2 step(s) SGD momentum 0.9", "2 step(s) Adam", "BatchNorm running stats"]
    assert all(r.max_abs is not None for r in report.rows), str(report)
    assert report.rows[0].max_abs == 0.0  # the conversion is a permutation: exact
    text = str(report)
    assert "parity holds" in text and "dropout off" in text
    # The table's figures are the engine runs' own: the SGD run compared 2 steps of every parameter.
    sgd = report.parity["sgd"]
    assert sgd.steps_checked == 2 and {c.name for c in sgd.comparisons if c.level == "grad"} == set(
        p.layout.torch_names)


def test_the_port_computes_what_torch_computes(ported):
    """Outside the report: the NNX model on the same input, against torch, in both modes."""
    net, x, p = ported
    model = p.model
    reference = copy.deepcopy(net).eval()
    model.eval()
    try:
        with torch.no_grad():
            expected = reference(x).numpy()
        np.testing.assert_allclose(np.asarray(model(x.numpy())), expected, rtol=1e-5, atol=1e-5)
    finally:
        model.train()
    # Train mode (BatchNorm on the batch's statistics; dropout off on the torch side by p=0).
    reference.train()
    reference.drop.p = 0.0
    dropout_free = nnx.clone(model)
    for _, m in nnx.iter_modules(dropout_free):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0
    with torch.no_grad():
        expected = reference(x).numpy()
    np.testing.assert_allclose(np.asarray(dropout_free(x.numpy())), expected, rtol=1e-5, atol=1e-5)


def _with_weight(p, path: tuple, fn):
    """A copy of the port's model with the parameter at ``path`` changed by ``fn`` (numpy)."""
    model = nnx.clone(p.model)
    node = model
    for key in path[:-1]:
        node = getattr(node, key)
    var = getattr(node, path[-1])
    var[...] = fn(np.asarray(var[...]))
    return model


def test_a_perturbed_weight_is_named_and_fails(ported):
    net, x, p = ported
    rule = p.layout.rule("fc1.weight")
    broken = _with_weight(p, rule.jax_path, lambda w: w + np.where(np.arange(w.size).reshape(w.shape) == 7, 1e-2, 0))
    t = copy.copy(p.translation)
    t.model = broken
    report = check_port(net, t, p.example_inputs, p.targets, p.loss, steps=1, loss_kind=p.loss_kind)
    print(report)
    assert not report.ok
    rows = {r.check: r for r in report.rows}
    assert not rows["weights"].ok and "fc1.weight" in rows["weights"].where
    assert rows["weights"].max_abs == pytest.approx(1e-2, rel=1e-3)
    assert not rows["forward (train)"].ok and rows["forward (train)"].where == "layer fc1"
    assert report.first_difference.startswith("fc1 (fc1.weight)")  # the weights row comes first
    assert "parity FAILS" in str(report)


def test_a_wrong_permutation_is_found_at_its_layer(ported):
    """A layout that moves one square weight without its transpose: the weights round-trip through
    the same wrong rule (the weights row cannot see it), the forward pass does."""
    from jaxlight.interop import Layout, Rule, model_from_torch
    from torch_ref.interop import state_dict_to_numpy

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(3)
    net = Three()
    x = torch.randn(8, 5)
    p = jaxlight.port(net, (x,), check=False)
    bad = Layout(p.layout.name, tuple(Rule(r.torch_name, r.jax_path, "array", variable=r.variable)
                                      if r.torch_name == "b.weight" else r for r in p.layout.rules), p.layout.dropped)
    t = copy.copy(p.translation)
    t.layout = bad
    t.model = model_from_torch(state_dict_to_numpy(net), p.model, bad)
    report = check_port(net, t, p.example_inputs, p.targets, p.loss, steps=1, loss_kind=p.loss_kind)
    print(report)
    rows = {r.check: r for r in report.rows}
    assert rows["weights"].ok and not report.ok
    assert rows["forward (train)"].where == "layer b" and rows["forward (eval)"].where == "layer b"
    assert report.first_difference == "layer b (forward (train))"


def test_default_loss_follows_the_outputs():
    net = small_net()
    x = (torch.randn(5, 2, 6, 6),)
    (jl, tl), labels, kind = resolve_loss(net, x, None, None, seed=7)
    assert kind == "cross_entropy" and labels.shape == (5,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 4
    assert np.array_equal(resolve_loss(net, x, None, None, seed=7)[1], labels)  # drawn from the seed
    inputs = (torch.randint(0, 11, (5, 3)), torch.randn(5, 5))
    (jl, tl), target, kind = resolve_loss(TwoInputs(), inputs, None, None, seed=7)
    assert kind == "mse" and len(target) == 1 and target[0].shape == (5, 1)


def test_several_inputs_and_token_ids():
    torch.manual_seed(0)
    net = TwoInputs()
    ids = torch.randint(0, 11, (6, 4))
    p = jaxlight.port(net, (ids, torch.randn(6, 5)), steps=2)
    print(p.report)
    assert p.report.ok, str(p.report)
    rows = {r.check: r for r in p.report.rows}
    # Only the float input has a gradient; the ids are compared as integers never.
    names = {c.name for c in p.report.parity["sgd"].comparisons if c.level == "input_grad"}
    assert names == {"['inputs'][1]"}
    assert rows["BatchNorm running stats"].note == "no BatchNorm in the model"


def test_your_own_loss_and_targets():
    import optax
    import torch.nn.functional as F

    def loss_fn(model, batch):  # a margin loss on the first logit, with per-example weights
        out = model(*batch["inputs"])
        return optax.huber_loss(out[:, 0], batch["target"]["y"]) * batch["target"]["w"], {}

    def torch_loss_fn(model, batch):
        out = model(*batch["inputs"])
        return F.huber_loss(out[:, 0], batch["target"]["y"], reduction="none", delta=1.0) * batch["target"]["w"], {}

    net = small_net()
    x = torch.randn(6, 2, 6, 6)
    targets = {"y": np.linspace(-1, 1, 6).astype(np.float32), "w": np.arange(1, 7).astype(np.float32)}
    p = jaxlight.port(net, (x,), loss=(loss_fn, torch_loss_fn), targets=targets, steps=1)
    print(p.report)
    assert p.report.ok and p.loss_kind is None and "your loss" in p.report.title
    with pytest.raises(ValueError, match="name it for the config"):  # (save needs a loss a config can import)
        p.save("/nonexistent/never-written")


def test_input_gradients_are_compared_by_check_parity():
    """A negative control for the input-gradient level on a hand-written pair: a port that
    stops the gradient at its input computes the same forward and parameter gradients, and only
    the input gradient says otherwise."""
    import optax
    import torch.nn.functional as F

    from jaxlight.bridge.parity import check_parity

    class Stopped(nnx.Module):
        def __init__(self, *, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(jax.lax.stop_gradient(x))

    torch.manual_seed(0)
    tnet = nn.Sequential()
    tnet.add_module("fc", nn.Linear(4, 3))
    data = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32),
            "y": np.arange(8, dtype=np.int32) % 3}

    def loss_fn(model, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]), {}

    def torch_loss_fn(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"), {}

    report = check_parity(tnet, Stopped(rngs=nnx.Rngs(0)), data=data, loss_fn=loss_fn, torch_loss_fn=torch_loss_fn,
                          optimizer="sgd", lr=0.1, batch_size=8, steps=1, input_grads=True)
    d = report.divergence
    assert (d.level, d.name) == ("input_grad", "['x']"), str(report)
    assert report.worst["grad"][0] <= 1e-6 and report.worst["forward"][0] <= 1e-6
    # and the unbroken pair passes at every level, input gradient included
    plain = check_parity(tnet, nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0))), data=data, loss_fn=loss_fn,
                         torch_loss_fn=torch_loss_fn, optimizer="sgd", lr=0.1, batch_size=8, steps=1,
                         input_grads=True)
    assert plain.ok, str(plain)


class Dropouts(nn.Module):
    """Dropout no module mode reaches: functional, and inside attention."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, dropout=0.2, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.nn.functional.dropout(x, 0.3, self.training)
        a, _ = self.attn(h, h, h)
        a = a + torch.nn.functional.scaled_dot_product_attention(h, h, h, None, 0.4 if self.training else 0.0, True)
        return self.fc(a.mean(1))


def test_dropout_in_functions_and_attention_is_off_on_both_sides():
    torch.manual_seed(0)
    net = Dropouts()
    p = jaxlight.port(net, (torch.randn(8, 5, 6),), steps=1)
    print(p.report)
    assert p.report.ok, str(p.report)
    note = next(n for n in p.report.notes if "switched off on the torch side" in n)
    for what in ("MultiheadAttention(dropout)", "scaled_dot_product_attention(dropout_p)", "functional.dropout"):
        assert what in note, note
    # and only for the check: the torch module still drops in train mode afterwards
    net.train()
    x = torch.ones(4, 5, 6)
    assert not torch.equal(net(x), net(x))
