"""Both frameworks draw every layer's initial weights from the same distribution.

PyTorch's defaults (``jaxlight.models.init``): ``U(-b, b)`` with ``b = 1/sqrt(fan_in)`` for
Linear and Conv2d weights and biases (fan_in = in_features, or in_channels * kh * kw), and
``b = 1/sqrt(hidden)`` for every LSTM tensor. The bounds below are written from that rule, not
read from the code under test. For every tensor of every model, in both frameworks: all values
within the bound; and, for tensors of at least 200 values, a Kolmogorov-Smirnov test against
``U(-b, b)`` and a two-sample KS test jaxlight vs torch, at alpha = 1e-3.
"""

import math

import numpy as np
import pytest
from flax import nnx

import torch_ref
from jaxlight.interop import params_to_torch
from torch_ref.interop import state_dict_to_numpy

LSTM_B = 1 / math.sqrt(128)
BOUNDS = {
    "linear": {"linear.weight": 1 / math.sqrt(8), "linear.bias": 1 / math.sqrt(8)},
    "logistic": {"linear.weight": 1 / 28, "linear.bias": 1 / 28},
    "softmax": {"linear.weight": 1 / 28, "linear.bias": 1 / 28},
    "mlp": {"fc1.weight": 1 / 28, "fc1.bias": 1 / 28, "fc2.weight": 1 / 16, "fc2.bias": 1 / 16},
    "cnn": {"conv1.weight": 1 / 3, "conv1.bias": 1 / 3, "conv2.weight": 1 / math.sqrt(288),
            "conv2.bias": 1 / math.sqrt(288), "fc1.weight": 1 / 56, "fc1.bias": 1 / 56,
            "fc2.weight": 1 / 16, "fc2.bias": 1 / 16},
    "lstm": {"lstm.weight_ih_l0": LSTM_B, "lstm.weight_hh_l0": LSTM_B, "lstm.bias_ih_l0": LSTM_B,
             "lstm.bias_hh_l0": LSTM_B, "fc.weight": 1 / math.sqrt(128), "fc.bias": 1 / math.sqrt(128)},
}
KS_C = 1.95  # the Kolmogorov distribution's critical value at alpha = 1e-3
MIN_KS = 200


def ks_uniform(x, b) -> float:
    """One-sample KS statistic of ``x`` against U(-b, b)."""
    x = np.sort(np.asarray(x, np.float64).ravel())
    n = x.size
    cdf = np.clip((x + b) / (2 * b), 0, 1)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def ks_two_sample(a, b) -> float:
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size)))


@pytest.mark.parametrize("name", list(BOUNDS))
def test_every_layer_has_the_same_initial_distribution(name, jax_model):
    jax_arrays = params_to_torch(nnx.state(jax_model(name), nnx.Param), name)
    torch_arrays = state_dict_to_numpy(torch_ref.build_model(name, seed=1))
    assert set(jax_arrays) == set(torch_arrays) == set(BOUNDS[name])
    for pname, b in BOUNDS[name].items():
        for framework, arrays in (("jaxlight", jax_arrays), ("torch", torch_arrays)):
            x = arrays[pname]
            assert np.abs(x).max() <= b, f"{framework} {pname}: max |w| {np.abs(x).max()} > bound {b}"
            if x.size >= MIN_KS:
                d = ks_uniform(x, b)
                assert d < KS_C / math.sqrt(x.size), f"{framework} {pname}: KS {d:.4f} against U(-{b:.4f}, {b:.4f})"
                # The second moment too: Var U(-b, b) = b^2 / 3.
                assert np.std(x) == pytest.approx(b / math.sqrt(3), rel=5 / math.sqrt(x.size)), f"{framework} {pname}"
        ja, ta = jax_arrays[pname], torch_arrays[pname]
        if ja.size >= MIN_KS:
            d = ks_two_sample(ja, ta)
            assert d < KS_C * math.sqrt(2 / ja.size), f"{pname}: two-sample KS {d:.4f}"


