"""A user's model from a config file: ``jaxlight fit|validate|test|predict``, in-process.

The user package is ``tests/userpkg`` (a model class with Dropout and BatchNorm, a loss, a data
function of 320 points): code jaxlight has never seen, named by class path. References are
independent of the config machinery: the same run written in Python, hand-written schedules,
numpy's orthogonality check, a fresh process.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

import jaxlight
from jaxlight.checkpoint import CheckpointError, list_checkpoints, load_model
from jaxlight.cli import main
from _support import ROOT

RUN = {
    "seed": 0,
    "model": {"class_path": "userpkg.nets.Net", "init_args": {"width": 16, "dropout": 0.2}},
    "loss": "userpkg.nets.loss_fn",
    "data": {"class_path": "userpkg.data.blobs", "init_args": {}},
    "optimizer": {"class_path": "optax.adamw", "init_args": {"learning_rate": 1.0e-2, "weight_decay": 1.0e-4}},
    "trainer": {"max_epochs": 3, "batch_size": 32, "logging": {"enable_progress_bar": False}},
}


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _params(folder):
    """The parameters of a checkpoint folder's newest checkpoint, as numpy, by path."""
    model, _ = jaxlight.load_from_checkpoint(folder, which="last")
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture
def run_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return _write(tmp_path / "run.yaml", RUN)


def test_fit_from_a_yaml_file_and_from_flags_alone_train_the_same_parameters(run_yaml, tmp_path, capsys):
    code, out, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "a", "--trainer.out", "ra")
    assert code == 0, err
    assert "epoch 3/3" in out and "test_accuracy" in out
    flags = ["fit", "--model", "userpkg.nets.Net", "--model.init_args.width", "16", "--model.init_args.dropout", "0.2",
             "--loss", "userpkg.nets.loss_fn", "--data", "userpkg.data.blobs", "--optimizer", "optax.adamw",
             "--optimizer.init_args.learning_rate", "0.01", "--optimizer.init_args.weight_decay", "0.0001",
             "--trainer.max_epochs", "3", "--trainer.batch_size", "32", "--trainer.logging.enable_progress_bar", "false",
             "--trainer.checkpoint.dirpath", "b", "--trainer.out", "rb"]
    code, _, err = _run(capsys, *flags)
    assert code == 0, err
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a.keys() == b.keys() and {"backbone/kernel", "head/bias"} <= a.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The same run written in Python (the reference): identical parameters.
    from userpkg.data import blobs
    from userpkg.nets import Net, loss_fn

    train, val, _ = blobs()
    state = jaxlight.create_train_state(Net(16, dropout=0.2, rngs=nnx.Rngs(0)),
                                        optax.adamw(1e-2, weight_decay=1e-4), loss_fn, seed=0)
    trainer = jaxlight.Trainer(jaxlight.TrainerConfig(max_epochs=3, batch_size=32,
                                                      logging={"enable_progress_bar": False}))
    state = trainer.fit(state, train, val)
    python = {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(state.params)}
    for k in a:
        np.testing.assert_array_equal(a[k], python[k], err_msg=k)
    saved = yaml.safe_load((tmp_path / "ra" / "config.yaml").read_text())
    assert saved["model"] == {"class_path": "userpkg.nets.Net",
                              "init_args": {"width": 16, "in_features": 8, "dropout": 0.2, "num_classes": 3}}
    metrics = json.loads((tmp_path / "ra" / "metrics.json").read_text())
    assert len(metrics["history"]) == 3 and 0.0 <= metrics["test_accuracy"] <= 1.0


def test_print_config_spells_out_every_default_and_writes_nothing(run_yaml, tmp_path, capsys):
    overrides = ["--model.init_args.width", "12", "--trainer.max_epochs", "2", "--trainer.checkpoint.dirpath", "a"]
    code, printed, err = _run(capsys, "fit", "--config", str(run_yaml), *overrides, "--print_config")
    assert code == 0 and err == ""
    assert not (tmp_path / "a").exists() and not (tmp_path / "runs").exists()  # printing writes nothing
    config = yaml.safe_load(printed)
    assert list(config) == ["seed", "model", "init", "loss", "data", "optimizer", "trainer"]
    assert config["model"]["init_args"] == {"width": 12, "in_features": 8, "dropout": 0.2, "num_classes": 3}
    assert config["trainer"]["max_epochs"] == 2 and config["trainer"]["batch_size"] == 32
    assert config["optimizer"]["init_args"]["b1"] == 0.9  # defaults are spelled out


