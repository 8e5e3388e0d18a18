"""``jaxlight compare`` on a ported pair: the convergence comparison over seeds, on the user's data."""

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from _support import run_module

torch.set_num_threads(1)


class Blobs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def blobs(n: int = 384, seed: int = 0):
    """Three Gaussian blobs in 4-D: (train, test) of {"inputs": (x,), "target": y}."""
    from jaxlight.data import ArrayDataset

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 4)) * 3
    y = rng.integers(0, 3, 2 * n).astype(np.int32)
    x = (centers[y] + rng.standard_normal((2 * n, 4))).astype(np.float32)
    return (ArrayDataset({"inputs": (x[:n],), "target": y[:n]}),
            ArrayDataset({"inputs": (x[n:],), "target": y[n:]}))


def test_compare_trains_both_frameworks_on_a_ported_pair():
    from jaxlight.bridge.compare import JAX_DRAW_OFFSET, compare, ported_pair, render_table
    from jaxlight.recipes import Recipe

    pair = ported_pair(Blobs, (torch.randn(8, 4),))
    assert pair.metric == "accuracy" and pair.name == "Blobs"
    # Each framework draws its own weights from torch's constructor: seed s for torch, an
    # independent draw for jaxlight.
    torch.manual_seed(1)
    expected = Blobs().fc1.weight.detach().numpy()
    np.testing.assert_array_equal(pair.torch_model(1).fc1.weight.detach().numpy(), expected)
    torch.manual_seed(1 + JAX_DRAW_OFFSET)
    np.testing.assert_array_equal(np.asarray(pair.jax_model(1).fc1.kernel[...]).T, Blobs().fc1.weight.detach().numpy())

    train, test = blobs()
    recipe = Recipe("Blobs", "port", "blobs", "adam", 1e-2, 32, 2)
    payload = compare(recipe, [0, 1], pair=pair, data=lambda seed: (train, test), log=lambda line: None)
    print(render_table(payload))
    for framework in ("jaxlight", "torch"):
        s = payload["frameworks"][framework]
        assert len(s["values"]) == 2 and all(v > 0.9 for v in s["values"]), s["values"]  # chance is 1/3
        assert all(len(losses) == 2 * 12 for losses in s["step_losses"])  # 384 / 32 steps an epoch, 2 epochs
    assert payload["agree"], render_table(payload)


@pytest.mark.integration
def test_the_command_line_compares_a_ported_pair(tmp_path):
    (tmp_path / "blobnets.py").write_text(textwrap.dedent('''
        import numpy as np
        import torch
        from torch import nn
        from jaxlight.data import ArrayDataset


        class Blobs(nn.Module):
            def __init__(self, hidden=16):
                super().__init__()
                self.fc1 = nn.Linear(4, hidden)
                self.fc2 = nn.Linear(hidden, 3)

            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(x)))


        def data(n=256):
            rng = np.random.default_rng(0)
            centers = rng.standard_normal((3, 4)) * 3
            y = rng.integers(0, 3, 2 * n).astype(np.int32)
            x = (centers[y] + rng.standard_normal((2 * n, 4))).astype(np.float32)
            return ArrayDataset({"inputs": (x[:n],), "target": y[:n]}), None, ArrayDataset({"inputs": (x[n:],), "target": y[n:]})
    '''))
    out = tmp_path / "out"
    proc = run_module("jaxlight.cli", "compare", "--ported", f"{tmp_path / 'blobnets.py'}:Blobs", "--init-args",
                      '{"hidden": 8}', "--input", "float32[8,4]", "--data", f"{tmp_path / 'blobnets.py'}:data",
                      "--seeds", "2", "--epochs", "1", "--lr", "0.01", "--batch-size", "32", "--out", str(out),
                      timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "compare.json").read_text())
    assert payload["model"] == "Blobs" and payload["metric"] == "accuracy" and payload["seeds"] == [0, 1]
    assert "Blobs" in proc.stdout and (out / "compare.png").is_file()


def test_a_ported_pair_needs_its_data(tmp_path, capsys):
    from jaxlight.cli import main

    try:
        code = main(["compare", "--ported", "torch_ref.models:MLP", "--input", "float32[4,28,28]",
                     "--out", str(tmp_path / "o")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "--ported needs --data" in err, err
