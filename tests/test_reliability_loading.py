"""Loading a checkpoint someone hands you runs no code: the trust boundary of
``jaxlight.load_from_checkpoint`` and of ``jaxlight test|validate|predict --ckpt_path``.

A real checkpoint of the user package's ``Net`` (tests/userpkg) is trained once; each test copies
it, edits the record in its ``meta.json`` as an attacker would (the manifest's sha256 of
``meta.json`` recomputed, so it verifies) and checks what loading runs: a marker file that the
named code would create must not exist, a directory it would delete must still be there, and the
one error must name the class path and both ways to allow it. docs/reliability.md maps each case
to its test (``load::``).
"""

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import optax
import pytest
from flax import nnx

import jaxlight
from jaxlight import checkpoint
from jaxlight.checkpoint import CheckpointError, list_checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder holding checkpoints of ``userpkg.nets.Net(width=8)`` (2 epochs)."""
    from userpkg.data import blobs
    from userpkg.nets import Net, loss_fn

    folder = tmp_path_factory.mktemp("trained") / "ckpt"
    train, val, _ = blobs()
    state = jaxlight.create_train_state(Net(8, rngs=nnx.Rngs(1)), optax.adam(1e-2), loss_fn, seed=0)
    trainer = jaxlight.Trainer(jaxlight.TrainerConfig(max_epochs=2, batch_size=64,
                                                      logging={"enable_progress_bar": False}),
                               callbacks=[jaxlight.callbacks.ModelCheckpoint(folder, monitor="val_loss")])
    trainer.fit(state, train, val)
    return folder


@pytest.fixture
def run_folder(trained, tmp_path):
    """A copy of the trained run folder that a test may tamper with."""
    return Path(shutil.copytree(trained, tmp_path / "ckpt"))


def _tamper(run: Path, edit) -> Path:
    """Apply ``edit(hparams)`` to every checkpoint's record and recompute the manifest's entry for
    meta.json, as anyone can: the checkpoints still verify."""
    for step in list_checkpoints(run):
        meta = json.loads((step / "meta.json").read_text())
        edit(meta["hparams"])
        (step / "meta.json").write_text(json.dumps(meta))
        manifest = json.loads((step / "manifest.json").read_text())
        manifest["files"]["meta.json"] = {"sha256": checkpoint._sha256(step / "meta.json"),
                                          "size": (step / "meta.json").stat().st_size}
        (step / "manifest.json").write_text(json.dumps(manifest))
        checkpoint.verify_checkpoint(step)
    return run


def _record_model(class_path, init_args):
    def edit(hparams):
        hparams["model"] = {"class_path": class_path, "init_args": init_args}
    return edit


def _params(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# --- the record names code the caller did not choose --------------------------------------------

HOSTILE = {
    "os.system": lambda marker, victim: {"command": f"touch {marker}"},
    "subprocess.run": lambda marker, victim: {"args": ["touch", str(marker)]},
    "pathlib.Path.touch": lambda marker, victim: {"self": str(marker)},
    "shutil.rmtree": lambda marker, victim: {"path": str(victim)},
}


@pytest.mark.parametrize("class_path", sorted(HOSTILE))
def test_a_record_naming_a_hostile_callable_runs_nothing_and_is_one_error(run_folder, tmp_path, class_path):
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("still here")
    _tamper(run_folder, _record_model(class_path, HOSTILE[class_path](marker, victim)))
    for which in ("best", "last"):
        with pytest.raises(CheckpointError) as exc:
            jaxlight.load_from_checkpoint(run_folder, which=which)
        text = _one_line(exc)
        assert class_path in text and "not an nnx.Module subclass" in text, text
        assert "model=YourClass" in text and "trust_code=True" in text, text
    with pytest.raises(CheckpointError, match="not an nnx.Module subclass"):
        jaxlight.load_from_checkpoint(run_folder, trust_code=True)  # (trust never makes a function a model)
    assert not marker.exists()
    assert (victim / "keep.txt").read_text() == "still here"


def _plant(folder: Path, name: str, marker: Path) -> None:
    """A module in ``folder`` that writes ``marker`` when imported and defines a model whose
    arrays fit the checkpoint (a subclass of the installed Net)."""
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        from userpkg.nets import Net as _Installed

        class Net(_Installed):
            '''The checkpoint's own copy of the model.'''
    """))


