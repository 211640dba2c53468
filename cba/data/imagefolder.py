"""ImageFolder loader: one sub-folder per class, images read with PIL.

Layouts: `root/<split>/<class>/*.png` when `root/train` or `root/test` exist,
else `root/<class>/*.png`, split 80/20 within each class from the seed so every
class appears in both splits and the split is reproducible. Class indices come
from sorted folder names, taken over both splits, so train and test agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cba.data.base import ImageSet
from cba.data.registry import DATASETS, SPLITS
from cba.errors import ConfigError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
TEST_FRACTION = 0.2
LAYOUT = "root/<train|test>/<class>/*.png|jpg|jpeg|bmp, or root/<class>/*.png|jpg|jpeg|bmp"


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
    )


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image as RGB uint8 (size, size, 3); any decode failure names the file."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ConfigError("root", str(path), f"an image PIL can read ({type(exc).__name__}: {exc})") from None


def _split_files(root: Path, split: str, seed: int) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and the (file, label) pairs of `split`, for either layout."""
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        if not (root / split).is_dir():
            raise ConfigError("root", str(root), f"missing {root / split}/ (layout: {LAYOUT})")
        classes = sorted(set().union(*(_class_dirs(d) for d in split_dirs)))
        present = _class_dirs(root / split)
        items = [(f, label) for label, name in enumerate(classes) if name in present
                 for f in _image_files(present[name])]
        return classes, items

    class_dirs = _class_dirs(root)
    classes = sorted(class_dirs)
    rng = np.random.default_rng(seed)
    items = []
    for label, name in enumerate(classes):
        files = _image_files(class_dirs[name])
        order = rng.permutation(len(files))
        n_test = int(round(TEST_FRACTION * len(files)))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        items += [(files[i], label) for i in sorted(chosen)]
    return classes, items


@DATASETS.register("imagefolder")
def load_imagefolder(split: str, *, root: str | None, seed: int = 0, image_size: int = 32) -> ImageSet:
    """Images from class folders under `root`, resized to `image_size` square."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096:
        raise ConfigError("image_size", image_size, "an integer from 1 to 4096 (pixels per side)")
    if root is None:
        raise ConfigError("root", None, f"root must be set for imagefolder (layout: {LAYOUT})")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError("root", str(folder), f"an existing folder (layout: {LAYOUT})")
    classes, items = _split_files(folder, split, seed)
    if not classes:
        raise ConfigError("root", str(folder), f"no class folders found (layout: {LAYOUT})")
    if not items:
        raise ConfigError("root", str(folder), f"no images for split {split!r} (layout: {LAYOUT})")
    images = np.stack([_read_image(path, image_size) for path, _ in items])
    labels = np.array([label for _, label in items], dtype=np.int64)
    return ImageSet(images, labels, classes)
