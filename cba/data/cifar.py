"""CIFAR-10/100 loaders for the official python-pickle folders.

The pickles are data, but a backdoor lab treats every file as untrusted input,
so they are read with an unpickler that only rebuilds numpy arrays, and every
field is checked before use. An optional download fetches the official tarball,
checks its MD5 and extracts it without following unsafe member paths.
"""

from __future__ import annotations

import codecs
import operator
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
try:  # numpy 2
    from numpy._core import multiarray as np_multiarray, numeric as np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as np_multiarray, numeric as np_numeric

from cba.data.base import ImageSet
from cba.data.checksum import md5sum
from cba.data.registry import DATASETS
from cba.errors import ConfigError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    files_text: str  # how the expected files are described in errors

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CIFAR10 = CifarSpec(
    name="cifar10", folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    meta_file="batches.meta", label_key=b"labels", names_key=b"label_names", num_classes=10,
    files_text="data_batch_1..5 and test_batch",
)
CIFAR100 = CifarSpec(
    name="cifar100", folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=("train",), test_files=("test",),
    meta_file="meta", label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100,
    files_text="train and test",
)

# The largest array an official CIFAR file holds: CIFAR-100's 50,000 training images of 3,072 bytes. A pickle
# may name any shape; nothing larger is allocated, whatever the file claims.
MAX_ARRAY_BYTES = 50_000 * 3 * 32 * 32


def _check_array_size(shape: object, dtype: object) -> None:
    """Refuse an array the format cannot hold, before numpy allocates it."""
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    try:
        sizes = [operator.index(d) for d in dims]
        itemsize = np.dtype(dtype).itemsize
    except Exception:  # not a shape or not a dtype: corrupt
        raise pickle.UnpicklingError(f"bad array shape {shape!r} or dtype {dtype!r}") from None
    total = 1
    for size in sizes:
        if size < 0:
            raise pickle.UnpicklingError(f"negative array dimension in {shape!r}")
        total *= size
    if total * max(itemsize, 1) > MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError(f"an array of shape {tuple(sizes)} is larger than any CIFAR file holds")


class _BoundedArray(np.ndarray):
    """Stands in for numpy.ndarray in a pickle: calling it directly is bounded like every other constructor."""

    def __new__(cls, shape, dtype=float, *args, **kwargs):  # noqa: ANN001, ANN204 - numpy's signature
        _check_array_size(shape, dtype)
        return np.ndarray.__new__(np.ndarray, shape, dtype, *args, **kwargs)


def _bounded_reconstruct(subtype, shape, dtype):  # noqa: ANN001, ANN202 - numpy's pickle protocol
    _check_array_size(shape, dtype)
    return np_multiarray._reconstruct(np.ndarray if subtype is _BoundedArray else subtype, shape, dtype)


def _bounded_frombuffer(buffer, dtype, shape, order):  # noqa: ANN001, ANN202 - numpy's pickle protocol
    _check_array_size(shape, dtype)
    return np_numeric._frombuffer(buffer, dtype, shape, order)


# Only what numpy needs to rebuild an array (numpy.core is numpy 1.x's, and Python 2's, name), each bounded.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"): _BoundedArray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
    ("numpy._core.multiarray", "_reconstruct"): _bounded_reconstruct,
    ("numpy._core.numeric", "_frombuffer"): _bounded_frombuffer,
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        module = module.replace("numpy.core.", "numpy._core.")
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return _SAFE_GLOBALS[(module, name)]


