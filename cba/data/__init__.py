"""Data set registry. Each loader: (split, *, root, seed, **options) -> ImageSet."""

from cba.data.base import ImageSet
from cba.data.registry import DATASETS, load_dataset

__all__ = ["DATASETS", "ImageSet", "load_dataset"]
