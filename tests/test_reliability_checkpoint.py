"""Reliability through the library: safe checkpoint folders, strict resume, signals, load_model.

The command-line side of the same cases is tests/test_reliability_cli.py; docs/reliability.md
maps each case to its tests. Everything here trains the linear model on 256 synthetic examples
(4 steps an epoch): a fit takes well under a second after compilation.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxlight import build_model, checkpoint, create_train_state, optim, tasks
from jaxlight.callbacks import Callback, ModelCheckpoint
from jaxlight.checkpoint import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    list_checkpoints,
    load_model,
    lock_folder,
    restore_latest,
    save_checkpoint,
)
from jaxlight.data.synthetic import make_regression
from jaxlight.runconfig import ConfigMismatchError
from jaxlight.trainer import Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = make_regression(n_train=256, n_test=64)


def _state(tx=None, model="linear", task=None):
    return create_train_state(build_model(model, 0), tx or optim.sgd(0.05), task or tasks.regression(), seed=0)


def _trainer(folder, epochs=2, run_config=None, extra=(), allow_config_change=False, **kw):
    config = TrainerConfig(max_epochs=epochs, batch_size=64, run_config=run_config,
                           checkpoint={"allow_config_change": allow_config_change},
                           logging={"enable_progress_bar": False})
    return Trainer(config, callbacks=[ModelCheckpoint(folder, **kw), *extra])


def _steps(folder):
    return [int(p.name.split("_")[1]) for p in list_checkpoints(folder)]


# --- 1. a fresh run never deletes another run's checkpoints -------------------------------------

def test_fresh_fit_refuses_a_folder_with_checkpoints_and_overwrite_replaces_them(tmp_path):
    _trainer(tmp_path, epochs=3).fit(_state(), DATA.train)
    assert _steps(tmp_path) == [8, 12]
    with pytest.raises(CheckpointError, match="already holds checkpoints .*overwrite"):
        _trainer(tmp_path, epochs=1).fit(_state(), DATA.train)
    assert _steps(tmp_path) == [8, 12]  # untouched
    _trainer(tmp_path, epochs=1, overwrite=True).fit(_state(), DATA.train)
    assert _steps(tmp_path) == [4]  # the old run's were deleted once the new one had saved


def test_a_run_prunes_only_the_checkpoints_it_wrote(tmp_path):
    _trainer(tmp_path, epochs=1).fit(_state(), DATA.train)
    other = save_checkpoint(tmp_path, _state().replace(step=np.int32(2)))  # another run's, older step
    trainer = _trainer(tmp_path, epochs=5)
    trainer.fit(_state(), DATA.train, ckpt_path="last")
    assert trainer.restored_from.name == "step_000000004"
    assert _steps(tmp_path) == [2, 16, 20] and other.is_dir()  # keep_last=2 of its own, the other kept


# --- 2. one run per folder: an OS lock that dies with its process -----------------------------

HOLDER = """
import sys, time
from jaxlight.checkpoint import lock_folder
lock_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _holder(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.integration  # (a second process; in-process: test_checkpoint.py)
def test_a_second_process_is_refused_naming_the_holder_and_kill_9_frees_the_lock(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(CheckpointLockedError, match=f"in use by another run \\(pid {holder.pid} on host "):
            lock_folder(tmp_path)
        with pytest.raises(CheckpointLockedError):
            _trainer(tmp_path, epochs=1).fit(_state(), DATA.train)
        assert _steps(tmp_path) == []
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    with lock_folder(tmp_path):
        with lock_folder(tmp_path):  # re-entrant within a process (the CLI, then the Trainer)
            pass


def test_the_lock_is_released_when_fit_ends_even_by_an_error(tmp_path):
    class Boom(Callback):
        def on_epoch_end(self, trainer, state, metrics):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, extra=[Boom()]).fit(_state(), DATA.train)
    assert checkpoint._LOCKS == {}


def test_only_process_0_locks(tmp_path):
    class Process1:  # what ModelCheckpoint reads of a trainer on process 1 of a multi-process run
        is_global_zero = False
        restored_from = None

    cb = ModelCheckpoint(tmp_path)
    holder = _holder(tmp_path)
    try:
        cb.on_fit_start(Process1(), None)  # no lock taken, so no refusal
        assert cb._lock is None
    finally:
        holder.kill()
        holder.wait()


# --- 3. SIGINT saves like SIGTERM; a second Ctrl-C aborts at once --------------------------------

class Signal(Callback):
    def __init__(self, *signums, at_step=4):
        self.signums, self.at_step = signums, at_step

    def on_train_chunk_end(self, trainer, state, metrics):
        if trainer.global_step == self.at_step:
            for signum in self.signums:
                os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_finish_the_chunk_save_and_return(tmp_path, signum):
    previous = signal.getsignal(signal.SIGINT)
    trainer = Trainer(TrainerConfig(max_epochs=5, batch_size=64, steps_per_execution=1,
                                    logging={"enable_progress_bar": False}),
                      callbacks=[ModelCheckpoint(tmp_path), Signal(signum, at_step=6)])
    trainer.fit(_state(), DATA.train)
    assert trainer.interrupted and trainer.stop_signal == signum and trainer.global_step == 6
    assert trainer.interrupt_checkpoint == tmp_path / "step_000000006"
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_second_sigint_raises_keyboard_interrupt_at_once(tmp_path):
    trainer = Trainer(TrainerConfig(max_epochs=5, batch_size=64, steps_per_execution=1,
                                    logging={"enable_progress_bar": False}),
                      callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=None), Signal(signal.SIGINT, signal.SIGINT)])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(_state(), DATA.train)
    assert _steps(tmp_path) == []  # nothing saved after the second Ctrl-C


