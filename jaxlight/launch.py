"""Start N local processes of one program as a multi-process JAX run; stop them all if one dies.

``python -m jaxlight.launch --nproc 2 --local-devices 2 -- -m jaxlight.cli train --strategy sharded --distributed``

Each process gets the environment ``jaxlight.parallel.initialize`` reads
(``JAXLIGHT_COORDINATOR``, ``JAXLIGHT_NUM_PROCESSES``, ``JAXLIGHT_PROCESS_ID``) and, with
``--local-devices K``, ``K`` fake CPU devices (``XLA_FLAGS``). What follows ``--`` is the
command line of ``python`` itself (``-m module args`` or ``script.py args``).

This is the one-machine counterpart of ``torchrun --nproc_per_node``. On a cluster the
scheduler starts the processes instead (``srun``, a TPU pod's ``gcloud ... --worker=all``) and
``jax.distributed.initialize()`` finds its peers itself; see ``the README``.

Failure handling: when a process exits with an error, the others are given ``--grace``
seconds to stop on their own (JAX's coordination service notices the missing heartbeats and
terminates them with "another task died"), then they are terminated. The launcher exits with
the first failing process's code and says which process it was, so a run never hangs on a
dead peer.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from jaxlight.parallel import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

__all__ = ["free_port", "process_env", "launch", "main"]


def free_port() -> int:
    """A TCP port that is free on this machine now (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, nproc: int, coordinator: str, local_devices: int | None,
                base: dict | None = None) -> dict:
    """The environment of process ``process_id`` of ``nproc``."""
    env = dict(os.environ if base is None else base)
    env[ENV_COORDINATOR] = coordinator
    env[ENV_NUM_PROCESSES] = str(nproc)
    env[ENV_PROCESS_ID] = str(process_id)
    if local_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={local_devices}"])
    env.setdefault("PYTHONUNBUFFERED", "1")  # so a dying process's last lines are not lost
    return env


def _stop(procs: list[subprocess.Popen], wait: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + wait
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: list[str], nproc: int, local_devices: int | None = None, port: int | None = None,
           grace: float = 30.0, timeout: float | None = None, log=sys.stderr) -> int:
    """Run ``python *command`` as ``nproc`` processes; returns the run's exit code.

    Args:
        command: arguments to the Python interpreter, e.g. ``["-m", "jaxlight.cli", "train"]``.
        nproc: processes to start on this machine.
        local_devices: fake CPU devices per process (None: leave the devices alone, e.g. GPUs).
        port: the coordinator's port (default: a free one).
        grace: seconds the survivors get to stop on their own after a process fails.
        timeout: stop everything after this many seconds (None: no limit).

    Returns:
        0 when every process succeeded; else the first failing process's code (1 for a
        signal), or 124 on ``timeout``.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not command:
        raise ValueError("nothing to launch: give the program after '--', e.g. -- -m jaxlight.cli train")
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs = [subprocess.Popen([sys.executable, *command],
                              env=process_env(i, nproc, coordinator, local_devices))
             for i in range(nproc)]
    start = time.monotonic()
    failed_at = None
    first_failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            for i, c in enumerate(codes):
                if c not in (None, 0) and first_failure is None:
                    first_failure = (i, c)
                    failed_at = time.monotonic()
                    print(f"jaxlight.launch: process {i} of {nproc} exited with code {c}; "
                          f"waiting up to {grace:g} s for the others to stop", file=log, flush=True)
            if failed_at is not None and time.monotonic() - failed_at > grace:
                alive = [i for i, p in enumerate(procs) if p.poll() is None]
                print(f"jaxlight.launch: terminating process(es) {alive}, still running {grace:g} s "
                      f"after process {first_failure[0]} failed", file=log, flush=True)
                _stop(procs, 5.0)
                break
            if timeout is not None and time.monotonic() - start > timeout:
                print(f"jaxlight.launch: timeout after {timeout:g} s; terminating all processes",
                      file=log, flush=True)
                _stop(procs, 5.0)
                return 124
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs, 5.0)
        raise
    codes = [p.returncode for p in procs]
    if first_failure is None:
        first_failure = next(((i, c) for i, c in enumerate(codes) if c != 0), None)
    if first_failure is None:
        return 0
    i, code = first_failure
    after = f"; the others stopped {time.monotonic() - failed_at:.1f} s later" if failed_at else ""
    print(f"jaxlight.launch: run failed: process {i} exited with code {code} "
          f"(all exit codes: {codes}){after}", file=log, flush=True)
    return code if code > 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m jaxlight.launch", description=__doc__.splitlines()[0],
                                     usage="%(prog)s --nproc N [--local-devices K] [...] -- PYTHON_ARGS")
    parser.add_argument("--nproc", type=int, required=True, help="processes to start on this machine")
    parser.add_argument("--local-devices", type=int,
                        help="fake CPU devices per process (XLA_FLAGS); leave unset on GPUs")
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the other processes get to stop after one fails")
    parser.add_argument("--timeout", type=float, help="stop the whole run after this many seconds")
    args = parser.parse_args(argv)
    if not command:
        parser.error("give the program after '--', e.g. -- -m jaxlight.cli train --strategy sharded --distributed")
    return launch(command, args.nproc, args.local_devices, args.port, args.grace, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
