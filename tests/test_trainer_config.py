"""The nested TrainerConfig: its sections, the checks on its fields, the moved flat keys, the
fields a resume compares, the name registries, and ``jaxlight train`` as ``jaxlight fit``."""

import argparse
import ast
import json
from pathlib import Path

import numpy as np
import pytest

import jaxlight
from jaxlight.config import ConfigError
from jaxlight.trainer_config import (MOVED_KEYS, CheckpointConfig, LoggingConfig, MovedKeyError, NumericsConfig,
                                     ParallelConfig, TrainerConfig, compared_fields)

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    from jaxlight.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the sections ---------------------------------------------------------------------------------


def test_sections_are_classes_or_mappings_and_default_readably():
    by_class = TrainerConfig(max_epochs=2, batch_size=32, checkpoint=CheckpointConfig(dirpath="ckpt", every_n_steps=5),
                             parallel=ParallelConfig(strategy="pmap"), numerics=NumericsConfig(precision="bf16"))
    by_dict = TrainerConfig(max_epochs=2, batch_size=32, checkpoint={"dirpath": "ckpt", "every_n_steps": 5},
                            parallel={"strategy": "pmap"}, numerics={"precision": "bf16"})
    assert by_class == by_dict
    assert by_dict.checkpoint.every_n_steps == 5 and by_dict.logging == LoggingConfig()
    assert (by_dict.logging.logger, by_dict.parallel.devices, by_dict.numerics.nan_policy) == (None, None, "raise")


# The check of every field, written out: (where, value) -> the config key its error names.
BAD = [
    ({"max_epochs": 0}, "trainer.max_epochs"),
    ({"batch_size": -1}, "trainer.batch_size"),
    ({"steps_per_execution": 0}, "trainer.steps_per_execution"),
    ({"fast_dev_run": -1}, "trainer.fast_dev_run"),
    ({"freeze": "fc1.*"}, "trainer.freeze"),
    ({"checkpoint": {"every_n_steps": 0}}, "trainer.checkpoint.every_n_steps"),
    ({"checkpoint": {"mode": "best"}}, "trainer.checkpoint.mode"),
    ({"checkpoint": {"overwrite": "yes"}}, "trainer.checkpoint.overwrite"),
    ({"logging": {"logger": "wandb"}}, "trainer.logging.logger"),
    ({"logging": {"log_every_n_steps": 0}}, "trainer.logging.log_every_n_steps"),
    ({"parallel": {"strategy": "ddp"}}, "trainer.parallel.strategy"),
    ({"parallel": {"devices": 0}}, "trainer.parallel.devices"),
    ({"numerics": {"precision": "fp16"}}, "trainer.numerics.precision"),
    ({"numerics": {"gradient_clip_norm": 0.0}}, "trainer.numerics.gradient_clip_norm"),
    ({"numerics": {"nan_policy": "ignore"}}, "trainer.numerics.nan_policy"),
    ({"numerics": {"typo": 1}}, "trainer.numerics.typo"),
]


@pytest.mark.parametrize("kwargs, key", BAD, ids=[k for _, k in BAD])
def test_a_bad_value_is_refused_by_its_field_naming_its_config_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        TrainerConfig(**kwargs)
    assert info.value.key == key and str(info.value).startswith(f"{key}: ")
    assert isinstance(info.value, ValueError)  # (what a Python caller catches)


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_every_old_flat_keyword_names_its_new_key(old):
    with pytest.raises(MovedKeyError, match=rf"^trainer\.{old}: moved to trainer\.{MOVED_KEYS[old]}$"):
        TrainerConfig(**{old: None})
    section, name = MOVED_KEYS[old].split(".")
    assert name in {f for f in getattr(TrainerConfig(), section).__dataclass_fields__}


def test_an_old_flat_key_in_a_config_file_or_a_flag_is_one_line_naming_the_new_key(tmp_path, capsys):
    (tmp_path / "old.yaml").write_text("trainer: {max_epochs: 1, ckpt_every: 3}\n")
    code, _, err = _run(capsys, "fit", "--config", "linear", "--config", str(tmp_path / "old.yaml"))
    assert code == 2 and err.strip().splitlines() == [
        f"jaxlight: error: --config {tmp_path / 'old.yaml'}: trainer.ckpt_every: moved to trainer.checkpoint.every_n_steps"]
    code, _, err = _run(capsys, "fit", "--config", "linear", "--trainer.strategy", "pmap")
    assert code == 2 and err.strip() == "jaxlight: error: --trainer.strategy: moved to trainer.parallel.strategy"


def test_the_fields_a_resume_compares_are_marked_on_the_fields():
    expected = {"batch_size": 64, "accumulate_grad_batches": 1, "overfit_batches": 0, "freeze": [],
                "precision": "float32", "gradient_clip_norm": None, "nan_policy": "raise"}
    assert compared_fields(TrainerConfig()) == expected
    # ...and nothing that may change on resume: layout, logging, checkpoint folder, length
    changed = TrainerConfig(max_epochs=9, checkpoint={"dirpath": "x"}, logging={"logger": "csv"},
                            parallel={"strategy": "pmap", "devices": 2}, steps_per_execution=3)
    assert compared_fields(changed) == expected