@pytest.mark.slow  # fast counterparts: the test above (what is printed) and the yaml/flags/Python test (same parameters)
def test_print_config_output_rerun_gives_bitwise_the_same_parameters(run_yaml, tmp_path, capsys):
    overrides = ["--model.init_args.width", "12", "--trainer.max_epochs", "2", "--trainer.checkpoint.dirpath", "a"]
    code, printed, err = _run(capsys, "fit", "--config", str(run_yaml), *overrides, "--print_config")
    assert code == 0 and err == ""
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), *overrides)
    assert code == 0, err
    (tmp_path / "printed.yaml").write_text(printed)
    code, _, err = _run(capsys, "fit", "--config", "printed.yaml", "--trainer.checkpoint.dirpath", "b")
    assert code == 0, err
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a["backbone/kernel"].shape == (8, 12)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


FRESH = """
import sys, json, numpy as np
import jaxlight
model, config = jaxlight.load_from_checkpoint(sys.argv[1], which="best")
from userpkg.data import blobs
x = blobs()[2].data["features"]
np.save(sys.argv[2], np.asarray(model(x)))
print(json.dumps({"class": type(model).__name__, "deterministic": model.drop.deterministic,
                  "bn": model.bn.use_running_average, "model": config["model"]}))
"""


@pytest.mark.integration
def test_the_best_checkpoint_reloads_in_a_fresh_process_and_predicts_as_in_training(run_yaml, tmp_path, capsys):
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "ckpt",
                        "--trainer.checkpoint.monitor", "val_accuracy", "--trainer.checkpoint.mode", "max")
    assert code == 0, err
    meta = json.loads((list_checkpoints(tmp_path / "ckpt")[-1] / "meta.json").read_text())
    scores = {int(k): v for k, v in meta["callbacks"]["ModelCheckpoint"]["scores"].items()}
    best = max(scores, key=lambda s: (scores[s], -s))
    assert meta["hparams"]["model"]["class_path"] == "userpkg.nets.Net"
    assert {"jax", "flax", "optax"} <= set(meta["hparams"]["versions"])
    assert "userpkg.data.blobs" in meta["hparams"]["class_paths"]

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "ckpt"), str(tmp_path / "fresh.npy")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"class": "Net", "deterministic": True, "bn": True,
                    "model": {"class_path": "userpkg.nets.Net",
                              "init_args": {"dropout": 0.2, "in_features": 8, "num_classes": 3, "width": 16}}}
    # In training, the same best checkpoint through Trainer.predict (jitted, padded batches).
    code, _, err = _run(capsys, "predict", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "ckpt",
                        "--trainer.checkpoint.monitor", "val_accuracy", "--trainer.checkpoint.mode", "max", "--ckpt_path", "best")
    assert code == 0, err
    predicted = np.load(tmp_path / "runs" / "net" / "predictions.npz")["outputs"]
    fresh = np.load(tmp_path / "fresh.npy")
    np.testing.assert_allclose(fresh, predicted, rtol=1e-6, atol=1e-6)
    # The same module call in this process on load_model's result: bit for bit.
    from userpkg.nets import Net
    from userpkg.data import blobs

    model = load_model(tmp_path / "ckpt" / f"step_{best:09d}", Net(16, rngs=nnx.Rngs(5)))
    np.testing.assert_array_equal(np.asarray(model(blobs()[2].data["features"])), fresh)


def test_validate_test_predict_take_best_last_and_a_path(run_yaml, tmp_path, capsys):
    assert _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "ckpt")[0] == 0
    results = {}
    for ckpt in ("best", "last", str(list_checkpoints(tmp_path / "ckpt")[0])):
        code, out, err = _run(capsys, "test", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "ckpt",
                              "--ckpt_path", ckpt)
        assert code == 0, err
        results[ckpt] = json.loads((tmp_path / "runs" / "net" / "test_metrics.json").read_text())
    assert results["last"]["ckpt_path"].endswith("step_000000018")
    # The best by val_loss is one of the kept checkpoints; the path given is evaluated as given.
    assert results[str(list_checkpoints(tmp_path / "ckpt")[0])]["ckpt_path"].endswith(
        list_checkpoints(tmp_path / "ckpt")[0].name)
    code, out, err = _run(capsys, "validate", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "ckpt",
                          "--ckpt_path", "last")
    assert code == 0 and "val_loss" in out, err


