"""Both command lines' refusals, exit codes and messages, run in-process through
``main([...])``: another run's checkpoints, a locked folder, SIGINT and SIGTERM, bad paths, an
explicit --data-dir without MNIST, NaN, usage errors, a strict resume, stray files.

The linear model trains on its synthetic data (8192 examples, 128 steps an epoch): no MNIST is
read. tests/test_reliability_cli.py runs the same behaviours as a user does, each command in
its own process (real signals from outside, a lock held by another process, a full disk under
RLIMIT_FSIZE); it is in the integration tier.
"""

import fcntl
import json
import os
import signal
from pathlib import Path

import pytest

from _support import BAD_OUTPUT_PATHS, bad_output_paths, one_line_error
from jaxlight import report

LINEAR = ["train", "--model", "linear"]


def _steps(folder):
    return sorted(p.name for p in Path(folder).glob("step_*"))


# --- another run's checkpoints are never deleted; a locked folder is refused ------------------

def test_a_folder_with_checkpoints_needs_resume_or_overwrite(cli_main, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = cli_main("jaxlight", *LINEAR, "--epochs", "3", "--out", str(tmp_path / "a"), "--ckpt-dir", str(ckpt))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: (p / "manifest.json").read_bytes() for p in ckpt.glob("step_*")}
    assert len(before) >= 2
    refused = cli_main("jaxlight", *LINEAR, "--epochs", "1", "--out", str(tmp_path / "b"), "--ckpt-dir", str(ckpt))
    assert refused.returncode == 2
    one_line_error(refused, f"--ckpt-dir {ckpt} already holds checkpoints", "--resume", "--overwrite")
    assert {p: (p / "manifest.json").read_bytes() for p in ckpt.glob("step_*")} == before
    assert "jaxlight: linear" not in refused.stdout  # refused before any data or model was built
    replaced = cli_main("jaxlight", *LINEAR, "--epochs", "1", "--out", str(tmp_path / "c"), "--ckpt-dir", str(ckpt),
                        "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert _steps(ckpt) == ["step_000000128"]


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(cli_main, tmp_path):
    """Another process's lock, as the kernel sees it: an ``flock`` on ``<ckpt>/.lock`` through
    another open file (flock locks belong to the open file, so this process's own lock_folder
    meets it as it would meet another process's)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    fd = os.open(ckpt / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"pid 4242 on host elsewhere, since 2026-01-01 00:00:00\n", 0)
        result = cli_main("jaxlight", *LINEAR, "--out", str(tmp_path / "out"), "--ckpt-dir", str(ckpt))
    finally:
        os.close(fd)
    assert result.returncode == 2
    one_line_error(result, "is in use by another run", "pid 4242 on host elsewhere")
    assert _steps(ckpt) == [] and not (tmp_path / "out" / "metrics.json").exists()


# --- SIGINT saves like SIGTERM; exit 130 / 143; nothing to save is not a success ----------------

@pytest.fixture
def signal_after_epoch(monkeypatch, request):
    """``signal_after_epoch(n, signum, ...)``: the process sends itself each ``signum`` right
    after it prints epoch ``n``'s line, mid-run, as ``kill`` from a shell would;
    ``signal_after_epoch(None)`` stops that."""

    real = report.epoch_line
    # As in a terminal: Ctrl-C raises KeyboardInterrupt, whatever this process inherited (a
    # background start leaves SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))

    def arm(epoch, *signums):
        def line_then_signal(index, total, *args, **kwargs):
            text = real(index, total, *args, **kwargs)
            if epoch is not None and index + 1 == epoch:
                for signum in signums:
                    signal.raise_signal(signum)
            return text

        monkeypatch.setattr(report, "epoch_line", line_then_signal)

    return arm


def test_ctrl_c_finishes_the_chunk_saves_says_how_to_resume_and_exits_130(cli_main, tmp_path, signal_after_epoch):
    ckpt = tmp_path / "ckpt"
    common = [*LINEAR, "--out", str(tmp_path / "out"), "--ckpt-dir", str(ckpt)]
    signal_after_epoch(2, signal.SIGINT)
    result = cli_main("jaxlight", *common, "--epochs", "50")
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("stopped by SIGINT"))
    saved = Path(line.split("saved ")[1].split(". ")[0])
    assert saved.is_dir() and f"--resume --ckpt-dir {ckpt}" in line
    assert not (tmp_path / "out" / "metrics.json").exists()
    epochs_done = int(saved.name.split("_")[1]) // 128
    assert epochs_done >= 2
    signal_after_epoch(None)
    resumed = cli_main("jaxlight", *common, "--epochs", str(epochs_done + 1), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved}" in resumed.stdout
    assert len(json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]) == epochs_done + 1


def test_sigterm_with_nothing_to_save_exits_143_not_0(cli_main, tmp_path, signal_after_epoch):
    signal_after_epoch(1, signal.SIGTERM)
    result = cli_main("jaxlight", *LINEAR, "--epochs", "50", "--out", str(tmp_path / "out"))
    assert result.returncode == 143
    assert "nothing was saved (no --ckpt-dir)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.fixture
def fit_signal_after_epoch(monkeypatch, request):
    """``jaxlight fit``'s twin of ``signal_after_epoch``: ``arm(n, signum)`` sends ``signum``
    right after epoch ``n``'s line."""
    from jaxlight import configcli

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    real = configcli._epoch_lines

    def arm(epoch, signum):
        def lines(max_epochs):
            callback = real(max_epochs)
            printed = callback.on_epoch_end

            def on_epoch_end(trainer, state, metrics):
                printed(trainer, state, metrics)
                if trainer.epoch == epoch:
                    signal.raise_signal(signum)

            callback.on_epoch_end = on_epoch_end
            return callback

        monkeypatch.setattr(configcli, "_epoch_lines", lines)

    return arm


FIT = ["fit", "--config", "linear", "--trainer.max_epochs", "50", "--trainer.logging.enable_progress_bar", "false"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_jaxlight_fit_stopped_by_a_signal_says_what_was_saved_and_the_command_that_resumes(
        cli_main, tmp_path, fit_signal_after_epoch, signum):
    import shlex

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    fit_signal_after_epoch(2, signum)
    argv = [*FIT, "--trainer.checkpoint.dirpath", str(ckpt), "--trainer.out", str(out)]
    result = cli_main("jaxlight", *argv)
    assert result.returncode == 128 + signum and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert line.startswith(f"stopped by {name} at step 256; saved {ckpt / 'step_000000256'}. Resume with: "), line
    command = shlex.split(line.split("Resume with: ")[1])
    assert command[:2] == ["jaxlight", "fit"] and command[-2:] == ["--ckpt_path", "last"]
    fit_signal_after_epoch(None, signum)
    epochs = command.index("--trainer.max_epochs") + 1
    resumed = cli_main("jaxlight", *command[1:epochs], "3", *command[epochs + 1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta = json.loads((ckpt / "step_000000384" / "meta.json").read_text())
    assert meta["segments"][-1]["from_step"] == 256


def test_jaxlight_fit_stopped_with_nothing_to_save_says_so(cli_main, tmp_path, fit_signal_after_epoch):
    fit_signal_after_epoch(1, signal.SIGTERM)
    result = cli_main("jaxlight", *FIT, "--trainer.out", str(tmp_path / "out"))
    assert result.returncode == 143, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == ("stopped by SIGTERM at step 128; nothing was saved (no "
                                                      "trainer.checkpoint.dirpath)")


def test_a_second_ctrl_c_aborts_with_130_and_no_traceback(cli_main, tmp_path, signal_after_epoch):
    signal_after_epoch(1, signal.SIGINT, signal.SIGINT)
    result = cli_main("jaxlight", *LINEAR, "--epochs", "50", "--out", str(tmp_path / "out"),
                      "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "16")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.json").exists()


# torch-ref's loop has no fit to finish: its handlers end the process at once (os._exit), which
# would end this test process too; tests/test_reliability_cli.py's twin sends it the signal from
# outside, in the integration tier.


# --- output paths are checked and created before any data loads ---------------------------------

@pytest.mark.parametrize("case", BAD_OUTPUT_PATHS)
def test_a_bad_output_path_fails_before_the_data_loads(cli_main, tmp_path, case):
    flags, message = bad_output_paths(tmp_path)[case]
    # --data-dir names nothing: had the data been loaded first, that would be the error.
    result = cli_main("jaxlight", "train", "--model", "mlp", "--data-dir", str(tmp_path / "no-data"), *flags)
    assert result.returncode == 2
    one_line_error(result, flags[-2], message)


def test_torch_ref_checks_out_before_the_data_loads_too(cli_main, tmp_path):
    flags, message = bad_output_paths(tmp_path)["out is a file"]
    result = cli_main("torch-ref", "train", "--model", "mlp", "--data-dir", str(tmp_path / "no-data"), *flags)
    assert result.returncode == 2
    one_line_error(result, "--out", message)


# --- an explicit --data-dir is used or refused, never replaced by $JAXLIGHT_DATA ---------------

@pytest.mark.parametrize("program, case", [("jaxlight", "a file"), ("jaxlight", "three of the four files"),
                                           ("jaxlight", "empty"), ("torch-ref", "three of the four files")])
def test_an_explicit_data_dir_without_mnist_is_refused(cli_main, tmp_path, data_dir, program, case):
    target = tmp_path / "data"
    if case == "a file":
        target.write_text("not MNIST")
        message = "is a file, not a folder"
    elif case == "three of the four files":
        raw = target / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
            (raw / name).symlink_to(data_dir / "MNIST" / "raw" / name)
        message = "holds 3 of the 4 MNIST files; missing: t10k-labels-idx1-ubyte"
    else:  # an empty folder is used: downloaded into (here refused by a dead proxy, quickly)
        target.mkdir()
        message = "could not download"
    env = {"JAXLIGHT_DATA": str(data_dir), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    flags = ["--loader", "memory"] if program == "torch-ref" else []
    result = cli_main(program, "train", "--model", "softmax", "--epochs", "1", "--data-dir", str(target),
                      "--out", str(tmp_path / "out"), *flags, env=env)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.json").exists()  # $JAXLIGHT_DATA's copy was not used


# --- NaN: both command lines stop, name the step, exit 3 ---------------------------------------

def test_both_clis_stop_on_nan_at_the_same_step_with_the_same_code(cli_main, tmp_path):
    lines = {}
    for program in ("jaxlight", "torch-ref"):
        flags = ["--loader", "memory"] if program == "torch-ref" else []
        result = cli_main(program, *LINEAR, "--optimizer", "sgd", "--lr", "1e6", "--out", str(tmp_path / program),
                          *flags)
        assert result.returncode == 3
        lines[program] = one_line_error(result, "training loss is")
        assert not (tmp_path / program / "metrics.json").exists()
    step = lambda line: line.split(" at step ")[1].split(")")[0] + ")"  # noqa: E731
    assert step(lines["jaxlight"]) == step(lines["torch-ref"]) == "4 (epoch 1, batch 4)"


# --- usage errors exit 2, however they are found ------------------------------------------------

@pytest.mark.parametrize("program", ["jaxlight", "torch-ref"])
@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "abc"], "invalid int value: 'abc'"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--lr", "inf"], "--lr must be > 0 and finite"),
])
def test_usage_errors_exit_2(cli_main, tmp_path, program, flags, message):
    result = cli_main(program, *LINEAR, "--out", str(tmp_path), *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "--resume needs --ckpt-dir"),
    (["--ckpt-dir", "x", "--resume", "--overwrite"], "contradict"),
    (["--ckpt-every", "0", "--ckpt-dir", "x"], "--ckpt-every (trainer.checkpoint.every_n_steps: must be an int >= 1"),
])
def test_trainer_usage_errors_exit_2(cli_main, tmp_path, flags, message):
    result = cli_main("jaxlight", *LINEAR, "--out", str(tmp_path), *flags)
    assert result.returncode == 2
    one_line_error(result, message)


