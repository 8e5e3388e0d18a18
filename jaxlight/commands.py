"""What every jaxlight command line shares (``jaxlight train``, ``compare``, the config
commands, ``torch-ref``): exit codes, usage errors, output folders, signal handlers and
:func:`run_cli`, which turns every expected failure into one line. Below the commands in the
import order, so none of them imports another; only the standard library at import time."""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from jaxlight.recipes import Recipe

__all__ = ["EXIT_DIVERGED", "EXIT_FAILED", "EXIT_USAGE", "MAX_SEED", "Interrupted", "UsageError", "install_signal_handlers",
           "log_details", "prepare_output_dir", "recipe_from_args", "restore_signal_handlers", "run_cli",
           "stopped_line"]

EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED = 1, 2, 3


MAX_SEED = 2**63  # jax.random.key takes a signed 64-bit int; numpy's default_rng no negatives


class UsageError(ValueError):
    """A flag or path the command line refuses before any work; exit code 2."""


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe the flags ask for. Raises :class:`UsageError` naming the flag."""
    for flag in ("epochs", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be > 0 and finite, got {args.lr}")
    if not 0 <= args.seed < MAX_SEED:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    from jaxlight.recipes import recipe_for

    return recipe_for(args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.optimizer, seed=args.seed)


def prepare_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (a folder the run writes into) now, and check that it takes files.

    Called before any data loads, so that a bad ``--out``/``--ckpt-dir`` fails in a second, not
    after hours of training. Raises :class:`UsageError` naming the flag and the cause.
    """
    p = Path(path)
    try:
        if p.is_symlink() and not p.exists():
            raise UsageError(f"{flag} {p} is a broken symlink or a symlink loop")
        if p.exists() and not p.is_dir():
            raise UsageError(f"{flag} {p} is a file, not a folder")
        p.mkdir(parents=True, exist_ok=True)
        import tempfile

        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {p}: cannot create or write there ({exc.strerror or exc})") from None
    return p


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run (after saving, when it could)."""

    def __init__(self, signum: int | None, reported: bool = True):
        self.signum = signum or signal.SIGTERM
        self.reported = reported  # (the message saying what was saved is out already)
        super().__init__(signal.Signals(self.signum).name)


def stopped_line(trainer, resume: str, nothing_saved: str) -> str:
    """What a command line says when SIGINT/SIGTERM stopped its fit: the step, the checkpoint
    saved and how to resume (``resume``), or why nothing was saved (``nothing_saved``)."""
    name = signal.Signals(trainer.stop_signal or signal.SIGTERM).name
    saved = getattr(trainer, "interrupt_checkpoint", None)
    if saved is None:
        return f"stopped by {name} at step {trainer.global_step}; nothing was saved ({nothing_saved})"
    return f"stopped by {name} at step {trainer.global_step}; saved {saved}. {resume}"


def install_signal_handlers(program: str) -> dict:
    """SIGINT and SIGTERM end the process at once with exit 128 + signal and one line; called
    first thing by both command lines. ``Trainer.fit`` replaces these handlers while it runs
    (it saves first) and puts them back. Returns the previous handlers (``main`` restores them
    when it returns, for callers that run it in their own process)."""
    def handler(signum, frame):
        try:
            sys.stdout.flush()
        except (OSError, RuntimeError, ValueError):  # (a flush interrupted by this very signal)
            pass
        name = signal.Signals(signum).name
        os.write(2, f"{program}: stopped by {name}; nothing more was saved\n".encode())
        os._exit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        return {}  # (only the main thread may set handlers; a caller in a thread keeps its own)
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signal_handlers(previous: dict) -> None:
    """Put back the handlers :func:`install_signal_handlers` returned."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def log_details(out: Path, verbose: bool) -> Path | None:
    """Send library logs and background threads' tracebacks (Orbax writes its own on a full
    disk) to ``<out>/train.log``, or to stderr with --verbose, so that stderr holds the one
    error line."""
    import logging

    root = logging.getLogger()
    path = None
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
    else:
        path = out / "train.log"
        handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    logging.raiseExceptions = False  # (a log that cannot be written, on a full disk, stays quiet)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        threading.excepthook = lambda hook: logging.getLogger("thread").error(
            "exception in thread %s", hook.thread.name if hook.thread else "?",
            exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))
        sys.unraisablehook = lambda hook: logging.getLogger("unraisable").error(
            "%s: %s", hook.err_msg or "exception ignored", hook.object,
            exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))
    return path


def _warning_line(message, category, filename, lineno, file=None, line=None):
    """Warnings (a skipped corrupt checkpoint, a stray file, an accepted config change) as one
    line each, without the source line Python adds."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _failed_save(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, a failed checkpoint write."""
    checkpoint = sys.modules.get("jaxlight.checkpoint")  # (not imported: nothing was saved)
    if checkpoint is None:
        return False
    from jaxlight.errors import exception_chain

    return any(isinstance(e, checkpoint.CheckpointWriteError) for e in exception_chain(exc))


def run_cli(program: str, run, args: argparse.Namespace, errors: dict) -> int:
    """Run ``run(args)`` and turn every expected failure into one line on stderr and its exit
    code (``errors``: exception class -> code; see the module docstring). Details go to the log
    (``--verbose``: stderr)."""
    import logging
    import traceback

    # Outside fit, the handlers of install_signal_handlers stop at once; inside, the Trainer's
    # finish the chunk and save first.
    shown, warnings.showwarning = warnings.showwarning, _warning_line
    warnings.filterwarnings("ignore", message=".*stopping without a checkpoint")  # (the CLI says it once)
    try:
        try:
            run(args)
            return 0
        except Interrupted as exc:
            if not exc.reported:
                print(f"{program}: stopped by {exc}; nothing more was saved", file=sys.stderr, flush=True)
            return 128 + exc.signum
        except KeyboardInterrupt:
            print(f"{program}: aborted by Ctrl-C; nothing more was saved", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        except Exception as exc:  # noqa: BLE001 - mapped below, or re-raised
            code = next((c for cls, c in errors.items() if isinstance(exc, cls)), None)
            if code is None:
                raise
            log = getattr(args, "log_file", None)
            if getattr(args, "verbose", False):
                traceback.print_exc()
            elif log is not None:
                logging.getLogger(program).error("%s", exc, exc_info=True)
            where = f" (details in {log})" if code == EXIT_FAILED and log is not None and log.exists() else ""
            message = " ".join(str(exc).split("\n"))  # (one line, whatever the exception holds)
            line, usage = f"{program}: error: {message}{where}", isinstance(exc, UsageError)
            failed_save = _failed_save(exc)
        # After a failed checkpoint write, the failed run's objects, held until now by the
        # traceback, are freed before the error line. What Orbax says as they go ("coroutine ...
        # was never awaited") is a detail of that failure: it goes to the log (--verbose: stderr,
        # before the error line), so the error stays the one line, and the last, on stderr.
        # (Only then: a full collection takes a noticeable part of a second in a large process.)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            if failed_save:
                gc.collect()
        for w in said:
            if getattr(args, "verbose", False) or log is None:
                print(f"warning: {w.message}", file=sys.stderr, flush=True)
            else:
                logging.getLogger(program).warning("%s", w.message)
        print(line, file=sys.stderr, flush=True)
        if usage:
            raise SystemExit(EXIT_USAGE) from None  # (as argparse does for the flags it checks)
        return code
    finally:
        warnings.showwarning = shown
        for lock in ("out_lock", "ckpt_lock"):  # (taken before the data loads; see jaxlight.cli)
            if getattr(args, lock, None) is not None:
                getattr(args, lock).release()