# -- bad configs: one line naming the key, exit code 2, nothing written ---------------------------

BAD = [
    ("unknown class path", ["--model.class_path", "userpkg.nets.Nett"],
     "model.class_path: unknown class path: cannot import 'userpkg.nets.Nett': userpkg.nets has no attribute 'Nett'"),
    ("unknown module", ["--data", "userpkg.nodata.blobs"],
     "data.class_path: unknown class path: cannot import 'userpkg.nodata.blobs'"),
    ("missing init argument", [{"model": {"class_path": "userpkg.nets.Net"}}],
     "model.init_args.width: missing init argument (required by userpkg.nets.Net"),
    ("wrong type", ["--model.init_args.width", "wide"], "model.init_args.width: expected int, got wide"),
    ("wrong type in the trainer", ["--trainer.max_epochs", "1.5"], "trainer.max_epochs: expected int, got 1.5"),
    ("wrong type for an optional", ["--trainer.max_steps", "many"], "trainer.max_steps: expected int or null, got many"),
    ("unknown key", ["--model.init_args.widht", "3"], "model.init_args.widht: unknown key"),
    ("optimizer that is not optax", [{"optimizer": {"class_path": "userpkg.nets.not_an_optimizer",
                                                    "init_args": {"learning_rate": 0.1}}}],
     "optimizer.class_path: userpkg.nets.not_an_optimizer(...) returned a dict, not an optax transformation"),
    ("optimizer annotated otherwise", ["--optimizer", "optax.softmax_cross_entropy"],
     "optimizer.class_path: optax.softmax_cross_entropy does not return an optax transformation"),
    ("optimizer class that is not optax", [{"optimizer": {"class_path": "userpkg.nets.NotAModule"}}],
     "optimizer.class_path: userpkg.nets.NotAModule is a class that is not an optax transformation"),
    ("learning rate that is no number", ["--optimizer.init_args.learning_rate", "fast"],
     "optimizer.init_args.learning_rate: expected a number or {class_path, init_args}"),
    ("model that is not an nnx.Module", ["--model", "userpkg.nets.NotAModule"],
     "model.class_path: userpkg.nets.NotAModule is a class that is not a flax.nnx.Module subclass"),
    ("function as a model", ["--model", "userpkg.data.blobs"],
     "model.class_path: userpkg.data.blobs is a function that is not a flax.nnx.Module subclass"),
    ("unknown task", ["--loss", "multiclas"], "loss: 'multiclas' is not a built-in task"),
    ("bad trainer value", ["--trainer.max_epochs", "0"], "trainer.max_epochs: must be an int >= 1"),
    ("freeze pattern matching nothing", ["--trainer.freeze", "[backbon.*]"],
     "trainer.freeze: pattern 'backbon.*' matches no parameter of Net"),
    ("missing config file", ["--config", "nope.yaml"], "--config nope.yaml: no such file"),
    ("unknown part", [{"modle": {"class_path": "userpkg.nets.Net"}}],
     "modle: unknown part (expected seed, model, init, loss, data, optimizer, trainer)"),
    ("data function that raises", ["--data.init_args.n_train", "-5"],
     "data: userpkg.data.blobs(...) raised ValueError: negative dimensions are not allowed"),
    ("data that are bare arrays", [{"data": {"class_path": "userpkg.data.arrays"}}],
     "data: userpkg.data.arrays(...) returned a bare array as train; expected an ArrayDataset"),
    ("loss that does not fit the data", ["--loss", "multiclass"],
     "training set: the multiclass task takes a batch dict with keys 'x' and 'y'"),
]


@pytest.mark.parametrize("argv, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_config_gets_one_line_naming_the_key_and_exit_code_2(run_yaml, tmp_path, capsys, argv, expected):
    config = dict(RUN, trainer={**RUN["trainer"], "checkpoint": {"dirpath": "ckpt"}, "logging": {"logger": "csv"}})
    if argv and isinstance(argv[0], dict):  # a change to the config file itself
        config.update(argv[0])
        argv = []
    _write(run_yaml, config)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, "fit", "--config", str(run_yaml), *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"jaxlight: error: {expected}"), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# -- hostile config files: one line, exit 2, in seconds and bounded memory ----------------------------


