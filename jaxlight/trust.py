"""What code a checkpoint's record may run: class paths resolved without running what the
checkpoint brought.

A checkpoint is data people download and share, and its ``meta.json`` names code: the model's
``class_path`` and ``init_args`` (``jaxlight.save_hyperparameters``), and for a ``jaxlight fit``
run the loss, data, optimizer and callbacks. Anyone can edit that record and recompute the
manifest (it has no key), so loading draws the line where torch's ``weights_only`` and
safetensors draw it: the record chooses *which* installed code to call, never *what* code
exists, and nothing is called before it is checked.

- :func:`resolve` imports a dotted path from the **installed environment** only: ``sys.path``
  without the checkpoint's own folders (and without ``''``/the working directory when that
  lies inside them). Every module on the way is located with importlib's finders *before* it
  is imported (``importlib.util.find_spec`` runs no module code), and one whose file lies in a
  checkpoint folder is refused with :class:`UntrustedCodeError` unexecuted.
- With ``trust_code=True`` the checkpoint's folders are searched first, so code saved with
  the checkpoint (a generated model module beside its ``step_*`` folders) is imported and used.
- :func:`check_arguments` checks recorded arguments against the callee's signature and type
  annotations, strictly (JSON ``"16"`` is not an ``int``), before the call.

"Code saved with the checkpoint" is any module or package in :func:`code_folders`: the run
folder that holds the ``step_*`` folders, and the step folder itself.

Example:
    >>> import jaxlight.trust as trust
    >>> trust.resolve("collections.OrderedDict", folders=())
    <class 'collections.OrderedDict'>
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import types
import typing
from pathlib import Path

from jaxlight.hparams import import_path

__all__ = ["UntrustedCodeError", "check_arguments", "code_folders", "installed_only", "resolve"]


class UntrustedCodeError(ImportError):
    """A recorded class path names code saved with the checkpoint, which only ``trust_code=True``
    runs; the message names the path and the file."""


def code_folders(step: str | os.PathLike) -> tuple[Path, ...]:
    """The folders whose Python files count as code saved with the checkpoint ``step`` (a
    ``step_*`` folder): its run folder (the parent) and the step folder itself, resolved."""
    step = Path(os.path.realpath(step))
    return (step.parent, step)


def _inside(path: str | os.PathLike | None, folders) -> bool:
    if not path:
        return False
    real = os.path.realpath(path)
    return any(real == str(f) or real.startswith(str(f).rstrip(os.sep) + os.sep) for f in folders)


def _origins(spec) -> list[str]:
    """The files and folders a module spec would execute or search."""
    found = []
    if spec is None:
        return found
    if spec.origin and spec.origin not in ("built-in", "frozen", "namespace"):
        found.append(spec.origin)
    found += list(spec.submodule_search_locations or [])
    return found


def _module_origins(module) -> list[str]:
    found = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", None) or [])
    return [f for f in found if isinstance(f, str)] + _origins(getattr(module, "__spec__", None))


@contextlib.contextmanager
def installed_only(folders):
    """``sys.path`` without the entries that lie inside ``folders`` (``''`` is the working
    directory) while the block runs; entries the block adds are kept."""
    saved = list(sys.path)
    kept = [p for p in saved if not _inside(p or os.getcwd(), folders)]
    if kept == saved:
        yield
        return
    sys.path[:] = kept
    try:
        yield
    finally:
        sys.path[:] = saved + [p for p in sys.path if p not in saved]


def _saved_file(name: str, folders) -> str | None:
    """The file of module ``name`` (top level) saved in ``folders``, if there is one."""
    spec = importlib.machinery.PathFinder.find_spec(name, [str(f) for f in folders])
    return (spec.origin or (list(spec.submodule_search_locations or []) or [None])[0]) if spec else None


def _refuse(path: str, name: str, where: str) -> UntrustedCodeError:
    return UntrustedCodeError(f"{path!r} names module {name}, which is code saved with the checkpoint ({where}): "
                              f"it is not run without trust")


def _import_checked(path: str, name: str, folders):
    """Module ``name`` from the installed environment, located before it is imported."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        if name != "__main__":  # (the running program: the caller's own choice)
            bad = next((o for o in _module_origins(loaded) if _inside(o, folders)), None)
            if bad:
                raise _refuse(path, name, bad)
        return loaded
    try:
        spec = importlib.util.find_spec(name)  # (finders only: no module code runs)
    except (ImportError, ValueError) as exc:
        raise ImportError(f"cannot import {path!r}: locating {name} failed ({exc})") from None
    if spec is None:
        top = name.split(".")[0]
        saved = _saved_file(top, folders) if "." not in name else None
        if saved:
            raise _refuse(path, name, saved)
        raise ImportError(f"cannot import {path!r}: no module named {name!r} in the installed environment")
    bad = next((o for o in _origins(spec) if _inside(o, folders)), None)
    if bad:
        raise _refuse(path, name, bad)
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - an installed module that fails to import
        raise ImportError(f"cannot import {path!r}: importing {name} raised {type(exc).__name__}: {exc}") from None


