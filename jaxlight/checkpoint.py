"""Checkpoints that lose nothing: Orbax's CheckpointManager for the arrays, a JSON record, hash
manifests.

A checkpoint is one directory ``<root>/step_000000120/``::

    arrays/          Orbax PyTree checkpoint of the TrainState's array leaves (params,
                     optimizer state, step, data key, model state), keyed "000000", "000001"...;
                     each process writes the shards its devices hold (``ocdbt.process_k/``)
    meta.json        step, data position (epoch, batch), trainer and callback state, the
                     config, library versions, the number of processes that wrote it, and each
                     leaf's tree path, shape and dtype
    manifest.json    sha256 and size of every other file (in a run of n processes: of every file
                     but processes 1..n-1's shards); written once the arrays are complete
    manifest.process_k.json   (k = 1..n-1) the same for the shards process k wrote

Async, sharded: :class:`CheckpointSaver` hands the state to Orbax's ``CheckpointManager``, which
copies it off the devices and writes it in the background while training goes on; nothing is
gathered to one host. The manager writes into a temporary folder and renames it into place when
every process's arrays are complete; a thread of ours then writes ``meta.json`` and the
manifests. The next save and the end of ``Trainer.fit`` wait for the pending one. A restore
reads each array straight into the target layout (``Strategy.state_shardings``), so a state
moves between strategies and device counts.

Why a manifest: Orbax restores a checkpoint whose bytes were flipped with wrong values and no
error, and the manager's renamed folder says nothing of whether ``meta.json`` was written.
Every file is hashed once complete and verified on restore; a checkpoint that fails (corrupt,
truncated, a manifest missing because a ``kill -9`` came before it was written, unreadable or
not a file) is skipped with a :class:`CheckpointWarning` naming it, and the previous good one is
used. The manifest is trusted only as far as it covers: each entry must name a plain file inside
the checkpoint folder (no ``..``, no absolute path, no symlink), so verification reads nothing
outside it; ``meta.json`` must be listed; Orbax restores from a private view that holds only
the listed, verified files, so nothing unverified is ever read. A file under ``arrays/`` that
no manifest lists makes the checkpoint corrupt; a stray file elsewhere (``.DS_Store``, an
editor's backup ``name~``) is ignored with a warning. A ``meta.json`` that verifies but does
not hold what the loader needs (``restore_checkpoint(check_meta=...)``) is corrupt too. A
checkpoint saved from another model or optimizer (its arrays do not fit the state) is skipped
the same way, so ``restore_latest`` returns the newest checkpoint that fits.

Why a lock: two runs writing one folder delete each other's checkpoints. :func:`lock_folder`
takes an OS lock (``fcntl.flock`` on ``<root>/.lock``) that the kernel drops when the process
dies, so a ``kill -9`` never leaves a stale lock; a second process is refused with
:class:`CheckpointLockedError` naming the holder (pid, host, start time).

What a kill leaves: a ``kill -9`` while the arrays are written leaves Orbax's temporary folder
(removed by the next run's manager), never a ``step_*`` folder; one after the rename but before
the manifests leaves a ``step_*`` folder without them, which is never trusted. A failed save
(full disk, unwritable folder) raises :class:`CheckpointError` and leaves earlier checkpoints
untouched; the manager deletes old checkpoints (only those the run owns: see
:class:`CheckpointSaver`) only after a new one's arrays are complete, and ``ModelCheckpoint``
keeps at least two, so a complete one always survives. ``ModelCheckpoint`` saves with
``replace=False`` at a step whose folder it cannot show to be its own run's (see its
docstring), so another run's checkpoint (or a ``step_*`` symlink) at the same step is never
replaced: the save stops with a message naming it.

Example (a fresh state of the same structure is the template a restore fills):
    >>> import tempfile
    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from jaxlight import create_train_state, optim, tasks
    >>> from jaxlight.models import LinearRegression
    >>> def new_state(seed):
    ...     model = LinearRegression(8, rngs=nnx.Rngs(seed))
    ...     return create_train_state(model, optim.adam(0.1), tasks.regression(), seed=seed)
    >>> root = tempfile.mkdtemp()
    >>> path = save_checkpoint(root, new_state(0), {"epoch": 1, "batch": 0})
    >>> path.name, "meta.json" in verify_checkpoint(path)  # (the files its manifest vouches for)
    ('step_000000000', True)
    >>> restored, meta, path = restore_latest(root, new_state(1))
    >>> meta["epoch"], all(jax.tree.leaves(jax.tree.map(np.array_equal, restored.params, new_state(0).params)))
    (1, True)
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlight.errors import exception_chain
from jaxlight.state import TrainState

__all__ = [
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointSaver",
    "CheckpointWarning",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FolderLock",
    "IncompatibleCheckpointError",
    "best_checkpoint",
    "list_checkpoints",
    "load_from_checkpoint",
    "load_model",
    "lock_folder",
    "optimizer_chain",
    "prune_checkpoints",
    "recorded_hparams",
    "resolve_checkpoint",
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


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint's arrays do not fit the state (saved from another model or optimizer chain).

    Attributes:
        saved_optimizer: when the model's arrays fit and only the optimizer state does not, the
            optimizer the checkpoint's ``run`` record names (``"?"`` when it names none); else None.
    """

    saved_optimizer: str | None = None


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, unwritable folder); earlier ones are intact."""


class CheckpointLockedError(CheckpointError):
    """Another live process holds the checkpoint folder's lock; the message names it."""


class CheckpointWarning(UserWarning):
    """A corrupt, incomplete or incompatible checkpoint was skipped in favour of an older one, or
    a checkpoint folder holds files its manifest does not list."""


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
    """Every file and symlink under ``folder`` but the manifests and their temporary files (another
    process may be writing its manifest while this one hashes the folder); symlinked folders are
    not entered."""
    found = []
    for parent, dirs, names in os.walk(folder):
        found += [Path(parent) / n for n in names]
        found += [Path(parent) / d for d in dirs if os.path.islink(os.path.join(parent, d))]
    manifests = (_MANIFEST, _MANIFEST_TMP)
    return sorted(p for p in found if not (p.parent == folder and any(m.match(p.name) for m in manifests)))


_MANIFEST = re.compile(r"^manifest(\.process_\d+)?\.json$")
_MANIFEST_TMP = re.compile(r"^\.manifest(\.process_\d+)?\.json\.tmp-\d+$")  # report.write_text_atomic's


def _manifest_name(process: int) -> str:
    """Process 0's manifest lists meta.json and every file but other processes' shards; process
    k > 0 lists the shards it wrote (Orbax's ``arrays/ocdbt.process_k/``)."""
    return "manifest.json" if process == 0 else f"manifest.process_{process}.json"


def _written_by(rel: str, process: int, processes: int) -> bool:
    """Whether ``rel`` (a path in a checkpoint folder) is a file ``process`` wrote."""
    if processes == 1:
        return True
    owner = re.search(r"(?:^|/)ocdbt\.process_(\d+)/", rel)
    return int(owner.group(1)) == process if owner and int(owner.group(1)) > 0 else process == 0


