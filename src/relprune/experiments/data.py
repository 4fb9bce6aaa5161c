"""Datasets for the experiments: MNIST and Fashion-MNIST from IDX files, and a built-in one.

Files are looked for, in order, under ``--data-dir``, ``$RELPRUNE_DATA``,
the user cache folder, and Debian's ``/usr/share/datasets`` layout; each root
may hold torchvision's ``<Name>/raw/`` layout or the files themselves, gzip
or not. Downloads happen only when asked for, and every file read (local or
downloaded) can be checked against the SHA-256 of its decompressed bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.files import atomic_file
from ..errors import DataError

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class IdxFile:
    name: str  # without .gz
    sha256: str  # of the decompressed bytes


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    files: dict[str, IdxFile]  # role -> file
    mirrors: tuple[str, ...]
    debian_dir: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", "MNIST",
        {
            "train_images": IdxFile("train-images-idx3-ubyte",
                                    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            "train_labels": IdxFile("train-labels-idx1-ubyte",
                                    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            "test_images": IdxFile("t10k-images-idx3-ubyte",
                                   "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            "test_labels": IdxFile("t10k-labels-idx1-ubyte",
                                   "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        },
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "FashionMNIST",
        {
            "train_images": IdxFile("train-images-idx3-ubyte",
                                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            "train_labels": IdxFile("train-labels-idx1-ubyte",
                                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            "test_images": IdxFile("t10k-images-idx3-ubyte",
                                   "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            "test_labels": IdxFile("t10k-labels-idx1-ubyte",
                                   "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        },
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        debian_dir="/usr/share/datasets/fashion-mnist",
    ),
}
BUILTIN = "digits"
DATASET_NAMES = (BUILTIN, *DATASETS)


# -- IDX ------------------------------------------------------------------------

def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array, or raise DataError naming ``source`` and the fault."""
    if len(raw) < 4:
        raise DataError(f"{source}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code not in IDX_TYPES or ndim == 0:
        raise DataError(f"{source}: wrong magic number {raw[:4].hex()} (not an IDX file)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_TYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = len(raw) - header
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DataError(f"{source}: {kind}: header says {dims} ({expected} bytes of data), file has {body}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_bytes(path: Path) -> bytes:
    """File contents, decompressed when the name ends in .gz."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read: {err}") from err


def read_idx(path: str | Path, sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw), checking the decompressed bytes' SHA-256 when given."""
    path = Path(path)
    raw = read_bytes(path)
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256:
            raise DataError(f"{path}: checksum mismatch: sha256 of content is {got}, expected {sha256}")
    return parse_idx(raw, str(path))


# -- locating and downloading -----------------------------------------------------

def cache_dir() -> Path:
    """The per-user data folder ($XDG_CACHE_HOME/relprune or ~/.cache/relprune)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "relprune"


def search_roots(data_dir: str | Path | None = None) -> list[Path]:
    """Where dataset files are looked for, in order."""
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    if os.environ.get("RELPRUNE_DATA"):
        roots.append(Path(os.environ["RELPRUNE_DATA"]))
    roots.append(cache_dir())
    return roots


def _candidates(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / spec.folder / "raw", root / spec.folder, root]


def find_file(spec: DatasetSpec, role: str, roots: list[Path]) -> Path | None:
    """First existing path of one dataset file (gzip or raw) under the roots or Debian's folder."""
    name = spec.files[role].name
    folders = [c for r in roots for c in _candidates(spec, r)]
    if spec.debian_dir:
        folders.append(Path(spec.debian_dir))
    for folder in folders:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


Transport = Callable[[str], bytes]


def urllib_transport(url: str, timeout: float = 60.0) -> bytes:
    """GET a URL with the standard library."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download(name: str, root: str | Path, *, mirrors: tuple[str, ...] | None = None,
             transport: Transport = urllib_transport) -> Path:
    """Fetch a dataset's files into ``root/<Folder>/raw``, verified, written atomically.

    Each file is tried on every mirror in turn; a payload that fails to
    decompress or to match its checksum is rejected and the next mirror tried.
    """
    spec = DATASETS[name]
    target = Path(root) / spec.folder / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for idx in spec.files.values():
        dest = target / f"{idx.name}.gz"
        if dest.is_file():
            try:
                read_idx(dest, idx.sha256)
                continue
            except DataError:
                pass  # corrupt leftover: fetch again
        errors = []
        for mirror in mirrors or spec.mirrors:
            url = mirror.rstrip("/") + f"/{idx.name}.gz"
            try:
                payload = transport(url)
                content = gzip.decompress(payload)
            except Exception as err:  # network failures vary by transport
                errors.append(f"{url}: {err}")
                continue
            got = hashlib.sha256(content).hexdigest()
            if got != idx.sha256:
                errors.append(f"{url}: checksum mismatch (sha256 {got}, expected {idx.sha256})")
                continue
            with atomic_file(dest) as fh:
                fh.write(payload)
            break
        else:
            raise DataError(f"could not download {idx.name}.gz: " + "; ".join(errors))
    return target


# -- splits -----------------------------------------------------------------------

@dataclass
class Split:
    """Inputs (N, C, H, W) float32, normalised, and integer labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]

    def head(self, count: int) -> Split:
        return Split(self.x[:count], self.y[:count])


@dataclass
class Data:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def _split_and_normalise(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                         y_test: np.ndarray, val_size: int, seed: int, scale: float) -> Data:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_train), generator=g)
    xt = torch.from_numpy(np.asarray(x_train, dtype=np.float32) / scale).unsqueeze(1)
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    val_idx, train_idx = order[:val_size], order[val_size:]
    mean, std = xt[train_idx].mean(), xt[train_idx].std()

    def norm(x: Tensor) -> Tensor:
        return ((x - mean) / std).contiguous()

    xs = torch.from_numpy(np.asarray(x_test, dtype=np.float32) / scale).unsqueeze(1)
    return Data(
        name,
        Split(norm(xt[train_idx]), yt[train_idx]),
        Split(norm(xt[val_idx]), yt[val_idx]),
        Split(norm(xs), torch.from_numpy(np.asarray(y_test, dtype=np.int64))),
        int(max(int(yt.max()), int(np.max(y_test)))) + 1,
    )


