"""Atomic artifact writing and safe weight loading.

Every artifact goes to a temporary file in the same folder and is renamed into
place, so an interrupted stage never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save

from cba.errors import ConfigError


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give artifacts the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Strict JSON: NaN and infinities become null (json.dumps would write bare NaN, which jq and browsers reject)."""
    with atomic_path(path) as tmp:
        text = json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False)
        tmp.write_text(text + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalars
        return _finite(obj.item())
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    return obj


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError("path", str(path), "the file does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("path", str(path), f"not valid JSON ({exc.msg})") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its contents (DVC hashes them)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = canonical_safetensors(save(tensors, metadata=metadata))
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its JSON header's keys sorted.

    safetensors writes the header from a hash map, so the same weights and
    metadata give different bytes on every save; the data section does not
    move, since it follows the header and its offsets are relative to it."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; weights are never unpickled."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("path", str(path), "the file does not exist; run the stage that writes it first")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ConfigError("path", str(path), f"not a readable safetensors file ({type(exc).__name__})") from None


def write_png(path: str | os.PathLike, figure: "Any", dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG, whole or not at all."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def write_parquet(path: str | os.PathLike, frame: "Any") -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(path: str | os.PathLike, frame: "Any") -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