def _listed_file(folder: Path, rel) -> Path:
    """``folder / rel`` when ``rel`` names a plain file inside ``folder``: a relative path without
    ``.``/``..`` parts, no symlink on the way. Checked with ``lstat`` before anything is read.

    Raises:
        CorruptCheckpointError: naming the entry and what is wrong with it.
    """
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or os.path.isabs(rel) or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise CorruptCheckpointError(f"{folder}: manifest.json lists {rel!r}, which is not a plain path inside "
                                     f"the checkpoint folder")
    here = folder
    for i, part in enumerate(parts):
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{folder}: {rel} is missing") from None
        except OSError as exc:
            raise CorruptCheckpointError(f"{folder}: {rel} is unreadable ({exc.strerror or exc})") from None
        last = i == len(parts) - 1
        if stat.S_ISLNK(mode):
            raise CorruptCheckpointError(f"{folder}: {'/'.join(parts[:i + 1])} is a symlink; a checkpoint holds "
                                         f"only its own files")
        if (last and not stat.S_ISREG(mode)) or (not last and not stat.S_ISDIR(mode)):
            raise CorruptCheckpointError(f"{folder}: {rel} is missing (not a plain file)")
    return here


def _is_stray(rel: str) -> bool:
    """A file no part of jaxlight or Orbax reads: outside ``arrays/``, or a hidden file or an
    editor's backup (``.DS_Store``, ``name~``) anywhere."""
    name = rel.rsplit("/", 1)[-1]
    return not rel.startswith("arrays/") or name.startswith(".") or name.endswith("~")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, payload: dict) -> None:
    from jaxlight.report import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=True))


def _write_manifest(folder: Path) -> None:
    """This process's manifest over the files it wrote (all of them in a one-process run)."""
    me, n = jax.process_index(), jax.process_count()
    files = {}
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        if _written_by(rel, me, n):
            files[rel] = {"sha256": _sha256(p), "size": p.stat().st_size}
    _write_json(folder / _manifest_name(me), {"format": FORMAT_VERSION, "files": files})


