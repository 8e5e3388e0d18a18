"""MNIST on disk: the real files, the search order, every kind of bad file, and the download
path (served from localhost: tests never touch the network)."""

import gzip
import hashlib
import http.server
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxlight.data import mnist
from jaxlight.data.mnist import MNIST_FILES, MNISTError, find_mnist, load_mnist, read_idx

# Published facts about MNIST (shared/data/README.md).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_shapes_dtypes_and_published_facts(mnist):
    train, test = mnist
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28) and test.labels.dtype == np.int32
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(train.labels).tolist() == TRAIN_COUNTS
    assert np.bincount(test.labels).tolist() == TEST_COUNTS


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_tiny_mnist(folder: Path, n_train=12, n_test=5, gz=False) -> dict:
    """Valid IDX files of a tiny fake MNIST; returns {name: md5 of uncompressed bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    sums = {}
    for name, array in arrays.items():
        data = idx_bytes(array)
        sums[name] = hashlib.md5(data).hexdigest()
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return sums


@pytest.fixture
def tiny_sums(monkeypatch):
    """Make the checksum table accept the tiny fake files written by a test."""

    def install(sums: dict, gz_sums: dict | None = None):
        table = {name: (sums[name], (gz_sums or {}).get(name, "0" * 32)) for name in MNIST_FILES}
        monkeypatch.setattr(mnist, "MNIST_FILES", table)

    return install


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No JAXLIGHT_DATA, and a private empty cache."""
    monkeypatch.delenv("JAXLIGHT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


# --- where the files are found --------------------------------------------------------------

@pytest.mark.parametrize("layout", ["torchvision", "flat", "gzip"])
def test_layouts_are_found_and_read(isolated, tiny_sums, layout):
    root = isolated / "root"
    folder = root / "MNIST" / "raw" if layout != "flat" else root
    tiny_sums(write_tiny_mnist(folder, gz=layout == "gzip"))
    train, test = load_mnist(root, download=False)
    assert find_mnist(root) == folder
    assert train.images.shape == (12, 28, 28) and len(test) == 5


def test_search_order_argument_then_env_then_cache(isolated, tiny_sums, monkeypatch):
    sums = write_tiny_mnist(isolated / "arg" / "MNIST" / "raw")
    write_tiny_mnist(isolated / "env" / "MNIST" / "raw")
    write_tiny_mnist(isolated / "cache" / "jaxlight" / "MNIST" / "raw")
    tiny_sums(sums)
    monkeypatch.setenv("JAXLIGHT_DATA", str(isolated / "env"))
    assert find_mnist(isolated / "arg") == isolated / "arg" / "MNIST" / "raw"
    assert find_mnist() == isolated / "env" / "MNIST" / "raw"
    monkeypatch.delenv("JAXLIGHT_DATA")
    assert find_mnist() == isolated / "cache" / "jaxlight" / "MNIST" / "raw"
    # An explicit root that holds nothing is not replaced by the env or the cache.
    (isolated / "empty").mkdir()
    assert find_mnist(isolated / "empty") is None


def test_missing_explicit_dir_is_an_error(isolated):
    with pytest.raises(MNISTError, match="does-not-exist.*does not exist"):
        load_mnist(isolated / "does-not-exist")


def test_not_found_without_download_says_where_it_looked(isolated):
    (isolated / "empty").mkdir()
    with pytest.raises(MNISTError) as err:
        load_mnist(isolated / "empty", download=False)
    message = str(err.value)
    assert str(isolated / "empty") in message and str(isolated / "cache" / "jaxlight") not in message
    assert "--data-dir" in message and "JAXLIGHT_DATA" in message


# --- bad files ------------------------------------------------------------------------------

def corrupt(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


GOOD_IMAGES = np.zeros((3, 28, 28), np.uint8)


@pytest.mark.parametrize(
    "data, ndim, message",
    [
        (b"\x00\x00\x09\x03" + struct.pack(">3I", 3, 28, 28) + GOOD_IMAGES.tobytes(), 3, "wrong magic number"),
        (b"\x12\x34\x08\x03" + struct.pack(">3I", 3, 28, 28) + GOOD_IMAGES.tobytes(), 3, "wrong magic number"),
        (idx_bytes(np.zeros(3, np.uint8)), 3, "1 dimensions, expected 3"),
        (idx_bytes(GOOD_IMAGES)[:-100], 3, "truncated body"),
        (idx_bytes(GOOD_IMAGES) + b"extra", 3, "header disagrees with file size"),
        (b"\x00\x00\x08\x03\x00\x00", 3, "truncated header"),
        (b"\x00\x00", 1, "too short"),
    ],
    ids=["type-code", "magic-bytes", "ndim", "truncated-body", "size-mismatch", "short-header", "tiny"],
)
def test_structural_errors_name_the_file(tmp_path, data, ndim, message):
    path = corrupt(tmp_path, "bad-idx", data)
    with pytest.raises(MNISTError, match=message) as err:
        read_idx(path, expected_ndim=ndim)
    assert str(path) in str(err.value)


def test_truncated_gzip_names_the_file(tmp_path):
    path = corrupt(tmp_path, "x.gz", gzip.compress(idx_bytes(GOOD_IMAGES))[:-20])
    with pytest.raises(MNISTError, match="damaged or truncated gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_count_mismatch(isolated, tiny_sums):
    folder = isolated / "r"
    tiny_sums(write_tiny_mnist(folder))
    corrupt(folder, "train-labels-idx1-ubyte", idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(MNISTError, match="12 images but .*train-labels-idx1-ubyte holds 11 labels"):
        load_mnist(folder, download=False, verify=False)


def test_label_out_of_range(isolated, tiny_sums):
    folder = isolated / "r"
    tiny_sums(write_tiny_mnist(folder))
    labels = np.zeros(5, np.uint8)
    labels[3] = 10
    corrupt(folder, "t10k-labels-idx1-ubyte", idx_bytes(labels))
    with pytest.raises(MNISTError, match=r"t10k-labels-idx1-ubyte: label 10 at index 3 is outside 0-9"):
        load_mnist(folder, download=False, verify=False)


def test_checksum_mismatch(isolated, tiny_sums):
    folder = isolated / "r"
    tiny_sums(write_tiny_mnist(folder))
    images = np.ones((12, 28, 28), np.uint8)  # valid structure, different bytes
    path = corrupt(folder, "train-images-idx3-ubyte", idx_bytes(images))
    with pytest.raises(MNISTError, match="checksum mismatch") as err:
        load_mnist(folder, download=False)
    assert str(path) in str(err.value)
    load_mnist(folder, download=False, verify=False)  # structurally fine: only the sum is wrong


def test_real_files_fail_checksum_when_one_byte_flips(isolated, data_dir):
    folder = isolated / "copy" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for name in MNIST_FILES:
        os.symlink(data_dir / "MNIST" / "raw" / name, folder / name)
    labels = bytearray((data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes())
    labels[100] = (labels[100] + 1) % 10
    (folder / "t10k-labels-idx1-ubyte").unlink()
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(MNISTError, match="t10k-labels-idx1-ubyte: checksum mismatch"):
        load_mnist(isolated / "copy", download=False)


# --- download -------------------------------------------------------------------------------

@pytest.fixture
def mirror(tmp_path):
    """A localhost HTTP server serving tiny gzipped MNIST files."""
    served = tmp_path / "served"
    sums = write_tiny_mnist(served, gz=True)
    gz_sums = {n: hashlib.md5((served / (n + ".gz")).read_bytes()).hexdigest() for n in sums}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", sums, gz_sums
    server.shutdown()


@pytest.mark.integration  # a localhost HTTP server: its port was refused once under a loaded -n 2 run
def test_download_verifies_decompresses_and_falls_back_across_mirrors(isolated, tiny_sums, mirror, monkeypatch):
    url, sums, gz_sums = mirror
    tiny_sums(sums, gz_sums)
    dead = "http://127.0.0.1:9/"  # discard port: connection refused
    monkeypatch.setattr(mnist, "MIRRORS", (dead, url))
    monkeypatch.setattr(mnist.download_mnist, "__defaults__", ((None, (dead, url), False)))
    train, test = load_mnist()  # nothing anywhere: downloads into the cache
    folder = isolated / "cache" / "jaxlight" / "MNIST" / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES)
    assert train.images.shape == (12, 28, 28) and len(test) == 5
    assert find_mnist() == folder


@pytest.mark.integration
def test_download_rejects_a_corrupt_mirror_and_explains(isolated, tiny_sums, mirror):
    url, sums, _ = mirror
    tiny_sums(sums)  # gz sums "000...": every download fails its checksum
    with pytest.raises(MNISTError) as err:
        mnist.download_mnist(isolated / "dl", mirrors=(url, "http://127.0.0.1:9/"), show_progress=False)
    message = str(err.value)
    assert "checksum mismatch" in message and "127.0.0.1:9" in message and "--data-dir" in message
    assert not list((isolated / "dl" / "MNIST" / "raw").glob("*.gz"))  # nothing half-written kept