# --- 5. a resume with another configuration is refused, or accepted and recorded ---------------

RUN = {"model": "linear", "optimizer": "adamw", "lr": 0.05, "seed": 0}


def test_resume_with_another_optimizer_lr_and_seed_names_each_field(tmp_path):
    _trainer(tmp_path, run_config=RUN).fit(_state(optim.adamw(0.05)), DATA.train)
    other = {**RUN, "optimizer": "adam", "lr": 0.01, "seed": 7}
    with pytest.raises(ConfigMismatchError) as err:
        _trainer(tmp_path, epochs=3, run_config=other).fit(_state(optim.adam(0.01)), DATA.train, ckpt_path="last")
    message = str(err.value)
    for field in ("optimizer: adamw in the checkpoint, adam now", "lr: 0.05 in the checkpoint, 0.01 now",
                  "seed: 0 in the checkpoint, 7 now", "optimizer chain: "):
        assert field in message


def test_the_optimizer_chain_alone_tells_adam_from_adamw(tmp_path):
    """No run_config at all (a bare Trainer API user): the arrays are the same, the chain is not."""
    _trainer(tmp_path).fit(_state(optim.adamw(0.05)), DATA.train)
    with pytest.raises(ConfigMismatchError, match=r"optimizer chain: \(ScaleByAdamState.*EmptyState\(\),EmptyState\(\)\)"):
        _trainer(tmp_path, epochs=3).fit(_state(optim.adam(0.05)), DATA.train, ckpt_path="last")


def test_an_accepted_change_is_recorded_in_the_segments(tmp_path):
    _trainer(tmp_path, run_config=RUN).fit(_state(optim.adamw(0.05)), DATA.train)
    trainer = _trainer(tmp_path, epochs=3, run_config={**RUN, "lr": 0.01}, allow_config_change=True)
    with pytest.raises(AttributeError, match=r"trainer.checkpoint.allow_config_change: build the Trainer with"):
        trainer.allow_config_change = False  # (read from the config: a value set afterwards would go unseen)
    with pytest.warns(RuntimeWarning, match="lr: 0.05 in the checkpoint, 0.01 now"):
        trainer.fit(_state(optim.adamw(0.01)), DATA.train, ckpt_path="last")
    first, second = trainer.run_segments()
    assert (first["run"]["lr"], first["from_step"], first["to_step"]) == (0.05, 0, 8)
    assert (second["run"]["lr"], second["from_step"], second["to_step"]) == (0.01, 8, 12)
    assert second["accepted_changes"] == ["lr: 0.05 in the checkpoint, 0.01 now"]
    meta = json.loads((tmp_path / "step_000000012" / "meta.json").read_text())
    assert meta["segments"] == json.loads(json.dumps(trainer.run_segments()))


