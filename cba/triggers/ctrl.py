"""CTRL (Li et al., ICCV 2023): a trigger in the frequency domain of the chroma channels.

RGB -> YUV, split each channel into windows, orthonormal 2-D DCT-II per window,
add `magnitude` at fixed high frequencies of U and V, invert. High-frequency
chroma energy is nearly invisible, and because it repeats in every window it
survives the random crops of contrastive augmentation.

Every step before clipping is linear, so the trigger is one fixed additive
pixel pattern: the inverse transform of the spectrum delta. `apply` adds that
pattern (fast and exact); the tests check it against the transform itself.
"""

from __future__ import annotations

import numpy as np

from cba.errors import is_int, is_number
from cba.triggers.base import Trigger, map_in_chunks, to_uint8
from cba.triggers.registry import TRIGGERS

CHANNELS = ("Y", "U", "V")
# BT.601 analogue YUV, rows give Y, U, V from R, G, B on any scale (here 0-255).
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.14713, -0.28886, 0.436],
                       [0.615, -0.51499, -0.10001]])
YUV_TO_RGB = np.linalg.inv(RGB_TO_YUV)  # the exact inverse, so the round trip is lossless


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (..., 3) YUV, float64."""
    return np.asarray(rgb, dtype=np.float64) @ RGB_TO_YUV.T


def yuv_to_rgb(yuv: np.ndarray) -> np.ndarray:
    """(..., 3) YUV -> (..., 3) RGB, float64 (not clipped)."""
    return np.asarray(yuv, dtype=np.float64) @ YUV_TO_RGB.T


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: row k is frequency k, so X = D x D^T and x = D^T X D."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    basis = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis


def _windowed(x: np.ndarray, window: int, basis: np.ndarray) -> np.ndarray:
    """basis @ block @ basis^T for every window x window block of the last two axes."""
    x = np.asarray(x, dtype=np.float64)
    *lead, height, width = x.shape
    if height % window or width % window:
        raise ValueError(f"window {window} does not divide the {height}x{width} plane")
    blocks = x.reshape(*lead, height // window, window, width // window, window).swapaxes(-3, -2)
    blocks = basis @ blocks @ basis.T
    return blocks.swapaxes(-3, -2).reshape(x.shape)


def dct2_windows(x: np.ndarray, window: int) -> np.ndarray:
    """Orthonormal 2-D DCT-II of each non-overlapping window over the last two axes (..., H, W)."""
    return _windowed(x, window, dct_matrix(window))


def idct2_windows(x: np.ndarray, window: int) -> np.ndarray:
    """Inverse of `dct2_windows` (the DCT-III, as the basis is orthonormal)."""
    return _windowed(x, window, dct_matrix(window).T)


def images_to_spectrum(images: np.ndarray, window: int) -> np.ndarray:
    """uint8 or float (N, H, W, 3) RGB -> (N, 3, H, W) windowed YUV DCT coefficients."""
    return dct2_windows(np.moveaxis(rgb_to_yuv(images), -1, -3), window)


def spectrum_to_images(spectrum: np.ndarray, window: int) -> np.ndarray:
    """(N, 3, H, W) windowed YUV DCT coefficients -> float (N, H, W, 3) RGB, unclipped."""
    return yuv_to_rgb(np.moveaxis(idct2_windows(spectrum, window), -3, -1))


@TRIGGERS.register("ctrl")
class CtrlTrigger(Trigger):
    """Defaults are the official CTRL CIFAR-10 settings."""

    defaults = {"magnitude": 100.0, "window_size": 32, "positions": [[15, 15], [31, 31]], "channels": ["U", "V"]}

    def _validate(self) -> None:
        params = self.params
        window = params["window_size"]
        if not is_int(window) or window < 1 or self.image_size % window:
            self._fail("window_size", f"must be a positive integer dividing the image size {self.image_size}")
        if not is_number(params["magnitude"]) or params["magnitude"] == 0:
            self._fail("magnitude", "must be a finite non-zero number (0-255 pixel scale)")
        params["magnitude"] = float(params["magnitude"])
        positions = params["positions"]
        pairs_ok = isinstance(positions, (list, tuple)) and len(positions) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(is_int(v) and 0 <= v < window for v in p)
            for p in positions)
        if not pairs_ok or len({tuple(p) for p in positions}) != len(positions):
            self._fail("positions", f"must be a non-empty list of distinct [row, col] frequencies in [0, {window})")
        params["positions"] = [[int(r), int(c)] for r, c in positions]
        channels = params["channels"]
        if not isinstance(channels, (list, tuple)) or not channels or len(set(channels)) != len(channels) \
                or not set(channels) <= set(CHANNELS):
            self._fail("channels", f"must be a non-empty list of distinct channels from {', '.join(CHANNELS)}")
        params["channels"] = list(channels)

    def _build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The DCT-domain delta of one window, (3, window, window) in YUV order."""
        window = self.params["window_size"]
        spectrum = np.zeros((3, window, window))
        for channel in self.params["channels"]:
            for row, col in self.params["positions"]:
                spectrum[CHANNELS.index(channel), row, col] = self.params["magnitude"]
        return {"spectrum": spectrum}

    def perturbation(self) -> np.ndarray:
        """The additive RGB pattern over the whole image, float64 (H, W, 3)."""
        window = self.params["window_size"]
        one_window = spectrum_to_images(self._arrays["spectrum"], window)  # (window, window, 3)
        repeats = self.image_size // window
        return np.tile(one_window, (repeats, repeats, 1))

    def apply_float(self, images: np.ndarray) -> np.ndarray:
        """Triggered images as float64 before clipping and rounding (for analysis and tests)."""
        return self._check_images(images).astype(np.float64) + self.perturbation()

    def _apply(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        delta = self.perturbation()
        return map_in_chunks(lambda chunk: to_uint8(chunk + delta), images)
