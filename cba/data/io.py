"""Image sets on disk as safetensors (uint8 images, int64 labels, class names in metadata)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from cba.data.base import ImageSet
from cba.errors import ConfigError
from cba.io import load_tensors, save_tensors


def save_imageset(path: str | os.PathLike, data: ImageSet) -> None:
    save_tensors(
        path,
        {"images": torch.from_numpy(np.ascontiguousarray(data.images)), "labels": torch.from_numpy(data.labels)},
        metadata={"classes": json.dumps(data.classes)},
    )


def load_imageset(path: str | os.PathLike) -> ImageSet:
    from safetensors import safe_open

    tensors = load_tensors(path)
    if set(tensors) != {"images", "labels"}:
        raise ConfigError("path", str(path), "an image set with exactly 'images' and 'labels' tensors")
    with safe_open(str(path), framework="pt") as f:
        classes = json.loads((f.metadata() or {}).get("classes", "[]"))
    return ImageSet(tensors["images"].numpy(), tensors["labels"].numpy(), classes)
