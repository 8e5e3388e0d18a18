"""The runnable examples in docs/examples/ train small, resume from their checkpoints, load the
model with load_model, and reach their accuracy floors (each script asserts its predictions
after load_model match Trainer.predict)."""

import importlib.util
import sys

import pytest

from _support import ROOT

EXAMPLES = ROOT / "docs" / "examples"


def run_example(name, *args):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(list(args))


@pytest.mark.parametrize("name, args", [
    # (fast counterparts: test_multitask_reports_both_metrics, an example run in process, and
    # test_own_models.py, the same kind of Dropout/BatchNorm model through the same Trainer)
    pytest.param("dropout_batchnorm", ["--epochs", "2"], marks=pytest.mark.slow),
    pytest.param("sequence_classifier", ["--epochs", "2", "--examples", "300"], marks=pytest.mark.slow),
])
def test_example_runs_end_to_end_on_a_small_budget(tmp_path, name, args):
    """Each script trains, checkpoints, resumes and checks load_model against Trainer.predict
    itself; two epochs here, stopped after the first and resumed (the accuracy floors, which
    need more, are in the slow tier)."""
    metrics = run_example(name, *args, "--out", str(tmp_path / name))
    assert set(metrics) == {"test_loss", "test_accuracy"} and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (tmp_path / name / "ckpt").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name, args, metric, floor", [
    ("dropout_batchnorm", ["--epochs", "10"], "test_accuracy", 0.9),
    ("sequence_classifier", ["--epochs", "4", "--examples", "2000"], "test_accuracy", 0.9),
    ("multitask", ["--epochs", "6", "--examples", "2000"], "test_accuracy", 0.8),
])
def test_example_trains_resumes_and_loads(tmp_path, name, args, metric, floor):
    metrics = run_example(name, *args, "--out", str(tmp_path / name))
    assert metrics[metric] >= floor, metrics
    assert (tmp_path / name / "ckpt").is_dir()


def test_multitask_reports_both_metrics(tmp_path):
    metrics = run_example("multitask", "--epochs", "2", "--examples", "500", "--out", str(tmp_path))
    assert set(metrics) == {"test_loss", "test_accuracy", "test_mse"}