def _read_manifest(path: Path, name: str) -> dict:
    """``{relative path: (size, sha256)}`` of one manifest file."""
    if (path / name).is_symlink():
        raise CorruptCheckpointError(f"{path}: {name} is a symlink; a checkpoint holds only its own files")
    try:
        files = json.loads((path / name).read_text())["files"]
        return {rel: (int(entry["size"]), str(entry["sha256"])) for rel, entry in files.items()}
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: no {name} (the save did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: {name} is unreadable ({type(exc).__name__}: {exc})") from None


def _check_files(path: Path, entries: dict) -> None:
    checked = [(_listed_file(path, rel), rel, size, sha) for rel, (size, sha) in entries.items()]  # (before any read)
    for f, rel, size, sha in checked:
        try:
            actual = f.stat().st_size
            if actual != size:
                raise CorruptCheckpointError(f"{path}: {rel} has {actual} bytes, the manifest says "
                                             f"{size} (truncated?)")
            if _sha256(f) != sha:
                raise CorruptCheckpointError(f"{path}: {rel} does not match its sha256 in manifest.json "
                                             f"(corrupted bytes)")
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: {rel} is unreadable ({exc.strerror or exc})") from None


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Check every file a checkpoint's manifests list against its size and sha256.

    ``manifest.json`` (process 0's) must list ``meta.json``; a checkpoint written by ``n``
    processes (``meta.json``'s ``processes``) also needs ``manifest.process_k.json`` of each
    process ``k`` > 0, over the shards that process wrote. Each entry must name a plain file
    inside ``path`` (no ``..``, absolute path or symlink); nothing outside the folder is read. An
    unlisted file under ``arrays/`` (which Orbax could read) makes the checkpoint corrupt; other
    unlisted files (``.DS_Store``, an editor's backup) are ignored with a
    :class:`CheckpointWarning`.

    Returns:
        The verified files, as paths relative to ``path``.

    Raises:
        CorruptCheckpointError: naming the first listed file that is missing, unreadable, not a
            plain file inside the folder, has the wrong size (truncated) or the wrong hash
            (corrupt); an unlisted array file; or a manifest that is missing (a save that did
            not finish), unreadable or not a file.
    """
    path = Path(path)
    files = _read_manifest(path, "manifest.json")
    if not files:
        raise CorruptCheckpointError(f"{path}: manifest.json lists no files")
    if "meta.json" not in files:
        raise CorruptCheckpointError(f"{path}: manifest.json does not list meta.json")
    _check_files(path, files)
    try:
        processes = json.loads((path / "meta.json").read_text()).get("processes", 1)
        if not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes is {processes!r}")
    except (OSError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: meta.json is malformed ({type(exc).__name__}: {exc})") from None
    for k in range(1, processes):
        more = _read_manifest(path, _manifest_name(k))
        _check_files(path, more)
        files.update(more)
    known = set(files) | {_manifest_name(k) for k in range(1, processes)}
    extra = sorted(set(p.relative_to(path).as_posix() for p in _files(path)) - known)
    unverified = [rel for rel in extra if not _is_stray(rel)]
    if unverified:
        raise CorruptCheckpointError(f"{path}: {unverified[0]} is not in manifest.json ({len(unverified)} array "
                                     f"file(s) unlisted): its bytes cannot be verified")
    if extra:
        warnings.warn(f"{path}: ignoring {len(extra)} file(s) not in its manifest: {extra[:3]}",
                      CheckpointWarning, stacklevel=3)
    return list(files)


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaves(state: TrainState):
    """``[(path_string, leaf)]`` in tree order; typed PRNG keys become their raw uint32 data."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [(jax.tree_util.keystr(p), jax.random.key_data(v) if _is_key(v) else v) for p, v in flat]


def _manager(root: Path, policy=None, writes=None):
    """Orbax's ``CheckpointManager`` over ``root``: ``step_000000123`` folders written through a
    temporary folder and renamed when complete, asynchronously, each process writing the shards
    its devices hold; deletion by ``policy`` (a :class:`_RunOwned`), after a save completes.
    ``writes``: the handler that writes the arrays (an :func:`_array_writes`)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        step_name_format=ocp.path.step.standard_name_format(step_prefix="step", step_format_fixed_length=9),
        preservation_policy=policy or _RunOwned(root), enable_async_checkpointing=True, create=True,
        cleanup_tmp_directories=True,
        # The step's folder is made before save returns (a mkdir): a folder that cannot be
        # written fails there, not in background threads that would wait for it.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    types = ocp.type_handlers.create_type_handler_registry((jax.Array, writes or _array_writes()))
    arrays = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("arrays", ocp.args.PyTreeSave, arrays)
    registry.add("arrays", ocp.args.PyTreeRestore, arrays)
    return ocp.CheckpointManager(root.absolute(), options=options, handler_registry=registry)


def _array_writes():
    """Orbax's ``ArrayHandler`` for ``jax.Array`` leaves, keeping the futures of its writes."""
    return _array_writes_class()()


@functools.cache
def _array_writes_class():
    """(Built at first use: Orbax is imported only when a checkpoint is written or read.)"""
    import orbax.checkpoint as ocp

    class ArrayWrites(ocp.type_handlers.ArrayHandler):
        """When one write of a save fails, Orbax's ``wait_until_finished`` raises at once, while
        the save's other writes (shards, shardings) may still be running and log their own
        failure a moment later. :meth:`await_writes` awaits every future ``serialize`` returned
        (Orbax's ``Future.result``): those logs come before the error a caller prints, and no
        write lands in a folder being removed. Its array metadata store is the one of Orbax's
        default ``jax.Array`` handler (read as Orbax's own ``resolve_array_metadata_store``
        reads it), so a checkpoint's files are those the default handler writes."""

        def __init__(self):
            default = ocp.type_handlers.get_type_handler(jax.Array)
            super().__init__(array_metadata_store=getattr(default, "_array_metadata_store", None))
            self.futures: list = []

        async def serialize(self, values, infos, args=None):
            futures = await super().serialize(values, infos, args)
            self.futures.extend(futures)
            return futures

        def await_writes(self, timeout: float = 60.0) -> None:
            """Wait (up to ``timeout`` seconds in all) for every write since the last call."""
            deadline = time.monotonic() + timeout
            futures, self.futures = self.futures, []
            for write in futures:
                try:
                    write.result(timeout=max(0.0, deadline - time.monotonic()))
                except BaseException:  # noqa: BLE001 - the save's error, reported by the caller
                    pass

    return ArrayWrites


class _RunOwned:
    """Orbax preservation policy: keep every checkpoint except those of ``owned`` outside ``keep``
    (``owned=None``: delete nothing). A run thus prunes only what it wrote itself; another run's
    checkpoints and ``step_*`` symlinks are never the manager's to delete."""

    def __init__(self, root: Path):
        self.root, self.keep, self.owned = root, set(), None

    def should_preserve(self, checkpoints, *, context=None):
        if self.owned is None:
            return [True] * len(checkpoints)
        return [c.step in self.keep or c.step not in self.owned or step_dir(self.root, c.step).is_symlink()
                for c in checkpoints]


def _finite(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.all(jnp.isfinite(x.astype(jnp.float32)))
    return jnp.asarray(True)


# One compiled program per state structure: a copy of every leaf made on its devices (the async
# save reads it while the next steps run, and those steps donate, i.e. overwrite, the state's
# own buffers) and whether each floating leaf is finite, reduced where it lives (no leaf leaves
# its devices for the check).
_snapshot = jax.jit(lambda values: ([jnp.copy(v) for v in values], [_finite(v) for v in values]))


class CheckpointSaver:
    """Asynchronous saves into one checkpoint folder: Orbax's ``CheckpointManager`` writes the
    arrays in the background (each process its own shards), then a thread of ours writes
    ``meta.json`` (process 0) and this process's manifest over the complete files.

    :meth:`save` returns as soon as the arrays are copied on the devices; :meth:`wait` (called by
    the next save and at the end of ``Trainer.fit``) blocks until the pending save is complete
    and raises its error, if any. Every process of a multi-process run calls :meth:`save`.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._policy = _RunOwned(self.root)
        self._manager = None
        self._staging = None  # the manager of a replacement's staging folder, while one is written
        self._writes = _array_writes()  # (the array writes of the manager of ``root``)
        self._writing = None  # the array writes of the latest save (root's or the staging folder's)
        self._pending: tuple[threading.Thread, Path, list, Path | None] | None = None
        # Of the latest complete save: the seconds ``save`` held the caller (the copy on the
        # devices and Orbax's start) and the seconds until its manifest was written.
        self.last_save_seconds: dict[str, float] = {}

    @property
    def is_saving(self) -> bool:
        """True while a save is still being written (its arrays, meta.json or manifest)."""
        return self._pending is not None and self._pending[0].is_alive()

    def _open(self):
        if self._manager is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if jax.process_index() == 0:
                    for stale in self.root.glob(".tmp-*"):
                        _remove(stale)
                self._manager = _manager(self.root, self._policy, self._writes)
            except Exception as exc:  # noqa: BLE001 - a folder that cannot be used, whatever the cause
                raise CheckpointWriteError(f"could not write checkpoint {self.root}: {_short_cause(exc)}") from exc
        return self._manager

    def save(self, state: TrainState, meta: dict | None = None, *, replace: bool = True,
             keep_steps=None, owned=None) -> Path:
        """Start saving ``state`` to ``<root>/step_<state.step>/``; returns that folder.

        Args:
            state: the TrainState in any layout; its floating leaves must be finite.
            meta: JSON-serialisable extras for ``meta.json``.
            replace: see :func:`save_checkpoint`.
            keep_steps, owned: once this save is complete, delete the checkpoints of ``owned``
                whose step is not in ``keep_steps`` (None: delete nothing).

        Raises:
            CheckpointError: the state holds NaN/Inf; CheckpointWriteError: the previous save
                failed, ``replace=False`` meets a folder at this step, or the save cannot start.
        """
        self.wait()
        t0 = time.perf_counter()
        from jaxlight import parallel

        leaves = _leaves(state)
        values = [parallel.as_global_array(v) if isinstance(v, jax.Array) else jnp.asarray(v) for _, v in leaves]
        copies, finite = _snapshot(values)
        for (name, _), ok in zip(leaves, jax.device_get(finite)):
            if not ok:
                raise CheckpointError(f"refusing to save a checkpoint to {self.root}: state{name} holds NaN or Inf")
        step = int(np.asarray(state.step))  # (replicated: readable in every process)
        final = step_dir(self.root, step)
        # (process 0 decides, as only it looks at the folder; every process stops, or none)
        blocked = jax.process_index() == 0 and not replace and (final.exists() or final.is_symlink())
        if parallel.any_process(blocked):
            what = "a symlink" if final.is_symlink() else "a checkpoint this run did not write"
            raise CheckpointWriteError(f"could not write checkpoint {final}: it is {what} (another run's?), which a "
                                       f"save never replaces; move it out of {self.root} to continue")
        manager = self._open()
        # A checkpoint of the same step (by a run being resumed, or a save asked for twice) is
        # replaced: the newer one has the later trainer position. One that may be complete (it
        # has a manifest) stays until its replacement is complete: the new one is written in a
        # staging folder and the two are exchanged atomically (see _exchange). A symlink or an
        # unfinished folder is removed first.
        staging = final.with_name(f".tmp-replace-{final.name}")
        stage = False
        if jax.process_index() == 0:
            stage = final.is_dir() and not final.is_symlink() and (final / "manifest.json").exists()
            if final.is_symlink() or (final.exists() and not stage):
                _remove(final)
            _remove(staging)  # (left by a replacement that a kill interrupted)
        stage = parallel.any_process(stage)
        parallel.barrier(f"jaxlight-replace-{step}")
        manager.reload()
        target, self._writing = manager, self._writes
        if stage:
            try:
                self._writing = _array_writes()
                target = self._staging = _manager(staging, _RunOwned(staging), self._writing)
            except Exception as exc:  # noqa: BLE001 - as a failure to start the write
                self._failed(final, exc, staging)
        record = {
            "format": FORMAT_VERSION,
            "step": step,
            "processes": jax.process_count(),
            "optimizer_chain": optimizer_chain(state.opt_state),
            "leaves": [{"path": name, "shape": list(v.shape), "dtype": str(np.dtype(v.dtype))}
                       for (name, _), v in zip(leaves, values)],
            **(meta or {}),
        }
        self._policy.keep = set(keep_steps or ())
        self._policy.owned = None if owned is None else set(owned)
        import orbax.checkpoint as ocp

        self._writing.futures.clear()  # (the previous save's, all complete: wait() above)
        try:
            arrays = dict(zip((f"{i:06d}" for i in range(len(values))), copies))
            target.save(step, args=ocp.args.Composite(arrays=ocp.args.PyTreeSave(arrays)), force=True)
        except Exception as exc:  # noqa: BLE001 - any failure to start the write is reported the same way
            self._failed(final, exc, staging if stage else None)
        staged = staging if stage else None
        thread = threading.Thread(target=self._finish, args=(final, record, t0, target, staged), daemon=True,
                                  name=f"jaxlight-checkpoint-{step}")
        self._pending = (thread, final, [], staged)
        self._blocking = time.perf_counter() - t0
        thread.start()
        return final

    def _finish(self, final: Path, record: dict, t0: float, manager, staging: Path | None) -> None:
        """In the background: wait for Orbax's arrays, then write meta.json and the manifest;
        a replacement written in ``staging`` then takes the place of ``final`` (one process:
        here; several: in :meth:`wait`, after every process's manifest)."""
        try:
            manager.wait_until_finished()
            written = final if staging is None else staging / final.name
            if jax.process_index() == 0:
                _write_json(written / "meta.json", record)
            _write_manifest(written)
            _fsync_dir(written)
            if staging is not None and jax.process_count() == 1:
                _exchange(written, final)
            self.last_save_seconds = {"blocking": self._blocking, "total": time.perf_counter() - t0}
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            self._pending[2].append(exc)

    def wait(self) -> None:
        """Block until the pending save is complete.

        Raises:
            CheckpointWriteError: it failed (full disk, unwritable folder); its folder is removed
                and earlier checkpoints are intact (a checkpoint it was to replace too).
        """
        if self._pending is None:
            return
        thread, final, errors, staging = self._pending
        thread.join()
        self._pending = None
        if errors:
            self._failed(final, errors[0], staging)
        if staging is not None:
            self._replaced(final, staging)

    def _replaced(self, final: Path, staging: Path) -> None:
        """After a replacement's files are complete: the exchange (several processes: now, once
        all are done), the old checkpoint's removal, and the pruning its save stands for."""
        from jaxlight import parallel

        self._close_staging()
        parallel.barrier(f"jaxlight-replaced-{final.name}")
        if jax.process_index() == 0:
            if jax.process_count() > 1:
                _exchange(staging / final.name, final)
            _remove(staging)  # (now holding the replaced checkpoint)
            if self._manager is not None and self._policy.owned is not None:
                self._manager.reload()
                steps = list(self._manager.all_steps())
                for step, keep in zip(steps, self._policy.should_preserve([_Info(s) for s in steps])):
                    if not keep:
                        self._manager.delete(step)
        parallel.barrier(f"jaxlight-replaced-after-{final.name}")

    def _close_staging(self) -> None:
        manager, self._staging = getattr(self, "_staging", None), None
        if manager is not None:
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - a failed save is reported by wait()
                pass

    def _failed(self, final: Path, exc: BaseException, staging: Path | None = None):
        if self._writing is not None:
            self._writing.await_writes()  # (their own error logs come before ours, not after it)
        self._close_staging()
        if jax.process_index() == 0:
            if staging is None:
                _remove(final)
                for tmp in self.root.glob(f"{final.name}.orbax-checkpoint-tmp*"):
                    _remove(tmp)
            else:  # (a failed replacement: the checkpoint it was to replace stays)
                _remove(staging)
        if self._manager is not None:
            try:
                self._manager.reload()
            except Exception:  # noqa: BLE001 - the error below is the one to report
                pass
        previous = [p for p in list_checkpoints(self.root) if p != final or staging is not None]
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointWriteError(f"could not write checkpoint {final}: {_short_cause(exc)}{kept}") from exc

    def close(self) -> None:
        """Wait for the pending save and release Orbax's threads."""
        try:
            self.wait()
        finally:
            self._close_staging()
            if self._manager is not None:
                manager, self._manager = self._manager, None
                try:
                    manager.close()
                except Exception:  # noqa: BLE001 - a failed save was reported by wait()
                    pass


def save_checkpoint(root: str | os.PathLike, state: TrainState, meta: dict | None = None, *,
                    replace: bool = True) -> Path:
    """Write ``state`` and ``meta`` to ``<root>/step_<state.step>/`` and wait until it is complete.

    :class:`CheckpointSaver` does the same asynchronously (the Trainer's saves).

    Args:
        root: the run's checkpoint folder (created if missing).
        state: the TrainState in any layout; its parameters and optimizer state must be finite.
        meta: JSON-serialisable extras (data position, callback state, config, versions).
        replace: whether a checkpoint already there for the same step (one this caller wrote
            earlier) is replaced. ``ModelCheckpoint`` passes False for steps it did not write:
            another run's checkpoint is never replaced.

    Returns:
        The checkpoint's folder.

    Raises:
        CheckpointError: the state holds NaN/Inf (a NaN checkpoint is never written), or the
            folder cannot be written (unwritable, full disk); earlier checkpoints are intact.
        CheckpointWriteError: ``replace=False`` and the step's folder exists (naming it).
    """
    saver = CheckpointSaver(root)
    try:
        return saver.save(state, meta, replace=replace)
    finally:
        saver.close()


def _short_cause(exc: BaseException) -> str:
    """The OS error behind a failed save in a few words (Orbax's own message runs to a page of
    TensorStore spec; the whole of it stays in the exception chain, for logs)."""
    for seen in exception_chain(exc):
        if isinstance(seen, OSError) and seen.strerror:
            return f"{type(seen).__name__}: [Errno {seen.errno}] {seen.strerror}"
    code = re.search(r"os_error_code='?(\d+)", str(exc))
    if code:
        return f"OSError: [Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:300] + "..."


_RENAME_EXCHANGE = 2  # (linux/fs.h)


def _exchange(new: Path, final: Path) -> None:
    """Put the complete folder ``new`` in the place of ``final`` so that ``final`` is never
    missing: ``renameat2(RENAME_EXCHANGE)`` swaps the two atomically (the old checkpoint is then
    at ``new``'s path). Where the OS or file system cannot (not Linux, some network file
    systems), ``final`` is renamed aside and ``new`` renamed into place right after."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        swap = libc.renameat2
    except (OSError, AttributeError):
        swap = None
    if swap is not None:
        at_cwd = -100  # AT_FDCWD
        if swap(at_cwd, os.fsencode(new), at_cwd, os.fsencode(final), _RENAME_EXCHANGE) == 0:
            _fsync_dir(final.parent)
            return
        errno = ctypes.get_errno()
        if errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot; else a real error
            raise OSError(errno, os.strerror(errno), str(final))
    aside = new.with_name(new.name + ".old")
    os.rename(final, aside)
    os.rename(new, final)
    os.rename(aside, new)
    _fsync_dir(final.parent)


def _remove(path: Path) -> None:
    """Delete a folder so that a kill half way never leaves something that looks like a
    checkpoint: renamed to a ``.tmp-`` name first (unless it has one), then removed. A symlink
    is unlinked; what it points to is never touched."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    if not path.exists():
        return
    trash = path
    if not path.name.startswith(".tmp-"):
        trash = path.with_name(f".tmp-trash-{path.name}-{os.getpid()}")
        try:
            os.rename(path, trash)
        except OSError:
            trash = path
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: str | os.PathLike, keep_steps: set[int], owned: set[int] | None = None) -> None:
    """Delete every finished checkpoint under ``root`` whose step is not in ``keep_steps``, through
    Orbax's ``CheckpointManager``. (A running ``CheckpointSaver`` prunes by the same rule once each
    save is complete: ``CheckpointSaver.save(keep_steps=..., owned=...)``.)

    Args:
        owned: when given, only these steps may be deleted: a run prunes the checkpoints it
            wrote itself, never another run's. A ``step_*`` symlink is never a checkpoint this
            module wrote, so it is never pruned.
    """
    root = Path(root)
    policy = _RunOwned(root)
    doomed = [int(_STEP_DIR.match(p.name).group(1)) for p in list_checkpoints(root)]
    policy.keep, policy.owned = set(keep_steps), set(doomed if owned is None else owned)
    doomed = [s for s, keep in zip(doomed, policy.should_preserve([_Info(s) for s in doomed])) if not keep]
    if not doomed:
        return
    manager = _manager(root, policy)
    try:
        for step in doomed:
            manager.delete(step)
    finally:
        manager.close()


class _Info:
    """The part of Orbax's ``CheckpointInfo`` a preservation policy reads."""

    def __init__(self, step: int):
        self.step = step


def _verified_meta(path: Path) -> tuple[dict, list[str]]:
    """``(meta.json's contents, the verified files)``."""
    listed = verify_checkpoint(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: meta.json is unreadable ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("leaves"), list):
        raise CorruptCheckpointError(f"{path}: meta.json is malformed (no list of leaves)")
    return meta, listed


def _restore_arrays(path: Path, listed: list[str], meta: dict, wanted: dict) -> dict:
    """Orbax's restore of ``path/arrays`` through a private folder of symlinks to the verified
    files alone, so that Orbax reads nothing the manifest did not cover.

    Args:
        wanted: ``{leaf index: sharding}``; each array is read straight into its sharding (each
            process reads only the pieces its devices hold), whatever layout wrote it.

    Returns:
        ``{leaf index: jax.Array}``.
    """
    import orbax.checkpoint as ocp

    target = {}
    for i, sharding in wanted.items():
        _, shape, dtype = _spec(meta, i)
        target[f"{i:06d}"] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
    view = Path(tempfile.mkdtemp(prefix="jaxlight-restore-"))
    try:
        for rel in listed:
            if rel.startswith("arrays/"):
                (view / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink((path / rel).absolute(), view / rel)
        # This process alone: every process restores on its own, with no barrier to wait in.
        me = jax.process_index()
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                                  multiprocessing_options=options)
        try:
            restored = reader.restore((view / "arrays").absolute(), args=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        except Exception as exc:  # noqa: BLE001 - whatever Orbax raises for missing or bad files
            raise CorruptCheckpointError(f"{path}: its arrays cannot be read from the files manifest.json lists "
                                         f"({_short_cause(exc)})") from exc
        return {int(k): v for k, v in restored.items()}
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _as_leaf(value, ref):
    return jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref)) if _is_key(ref) else value


def _spec(meta: dict, i: int) -> tuple[str, tuple, str]:
    spec = meta["leaves"][i]
    return str(spec["path"]), tuple(spec["shape"]), str(spec["dtype"])


def _incompatible(path: Path, meta: dict, template, flat, message: str) -> IncompatibleCheckpointError:
    """The error for arrays that do not fit; it says so when only the optimizer state differs."""
    def model_leaves(specs):
        return [s for s in specs if not s[0].startswith(".opt_state")]

    mine = []
    for key_path, ref in flat:
        data = jax.random.key_data(ref) if _is_key(ref) else ref
        mine.append((jax.tree_util.keystr(key_path), tuple(np.shape(data)), str(np.dtype(data.dtype))))
    saved = [_spec(meta, i) for i in range(len(meta["leaves"]))]
    if model_leaves(saved) == model_leaves(mine):
        run = meta.get("run") if isinstance(meta.get("run"), dict) else {}
        name = run.get("optimizer") or "?"
        error = IncompatibleCheckpointError(
            f"{path} was saved with another optimizer ({name if name != '?' else 'unnamed'}, optimizer state "
            f"{meta.get('optimizer_chain', '?')}); this state's is {optimizer_chain(template.opt_state)}: "
            f"the optimizer state does not carry over")
        error.saved_optimizer = name
        return error
    return IncompatibleCheckpointError(message)


def _check_leaf(path: Path, spec: dict, name: str, ref, what: str) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless the saved leaf ``spec`` fits ``ref``."""
    ref_data = jax.random.key_data(ref) if _is_key(ref) else ref
    shape, dtype = tuple(np.shape(ref_data)), str(np.dtype(ref_data.dtype))
    if name != spec["path"] or tuple(spec["shape"]) != shape or spec["dtype"] != dtype:
        raise IncompatibleCheckpointError(
            f"{path}: saved state{spec['path']} {tuple(spec['shape'])} {spec['dtype']} does not fit "
            f"{what}{name} {shape} {dtype}")


def restore_checkpoint(path: str | os.PathLike, template: TrainState,
                       check_meta=None, shardings=None) -> tuple[TrainState, dict]:
    """Verify and load one checkpoint folder into the structure of ``template``.

    Args:
        path: a ``step_...`` folder.
        template: a TrainState built the same way as the saved one (same model, optimizer
            chain, precision); only its structure, shapes and dtypes are used.
        check_meta: ``check_meta(meta)`` raises ``KeyError``/``TypeError``/``ValueError`` when
            ``meta.json`` (which verified) lacks what the caller will read from it: the
            checkpoint is then corrupt, like one whose bytes do not match.
        shardings: the layout to read the state into, a pytree of shardings like ``template``
            (``Strategy.state_shardings(template)``); each process reads only the pieces its
            devices hold. Default: this process's first device.

    Returns:
        ``(state, meta)``: the restored state (bit-identical arrays) and the saved ``meta.json``.

    Raises:
        CorruptCheckpointError: the files do not match the manifest, or ``meta.json`` is
            malformed.
        IncompatibleCheckpointError: the checkpoint was saved from a differently shaped state;
            the message names the first leaf that differs, or the optimizer when only the
            optimizer state differs.
    """
    path = Path(path)
    meta, listed = _verified_meta(path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    try:
        saved = [_spec(meta, i) for i in range(len(meta["leaves"]))]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: meta.json is malformed ({type(exc).__name__}: {exc})") from None
    if len(saved) != len(flat):
        raise _incompatible(path, meta, template, flat, f"{path} holds {len(saved)} arrays but the state has "
                                                        f"{len(flat)}: was it saved with another model or optimizer chain?")
    for (key_path, ref), spec in zip(flat, meta["leaves"]):
        try:
            _check_leaf(path, spec, jax.tree_util.keystr(key_path), ref, "state")
        except IncompatibleCheckpointError as exc:
            raise _incompatible(path, meta, template, flat, str(exc)) from None
    try:  # (after the arrays' fit: another model's checkpoint is named as such)
        if check_meta is not None:
            check_meta(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: meta.json is malformed ({type(exc).__name__}: {exc})") from None
    if shardings is None:
        targets = [_default_sharding()] * len(flat)
    else:
        targets = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    arrays = _restore_arrays(path, listed, meta, dict(enumerate(targets)))
    leaves = [_as_leaf(arrays[i], ref) for i, (_, ref) in enumerate(flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


def restore_latest(root: str | os.PathLike, template: TrainState,
                   check_meta=None, shardings=None) -> tuple[TrainState, dict, Path]:
    """The newest checkpoint under ``root`` that verifies, falling back past corrupt ones.

    Corrupt checkpoints (``check_meta``: see :func:`restore_checkpoint`) and checkpoints of
    another model or optimizer (whose arrays do not fit ``template``) are skipped, each with a
    :class:`CheckpointWarning` that names it and why, so the newest checkpoint that verifies and
    fits is returned.

    Raises:
        CheckpointError: no checkpoint under ``root`` verifies and fits (or there is none); an
            :class:`IncompatibleCheckpointError` naming the newest one's mismatch when none was
            corrupt but none fits.
    """
    candidates = list_checkpoints(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint found under {root}")
    errors = []
    for path in reversed(candidates):
        try:
            state, meta = restore_checkpoint(path, template, check_meta, shardings)
            return state, meta, path
        except CorruptCheckpointError as exc:
            errors.append(exc)
            why = "corrupt checkpoint"
        except IncompatibleCheckpointError as exc:
            errors.append(exc)
            why = "checkpoint of another " + ("optimizer" if exc.saved_optimizer else "model")
        older = [p for p in candidates if p < path]
        then = f"falling back to {older[-1].name}" if older else "no older checkpoint left"
        warnings.warn(f"skipping {why}: {errors[-1]}; {then}", CheckpointWarning, stacklevel=2)
    if all(isinstance(e, IncompatibleCheckpointError) for e in errors):
        error = IncompatibleCheckpointError(f"no checkpoint under {root} fits this state ({len(candidates)} "
                                            f"tried); the newest: {errors[0]}")
        error.saved_optimizer = errors[0].saved_optimizer
        raise error
    raise CheckpointError(f"every checkpoint under {root} is corrupt or does not fit ({len(candidates)} tried)")


def optimizer_chain(opt_state) -> str:
    """The structure of an Optax state as text, e.g. ``(ScaleByAdamState(*,tree,tree),EmptyState())``.

    Recorded in every checkpoint: two chains can hold the same arrays and still differ (Adam and
    AdamW both keep ``count, mu, nu``; AdamW adds an empty ``add_decayed_weights`` state), and
    resuming one as the other would continue silently with another optimizer.
    """
    def walk(x) -> str:
        if isinstance(x, (nnx.State, dict)):
            return "tree"
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return f"{type(x).__name__}({','.join(walk(getattr(x, f)) for f in x._fields)})"
        if isinstance(x, (tuple, list)):
            return f"({','.join(walk(e) for e in x)})"
        return "*" if hasattr(x, "shape") or isinstance(x, (int, float)) else type(x).__name__

    return walk(opt_state)


def load_model(path: str | os.PathLike, model, which: str = "last"):
    """The NNX ``model`` with a checkpoint's parameters and other model variables (batch
    statistics, RNG state), in eval mode: for inference, with no optimizer and no Trainer.

    Args:
        path: one ``step_*`` folder, or a folder of them.
        model: a freshly built module of the same architecture (``build_model("mlp")``); only
            its structure, shapes and dtypes are used.
        which: in a folder of checkpoints, "last" (the newest good checkpoint that fits
            ``model``, as :func:`restore_latest` picks) or "best" (by the metric its
            ``ModelCheckpoint`` monitored; :func:`best_checkpoint`).

    Returns:
        ``model`` with the saved values, switched to eval mode (``model.eval()``: Dropout off,
        BatchNorm on its running statistics); the same object, updated in place. Call
        ``model.train()`` to fine-tune it.

    Raises:
        CorruptCheckpointError: the files do not match the manifest.
        IncompatibleCheckpointError: ``model`` does not fit the checkpoint; the message names
            the path and the first leaf that differs.

    Example: ``model = load_model("runs/ckpt", build_model("mlp"), which="best")``.
    """
    if which not in ("best", "last"):
        raise ValueError(f"load_model: which must be 'best' or 'last', got {which!r}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (no such folder)")
    if which == "best" and not (path / "manifest.json").exists() and not (path / "meta.json").exists():
        path = best_checkpoint(path)
    if not (path / "manifest.json").exists() and not (path / "meta.json").exists():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint found under {path}")
        errors = []
        for candidate in reversed(found):
            try:
                return load_model(candidate, model)
            except (CorruptCheckpointError, IncompatibleCheckpointError) as exc:
                errors.append(exc)
                warnings.warn(f"load_model: skipping {candidate.name}: {exc}", CheckpointWarning, stacklevel=2)
        raise errors[0]
    _load_weights(path, model)
    model.eval()
    return model


def _load_weights(path: Path, model) -> None:
    """Put one checkpoint's parameters and model state into ``model`` (in place)."""
    meta, listed = _verified_meta(path)
    _, params, _rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)  # as TrainState splits it
    saved = {spec["path"]: (i, spec) for i, spec in enumerate(meta["leaves"])}
    wanted = []
    for field, tree in (("params", params), ("model_state", model_state)):
        for key_path, ref in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = f".{field}{jax.tree_util.keystr(key_path)}"
            if name not in saved:
                raise IncompatibleCheckpointError(f"{path}: the model's {name} is not in the checkpoint "
                                                  f"(saved from another model?)")
            _check_leaf(path, saved[name][1], name, ref, "model")
            wanted.append(saved[name][0])
    for field in ("params", "model_state"):
        mine = {f".{field}{jax.tree_util.keystr(k)}" for k, _ in
                jax.tree_util.tree_flatten_with_path(params if field == "params" else model_state)[0]}
        extra = sorted(n for n in saved if n.startswith(f".{field}") and n not in mine)
        if extra:
            raise IncompatibleCheckpointError(f"{path}: the checkpoint's {extra[0]} has no place in the "
                                              f"model (saved from another model?)")
    arrays = _restore_arrays(path, listed, meta, {i: _default_sharding() for i in wanted})
    value = lambda i, ref: _as_leaf(arrays[i], ref)  # noqa: E731

    it = iter(wanted)
    new_params = jax.tree.map(lambda ref: value(next(it), ref), params)
    new_model_state = jax.tree.map(lambda ref: value(next(it), ref), model_state)
    nnx.update(model, new_params, new_model_state)


class FolderLock:
    """A held lock on a checkpoint folder (see :func:`lock_folder`); ``release()`` when done."""

    def __init__(self, root: Path, fd: int):
        self.root, self._fd, self._count = root, fd, 1

    def release(self) -> None:
        """Drop one hold; the OS lock goes with the last one (and always with the process)."""
        self._count -= 1
        if self._count == 0 and self._fd is not None:
            _LOCKS.pop(os.path.realpath(self.root), None)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


_LOCKS: dict[str, FolderLock] = {}


def lock_folder(root: str | os.PathLike, what: str = "checkpoint folder") -> FolderLock:
    """Lock the checkpoint folder ``root`` (created if missing) for this process.

    ``what`` names the folder in messages: the command lines lock their ``--out`` folder the
    same way ("output folder"), so that two runs never write one ``metrics.json``.

    ``fcntl.flock`` on ``<root>/.lock``: the kernel releases it when the process exits in any
    way (``kill -9`` included), so there is never a stale lock to clean up. Re-entrant within a
    process (the CLI locks before loading data, the Trainer again in ``fit``). On a network file
    system that does not support ``flock`` the lock only guards against processes on one host.

    Raises:
        CheckpointLockedError: another process holds it; the message names its pid and host.
        CheckpointError: the folder cannot be created or the lock file cannot be opened.
    """
    root = Path(root)
    key = os.path.realpath(root)
    if key in _LOCKS:
        _LOCKS[key]._count += 1
        return _LOCKS[key]
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CheckpointError(f"cannot use {what} {root}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that is starting up"
        os.close(fd)
        raise CheckpointLockedError(f"{what} {root} is in use by another run ({holder}); wait for "
                                    f"it to finish or choose another folder") from None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    info = f"pid {os.getpid()} on host {socket.gethostname()}, since {stamp}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    _LOCKS[key] = lock = FolderLock(root, fd)
    return lock


# -- which checkpoint, and the recorded model ----------------------------------------------------------------------------


def _is_checkpoint(path: Path) -> bool:
    return (path / "manifest.json").exists() or (path / "meta.json").exists()


def saving_process(root: str | os.PathLike) -> str | None:
    """The live process on this host that holds the folder lock of ``root`` (a fit saving
    there), as its ``.lock`` file names it (``"pid 123 on host h, since ..."``); None when none
    does. It only reads: taking the lock to test it could refuse a fit starting at that moment."""
    root = Path(root)
    try:
        text = (root / ".lock").read_text().strip()
    except OSError:
        return None
    found = re.match(r"pid (\d+) on host (\S+),", text)
    if not found or found.group(2) != socket.gethostname():
        return None
    pid = int(found.group(1))
    if pid == os.getpid():
        return text if os.path.realpath(root) in _LOCKS else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # (alive, another user's)
        pass
    return text


def _good(candidates: list[Path]) -> Path | None:
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpointError as exc:
            holder = None if (path / "manifest.json").exists() and path.exists() else saving_process(path.parent)
            if holder is None:
                warnings.warn(f"skipping corrupt checkpoint: {exc}", CheckpointWarning, stacklevel=3)
            else:
                what = "being written" if path.exists() else "removed while it was read"
                warnings.warn(f"skipping {path}: a fit is saving into {path.parent} ({holder}) and this checkpoint "
                              f"was {what}; using the newest complete one", CheckpointWarning, stacklevel=3)
    return None


def best_checkpoint(root: str | os.PathLike) -> Path:
    """The best checkpoint under ``root`` by the metric its ``ModelCheckpoint`` monitored; with
    no metric monitored, the newest good one (as Lightning's ``best_model_path`` then is).

    Raises:
        CheckpointError: no good checkpoint, the monitored metric was never computed, or the
            best one is gone.
    """
    root = Path(root)
    newest = _good(list_checkpoints(root))
    if newest is None:
        raise CheckpointError(f"no good checkpoint found under {root}")
    try:
        meta = json.loads((newest / "meta.json").read_text())
    except (OSError, ValueError) as exc:  # (removed since it verified: a running fit pruned it)
        raise CorruptCheckpointError(f"{newest}: meta.json is unreadable ({type(exc).__name__}: {exc})") from None
    # (the state of the ModelCheckpoint that wrote it: a run may hold several)
    state = (meta.get("callbacks") or {}).get(meta.get("saved_by") or "ModelCheckpoint") or {}
    scores = {int(k): v for k, v in (state.get("scores") or {}).items()}
    if not scores:
        if state.get("monitor") is None:
            return newest
        raise CheckpointError(f"{root}: no best checkpoint: the monitored {state['monitor']} was never "
                                   f"computed (no validation run?); use 'last' or a step_* folder")
    sign = -1.0 if state.get("mode", "min") == "max" else 1.0
    step = min(scores, key=lambda s: (sign * scores[s], -s))
    path = step_dir(root, step)
    if not path.is_dir():
        raise CheckpointError(f"{root}: the best checkpoint {path.name} ({state.get('monitor', 'score')} "
                                   f"{scores[step]}) is missing")
    verify_checkpoint(path)
    return path


def resolve_checkpoint(path: str | os.PathLike, which: str = "last") -> Path:
    """One ``step_*`` folder: ``path`` itself when it is one, else under the folder ``path``
    the newest good checkpoint (``which="last"``) or the best (``which="best"``)."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    path = Path(path)
    if _is_checkpoint(path):
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint found at {path} (no such folder)")
    if which == "best":
        return best_checkpoint(path)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found under {path}")
    good = _good(found)
    if good is None:
        raise CheckpointError(f"every checkpoint under {path} is corrupt ({len(found)} tried)")
    return good


def build_recorded_model(record: dict, seed: int = 0, where: str = "checkpoint", *, model=None,
                         folders=(), trust_code: bool = False):
    """A fresh module from ``{"class_path", "init_args"}``, with ``nnx.Rngs(seed)``.

    ``model`` (a class the caller names) takes the recorded arguments instead of the recorded
    class, which is then not imported at all. Otherwise the class is resolved by
    :func:`jaxlight.trust.resolve` (the installed environment only; with ``trust_code`` also
    code saved in ``folders``) and must be an ``nnx.Module`` subclass, checked before any call.
    The arguments are checked against the class's signature and annotations first.

    Raises:
        CheckpointError: one line naming ``where``, the class path and, for a refused one, both
            ways to allow it.
    """
    from jaxlight import trust

    path = record.get("class_path") if isinstance(record, dict) else None
    allow = ("pass the class yourself (load_from_checkpoint(path, model=YourClass)), or trust_code=True (CLI: "
             "--trust_code) to also run code saved with the checkpoint")
    if model is not None:
        cls, path = model, f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', model)}"
    else:
        try:
            cls = trust.resolve(path, folders, trust_code)
        except trust.UntrustedCodeError as exc:
            raise CheckpointError(f"{where}: refused to rebuild the recorded model: {exc}; {allow}") from None
        except ImportError as exc:
            hint = "" if trust_code else f" ({allow})"
            raise CheckpointError(f"{where}: the recorded model cannot be rebuilt: {exc}{hint}") from None
    if not (inspect.isclass(cls) and issubclass(cls, nnx.Module)):
        kind = "class" if inspect.isclass(cls) else type(cls).__name__.replace("_", " ")
        raise CheckpointError(
            f"{where}: refused to rebuild the recorded model: {path} is a {kind}, not an nnx.Module subclass, so it is "
            f"not called. The recorded model must be an nnx.Module class from the installed environment (or, with "
            f"trust_code=True, from code saved with the checkpoint); or pass the class yourself "
            f"(load_from_checkpoint(path, model=YourClass))")
    kwargs = record.get("init_args") if isinstance(record, dict) else None
    kwargs = {} if kwargs is None else kwargs
    try:
        trust.check_arguments(cls, kwargs)
    except TypeError as exc:
        raise CheckpointError(f"{where}: the recorded model.init_args do not fit {path}: {exc}") from None
    kwargs = dict(kwargs)
    if "rngs" in inspect.signature(cls.__init__).parameters:
        kwargs["rngs"] = nnx.Rngs(seed)
    try:
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the constructor refused the recorded arguments
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{where}: {path}(**recorded init_args) raised {type(exc).__name__}: {first}") from None


def recorded_hparams(folder: str | os.PathLike) -> dict:
    """The run's record in a verified checkpoint folder (``meta.json``'s ``hparams``: the config,
    ``class_paths``, ``versions``); ``{}`` when it records none. Data only: nothing is imported.

    Raises:
        CorruptCheckpointError: the files do not verify, or the record is not a mapping.
    """
    meta, _ = _verified_meta(Path(folder))
    record = meta.get("hparams") or {}
    if not isinstance(record, dict):
        raise CorruptCheckpointError(f"{folder}: meta.json's hparams is a {type(record).__name__}, not a mapping")
    return record


def load_from_checkpoint(path: str | os.PathLike, which: str = "best", *, model=None, trust_code: bool = False):
    """Rebuild the model a checkpoint recorded and load its weights, running no code the
    checkpoint brought.

    The trust boundary (docs/reliability.md): the record in ``meta.json`` is data anyone can
    edit (the manifest has no key). It picks the class; it never supplies code.

    - ``model=Net`` (Lightning's ``Net.load_from_checkpoint``): the recorded ``init_args`` go
      to ``Net``; the recorded class path is not imported at all.
    - Otherwise the recorded class path is imported from the installed environment only
      (never from the checkpoint's run or step folder, located with importlib's finders before
      anything is imported) and must be an ``nnx.Module`` subclass, checked before any call.
    - ``trust_code=True`` also imports code saved with the checkpoint (a generated model module
      beside its ``step_*`` folders), searched first.

    The recorded arguments are checked against the class's signature and annotations before
    the call (a tampered ``width: "16"`` is a :class:`CheckpointError`), then the module is built
    with a fresh ``nnx.Rngs`` and given the checkpoint's parameters and statistics
    (:func:`load_model`).

    Args:
        path: a run's checkpoint folder (``trainer.checkpoint.dirpath``), or one ``step_*`` folder.
        which: in a folder, "best" (by the metric its ``ModelCheckpoint`` monitored) or "last"
            (the newest good checkpoint).
        model: an ``nnx.Module`` class to build with the recorded arguments.
        trust_code: also run code saved with the checkpoint (only for checkpoints you trust).

    Returns:
        ``(model, config)``: the module in eval mode (Dropout off, BatchNorm on its running
        statistics), and the run's record (the resolved config, ``class_paths``, ``versions``).

    Raises:
        CheckpointError: one line: the checkpoint records no model, its class is refused (named,
            with both ways to allow it) or cannot be imported, the recorded arguments do not
            fit, there is no best checkpoint, or the files are corrupt.

    Example: ``model, config = jaxlight.load_from_checkpoint("runs/ckpt", which="best")``
    rebuilds the recorded class; ``load_from_checkpoint("runs/ckpt", model=Net)`` builds
    ``Net`` with the recorded arguments; then ``logits = model(x)``.
    """
    if model is not None and not (inspect.isclass(model) and issubclass(model, nnx.Module)):
        raise TypeError(f"load_from_checkpoint: model must be an nnx.Module class (the class, not an instance: "
                        f"use jaxlight.checkpoint.load_model(path, instance) for one), got {model!r}")
    # A fit may be saving into the folder meanwhile: it writes new checkpoints and prunes old
    # ones. A checkpoint that goes away or changes while it is read is tried again, newest first.
    for attempt in range(_RETRIES + 1):
        folder = None
        try:
            folder = resolve_checkpoint(path, which)
            return _load_recorded(folder, model, trust_code)
        except CheckpointError as exc:
            root = folder.parent if folder is not None else Path(path)
            if folder is not None:  # (it verified a moment ago: gone or rewritten since?)
                changed = not (folder / "manifest.json").exists()
            else:  # (the best one gone, or its record unreadable, as it was being picked)
                changed = isinstance(exc, CorruptCheckpointError) or "is missing" in str(exc)
            holder = saving_process(root) if changed else None
            if holder is None:
                raise
            if attempt == _RETRIES:
                raise CheckpointError(f"{path}: the checkpoints changed under every one of {_RETRIES + 1} tries to "
                                      f"load one: a fit is saving into {root} and pruning there ({holder}); try "
                                      f"again, or load a step_* folder it keeps") from exc
            warnings.warn(f"{folder or path} changed while it was loaded (the fit saving into {root}, {holder}, "
                          f"pruned or replaced it); trying the newest complete one again", CheckpointWarning,
                          stacklevel=2)
            time.sleep(0.05 * 2 ** attempt)


_RETRIES = 5


def _load_recorded(folder: Path, model, trust_code: bool):
    """``load_from_checkpoint`` of one checkpoint folder."""
    record = recorded_hparams(folder)
    model_spec = record.get("model")
    if not isinstance(model_spec, dict) or (model is None and not model_spec.get("class_path")):
        raise CheckpointError(
            f"{folder} records no model to rebuild (it was trained without a config and without "
            f"jaxlight.save_hyperparameters in the model's __init__): build the model yourself and call "
            f"jaxlight.checkpoint.load_model(path, model)")
    seed = record.get("seed", 0)
    seed = 0 if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CheckpointError(f"{folder}: the recorded seed is {seed!r}, not an int")
    from jaxlight.trust import code_folders

    built = build_recorded_model(model_spec, seed, str(folder), model=model, folders=code_folders(folder),
                                 trust_code=trust_code)
    return load_model(folder, built), record

