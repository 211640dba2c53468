"""The built-in synthetic colour data set: 10 shape classes, generated from the seed.

Each image is one shape (the class) with a random rotation, scale, position and
foreground/background colour, on a smooth colour gradient with pixel noise.
Class identity lives in geometry only, so an encoder that keys on colour
(like a random one) does poorly, while one trained to be invariant to colour
and crops must learn shape. That gives contrastive learning real work to do.
"""

from __future__ import annotations

import numpy as np

from cba.data.base import ImageSet
from cba.data.registry import DATASETS
from cba.errors import ConfigError, is_int

CLASSES = ["circle", "ring", "square", "triangle", "plus", "tee", "stripes", "checker", "crescent", "dumbbell"]
DEFAULT_SIZES = {"train": 10_000, "test": 2_000}
# A fixed offset per split keeps train and test disjoint for any seed.
SPLIT_OFFSET = {"train": 0, "test": 1_000_003}


def _soft_inside(signed_distance: np.ndarray, edge: float = 0.9) -> np.ndarray:
    """Anti-aliased inside test: 1 well inside, 0 well outside, a ramp of `edge` pixels."""
    return np.clip(0.5 - signed_distance / edge, 0.0, 1.0)


def _box(u, v, half):
    return np.maximum(np.abs(u), np.abs(v)) - half


def _disc(u, v, r, du=0.0):
    return np.sqrt((u - du) ** 2 + v**2) - r


# One signed-distance-like formula per class, on rotated coordinates (u, v) and radius r.
_SHAPES = [
    lambda u, v, r: _soft_inside(_disc(u, v, r)),
    lambda u, v, r: _soft_inside(np.abs(_disc(u, v, 0.75 * r)) - 0.25 * r),
    lambda u, v, r: _soft_inside(_box(u, v, 0.8 * r)),
    lambda u, v, r: _soft_inside(np.maximum(-v - 0.5 * r, np.abs(u) * 0.866 + v / 2 - 0.5 * r)),
    lambda u, v, r: _soft_inside(np.minimum(np.maximum(np.abs(u) - 0.3 * r, np.abs(v) - r),
                                            np.maximum(np.abs(v) - 0.3 * r, np.abs(u) - r))),
    lambda u, v, r: _soft_inside(np.minimum(np.maximum(np.abs(u) - r, np.abs(v + 0.7 * r) - 0.25 * r),
                                            np.maximum(np.abs(u) - 0.25 * r, np.abs(v) - r))),
    lambda u, v, r: _soft_inside(_disc(u, v, r)) * (np.sin(u * np.pi * 2.5 / r) > 0),
    lambda u, v, r: _soft_inside(_box(u, v, 0.85 * r)) * (np.sin(u * np.pi * 2 / r) * np.sin(v * np.pi * 2 / r) > 0),
    lambda u, v, r: _soft_inside(_disc(u, v, r)) * (1 - _soft_inside(_disc(u, v, 0.8 * r, 0.45 * r))),
    lambda u, v, r: np.clip(_soft_inside(_disc(u, v, 0.4 * r, 0.6 * r)) + _soft_inside(_disc(u, v, 0.4 * r, -0.6 * r))
                            + _soft_inside(np.maximum(np.abs(u) - 0.6 * r, np.abs(v) - 0.12 * r)), 0.0, 1.0),
]


