"""jaxlight imports and trains with torch absent (torch is an optional extra)."""

import subprocess
import sys

from _support import ROOT

SCRIPT = """
import sys
sys.modules["torch"] = None        # any `import torch` now raises ImportError
sys.modules["torchvision"] = None
import numpy as np
import jaxlight
from jaxlight import create_train_state, optim, tasks, loop
from jaxlight.data import make_regression
data = make_regression(n_train=512, n_test=128, seed=0)
state = create_train_state(jaxlight.build_model("linear"), optim.sgd(0.05), tasks.regression())
state, _ = loop.fit(state, data.train, epochs=5, batch_size=64)
err = np.abs(np.asarray(state.params["linear"]["kernel"][...]) - data.weight).max()
assert err < 0.05, err
assert not any(m.startswith("torch") for m, v in sys.modules.items() if v is not None)
print("ok", err)
"""


def test_jaxlight_trains_without_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