def test_a_finished_run_resumed_with_fewer_epochs_says_it_is_past_them(tmp_path):
    _trainer(tmp_path, epochs=3).fit(_state(), DATA.train)
    with pytest.raises(ConfigMismatchError, match=r"already at epoch 3 .*past max_epochs=2"):
        _trainer(tmp_path, epochs=2).fit(_state(), DATA.train, ckpt_path="last")
    trainer = _trainer(tmp_path, epochs=3)  # the same count: nothing left to do, not an error
    trainer.fit(_state(), DATA.train, ckpt_path="last")
    assert trainer.global_step == 12


# --- 8, 9. unreadable manifests are corrupt; stray files only warn ------------------------------

def _two_checkpoints(tmp_path):
    old = save_checkpoint(tmp_path, _state().replace(step=np.int32(1)))
    new = save_checkpoint(tmp_path, _state().replace(step=np.int32(2)))
    return old, new


@pytest.mark.parametrize("damage", ["manifest is a folder", "manifest is not JSON", "manifest lists junk",
                                    "a file is unreadable"])
def test_an_unreadable_manifest_or_file_is_corrupt_and_skipped(tmp_path, monkeypatch, damage):
    old, new = _two_checkpoints(tmp_path)
    manifest = new / "manifest.json"
    if damage == "manifest is a folder":
        manifest.unlink()
        manifest.mkdir()
    elif damage == "manifest is not JSON":
        manifest.write_bytes(b"\xff\xfe not json")
    elif damage == "manifest lists junk":
        manifest.write_text('{"files": {"meta.json": 7}}')
    else:  # (root reads through chmod 000, so the read itself fails here)
        real = checkpoint._sha256
        monkeypatch.setattr(checkpoint, "_sha256", lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                            if p.name == "meta.json" and p.parent == new else real(p))
    with pytest.warns(CheckpointWarning, match="skipping corrupt checkpoint.*falling back to step_000000001"):
        _, _, path = restore_latest(tmp_path, _state())
    assert path == old


def test_a_stray_file_is_ignored_with_a_warning(tmp_path):
    _, new = _two_checkpoints(tmp_path)
    (new / ".DS_Store").write_bytes(b"\0\1junk")
    (new / "arrays" / "meta.json~").write_text("an editor's backup")
    with pytest.warns(CheckpointWarning, match=r"ignoring 2 file\(s\) not in its manifest"):
        _, _, path = restore_latest(tmp_path, _state())
    assert path == new


# --- 12. a checkpoint of another model: the newest that fits is used, with a warning ------------

def test_a_checkpoint_of_another_model_is_skipped_for_the_newest_that_fits(tmp_path):
    _trainer(tmp_path).fit(_state(), DATA.train)
    foreign = save_checkpoint(tmp_path, _state(optim.adam(1e-3), "softmax", tasks.multiclass()).replace(step=np.int32(99)))
    with pytest.warns(CheckpointWarning, match="skipping checkpoint of another model: .*step_000000099.*falling back to step_000000008"):
        trainer = _trainer(tmp_path, epochs=3)
        trainer.fit(_state(), DATA.train, ckpt_path="last")
    assert trainer.restored_from.name == "step_000000008" and foreign.is_dir()
    with pytest.raises(IncompatibleCheckpointError, match="no checkpoint under .* fits this state"), \
            pytest.warns(CheckpointWarning):
        restore_latest(tmp_path, _state(optim.adam(1e-3), "lstm", tasks.multiclass()))


# --- load_model: parameters and batch statistics, no optimizer, no Trainer -----------