def _laughs(levels: int = 9, flow: bool = False) -> str:
    """A "billion laughs" YAML document: each level 9 aliases of the one before (9**levels values)."""
    names = "abcdefghijklmnop"[:levels]
    if flow:
        parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        parts += [f"&{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip(names, names[1:])]
        return "[" + ", ".join(parts) + "]"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip(names, names[1:])]
    return "\n".join(lines + [f"model: *{names[-1]}"]) + "\n"


HOSTILE = {
    "alias bomb": (lambda: _laughs().encode(), "refused: its aliases expand to more than 100000 values"),
    "5000-deep nesting": (lambda: ("model: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
                          "refused: nested deeper than 100 levels"),
    "binary file": (lambda: bytes(range(256)) * 4, "a binary file, not YAML text (byte 0x80 at offset 128"),
    "NUL bytes": (lambda: b"seed: 0\n\0\0\0", "a binary file, not YAML text (a NUL byte at offset 8)"),
    "empty file": (lambda: b"", "the file holds no config (it is empty or only comments)"),
    "only comments": (lambda: b"# nothing yet\n", "the file holds no config"),
    "over 1 MiB": (lambda: b"seed: 0\n" + b"# padding\n" * 110_000, "more than 1 MiB; a config file is at most"),
    "not a mapping": (lambda: b"- 1\n- 2\n", "expected a mapping of the parts"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("print_config", [False, True], ids=["fit", "print_config"])
def test_a_hostile_config_file_is_one_line_naming_it_in_bounded_time_and_memory(tmp_path, capsys, case,
                                                                                  print_config):
    import time
    import tracemalloc

    content, expected = HOSTILE[case]
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content())
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        code, out, err = _run(capsys, "fit", "--config", str(path), *(["--print_config"] if print_config else []))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - t0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and not out, err[-2000:]
    assert lines[0] == f"jaxlight: error: --config {path}: " + lines[0].split(f"--config {path}: ", 1)[1]
    assert expected in lines[0], lines[0]
    assert peak < 30 * 2**20 and seconds < 30, (peak, seconds)


@pytest.mark.parametrize("flag", ["--loss", "--trainer.callbacks", "--model.init_args.width", "--model"])
def test_an_alias_bomb_in_a_flag_value_is_refused_naming_the_flag(run_yaml, capsys, flag):
    code, out, err = _run(capsys, "fit", "--config", str(run_yaml), flag, _laughs(8, flow=True))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert f"error: {flag}: refused: its aliases expand" in lines[0], lines[0]


PEAK = """
import atexit, runpy, sys
target = sys.argv.pop(1)
def peak():  # (this process's own high-water mark: VmHWM starts afresh at exec, unlike ru_maxrss)
    with open("/proc/self/status") as f:
        kib = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    with open(target, "w") as out:
        out.write(kib)
atexit.register(peak)
sys.argv[0] = "jaxlight"
runpy.run_module("jaxlight.cli", run_name="__main__")
"""


@pytest.mark.integration
def test_a_billion_laughs_config_fails_in_seconds_in_its_own_process(tmp_path):
    """The command line as a user runs it: exit 2 within the timeout, the peak memory of a process
    that has imported JAX (before the limit it ran for a minute and grew past 5 GB)."""
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_laughs())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    for extra in ([], ["--print_config"]):
        t0 = time.monotonic()
        try:
            result = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "peak"), "fit", "--config", str(path),
                                     *extra], env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("a 400-byte config ran for over a minute")
        seconds, peak_kib = time.monotonic() - t0, int((tmp_path / "peak").read_text())
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().count("\n") == 0 and "refused: its aliases expand" in result.stderr
        assert peak_kib < 1_000_000 and seconds < 60, (peak_kib, seconds)  # (under 1 GB)


