"""File checksums: a downloaded archive is untrusted until its MD5 matches; ranks compare SHA-256s."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path, algorithm: str = "md5", chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks so large archives stay out of memory."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file (the checksum CIFAR's archives are published with)."""
    return file_digest(path, "md5", chunk_size)


def verify(path: str | Path, md5: str) -> bool:
    """True when `path` exists and its MD5 equals `md5` (case-insensitive)."""
    path = Path(path)
    return path.is_file() and md5sum(path) == md5.lower()
