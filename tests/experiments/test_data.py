"""IDX reading, file discovery, downloads (against a local server), splits, the built-in dataset."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from relprune.errors import DataError
from relprune.experiments import data as D


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    dt = ">i4" if array.dtype == np.int32 else np.uint8
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(dt).tobytes()


def write_dataset(root: Path, folder: str, n_train=40, n_test=10, gz=True) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 255, (n_train, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, (n_train,), dtype=np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 255, (n_test, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(n_test, dtype=np.uint8) % 10),
    }
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (raw / name).write_bytes(content)
    return files


def test_parse_round_trip_and_types():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(D.parse_idx(idx_bytes(a)), a)
    b = np.array([1, -2, 3], dtype=np.int32)
    assert np.array_equal(D.parse_idx(idx_bytes(b)), b)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x00\x01" + b[2:], "wrong magic"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"xx", "trailing"),
    (lambda b: b[:2], "too short"),
    (lambda b: b[:9], "truncated header"),
])
def test_corrupt_idx_names_file_and_fault(tmp_path, mutate, message):
    good = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(mutate(good))
    with pytest.raises(DataError, match=message) as info:
        D.read_idx(path)
    assert str(path) in str(info.value)


def test_bad_gzip_and_checksum(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        D.read_idx(path)
    content = idx_bytes(np.zeros((2, 2), dtype=np.uint8))
    path.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match="checksum mismatch"):
        D.read_idx(path, sha256="0" * 64)
    assert D.read_idx(path, sha256=hashlib.sha256(content).hexdigest()).shape == (2, 2)


@pytest.mark.parametrize("gz", [True, False])
def test_loader_on_written_files(tmp_path, gz):
    write_dataset(tmp_path, "MNIST", gz=gz)
    data = D.load_idx_dataset("mnist", tmp_path, val_size=8)
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 10)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert abs(float(data.train.x.mean())) < 1e-5 and abs(float(data.train.x.std()) - 1) < 1e-3
    again = D.load_idx_dataset("mnist", tmp_path, val_size=8)
    assert np.array_equal(again.val.y.numpy(), data.val.y.numpy())  # fixed seed, same split


def test_search_order_env_and_missing(tmp_path, monkeypatch):
    write_dataset(tmp_path / "envroot", "FashionMNIST")
    monkeypatch.setenv("RELPRUNE_DATA", str(tmp_path / "envroot"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert len(D.load_idx_dataset("fashion-mnist", None, val_size=4).test) == 10
    monkeypatch.delenv("RELPRUNE_DATA")
    with pytest.raises(DataError, match="--download"):
        D.load_idx_dataset("mnist", tmp_path / "empty")


def test_mismatched_counts(tmp_path):
    files = write_dataset(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, dtype=np.uint8))))
    assert files
    with pytest.raises(DataError, match="differ in count"):
        D.load_idx_dataset("mnist", tmp_path, val_size=2)


def test_builtin_digits_needs_no_files():
    data = D.load_dataset("digits")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1797


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _tiny_spec(files: dict[str, bytes], monkeypatch) -> None:
    roles = ["train_images", "train_labels", "test_images", "test_labels"]
    spec = D.DatasetSpec("mnist", "MNIST",
                         {r: D.IdxFile(n, hashlib.sha256(c).hexdigest()) for r, (n, c) in zip(roles, files.items(),
                                                                                              strict=True)},
                         ("http://127.0.0.1:9/unused/",))
    monkeypatch.setitem(D.DATASETS, "mnist", spec)


def test_download_from_local_server_with_corrupt_first_mirror(tmp_path, http_root, monkeypatch):
    www, url = http_root
    files = write_dataset(tmp_path / "src", "MNIST")
    _tiny_spec(files, monkeypatch)
    (www / "good").mkdir()
    (www / "bad").mkdir()
    for name, content in files.items():
        (www / "good" / f"{name}.gz").write_bytes(gzip.compress(content))
        (www / "bad" / f"{name}.gz").write_bytes(gzip.compress(content[:-3] + b"\x01\x02\x03"))
    dest = tmp_path / "dl"
    with pytest.raises(DataError, match="checksum mismatch"):
        D.download("mnist", dest, mirrors=(url + "bad/",))
    assert not list((dest / "MNIST" / "raw").glob("*.gz")), "a corrupt payload is never written"
    D.download("mnist", dest, mirrors=(url + "missing/", url + "bad/", url + "good/"))
    data = D.load_idx_dataset("mnist", dest, verify=True, val_size=4)
    assert len(data.test) == 10


def test_load_with_download_flag_uses_transport(tmp_path, monkeypatch):
    files = write_dataset(tmp_path / "src", "MNIST")
    _tiny_spec(files, monkeypatch)
    calls = []

    def fake(url: str) -> bytes:
        calls.append(url)
        return gzip.compress(files[url.rsplit("/", 1)[1][:-3]])

    monkeypatch.setattr(D, "urllib_transport", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RELPRUNE_DATA", raising=False)
    with pytest.raises(DataError):
        D.load_idx_dataset("mnist", tmp_path / "target", val_size=4)
    assert not calls, "no download without the explicit flag"
    monkeypatch.setattr(D.download, "__kwdefaults__", {"mirrors": None, "transport": fake})
    data = D.load_idx_dataset("mnist", tmp_path / "target", download_missing=True, val_size=4)
    assert len(calls) == 4 and len(data.train) == 36


def test_shared_data_checksums(shared_data):
    for name in ("mnist", "fashion-mnist"):
        data = D.load_dataset(name, shared_data, verify=True)
        assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