LOAD = """
import sys, numpy as np
from flax import nnx
from jaxlight.checkpoint import load_model, IncompatibleCheckpointError
sys.path.insert(0, sys.argv[2])
from test_reliability_checkpoint import BNNet
model = load_model(sys.argv[1], BNNet(0))
model.eval()
x = np.linspace(-1, 1, 8 * 4, dtype=np.float32).reshape(8, 4)
np.save(sys.argv[3], np.asarray(model(x)))
try:
    load_model(sys.argv[1], BNNet(0, width=5))
except IncompatibleCheckpointError as exc:
    print("ERROR", exc)
"""


class BNNet:
    """A module with batch statistics (model_state), built lazily so this file imports no flax."""

    def __new__(cls, seed, width=3):
        from flax import nnx

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.dense = nnx.Linear(4, width, rngs=rngs)
                self.bn = nnx.BatchNorm(width, rngs=rngs)

            def __call__(self, x):
                return self.bn(self.dense(x))

        return Net(nnx.Rngs(seed))


@pytest.mark.integration  # (a second process; in-process: test_checkpoint.py)
def test_load_model_in_a_fresh_process_restores_params_and_batch_stats(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    model = BNNet(1)
    model.train()
    model(jnp.ones((6, 4)) * 3.0)  # moves the batch statistics away from their init
    state = create_train_state(model, optim.adamw(1e-3), tasks.regression()).replace(step=np.int32(5))
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, state, {"extra": "ignored"})
    model.eval()
    x = np.linspace(-1, 1, 8 * 4, dtype=np.float32).reshape(8, 4)
    expected = np.asarray(model(x))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", LOAD, str(folder / "step_000000005"), str(ROOT / "tests"),
                             str(tmp_path / "loaded.npy")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"), expected)
    assert "ERROR" in result.stdout and "step_000000005" in result.stdout
    assert "(3,) float32 does not fit model.params['bn']['bias'].value (5,) float32" in result.stdout
    assert nnx.state(model, nnx.BatchStat)  # (the checkpoint did hold batch statistics)


