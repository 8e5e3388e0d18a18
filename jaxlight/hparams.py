"""Hyperparameters kept with the run: what built the model, recorded once, read back anywhere.

Three pieces:

- :func:`save_hyperparameters` (one line in a model's ``__init__``, as Lightning's
  ``self.save_hyperparameters()``) records the module's class path and constructor arguments
  on the module itself, as ``model.hparams``.
- The Trainer writes a run record into every checkpoint (``meta.json``'s ``hparams``) and hands
  it to every logger (CSV ``hparams.yaml``, TensorBoard's hparams plugin): the config of a
  ``jaxlight fit`` run (``jaxlight.config``), or for a Python run the model's recorded class
  path and arguments; both with the versions of jax, flax and optax.
- :func:`jaxlight.checkpoint.load_from_checkpoint` rebuilds the model from that record in a
  fresh process, loads the best or last checkpoint into it and returns it in eval mode, with
  the record.

Example:
    >>> import jaxlight
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, width: int = 32, *, rngs: nnx.Rngs):
    ...         jaxlight.save_hyperparameters(self)
    ...         self.fc = nnx.Linear(4, width, rngs=rngs)
    >>> Net(8, rngs=nnx.Rngs(0)).hparams["init_args"]
    {'width': 8}
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import warnings
from pathlib import Path

from flax import nnx

# The models import this module for save_hyperparameters: it imports nothing of jaxlight's
# above the models (reading checkpoints back is jaxlight.checkpoint's).

__all__ = ["HParams", "class_path", "import_path", "model_record", "run_record", "save_hyperparameters", "versions"]


class HParams(dict):
    """A model's recorded ``{"class_path": ..., "init_args": {...}}``, read-only.

    Hashable (by its JSON text), because NNX keeps plain attributes in the module's static
    graph definition, which ``jax.jit`` hashes.
    """

    def __hash__(self):
        return hash(json.dumps(self, sort_keys=True, default=repr))

    def _readonly(self, *args, **kwargs):
        raise TypeError("HParams is read-only: call jaxlight.save_hyperparameters again to change it")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly


def class_path(obj) -> str:
    """``module.QualName`` of a class or function (what a config's ``class_path`` holds)."""
    return f"{obj.__module__}.{obj.__qualname__}"


def import_path(path: str):
    """The object a dotted path names (``"optax.adamw"``, ``"mypkg.nets.Net"``).

    Raises:
        ImportError: naming the path, and the module or attribute that was not found.
    """
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ImportError(f"{path!r} is not a dotted import path like 'package.module.Name'")
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name) and (module_name + ".").startswith(exc.name + "."):
                continue  # (this prefix is no module: try a shorter one)
            raise ImportError(f"cannot import {path!r}: importing {module_name} failed ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
            raise ImportError(f"cannot import {path!r}: importing {module_name} raised "
                              f"{type(exc).__name__}: {exc}") from None
        for i, attr in enumerate(parts[cut:]):
            if not hasattr(obj, attr):
                where = ".".join(parts[:cut + i])
                raise ImportError(f"cannot import {path!r}: {where} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {path!r}: no module named {parts[0]!r}")


def _plain(value, where: str):
    """``value`` as YAML/JSON data; a class or function as its dotted path."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / jax scalars
        return value.item()
    raise TypeError(f"{where} is a {type(value).__name__}; save_hyperparameters records plain data (numbers, "
                    f"strings, lists, dicts), from which the model can be rebuilt: pass ignore=(name,) to leave it out")


def save_hyperparameters(module: nnx.Module, ignore: tuple[str, ...] = ()) -> HParams:
    """Record the arguments the running ``__init__`` of ``module`` was called with.

    Call it as the first line of your model's ``__init__`` (Lightning's habit); it reads the
    arguments from the caller's frame, so it takes no list of them. The RNG argument
    (``rngs``, or any ``nnx.Rngs``) is left out: ``load_from_checkpoint`` passes a fresh one.
    The record is ``module.hparams`` (:class:`HParams`) and reaches every checkpoint and logger
    of a Trainer that trains the module.

    Args:
        module: ``self``.
        ignore: argument names not to record.

    Returns:
        ``{"class_path": "mypkg.nets.Net", "init_args": {"width": 128, ...}}``.

    Raises:
        TypeError: an argument is not plain data (numbers, strings, lists, dicts), so the model
            could not be rebuilt from a checkpoint; ``ignore`` it.
    """
    frame = inspect.currentframe().f_back
    try:
        code = frame.f_code
        owner = next((c for c in type(module).__mro__ if getattr(c.__dict__.get("__init__"), "__code__", None) is code),
                     None)
        if owner is None:
            raise RuntimeError("save_hyperparameters(self) must be called inside the model's __init__")
        signature = inspect.signature(owner.__init__)
        values = frame.f_locals
        args = {}
        for name, p in list(signature.parameters.items())[1:]:
            if name in ignore or name == "rngs" or isinstance(values.get(name), nnx.Rngs):
                continue
            if p.kind is p.VAR_KEYWORD:
                args.update({k: v for k, v in values.get(name, {}).items() if k not in ignore})
            elif p.kind is p.VAR_POSITIONAL:
                if values.get(name):
                    raise TypeError(f"{owner.__qualname__}.__init__ takes *{name}: save_hyperparameters records "
                                    f"named arguments only")
            else:
                args[name] = values[name]
    finally:
        del frame
    cls = type(module) if type(module).__init__ is owner.__init__ else owner
    record = HParams(class_path=class_path(cls),
                     init_args={k: _plain(v, f"{cls.__qualname__}({k}=...)") for k, v in args.items()})
    module.hparams = record
    return record


def model_record(model) -> dict | None:
    """The model's recorded class path and arguments (:func:`save_hyperparameters`), or None."""
    record = getattr(model, "hparams", None)
    return dict(record) if isinstance(record, HParams) else None


def versions() -> dict:
    """The versions of the libraries that decide what a run computes."""
    from jaxlight.report import library_versions

    return library_versions("jax", "jaxlib", "flax", "optax", "jaxlight")


def run_record(config: dict | None, state=None) -> dict:
    """What a checkpoint and the loggers keep about the run: ``config`` (a ``jaxlight fit``
    config) or else the model's record from ``state``, plus library versions and the class paths
    the run named."""
    record = json.loads(json.dumps(config, default=repr)) if config else {}
    if "model" not in record and state is not None:
        model = nnx.merge(state.eval_graphdef, state.params, state.rng_state, state.model_state)
        found = model_record(model)
        if found is not None:
            record["model"] = found
    if state is not None and "loss" not in record:
        from jaxlight.tasks import loss_name

        record["loss"] = loss_name(state.loss_fn)
    paths = {v["class_path"] for v in _specs(record)}
    if isinstance(record.get("loss"), str) and "." in record["loss"]:
        paths.add(record["loss"])
    paths = sorted(paths)
    return {**record, "class_paths": paths, "versions": versions()}


def _specs(tree):
    if isinstance(tree, dict):
        if isinstance(tree.get("class_path"), str):
            yield tree
        for v in tree.values():
            yield from _specs(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _specs(v)
