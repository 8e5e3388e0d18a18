"""``Port.save``: the source as an importable module, the weights as a jaxlight checkpoint, a
config for ``jaxlight fit``; loaded in a fresh process, fine-tuned from the ported weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import jaxlight
from _support import ROOT

torch.set_num_threads(1)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net = Classifier()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
    p = jaxlight.port(net, (x,), check=False)
    folder = tmp_path_factory.mktemp("port") / "classifier"
    p.save(folder)
    return net, x, p, folder


def test_the_saved_layout(saved):
    net, x, p, folder = saved
    t = p.translation
    names = sorted(os.listdir(folder))
    assert f"{t.module_name}.py" in names and "config.yaml" in names and "examples.npz" in names
    assert [n for n in names if n.startswith("step_")] == ["step_000000000"]
    assert (folder / f"{t.module_name}.py").read_text() == p.source
    meta = json.loads((folder / "step_000000000" / "meta.json").read_text())
    assert meta["hparams"]["model"] == {"class_path": f"{t.module_name}.{t.class_name}",
                                        "init_args": dict(t.init_args or {})}
    from jaxlight.checkpoint import verify_checkpoint

    verify_checkpoint(folder / "step_000000000")  # the manifest covers every file
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["class_path"] == f"{t.module_name}.{t.class_name}"
    assert config["init"] == {"checkpoint": str(folder)}
    assert config["loss"] == "jaxlight.bridge.porting.task.cross_entropy"


def test_saving_again_replaces_the_port_but_never_another_run(saved, tmp_path):
    net, x, p, folder = saved
    p.save(folder)  # an earlier port's folder: replaced
    assert [n for n in os.listdir(folder) if n.startswith("step_")] == ["step_000000000"]
    other = tmp_path / "run"
    (other / "step_000000120").mkdir(parents=True)
    (other / "step_000000120" / "meta.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no port wrote"):
        p.save(other)


LOAD = """
import sys
import numpy as np
import jaxlight
folder, x_path = sys.argv[1], sys.argv[2]
model, record = jaxlight.load_from_checkpoint(folder, trust_code=True)
assert "torch" not in sys.modules, "loading a port imports no torch"
np.save(sys.argv[3], np.asarray(model(np.load(x_path))))
print(type(model).__module__, type(model).__name__)
"""


@pytest.mark.integration
def test_load_in_a_fresh_process(saved, tmp_path):
    net, x, p, folder = saved
    np.save(tmp_path / "x.npy", x.numpy())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the generated module is found beside the checkpoint
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", LOAD, str(folder), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [p.translation.module_name, p.translation.class_name]
    net.eval()
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)  # eval mode, loaded


@pytest.mark.integration
def test_loading_without_trust_is_refused(saved, tmp_path):
    net, x, p, folder = saved
    code = f"import jaxlight; jaxlight.load_from_checkpoint({str(folder)!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=folder)
    assert proc.returncode != 0 and "trust_code" in proc.stderr
    assert f"{p.translation.module_name}.{p.translation.class_name}" in proc.stderr  # the class path named


@pytest.mark.integration
def test_jaxlight_fit_fine_tunes_from_the_ported_weights(saved, tmp_path):
    """``jaxlight fit --config folder/config.yaml``: one epoch of one batch, so the first (only)
    step's loss is the loss of the ported weights, computed here by torch on the same batch."""
    net, x, p, folder = saved
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{folder}"}
    from _support import run_module

    proc = run_module("jaxlight.cli", "fit", "--config", str(folder / "config.yaml"), "--trainer.out",
                      str(tmp_path / "out"), "--trainer.checkpoint.dirpath", str(tmp_path / "ckpt"), env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    labels = torch.from_numpy(np.asarray(p.targets)).long()
    reference = Classifier()
    reference.load_state_dict(net.state_dict())
    reference.train()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(reference(x), labels)
    assert metrics["history"][0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    # and the fine-tuned checkpoint loads (its module importable from the path given)
    code = (f"import jaxlight; m, r = jaxlight.load_from_checkpoint({str(tmp_path / 'ckpt')!r}); "
            f"print(r['model']['class_path'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert proc.returncode == 0 and proc.stdout.strip() == p.class_path, proc.stderr[-3000:]


class SequenceFirst(nn.Module):
    """An LSTM on (T, B, F) inputs (torch's default layout) from a given state (1, B, H): the
    inputs do not share a first axis."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x, h0):
        out, _ = self.lstm(x, (h0, torch.zeros_like(h0)))
        return self.head(out)


@pytest.mark.slow  # (9 s: an LSTM fine-tuned from its saved config; batch-first saves stay fast)
def test_inputs_that_are_not_batch_first_are_one_row(tmp_path):
    """Not cut into rows: the saved examples are one row of a batch of one, and the config's loss
    takes that row whole; its value is torch's mean squared error on the examples."""
    import jax

    from jaxlight.bridge.porting import task

    torch.manual_seed(0)
    net = SequenceFirst()
    x, h0 = torch.randn(7, 4, 3), torch.randn(1, 4, 5)  # (T, B, F), (layers, B, H)
    p = jaxlight.port(net, (x, h0), steps=1)
    assert p.report.ok and "not batch-first" in p.report.title, str(p.report)
    folder = p.save(tmp_path / "seq")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["loss"] == "jaxlight.bridge.porting.task.mse_whole" and config["trainer"]["batch_size"] == 1
    data = task.example_data(str(folder / "examples.npz"))
    assert len(data) == 1
    batch = jax.tree.map(lambda a: a, data.data)
    losses, _ = task.mse_whole(p.model, batch)
    with torch.no_grad():
        expected = ((net(x, h0) - torch.from_numpy(p.targets[0])) ** 2).mean()
    assert losses.shape == (1,) and float(losses[0]) == pytest.approx(float(expected), rel=1e-5)


def test_the_config_starts_from_the_ported_weights(saved, monkeypatch):
    """``init: {checkpoint: folder}``: the model ``jaxlight fit`` builds holds the torch module's
    weights, exactly; a checkpoint that is not there is one config error naming the key."""
    from jaxlight import config as config_mod
    from jaxlight.interop import model_to_torch

    net, x, p, folder = saved
    monkeypatch.syspath_prepend(str(folder))
    _, _, plain, _ = config_mod.parse("fit", ["--config", str(folder / "config.yaml")])
    run = config_mod.build_run(plain, load_data=False)
    built = model_to_torch(run.model, p.layout)
    for name, value in net.state_dict().items():
        if name in built:
            np.testing.assert_array_equal(built[name], value.numpy(), err_msg=name)
    plain["init"] = {"checkpoint": str(folder / "missing")}
    with pytest.raises(config_mod.ConfigError, match=r"^init\.checkpoint: no checkpoint (found|at)"):
        config_mod.build_run(plain, load_data=False)
