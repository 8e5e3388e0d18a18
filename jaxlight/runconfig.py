"""What a run was: the configuration a checkpoint records, and the check that a resume matches it.

A checkpoint's ``meta.json`` holds, besides the arrays' layout:

- ``run``: the user's description of the run (``TrainerConfig.run_config``; ``jaxlight train`` fills
  it with the model, task, dataset, optimizer and its hyperparameters, learning-rate schedule,
  batch size, seed and validation split);
- ``trainer``: the Trainer settings that change what is computed or which batches a step sees:
  the ``TrainerConfig`` fields marked ``resume`` (``jaxlight.trainer_config.compared_fields``);
  the strategy, device count, steps per call and logging do not, so they may change freely;
- ``optimizer_chain``: the structure of the Optax state (``jaxlight.checkpoint.optimizer_chain``),
  which tells Adam from AdamW although both hold the same arrays;
- ``segments``: one entry per ``fit`` that wrote to this run (a resumed run has several), each
  with its ``run``/``trainer`` config, the step it started at, and the differences it accepted.

Resuming with any difference is refused (:class:`ConfigMismatchError` names every differing
field) unless the caller accepts it (``trainer.checkpoint.allow_config_change``, or
``--allow-config-change``); the accepted differences are then recorded in the new segment.

Example:
    >>> differences({"run": {"lr": 0.1}}, {"run": {"lr": 0.05}})
    ['lr: 0.1 in the checkpoint, 0.05 now']
"""

from __future__ import annotations

import json

from jaxlight.checkpoint import CheckpointError

__all__ = ["ConfigMismatchError", "differences"]


class ConfigMismatchError(CheckpointError):
    """A resume was refused: the checkpoint was written by a run configured differently."""


def _flat(record: dict) -> dict:
    out = {}
    for name, value in (record.get("trainer") or {}).items():
        out[name] = value
    for name, value in (record.get("run") or {}).items():
        out[name] = value  # (the run's own name wins where both give e.g. batch_size)
    if record.get("optimizer_chain") is not None:
        out["optimizer chain"] = record["optimizer_chain"]
    return out


def differences(saved: dict, current: dict) -> list[str]:
    """``"field: saved in the checkpoint, current now"`` for every field that differs.

    A field only one side records (an older checkpoint, a run without ``run_config``) is not a
    difference: there is nothing to compare it with.
    """
    a, b = _flat(saved), _flat(json.loads(json.dumps(current)))  # (compare as the checkpoint holds it)
    out = []
    for name in [*a, *(n for n in b if n not in a)]:
        if name in a and name in b and a[name] != b[name]:
            out.append(f"{name}: {a[name]} in the checkpoint, {b[name]} now")
    return out
