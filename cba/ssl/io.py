"""A whole pretrained method (backbone + heads + momentum state) on disk, rebuildable from its metadata."""

from __future__ import annotations

import json
import os

from safetensors import safe_open

from cba.errors import ConfigError
from cba.io import load_tensors, save_tensors
from cba.models import build_backbone
from cba.models.io import MAX_WIDTH, load_weights, metadata_size
from cba.ssl.base import SSLMethod
from cba.ssl.registry import build_method


def save_method(path: str | os.PathLike, method: SSLMethod, name: str, backbone: str, width: int, hparams: dict, **extra: str) -> None:
    meta = {"method": name, "backbone": backbone, "width": str(width), "num_classes": str(method.num_classes),
            "hparams": json.dumps(hparams), **{k: str(v) for k, v in extra.items()}}
    save_tensors(path, method.state_dict(), metadata=meta)


def load_method(path: str | os.PathLike) -> tuple[SSLMethod, dict[str, str]]:
    """Rebuild the method named in the metadata and load its state; return it and the metadata."""
    state = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    width = metadata_size(meta, "width", MAX_WIDTH, path, "a method file")
    num_classes = metadata_size(meta, "num_classes", 100_000, path, "a method file")
    try:
        method = build_method(meta["method"], build_backbone(meta["backbone"], width=width),
                              num_classes=num_classes, **json.loads(meta["hparams"]))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError("path", str(path), f"a method file written by cba ({type(exc).__name__}: {exc})") from None
    load_weights(method, state, path, meta["method"])
    return method.eval(), meta
