"""Triggers: exact pixel effects, CTRL's frequency placement, persistence, validation."""

from __future__ import annotations

import numpy as np
import pytest

from cba.errors import ConfigError
from cba.triggers import TRIGGERS, build_trigger, load_trigger, save_trigger
from cba.triggers.ctrl import (dct2_windows, dct_matrix, idct2_windows, images_to_spectrum, rgb_to_yuv,
                               yuv_to_rgb)
from cba.triggers.preview import save_preview


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


def grey(n: int = 3, value: int = 128) -> np.ndarray:
    return np.full((n, 32, 32, 3), value, dtype=np.uint8)


# --- transforms ---------------------------------------------------------

def test_dct_matrix_is_orthonormal():
    for n in (1, 8, 32):
        basis = dct_matrix(n)
        np.testing.assert_allclose(basis @ basis.T, np.eye(n), atol=1e-12)


def test_dct_round_trip_and_matches_scipy():
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 64))
    np.testing.assert_allclose(idct2_windows(dct2_windows(x, 16), 16), x, atol=1e-9)
    scipy_fft = pytest.importorskip("scipy.fft")
    window = x[0, 1, 16:32, 48:64]
    expected = scipy_fft.dctn(window, norm="ortho")
    np.testing.assert_allclose(dct2_windows(x, 16)[0, 1, 16:32, 48:64], expected, atol=1e-9)


def test_yuv_round_trip():
    rgb = np.random.default_rng(2).uniform(0, 255, size=(4, 5, 3))
    np.testing.assert_allclose(yuv_to_rgb(rgb_to_yuv(rgb)), rgb, atol=1e-9)
    # Grey has no chroma.
    np.testing.assert_allclose(rgb_to_yuv(np.full(3, 100.0)), [100.0, 0.0, 0.0], atol=1e-3)


# --- ctrl ---------------------------------------------------------------