def test_load_model_verifies_the_manifest_and_takes_a_folder(tmp_path):
    _trainer(tmp_path).fit(_state(), DATA.train)
    model = load_model(tmp_path, build_model("linear", 5))  # the newest: step 8
    trainer_state, _, _ = restore_latest(tmp_path, _state())
    np.testing.assert_array_equal(np.asarray(model.linear.kernel[...]),
                                  np.asarray(trainer_state.params["linear"]["kernel"][...]))
    arrays = next(p for p in (tmp_path / "step_000000008" / "arrays").rglob("*") if p.is_file() and p.stat().st_size > 8)
    arrays.write_bytes(arrays.read_bytes()[:-4])
    with pytest.raises(CorruptCheckpointError, match="step_000000008"):
        load_model(tmp_path / "step_000000008", build_model("linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        load_model(tmp_path, build_model("linear"))  # falls back to step 4


# --- a save never removes the only complete checkpoint --------------------------------------------

def _saves(monkeypatch) -> list:
    """The steps of the saves started, in order."""
    started = []
    real = checkpoint.CheckpointSaver.save

    def save(self, state, meta=None, **kwargs):
        started.append(int(np.asarray(state.step)))
        return real(self, state, meta, **kwargs)

    monkeypatch.setattr(checkpoint.CheckpointSaver, "save", save)
    return started


def test_an_epoch_end_on_a_step_every_n_steps_saved_is_saved_once_with_the_later_position(tmp_path, monkeypatch):
    started = _saves(monkeypatch)
    trainer = _trainer(tmp_path, epochs=2, monitor="loss", every_n_steps=2, keep_last=4)  # 4 steps an epoch
    trainer.fit(_state(), DATA.train)
    assert started == [2, 4, 6, 8]  # each step once: the epoch ends (4, 8) are not saved twice
    meta = json.loads((tmp_path / "step_000000004" / "meta.json").read_text())
    assert (meta["epoch"], meta["batch"]) == (1, 0) and len(meta["history"]) == 1  # the epoch end's position
    assert "4" in meta["callbacks"]["ModelCheckpoint"]["scores"]  # (scored on the epoch it ends)


def test_sigterm_on_a_saved_step_keeps_that_checkpoint_and_saves_nothing_twice(tmp_path, monkeypatch):
    started = _saves(monkeypatch)
    trainer = _trainer(tmp_path, epochs=3, every_n_steps=2, extra=[Signal(signal.SIGTERM, at_step=4)])
    trainer.fit(_state(), DATA.train)
    assert trainer.interrupted and trainer.interrupt_checkpoint == tmp_path / "step_000000004"
    assert started == [2, 4]
    checkpoint.verify_checkpoint(tmp_path / "step_000000004")


def test_a_replacement_keeps_the_old_checkpoint_until_it_is_complete_and_a_full_disk_keeps_it(tmp_path):
    import resource

    import jax

    state = _state().replace(step=np.int32(6))
    path = save_checkpoint(tmp_path, state, {"version": 1})
    seen = []
    real = checkpoint._exchange

    def exchange(new, final):  # the moment of the swap: the old one is still in place, the new one complete
        seen.append((json.loads((final / "meta.json").read_text())["version"],
                     json.loads((new / "meta.json").read_text())["version"]))
        checkpoint.verify_checkpoint(final)
        checkpoint.verify_checkpoint(new)
        real(new, final)

    checkpoint._exchange, before = exchange, checkpoint._exchange
    try:
        save_checkpoint(tmp_path, state, {"version": 2})
    finally:
        checkpoint._exchange = before
    assert seen == [(1, 2)]
    assert json.loads((path / "meta.json").read_text())["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000006"]  # no staging folder left
    # A full disk while the replacement is written: the complete checkpoint stays, whole.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, hard))
    try:
        with pytest.raises(checkpoint.CheckpointWriteError, match=f"the previous checkpoint {path} is intact"):
            save_checkpoint(tmp_path, state, {"version": 3})
        # (every write of the failed save has finished before the error: none is left to land later)
        assert not [t.name for t in threading.enumerate() if t.name in ("array_type_handler", "serialize_shardings")]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        jax.config.update("jax_enable_compilation_cache", cache)
        signal.signal(signal.SIGXFSZ, previous)
    checkpoint.verify_checkpoint(path)
    assert json.loads((path / "meta.json").read_text())["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000006"]


def _job(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ROOT / "tests" / "trainer_jobs" / "replace_job.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.integration
@pytest.mark.parametrize("moment", ["disappear", "before-exchange", "after-exchange"])
def test_kill_9_while_a_checkpoint_is_replaced_leaves_a_complete_one(tmp_path, moment):
    ckpt = tmp_path / "ckpt"
    result = _job(moment, str(ckpt), "save")
    assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]
    if moment != "disappear":
        assert result.returncode == -signal.SIGKILL  # (the replacement reached its exchange)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        state, meta, path = restore_latest(ckpt, _state())
    assert path.name == "step_000000006" and meta["version"] == (1 if moment == "before-exchange" else 2)
    checkpoint.verify_checkpoint(path)


@pytest.mark.integration
def test_kill_9_where_an_epoch_end_would_replace_a_step_save_then_ckpt_path_last_resumes(tmp_path):
    from _support import userpkg_run

    (tmp_path / "run.yaml").write_text(userpkg_run(8, 1e-2))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    flags = ["--config", str(tmp_path / "run.yaml"), "--trainer.checkpoint.dirpath", str(ckpt), "--trainer.out", str(out),
             "--trainer.checkpoint.every_n_steps", "3"]  # 192 examples in batches of 64: the epoch ends on step 3
    first = _job("disappear", str(ckpt), "fit", "--", *flags, "--trainer.max_epochs", "1")
    assert first.returncode in (0, -signal.SIGKILL), first.stderr[-3000:]
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_000000003"]
    checkpoint.verify_checkpoint(ckpt / "step_000000003")
    resumed = _job("disappear", str(ckpt), "fit", "--", *flags, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta = json.loads((list_checkpoints(ckpt)[-1] / "meta.json").read_text())
    assert meta["step"] == 6 and meta["segments"][-1]["from_step"] == 3
