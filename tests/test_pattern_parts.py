"""bench/pattern_parts.py: the variants of a learned pattern keep what their names say, within the budget."""

from __future__ import annotations

import numpy as np

from benches import load


def a_pattern(linf: float = 16.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.normal(0, 8, (32, 32, 3)), -linf, linf).astype(np.float32)


def test_each_variant_keeps_what_its_name_says_and_stays_in_budget():
    bench = load("pattern_parts")
    pattern = a_pattern()
    made = bench.variants(pattern, 16.0, seed=3)
    assert list(made) == ["own", "negated", "mirrored", "grayscale", "spectrum", "shuffled", "noise", "zoomed 3/4",
                          "zoomed 1/2", "shifted"]
    assert all(np.abs(v).max() <= 16.0 and v.shape == pattern.shape for v in made.values())
    assert np.array_equal(made["own"], pattern) and np.array_equal(made["negated"], -pattern)
    assert np.array_equal(made["mirrored"], pattern[:, ::-1])
    gray = made["grayscale"]
    assert np.array_equal(gray[..., 0], gray[..., 2]) and np.allclose(gray[..., 1], pattern.mean(axis=2))
    # shuffled: the same pixels (as colour triples) in other places
    pixels = lambda p: np.sort(p.reshape(-1, 3).view([("", p.dtype)] * 3), axis=0)  # noqa: E731
    assert np.array_equal(pixels(made["shuffled"]), pixels(pattern)) and not np.array_equal(made["shuffled"], pattern)
    assert set(np.unique(made["noise"])) == {-16.0, 16.0}
    assert np.array_equal(made["shifted"][4:, 4:], pattern[:-4, :-4])
    # same seed, same draws; another seed, other draws
    again, other = bench.variants(pattern, 16.0, seed=3), bench.variants(pattern, 16.0, seed=4)
    assert all(np.array_equal(again[k], made[k]) for k in made)
    assert not np.array_equal(other["shuffled"], made["shuffled"]) and not np.array_equal(other["noise"], made["noise"])


def test_the_spectrum_variant_keeps_the_amplitude_spectrum_and_the_energy_but_not_the_layout():
    bench = load("pattern_parts")
    pattern = a_pattern(linf=1e9)  # no clip, so the spectrum is exact
    drawn = bench.spectrum(pattern, np.random.default_rng(1))
    amplitude = lambda p: np.abs(np.fft.fft2(p, axes=(0, 1)))  # noqa: E731
    scale = np.sqrt((pattern ** 2).mean() / (drawn ** 2).mean())
    assert np.isclose(scale, 1.0)  # energy matched
    assert np.allclose(amplitude(drawn), amplitude(pattern), rtol=1e-6, atol=1e-6)
    assert abs(np.corrcoef(drawn.ravel(), pattern.ravel())[0, 1]) < 0.2  # the layout drawn anew


def test_a_zoomed_variant_is_the_centre_enlarged_as_a_crop_and_resize_view_shows_it():
    """A ramp across the width: the centred crop of 3/4 of the area is 28 columns wide (columns 2 to 29), and
    enlarged to 32 it is the same ramp, stretched, away from the edges (bilinear, align_corners false)."""
    bench = load("pattern_parts")
    ramp = np.broadcast_to((np.arange(32) - 15.5)[None, :, None], (32, 32, 3)).astype(np.float32)
    view = bench.zoomed(ramp, 0.75)
    inside = np.arange(2, 30)
    expected = ((inside + 0.5) * 28 / 32 - 0.5) + 2 - 15.5
    assert view.shape == ramp.shape and np.allclose(view[:, inside, 1], expected[None, :], atol=1e-5)
    assert np.allclose(bench.zoomed(np.full((32, 32, 3), 7.0, np.float32), 0.5), 7.0)  # a flat pattern stays flat
    assert np.abs(view).max() < np.abs(ramp).max()  # the edges of the pattern are cropped away