def test_a_logger_whose_package_is_missing_fails_when_built_naming_the_extra(run_yaml, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX -> ImportError
    with pytest.raises(ImportError, match=r'pip install "jaxlight\[tensorboard\]"'):
        jaxlight.loggers.TensorBoardLogger(tmp_path / "tb")
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.logging.logger", "tensorboard")
    assert code == 2 and err.strip().splitlines() == [
        'jaxlight: error: trainer.logging.logger: TensorBoardLogger needs the tensorboardX package: '
        'pip install "jaxlight[tensorboard]"']
    assert not (tmp_path / "runs").exists()


def test_help_shows_the_named_classes_fields_with_defaults_and_docstrings(run_yaml, capsys):
    code, out, _ = _run(capsys, "fit", "--config", str(run_yaml), "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "--model.init_args.width WIDTH hidden units of the backbone. (required, type: int)" in flat
    assert "--model.init_args.dropout DROPOUT the dropout rate after the backbone. (type: float, default: 0.2)" in flat
    assert "--data.init_args.n_train N_TRAIN training examples. (type: int, default: 192)" in flat
    assert "--trainer.max_epochs MAX_EPOCHS epochs to run" in flat
    assert "--optimizer.init_args.weight_decay" in flat


# -- the built-in recipes ------------------------------------------------------------------------


def test_the_builtin_configs_ship_with_the_package_and_hold_their_recipes(capsys):
    from jaxlight.config import BUILTIN_CONFIGS, CONFIG_DIR
    from jaxlight.recipes import RECIPES

    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(BUILTIN_CONFIGS) == sorted(RECIPES)
    for name in BUILTIN_CONFIGS:  # every one parses and builds (no data loaded)
        code, printed, err = _run(capsys, "fit", "--config", name, "--print_config")
        assert code == 0, (name, err)
        config = yaml.safe_load(printed)
        assert config["trainer"]["max_epochs"] == RECIPES[name].epochs
        assert config["trainer"]["batch_size"] == RECIPES[name].batch_size
        assert config["optimizer"]["init_args"]["lr"] == RECIPES[name].lr


@pytest.mark.slow  # fast counterparts: the test above (the recipes) and the yaml/flags/Python test (same parameters)
def test_a_builtin_config_trains_as_jaxlight_train(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "linear", "--epochs", "3", "--out", "t", "--ckpt-dir", "tc"]) == 0
    code, _, err = _run(capsys, "fit", "--config", "linear", "--trainer.max_epochs", "3", "--trainer.out", "f",
                        "--trainer.checkpoint.dirpath", "fc")
    assert code == 0, err
    trained = json.loads((tmp_path / "t" / "metrics.json").read_text())
    fitted = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert [h["loss"] for h in fitted["history"]] == [h["loss"] for h in trained["history"]]
    assert fitted["test_loss"] == trained["test_loss"]
    a, _ = jaxlight.load_from_checkpoint(tmp_path / "tc", which="last")  # the built-in models record themselves
    b, config = jaxlight.load_from_checkpoint(tmp_path / "fc", which="last")
    assert type(a) is type(b) is jaxlight.models.LinearRegression and config["loss"] == "regression"
    np.testing.assert_array_equal(np.asarray(a.linear.kernel[...]), np.asarray(b.linear.kernel[...]))


# -- hyperparameters from Python, and checkpoints without them ----------------------------------


def test_save_hyperparameters_records_the_constructor_arguments_in_one_line():
    from userpkg.nets import Net

    model = Net(24, dropout=0.5, rngs=nnx.Rngs(0))
    assert model.hparams == {"class_path": "userpkg.nets.Net",
                             "init_args": {"width": 24, "in_features": 8, "dropout": 0.5, "num_classes": 3}}
    with pytest.raises(TypeError, match="read-only"):
        model.hparams["init_args"] = {}


def test_a_python_run_records_the_model_and_reloads_without_model_code(tmp_path):
    from userpkg.data import blobs
    from userpkg.nets import Net, Unrecorded, loss_fn

    train, val, test = blobs()
    for model, folder in ((Net(8, rngs=nnx.Rngs(1)), tmp_path / "rec"), (Unrecorded(rngs=nnx.Rngs(1)), tmp_path / "unrec")):
        state = jaxlight.create_train_state(model, optax.adam(1e-2), loss_fn, seed=0)
        trainer = jaxlight.Trainer(jaxlight.TrainerConfig(max_epochs=2, batch_size=64,
                                                          logging={"enable_progress_bar": False}),
                                   callbacks=[jaxlight.callbacks.ModelCheckpoint(folder, monitor="val_loss")])
        state = trainer.fit(state, train, val)
    loaded, config = jaxlight.load_from_checkpoint(tmp_path / "rec", which="last")
    assert config["model"] == {"class_path": "userpkg.nets.Net",
                               "init_args": {"width": 8, "in_features": 8, "dropout": 0.2, "num_classes": 3}}
    assert config["loss"] == "userpkg.nets.loss_fn" and "optax" in config["versions"]
    with pytest.raises(CheckpointError, match="records no model to rebuild .*save_hyperparameters"):
        jaxlight.load_from_checkpoint(tmp_path / "unrec")
    # Trainer.test with ckpt_path="best" evaluates the best checkpoint's weights.
    best = trainer.callbacks[0].best_model_path
    expected = trainer.test(state.replace(), test, ckpt_path=best)
    assert trainer.test(state, test, ckpt_path="best") == expected
    model = load_model(tmp_path / "unrec", Unrecorded(rngs=nnx.Rngs(9)), which="best")
    assert model.head.kernel[...].shape == (16, 3)


def test_load_model_returns_eval_mode_and_takes_which(tmp_path):
    from userpkg.data import blobs
    from userpkg.nets import Net, loss_fn

    train, val, _ = blobs()
    state = jaxlight.create_train_state(Net(8, rngs=nnx.Rngs(1)), optax.adam(1e-2), loss_fn, seed=0)
    # mode "max" on val_loss: the first checkpoint is the best, the newest is not.
    cb = jaxlight.callbacks.ModelCheckpoint(tmp_path, monitor="val_loss", mode="max")
    trainer = jaxlight.Trainer(jaxlight.TrainerConfig(max_epochs=3, batch_size=64,
                                                      logging={"enable_progress_bar": False}),
                               callbacks=[cb])
    trainer.fit(state, train, val)
    assert cb.best_model_path.name == "step_000000003"
    model = load_model(tmp_path, Net(8, rngs=nnx.Rngs(7)), which="best")
    assert model.drop.deterministic and model.bn.use_running_average
    ref = load_model(tmp_path / "step_000000003", Net(8, rngs=nnx.Rngs(3)))
    last = load_model(tmp_path, Net(8, rngs=nnx.Rngs(3)), which="last")
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), np.asarray(ref.head.kernel[...]))
    assert not np.array_equal(np.asarray(last.head.kernel[...]), np.asarray(ref.head.kernel[...]))


