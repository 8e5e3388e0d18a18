"""SIGINT and SIGTERM at any moment of start-up, and with SIGINT ignored by the parent: exit
130 / 143, one line, no traceback, no crash. Each case runs a command line in a subprocess.

A run of the linear model spends its first seconds importing JAX, building the data and
compiling; the signals land over that stretch. The handlers are installed before anything heavy
is imported (``jaxlight.cli.install_signal_handlers``). A signal in the interpreter's own start-up,
before any jaxlight code runs (about 0.1 s on a quiet machine, several times that on a loaded
one), is Python's business: the first moment is set past it, measured on this machine as the
time a bare ``import jaxlight.cli`` takes in a fresh interpreter, doubled.
"""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_reliability_cli import LINEAR, MODULES, ROOT, _env

pytestmark = pytest.mark.integration



def _moments(tmp_path, count=20):
    """``count`` moments from past the interpreter's start-up to the first epoch's line, as
    measured on this machine now: the signals land over the whole of start-up however fast it
    is (with the compiled programs cached, or on a loaded machine), the last ones as training
    begins."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import jaxlight.cli"], env=_env(), cwd=ROOT, check=True, timeout=120)
    first = max(0.2, 2 * (time.perf_counter() - t0))
    return np.round(np.linspace(first, max(first + 0.5, _start_up_seconds(tmp_path)), count), 3).tolist()


def _start_up_seconds(tmp_path):
    """Seconds from launch to the first epoch's line, in the second of two runs (the first fills
    the compilation cache, as it is for the runs that follow)."""
    for probe in ("probe-0", "probe-1"):
        t0 = time.perf_counter()
        proc = _start("jaxlight", tmp_path / probe)
        for line in proc.stdout:
            if line.startswith("epoch 1/"):
                break
        seconds = time.perf_counter() - t0
        proc.kill()
        proc.communicate(timeout=60)
    return seconds


def _start(program, tmp_path, *flags, ignore_sigint=False):
    return subprocess.Popen([sys.executable, "-m", MODULES[program], *LINEAR, "--epochs", "100000",
                             "--out", str(tmp_path / "out"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)


def test_a_signal_at_any_moment_of_start_up_exits_with_its_code_and_one_line(tmp_path):
    in_start_up = 0
    moments = _moments(tmp_path)
    for i, delay in enumerate(moments):
        signum = (signal.SIGINT, signal.SIGTERM)[i % 2]
        proc = _start("jaxlight", tmp_path / str(i))
        time.sleep(delay)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
        case = f"{signal.Signals(signum).name} after {delay} s: exit {proc.returncode}\n{err[-3000:]}"
        assert proc.returncode == 128 + signum, case
        assert "Traceback" not in err and "Fatal Python error" not in err, case
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and f"stopped by {signal.Signals(signum).name}" in lines[-1], case
        if "epoch 1/" not in out:  # (stopped before training: the start-up handlers' one line)
            in_start_up += 1
            assert len(lines) == 1 and lines[0].endswith("nothing more was saved"), case
    assert in_start_up >= 10, f"only {in_start_up} of {len(moments)} signals landed before training"


@pytest.mark.parametrize("program, flags", [("torch-ref", ["--loader", "memory"]), ("jaxlight", [])])
def test_a_run_started_with_sigint_ignored_still_stops_on_sigint_with_130(tmp_path, program, flags):
    """``nohup cmd &`` starts a process with SIGINT ignored; the command lines install their own
    handlers, so Ctrl-C semantics (a kill -INT from a script) hold there too."""
    proc = _start(program, tmp_path, *flags, ignore_sigint=True)
    for line in proc.stdout:
        if "epoch 2/" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT" in err
