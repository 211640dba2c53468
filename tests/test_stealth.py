"""The visibility figures of a change to images (`cba.triggers.stealth`), on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from cba.triggers import build_trigger
from cba.triggers.stealth import change_metrics, stealth_metrics


def images(count: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, size=(count, 32, 32, 3), dtype=np.uint8)


def test_no_change_is_invisible():
    clean = images()
    assert change_metrics(clean.copy(), clean) == {"linf": 0.0, "l2": 0.0, "psnr": 100.0, "ssim": pytest.approx(1.0)}


def test_a_uniform_change_has_the_figures_of_its_size():
    """+5 everywhere: L-inf 5, L2 5 * sqrt(pixels), PSNR 20 log10(255 / 5)."""
    clean = images()
    changed = clean + np.uint8(5)
    seen = change_metrics(changed, clean)
    assert seen["linf"] == 5.0
    assert seen["l2"] == pytest.approx(5 * np.sqrt(32 * 32 * 3))
    assert seen["psnr"] == pytest.approx(20 * np.log10(255 / 5))
    assert 0.9 < seen["ssim"] < 1.0  # a shift of the mean costs SSIM's luminance term a little


def test_a_larger_change_is_more_visible_and_the_order_of_images_matters():
    clean = images()
    small, large = (np.clip(clean.astype(int) + d, 0, 255).astype(np.uint8) for d in (3, 30))
    assert change_metrics(large, clean)["psnr"] < change_metrics(small, clean)["psnr"]
    assert change_metrics(large, clean)["ssim"] < change_metrics(small, clean)["ssim"]
    # Against other images, not a change of the same ones: far from invisible.
    assert change_metrics(images(seed=1), clean)["psnr"] < 15


def test_a_triggers_figures_are_those_of_the_change_it_stamps():
    clean = images()
    trigger = build_trigger("patch", {}, seed=0, image_size=32)
    assert stealth_metrics(trigger, clean) == change_metrics(trigger.apply(clean), clean)


def test_batches_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match=r"shape \(4, 32, 32, 3\) against clean ones of shape \(3, 32, 32, 3\)"):
        change_metrics(images(), images(count=3))
