"""Loaders read exactly what the real on-disk formats hold, and fail with one-line ConfigErrors.

Every fixture is written in the real format (CIFAR pickles, big-endian idx,
PNG/BMP class folders); no network is used.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cba.data import load_dataset
from cba.data import cifar
from cba.data.checksum import md5sum, verify
from cba.errors import ConfigError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- CIFAR

def _cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict:
    return {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, n).tolist(),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, n: int = 4) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {name: _cifar_batch(rng, n, b"labels", 10) for name in cifar.CIFAR10.train_files + ("test_batch",)}
    for name, batch in batches.items():
        _dump(folder / name, batch)
    _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in cifar.CIFAR10_CLASSES]})
    return batches


def test_cifar10_chw_rows_become_hwc_images(tmp_path):
    batches = write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.classes == cifar.CIFAR10_CLASSES
    first = batches["data_batch_1"][b"data"][1]
    # pixel (row 5, col 7): R at 5*32+7, G one plane (1024) later, B two planes later
    assert train.images[1, 5, 7].tolist() == [first[167], first[1024 + 167], first[2048 + 167]]
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    np.testing.assert_array_equal(train.images.transpose(0, 3, 1, 2).reshape(-1, 3072), expected)
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    np.testing.assert_array_equal(train.labels, labels)
    assert train.labels.dtype == np.int64

    test = load_dataset("cifar10", "test", root=str(tmp_path / "cifar-10-batches-py"))  # root = the folder itself
    np.testing.assert_array_equal(test.labels, batches["test_batch"][b"labels"])


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batch = _cifar_batch(rng, 6, b"fine_labels", 100)
    batch[b"coarse_labels"] = [0] * 6
    _dump(folder / "test", batch)
    _dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    test = load_dataset("cifar100", "test", root=str(tmp_path))
    np.testing.assert_array_equal(test.labels, batch[b"fine_labels"])
    assert test.num_classes == 100 and test.classes[3] == "c3"


def test_cifar_missing_root_and_files(tmp_path):
    with pytest.raises(ConfigError, match="^root=None .*root must be set for cifar10"):
        load_dataset("cifar10", "train", root=None)
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10", "train", root=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "cifar-10-batches-py/data_batch_1..5 and test_batch" in message
    assert cifar.CIFAR10.url in message and "data.download: true" in message


@pytest.mark.parametrize("payload", [b"garbage, not a pickle", pickle.dumps([1, 2, 3]),
                                     pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})])
def test_cifar_corrupt_pickle_names_file(tmp_path, payload):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(payload)
    with pytest.raises(ConfigError, match="data_batch_3"):
        load_dataset("cifar10", "train", root=str(tmp_path))


def test_cifar_pickle_may_not_call_arbitrary_code(tmp_path):
    write_cifar10(tmp_path)
    evil = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": print}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    with pytest.raises(ConfigError, match="refusing global"):
        load_dataset("cifar10", "test", root=str(tmp_path))


def test_cifar_download_checksum_mismatch_deletes_file(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url)
        Path(dest).write_bytes(b"not the real archive")

    monkeypatch.setattr(cifar, "_fetch", fake_fetch)
    with pytest.raises(ConfigError, match="md5") as err:
        load_dataset("cifar10", "train", root=str(tmp_path / "dl"), download=True)
    assert err.value.key == "download" and fetched == [cifar.CIFAR10.url]
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()


def test_cifar_download_network_error(tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("network unreachable")

    monkeypatch.setattr(cifar, "_fetch", offline)
    with pytest.raises(ConfigError, match="network unreachable.*cifar-10-batches-py"):
        load_dataset("cifar10", "test", root=str(tmp_path), download=True)


def _tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar_download_verifies_and_extracts(tmp_path, monkeypatch):
    source = tmp_path / "src"
    batches = write_cifar10(source)
    archive = tmp_path / "archive.tar.gz"
    folder = source / "cifar-10-batches-py"
    _tarball(archive, {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in folder.iterdir()})
    spec = dataclasses.replace(cifar.CIFAR10, md5=md5sum(archive))
    monkeypatch.setattr(cifar, "_fetch", lambda url, dest: Path(dest).write_bytes(archive.read_bytes()))
    test = cifar.load_cifar(spec, "test", str(tmp_path / "dl"), download=True)
    np.testing.assert_array_equal(test.labels, batches["test_batch"][b"labels"])


@pytest.mark.parametrize("bad_name", ["../escape", "/abs/path"])
def test_safe_extract_rejects_escaping_members(tmp_path, bad_name):
    archive = tmp_path / "evil.tar.gz"
    _tarball(archive, {"ok.txt": b"ok", bad_name: b"evil"})
    with pytest.raises(ConfigError, match="unsafe path"):
        cifar._safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_checksum_helpers(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert md5sum(path) == "900150983cd24fb0d6963f7d28e17f72"
    assert verify(path, "900150983CD24FB0D6963F7D28E17F72")
    assert not verify(path, "0" * 32) and not verify(tmp_path / "missing", "0" * 32)


# ---------------------------------------------------------------- idx (MNIST)

def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_pads_to_32_and_repeats_channels(tmp_path, gz):
    rng = np.random.default_rng(2)
    images = rng.integers(1, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    write_idx(tmp_path, "t10k", images, labels, gz)
    test = load_dataset("mnist", "test", root=str(tmp_path))
    assert test.images.shape == (5, 32, 32, 3) and test.classes == [str(d) for d in range(10)]
    for channel in range(3):
        np.testing.assert_array_equal(test.images[:, 2:30, 2:30, channel], images)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not test.images[:, border].any()
    np.testing.assert_array_equal(test.labels, labels)


def test_fashion_mnist_class_names(tmp_path):
    write_idx(tmp_path, "train", np.zeros((2, 28, 28), np.uint8), np.array([0, 9], np.uint8), gz=True)
    train = load_dataset("fashion_mnist", "train", root=str(tmp_path))
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


def test_idx_errors(tmp_path):
    with pytest.raises(ConfigError, match="^root=None .*root must be set for mnist"):
        load_dataset("mnist", "train", root=None)
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", "train", root=str(tmp_path))

    images, labels = np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)
    write_idx(tmp_path, "train", images, labels, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    full = path.read_bytes()
    path.write_bytes(full[:-10])  # truncated download
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.*file holds"):
        load_dataset("mnist", "train", root=str(tmp_path))
    path.write_bytes(b"\x00\x00\x0d\x03" + full[4:])  # float type code: wrong magic
    with pytest.raises(ConfigError, match="magic"):
        load_dataset("mnist", "train", root=str(tmp_path))
    path.write_bytes(full)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ConfigError, match="4 labels for 3 images"):
        load_dataset("mnist", "train", root=str(tmp_path))


def test_idx_truncated_gzip(tmp_path):
    write_idx(tmp_path, "t10k", np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8), gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", root=str(tmp_path))


def test_file_backed_sets_take_a_seeded_training_subset(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 10).astype(np.uint8)
    write_idx(tmp_path, "train", images, labels, gz=False)
    full = load_dataset("mnist", "train", root=str(tmp_path))
    subset = load_dataset("mnist", "train", root=str(tmp_path), seed=1, train_size=15)
    assert len(subset) == 15
    # Exactly rows of the full split, in their original order, drawn from the seed.
    rows = [int(np.flatnonzero((full.images == image).all(axis=(1, 2, 3)))[0]) for image in subset.images]
    assert rows == sorted(rows) and len(set(rows)) == 15
    np.testing.assert_array_equal(full.labels[rows], subset.labels)
    again = load_dataset("mnist", "train", root=str(tmp_path), seed=1, train_size=15)
    np.testing.assert_array_equal(again.images, subset.images)
    other = load_dataset("mnist", "train", root=str(tmp_path), seed=2, train_size=15)
    assert not np.array_equal(other.images, subset.images)
    # test_size does not touch the train split; null keeps the whole split.
    assert len(load_dataset("mnist", "train", root=str(tmp_path), test_size=5)) == 40
    assert len(load_dataset("mnist", "train", root=str(tmp_path), train_size=None)) == 40


@pytest.mark.parametrize("size, message", [(41, "at most 40"), (0, "an integer >= 1"), ("ten", "an integer >= 1"),
                                           (True, "an integer >= 1")])
def test_training_subset_errors_are_one_line(tmp_path, size, message):
    write_idx(tmp_path, "train", np.zeros((40, 28, 28), np.uint8), np.zeros(40, np.uint8), gz=False)
    with pytest.raises(ConfigError, match=message) as caught:
        load_dataset("mnist", "train", root=str(tmp_path), train_size=size)
    assert caught.value.key == "train_size" and "\n" not in str(caught.value)


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_default_root():
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.num_classes == 10 and set(np.unique(test.labels)) == set(range(10))
    assert train.images.shape[1:] == (32, 32, 3) and not train.images[:, :2].any()


# ---------------------------------------------------------------- ImageFolder

def _write_png(path: Path, color: tuple[int, int, int], size: int = 32, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, format=fmt)


def test_imagefolder_split_layout(tmp_path):
    _write_png(tmp_path / "train" / "cat" / "a.png", (10, 20, 30))
    _write_png(tmp_path / "train" / "ant" / "b.bmp", (200, 100, 0), fmt="BMP")
    _write_png(tmp_path / "test" / "cat" / "c.png", (1, 2, 3), size=64)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    train = load_dataset("imagefolder", "train", root=str(tmp_path))
    assert train.classes == ["ant", "cat"] and train.labels.tolist() == [0, 1]
    assert train.images[0, 5, 5].tolist() == [200, 100, 0] and train.images[1, 0, 0].tolist() == [10, 20, 30]
    test = load_dataset("imagefolder", "test", root=str(tmp_path), image_size=16)
    assert test.images.shape == (1, 16, 16, 3) and test.labels.tolist() == [1]  # same index as in train
    assert test.images[0, 8, 8].tolist() == [1, 2, 3]


def test_imagefolder_flat_layout_split_is_deterministic(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _write_png(tmp_path / cls / f"{i}.png", (i, 0, 0), size=8)
    train = load_dataset("imagefolder", "train", root=str(tmp_path), seed=3)
    test = load_dataset("imagefolder", "test", root=str(tmp_path), seed=3)
    assert (len(train), len(test)) == (16, 4) and sorted(test.labels.tolist()) == [0, 0, 1, 1]
    again = load_dataset("imagefolder", "test", root=str(tmp_path), seed=3)
    np.testing.assert_array_equal(again.images, test.images)
    keys = {(l, p) for l, p in zip(train.labels.tolist(), train.images[:, 0, 0, 0].tolist())}
    assert keys.isdisjoint(zip(test.labels.tolist(), test.images[:, 0, 0, 0].tolist()))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="^root=None .*root must be set"):
        load_dataset("imagefolder", "train", root=None)
    with pytest.raises(ConfigError, match="an existing folder"):
        load_dataset("imagefolder", "train", root=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no class folders"):
        load_dataset("imagefolder", "train", root=str(tmp_path))
    (tmp_path / "dog").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        load_dataset("imagefolder", "train", root=str(tmp_path))
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png"):
        load_dataset("imagefolder", "train", root=str(tmp_path))
    with pytest.raises(ConfigError, match="^image_size=0"):
        load_dataset("imagefolder", "train", root=str(tmp_path), image_size=0)


def _traced_peak(fn) -> int:
    """Peak bytes traced while `fn` runs (numpy reports its array allocations to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


class _Huge:
    """Pickles as a direct call numpy.ndarray(shape, 'f8'): 7 GB asked for by a file of about 150 bytes."""

    def __reduce__(self):
        return (np.ndarray, ((300_000, 32, 32, 3), "f8"))


def test_cifar_memory_bomb_is_refused_before_allocating(tmp_path):
    write_cifar10(tmp_path)
    bomb = pickle.dumps({b"data": _Huge(), b"labels": [0]}, protocol=2)
    assert len(bomb) < 200
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(bomb)

    def load():
        with pytest.raises(ConfigError, match="larger than any CIFAR file holds"):
            load_dataset("cifar10", "test", root=str(tmp_path))

    assert _traced_peak(load) < 50 * 2**20


def test_cifar_reconstruct_with_a_huge_shape_is_refused(tmp_path):
    """The other constructor a pickle may name, numpy's own _reconstruct, is bounded the same way."""
    class Reconstruct:
        def __reduce__(self):
            from numpy._core.multiarray import _reconstruct
            return (_reconstruct, (np.ndarray, (10**12,), b"b"))

    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": Reconstruct(), b"labels": [0]}, protocol=2))
    with pytest.raises(ConfigError, match="larger than any CIFAR file holds"):
        load_dataset("cifar10", "test", root=str(tmp_path))


def test_cifar_label_list_that_contains_itself(tmp_path):
    write_cifar10(tmp_path)
    labels: list = [0]
    labels.append(labels)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=2))
    with pytest.raises(ConfigError, match="must be a list of integers"):
        load_dataset("cifar10", "test", root=str(tmp_path))


def test_idx_bomb_header_is_refused_before_decompressing(tmp_path):
    """A small gzip whose header declares billions of bytes (and whose body would inflate to gigabytes)."""
    header = bytes.fromhex("00000803") + (4_000_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    body = gzip.compress(header + bytes(64 * 2**20))  # 64 MiB of zeros, about 64 KiB compressed
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(body)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))

    def load():
        with pytest.raises(ConfigError, match=r"more than \d+ \(a million 28x28 images\)"):
            load_dataset("mnist", "train", root=str(tmp_path))

    assert _traced_peak(load) < 10 * 2**20


def test_idx_trailing_data_is_refused_without_reading_it_all(tmp_path):
    images, labels = np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)
    write_idx(tmp_path, "train", images, labels, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(32 * 2**20)))

    def load():
        with pytest.raises(ConfigError, match="file holds more than 2352"):
            load_dataset("mnist", "train", root=str(tmp_path))

    assert _traced_peak(load) < 10 * 2**20
