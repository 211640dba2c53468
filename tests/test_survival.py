"""Trigger survival (cba/survival.py) on hand-made patterns whose answer is known,
through the same code path the bench uses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benches import load
from cba.survival import (DEFAULT_AUGMENTATIONS, MEASURES, build_augmentation, measure, paired_views,
                          shift_correlation, survival_table)
from cba.triggers import TRIGGERS, build_trigger, save_trigger

# kornia's rgb_to_grayscale weights for float images (BT.601 luma); a pattern
# orthogonal to them has no luminance, so grayscale removes it exactly.
LUMA = torch.tensor([0.299, 0.587, 0.114])
SIZE = 32


# These tensors are tiny: a second intra-op thread only adds overhead, and stalls badly when the other core is busy.
pytestmark = pytest.mark.usefixtures("one_thread")


def mid_grey(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Grey images with a little texture: far from 0 and 1, so no step clips the trigger."""
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + 0.03 * torch.rand(n, 3, SIZE, SIZE, generator=generator)


def noise(channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def stamp(pattern: torch.Tensor, amplitude: float = 0.1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, clean + trigger) with the trigger scaled to a peak of `amplitude`."""
    clean = mid_grey(n)
    return clean, clean + amplitude * pattern / pattern.abs().max()


def run(name: str, pattern: torch.Tensor, draws: int = 2) -> dict:
    clean, triggered = stamp(pattern)
    return measure(build_augmentation(name, SIZE, 0.5), clean, triggered, draws=draws, seed=0)


def test_shift_correlation_is_the_inner_product_with_every_circular_shift():
    a, b = noise(3, 1)[None, :, :6, :5].double(), noise(3, 2)[None, :, :6, :5].double()
    fast = shift_correlation(a.contiguous(), b.contiguous())[0]
    for dy in range(6):
        for dx in range(5):
            slow = (a * torch.roll(b, (dy, dx), dims=(-2, -1))).sum()
            assert fast[dy, dx] == pytest.approx(float(slow), abs=1e-9)


def test_identity_keeps_everything():
    result = run("identity", noise())
    for key in MEASURES:
        assert result[key] == pytest.approx(1.0, abs=1e-6), key
    assert result["images"] == 8 and result["skipped"] == 0


def test_grayscale_removes_pure_chroma_but_keeps_pure_luminance():
    # Chroma: at every pixel a mix of two RGB directions orthogonal to LUMA.
    u = torch.tensor([LUMA[1], -LUMA[0], 0.0])
    v = torch.cross(u, LUMA, dim=0)
    planes = noise(2)
    chroma = u[:, None, None] * planes[0] + v[:, None, None] * planes[1]
    assert (LUMA[:, None, None] * chroma).sum(0).abs().max() < 1e-5
    assert abs(run("grayscale", chroma)["survival"]) < 0.01
    assert run("grayscale", chroma)["energy"] < 1e-6
    luminance = noise(1).expand(3, SIZE, SIZE)
    assert run("grayscale", luminance)["survival"] == pytest.approx(1.0, abs=1e-4)


def test_flip_keeps_a_symmetric_pattern_but_not_an_antisymmetric_one():
    base = noise()
    symmetric, antisymmetric = base + base.flip(-1), base - base.flip(-1)
    assert run("flip", symmetric)["survival"] == pytest.approx(1.0, abs=1e-4)
    assert run("flip", antisymmetric)["survival"] < 0.2  # the view carries -d: chance level only
    assert run("flip", antisymmetric)["energy"] == pytest.approx(1.0, abs=1e-4)  # moved, not lost


def test_crop_keeps_a_low_frequency_pattern_better_than_a_high_frequency_one():
    grid = torch.arange(SIZE, dtype=torch.float32) * 2 * math.pi / SIZE
    low = (torch.cos(grid)[:, None] * torch.cos(grid)[None, :]).expand(3, SIZE, SIZE)
    high = (torch.cos(15 * grid)[:, None] * torch.cos(15 * grid)[None, :]).expand(3, SIZE, SIZE)
    kept_low, kept_high = run("crop", low, draws=3), run("crop", high, draws=3)
    assert kept_low["survival"] > 0.6 and kept_high["survival"] < 0.3
    assert kept_low["view_agreement"] > kept_high["view_agreement"] + 0.3


@pytest.mark.parametrize("name", ["ssl", "ssl_per_batch", "ssl_ctrl", "hue"])
def test_reused_parameters_reproduce_the_augmentation_exactly(name):
    torch.manual_seed(0)
    steps = build_augmentation(name, SIZE, 0.5)
    images = torch.rand(16, 3, SIZE, SIZE)
    for _ in range(3):  # several draws: jitter's random order changes between calls
        first, replay = paired_views(steps, images, images.clone())
        assert torch.equal(first, replay)
    other, _ = paired_views(steps, images, images.clone())
    assert not torch.equal(first, other)  # a fresh draw does differ


def test_results_are_deterministic_from_the_seed_and_leave_torch_rng_alone():
    images = (mid_grey(12) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    trigger = build_trigger("ssl_patch", {}, seed=0, image_size=SIZE)
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    first = survival_table(trigger, images, 0.5, seed=3, draws=1, augmentations=["ssl", "crop"])
    assert torch.equal(torch.rand(1), expected_next)
    assert first == survival_table(trigger, images, 0.5, seed=3, draws=1, augmentations=["ssl", "crop"])
    other = survival_table(trigger, images, 0.5, seed=4, draws=1, augmentations=["ssl", "crop"])
    assert [r["survival"] for r in other] != [r["survival"] for r in first]
    assert [r["augmentation"] for r in first] == ["ssl", "crop"] and first[0]["trigger"] == "ssl_patch"


def test_images_the_trigger_leaves_unchanged_are_skipped_not_nan():
    clean, triggered = stamp(noise())
    triggered[:3] = clean[:3]
    result = measure(build_augmentation("ssl", SIZE, 0.5), clean, triggered, draws=1)
    assert result["skipped"] == 3 and result["images"] == 5
    assert all(math.isfinite(result[key]) for key in MEASURES)
    nothing = measure(build_augmentation("ssl", SIZE, 0.5), clean, clean.clone(), draws=1)
    assert nothing["images"] == 0 and all(math.isnan(nothing[key]) for key in MEASURES)


def test_bench_writes_both_tables_and_merges_asr(tmp_path):
    asr = tmp_path / "asr.json"
    asr.write_text(json.dumps({"ctrl": {"knn_asr": 0.5, "linear_asr": 0.25, "clean_asr": 0.125}}))
    out = tmp_path / "ts.md"
    load("trigger_survival").main(["--test-size", "16", "--draws", "1", "--optimized-dir", str(tmp_path / "none"),
                                   "--asr-json", str(asr), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"ctrl", "ctrl_low8", "ctrl_y", "patch"} <= set(result["variants"])
    assert "optimized" not in result["variants"] and any("optimized: skipped" in n for n in result["notes"])
    assert len(result["rows"]) == len(result["variants"]) * len(DEFAULT_AUGMENTATIONS)
    assert all(0 <= row["energy"] and math.isfinite(row["survival"]) for row in result["rows"])
    text = out.read_text()
    assert "## Survival" in text and "## View agreement" in text
    ctrl_line = next(line for line in text.splitlines() if line.startswith("| ctrl |"))
    assert ctrl_line.endswith("| 0.500 | 0.250 | 0.125 |")


def test_bench_merges_several_asr_files_later_ones_winning(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"ctrl": {"knn_asr": 0.5, "linear_asr": 0.25, "clean_asr": 0.125},
                                 "patch": {"knn_asr": 0.75, "linear_asr": 0.5, "clean_asr": 0.25},
                                 "_run": {"command": "x"}}))
    second.write_text(json.dumps({"ctrl": {"knn_asr": 0.0625, "linear_asr": 0.375, "clean_asr": 0.0, "seconds": 9.0}}))
    out = tmp_path / "ts.md"
    load("trigger_survival").main(["--test-size", "10", "--draws", "1", "--optimized-dir", str(tmp_path / "none"),
                                   "--asr-json", str(first), str(second), "--out", str(out)])
    lines = out.read_text().splitlines()
    assert next(line for line in lines if line.startswith("| ctrl |")).endswith("| 0.062 | 0.375 | 0.000 |")
    assert next(line for line in lines if line.startswith("| patch |")).endswith("| 0.750 | 0.500 | 0.250 |")
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["settings"]["asr_json"] == [str(first), str(second)]
    assert "seconds" not in result["asr"]["ctrl"] and "_run" not in result["asr"]


@pytest.mark.skipif("optimized" not in TRIGGERS, reason="no optimized trigger registered")
def test_bench_measures_a_saved_optimized_trigger(tmp_path):
    # Unfitted, its pattern is zero: every image is skipped and every cell is empty, not NaN.
    folder = tmp_path / "trigger"
    save_trigger(build_trigger("optimized", {}, seed=0, image_size=SIZE), folder)
    out = tmp_path / "ts.md"
    load("trigger_survival").main(["--test-size", "10", "--draws", "1", "--optimized-dir", str(folder), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = [row for row in result["rows"] if row["trigger"] == "optimized"]
    assert len(rows) == len(DEFAULT_AUGMENTATIONS) and all(row["survival"] is None for row in rows)
    assert any("optimized: 10 of 10 images skipped" in note for note in result["notes"])


def test_bench_stops_in_one_line_on_a_missing_data_set(tmp_path, capsys):
    out = tmp_path / "ts.md"
    with pytest.raises(SystemExit) as stop:
        load("trigger_survival").main(["--data", "fashion_mnist", "--root", str(tmp_path / "absent"), "--test-size", "8",
                                       "--draws", "1", "--out", str(out)])
    message = str(stop.value)
    assert "--root" in message and str(tmp_path / "absent") in message and "\n" not in message
    assert not out.exists() and "trigger_survival:" not in capsys.readouterr().out  # nothing measured


def _write_idx_test_split(root: Path, n: int) -> None:
    """A Fashion-MNIST-format test split (big-endian idx files) of random garments."""
    import struct

    rng = np.random.default_rng(0)
    root.mkdir()
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    (root / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    (root / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def test_bench_measures_on_the_named_data_set(tmp_path):
    root = tmp_path / "fashion"
    _write_idx_test_split(root, 12)
    out = tmp_path / "ts.md"
    load("trigger_survival").main(["--data", "fashion_mnist", "--root", str(root), "--test-size", "12", "--draws", "1",
                                   "--optimized-dir", str(tmp_path / "none"), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["settings"]["data"] == "fashion_mnist" and "the fashion_mnist test split (12 images)" in out.read_text()
    patch = [row for row in result["rows"] if row["trigger"] == "patch"]
    assert {row["images"] for row in patch} == {12}
