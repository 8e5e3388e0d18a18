"""The runnable examples in docs/examples/ train small, resume from their checkpoints, load the
model with load_model, and reach their accuracy floors (each script asserts its predictions
after load_model match Trainer.predict); the GAN (a train step of its own) learns its target."""

import importlib.util
import sys

import numpy as np
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


def test_the_gan_example_trains_under_trainer_fit(tmp_path):
    """Its own step (two optimizers, alternating updates) through Trainer.fit, stopped half way
    and resumed; a few epochs move the generated points toward the data (the floor is below)."""
    metrics = run_example("gan", "--epochs", "4", "--examples", "512", "--out", str(tmp_path))
    assert (tmp_path / "ckpt").is_dir() and set(metrics) == {"mean_error", "std_ratio", "d_real", "d_fake"}
    assert 0.0 < metrics["d_fake"] < 1.0 and np.isfinite(metrics["mean_error"])


@pytest.mark.slow
def test_the_gan_example_learns_the_data(tmp_path):
    """After 30 epochs the generated points have the data's mean (within 0.2) and spread (within
    a factor 1.5 per axis), and the discriminator scores real and generated points alike."""
    metrics = run_example("gan", "--epochs", "30", "--out", str(tmp_path))
    assert metrics["mean_error"] < 0.2, metrics
    assert all(1 / 1.5 < r < 1.5 for r in metrics["std_ratio"]), metrics
    assert abs(metrics["d_real"] - metrics["d_fake"]) < 0.1, metrics
