"""Checkpoints that lose nothing: Orbax for the arrays, a JSON record, a hash manifest.

A checkpoint is one directory ``<root>/step_000000120/``::

    arrays/          Orbax PyTree checkpoint of the TrainState's array leaves (params,
                     optimizer state, step, data key, model state), keyed "000000", "000001"...
    meta.json        step, data position (epoch, batch), trainer and callback state, the
                     config, library versions, and each leaf's tree path, shape and dtype
    manifest.json    sha256 and size of every other file; written last

Why a manifest: Orbax restores a checkpoint whose bytes were flipped with wrong values and no
error. Every file is hashed on save and verified on restore; a checkpoint that fails (corrupt,
truncated, manifest missing) is skipped with a :class:`CheckpointWarning` naming it, and the
previous good one is used.

Why atomic: everything is written into ``<root>/.tmp-step_.../`` and renamed into place only
when complete (``rename`` is atomic on POSIX), so a process killed mid-save leaves a stray temp
folder (removed by the next save) and never a half checkpoint that looks whole. A failed save
(full disk, unwritable folder) raises :class:`CheckpointError` and leaves earlier checkpoints
untouched; old checkpoints are deleted only after a new one is complete.

Example:
    >>> path = save_checkpoint("runs/ckpt", state, {"epoch": 1, "batch": 0})  # doctest: +SKIP
    >>> state, meta, path = restore_latest("runs/ckpt", fresh_state)         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlight.state import TrainState

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "list_checkpoints",
    "prune_checkpoints",
    "restore_checkpoint",
    "step_dir",
    "restore_latest",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files do not match its manifest (flipped bytes, truncation, missing files)."""


class CheckpointWarning(UserWarning):
    """A corrupt or incomplete checkpoint was skipped in favour of an older one."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """The folder the checkpoint of ``step`` has under ``root``: ``<root>/step_000000123``."""
    return Path(root) / f"step_{step:09d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The finished checkpoint folders under ``root``, oldest step first (temp folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"sha256": _sha256(p), "size": p.stat().st_size}
             for p in _files(folder)}
    _write_json(folder / "manifest.json", {"format": FORMAT_VERSION, "files": files})


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file of a checkpoint against its manifest.

    Raises:
        CorruptCheckpointError: naming the first file that is missing, has the wrong size
            (truncated) or the wrong hash (corrupt), or an unreadable manifest.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: no manifest.json (the save did not finish)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{path}: manifest.json is unreadable ({exc})") from None
    if not files:
        raise CorruptCheckpointError(f"{path}: manifest.json lists no files")
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"{path}: {rel} is missing")
        size = f.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpointError(f"{path}: {rel} has {size} bytes, the manifest says "
                                         f"{entry['size']} (truncated?)")
        if _sha256(f) != entry["sha256"]:
            raise CorruptCheckpointError(f"{path}: {rel} does not match its sha256 in manifest.json "
                                         f"(corrupted bytes)")
    extra = sorted(set(str(p.relative_to(path)) for p in _files(path)) - set(files))
    if extra:
        raise CorruptCheckpointError(f"{path}: files not in the manifest: {extra[:3]}")


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaves(state: TrainState):
    """``[(path_string, leaf)]`` in tree order; typed PRNG keys become their raw uint32 data."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [(jax.tree_util.keystr(p), jax.random.key_data(v) if _is_key(v) else v) for p, v in flat]


