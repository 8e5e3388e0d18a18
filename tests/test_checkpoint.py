"""Checkpoints: bit-exact round trips, the integrity manifest, fallback, failed saves, and resume
after real SIGKILL / SIGTERM of real training processes."""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlight import build_model, checkpoint, create_train_state, optim, tasks
from jaxlight.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    CorruptCheckpointError,
    list_checkpoints,
    restore_checkpoint,
    restore_latest,
    save_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def _state(model="softmax", step=0, seed=0):
    state = create_train_state(build_model(model, seed), optim.adam(1e-3), tasks.multiclass(), seed)
    # Non-trivial optimizer moments and step, so that a restore that drops them would show.
    params = jax.tree.map(lambda p: p + 0.5, state.params)
    opt_state = jax.tree.map(lambda a: a + 0.25 if jnp.issubdtype(a.dtype, jnp.floating) else a + 3, state.opt_state)
    return state.replace(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)


def _leaves(state):
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(state)]


def _assert_bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _trained(model: str, steps: int, seed: int = 0):
    """A state after ``steps`` real Adam steps: data-dependent moments, a count, moved weights."""
    from jaxlight.step import train_step

    state = create_train_state(build_model(model, seed), optim.adam(1e-3), tasks.multiclass(), seed)
    rng = np.random.default_rng(seed)
    batch = {"x": rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), "y": rng.integers(0, 10, 16).astype(np.int32)}
    for _ in range(steps):
        state, _ = train_step(state, batch)
    return state


@pytest.mark.parametrize("model", ["softmax", "lstm"])
def test_round_trip_is_bitwise_with_meta(tmp_path, model):
    state = _trained(model, steps=3)
    path = save_checkpoint(tmp_path, state, {"epoch": 1, "batch": 2, "note": "x"})
    assert path.name == "step_000000003"
    template = create_train_state(build_model(model, 1), optim.adam(1e-3), tasks.multiclass(), 1)  # (untrained)
    differs = lambda a, b: any(x.tobytes() != y.tobytes() for x, y in zip(_leaves(a), _leaves(b)))  # noqa: E731
    assert differs(template.opt_state, state.opt_state) and differs(template.params, state.params)
    restored, meta = restore_checkpoint(path, template)
    _assert_bitwise(restored, state)  # (params, optimizer moments and count, step, keys, model state)
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert (meta["epoch"], meta["batch"], meta["note"], meta["step"]) == (1, 2, "x", 3)


def _save_three(tmp_path):
    return [save_checkpoint(tmp_path, _state(step=s), {"epoch": s}) for s in (1, 2, 3)]