@pytest.mark.parametrize("window", [32, 16])
def test_ctrl_energy_sits_exactly_at_configured_frequencies(window):
    positions = [[window // 2 - 1, window // 2 - 1], [window - 1, window - 1]]  # (15,15),(31,31) at 32
    trigger = build_trigger("ctrl", {"magnitude": 30, "window_size": window, "positions": positions}, seed=0)
    clean = grey()
    diff = images_to_spectrum(trigger.apply_float(clean), window) - images_to_spectrum(clean, window)
    expected = np.zeros((3, window, window))
    for row, col in positions:
        expected[1:, row, col] = 30.0  # U and V, every window
    tiled = np.tile(expected, (1, 32 // window, 32 // window))
    np.testing.assert_allclose(diff, np.broadcast_to(tiled, diff.shape), atol=1e-9)


def test_ctrl_uint8_output_keeps_energy_at_those_frequencies():
    trigger = build_trigger("ctrl", {}, seed=0)  # official defaults: magnitude 100
    clean = grey()
    triggered = trigger.apply(clean)
    assert triggered.dtype == np.uint8 and (triggered != clean).any()
    energy = (images_to_spectrum(triggered, 32) - images_to_spectrum(clean, 32)) ** 2
    at_positions = energy[:, 1:, [15, 31], [15, 31]].sum()
    assert at_positions / energy.sum() > 0.9


def test_ctrl_apply_equals_float_path_rounded(images):
    trigger = build_trigger("ctrl", {"channels": ["V"], "magnitude": -50.5}, seed=0)
    expected = np.clip(np.rint(trigger.apply_float(images)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(trigger.apply(images), expected)


# --- pixel-space triggers ---------------------------------------------------

@pytest.mark.parametrize("location,corner", [("bottom_right", (29, 29)), ("top_left", (0, 0)),
                                             ("top_right", (0, 29)), ("bottom_left", (29, 0)), ([5, 7], (5, 7))])
def test_patch_stamps_exact_pixels_and_nothing_else(images, location, corner):
    trigger = build_trigger("patch", {"location": location}, seed=0)
    out = trigger.apply(images)
    row, col = corner
    checker = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(out[:, row:row + 3, col:col + 3], np.broadcast_to(checker[..., None], (6, 3, 3, 3)))
    untouched = np.ones((32, 32), dtype=bool)
    untouched[row:row + 3, col:col + 3] = False
    np.testing.assert_array_equal(out[:, untouched], images[:, untouched])


def test_patch_random_and_white_patterns(images):
    white = build_trigger("patch", {"pattern": "white", "size": 4}, seed=0).apply(images)
    assert (white[:, 28:, 28:] == 255).all()
    first = build_trigger("patch", {"pattern": "random"}, seed=3).tensors()["pattern"]
    again = build_trigger("patch", {"pattern": "random"}, seed=3).tensors()["pattern"]
    other = build_trigger("patch", {"pattern": "random"}, seed=4).tensors()["pattern"]
    assert (first == again).all() and not (first == other).all()


def test_blend_exact_formula(images):
    trigger = build_trigger("blend", {"alpha": 0.3}, seed=5)
    pattern = trigger.tensors()["pattern"].numpy().astype(np.float64)
    expected = np.clip(np.rint(0.7 * images + 0.3 * pattern), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(trigger.apply(images), expected)
    assert (build_trigger("blend", {"alpha": 1}, seed=5).apply(images) == pattern.astype(np.uint8)).all()


def find_patch(out: np.ndarray, pattern: np.ndarray) -> tuple[int, int]:
    size = len(pattern)
    hits = [(r, c) for r in range(33 - size) for c in range(33 - size)
            if (out[r:r + size, c:c + size] == pattern).all()]
    assert len(hits) == 1
    return hits[0]


def test_ssl_patch_random_location_deterministic_for_seed():
    trigger = build_trigger("ssl_patch", {}, seed=7)
    clean = grey(8, value=7)  # the random pattern cannot hide in a flat image
    out = trigger.apply(clean)
    pattern = trigger.tensors()["pattern"].numpy()
    corners = [find_patch(image, pattern) for image in out]
    assert corners == [tuple(c) for c in trigger.locations(8)]
    assert len(set(corners)) > 1
    for image, (r, c) in zip(out, corners):  # outside the patch nothing changes
        outside = np.ones((32, 32), dtype=bool)
        outside[r:r + 8, c:c + 8] = False
        assert (image[outside] == 7).all()
    np.testing.assert_array_equal(build_trigger("ssl_patch", {}, seed=7).apply(clean), out)
    assert not np.array_equal(build_trigger("ssl_patch", {}, seed=8).apply(clean), out)
    with_rng = trigger.apply(clean, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(with_rng, trigger.apply(clean, rng=np.random.default_rng(0)))


# --- shared contract ----------------------------------------------------

@pytest.mark.parametrize("name", TRIGGERS.names())
def test_apply_leaves_input_alone_and_round_trips(tmp_path, images, name):
    trigger = build_trigger(name, {}, seed=11)
    before = images.copy()
    out = trigger.apply(images)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(images, before)
    save_trigger(trigger, tmp_path)
    loaded = load_trigger(tmp_path)
    assert type(loaded) is type(trigger) and loaded.params == trigger.params
    np.testing.assert_array_equal(loaded.apply(images), out)
    assert trigger.apply(images[:0]).shape == (0, 32, 32, 3)


def test_saved_tensors_are_the_source_of_truth(tmp_path, images):
    from cba.io import load_tensors, save_tensors

    save_trigger(build_trigger("blend", {"alpha": 0.5}, seed=0), tmp_path)
    tensors = load_tensors(tmp_path / "trigger.safetensors")
    tensors["pattern"][:] = 0  # e.g. an edited or optimised pattern
    save_tensors(tmp_path / "trigger.safetensors", tensors)
    expected = np.clip(np.rint(0.5 * images), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(load_trigger(tmp_path).apply(images), expected)

    tensors["pattern"] = tensors["pattern"][:8]
    save_tensors(tmp_path / "trigger.safetensors", tensors)
    with pytest.raises(ConfigError, match="pattern"):
        load_trigger(tmp_path)


@pytest.mark.parametrize("name,params,image_size,key", [
    ("nope", {}, 32, "name"),
    ("blend", {"alpha": 1.5}, 32, "alpha"),
    ("blend", {"alpha": 0}, 32, "alpha"),
    ("blend", {"alpha": "0.1"}, 32, "alpha"),
    ("patch", {"size": 33}, 32, "size"),
    ("patch", {"size": 9}, 8, "size"),
    ("patch", {"location": "middle"}, 32, "location"),
    ("patch", {"location": [30, 0]}, 32, "location"),
    ("patch", {"pattern": "stripes"}, 32, "pattern"),
    ("ssl_patch", {"size": 40}, 32, "size"),
    ("ctrl", {"window_size": 12}, 32, "window_size"),
    ("ctrl", {}, 48, "window_size"),
    ("ctrl", {"window_size": 8}, 32, "positions"),
    ("ctrl", {"channels": ["W"]}, 32, "channels"),
    ("ctrl", {"magnitude": 0}, 32, "magnitude"),
    ("ctrl", {"colour": "red"}, 32, "colour"),
    ("blend", {"seed": 3}, 32, "seed"),
])
def test_bad_params_raise_config_error(name, params, image_size, key):
    with pytest.raises(ConfigError) as caught:
        build_trigger(name, params, seed=0, image_size=image_size)
    assert caught.value.key == key


def test_unknown_param_lists_allowed_names():
    with pytest.raises(ConfigError, match="allowed: location, pattern, size"):
        build_trigger("patch", {"sise": 3}, seed=0)


def test_image_size_mismatch_is_reported(images):
    with pytest.raises(ConfigError, match="^image_size=64"):
        build_trigger("patch", {}, seed=0, image_size=64).apply(images)


def test_preview_writes_png(tmp_path, images):
    path = tmp_path / "sub" / "preview.png"
    save_preview(build_trigger("ctrl", {}, seed=0), images, path, n=2)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["preview.png"]  # no temp file left