def _unpickle(path: Path) -> dict:
    """Read one CIFAR pickle; anything but a plain dict of arrays/lists is corrupt."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any failure to parse means the file is unusable
        raise ConfigError("root", str(path), f"not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ConfigError("root", str(path), f"a CIFAR pickle must hold a dict, got {type(obj).__name__}")
    return obj


def _read_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """One batch as HWC uint8 images and int64 labels, validated."""
    batch = _unpickle(path)
    data, labels = batch.get(b"data"), batch.get(spec.label_key)
    if data is None or labels is None:
        need = f"b'data' and {spec.label_key!r}"
        raise ConfigError("root", str(path), f"a {spec.name} pickle must have keys {need}")
    if not isinstance(data, np.ndarray):
        raise ConfigError("root", str(path), f"b'data' must be a uint8 array, got {type(data).__name__}")
    if isinstance(labels, list) and not all(type(label) is int for label in labels):
        # also catches a list that contains itself, which numpy would recurse into
        raise ConfigError("root", str(path), f"{spec.label_key!r} must be a list of integers")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError("root", str(path), f"b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError("root", str(path), f"{spec.label_key!r} must be {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ConfigError("root", str(path), f"labels must lie in [0, {spec.num_classes})")
    # Rows are channel-major: 1024 R, then 1024 G, then 1024 B, each row-major 32x32.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _class_names(folder: Path, spec: CifarSpec) -> list[str]:
    meta_path = folder / spec.meta_file
    if not meta_path.is_file():  # the meta file is optional: fall back to known names
        return list(CIFAR10_CLASSES) if spec is CIFAR10 else [str(i) for i in range(spec.num_classes)]
    names = _unpickle(meta_path).get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise ConfigError("root", str(meta_path), f"{spec.names_key!r} must list {spec.num_classes} names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _expected(root: Path, spec: CifarSpec) -> str:
    return (
        f"expected {root / spec.folder}/{spec.files_text} "
        f"(download from {spec.url}, or set data.download: true)"
    )


def _find_folder(root: Path, spec: CifarSpec, files: tuple[str, ...]) -> Path | None:
    """The batches folder: root/<folder>, or root itself when it is that folder."""
    for folder in (root / spec.folder, root):
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def _fetch(url: str, dest: Path) -> None:
    """Download `url` to `dest`; kept tiny so tests can replace it (no network in tests)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract only regular files and folders whose paths stay inside `dest`."""
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            parts = Path(member.name).parts
            if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute() or ".." in parts:
                raise ConfigError("download", member.name, f"{archive} holds an unsafe path; extract it by hand")
            if not (member.isfile() or member.isdir()):
                raise ConfigError("download", member.name, f"{archive} holds a link or device; extract it by hand")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters; members were checked above
            tar.extractall(dest, members=members)


def _download(root: Path, spec: CifarSpec) -> None:
    """Fetch, verify and extract the official tarball into `root`."""
    archive = root / spec.archive
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not (archive.is_file() and md5sum(archive) == spec.md5):
            _fetch(spec.url, archive)
    except (urllib.error.URLError, OSError) as exc:
        archive.unlink(missing_ok=True)
        raise ConfigError("download", True, f"download failed ({exc}); {_expected(root, spec)}") from None
    got = md5sum(archive)
    if got != spec.md5:
        archive.unlink(missing_ok=True)
        raise ConfigError(
            "download", True,
            f"{spec.archive} has md5 {got}, expected {spec.md5}; the file was deleted, retry or {_expected(root, spec)}",
        )
    try:
        _safe_extract(archive, root)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError("download", True, f"cannot extract {archive} ({exc}); {_expected(root, spec)}") from None


def load_cifar(spec: CifarSpec, split: str, root: str | None, download: bool = False) -> ImageSet:
    """Load one split of CIFAR-10/100 from `root`, downloading first if asked."""
    if root is None:
        raise ConfigError(
            "root", None,
            f"root must be set for {spec.name}: the folder that contains {spec.folder}/",
        )
    if not isinstance(download, bool):
        raise ConfigError("download", download, "true or false")
    base = Path(root).expanduser()
    if base.exists() and not base.is_dir():
        raise ConfigError("root", str(base), f"must be a folder; {_expected(base, spec)}")
    files = spec.train_files if split == "train" else spec.test_files
    folder = _find_folder(base, spec, files)
    if folder is None and download:
        _download(base, spec)
        folder = _find_folder(base, spec, files)
    if folder is None:
        raise ConfigError("root", str(base), _expected(base, spec))
    classes = _class_names(folder, spec)
    batches = [_read_batch(folder / name, spec) for name in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return ImageSet(images, labels, classes)


@DATASETS.register("cifar10")
def load_cifar10(split: str, *, root: str | None, seed: int = 0, download: bool = False) -> ImageSet:
    """CIFAR-10 from `root` (holding cifar-10-batches-py/). `seed` is unused: the splits are fixed."""
    return load_cifar(CIFAR10, split, root, download)


@DATASETS.register("cifar100")
def load_cifar100(split: str, *, root: str | None, seed: int = 0, download: bool = False) -> ImageSet:
    """CIFAR-100 with its 100 fine labels, from `root` (holding cifar-100-python/)."""
    return load_cifar(CIFAR100, split, root, download)