@pytest.mark.parametrize("program", ["jaxlight", "torch-ref"])
def test_a_batch_larger_than_the_dataset_warns(cli_main, tmp_path, program):
    flags = ["--loader", "memory"] if program == "torch-ref" else []
    result = cli_main(program, *LINEAR, "--epochs", "1", "--batch-size", "10000", "--out", str(tmp_path), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: --batch-size 10000 is larger than the training set (8192 examples)" in result.stderr


# --- a resume with another setup is refused, or accepted and recorded ---------------------------

def test_resume_with_another_setup_is_refused_accepted_and_recorded(cli_main, tmp_path):
    common = [*LINEAR, "--out", str(tmp_path / "out"), "--ckpt-dir", str(tmp_path / "ckpt")]
    assert cli_main("jaxlight", *common, "--optimizer", "adamw", "--epochs", "2").returncode == 0
    refused = cli_main("jaxlight", *common, "--optimizer", "adam", "--lr", "0.01", "--seed", "7", "--epochs", "3",
                       "--resume")
    assert refused.returncode == 2
    one_line_error(refused, "optimizer: adamw in the checkpoint, adam now", "lr: 0.05 in the checkpoint, 0.01 now",
                   "seed: 0 in the checkpoint, 7 now", "optimizer chain:", "--allow-config-change")
    accepted = cli_main("jaxlight", *common, "--optimizer", "adam", "--epochs", "3", "--resume",
                        "--allow-config-change")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "warning: resuming" in accepted.stderr and "optimizer: adamw in the checkpoint, adam now" in accepted.stderr
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    first, second = summary["segments"]
    assert (first["run"]["optimizer"], first["from_step"], first["to_step"]) == ("adamw", 0, 256)
    assert (second["run"]["optimizer"], second["from_step"], second["to_step"]) == ("adam", 256, 384)
    assert "optimizer: adamw in the checkpoint, adam now" in second["accepted_changes"]
    behind = cli_main("jaxlight", *common, "--optimizer", "adam", "--epochs", "2", "--resume")
    assert behind.returncode == 2
    one_line_error(behind, "already at epoch 3", "past max_epochs=2 (--epochs)")


# --- a stray file and another model's checkpoint do not stop a resume ---------------------------

def test_resume_skips_another_models_checkpoint_and_ignores_stray_files(cli_main, tmp_path):
    import numpy as np

    from jaxlight import build_model, create_train_state, optim, tasks
    from jaxlight.checkpoint import save_checkpoint

    ckpt = tmp_path / "ckpt"
    common = [*LINEAR, "--out", str(tmp_path / "out"), "--ckpt-dir", str(ckpt)]
    assert cli_main("jaxlight", *common, "--epochs", "2").returncode == 0
    (ckpt / "step_000000256" / ".DS_Store").write_bytes(b"\0junk")
    other = create_train_state(build_model("softmax"), optim.adam(1e-3), tasks.multiclass())
    save_checkpoint(ckpt, other.replace(step=np.int32(9999)))
    resumed = cli_main("jaxlight", *common, "--epochs", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: skipping checkpoint of another model: " in resumed.stderr
    assert "step_000009999" in resumed.stderr and "step_000009999" not in resumed.stdout
    assert "ignoring 1 file(s) not in its manifest: ['.DS_Store']" in resumed.stderr
    assert f"resumed from {ckpt / 'step_000000256'}" in resumed.stdout
    assert "step_000009999" in _steps(ckpt)  # never pruned: this run did not write it
