"""MNIST on disk: find it, verify it, read it — and download it when it is nowhere.

Where the files come from, first match wins:

1. the ``data_dir`` argument (``--data-dir`` on the command line);
2. the ``JAXLIGHT_DATA`` environment variable;
3. the user cache, ``$XDG_CACHE_HOME/jaxlight`` (default ``~/.cache/jaxlight``).

An explicit ``data_dir`` is the only root searched: it is used (read, or downloaded into when
it is an empty folder) or refused (it does not exist, is a file, or holds some of the four files
but not all), never silently replaced by ``JAXLIGHT_DATA`` or the cache. Without one, a root that
does not hold the files is skipped.

Each of those is a *root*: the four IDX files may sit in ``<root>/MNIST/raw/`` (the layout
``torchvision.datasets.MNIST(root=...)`` reads, so one copy serves both frameworks) or directly
in ``<root>/``, uncompressed or as ``.gz``. When no root holds them, they are downloaded from
the standard mirrors into ``<first root>/MNIST/raw/``, checked against the published MD5 sums and
decompressed there. Every file that is read is checked against its published checksum too.

Example: ``train, test = load_mnist("data")`` gives ``train.images`` of shape
``(60000, 28, 28)`` and dtype ``uint8`` and ``train.labels`` of dtype ``int32``; ``test`` holds
the 10000 test examples the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MNIST_FILES",
    "MIRRORS",
    "MNISTError",
    "MNISTSplit",
    "default_cache_dir",
    "candidate_roots",
    "find_mnist",
    "download_mnist",
    "read_idx",
    "read_bytes",
    "md5",
    "verify_checksum",
    "load_mnist",
]

ENV_VAR = "JAXLIGHT_DATA"

# name -> (md5 of the uncompressed file, md5 of the published .gz).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c"),
}

# The mirrors torchvision uses, in its order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX magic: two zero bytes, a type code, the number of dimensions. MNIST uses type 0x08 (uint8).
_IDX_UBYTE = 0x08


class MNISTError(ValueError):
    """A missing, corrupt or inconsistent MNIST file. The message names the file."""


@dataclass(frozen=True)
class MNISTSplit:
    """One split of MNIST held in host memory.

    Attributes:
        images: (N, 28, 28) uint8, pixel values 0-255 as published.
        labels: (N,) int32, digits 0-9.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxlight``, or ``~/.cache/jaxlight``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxlight"


def candidate_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The roots searched for MNIST, in order (see the module docstring): ``data_dir`` alone
    when it is given."""
    if data_dir is not None:
        return [Path(data_dir)]
    roots = []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    roots.append(default_cache_dir())
    return roots


def _locate(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _raw_folder_with_all_files(root: Path) -> Path | None:
    for folder in (root / "MNIST" / "raw", root):
        if all(_locate(folder, name) for name in MNIST_FILES):
            return folder
    return None


def find_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder that holds all four MNIST files, or None when no candidate root does.

    An explicit ``data_dir`` is the only place searched, and one that does not exist, is a file,
    or holds only some of the files is an error, not something to skip: the user named it, so
    silently reading (or downloading) something else would hide their mistake.
    """
    if data_dir is not None:
        root = Path(data_dir)
        if not root.exists():
            raise MNISTError(f"--data-dir {data_dir!s} does not exist")
        if not root.is_dir():
            raise MNISTError(f"--data-dir {data_dir!s} is a file, not a folder holding MNIST/raw/")
        for folder in (root / "MNIST" / "raw", root):
            present = [name for name in MNIST_FILES if _locate(folder, name)]
            if present and len(present) < len(MNIST_FILES):
                missing = [name for name in MNIST_FILES if name not in present]
                raise MNISTError(f"--data-dir {data_dir!s}: {folder} holds {len(present)} of the 4 MNIST files; "
                                 f"missing: {', '.join(missing)}")
    for root in candidate_roots(data_dir):
        folder = _raw_folder_with_all_files(root)
        if folder is not None:
            return folder
    return None