# -- initialisation and freezing ------------------------------------------------------------------


def test_init_patterns_from_a_config_and_from_python(run_yaml, tmp_path, capsys):
    config = dict(RUN, init={"backbone.kernel": "jax.nn.initializers.orthogonal",
                             "head.bias": {"class_path": "jax.nn.initializers.constant", "init_args": {"value": 0.5}}})
    _write(run_yaml, config)
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.max_steps", "1",
                        "--trainer.checkpoint.dirpath", "ckpt", "--optimizer.init_args.learning_rate", "1e-30",
                        "--optimizer.init_args.weight_decay", "0")
    assert code == 0, err
    model, _ = jaxlight.load_from_checkpoint(tmp_path / "ckpt", which="last")
    k = np.asarray(model.backbone.kernel[...], np.float64)  # (8, 16): orthonormal rows
    np.testing.assert_allclose(k @ k.T, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.head.bias[...]), 0.5, atol=1e-6)
    from userpkg.nets import Net

    with pytest.raises(ValueError, match="init pattern 'encoder.*' matches no parameter of Net; its parameters: "
                                         "backbone.bias, backbone.kernel"):
        jaxlight.init_params(Net(4, rngs=nnx.Rngs(0)), {"encoder.*": jax.nn.initializers.zeros})


def test_freeze_gives_frozen_parameters_no_updates_and_no_optimizer_state(run_yaml, tmp_path, capsys):
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.freeze", "[backbone.*, bn.*]",
                        "--trainer.checkpoint.dirpath", "ckpt", "--optimizer.init_args.weight_decay", "0.1")
    assert code == 0, err
    trained, _ = jaxlight.load_from_checkpoint(tmp_path / "ckpt", which="last")
    from userpkg.nets import Net

    fresh = Net(16, dropout=0.2, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(trained.backbone.kernel[...]), np.asarray(fresh.backbone.kernel[...]))
    np.testing.assert_array_equal(np.asarray(trained.bn.scale[...]), np.asarray(fresh.bn.scale[...]))
    assert not np.array_equal(np.asarray(trained.head.kernel[...]), np.asarray(fresh.head.kernel[...]))
    # The optimizer state holds Adam's two moments for the head's parameters alone.
    tx = jaxlight.freeze(optax.adamw(1e-2), ["backbone.*", "bn.*"])
    opt_state = tx.init(nnx.state(fresh, nnx.Param))
    sizes = sorted(int(a.size) for a in jax.tree.leaves(opt_state) if hasattr(a, "size") and a.ndim)
    assert sizes == sorted([16 * 3, 3] * 2)


