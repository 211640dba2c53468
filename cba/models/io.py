"""Encoder weights on disk: safetensors plus the metadata needed to rebuild the backbone."""

from __future__ import annotations

import os
from pathlib import Path

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
    if "backbone" not in meta:
        raise ConfigError("path", str(path), "an encoder file written by cba (metadata names a backbone)")
    width = metadata_size(meta, "width", MAX_WIDTH, path, "an encoder file")
    try:
        encoder = build_backbone(meta["backbone"], width=width)
    except ConfigError as exc:
        raise ConfigError("path", str(path), f"an encoder file naming a known backbone ({exc.allowed})") from None
    load_weights(encoder, load_tensors(path), path, meta["backbone"])
    return encoder.eval()


MAX_WIDTH = 4096  # far above any real backbone; bounds what a hostile file can make us allocate


def metadata_size(meta: dict[str, str], key: str, high: int, path: str | os.PathLike, what: str) -> int:
    """A size from a file's metadata, checked to lie in [1, high] before anything is built from it."""
    value = str(meta.get(key, ""))
    if not value.isdigit() or not 1 <= int(value) <= high:
        raise ConfigError("path", str(path), f"{what} written by cba (metadata {key} in [1, {high}])")
    return int(value)


def load_weights(module: nn.Module, state: dict, path: str | os.PathLike, what: str) -> None:
    """Load `state` into `module`, or one line saying how the file does not fit it (names or shapes)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {len(missing)}, unexpected {len(unexpected)}, wrong shape {len(wrong)}"
                  + (f", e.g. {wrong[0]} {tuple(state[wrong[0]].shape)} for {tuple(own[wrong[0]].shape)}" if wrong else ""))
        raise ConfigError("path", str(path), f"weights that fit {what} ({detail})")
    module.load_state_dict(state)


def named_encoder_paths(specs: list[str]) -> dict[str, Path]:
    """`LABEL=PATH` pairs, each checked before any reading: a bad one is one line."""
    found: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--encoder {spec!r} is not valid; allowed: LABEL=PATH")
        if not Path(path).is_file():
            raise SystemExit(f"--encoder {spec!r}: no file at {path}")
        found[label] = Path(path)
    return found
