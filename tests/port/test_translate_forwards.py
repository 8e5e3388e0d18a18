"""Idioms of real ``forward`` methods, each ported and compared with torch: a GPT block (a causal
mask buffer sliced to the sequence, ``torch.arange`` positions, a loop over a ModuleList), a
``torch.no_grad()`` block, shape asserts, dict outputs, ``F.scaled_dot_product_attention`` with
dropout in train mode only, named Sequentials, and a single layer or torch's own transformer
layers as the model."""

from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn
from torch.nn import functional as F

import zoo

from jaxlight import interop
from jaxlight.bridge.porting.translate import translate

torch.set_num_threads(1)


def _compare(model, inputs, rtol=1e-4, atol=1e-5):
    """Translate; eval-mode outputs equal torch's; returns the translation."""
    model.eval()
    t = translate(model, inputs)
    m = nnx.clone(t.model)
    m.eval()
    with torch.no_grad():
        want = model(*inputs)
    got = m(*[x.numpy() for x in inputs])
    want = jax.tree.leaves(want, is_leaf=lambda v: isinstance(v, torch.Tensor))
    got = jax.tree.leaves(got)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=rtol, atol=atol)
    return t


def test_a_gpt_ports_with_its_mask_buffer_positions_and_block_loop():
    # (zoo.py, not this file: pytest rewrites the asserts of test modules, and the GPT's size
    # assert must read as the plain Python statement users write)
    t = _compare(*zoo.gpt())
    src = t.source
    assert "self.bias[...][:, :, :T, :T]" in src and "jnp.arange(0, t" in src
    assert "x = x + self.h[0](x)" in src and "x = x + self.h[1](x)" in src
    assert "assert" not in src.split("class GPT")[0].split("def __call__")[1]  # the size check is static
    assert t.layout.rule("h.0.bias").variable == "batch_stat"  # a buffer: state, never trained


class Distill(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(4, 4)
        self.student = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x) * 2
        return {"logits": self.student(x) + target, "target": target}


def test_a_no_grad_block_stops_the_gradient_as_in_torch():
    torch.manual_seed(0)
    model = Distill()
    x = torch.randn(3, 4)
    t = _compare(model, (x,))
    assert "jax.lax.stop_gradient(self.teacher(x) * 2)" in t.source
    xt = x.clone().requires_grad_(True)
    model(xt)["logits"].sum().backward()
    graphdef, params, rest = nnx.split(t.model, nnx.Param, ...)

    def loss(params, a):
        return nnx.merge(graphdef, params, rest)(a)["logits"].sum()

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, x.numpy())
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    grads = interop.params_to_torch(gp, t.layout)
    assert not np.any(grads["teacher.weight"]) and not np.any(grads["teacher.bias"])
    np.testing.assert_allclose(grads["student.weight"], model.student.weight.grad.numpy(), rtol=1e-5, atol=1e-6)


class SdpaDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = 0.5
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        return y.transpose(1, 2).flatten(2)


def test_attention_dropout_written_for_train_mode_only_follows_model_train_and_eval():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    t = _compare(SdpaDropout(), (x,))
    assert "dropout=self.dropout_fn" in t.source and "nn.Dropout(0.5" in t.source
    m = nnx.clone(t.model)
    m.train()
    train_out = np.asarray(m(x.numpy()))
    m.eval()
    assert not np.allclose(train_out, np.asarray(m(x.numpy())))


def test_named_sequential_keeps_its_names():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 3)), ("bn", nn.BatchNorm2d(4)), ("act", nn.ReLU()),
                                       ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
                                       ("fc", nn.Linear(4, 2))]))
    t = _compare(model, (torch.randn(2, 3, 6, 6),))
    assert "(nn.NamedSequential):" in t.source and "super().__init__({" in t.source
    assert t.layout.rule("conv.weight").jax_path == ("conv", "kernel")
    assert t.layout.rule("bn.running_var").jax_path == ("bn", "var")


@pytest.mark.parametrize("layer,shape", [
    (lambda: nn.Linear(3, 2), (4, 3)),
    (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 7)),
    (lambda: nn.LSTM(3, 4, batch_first=True, num_layers=2), (2, 5, 3)),
    (lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), (2, 5, 8)),
], ids=["linear", "conv2d", "lstm", "encoder_layer"])
def test_a_single_torch_layer_is_a_model_too(layer, shape):
    torch.manual_seed(0)
    t = _compare(layer(), (torch.randn(*shape),))
    assert "jaxlight.save_hyperparameters(self)" in t.source
    assert sorted(r.torch_name for r in t.layout.rules) == sorted(layer().state_dict())
