"""The port's op table, op by op, against torch: each row is one line of a ``forward`` (a
tensor function, method, operator or layer), translated and run on the same input, forward
and gradient. Rows are grouped into a few modules (one translation each) to keep the fast
tier cheap; a failure names the row."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn
from torch.nn import functional as F

from jaxlight.bridge.porting.translate import translate

torch.set_num_threads(1)

# Each row: (label, fn(x) -> tensor) on x of shape (2, 3, 4, 6) float32.
ARITHMETIC = [
    ("add sub mul", lambda x: x + 1.5 - x * 2.0),
    ("rsub rdiv", lambda x: 1.0 - 2.0 / (x.abs() + 1)),
    ("floordiv mod", lambda x: ((x * 3) // 2).detach() + (x * 3) % 2),
    ("pow", lambda x: x.abs() ** 1.5 + 2 ** x),
    ("neg abs", lambda x: -x.abs()),
    ("torch.add alpha", lambda x: torch.add(x, x, alpha=0.5)),
    ("div rounding", lambda x: torch.div(x * 5, 2, rounding_mode="floor") + torch.div(x * 5, 2, rounding_mode="trunc")),
    ("matmul", lambda x: x @ x.transpose(-1, -2)),
    ("torch.matmul bmm", lambda x: torch.matmul(x[0], x[1].transpose(1, 2)) + torch.bmm(x[0], x[1].transpose(1, 2))),
    ("einsum", lambda x: torch.einsum("bchw,bcvw->bhv", x, x)),
    ("exp log sqrt", lambda x: torch.exp(x * 0.1) + torch.log(x.abs() + 1) + (x.abs() + 1).sqrt() + x.rsqrt().nan_to_num(0)),
    ("sin cos tanh", lambda x: x.sin() * x.cos() + torch.tanh(x)),
    ("clamp", lambda x: x.clamp(-0.5, 0.5) + torch.clamp(x, min=0.0) + x.clamp(max=0.1)),
    ("maximum minimum", lambda x: torch.maximum(x, x.flip(-1)) - torch.minimum(x, 0.2 * x)),
    ("comparisons where", lambda x: torch.where(x > 0, x, x * 0.1) + (x >= 0.3).float() - (x < -0.3).to(torch.float32)),
    ("logical", lambda x: ((x > 0) & (x < 1) | (x == 0)).float() + (~(x > 0)).float()),
    ("masked_fill", lambda x: x.masked_fill(x > 0.5, -1.0)),
    ("casts", lambda x: (x * 4).long().float() + (x * 4).int().to(x.dtype) + x.type_as(x) + x.bool().float()),
    ("lerp", lambda x: torch.lerp(x, x.flip(0), 0.3)),
]

SHAPES = [
    ("reshape view", lambda x: x.reshape(2, -1).view(2, 3, 24)),
    ("flatten unflatten", lambda x: x.flatten(1).unflatten(1, (12, 6)).flatten(2, 2)),
    ("permute transpose t", lambda x: x.permute(0, 2, 3, 1).transpose(1, 2) + x.permute(0, 3, 1, 2).mT),
    ("squeeze unsqueeze", lambda x: x[:, :1].squeeze(1).unsqueeze(-1).squeeze(0).unsqueeze(0)),
    ("expand expand_as", lambda x: x[:, :, :1].expand(-1, -1, 4, -1) + x[:1].expand_as(x)),
    ("repeat tile", lambda x: x[:, :1].repeat(1, 2, 1, 1) + torch.tile(x[:, 1:2], (1, 2, 1, 1))),
    ("cat stack", lambda x: torch.cat([x, x * 2], dim=1).sum(1) + torch.stack([x, -x], dim=-1).sum(-1).sum(1)),
    ("split chunk unbind", lambda x: x.split([1, 2], dim=1)[1][:, 1:] + torch.chunk(x, 3, dim=1)[2]
     + x.unbind(1)[0].unsqueeze(1)),
    ("split size", lambda x: torch.cat(torch.split(x, 4, dim=-1)[::-1], dim=-1)),
    ("indexing", lambda x: x[0, 1:, ::2, -1] + x[-1, :2, None, 1:3, 0].squeeze(1).flatten()[:3].sum()),
    ("ellipsis", lambda x: x[..., 0] + x[..., -1:].squeeze(-1)),
    ("tensor index", lambda x: x[:, torch.tensor([2, 0])] + x[:, [1, 1]]),
    ("narrow select", lambda x: x.narrow(2, 1, 2).select(1, 0) + torch.select(x, 1, 2)[:, 1:3]),
    ("flip roll", lambda x: x.flip(-1) + torch.roll(x, 2, -1) + x.roll(shifts=1, dims=2)),
    ("gather index_select", lambda x: x.gather(-1, torch.tensor([[[[1, 0, 5]]]]).expand(2, 3, 4, 3)).sum(-1)
     + x.index_select(2, torch.tensor([3, 1, 0, 2])).sum(-1)),
    ("tril triu", lambda x: x[0, 0].tril() + x[0, 1].triu(1)[:, :4].sum() + torch.tril(x[1, 0], diagonal=-1)),
    ("size shape", lambda x: x.reshape(x.size(0), x.shape[1] * x.size()[2], x.size(-1)) * x.dim() / x.numel()),
    ("arange zeros ones full eye", lambda x: x + torch.arange(6) + torch.zeros((4, 6)) + torch.ones(6)
     + torch.full((1, 6), 0.5) + torch.eye(6)[:4] + torch.arange(x.shape[-1], dtype=torch.float32)
     + torch.zeros_like(x) + torch.ones_like(x) * x.new_ones((1,)) + x.new_zeros(x.shape)),
]

REDUCTIONS = [
    ("sum mean", lambda x: x.sum() + x.mean(dim=(1, 2)).sum(-1) + torch.sum(x, -1, keepdim=True).mean()),
    ("max min values", lambda x: x.max(dim=1)[0] + x.min(1, keepdim=True).values.squeeze(1) + x.max()),
    ("max indices", lambda x: x.max(dim=-1).indices.float() + x.argmax(1).float().unsqueeze(1).sum()),
    ("amax amin", lambda x: x.amax(dim=(2, 3)) - torch.amin(x, 1).sum((1, 2))[:, None]),
    ("var std", lambda x: x.var(dim=-1) + x.std(-1, unbiased=False) + torch.var(x, dim=(1, 2), keepdim=True).squeeze((1, 2))[:, None, :1]),
    ("prod logsumexp", lambda x: (x * 0.5 + 1).prod(-1) + torch.logsumexp(x, dim=-1)),
    ("cumsum", lambda x: x.cumsum(-1) + torch.cumsum(x, dim=1)),
    ("norm", lambda x: x.norm(dim=-1) + torch.norm(x) * 0.1 + F.normalize(x, dim=1).sum((1, 3))[:, None]),
    ("all any", lambda x: (x > -5).all(dim=-1).float() + (x > 2).any(-1).float()),
    ("topk sort", lambda x: x.topk(2, dim=-1).values.sum(-1) + x.sort(dim=-1, descending=True)[0][..., 0]),
]

ACTIVATIONS = [
    ("relu", lambda x: F.relu(x) + torch.relu(x * 2) + x.relu()),
    ("gelu exact tanh", lambda x: F.gelu(x) + F.gelu(x, approximate="tanh")),
    ("silu tanh sigmoid", lambda x: F.silu(x) + torch.tanh(x) + torch.sigmoid(x) + x.sigmoid()),
    ("leaky_relu elu", lambda x: F.leaky_relu(x, 0.1) + F.leaky_relu(x) + F.elu(x) + F.celu(x, 0.5)),
    ("softplus selu", lambda x: F.softplus(x) + F.softplus(x, beta=2, threshold=1) + F.selu(x)),
    ("hard", lambda x: F.hardswish(x) + F.hardsigmoid(x) + F.hardtanh(x) + F.relu6(x * 5) + F.mish(x)),
    ("softmax", lambda x: F.softmax(x, dim=-1) + x.softmax(1).sum(1, keepdim=True) + torch.softmax(x, dim=0)),
    ("log_softmax", lambda x: F.log_softmax(x, dim=-1) + x.log_softmax(dim=2) + torch.log_softmax(x, 1)),
    ("glu logsigmoid", lambda x: F.glu(x, dim=-1).sum(-1, keepdim=True) + F.logsigmoid(x)),
    ("linear", lambda x: F.linear(x, torch.ones(5, 6) * 0.1, torch.arange(5.0))),
    ("layer_norm", lambda x: F.layer_norm(x, (6,)) + F.layer_norm(x, (4, 6), eps=1e-3)),
    ("pad", lambda x: F.pad(x, (1, 2))[..., :6] + F.pad(x, (1, 1, 0, 0), mode="replicate")[..., 1:7]
     + F.pad(x, (2, 2, 1, 1), mode="reflect")[..., 1:5, 2:8] + F.pad(x, (-1, 1), value=0.5)),
    ("pools", lambda x: F.max_pool2d(x, 2).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
     + F.avg_pool2d(x, 3, stride=1, padding=1) + F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
    ("pools ceil", lambda x: F.max_pool2d(x, 3, stride=2, ceil_mode=True).sum((2, 3)) + F.avg_pool2d(x, 3, 2, ceil_mode=True).sum((2, 3))
     + F.max_pool2d(x, 2, stride=1, padding=1, dilation=2).sum((2, 3))),
    ("adaptive", lambda x: F.adaptive_avg_pool2d(x, (3, 4)).sum((2, 3)) + F.adaptive_max_pool2d(x, 3).sum((2, 3))
     + F.adaptive_avg_pool2d(x, 1).flatten(1)),
    ("pools 1d", lambda x: F.max_pool1d(x.flatten(2), 4).sum(-1) + F.avg_pool1d(x.flatten(2), 3, 2).sum(-1)
     + F.adaptive_avg_pool1d(x.flatten(2), 5).sum(-1)),
    ("interpolate", lambda x: F.interpolate(x, scale_factor=2)[..., ::2, ::2] + F.interpolate(x, size=(8, 12), mode="nearest")[..., 1::2, 1::2]),
    ("dropout eval", lambda x: F.dropout(x, 0.5, training=False)),
]


def _module(rows):
    class Rows(nn.Module):
        def forward(self, x):
            return tuple(fn(x) for _, fn in rows)

    return Rows()


GROUPS = {"arithmetic": ARITHMETIC, "shapes": SHAPES, "reductions": REDUCTIONS, "activations": ACTIVATIONS}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_ops_forward_and_gradient_match_torch(group):
    rows = GROUPS[group]
    model = _module(rows)
    x = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    t = translate(model, (x,))
    xt = x.clone().requires_grad_(True)
    outs = model(xt)
    cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    torch.autograd.backward([o for o in outs if o.requires_grad], [c for o, c in zip(outs, cots) if o.requires_grad])

    graphdef, state = nnx.split(t.model)

    def forward(a):
        return nnx.merge(graphdef, state)(a)

    def f(a):
        return sum((o * c.numpy()).sum() for o, c in zip(forward(a), cots))

    # One compiled program per group (op-by-op dispatch of a hundred small ops is slower).
    got, grad = jax.jit(lambda a: (forward(a), jax.grad(f)(a)))(x.numpy())
    for (label, _), g, w in zip(rows, got, outs):
        np.testing.assert_allclose(np.asarray(g), w.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=label)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{group}: d/dx")


class Layers(nn.Module):
    """The parameter-free layers as modules, and the less common layers with parameters."""

    def __init__(self):
        super().__init__()
        self.acts = nn.ModuleList([nn.ReLU(), nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid(),
                                   nn.LeakyReLU(0.2), nn.ELU(), nn.Softplus(), nn.Mish(), nn.Hardswish(),
                                   nn.Identity(), nn.ReLU6(), nn.SELU()])
        self.softmax = nn.Softmax(dim=1)
        self.log_softmax = nn.LogSoftmax(dim=-1)
        self.flatten = nn.Flatten()
        self.unflatten = nn.Unflatten(1, (3, 24))
        self.prelu = nn.PReLU(3)
        self.circular = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
        self.same = nn.Conv2d(3, 2, (2, 3), padding="same", dilation=(2, 1))
        self.upsample = nn.Upsample(scale_factor=2)
        self.shuffle = nn.PixelShuffle(2)
        self.pool = nn.AdaptiveMaxPool2d((2, 3))
        self.tconv1d = nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.bag = nn.EmbeddingBag(10, 4, mode="sum")
        self.rnn = nn.RNN(6, 5, nonlinearity="relu", batch_first=True)
        self.gru = nn.GRU(6, 5, bias=False)

    def forward(self, x):
        outs = [act(x) for act in self.acts]
        outs.append(self.softmax(x) + self.log_softmax(x) + self.prelu(x))
        flat = self.unflatten(self.flatten(x))
        outs += [flat, self.circular(x), self.same(x), self.upsample(x), self.pool(x)]
        outs.append(self.shuffle(torch.cat([x, x[:, :1]], dim=1)))
        outs.append(self.tconv1d(x.flatten(2)))
        outs.append(self.bag((x[:, 0, :, :2].abs() * 4).long().clamp(max=9).flatten(1)))
        r, h = self.rnn(x[:, 0])
        g, hg = self.gru(x[:, 1].transpose(0, 1))
        return tuple(outs) + (r, h, g, hg)


def test_layers_forward_and_gradient_match_torch():
    torch.manual_seed(0)
    model = Layers()
    x = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    t = translate(model, (x,))
    m = nnx.clone(t.model)
    outs = model(x)
    got = m(x.numpy())
    assert len(got) == len(outs)
    for i, (g, w) in enumerate(zip(got, outs)):
        np.testing.assert_allclose(np.asarray(g), w.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=f"output {i}")