def test_attributes_the_config_holds_cannot_be_set_on_the_trainer_afterwards():
    trainer = jaxlight.Trainer(TrainerConfig(run_config={"lr": 0.1}, checkpoint={"allow_config_change": True},
                                             logging={"enable_progress_bar": False}))
    assert (trainer.run_config, trainer.allow_config_change) == ({"lr": 0.1}, True)
    for name, key in (("run_config", "trainer.run_config"), ("hparams", "trainer.hparams"),
                      ("allow_config_change", "trainer.checkpoint.allow_config_change")):
        with pytest.raises(AttributeError, match=f"Trainer.{name} is the config's {key}"):
            setattr(trainer, name, None)


# -- one list of each kind of name ----------------------------------------------------------------


def test_the_cli_choices_are_the_registries():
    from jaxlight.cli import add_trainer_flags, parallel_flags, train_parser
    from jaxlight.loggers import LOGGERS
    from jaxlight.optim import OPTIMIZERS
    from jaxlight.parallel import STRATEGIES

    sub = argparse.ArgumentParser().add_subparsers()
    p = add_trainer_flags(train_parser(sub, "JAX"))
    parallel_flags(p)
    choices = {a.dest: a.choices for a in p._actions if a.choices}
    assert choices["optimizer"] == sorted(OPTIMIZERS) and list(choices["strategy"]) == list(STRATEGIES)
    assert choices["logger"] == ["none", *LOGGERS]
    torch_optim = pytest.importorskip("torch_ref.optim")
    assert list(torch_optim.OPTIMIZERS) == list(OPTIMIZERS)


@pytest.mark.parametrize("module", ["jaxlight.optim", "torch_ref.optim"])
def test_a_misspelt_optimizer_keyword_raises_naming_it(module):
    mod = pytest.importorskip(module)
    args = ([],) if module.startswith("torch") else ()
    with pytest.raises(TypeError, match="unknown keyword 'wieght_decay'"):
        mod.make_optimizer("adamw", *args, 0.1, wieght_decay=0.1)
    with pytest.raises(TypeError, match="momentum"):
        mod.adam(*args, 0.1, momentum=0.9)


def test_torch_ref_cli_imports_only_public_jaxlight_names():
    tree = ast.parse((ROOT / "torch_ref" / "cli.py").read_text())
    imported = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("jaxlight") for alias in node.names]
    assert imported
    import importlib
    import types

    for module, name in imported:
        value = getattr(importlib.import_module(module), name)
        public = isinstance(value, types.ModuleType) or name in importlib.import_module(module).__all__
        assert not name.startswith("_") and public, (module, name)


# -- jaxlight train is jaxlight fit --config <model> ------------------------------------------------


def test_train_flags_set_the_config_keys_fit_takes(tmp_path):
    from jaxlight import config
    from jaxlight.cli import add_trainer_flags, parallel_flags, train_config, train_parser
    from jaxlight.commands import recipe_from_args

    sub = argparse.ArgumentParser().add_subparsers()
    p = add_trainer_flags(train_parser(sub, "JAX"))
    parallel_flags(p)
    args = p.parse_args(["--model", "linear", "--epochs", "3", "--batch-size", "16", "--lr", "0.02", "--seed", "4",
                         "--val-split", "0.2", "--ckpt-dir", "c", "--ckpt-every", "5", "--logger", "csv",
                         "--steps-per-execution", "2", "--out", "o", "--overwrite"])
    trained = config.parse("fit", [], train_config(args, recipe_from_args(args)))[2]
    fitted = config.parse("fit", [
        "--config", "linear", "--trainer.max_epochs", "3", "--trainer.batch_size", "16",
        "--optimizer.init_args.lr", "0.02", "--seed", "4", "--data.init_args.seed", "4",
        "--data.init_args.val_split", "0.2", "--trainer.checkpoint.dirpath", "c",
        "--trainer.checkpoint.every_n_steps", "5", "--trainer.logging.logger", "csv",
        "--trainer.steps_per_execution", "2", "--trainer.out", "o", "--trainer.checkpoint.overwrite", "true"])[2]
    assert json.dumps(trained, sort_keys=True) == json.dumps(fitted, sort_keys=True)


def test_train_and_fit_train_the_same_parameters_bit_for_bit(tmp_path, capsys, monkeypatch):
    """The same tiny run through both command lines: the same history, test loss and weights."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "train", "--model", "linear", "--epochs", "1", "--seed", "3", "--lr", "0.03",
                        "--val-split", "0.1", "--steps-per-execution", "4", "--out", "t", "--ckpt-dir", "tc")
    assert code == 0, err
    code, _, err = _run(capsys, "fit", "--config", "linear", "--trainer.max_epochs", "1", "--seed", "3",
                        "--data.init_args.seed", "3", "--optimizer.init_args.lr", "0.03",
                        "--data.init_args.val_split", "0.1", "--trainer.steps_per_execution", "4",
                        "--trainer.out", "f", "--trainer.checkpoint.dirpath", "fc")
    assert code == 0, err
    trained = json.loads((tmp_path / "t" / "metrics.json").read_text())
    fitted = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert [h["loss"] for h in fitted["history"]] == [h["loss"] for h in trained["history"]]
    assert [h["val_loss"] for h in fitted["history"]] == [h["val_loss"] for h in trained["history"]]
    assert fitted["test_loss"] == trained["test_loss"]
    a, _ = jaxlight.load_from_checkpoint(tmp_path / "tc", which="last")
    b, _ = jaxlight.load_from_checkpoint(tmp_path / "fc", which="last")
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(getattr(a.linear, name)[...]), np.asarray(getattr(b.linear, name)[...]))