@pytest.fixture
def planted_name(request):
    name = "planted_" + "".join(c if c.isalnum() else "_" for c in request.node.name.split("[")[-1]) + "_mod"
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("where", ["run folder", "step folder", "run folder as cwd on sys.path",
                                   "run folder on sys.path"])
def test_a_module_saved_with_the_checkpoint_is_never_imported_without_trust(run_folder, tmp_path, monkeypatch,
                                                                               planted_name, where):
    from userpkg.nets import Net

    marker = tmp_path / "marker"
    steps = list_checkpoints(run_folder)
    home = steps[-1] if where == "step folder" else run_folder
    if where == "step folder":
        steps = steps[-1:]
        for old in list_checkpoints(run_folder)[:-1]:
            shutil.rmtree(old)
    _plant(home, planted_name, marker)
    _tamper(run_folder, _record_model(f"{planted_name}.Net", {"width": 8}))
    if where == "run folder as cwd on sys.path":
        monkeypatch.chdir(run_folder)
        monkeypatch.syspath_prepend("")  # (python -c, the REPL, python -m: the working directory first)
    elif where == "run folder on sys.path":
        monkeypatch.syspath_prepend(str(run_folder))
    with pytest.raises(CheckpointError) as exc:
        jaxlight.load_from_checkpoint(run_folder, which="last")
    text = _one_line(exc)
    assert f"{planted_name}.Net" in text and "code saved with the checkpoint" in text, text
    assert "model=YourClass" in text and "trust_code=True" in text, text
    assert not marker.exists() and planted_name not in sys.modules
    # trust_code=True imports and uses it; model=Net uses the caller's class without importing it.
    trusted, _ = jaxlight.load_from_checkpoint(run_folder, which="last", trust_code=True)
    assert marker.exists() and type(trusted).__module__ == planted_name
    marker.unlink()
    sys.modules.pop(planted_name, None)
    mine, record = jaxlight.load_from_checkpoint(run_folder, which="last", model=Net)
    assert type(mine) is Net and not marker.exists() and planted_name not in sys.modules
    assert record["model"]["class_path"] == f"{planted_name}.Net"
    for name, value in _params(mine).items():
        np.testing.assert_array_equal(_params(trusted)[name], value)