def _walk(path: str, folders):
    """The object ``path`` names, each module on the way checked by :func:`_import_checked`."""
    parts = path.split(".")
    with installed_only(folders):
        obj = _import_checked(path, parts[0], folders)
        for i in range(1, len(parts)):
            name = ".".join(parts[:i + 1])
            if isinstance(obj, types.ModuleType) and hasattr(obj, "__path__") and _is_submodule(name):
                obj = _import_checked(path, name, folders)
                continue
            if not hasattr(obj, parts[i]):
                raise ImportError(f"cannot import {path!r}: {'.'.join(parts[:i])} has no attribute {parts[i]!r}")
            obj = getattr(obj, parts[i])
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is not None and module.__name__ != "__main__":  # (re-exported from saved code?)
        bad = next((o for o in _module_origins(module) if _inside(o, folders)), None)
        if bad:
            raise _refuse(path, module.__name__, bad)
    return obj


def _is_submodule(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _load_saved(path: str, name: str, folders):
    """Import top-level module ``name`` from ``folders`` (trusted), unless that very file is
    the module already loaded under the name."""
    spec = importlib.machinery.PathFinder.find_spec(name, [str(f) for f in folders])
    if spec is None:
        return None
    loaded = sys.modules.get(name)
    if loaded is not None and set(_module_origins(loaded)) & set(_origins(spec)):
        return loaded
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the saved module raised while importing
        if loaded is not None:
            sys.modules[name] = loaded
        else:
            sys.modules.pop(name, None)
        raise ImportError(f"cannot import {path!r}: importing {name} from {spec.origin} raised "
                          f"{type(exc).__name__}: {exc}") from None
    return module


def resolve(path: str, folders=(), trust_code: bool = False):
    """The object a recorded dotted path names, imported without running code from ``folders``.

    Args:
        path: ``"package.module.Name"``.
        folders: the folders whose code came with the checkpoint (:func:`code_folders`).
        trust_code: search ``folders`` first and import code saved there.

    Raises:
        UntrustedCodeError: without ``trust_code``, a module on the way lies in ``folders``
            (never executed: located first).
        ImportError: no such module or attribute in the installed environment.
    """
    if not isinstance(path, str) or "." not in path.strip(".") or not all(p.isidentifier() for p in path.split(".")):
        raise ImportError(f"{path!r} is not a dotted import path like 'package.module.Name'")
    folders = tuple(Path(os.path.realpath(f)) for f in folders)
    if trust_code:
        if folders:
            _load_saved(path, path.split(".")[0], folders)  # (then in sys.modules: imported below as any module)
        return import_path(path)
    return _walk(path, folders)


# -- recorded arguments against a signature -----------------------------------------------------


def _parameters(fn) -> dict:
    """``{name: (parameter, resolved annotation)}`` of a call's parameters (a class: its
    ``__init__``'s without ``self``)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(fn):
        params = params[1:]
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations are not checked
        hints = {}
    return {p.name: (p, hints.get(p.name, p.annotation)) for p in params}


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _fits(value, annotation) -> bool:
    """Whether a JSON value fits a parameter annotation, strictly; unknown annotations (a class
    that JSON cannot hold, a string annotation) are not judged."""
    if annotation in (inspect.Parameter.empty, typing.Any, object) or isinstance(annotation, str):
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    container = origin or annotation
    if container in (list, tuple, set, frozenset) or (inspect.isclass(container) and container.__module__ ==
                                                      "collections.abc" and container.__name__ in ("Sequence",)):
        if not isinstance(value, list):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if container is dict or (inspect.isclass(container) and container.__name__ in ("Mapping", "MutableMapping")):
        return isinstance(value, dict) and (len(args) < 2 or all(_fits(v, args[1]) for v in value.values()))
    return True


def check_arguments(fn, args: dict, skip: tuple[str, ...] = ("rngs",)) -> None:
    """Check recorded keyword arguments against ``fn``'s signature before ``fn`` is called.

    Raises:
        TypeError: one line naming the first argument that is unknown, missing or of the wrong
            type (``width: expected int, got '16' (a str)``).
    """
    if not isinstance(args, dict):
        raise TypeError(f"init_args: expected a mapping of argument names, got {type(args).__name__}")
    try:
        params = _parameters(fn)
    except (TypeError, ValueError):
        return
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p, _ in params.values())
    for name, value in args.items():
        if name not in params or params[name][0].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                          inspect.Parameter.VAR_KEYWORD):
            if not takes_kwargs:
                raise TypeError(f"{name}: not an argument of {_type_name(fn)}")
            continue
        annotation = params[name][1]
        if not _fits(value, annotation):
            raise TypeError(f"{name}: expected {_type_name(annotation)}, got {value!r} (a {type(value).__name__})")
    for name, (p, _) in params.items():
        if (p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and name not in args and name not in skip):
            raise TypeError(f"{name}: missing (required by {_type_name(fn)})")