def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of every pixel centre, relative to the image centre: two (S, S) arrays."""
    grid = (np.arange(image_size) + 0.5) - image_size / 2
    return np.meshgrid(grid, grid, indexing="ij")


def shape_masks(labels: np.ndarray, theta: np.ndarray, radius: np.ndarray, centre: np.ndarray,
                image_size: int = 32) -> np.ndarray:
    """The soft masks in [0, 1] of the shapes drawn with these factors (`FACTORS`): (N, S, S), one class
    formula per image on coordinates rotated by `theta` about `centre`. The generator draws its images with
    them, so `shape_masks(f["label"], f["theta"], f["radius"], f["centre"])` for its factors `f` says exactly
    which pixels of each image are its shape."""
    yy, xx = _pixel_grid(image_size)
    theta = np.asarray(theta).reshape(-1, 1, 1)
    cx, cy = (np.asarray(centre, dtype=float).reshape(-1, 2).T)[:, :, None, None]
    x, y = xx[None] - cx, yy[None] - cy
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    masks = np.zeros_like(u)
    r = np.asarray(radius)[:, None, None]
    for cls, shape in enumerate(_SHAPES):
        sel = np.asarray(labels) == cls
        if sel.any():
            masks[sel] = shape(u[sel], v[sel], r[sel])
    return masks


# The generative factors `generate_with_factors` returns beside the images, one row per image.
FACTORS = {
    "label": "class index",
    "theta": "rotation of the shape, radians",
    "radius": "size of the shape, pixels",
    "centre": "(x, y) offset of the shape from the image centre, pixels",
    "background_from": "RGB in [0, 1] at the background gradient's start",
    "background_to": "RGB in [0, 1] at the gradient's end",
    "gradient_angle": "direction in which the background goes from the first colour to the second, radians",
    "foreground": "RGB in [0, 1] of the shape",
}


def generate_with_factors(n: int, seed: int, image_size: int = 32, chunk: int = 2048,
                          radius_scale: float = 1.0) -> tuple[ImageSet, dict[str, np.ndarray]]:
    """`generate`'s images (the same draws, byte for byte) and the factors each was drawn from (`FACTORS`).

    `radius_scale` redraws the same images with every shape's radius times it and every other draw (class,
    place, rotation, colours, noise) unchanged: a real change of one factor, to set beside a trigger's."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    drawn: dict[str, list[np.ndarray]] = {name: [] for name in FACTORS if name != "label"}
    yy, xx = _pixel_grid(image_size)
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        m = len(lab)
        theta = rng.uniform(0, 2 * np.pi, m)[:, None, None]
        radius = rng.uniform(0.22, 0.38, m) * image_size * radius_scale
        centre = (rng.uniform(-0.15, 0.15, (2, m)) * image_size).T
        mask = shape_masks(lab, theta, radius, centre, image_size)[..., None]
        # Background: a linear colour gradient between two random colours.
        c0, c1 = rng.uniform(0, 1, (2, m, 1, 1, 3))
        phi = rng.uniform(0, 2 * np.pi, m)[:, None, None]
        t = ((np.cos(phi) * xx + np.sin(phi) * yy) / image_size + 0.5)[..., None]
        background = c0 * (1 - t) + c1 * t
        # Foreground: a random colour pushed away from the background mean so the shape shows.
        fg = rng.uniform(0, 1, (m, 1, 1, 3))
        bg_mean = background.mean(axis=(1, 2), keepdims=True)
        gap = fg - bg_mean
        norm = np.linalg.norm(gap, axis=-1, keepdims=True) + 1e-6
        fg = np.clip(bg_mean + gap / norm * np.maximum(norm, 0.35), 0, 1)
        img = background * (1 - mask) + fg * mask
        img += rng.normal(0, 0.04, img.shape)
        out[start : start + m] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        for name, value in (("theta", theta.reshape(m)), ("radius", radius),
                            ("centre", centre),
                            ("background_from", c0.reshape(m, 3)), ("background_to", c1.reshape(m, 3)),
                            ("gradient_angle", phi.reshape(m)), ("foreground", fg.reshape(m, 3))):
            drawn[name].append(value)
    factors = {"label": labels.astype(np.int64), **{name: np.concatenate(parts) for name, parts in drawn.items()}}
    return ImageSet(out, labels.astype(np.int64), list(CLASSES)), factors


def generate(n: int, seed: int, image_size: int = 32, chunk: int = 2048) -> ImageSet:
    """Generate `n` images deterministically from `seed`, in chunks to bound memory."""
    return generate_with_factors(n, seed, image_size, chunk)[0]


def split_size(split: str, train_size: int, test_size: int, num_classes: int) -> int:
    """The requested size of `split`, checked: an integer with room for every class."""
    n = train_size if split == "train" else test_size
    if not is_int(n) or n < num_classes:
        raise ConfigError(f"{split}_size", n, f"an integer of at least {num_classes}")
    return n


@DATASETS.register("synthetic")
def load(split: str, *, root: str | None = None, seed: int = 0, train_size: int = DEFAULT_SIZES["train"],
         test_size: int = DEFAULT_SIZES["test"], image_size: int = 32) -> ImageSet:
    """`root` is ignored: the data are generated, never read."""
    return load_with_factors(split, seed=seed, train_size=train_size, test_size=test_size, image_size=image_size)[0]


def load_with_factors(split: str, *, seed: int = 0, train_size: int = DEFAULT_SIZES["train"],
                      test_size: int = DEFAULT_SIZES["test"], image_size: int = 32,
                      radius_scale: float = 1.0) -> tuple[ImageSet, dict[str, np.ndarray]]:
    """The split `load` gives and the factors each of its images was drawn from (`FACTORS`); `radius_scale`
    as for `generate_with_factors`."""
    n = split_size(split, train_size, test_size, len(CLASSES))
    if image_size not in (32, 64, 96):
        raise ConfigError("image_size", image_size, "one of 32, 64, 96")
    if not 0 < radius_scale <= 2:
        raise ConfigError("radius_scale", radius_scale, "a number in (0, 2]")
    return generate_with_factors(n, seed + SPLIT_OFFSET[split], image_size, radius_scale=radius_scale)