def _checkpointer():
    """Orbax for this process alone. The arrays reach it as numpy (replicated state, gathered
    first), so no process needs another: in a multi-process run process 0 writes alone (see
    ``Trainer.save_checkpoint``) and every process restores on its own. Orbax's default would
    wait in a barrier for processes that never call it."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                            multiprocessing_options=options)


def save_checkpoint(root: str | os.PathLike, state: TrainState, meta: dict | None = None) -> Path:
    """Write ``state`` and ``meta`` to ``<root>/step_<state.step>/`` atomically.

    Args:
        root: the run's checkpoint folder (created if missing).
        state: the TrainState; its parameters and optimizer state must be finite.
        meta: JSON-serialisable extras (data position, callback state, config, versions).

    Returns:
        The checkpoint's folder. One already there for the same step is replaced once the new
        one is complete.

    Raises:
        CheckpointError: the state holds NaN/Inf (a NaN checkpoint is never written), or the
            folder cannot be written (unwritable, full disk); earlier checkpoints are intact.
    """
    root = Path(root)
    leaves = _leaves(state)
    host = jax.device_get([v for _, v in leaves])
    for (name, _), arr in zip(leaves, host):
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16:
            if not np.isfinite(arr.astype(np.float32)).all():
                raise CheckpointError(f"refusing to save a checkpoint to {root}: state{name} holds "
                                      f"NaN or Inf")
    step = int(np.asarray(state.step))
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            _remove(stale)
        tmp.mkdir()
        _checkpointer().save((tmp / "arrays").absolute(),
                                      {f"{i:06d}": np.asarray(a) for i, a in enumerate(host)})
        record = {
            "format": FORMAT_VERSION,
            "step": step,
            "leaves": [{"path": name, "shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)}
                       for (name, _), a in zip(leaves, host)],
            **(meta or {}),
        }
        _write_json(tmp / "meta.json", record)
        _write_manifest(tmp)
        _fsync_dir(tmp)
        # A checkpoint of the same step (saved before the epoch's end, or by a run being
        # resumed) is replaced: the newer one has the later trainer position.
        _remove(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except Exception as exc:  # noqa: BLE001 - any failure to write is reported the same way
        _remove(tmp)
        previous = list_checkpoints(root)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {final}: {type(exc).__name__}: {exc}{kept}") from exc
    return final


def _remove(path: Path) -> None:
    """Delete a folder so that a kill half way never leaves something that looks like a checkpoint."""
    if not path.exists():
        return
    trash = path.with_name(f".tmp-trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: str | os.PathLike, keep_steps: set[int]) -> None:
    """Delete every finished checkpoint under ``root`` whose step is not in ``keep_steps``."""
    for path in list_checkpoints(root):
        if int(_STEP_DIR.match(path.name).group(1)) not in keep_steps:
            _remove(path)


def restore_checkpoint(path: str | os.PathLike, template: TrainState) -> tuple[TrainState, dict]:
    """Verify and load one checkpoint folder into the structure of ``template``.

    Args:
        path: a ``step_...`` folder.
        template: a TrainState built the same way as the saved one (same model, optimizer
            chain, precision); only its structure, shapes and dtypes are used.

    Returns:
        ``(state, meta)``: the restored state (bit-identical arrays) and the saved ``meta.json``.

    Raises:
        CorruptCheckpointError: the files do not match the manifest.
        CheckpointError: the checkpoint was saved from a differently shaped state; the message
            names the first leaf that differs.
    """
    path = Path(path)
    verify_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text())
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    saved = meta["leaves"]
    if len(saved) != len(flat):
        raise CheckpointError(f"{path} holds {len(saved)} arrays but the state has {len(flat)}: "
                              f"was it saved with another model or optimizer chain?")
    arrays = _checkpointer().restore((path / "arrays").absolute())
    leaves = []
    for i, ((key_path, ref), spec) in enumerate(zip(flat, saved)):
        arr = np.asarray(arrays[f"{i:06d}"])
        ref_data = jax.random.key_data(ref) if _is_key(ref) else ref
        name = jax.tree_util.keystr(key_path)
        if name != spec["path"] or tuple(arr.shape) != tuple(np.shape(ref_data)) or arr.dtype != ref_data.dtype:
            raise CheckpointError(f"{path}: saved state{spec['path']} {tuple(arr.shape)} {arr.dtype} does not "
                                  f"fit state{name} {tuple(np.shape(ref_data))} {ref_data.dtype}")
        value = jnp.asarray(arr)
        if _is_key(ref):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref))
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


def restore_latest(root: str | os.PathLike, template: TrainState) -> tuple[TrainState, dict, Path]:
    """The newest checkpoint under ``root`` that verifies, falling back past corrupt ones.

    Each skipped checkpoint raises a :class:`CheckpointWarning` that names it and why.

    Raises:
        CheckpointError: no checkpoint under ``root`` verifies (or there is none).
    """
    candidates = list_checkpoints(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint found under {root}")
    for path in reversed(candidates):
        try:
            state, meta = restore_checkpoint(path, template)
            return state, meta, path
        except CorruptCheckpointError as exc:
            older = [p for p in candidates if p < path]
            then = f"falling back to {older[-1].name}" if older else "no older checkpoint left"
            warnings.warn(f"skipping corrupt checkpoint: {exc}; {then}", CheckpointWarning, stacklevel=2)
    raise CheckpointError(f"every checkpoint under {root} is corrupt ({len(candidates)} tried)")
