"""``jaxlight.launch`` in-process: its command line, each process's environment, and how it
stops a run when one process fails. The programs it starts here are two-line Python scripts
without JAX (tens of milliseconds each); the JAX runs it launches are in tests/test_multihost.py
(the integration tier)."""

import io
import time

import pytest

from jaxlight import launch
from jaxlight.parallel import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "2"], "give the program after '--'"),
    (["--", "-c", "pass"], "the following arguments are required: --nproc"),
])
def test_bad_command_lines_exit_2_naming_the_problem(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        launch.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_process_count_below_one_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="nproc must be >= 1, got 0"):
        launch.main(["--nproc", "0", "--", "-c", "pass"])


def test_each_process_gets_its_id_the_coordinator_and_its_fake_devices():
    base = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8", "KEEP": "1"}
    env = launch.process_env(1, 2, "127.0.0.1:1234", 2, base=base)
    assert (env[ENV_PROCESS_ID], env[ENV_NUM_PROCESSES], env[ENV_COORDINATOR]) == ("1", "2", "127.0.0.1:1234")
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false",
                                        "--xla_force_host_platform_device_count=2"]
    assert env["KEEP"] == "1" and base["XLA_FLAGS"].endswith("=8")  # the caller's copy untouched
    assert "XLA_FLAGS" not in launch.process_env(0, 2, "h:1", None, base={})  # GPUs: left alone


def test_success_is_0_and_a_failure_is_the_first_failing_code():
    assert launch.launch(["-c", "pass"], 2, log=io.StringIO()) == 0
    log = io.StringIO()
    program = "import os, sys\nsys.exit(5 if os.environ['JAXLIGHT_PROCESS_ID'] == '1' else 0)\n"
    assert launch.launch(["-c", program], 2, log=log) == 5
    assert "process 1 exited with code 5 (all exit codes: [0, 5])" in log.getvalue()


def test_a_hung_process_is_terminated_after_the_grace():
    program = ("import os, time\n"
               "if os.environ['JAXLIGHT_PROCESS_ID'] == '1': raise SystemExit(7)\n"
               "time.sleep(600)\n")
    log = io.StringIO()
    t0 = time.monotonic()
    assert launch.launch(["-c", program], 2, grace=0.5, log=log) == 7
    assert "terminating process(es) [0]" in log.getvalue()
    assert time.monotonic() - t0 < 30