def test_model_net_takes_the_recorded_arguments_and_imports_nothing(run_folder, tmp_path, planted_name):
    from userpkg.nets import Net

    reference, _ = jaxlight.load_from_checkpoint(run_folder, which="best")
    marker = tmp_path / "marker"
    _plant(run_folder, planted_name, marker)
    _tamper(run_folder, _record_model(f"{planted_name}.Net", {"width": 8, "dropout": 0.2}))
    model, _ = jaxlight.load_from_checkpoint(run_folder, which="best", model=Net)
    assert type(model) is Net and not marker.exists()
    assert model.hparams["init_args"]["width"] == 8
    for name, value in _params(reference).items():
        np.testing.assert_array_equal(_params(model)[name], value)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(reference(x)))
    with pytest.raises(TypeError, match="nnx.Module class"):
        jaxlight.load_from_checkpoint(run_folder, model=Net(8, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("init_args, expected", [
    ({"width": "16"}, "width: expected int, got '16' (a str)"),
    ({"width": 8, "dropout": "0.2"}, "dropout: expected float, got '0.2'"),
    ({"width": True}, "width: expected int, got True"),
    ({"width": 8, "depth": 3}, "depth: not an argument of Net"),
    ({}, "width: missing"),
    (["width", 8], "expected a mapping"),
])
def test_wrongly_typed_recorded_arguments_are_one_checkpoint_error(run_folder, init_args, expected):
    from userpkg.nets import Net

    _tamper(run_folder, _record_model("userpkg.nets.Net", init_args))
    for model in (None, Net):
        with pytest.raises(CheckpointError) as exc:
            jaxlight.load_from_checkpoint(run_folder, which="last", model=model)
        assert expected in _one_line(exc) and "init_args" in str(exc.value)


def test_a_tampered_seed_or_a_constructor_that_refuses_is_one_checkpoint_error(run_folder):
    def seed(hparams):
        hparams["seed"] = "zero"
    _tamper(run_folder, seed)
    with pytest.raises(CheckpointError, match="recorded seed is 'zero'"):
        jaxlight.load_from_checkpoint(run_folder, which="last")

    def negative(hparams):
        hparams["seed"] = 0
        hparams["model"]["init_args"]["width"] = -3
    _tamper(run_folder, negative)
    with pytest.raises(CheckpointError) as exc:
        jaxlight.load_from_checkpoint(run_folder, which="last")
    assert "userpkg.nets.Net(**recorded init_args) raised" in _one_line(exc)


def test_an_installed_model_still_loads_without_trust(run_folder):
    model, record = jaxlight.load_from_checkpoint(run_folder, which="last")
    assert type(model).__module__ == "userpkg.nets" and record["model"]["init_args"]["width"] == 8


# --- the command line: jaxlight test|validate|predict --ckpt_path [--trust_code] ----------------

RUN = {
    "seed": 0,
    "model": {"class_path": "userpkg.nets.Net", "init_args": {"width": 8, "dropout": 0.2}},
    "loss": "userpkg.nets.loss_fn",
    "data": {"class_path": "userpkg.data.blobs", "init_args": {}},
    "optimizer": {"class_path": "optax.adam", "init_args": {"learning_rate": 1.0e-2}},
    "trainer": {"max_epochs": 2, "batch_size": 64, "logging": {"enable_progress_bar": False}},
}


def _cli(capsys, *argv):
    from jaxlight.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A ``jaxlight fit`` run folder: its checkpoints record the whole config."""
    import yaml

    from jaxlight.cli import main

    home = tmp_path_factory.mktemp("fitted")
    (home / "run.yaml").write_text(yaml.safe_dump(RUN))
    assert main(["fit", "--config", str(home / "run.yaml"), "--trainer.checkpoint.dirpath", str(home / "ckpt"),
                 "--trainer.out", str(home / "out")]) == 0
    return home


@pytest.fixture
def fit_folder(fitted, tmp_path):
    return Path(shutil.copytree(fitted / "ckpt", tmp_path / "ckpt"))


def test_test_validate_predict_take_the_run_from_the_checkpoints_record(fit_folder, fitted, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "test", "--config", str(fitted / "run.yaml"), "--ckpt_path", str(fit_folder),
                             "--trainer.out", str(tmp_path / "mine"))
    assert code == 0, err
    yours = json.loads((tmp_path / "mine" / "test_metrics.json").read_text())
    for command, written in (("test", "test_metrics.json"), ("validate", "validate_metrics.json"),
                             ("predict", "predictions.npz")):
        code, stdout, err = _cli(capsys, command, "--ckpt_path", str(fit_folder), "--trainer.out", str(out))
        assert code == 0, err
        assert "the run's config recorded in" in stdout and (out / written).exists()
    recorded = json.loads((out / "test_metrics.json").read_text())
    assert recorded["test_loss"] == yours["test_loss"] and recorded["test_accuracy"] == yours["test_accuracy"]


def _tamper_run(folder, part, spec):
    def edit(hparams):
        if part == "callbacks":
            hparams["trainer"]["callbacks"] = [spec]
        elif part == "init":
            hparams["init"] = {"*": spec}
        elif part == "learning_rate":
            hparams["optimizer"]["init_args"]["learning_rate"] = spec
        else:
            hparams[part] = spec
    return _tamper(folder, edit)


@pytest.mark.parametrize("part", ["model", "data", "optimizer", "loss", "callbacks", "init", "learning_rate"])
@pytest.mark.parametrize("class_path", ["subprocess.run", "shutil.rmtree", "os.system"])
def test_a_tampered_record_runs_nothing_through_the_command_line(fit_folder, tmp_path, capsys, part, class_path):
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.mkdir()
    args = {"subprocess.run": {"args": ["touch", str(marker)]}, "shutil.rmtree": {"path": str(victim)},
            "os.system": {"command": f"touch {marker}"}}[class_path]
    spec = class_path if part == "loss" else {"class_path": class_path, "init_args": args}
    _tamper_run(fit_folder, part, spec)
    for command in ("test", "validate", "predict"):
        code, _, err = _cli(capsys, command, "--ckpt_path", str(fit_folder), "--trainer.out", str(tmp_path / "o"))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "error:" in lines[0], err
        assert class_path in lines[0] and "--trust_code" in lines[0] and "--config" in lines[0], lines[0]
    assert not marker.exists() and victim.is_dir()


def test_a_record_naming_an_unannotated_data_function_needs_trust_code(fit_folder, tmp_path, capsys, planted_name):
    marker = tmp_path / "marker"
    (fit_folder / f"{planted_name}.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        from userpkg.data import blobs as _blobs

        def blobs():
            return _blobs()
    """))
    _tamper_run(fit_folder, "data", {"class_path": f"{planted_name}.blobs", "init_args": {}})
    code, _, err = _cli(capsys, "test", "--ckpt_path", str(fit_folder), "--trainer.out", str(tmp_path / "o"))
    assert code == 2 and "code saved with the checkpoint" in err and "--trust_code" in err, err
    assert not marker.exists() and planted_name not in sys.modules
    code, stdout, err = _cli(capsys, "test", "--ckpt_path", str(fit_folder), "--trust_code", "--trainer.out",
                             str(tmp_path / "o"))
    assert code == 0, err
    assert marker.exists() and "test_accuracy" in stdout