def md5(data: bytes) -> str:
    """The hex MD5 digest of ``data``: what :data:`MNIST_FILES` publishes for each file.

    >>> md5(b"")
    'd41d8cd98f00b204e9800998ecf8427e'
    """
    return hashlib.md5(data).hexdigest()


def read_bytes(path: Path) -> bytes:
    """The file's uncompressed bytes (a ``.gz`` is decompressed); a damaged ``.gz`` is an
    :class:`MNISTError` naming the file."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise MNISTError(f"{path}: damaged or truncated gzip file ({exc})") from exc


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (raw or ``.gz``) of unsigned bytes into a numpy array.

    Format: magic ``00 00 08 <ndim>``, then ``ndim`` big-endian uint32 sizes, then the body.

    Args:
        path: the file.
        expected_ndim: 3 for images, 1 for labels; checked when given.

    Returns:
        uint8 array of the shape the header states.

    Raises:
        MNISTError: naming the file, for a wrong magic number, a header that disagrees with
            the file size, a truncated body or a damaged gzip stream.
    """
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4:
        raise MNISTError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code != _IDX_UBYTE:
        raise MNISTError(
            f"{path}: wrong magic number 0x{data[:4].hex()} (an IDX file of unsigned bytes "
            f"starts with 0x000008 and its number of dimensions)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise MNISTError(
            f"{path}: wrong magic number 0x{data[:4].hex()}: {ndim} dimensions, expected "
            f"{expected_ndim} ({'images' if expected_ndim == 3 else 'labels'})"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise MNISTError(f"{path}: truncated header ({len(data)} bytes, header needs {header_len})")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    body_len = int(np.prod(shape, dtype=np.int64))
    actual = len(data) - header_len
    if actual < body_len:
        raise MNISTError(
            f"{path}: truncated body: header says shape {shape} ({body_len} bytes) but only "
            f"{actual} bytes follow"
        )
    if actual > body_len:
        raise MNISTError(
            f"{path}: header disagrees with file size: shape {shape} needs {body_len} bytes "
            f"but {actual} follow"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def verify_checksum(path: Path, name: str) -> None:
    """Check the MNIST file ``name`` (a key of :data:`MNIST_FILES`) at ``path``, raw or ``.gz``,
    against its published MD5; a mismatch is an :class:`MNISTError` naming the file."""
    raw_md5, gz_md5 = MNIST_FILES[name]
    actual = md5(read_bytes(path))
    if actual != raw_md5:
        if path.suffix == ".gz" and md5(path.read_bytes()) == gz_md5:
            return  # pragma: no cover - the two sums always agree for a good file
        raise MNISTError(
            f"{path}: checksum mismatch: md5 of its contents is {actual}, the published MNIST "
            f"file has {raw_md5}. The file is corrupt or not MNIST; delete it and download again."
        )


def _read_split(folder: Path, split: str, verify: bool) -> MNISTSplit:
    image_name, label_name = _SPLIT_FILES[split]
    image_path, label_path = _locate(folder, image_name), _locate(folder, label_name)
    for name, path in ((image_name, image_path), (label_name, label_path)):
        if path is None:
            raise MNISTError(f"{folder / name}: missing (nor is there a .gz)")
    images = read_idx(image_path, expected_ndim=3)
    labels = read_idx(label_path, expected_ndim=1)
    if images.shape[1:] != (28, 28):
        raise MNISTError(f"{image_path}: images are {images.shape[1:]}, MNIST's are (28, 28)")
    if len(images) != len(labels):
        raise MNISTError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
            f"labels: image/label count mismatch"
        )
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise MNISTError(
            f"{label_path}: label {int(labels[bad])} at index {bad} is outside 0-9"
        )
    # Checksums last: the structural checks above give the more precise message.
    if verify:
        verify_checksum(image_path, image_name)
        verify_checksum(label_path, label_name)
    return MNISTSplit(images=images, labels=labels.astype(np.int32))


def _download_file(url: str, dest: Path, show_progress: bool) -> None:
    from tqdm.auto import tqdm

    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - fixed mirrors
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not show_progress
            ) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a half download is never left behind)
        raise
    os.replace(tmp, dest)