# -- the learning rate, per optimizer update --------------------------------------------------------


@pytest.mark.parametrize("steps_per_execution", [None, pytest.param(1, marks=pytest.mark.slow)])
def test_the_learning_rate_is_logged_per_update_labelled_with_its_step(run_yaml, tmp_path, capsys, steps_per_execution):
    schedule = {"class_path": "optax.linear_schedule",
                "init_args": {"init_value": 0.0, "end_value": 0.02, "transition_steps": 10}}
    config = dict(RUN, optimizer={"class_path": "optax.adamw", "init_args": {"learning_rate": schedule}})
    config["trainer"] = {**RUN["trainer"], "max_epochs": 2, "logging": {"logger": "csv"},
                         "steps_per_execution": steps_per_execution}
    _write(run_yaml, config)
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml))
    assert code == 0, err
    import csv

    with open(tmp_path / "runs" / "net" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["lr"]]
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(1, 13))  # 6 batches an epoch, every update
    # Step s applies the rate of update s - 1 (the count before it): 0.002 * (s - 1), capped at 0.02.
    assert [float(r["lr"]) for r in rows] == pytest.approx([min(0.002 * (s - 1), 0.02) for s in steps], rel=1e-6, abs=1e-9)
    hparams = yaml.safe_load((tmp_path / "runs" / "net" / "logs" / "hparams.yaml").read_text())
    recorded = hparams["optimizer"]["init_args"]["learning_rate"]  # (with the schedule's defaults spelled out)
    assert list(hparams["optimizer"]["init_args"])[:3] == ["learning_rate", "b1", "b2"]  # adamw's order
    assert recorded["class_path"] == "optax.linear_schedule"
    assert recorded["init_args"] == {**schedule["init_args"], "transition_begin": 0}
    assert hparams["model"]["init_args"]["width"] == 16 and "flax" in hparams["versions"]


def test_the_rate_of_a_users_own_optimizer_function_is_read_from_the_optimizer(run_yaml, tmp_path, capsys):
    """The function builds warmup + cosine itself from an argument named ``peak``: the lr column
    is the rate each update applied (the schedule written out by hand), not an argument's value."""
    import csv
    import math

    config = dict(RUN, optimizer={"class_path": "userpkg.opt.warmup_cosine_adamw", "init_args": {"peak": 3e-3}})
    config["trainer"] = {**RUN["trainer"], "max_epochs": 2, "logging": {"logger": "csv"}}
    _write(run_yaml, config)
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml))
    assert code == 0, err

    def by_hand(t, peak=3e-3, warmup=3, total=12, end=1e-5):
        if t < warmup:
            return peak * t / warmup
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(t - warmup, total - warmup) / (total - warmup)))

    with open(tmp_path / "runs" / "net" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["lr"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    expected = [by_hand(s - 1) for s in range(1, 13)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert float(rows[0]["lr"]) == 0.0 and float(rows[3]["lr"]) == pytest.approx(3e-3)  # 0 -> peak -> down


def test_epoch_level_metrics_from_a_config(run_yaml, tmp_path, capsys):
    """A loss returning jaxlight.metrics values: val_f1 / train_f1 in the CSV, test_f1 and the
    test confusion matrix (the whole test set's, checked against scikit-learn) in metrics.json."""
    import csv

    from sklearn.metrics import confusion_matrix, f1_score

    config = dict(RUN, loss="userpkg.nets.loss_with_f1")
    config["trainer"] = {**RUN["trainer"], "logging": {"logger": "csv"},
                         "checkpoint": {"dirpath": "ckpt", "monitor": "val_f1", "mode": "max"}}
    _write(run_yaml, config)
    code, out, err = _run(capsys, "fit", "--config", str(run_yaml))
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "net" / "metrics.json").read_text())
    from userpkg.data import blobs

    test = blobs()[2]
    model, _ = jaxlight.load_from_checkpoint(tmp_path / "ckpt", which="last")
    pred = np.asarray(model(test.data["features"])).argmax(-1)
    assert summary["test_cm"] == confusion_matrix(test.data["label"], pred, labels=range(3)).tolist()
    assert summary["test_f1"] == pytest.approx(f1_score(test.data["label"], pred, average="macro"), abs=1e-12)
    with open(tmp_path / "runs" / "net" / "logs" / "metrics.csv") as f:
        columns = set(next(csv.DictReader(f)))
    assert {"train_f1", "val_f1", "test_f1"} <= columns and "test_cm" not in columns
    assert "test_f1" in out


def test_fit_resumes_from_last_bit_for_bit_and_refuses_a_changed_config(run_yaml, tmp_path, capsys):
    assert _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "a")[0] == 0
    assert _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "b", "--trainer.max_epochs", "2")[0] == 0
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "b", "--ckpt_path", "last")
    assert code == 0, err
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "b", "--ckpt_path", "last",
                        "--trainer.max_epochs", "4", "--model.init_args.dropout", "0.3")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "configured differently: model.init_args.dropout: 0.2 in the checkpoint, 0.3 now" in err
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "b")
    assert code == 2 and err.startswith("jaxlight: error: trainer.checkpoint.dirpath: b already holds checkpoints")


