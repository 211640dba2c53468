"""MNIST and Fashion-MNIST loaders for the idx format, plain or gzipped.

The images are 28x28 grey; the rest of cba expects 32x32 colour, so each image
is zero-padded by 2 pixels on every side and repeated over 3 channels. Headers
are parsed strictly because a truncated download otherwise shows up much later
as a shape error far from its cause.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cba.data.base import ImageSet
from cba.data.registry import DATASETS
from cba.errors import ConfigError

IDX_UBYTE = 0x08  # the only element type MNIST-style files use
SIDE, PAD = 28, 2

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass(frozen=True)
class IdxSpec:
    name: str
    classes: tuple[str, ...]
    default_root: str | None
    source: str  # where to get the files, for error messages


MNIST = IdxSpec("mnist", tuple(str(d) for d in range(10)), None, "http://yann.lecun.com/exdb/mnist/")
FASHION_MNIST = IdxSpec(
    "fashion_mnist", tuple(FASHION_CLASSES), "/usr/share/datasets/fashion-mnist",
    "apt-get install dataset-fashion-mnist, or https://github.com/zalandoresearch/fashion-mnist",
)

_PREFIX = {"train": "train", "test": "t10k"}


# The most data an idx file here may declare: MNIST-style sets hold 60,000 or 70,000 images of 28x28 bytes, so
# 1,000,000 images is generous; a header claiming more is refused before anything is read or decompressed.
MAX_IDX_BYTES = 1_000_000 * SIDE * SIDE


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte idx file with `ndim` dimensions: the header is checked against the format first,
    then exactly the declared bytes are read (a gzipped file is decompressed only that far)."""
    header = 4 + 4 * ndim
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(header)
            if len(head) < header:
                raise ConfigError("root", str(path), f"idx file too short for its {header}-byte header")
            magic = int.from_bytes(head[:4], "big")
            expected_magic = (IDX_UBYTE << 8) | ndim
            if magic != expected_magic:
                raise ConfigError("root", str(path),
                                  f"idx magic must be 0x{expected_magic:08x} (ubyte, {ndim}-d), got 0x{magic:08x}")
            dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
            size = 1
            for dim in dims:
                size *= dim
            if size > MAX_IDX_BYTES:
                raise ConfigError("root", str(path), f"header declares {dims} = {size} bytes, more than "
                                  f"{MAX_IDX_BYTES} (a million {SIDE}x{SIDE} images); not an MNIST-style file")
            raw = f.read(size)
            extra = f.read(1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError("root", str(path), f"not a readable idx file ({exc})") from None
    if len(raw) != size or extra:
        held = f"{len(raw)}" if not extra else f"more than {size}"
        raise ConfigError("root", str(path), f"header says {dims} = {size} bytes of data, file holds {held}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) grey -> (N, 32, 32, 3): 2 px of zero padding, grey repeated to RGB."""
    out = np.zeros((len(images), SIDE + 2 * PAD, SIDE + 2 * PAD, 3), dtype=np.uint8)
    out[:, PAD:PAD + SIDE, PAD:PAD + SIDE, :] = images[..., None]
    return out


def load_idx(spec: IdxSpec, split: str, root: str | None) -> ImageSet:
    """Load one split of an MNIST-style data set from `root` (or its default folder)."""
    root = root if root is not None else spec.default_root
    if root is None:
        raise ConfigError(
            "root", None, f"root must be set for {spec.name}: the folder holding its idx files ({spec.source})"
        )
    folder = Path(root).expanduser()
    prefix = _PREFIX[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find(folder, name) for name in names]
    if None in paths:
        raise ConfigError(
            "root", str(folder),
            f"expected {folder}/{names[0]} and {names[1]} (optionally .gz; get them via {spec.source})",
        )
    images_path, labels_path = paths
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != (SIDE, SIDE):
        raise ConfigError("root", str(images_path), f"images must be {SIDE}x{SIDE}, got {images.shape[1:]}")
    if len(labels) != len(images):
        raise ConfigError(
            "root", str(labels_path), f"{len(labels)} labels for {len(images)} images in {images_path.name}"
        )
    if len(labels) and labels.max() >= len(spec.classes):
        raise ConfigError("root", str(labels_path), f"labels must lie in [0, {len(spec.classes)})")
    return ImageSet(to_rgb32(images), labels.astype(np.int64), list(spec.classes))


@DATASETS.register("mnist")
def load_mnist(split: str, *, root: str | None, seed: int = 0) -> ImageSet:
    """MNIST digits from idx files in `root`. `seed` is unused: the splits are fixed."""
    return load_idx(MNIST, split, root)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(split: str, *, root: str | None, seed: int = 0) -> ImageSet:
    """Fashion-MNIST; `root` defaults to Debian's /usr/share/datasets/fashion-mnist."""
    return load_idx(FASHION_MNIST, split, root)
