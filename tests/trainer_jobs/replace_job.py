"""Killed with SIGKILL at one moment of a checkpoint's replacement: the tests then resume.

    python tests/trainer_jobs/replace_job.py MOMENT CKPT_DIR fit -- <jaxlight fit arguments>
    python tests/trainer_jobs/replace_job.py MOMENT CKPT_DIR save

MOMENT is when this process kills itself:

- ``disappear``: the moment a complete checkpoint would leave ``CKPT_DIR/step_*`` while no newer
  complete one exists (renamed aside or deleted: ``os.rename``, ``os.replace``,
  ``shutil.rmtree``); pruning an older checkpoint does not count;
- ``before-exchange`` / ``after-exchange``: right before / after a replacement written in its
  staging folder takes the old checkpoint's place (``jaxlight.checkpoint._exchange``).

``fit`` runs ``jaxlight fit`` with the given arguments; ``save`` saves the linear model's state at
step 6 twice with ``save_checkpoint`` (the second replaces the first). A moment that never
comes lets the process finish (exit 0).
"""

import os
import re
import shutil
import signal
import sys
from pathlib import Path

MOMENT, ROOT, MODE = sys.argv[1], Path(sys.argv[2]).absolute(), sys.argv[3]


def _complete_steps() -> list[Path]:
    found = [p for p in ROOT.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / "manifest.json").exists()]
    return sorted(found)


def _newest_complete(path) -> bool:
    path = Path(path).absolute()
    steps = _complete_steps()
    return path.parent == ROOT and bool(steps) and path == steps[-1]


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if MOMENT == "disappear":
    real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree

    def rename(src, dst, *args, **kwargs):
        if _newest_complete(src):
            _die()
        return real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if _newest_complete(src) or _newest_complete(dst):
            _die()
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if _newest_complete(path):
            _die()
        return real_rmtree(path, *args, **kwargs)

    os.rename, os.replace, shutil.rmtree = rename, replace, rmtree
else:
    from jaxlight import checkpoint

    real_exchange = checkpoint._exchange

    def exchange(new, final):
        if MOMENT == "before-exchange":
            _die()
        real_exchange(new, final)
        if MOMENT == "after-exchange":
            _die()

    checkpoint._exchange = exchange

if MODE == "fit":
    from jaxlight.cli import main

    sys.exit(main(["fit", *sys.argv[sys.argv.index("--") + 1:]]))
else:
    import numpy as np

    from jaxlight import build_model, create_train_state, optim, tasks
    from jaxlight.checkpoint import save_checkpoint

    state = create_train_state(build_model("linear", 0), optim.sgd(0.05), tasks.regression(), seed=0)
    for version in (1, 2):
        save_checkpoint(ROOT, state.replace(step=np.int32(6)), {"version": version})
