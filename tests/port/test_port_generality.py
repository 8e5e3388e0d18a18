"""Porting ``torch_ref``'s six models gives models that compute what jaxlight's hand-written six
compute: the same weights (the torch model's: ported by ``jaxlight.port``, converted into the
hand-written model by ``jaxlight.interop``'s layout for it), the same outputs within 1e-5."""

import numpy as np
import pytest
import torch

import jaxlight
import torch_ref
from jaxlight.interop import model_from_torch
from torch_ref.interop import state_dict_to_numpy

torch.set_num_threads(1)

INPUTS = {"linear": (16, 8), "logistic": (16, 28, 28), "softmax": (16, 28, 28), "mlp": (16, 28, 28),
          "cnn": (16, 28, 28), "lstm": (16, 28, 28)}


@pytest.mark.parametrize("name", list(INPUTS))
def test_the_port_of_a_built_in_computes_what_the_hand_written_model_computes(name):
    tmodel = torch_ref.build_model(name, seed=3)
    x = torch.rand(*INPUTS[name], generator=torch.Generator().manual_seed(0))
    ported = jaxlight.port(tmodel, (x,), check=False).model
    hand = model_from_torch(state_dict_to_numpy(tmodel), jaxlight.build_model(name), name)
    out_port, out_hand = np.asarray(ported(x.numpy())), np.asarray(hand(x.numpy()))
    np.testing.assert_allclose(out_port, out_hand, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and both what torch computes
        np.testing.assert_allclose(out_port, tmodel(x).numpy(), rtol=1e-5, atol=1e-6)
    assert out_port.shape == (16, 1 if name in ("linear", "logistic") else 10)