def test_trust_code_finds_a_model_module_saved_beside_the_checkpoint(fit_folder, tmp_path, capsys, planted_name):
    import yaml

    marker = tmp_path / "marker"
    _plant(fit_folder, planted_name, marker)
    _tamper_run(fit_folder, "model", {"class_path": f"{planted_name}.Net", "init_args": {"width": 8}})
    config = {**RUN, "model": {"class_path": f"{planted_name}.Net", "init_args": {"width": 8}}}
    (fit_folder / "config.yaml").write_text(yaml.safe_dump(config))  # (a snippet saved with the checkpoint)
    for argv in (["--ckpt_path", str(fit_folder)], ["--config", str(fit_folder / "config.yaml"), "--ckpt_path",
                                                    str(fit_folder)]):
        code, _, err = _cli(capsys, "test", *argv, "--trainer.out", str(tmp_path / "o"))
        assert code == 2 and f"{planted_name}" in err, err
        assert not marker.exists() and planted_name not in sys.modules
        code, stdout, err = _cli(capsys, "test", *argv, "--trust_code", "--trainer.out", str(tmp_path / "o"))
        assert code == 0 and "test_accuracy" in stdout, err
        assert marker.exists()
        marker.unlink()
        sys.modules.pop(planted_name, None)


@pytest.mark.parametrize("part", ["callbacks", "loss", "model"])
def test_a_module_in_the_working_checkpoint_folder_is_not_imported_by_the_command_line(
        fit_folder, tmp_path, capsys, monkeypatch, planted_name, part):
    marker = tmp_path / "marker"
    _plant(fit_folder, planted_name, marker)
    spec = {"callbacks": {"class_path": f"{planted_name}.Net", "init_args": {}}, "loss": f"{planted_name}.Net",
            "model": {"class_path": f"{planted_name}.Net", "init_args": {"width": 8}}}[part]
    _tamper_run(fit_folder, part, spec)
    monkeypatch.chdir(fit_folder)
    monkeypatch.syspath_prepend("")  # (python -m jaxlight.cli: the working directory first on sys.path)
    code, _, err = _cli(capsys, "test", "--ckpt_path", ".", "--trainer.out", str(tmp_path / "o"))
    assert code == 2 and planted_name in err and "--trust_code" in err, err
    assert not marker.exists() and planted_name not in sys.modules


