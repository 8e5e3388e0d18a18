"""``translate()``: torch module -> NNX source + converted model, compared with torch."""

import numpy as np
import pytest
import torch
from zoo import ZOO

from jaxlight.port.translate import translate


@pytest.mark.parametrize("name", sorted(ZOO))
def test_forward_eval_matches_torch(name):
    model, inputs = ZOO[name]()
    model.eval()
    t = translate(model, inputs)
    t.model.eval()
    want = model(*inputs).detach().numpy()
    got = np.asarray(t.model(*[x.numpy() for x in inputs]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
