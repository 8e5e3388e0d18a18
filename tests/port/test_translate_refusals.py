"""What ``translate()`` refuses: one ``UnsupportedError`` listing every problem with the torch
source line it comes from, raised before anything is generated."""

import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from jaxlight.bridge.porting.translate import PortError, UnsupportedError, translate


def line_of(fn, text: str) -> int:
    """The file line of the first source line of ``fn`` containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, ln in enumerate(lines) if text in ln)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            return x
        return -x


class Several(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bil = nn.Bilinear(4, 4, 2)
        self.gate = Gate()

    def forward(self, x):
        h = self.fc(x)
        n = torch.nonzero(h)
        e = torch.fft.fft(h)
        r = h + torch.randn_like(h)
        return self.gate(h) + h + self.bil(h, h).sum() + n.sum() + e.abs().sum() + r


def test_every_problem_is_listed_once_with_its_line():
    with pytest.raises(UnsupportedError) as info:
        translate(Several(), (torch.randn(2, 4),))
    err = info.value
    text = str(err)
    here = inspect.getsourcefile(Several).split("/")[-1]
    expected = {
        line_of(Gate.forward, "if x.sum()"): "data-dependent",
        line_of(Several.forward, "torch.nonzero"): "torch.nonzero",
        line_of(Several.forward, "torch.fft.fft"): "torch.fft.fft",
        line_of(Several.forward, "randn_like"): "random numbers",
        line_of(Several.forward, "self.bil(h, h)"): "Bilinear",
    }
    for line, what in expected.items():
        assert any(where.endswith(f"{here}:{line}") and what in msg for where, msg in err.problems), (line, what, text)
    assert len(err.problems) == len(expected), text
    assert text.startswith(f"cannot port: {len(expected)} unsupported")
    assert isinstance(err, PortError) and isinstance(err, ValueError)


class InplaceOnView(nn.Module):
    def forward(self, x):
        h = x * 2
        v = h.view(-1)
        v.add_(1.0)  # writes h too
        return h + v.sum()


class InplaceOnInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x


class SafeInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = x * 2
        skip = h
        h += 1  # writes the tensor skip names too
        h[:, 0] = 0.0
        out = self.relu(h)
        return out + skip


@pytest.mark.parametrize("cls,needle", [(InplaceOnView, "v.add_(1.0)"), (InplaceOnInput, "x.mul_(2)")])
def test_in_place_writes_that_other_values_would_see_are_refused(cls, needle):
    with pytest.raises(UnsupportedError) as info:
        translate(cls(), (torch.randn(3, 4),))
    ((where, what),) = info.value.problems
    assert where.endswith(f":{line_of(cls.forward, needle)}") and "in place" in what


def test_in_place_writes_on_a_fresh_value_keep_torchs_meaning():
    """``skip`` and ``h`` are one tensor in torch: every in-place write shows in both."""
    x = torch.randn(3, 4)
    t = translate(SafeInplace(), (x,))
    want = SafeInplace()(x.clone())
    import numpy as np

    np.testing.assert_allclose(np.asarray(t.model(x.numpy())), want.numpy(), rtol=1e-6)
    assert "h = h + 1" in t.source and ".at[:, 0].set(0.0)" in t.source


class ModeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.training:
            x = x * 0.5
        return self.fc(x)


class AlwaysDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.3)  # training=True: torch drops in eval mode too


@pytest.mark.parametrize("cls,needle,what", [
    (ModeBranch, "return self.fc(x)", "train and eval"),
    (AlwaysDropout, "F.dropout", "eval mode too"),
])
def test_behaviour_that_depends_on_the_mode_in_ways_nnx_cannot_switch_is_refused(cls, needle, what):
    with pytest.raises(UnsupportedError) as info:
        translate(cls(), (torch.randn(3, 4),))
    assert what in str(info.value)


class FactorySizes(nn.Module):
    def forward(self, x):
        T = x.shape[1]
        return x + torch.ones(T, T)


def test_an_untraceable_factory_call_says_how_to_write_it():
    with pytest.raises(UnsupportedError) as info:
        translate(FactorySizes(), (torch.randn(2, 3, 3),))
    ((where, what),) = info.value.problems
    assert where.endswith(f":{line_of(FactorySizes.forward, 'torch.ones')}") and "torch.zeros((B, T))" in what


class BadArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4, momentum=None)
        self.lstm = nn.LSTM(4, 4, proj_size=2)  # (torch warns that oneDNN lacks projections)

    def forward(self, x):
        y, _ = self.lstm(self.bn(x).unsqueeze(0))
        return torch.nn.functional.interpolate(y.unsqueeze(1), scale_factor=2, mode="bilinear")


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_layer_configurations_without_a_translation_are_listed():
    with pytest.raises(UnsupportedError) as info:
        translate(BadArgs(), (torch.randn(3, 4),))
    text = str(info.value)
    assert "momentum=None" in text and "proj_size" in text and "bilinear" in text


def test_bad_arguments_are_a_port_error():
    with pytest.raises(PortError, match="torch.nn.Module"):
        translate(lambda x: x, (torch.randn(2),))
    with pytest.raises(PortError, match="tuple of torch tensors"):
        translate(nn.Linear(2, 2), ([1.0, 2.0],))


class PreActivation(nn.Module):
    """nn.Sequential(nn.ReLU(inplace=True), ...) writes the caller's value: fine when the
    caller does not read it again, refused when it does (torch would see the ReLU'd values)."""

    def __init__(self, reuse: bool):
        super().__init__()
        self.reuse = reuse
        self.body = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4))

    def forward(self, x):
        h = x * 1.0
        out = self.body(h)
        return out + h if self.reuse else out


def test_a_submodule_writing_its_input_is_ported_when_the_caller_does_not_read_it_again():
    import numpy as np

    x = torch.randn(3, 4)
    model = PreActivation(reuse=False)
    t = translate(model, (x,))
    np.testing.assert_allclose(np.asarray(t.model(x.numpy())), model(x).detach().numpy(), rtol=1e-6)
    with pytest.raises(UnsupportedError) as info:
        translate(PreActivation(reuse=True), (x,))
    ((where, what),) = info.value.problems
    assert where.endswith(f":{line_of(PreActivation.forward, 'self.body(h)')}") and "read again" in what