def _biggest_array_file(path: Path) -> Path:
    return max((p for p in (path / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_byte(f: Path):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "flipped byte in the arrays": lambda p: _flip_byte(_biggest_array_file(p)),
    "truncated arrays": lambda p: _truncate(_biggest_array_file(p)),
    "flipped byte in meta.json": lambda p: _flip_byte(p / "meta.json"),
    "missing manifest (unfinished save)": lambda p: (p / "manifest.json").unlink(),
    "truncated manifest": lambda p: _truncate(p / "manifest.json"),
    "deleted array file": lambda p: _biggest_array_file(p).unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_latest_falls_back_to_previous_with_a_warning(tmp_path, damage):
    paths = _save_three(tmp_path)
    DAMAGE[damage](paths[-1])
    with pytest.raises(CorruptCheckpointError, match="step_000000003"):
        verify_checkpoint(paths[-1])
    with pytest.warns(CheckpointWarning, match=r"step_000000003.*falling back to step_000000002"):
        restored, meta, path = restore_latest(tmp_path, _state())
    assert path == paths[1] and meta["epoch"] == 2
    _assert_bitwise(restored, _state(step=2))


def test_flipped_bytes_restore_wrong_values_without_the_manifest(tmp_path):
    """Why the manifest exists: Orbax alone reads the damaged file without complaint."""
    import orbax.checkpoint as ocp

    path = save_checkpoint(tmp_path, _state(step=1))
    before = ocp.PyTreeCheckpointer().restore((path / "arrays").absolute())
    f = max((p for p in (path / "arrays").rglob("*") if p.is_file() and "ocdbt.process" in str(p)),
            key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the compressed payload: zstd decodes it to other floats
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        verify_checkpoint(path)
    try:
        after = ocp.PyTreeCheckpointer().restore((path / "arrays").absolute())
    except Exception:  # noqa: BLE001 - Orbax noticing is also fine; the manifest is what we rely on
        return
    differs = any(np.asarray(before[k]).tobytes() != np.asarray(after[k]).tobytes() for k in before)
    assert differs, "the flipped byte did not change any value; pick another offset"


def test_every_checkpoint_corrupt_is_an_error(tmp_path):
    for p in _save_three(tmp_path):
        (p / "manifest.json").unlink()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="every checkpoint"):
        restore_latest(tmp_path, _state())
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        restore_latest(tmp_path / "empty", _state())


def test_nan_state_is_never_saved(tmp_path):
    save_checkpoint(tmp_path, _state(step=1))
    bad = _state(step=2)
    bad = bad.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), bad.params))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        save_checkpoint(tmp_path, bad)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001"]


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, _state(step=1))
    real_write = checkpoint._write_json

    def full_disk(path, payload):
        if path.name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, payload)

    monkeypatch.setattr(checkpoint, "_write_json", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left on device.*step_000000001 is intact"):
        save_checkpoint(tmp_path, _state(step=2))
    verify_checkpoint(good)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000001"]  # no temp folder left behind


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint folder should be")
    with pytest.raises(CheckpointError, match="could not write checkpoint .*not_a_dir"):
        save_checkpoint(blocker / "ckpt", _state(step=1))


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` refuses new entries, for root too: file permissions for a user, and for root
    (whom permissions do not stop) the immutable attribute, which the kernel enforces for
    everyone. Skips where neither holds (root on a file system without ``chattr +i``)."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root, and no immutable attribute here; test_unwritable_directory_is_a_clear_error and "
                    "test_real_failing_writes_leave_the_previous_checkpoint_intact cover a refused write")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_read_only_directory_is_a_clear_error(tmp_path):
    good = save_checkpoint(tmp_path, _state(step=1))
    with read_only(tmp_path):
        with pytest.raises(OSError):  # the folder really refuses new entries
            (tmp_path / "probe").mkdir()
        with pytest.raises(CheckpointError, match="intact"):
            save_checkpoint(tmp_path, _state(step=2))
    verify_checkpoint(good)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000001"]


def test_restoring_into_another_model_names_the_mismatch(tmp_path):
    path = save_checkpoint(tmp_path, _state("softmax", step=1))
    with pytest.raises(CheckpointError, match="holds .* arrays but the state has|does not fit"):
        restore_checkpoint(path, _state("mlp"))


def test_resaving_a_step_replaces_it_and_prune_keeps_what_is_asked(tmp_path):
    save_checkpoint(tmp_path, _state(step=1), {"epoch": 0})
    save_checkpoint(tmp_path, _state(step=1), {"epoch": 1})
    assert json.loads((tmp_path / "step_000000001" / "meta.json").read_text())["epoch"] == 1
    _save_three(tmp_path)
    checkpoint.prune_checkpoints(tmp_path, {1, 3})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001", "step_000000003"]


def test_a_lock_held_through_another_open_file_is_refused_naming_the_holder(tmp_path):
    """The folder lock as another process meets it: ``flock`` locks belong to an open file, so a
    lock taken here through a second ``open`` of ``.lock`` refuses ``lock_folder`` as another
    process's would (tests/test_reliability_checkpoint.py does it with a real second process)."""
    from jaxlight.checkpoint import CheckpointLockedError, lock_folder

    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"pid 4242 on host elsewhere, since 2026-01-01 00:00:00\n", 0)
        with pytest.raises(CheckpointLockedError, match=r"in use by another run \(pid 4242 on host elsewhere"):
            lock_folder(tmp_path)
    finally:
        os.close(fd)  # the kernel drops the lock with its last open file, as at a kill -9
    with lock_folder(tmp_path):
        with lock_folder(tmp_path):  # re-entrant within a process (the CLI, then the Trainer)
            assert f"pid {os.getpid()} on host" in (tmp_path / ".lock").read_text()


class _BNNet(nnx.Module):
    def __init__(self, seed, width=3):
        rngs = nnx.Rngs(seed)
        self.dense = nnx.Linear(4, width, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.dense(x))


def test_load_model_restores_params_and_batch_stats_into_a_new_module(tmp_path):
    """A module built afresh (another seed, untouched statistics) gets the checkpoint's
    parameters and batch statistics: its eval-mode outputs are the saved module's, bit for bit."""
    from jaxlight.checkpoint import IncompatibleCheckpointError, load_model

    model = _BNNet(1)
    model.train()
    model(jnp.ones((6, 4)) * 3.0)  # moves the batch statistics away from their init
    state = create_train_state(model, optim.adamw(1e-3), tasks.regression()).replace(step=np.int32(5))
    save_checkpoint(tmp_path, state)
    model.eval()
    x = np.linspace(-1, 1, 8 * 4, dtype=np.float32).reshape(8, 4)
    fresh = _BNNet(0)
    fresh.eval()
    assert not np.array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
    loaded = load_model(tmp_path / "step_000000005", _BNNet(0))
    loaded.eval()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    np.testing.assert_array_equal(np.asarray(loaded.bn.mean[...]), np.asarray(model.bn.mean[...]))
    with pytest.raises(IncompatibleCheckpointError, match=r"\(3,\) float32 does not fit .*\['bn'\]\['bias'\].* \(5,\)"):
        load_model(tmp_path / "step_000000005", _BNNet(0, width=5))


# -- asynchronous, sharded saves ----------------------------------------------------------------


def _digits(n=256, seed=0):
    """MNIST-shaped random data: (n, 28, 28) uint8 images, labels in 0..9."""
    rng = np.random.default_rng(seed)
    from jaxlight.data import ArrayDataset

    return ArrayDataset(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))


def test_an_async_save_overlaps_the_next_steps_and_the_next_save_and_fit_wait_for_it(tmp_path, monkeypatch):
    """Step 2's save is held unfinished (its manifest waits) until training has run step 3: the
    training step runs while the save is being written, which a synchronous save could not
    allow (it would wait forever, and the probe would see no pending save). The save at step 4
    and the end of ``fit`` each find the previous save complete, and step 2's checkpoint holds
    step 2's values though the steps after it donated (overwrote) the state's buffers."""
    from jaxlight.callbacks import Callback, ModelCheckpoint
    from jaxlight.trainer import Trainer, TrainerConfig

    release, seen, at_step = __import__("threading").Event(), [], {}
    real = checkpoint._write_manifest

    def held(folder):
        step = json.loads((folder / "meta.json").read_text())["step"]
        if step == 2:
            assert release.wait(timeout=120), "training never ran past step 2 while its save was pending"
        if step == 6:  # the last save: slow, so that a fit that did not wait would return first
            __import__("time").sleep(0.5)
        real(folder)

    monkeypatch.setattr(checkpoint, "_write_manifest", held)

    class Probe(Callback):
        def on_train_chunk_end(self, trainer, state, metrics):
            saver = trainer.checkpoint_saver(tmp_path)
            step2 = tmp_path / "step_000000002" / "manifest.json"
            seen.append((trainer.global_step, bool(saver and saver.is_saving), step2.exists()))
            if trainer.global_step == 2:  # (a host copy: the next step donates these buffers)
                at_step[2] = jax.tree.map(lambda a: np.array(jax.random.key_data(a) if jnp.issubdtype(
                    a.dtype, jax.dtypes.prng_key) else a), state)
            if trainer.global_step == 3:
                __import__("threading").Timer(0.3, release.set).start()

    state = create_train_state(build_model("softmax", 0), optim.adam(1e-2), tasks.multiclass(), seed=0)
    trainer = Trainer(TrainerConfig(max_epochs=2, batch_size=64, steps_per_execution=1, max_steps=6,
                                    logging={"enable_progress_bar": False}),
                      callbacks=[ModelCheckpoint(tmp_path, every_n_steps=2, every_n_epochs=None, keep_last=3), Probe()])
    final = trainer.fit(state, _digits())
    by_step = {s: (saving, m) for s, saving, m in seen}
    assert by_step[3] == (True, False), seen  # step 3 ran while step 2's save was still pending
    assert by_step[4][1], seen                # the save at step 4 waited for step 2's to complete
    assert trainer.checkpoint_saver(tmp_path) is None
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000002", "step_000000004", "step_000000006"]
    verify_checkpoint(tmp_path / "step_000000006")  # complete when fit returned
    restored, _ = restore_checkpoint(tmp_path / "step_000000006", _state())
    _assert_bitwise(restored, final)
    # Step 2's arrays are the state of step 2, though steps 3 and 4 overwrote its buffers meanwhile.
    restored, _ = restore_checkpoint(tmp_path / "step_000000002", _state())
    _assert_bitwise(restored, at_step[2])


def test_a_save_never_gathers_an_array_to_the_host(tmp_path, monkeypatch):
    """Each array is written from where it lives: the only values fetched to the host during a
    save are the finiteness flags (scalars), never a leaf of the state."""
    state = _state("mlp", step=3)
    fetched = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetched.extend(jax.tree.leaves(x)) or real(x))
    save_checkpoint(tmp_path, state)
    assert fetched and all(np.size(v) == 1 and np.asarray(v).dtype == bool for v in fetched), \
        [(np.shape(v), np.asarray(v).dtype) for v in fetched]


def _row_sharded(state, mesh):
    """Every leaf whose first axis divides by the mesh size split over it (the rest
    replicated): a state whose arrays no single device holds whole."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.devices.size

    def place(a):
        spec = P("data") if a.ndim and a.shape[0] % n == 0 else P()
        data = jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
        out = jax.device_put(data, NamedSharding(mesh, spec))
        return jax.random.wrap_key_data(out, impl=jax.random.key_impl(a)) if data is not a else out

    return jax.tree.map(place, state)


@pytest.mark.parametrize("source, target", [("rows", "single"), ("sharded", "single"), ("single", "sharded"),
                                            ("rows", "sharded"), ("fsdp", "single"), ("single", "fsdp"),
                                            ("fsdp", "sharded"), ("sharded", "fsdp")])
def test_a_state_moves_between_layouts_and_device_counts_through_a_checkpoint(tmp_path, source, target):
    """Saved from one layout on 8 devices (``fsdp`` and ``rows``: parameters and moments split
    over the devices, each written from where it lives), restored straight into another
    strategy's shardings; every value bit for bit as saved."""
    from jax.sharding import Mesh

    from jaxlight import parallel

    assert len(jax.devices()) == 8
    state = _state("mlp", step=5)
    if source == "rows":
        saved = _row_sharded(state, Mesh(np.array(jax.devices()), ("data",)))
    else:
        saved = parallel.make_strategy(source, 1 if source == "single" else 8).prepare_state(state)
    split = [len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
             for a in jax.tree.leaves((saved.params, saved.opt_state))]
    assert any(split) == (source in ("rows", "fsdp"))
    path = save_checkpoint(tmp_path, saved)
    strategy = parallel.make_strategy(target, 1 if target == "single" else 8)
    template = _state("mlp", seed=1)
    restored, _ = restore_checkpoint(path, template, shardings=strategy.state_shardings(template))
    _assert_bitwise(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(strategy.state_shardings(template))):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    assert strategy.prepare_state(restored) is restored  # already in the strategy's layout: nothing moves


# -- real processes, real signals --------------------------------------------------------------

JOB = ROOT / "tests" / "trainer_jobs" / "resume_job.py"


def _job(tmp_path, data_dir, out, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(JOB), "--data", str(data_dir), "--ckpt", str(tmp_path / "ckpt"),
           "--out", str(tmp_path / out), *flags]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_and_sigterm_at_several_points_then_resume_is_bitwise(tmp_path, data_dir):
    """One uninterrupted run beside a chain of runs killed at different points, each resumed
    from the previous one's last checkpoint (softmax, 10 steps/epoch, 3 epochs, checkpoint every
    3 steps and at epoch ends):

    1. SIGKILL mid-epoch, right after the step-15 checkpoint (epoch 2, batch 5);
    2. SIGKILL during the step-18 save, its arrays and meta.json complete, the manifest not:
       resumes 15;
    3. SIGKILL from the training thread while the asynchronous step-18 save is being written:
       resumes 15;
    4. SIGKILL at the end of epoch 2, after its checkpoint (step 20, position epoch 3 batch 0);
    5. SIGTERM at step 24: saves and exits 0;
    6. resumes at 24 with K = 1 instead of the whole epoch, and finishes.
    """
    reference = _job(tmp_path / "ref", data_dir, "full.npz")
    chain = [
        (["--kill-at-step", "14"], -9, "None"),
        (["--resume", "--kill-during-save", "18"], -9, "step_000000015"),
        (["--resume", "--kill-while-saving", "18"], -9, "step_000000015"),
        (["--resume", "--kill-at-epoch-end", "2"], -9, "step_000000015"),
        (["--resume", "--sigterm-at-step", "24"], 0, "step_000000020"),
        (["--resume", "--steps-per-execution", "1"], 0, "step_000000024"),
    ]
    for i, (flags, expected_rc, _) in enumerate(chain):
        rc, log = _finish(_job(tmp_path, data_dir, f"run{i}.npz", *flags))
        assert rc == expected_rc, f"run {i} {flags}: exit {rc}\n{log[-3000:]}"
        if i == 1:  # killed before the manifest: a step_000000018 that is never trusted
            step18 = tmp_path / "ckpt" / "step_000000018"
            assert (step18 / "meta.json").is_file() and not (step18 / "manifest.json").exists()
        if i == 2:  # killed while the save was still being written
            killed = json.loads((tmp_path / "run2.npz.killed.json").read_text())
            assert killed["saving"] and killed["step"] == 18, killed
        if i == 4:
            sigterm = json.loads((tmp_path / "run4.npz.json").read_text())
            assert sigterm["interrupted"] and sigterm["step"] == 24
            assert (tmp_path / "ckpt" / "step_000000024").is_dir()
    for i, (_, expected_rc, restored) in enumerate(chain):
        if expected_rc == 0:
            info = json.loads((tmp_path / f"run{i}.npz.json").read_text())
            assert Path(info["restored_from"]).name == restored
    rc, log = _finish(reference)
    assert rc == 0, log[-3000:]
    full, resumed = np.load(tmp_path / "ref" / "full.npz"), np.load(tmp_path / "run5.npz")
    assert sorted(full) == sorted(resumed)
    for k in full:
        assert full[k].tobytes() == resumed[k].tobytes(), k
    ref_info = json.loads((tmp_path / "ref" / "full.npz.json").read_text())
    final = json.loads((tmp_path / "run5.npz.json").read_text())
    assert final["step"] == ref_info["step"] == 30
    assert final["history"] == ref_info["history"]  # epoch means, across three restarts


WRITE_LIMIT_SCRIPT = """
import os, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from test_checkpoint import _state
from jaxlight.checkpoint import CheckpointError, save_checkpoint
root = sys.argv[1]
save_checkpoint(root, _state(step=1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    save_checkpoint(root, _state(step=2))
except CheckpointError as exc:
    print("CheckpointError:", exc)
"""


@pytest.mark.slow
def test_real_failing_writes_leave_the_previous_checkpoint_intact(tmp_path):
    """No monkeypatching: the kernel refuses every write past 4 KiB (RLIMIT_FSIZE) mid-save."""
    # (no compilation cache: under the limit its entries would be written truncated)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", WRITE_LIMIT_SCRIPT, str(tmp_path), str(ROOT / "tests")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CheckpointError: could not write checkpoint" in result.stdout
    assert "File too large" in result.stdout and "step_000000001 is intact" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000001"]
    restored, _, path = restore_latest(tmp_path, _state())
    _assert_bitwise(restored, _state(step=1))


# -- several processes --------------------------------------------------------------------------

MP_JOB = ROOT / "tests" / "trainer_jobs" / "multiprocess_ckpt_job.py"


def _mp_job(out: Path, ckpt: Path, data_dir, *flags, nproc=2, devices=4):
    """The job under ``jaxlight.launch`` (``nproc`` processes x ``devices`` CPU devices), or alone
    (``nproc=1``, ``devices`` CPU devices)."""
    from _support import run_module

    job = [str(MP_JOB), "--data", str(data_dir), "--ckpt", str(ckpt), "--out", str(out), *flags]
    if nproc > 1:
        return run_module("jaxlight.launch", "--nproc", str(nproc), "--local-devices", str(devices), "--grace", "20",
                          "--", *job, timeout=900)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, *job], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
@pytest.mark.integration
def test_two_processes_killed_mid_run_resume_bitwise_and_the_checkpoint_moves_to_1x8_and_1_device(tmp_path, data_dir):
    """2 processes x 4 CPU devices (``fsdp``: each process holds and writes its half of the
    parameters and moments), a checkpoint every 3 steps. Process 1 is
    killed (SIGKILL) right after the step-9 save started; the launcher stops process 0. Both
    restart with --resume from the newest complete checkpoint and end bit for bit where an
    uninterrupted 2 x 4 run ends. Each process's manifest lists only the files it wrote (process
    k > 0: its own ``ocdbt.process_k/`` shards). The step-12 checkpoint of the uninterrupted run
    then resumes on 1 process x 8 devices (``fsdp``) and on 1 device (``single``), ending within
    the parallel tolerance of it (another device count reorders the float32 sums)."""
    from _support import PARALLEL_ATOL, PARALLEL_RTOL

    ref = _mp_job(tmp_path / "ref", tmp_path / "ref-ckpt", data_dir)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    killed = _mp_job(tmp_path / "run", tmp_path / "ckpt", data_dir, "--kill-process", "1", "--kill-at-step", "9")
    assert killed.returncode != 0 and "worker 1: SIGKILL after step 9" in killed.stdout, killed.stdout[-3000:]
    resumed = _mp_job(tmp_path / "run", tmp_path / "ckpt", data_dir, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    procs = [json.loads((tmp_path / "run" / f"process-{i}.json").read_text()) for i in range(2)]
    assert [(p["processes"], p["devices"], p["step"]) for p in procs] == [(2, 8, 16)] * 2
    assert Path(procs[0]["restored_from"]).name in ("step_000000006", "step_000000009")
    full, got = np.load(tmp_path / "ref" / "params.npz"), np.load(tmp_path / "run" / "params.npz")
    assert sorted(full) == sorted(got)
    for k in full:
        assert full[k].tobytes() == got[k].tobytes(), k
    for p, name in zip(procs, ("manifest.json", "manifest.process_1.json")):
        assert p["manifests"], p
    ref_procs = [json.loads((tmp_path / "ref" / f"process-{i}.json").read_text()) for i in range(2)]
    for step, files in ref_procs[1]["manifests"].items():
        assert files and all("/ocdbt.process_1/" in f for f in files), (step, files)
        assert not any("/ocdbt.process_1/" in f for f in ref_procs[0]["manifests"][step]), step

    for devices in (8, 1):
        ckpt = tmp_path / f"ckpt-{devices}"
        ckpt.mkdir()
        shutil.copytree(tmp_path / "ref-ckpt" / "step_000000012", ckpt / "step_000000012")
        one = _mp_job(tmp_path / f"one-{devices}", ckpt, data_dir, "--resume", "--strategy",
                      "fsdp" if devices > 1 else "single", nproc=1, devices=devices)
        assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
        info = json.loads((tmp_path / f"one-{devices}" / "process-0.json").read_text())
        assert (info["devices"], info["step"], Path(info["restored_from"]).name) == (devices, 16, "step_000000012")
        alone = np.load(tmp_path / f"one-{devices}" / "params.npz")
        for k in full:
            np.testing.assert_allclose(alone[k], full[k], rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL)


def test_another_processs_manifest_being_written_is_not_listed(tmp_path):
    """In a multi-process save each process writes its manifest through a temporary file
    (``.manifest.process_k.json.tmp-<pid>``, then a rename) while process 0 hashes the folder
    for its own: process 0's manifest must not list that temporary file, which is gone once
    the rename is done (listing it would make every such checkpoint corrupt)."""
    path = save_checkpoint(tmp_path, _state(step=3))
    pending = path / ".manifest.process_1.json.tmp-4242"
    pending.write_text("{}")
    checkpoint._write_manifest(path)  # process 0's manifest, written while the file exists
    pending.unlink()                  # process 1's rename
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert "meta.json" in listed and not any(rel.startswith((".manifest", "manifest")) for rel in listed)
    assert "meta.json" in verify_checkpoint(path)