@pytest.mark.parametrize("allow", [[], ["--trainer.checkpoint.allow_config_change", "true"]], ids=["strict", "allowed"])
def test_a_resume_with_another_width_names_the_changed_field(run_yaml, tmp_path, capsys, allow):
    assert _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "ckpt", "--trainer.max_epochs", "1")[0] == 0
    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.checkpoint.dirpath", "ckpt", "--ckpt_path", "last",
                        "--model.init_args.width", "32", *allow)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err  # (no warning per skipped checkpoint before it)
    assert "model.init_args.width: 16 in the checkpoint, 32 now" in lines[0], lines[0]
    assert "no checkpoint" not in lines[0]


def test_tensorboard_gets_the_resolved_config_as_hparams(run_yaml, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    code, _, err = _run(capsys, "fit", "--config", str(run_yaml), "--trainer.max_epochs", "1",
                        "--trainer.logging.logger", "tensorboard", "--model.init_args.width", "12")
    assert code == 0, err
    acc = EventAccumulator(str(tmp_path / "runs" / "net" / "logs"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info for c in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
    hp = {k: v.ListFields()[0][1] for k, v in start.hparams.items()}
    assert hp["model.class_path"] == "userpkg.nets.Net" and hp["model.init_args.width"] == 12
    assert hp["optimizer.init_args.learning_rate"] == pytest.approx(0.01) and "versions.flax" in hp
    assert [int(e.step) for e in acc.Scalars("lr")] == list(range(1, 7))


def test_best_without_a_monitored_metric_is_the_newest_checkpoint(tmp_path):
    from userpkg.data import blobs
    from userpkg.nets import Net, loss_fn

    train, _, _ = blobs()
    state = jaxlight.create_train_state(Net(8, rngs=nnx.Rngs(1)), optax.adam(1e-2), loss_fn, seed=0)
    trainer = jaxlight.Trainer(jaxlight.TrainerConfig(max_epochs=3, batch_size=64,
                                                      logging={"enable_progress_bar": False}),
                               callbacks=[jaxlight.callbacks.ModelCheckpoint(tmp_path)])
    trainer.fit(state, train)
    assert jaxlight.checkpoint.resolve_checkpoint(tmp_path, "best").name == "step_000000009"
    model, _ = jaxlight.load_from_checkpoint(tmp_path)
    assert model.head.kernel[...].shape == (8, 3)


def test_a_key_inside_a_schedule_is_overridden_by_its_dotted_flag(run_yaml, capsys):
    schedule = {"class_path": "optax.linear_schedule",
                "init_args": {"init_value": 0.0, "end_value": 0.02, "transition_steps": 10}}
    _write(run_yaml, dict(RUN, optimizer={"class_path": "optax.adamw", "init_args": {"learning_rate": schedule}}))
    code, printed, err = _run(capsys, "fit", "--config", str(run_yaml), "--print_config",
                              "--optimizer.init_args.learning_rate.init_args.end_value", "0.5")
    assert code == 0, err
    lr = yaml.safe_load(printed)["optimizer"]["init_args"]["learning_rate"]
    assert lr == {"class_path": "optax.linear_schedule",
                  "init_args": {"init_value": 0.0, "end_value": 0.5, "transition_steps": 10, "transition_begin": 0}}
