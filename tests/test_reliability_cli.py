"""Both command lines as a user runs them, each in its own process: refusals, locks held by
another process, signals sent from outside, exit codes, bad paths, strict resume, a full disk.
The library side is tests/test_reliability_checkpoint.py; the same behaviours in-process (the
fast tier) are in tests/test_cli_errors.py.

The runs train the linear model on its synthetic data (about 5 s a run, most of it imports); none
needs MNIST except the --data-dir cases, which fail before reading it.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _support import BAD_OUTPUT_PATHS, ROOT, bad_output_paths, one_line_error, userpkg_run

pytestmark = pytest.mark.integration

MODULES = {"jaxlight": "jaxlight.cli", "torch-ref": "torch_ref.cli"}
LINEAR = ["train", "--model", "linear"]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("XLA_FLAGS", None)
    return env


def run(program, *args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", MODULES[program], *args], capture_output=True, text=True,
                          env=env or _env(), timeout=600, cwd=ROOT, **kw)


def _steps(folder):
    return sorted(p.name for p in Path(folder).glob("step_*"))


# --- 1. another run's checkpoints are never deleted ---------------------------------------------

def test_a_folder_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = run("jaxlight", *LINEAR, "--epochs", "3", "--out", str(tmp_path / "a"), "--ckpt-dir", str(ckpt))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: (p / "manifest.json").read_bytes() for p in ckpt.glob("step_*")}
    refused = run("jaxlight", *LINEAR, "--epochs", "1", "--out", str(tmp_path / "b"), "--ckpt-dir", str(ckpt))
    assert refused.returncode == 2
    one_line_error(refused, f"--ckpt-dir {ckpt} already holds checkpoints", "--resume", "--overwrite")
    assert {p: (p / "manifest.json").read_bytes() for p in ckpt.glob("step_*")} == before
    assert "jaxlight: linear" not in refused.stdout  # refused before any data or model was built
    replaced = run("jaxlight", *LINEAR, "--epochs", "1", "--out", str(tmp_path / "c"), "--ckpt-dir", str(ckpt),
                   "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert _steps(ckpt) == ["step_000000128"]


# --- 2. a lock: the second run is refused naming the holder -------------------------------------

def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom jaxlight.checkpoint import lock_folder\n"
                               "lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
                               str(tmp_path / "ckpt")], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run("jaxlight", *LINEAR, "--out", str(tmp_path / "out"), "--ckpt-dir", str(tmp_path / "ckpt"))
        assert result.returncode == 2
        one_line_error(result, "is in use by another run", f"pid {holder.pid} on host")
    finally:
        holder.kill()
        holder.wait()


# --- 3. SIGINT saves like SIGTERM; exit 130 / 143; nothing to save is not a success ------------

def _interrupt(program, tmp_path, signums, *flags, after="epoch 3/"):
    """Start a long run, send ``signums`` once it prints ``after``, return the result."""
    proc = subprocess.Popen([sys.executable, "-m", MODULES[program], *LINEAR, "--epochs", "100000",
                             "--out", str(tmp_path / "out"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    for line in proc.stdout:
        if after in line:
            break
    for signum in signums:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_finishes_the_chunk_saves_says_how_to_resume_and_exits_130(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = _interrupt("jaxlight", tmp_path, [signal.SIGINT], "--ckpt-dir", str(ckpt))
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = line = next(line for line in result.stderr.splitlines() if line.startswith("stopped by SIGINT"))
    saved = Path(line.split("saved ")[1].split(". ")[0])
    assert saved.is_dir() and f"--resume --ckpt-dir {ckpt}" in last
    epochs_done = int(saved.name.split("_")[1]) // 128
    resumed = run("jaxlight", *LINEAR, "--epochs", str(epochs_done + 1), "--out", str(tmp_path / "out"),
                  "--ckpt-dir", str(ckpt), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved}" in resumed.stdout
    assert len(json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]) == epochs_done + 1


def test_sigterm_with_nothing_to_save_exits_143_not_0(tmp_path):
    result = _interrupt("jaxlight", tmp_path, [signal.SIGTERM])
    assert result.returncode == 143
    assert "nothing was saved (no --ckpt-dir)" in result.stderr and "Traceback" not in result.stderr


def test_a_second_ctrl_c_aborts_with_130_and_no_traceback(tmp_path):
    """Whether the second signal lands before or after the save, the exit is 130 and quiet; that
    it aborts at once is tested in-process (test_a_second_sigint_raises_keyboard_interrupt_at_once)."""
    result = _interrupt("jaxlight", tmp_path, [signal.SIGINT, signal.SIGINT], "--ckpt-dir", str(tmp_path / "ckpt"),
                        "--ckpt-every", "16", after="epoch 1/")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_torch_ref_stops_on_a_signal_with_the_same_codes(tmp_path, signum, code):
    result = _interrupt("torch-ref", tmp_path, [signum], "--loader", "memory")
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "nothing more was saved" in result.stderr


# --- 4. output paths are checked and created before any data loads ------------------------------

@pytest.mark.parametrize("case", BAD_OUTPUT_PATHS)
def test_a_bad_output_path_fails_before_the_data_loads(tmp_path, case):
    flags, message = bad_output_paths(tmp_path)[case]
    # --data-dir names nothing: had the data been loaded first, that would be the error.
    result = run("jaxlight", "train", "--model", "mlp", "--data-dir", str(tmp_path / "no-data"), *flags)
    assert result.returncode == 2
    one_line_error(result, flags[-2], message)


@pytest.mark.parametrize("case", BAD_OUTPUT_PATHS[:1])
def test_torch_ref_checks_out_before_the_data_loads_too(tmp_path, case):
    flags, message = bad_output_paths(tmp_path)[case]
    result = run("torch-ref", "train", "--model", "mlp", "--data-dir", str(tmp_path / "no-data"), *flags)
    assert result.returncode == 2
    one_line_error(result, "--out", message)


# --- 5. a resume with another setup is refused, or accepted and recorded ------------------------

def test_resume_with_another_setup_is_refused_accepted_and_recorded(tmp_path):
    common = [*LINEAR, "--out", str(tmp_path / "out"), "--ckpt-dir", str(tmp_path / "ckpt")]
    assert run("jaxlight", *common, "--optimizer", "adamw", "--epochs", "2").returncode == 0
    refused = run("jaxlight", *common, "--optimizer", "adam", "--lr", "0.01", "--seed", "7", "--epochs", "3", "--resume")
    assert refused.returncode == 2
    one_line_error(refused, "optimizer: adamw in the checkpoint, adam now", "lr: 0.05 in the checkpoint, 0.01 now",
                   "seed: 0 in the checkpoint, 7 now", "optimizer chain:", "--allow-config-change")
    accepted = run("jaxlight", *common, "--optimizer", "adam", "--epochs", "3", "--resume", "--allow-config-change")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "warning: resuming" in accepted.stderr and "optimizer: adamw in the checkpoint, adam now" in accepted.stderr
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    first, second = summary["segments"]
    assert (first["run"]["optimizer"], first["from_step"], first["to_step"]) == ("adamw", 0, 256)
    assert (second["run"]["optimizer"], second["from_step"], second["to_step"]) == ("adam", 256, 384)
    assert "optimizer: adamw in the checkpoint, adam now" in second["accepted_changes"]
    behind = run("jaxlight", *common, "--optimizer", "adam", "--epochs", "2", "--resume")
    assert behind.returncode == 2
    one_line_error(behind, "already at epoch 3", "past max_epochs=2 (--epochs)")


# --- 6. an explicit --data-dir is used or refused, never replaced by $JAXLIGHT_DATA -------------

def _three_of_four(folder, data_dir):
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).symlink_to(data_dir / "MNIST" / "raw" / name)


@pytest.mark.parametrize("program, case", [("jaxlight", "a file"), ("jaxlight", "three of the four files"),
                                           ("jaxlight", "empty"), ("torch-ref", "three of the four files")])
def test_an_explicit_data_dir_without_mnist_is_refused(tmp_path, data_dir, program, case):
    target = tmp_path / "data"
    if case == "a file":
        target.write_text("not MNIST")
        message = "is a file, not a folder"
    elif case == "three of the four files":
        _three_of_four(target, data_dir)
        message = "holds 3 of the 4 MNIST files; missing: t10k-labels-idx1-ubyte"
    else:  # an empty folder is used: downloaded into (here refused by a dead proxy, quickly)
        target.mkdir()
        message = "could not download"
    env = _env(JAXLIGHT_DATA=str(data_dir), XDG_CACHE_HOME=str(tmp_path / "cache"),
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    flags = ["--loader", "memory"] if program == "torch-ref" else []
    result = run(program, "train", "--model", "softmax", "--epochs", "1", "--data-dir", str(target),
                 "--out", str(tmp_path / "out"), *flags, env=env)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.json").exists()  # $JAXLIGHT_DATA's copy was not used


# --- 7. NaN: both command lines stop, name the step, exit 3 -------------------------------------

def test_both_clis_stop_on_nan_at_the_same_step_with_the_same_code(tmp_path):
    lines = {}
    for program in ("jaxlight", "torch-ref"):
        flags = ["--loader", "memory"] if program == "torch-ref" else []
        result = run(program, *LINEAR, "--optimizer", "sgd", "--lr", "1e6", "--out", str(tmp_path / program), *flags)
        assert result.returncode == 3
        lines[program] = one_line_error(result, "training loss is")
        assert not (tmp_path / program / "metrics.json").exists()
    step = lambda line: line.split(" at step ")[1].split(")")[0] + ")"  # noqa: E731
    assert step(lines["jaxlight"]) == step(lines["torch-ref"]) == "4 (epoch 1, batch 4)"


# --- 10. a full disk: one error line, the details in train.log or --verbose --------------------

FULL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
sys.argv[0] = "jaxlight"
runpy.run_module("jaxlight.cli", run_name="__main__")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_full_disk_is_one_error_line_with_details_in_the_log(tmp_path, verbose):
    result = subprocess.run([sys.executable, "-c", FULL_DISK, *LINEAR, "--epochs", "2", "--out", str(tmp_path / "out"),
                             "--ckpt-dir", str(tmp_path / "ckpt"), *(["--verbose"] if verbose else [])],
                            # (no compilation cache: under the 200-byte limit its entries would be
                            # written truncated, for every later test to trip over)
                            capture_output=True, text=True, env=_env(JAX_ENABLE_COMPILATION_CACHE="false"),
                            timeout=600, cwd=ROOT)
    assert result.returncode == 1
    if verbose:
        assert "Traceback" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("jaxlight: error: could not write checkpoint")
    else:
        one_line_error(result, "could not write checkpoint", "File too large",
                       f"details in {tmp_path / 'out' / 'train.log'}")
        assert (tmp_path / "out" / "train.log").read_text().strip()  # (cut at 200 bytes by the same limit)
    assert _steps(tmp_path / "ckpt") == []


# --- 11. usage errors exit 2, however they are found --------------------------------------------

@pytest.mark.parametrize("program", ["jaxlight", "torch-ref"])
@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "abc"], "invalid int value: 'abc'"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--lr", "inf"], "--lr must be > 0 and finite"),
])
def test_usage_errors_exit_2(tmp_path, program, flags, message):
    result = run(program, *LINEAR, "--out", str(tmp_path), *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "--resume needs --ckpt-dir"),
    (["--ckpt-dir", "x", "--resume", "--overwrite"], "contradict"),
    (["--ckpt-every", "0", "--ckpt-dir", "x"], "--ckpt-every (trainer.checkpoint.every_n_steps: must be an int >= 1"),
])
def test_trainer_usage_errors_exit_2(tmp_path, flags, message):
    result = run("jaxlight", *LINEAR, "--out", str(tmp_path), *flags)
    assert result.returncode == 2
    one_line_error(result, message)


@pytest.mark.parametrize("program", ["jaxlight", "torch-ref"])
def test_a_batch_larger_than_the_dataset_warns(tmp_path, program):
    flags = ["--loader", "memory"] if program == "torch-ref" else []
    result = run(program, *LINEAR, "--epochs", "1", "--batch-size", "10000", "--out", str(tmp_path), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: --batch-size 10000 is larger than the training set (8192 examples)" in result.stderr


# --- 9, 12. a stray file and another model's checkpoint do not stop a resume --------------------

def test_resume_skips_another_models_checkpoint_and_ignores_stray_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = [*LINEAR, "--out", str(tmp_path / "out"), "--ckpt-dir", str(ckpt)]
    assert run("jaxlight", *common, "--epochs", "2").returncode == 0
    (ckpt / "step_000000256" / ".DS_Store").write_bytes(b"\0junk")
    drop = ("import sys, numpy as np\nfrom jaxlight import build_model, create_train_state, optim, tasks\n"
            "from jaxlight.checkpoint import save_checkpoint\n"
            "s = create_train_state(build_model('softmax'), optim.adam(1e-3), tasks.multiclass())\n"
            "save_checkpoint(sys.argv[1], s.replace(step=np.int32(9999)))")
    subprocess.run([sys.executable, "-c", drop, str(ckpt)], check=True, env=_env(), timeout=300)
    resumed = run("jaxlight", *common, "--epochs", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: skipping checkpoint of another model: " in resumed.stderr
    assert "step_000000009999" not in resumed.stdout and "step_000009999" in resumed.stderr
    assert "ignoring 1 file(s) not in its manifest: ['.DS_Store']" in resumed.stderr
    assert f"resumed from {ckpt / 'step_000000256'}" in resumed.stdout
    assert "step_000009999" in _steps(ckpt)  # never pruned: this run did not write it


# --- a failed asynchronous save of `jaxlight fit`: one line on stderr, the details in train.log -----

FIT_FULL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # (the logs fit, the arrays do not)
sys.argv[0] = "jaxlight"
runpy.run_module("jaxlight.cli", run_name="__main__")
"""

@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_async_save_of_jaxlight_fit_is_one_line_with_the_details_in_train_log(tmp_path, verbose):
    (tmp_path / "run.yaml").write_text(userpkg_run(8192, 1e-3, max_epochs=2))
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    env = _env(JAX_ENABLE_COMPILATION_CACHE="false", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    result = subprocess.run([sys.executable, "-c", FIT_FULL_DISK, "fit", "--config", str(tmp_path / "run.yaml"),
                             "--trainer.out", str(out), "--trainer.checkpoint.dirpath", str(ckpt),
                             *(["--verbose"] if verbose else [])],
                            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    if verbose:  # (the details on stderr instead, the error line last)
        assert "Traceback" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("jaxlight: error: could not write checkpoint")
        return
    one_line_error(result, "could not write checkpoint", "File too large", f"details in {out / 'train.log'}")
    log = (out / "train.log").read_text()
    assert "Traceback" in log and "File too large" in log and len(log.splitlines()) > 10, log[-3000:]
    assert _steps(ckpt) == []
