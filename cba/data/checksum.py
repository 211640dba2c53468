"""MD5 helpers: a downloaded archive is untrusted until its checksum matches."""

from __future__ import annotations

import hashlib
from pathlib import Path


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks so large archives stay out of memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, md5: str) -> bool:
    """True when `path` exists and its MD5 equals `md5` (case-insensitive)."""
    path = Path(path)
    return path.is_file() and md5sum(path) == md5.lower()