def download_mnist(
    root: str | os.PathLike | None = None,
    mirrors: tuple[str, ...] = MIRRORS,
    show_progress: bool = True,
) -> Path:
    """Download the four files into ``<root>/MNIST/raw/``, verify and decompress them.

    Args:
        root: where to put them; default the user cache (:func:`default_cache_dir`).
        mirrors: base URLs tried in order for each file.
        show_progress: a tqdm bar per file.

    Returns:
        The folder holding the four verified, uncompressed files.

    Raises:
        MNISTError: when every mirror fails for a file (the message lists each failure and how
            to point jaxlight at a local copy instead), or a download fails its checksum.
    """
    folder = Path(root or default_cache_dir()) / "MNIST" / "raw"
    made = []  # (the folders this call creates: removed again, when still empty, if it fails)
    parent = folder
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _download_all(folder, mirrors, show_progress, root)
    except BaseException:
        for made_folder in made:  # (deepest first)
            try:
                made_folder.rmdir()
            except OSError:  # (not empty: something else is in it now)
                break
        raise
    return folder


def _download_all(folder: Path, mirrors: tuple[str, ...], show_progress: bool, root) -> None:
    """Each missing file into ``folder``: downloaded, checked against its MD5, decompressed."""
    for name, (raw_md5, gz_md5) in MNIST_FILES.items():
        final = folder / name
        if final.is_file() and md5(final.read_bytes()) == raw_md5:
            continue
        gz_path = folder / (name + ".gz")
        errors = []
        for mirror in mirrors:
            try:
                _download_file(mirror + name + ".gz", gz_path, show_progress)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(f"{mirror}{name}.gz: {exc}")
                continue
            if md5(gz_path.read_bytes()) != gz_md5:
                errors.append(f"{mirror}{name}.gz: checksum mismatch")
                gz_path.unlink()
                continue
            break
        else:
            raise MNISTError(  # (one line: the command lines print errors as one line)
                f"could not download {name}.gz from any mirror ({'; '.join(errors)}). ".replace("\n", " ") + _where_to_put_it(root)
            )
        # Decompress to a temporary file first so an interrupted run never leaves a half file
        # under the final name.
        with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
            tmp.write(read_bytes(gz_path))
        os.replace(tmp.name, final)
        gz_path.unlink()
        verify_checksum(final, name)


def _where_to_put_it(data_dir: str | os.PathLike | None = None) -> str:
    looked = ", ".join(str(r) for r in candidate_roots(data_dir))
    return (
        f"Looked for MNIST under: {looked} (each as <root>/MNIST/raw/ or <root>/). "
        f"Point jaxlight at a local copy with --data-dir DIR, data_dir=DIR or {ENV_VAR}=DIR, "
        f"where DIR/MNIST/raw/ holds train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (raw or .gz)."
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
) -> tuple[MNISTSplit, MNISTSplit]:
    """Find (or download) MNIST and read both splits.

    Args:
        data_dir: a root to search first; see the module docstring for the search order.
        download: fetch the files into the user cache when no root holds them.
        verify: check each file against its published MD5 (about 0.1 s for all four).

    Returns:
        ``(train, test)``: 60,000 and 10,000 examples.

    Raises:
        MNISTError: files missing (and not downloadable), or any file corrupt; the message
            names the file and what is wrong with it.
    """
    folder = find_mnist(data_dir)
    if folder is None:
        if not download:
            raise MNISTError("MNIST not found. " + _where_to_put_it(data_dir))
        # Download into the first root the user named (as torchvision does with its root),
        # else into the cache.
        folder = download_mnist(candidate_roots(data_dir)[0])
    return _read_split(folder, "train", verify), _read_split(folder, "test", verify)