# --- a load while a fit saves into the same folder --------------------------------------------------

def test_a_save_in_flight_is_skipped_with_a_message_saying_so(run_folder):
    from jaxlight.checkpoint import lock_folder

    newest = list_checkpoints(run_folder)[-1]
    in_flight = run_folder / "step_000000099"
    shutil.copytree(newest, in_flight)
    (in_flight / "manifest.json").unlink()  # (arrays and meta written, the manifest not yet)
    with lock_folder(run_folder):  # (the fit that is writing it holds the folder)
        with pytest.warns(checkpoint.CheckpointWarning) as said:
            model, _ = jaxlight.load_from_checkpoint(run_folder, which="last")
    text = " ".join(str(w.message) for w in said)
    assert f"skipping {in_flight}: a fit is saving into {run_folder}" in text and "being written" in text, text
    assert "corrupt" not in text
    reference, _ = jaxlight.load_from_checkpoint(newest)
    for name, value in _params(reference).items():
        np.testing.assert_array_equal(_params(model)[name], value)


def test_a_checkpoint_pruned_while_it_is_loaded_is_tried_again_not_a_raw_error(run_folder, monkeypatch):
    from jaxlight.checkpoint import lock_folder

    steps = list_checkpoints(run_folder)
    real = checkpoint._load_recorded
    calls = []

    def pruned_meanwhile(folder, model, trust_code):
        calls.append(folder)
        if len(calls) == 1:
            shutil.rmtree(folder)  # (the running fit's pruning, between the pick and the read)
        return real(folder, model, trust_code)

    monkeypatch.setattr(checkpoint, "_load_recorded", pruned_meanwhile)
    with lock_folder(run_folder):
        with pytest.warns(checkpoint.CheckpointWarning, match="changed while it was loaded"):
            model, _ = jaxlight.load_from_checkpoint(run_folder, which="last")
    assert calls == [steps[-1], steps[-2]]
    calls.clear()
    shutil.copytree(steps[-2], steps[-1])  # (no fit holds the folder now: an error, one line, no retry)
    with pytest.raises(CheckpointError) as exc:
        jaxlight.load_from_checkpoint(run_folder, which="last")
    assert "FileNotFoundError" not in _one_line(exc) and len(calls) == 1


RACING_FIT = """
import sys
from jaxlight import build_model, create_train_state, optim, tasks
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.data.synthetic import make_regression
from jaxlight.trainer import Trainer, TrainerConfig
data = make_regression(n_train=256, n_test=64)
state = create_train_state(build_model("linear", 0), optim.sgd(0.05), tasks.regression(), seed=0)
print("fitting", flush=True)
Trainer(TrainerConfig(max_epochs=100000, batch_size=64, logging={"enable_progress_bar": False}, steps_per_execution=1),
        callbacks=[ModelCheckpoint(sys.argv[1], every_n_steps=1, monitor="loss")]).fit(state, data.train)
"""


@pytest.mark.integration
def test_loads_racing_a_fit_that_saves_and_prunes_in_the_same_folder_all_succeed(tmp_path):
    """A fit in another process saves every step and prunes all but the last two and the best; this
    process loads "last" and "best" from the folder meanwhile, about a hundred times."""
    import os
    import subprocess
    import time
    import warnings

    from _support import ROOT

    folder = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    fit = subprocess.Popen([sys.executable, "-c", RACING_FIT, str(folder)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert fit.stdout.readline().strip() == "fitting"
        deadline = time.monotonic() + 120  # (two epochs of 4 steps: "best" has a monitored loss to go by)
        while not [p for p in list_checkpoints(folder) if int(p.name[5:]) >= 8] and time.monotonic() < deadline:
            time.sleep(0.2)
        loaded, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 15:
            for which in ("last", "best"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", checkpoint.CheckpointWarning)
                    model, _ = jaxlight.load_from_checkpoint(folder, which=which)
                assert type(model).__name__ == "LinearRegression"
                loaded += 1
        assert fit.poll() is None and loaded >= 20
    finally:
        fit.kill()
        fit.wait()
