"""Data set registry. Each loader: (split, *, root, seed, **options) -> ImageSet."""

from cba.data.base import ImageSet
from cba.data.registry import DATASETS, load_dataset

# Imported for their registration side effect.
from cba.data import cifar, idx, imagefolder, synthetic, synthetic_alt  # noqa: E402,F401  isort: skip

__all__ = ["DATASETS", "ImageSet", "load_dataset"]
