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
    assert list(made) == ["own", "negated", "mirrored", "grayscale", "spectrum", "shuffled", "noise"]
    assert all(np.abs(v).max() <= 16.0 and v.shape == pattern.shape for v in made.values())
    assert np.array_equal(made["own"], pattern) and np.array_equal(made["negated"], -pattern)
    assert np.array_equal(made["mirrored"], pattern[:, ::-1])
    gray = made["grayscale"]
    assert np.array_equal(gray[..., 0], gray[..., 2]) and np.allclose(gray[..., 1], pattern.mean(axis=2))
    # shuffled: the same pixels (as colour triples) in other places
    pixels = lambda p: np.sort(p.reshape(-1, 3).view([("", p.dtype)] * 3), axis=0)  # noqa: E731
    assert np.array_equal(pixels(made["shuffled"]), pixels(pattern)) and not np.array_equal(made["shuffled"], pattern)
    assert set(np.unique(made["noise"])) == {-16.0, 16.0}
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