def load_idx_dataset(name: str, data_dir: str | Path | None = None, *, download_missing: bool = False,
                     verify: bool = False, seed: int = 0, val_size: int = 5000) -> Data:
    """MNIST or Fashion-MNIST: 60k train split into train/validation, 10k test, scaled to [0,1] and standardised."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    spec = DATASETS[name]
    roots = search_roots(data_dir)
    paths = {role: find_file(spec, role, roots) for role in spec.files}
    if any(p is None for p in paths.values()):
        if not download_missing:
            missing = [spec.files[r].name for r, p in paths.items() if p is None]
            raise DataError(
                f"{spec.name}: files {missing} not found; looked in {', '.join(map(str, roots))}"
                f"{' and ' + spec.debian_dir if spec.debian_dir else ''} (--data-dir, $RELPRUNE_DATA, the user "
                f"cache); put the IDX files (gzip or not) in one of them or point --data-dir at them, or, on a "
                f"machine with a network, pass --download to fetch them into {roots[0]}"
            )
        download(name, roots[0])
        paths = {role: find_file(spec, role, roots) for role in spec.files}
    arrays = {role: read_idx(p, spec.files[role].sha256 if verify else None) for role, p in paths.items()}
    for part in ("train", "test"):
        if len(arrays[f"{part}_images"]) != len(arrays[f"{part}_labels"]):
            raise DataError(f"{spec.name}: {part} images and labels differ in count "
                            f"({paths[f'{part}_images']}, {paths[f'{part}_labels']})")
    return _split_and_normalise(name, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                                arrays["test_labels"], val_size, seed, 255.0)


def load_digits(seed: int = 0) -> Data:
    """scikit-learn's bundled 8x8 digits (1,797 images): needs no files. 60/20/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images, labels = bunch.images, bunch.target
    g = torch.Generator().manual_seed(seed + 12345)
    order = torch.randperm(len(labels), generator=g).numpy()
    n_test = len(labels) // 5
    test, rest = order[:n_test], order[n_test:]
    return _split_and_normalise("digits", images[rest], labels[rest], images[test], labels[test],
                                n_test, seed, 16.0)


def load_dataset(name: str, data_dir: str | Path | None = None, *, download_missing: bool = False,
                 verify: bool = False, seed: int = 0) -> Data:
    """Any dataset by name: 'digits' (built in), 'mnist', 'fashion-mnist'."""
    if name == BUILTIN:
        return load_digits(seed)
    return load_idx_dataset(name, data_dir, download_missing=download_missing, verify=verify, seed=seed)