def test_ks_checks_can_fail():
    # Flax's own default, lecun-normal, is what jaxlight does *not* use: the test would see it.
    rng = np.random.default_rng(0)
    b = 1 / 28
    lecun = rng.standard_normal(784 * 256) / 28
    assert ks_uniform(lecun, b) > KS_C / math.sqrt(lecun.size)
    assert ks_two_sample(lecun, rng.uniform(-b, b, lecun.size)) > KS_C * math.sqrt(2 / lecun.size)


@pytest.mark.slow
def test_init_torch_gives_any_models_layers_torchs_distributions():
    """A user's model of Flax layers (``jaxlight.init_torch``) against torch's own layers of the
    same shapes: Embed ~ N(0, 1); Conv, Linear ~ U(+-1/sqrt(fan_in)); LSTMCell kernels ~
    U(+-1/sqrt(H)) and its one bias per gate ~ torch's b_ih + b_hh."""
    import torch
    from userpkg.nets import Mixed

    import jaxlight

    model = jaxlight.init_torch(Mixed(rngs=nnx.Rngs(0)), seed=3)
    torch.manual_seed(0)
    t_embed, t_conv = torch.nn.Embedding(50, 40), torch.nn.Conv2d(6, 30, 3)
    t_cell, t_out = torch.nn.LSTMCell(24, 32), torch.nn.Linear(64, 20)
    w = lambda t: t.detach().numpy()  # noqa: E731
    h = 32
    gates = lambda a: np.split(a, 4)  # noqa: E731  (torch's i, f, g, o row blocks)
    cases = [  # (name, jaxlight values, torch values, bound or None for the normal)
        ("embed", model.embed.embedding[...], w(t_embed.weight), None),
        ("conv.kernel", model.conv.kernel[...], w(t_conv.weight), 1 / math.sqrt(6 * 9)),
        ("conv.bias", model.conv.bias[...], w(t_conv.bias), 1 / math.sqrt(6 * 9)),
        ("out.kernel", model.out.kernel[...], w(t_out.weight), 1 / 8),
        ("out.bias", model.out.bias[...], w(t_out.bias), 1 / 8),
        ("cell.ii.kernel", model.cell.ii.kernel[...], gates(w(t_cell.weight_ih))[0], 1 / math.sqrt(h)),
        ("cell.hf.kernel", model.cell.hf.kernel[...], gates(w(t_cell.weight_hh))[1], 1 / math.sqrt(h)),
    ]
    for name, ours, theirs, b in cases:
        ours = np.asarray(ours, np.float64)
        if b is None:
            assert abs(ours.mean()) < 4 / math.sqrt(ours.size) and ours.std() == pytest.approx(1.0, rel=0.1), name
        else:
            assert np.abs(ours).max() <= b, name
            if ours.size >= MIN_KS:
                assert ks_uniform(ours, b) < KS_C / math.sqrt(ours.size), name
        if min(ours.size, theirs.size) >= MIN_KS:
            n = min(ours.size, theirs.size)
            assert ks_two_sample(ours.ravel()[:n], theirs.ravel()[:n]) < KS_C * math.sqrt(2 / n), name
    # The bias: our one bias per gate against torch's two summed, all four gates pooled (128 each side
    # is too few for KS at alpha 1e-3, so many cells are drawn).
    ours = np.concatenate([np.concatenate([np.asarray(getattr(jaxlight.init_torch(Mixed(rngs=nnx.Rngs(0)), seed=s).cell, g)
                                                                .bias[...]) for g in ("hi", "hf", "hg", "ho")])
                           for s in range(8)])
    theirs = np.concatenate([w(c.bias_ih) + w(c.bias_hh) for c in (torch.nn.LSTMCell(24, 32) for _ in range(8))])
    assert np.abs(ours).max() <= 2 / math.sqrt(h)
    assert ks_two_sample(ours, theirs) < KS_C * math.sqrt(2 / ours.size)
    assert ks_uniform(ours, 1 / math.sqrt(h)) > KS_C / math.sqrt(ours.size)  # not one uniform: the sum of two
    # Flax's own init of the same model is what init_torch replaces: the KS test sees it.
    flax_kernel = np.asarray(Mixed(rngs=nnx.Rngs(0)).conv.kernel[...], np.float64)
    assert ks_uniform(flax_kernel, 1 / math.sqrt(6 * 9)) > KS_C / math.sqrt(flax_kernel.size)
