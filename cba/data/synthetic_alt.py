"""A second built-in synthetic data set: 10 texture classes, generated from the seed.

It exists to be a *different* downstream task from `synthetic` (shapes), for
the paper's "fine-tune on another downstream data set" defense: its classes
are periodic or stochastic textures that fill the whole image, not one object.
Each texture gets a random orientation, frequency, phase and centre, and two
random colours, so colour never identifies the class; only structure does.
"""

from __future__ import annotations

import numpy as np

from cba.data.base import ImageSet
from cba.data.registry import DATASETS
from cba.data.synthetic import DEFAULT_SIZES, SPLIT_OFFSET, _soft_inside, split_size
from cba.errors import ConfigError, is_int

CLASSES = ["waves", "rings", "dots", "zigzag", "blobs", "spiral", "grid", "bands", "bricks", "speckle"]
# Distinct from `synthetic`'s seeds, so the same seed never reuses its random stream.
STREAM = 0x7E47


def _stripes(t: np.ndarray) -> np.ndarray:
    """Soft square wave of a phase `t` (in periods): 1 on the first half of each period."""
    return np.clip(0.5 + 3.0 * np.sin(2 * np.pi * t), 0.0, 1.0)


def _lines(t: np.ndarray, width: float) -> np.ndarray:
    """Soft thin lines at integer values of `t`; `width` is in periods."""
    return _soft_inside(np.abs(t - np.round(t)) - width / 2, edge=0.08)


def _blobs(u, v, f, p):
    """Low-frequency random fields: a sum of four plane waves with per-image directions."""
    angles, phases = p["blob_angles"], p["blob_phases"]
    field = sum(np.cos(2 * np.pi * 0.5 * f * (np.cos(a) * u + np.sin(a) * v) + ph)
                for a, ph in zip(np.moveaxis(angles, 1, 0), np.moveaxis(phases, 1, 0)))
    return _soft_inside(-field, edge=0.4)


def _spiral(u, v, f, p):
    angle = np.arctan2(v, u)
    return _stripes(f * np.hypot(u, v) + p["arms"] * angle / (2 * np.pi))


def _bricks(u, v, f, p):
    row = np.floor(f * v)
    shifted = f * u / 2 + 0.5 * (row % 2)  # bricks twice as wide as tall, staggered rows
    return np.maximum(_lines(f * v, 0.15), _lines(shifted, 0.12))


# One pattern per class on rotated, centred coordinates (u, v) in units of the image size,
# frequency f (periods per image) and per-image extras p; every value lies in [0, 1].
_PATTERNS = [
    lambda u, v, f, p: _stripes(f * v + p["wobble"] * np.sin(2 * np.pi * 1.5 * u)),
    lambda u, v, f, p: _stripes(f * np.hypot(u, v)),
    lambda u, v, f, p: _soft_inside(np.hypot(f * u - np.round(f * u), f * v - np.round(f * v)) - 0.25, edge=0.08),
    lambda u, v, f, p: _stripes(f * v + 2 * np.abs(f * u / 2 - np.round(f * u / 2))),
    _blobs,
    _spiral,
    lambda u, v, f, p: np.maximum(_lines(f * u, 0.15), _lines(f * v, 0.15)),
    lambda u, v, f, p: np.floor(np.clip(u + 0.5, 0, 0.999) * p["levels"]) / (p["levels"] - 1),
    _bricks,
    lambda u, v, f, p: (p["speckle"] < 0.25).astype(float),
]


def _patterns(labels: np.ndarray, u: np.ndarray, v: np.ndarray, freq: np.ndarray, extras: dict) -> np.ndarray:
    """(N, S, S) patterns in [0, 1], one class formula per image."""
    out = np.zeros_like(u)
    for cls, pattern in enumerate(_PATTERNS):
        sel = labels == cls
        if sel.any():
            out[sel] = pattern(u[sel], v[sel], freq[sel], {k: x[sel] for k, x in extras.items()})
    return out


def _two_colours(rng: np.random.Generator, m: int, min_gap: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """Random (m, 1, 1, 3) colour pairs; a pair too alike is redrawn as complements so the texture shows."""
    a, b = rng.uniform(0, 1, (2, m, 1, 1, 3))
    close = np.linalg.norm(a - b, axis=-1, keepdims=True) < min_gap
    return a, np.where(close, 1 - a, b)


def generate(n: int, seed: int, image_size: int = 32, chunk: int = 2048) -> ImageSet:
    """Generate `n` texture images deterministically from `seed`, in chunks to bound memory."""
    rng = np.random.default_rng([seed, STREAM])
    labels = rng.integers(0, len(CLASSES), size=n)
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    grid = ((np.arange(image_size) + 0.5) - image_size / 2) / image_size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        m = len(lab)
        theta = rng.uniform(0, 2 * np.pi, m)[:, None, None]
        cx, cy = rng.uniform(-0.2, 0.2, (2, m))[:, :, None, None]
        x, y = xx[None] - cx, yy[None] - cy
        u = np.cos(theta) * x + np.sin(theta) * y
        v = -np.sin(theta) * x + np.cos(theta) * y
        # Phase shifts along v keep periodic classes from always aligning at the centre.
        v = v + rng.uniform(0, 1, m)[:, None, None] / 4
        freq = rng.uniform(3.0, 5.5, m)[:, None, None]
        extras = {
            "wobble": rng.uniform(0.3, 0.6, m)[:, None, None],
            "arms": rng.choice([-3, -2, 2, 3], m)[:, None, None],
            "levels": rng.integers(3, 6, m)[:, None, None],
            "blob_angles": rng.uniform(0, 2 * np.pi, (m, 4))[:, :, None, None],
            "blob_phases": rng.uniform(0, 2 * np.pi, (m, 4))[:, :, None, None],
            "speckle": rng.uniform(0, 1, (m, image_size, image_size)),
        }
        pattern = _patterns(lab, u, v, freq, extras)[..., None]
        c0, c1 = _two_colours(rng, m)
        img = c0 * (1 - pattern) + c1 * pattern + rng.normal(0, 0.04, (m, image_size, image_size, 3))
        out[start : start + m] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return ImageSet(out, labels.astype(np.int64), list(CLASSES))


@DATASETS.register("synthetic_textures")
def load(split: str, *, root: str | None = None, seed: int = 0, train_size: int = DEFAULT_SIZES["train"],
         test_size: int = DEFAULT_SIZES["test"], image_size: int = 32) -> ImageSet:
    """`root` is ignored: the data are generated, never read."""
    n = split_size(split, train_size, test_size, len(CLASSES))
    if not is_int(image_size) or image_size < 8:
        raise ConfigError("image_size", image_size, "an integer of at least 8")
    return generate(n, seed + SPLIT_OFFSET[split], image_size)
