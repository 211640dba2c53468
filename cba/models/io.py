"""Encoder weights on disk: safetensors plus the metadata needed to rebuild the backbone."""

from __future__ import annotations

import os

from safetensors import safe_open
from torch import nn

from cba.errors import ConfigError
from cba.io import load_tensors, save_tensors
from cba.models.registry import build_backbone


def save_encoder(path: str | os.PathLike, encoder: nn.Module, backbone: str, width: int, **extra: str) -> None:
    meta = {"backbone": backbone, "width": str(width), **{k: str(v) for k, v in extra.items()}}
    save_tensors(path, encoder.state_dict(), metadata=meta)


def encoder_metadata(path: str | os.PathLike) -> dict[str, str]:
    load_tensors(path)  # validates existence and format with a clear error
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_encoder(path: str | os.PathLike) -> nn.Module:
    """Rebuild the backbone named in the file's metadata and load its weights."""
    meta = encoder_metadata(path)
    if "backbone" not in meta or "width" not in meta:
        raise ConfigError("path", str(path), "an encoder file written by cba (metadata names backbone and width)")
    encoder = build_backbone(meta["backbone"], width=int(meta["width"]))
    missing, unexpected = encoder.load_state_dict(load_tensors(path), strict=False)
    if missing or unexpected:
        raise ConfigError("path", str(path), f"weights do not match {meta['backbone']} (missing {len(missing)}, unexpected {len(unexpected)})")
    return encoder.eval()
