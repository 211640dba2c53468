"""The built-in images' generative factors, their linear readout, and bench/encoder_factors.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benches import load, refused
from cba.analysis.factors import READ_FACTORS, CleanSpread, effective_rank, factor_readout, factor_targets
from cba.data.synthetic import CLASSES, generate, generate_with_factors, load_with_factors
from cba.errors import ConfigError

TINY = ["--set", "data.options.train_size=300", "--set", "data.options.test_size=120", "--set", "pretrain.width=4",
        "--set", "pretrain.epochs=1", "--fit-size", "200"]


def test_the_factors_come_with_the_very_images_generate_draws():
    images, factors = generate_with_factors(70, seed=3, chunk=32)  # three chunks: the draws interleave per chunk
    assert np.array_equal(images.images, generate(70, seed=3, chunk=32).images)
    assert np.array_equal(factors["label"], images.labels)
    assert {name: value.shape[1:] for name, value in factors.items()} == {
        "label": (), "theta": (), "radius": (), "centre": (2,), "background_from": (3,), "background_to": (3,),
        "gradient_angle": (), "foreground": (3,)}
    assert np.abs(factors["centre"]).max() <= 0.15 * 32 and factors["radius"].min() >= 0.22 * 32
    loaded, again = load_with_factors("test", seed=3, train_size=50, test_size=40)
    assert len(loaded) == 40 and np.array_equal(again["theta"], generate_with_factors(40, 3 + 1_000_003)[1]["theta"])


def test_a_rescaled_draw_changes_the_shapes_size_and_nothing_else():
    base, factors = generate_with_factors(200, seed=5, chunk=64)
    larger, scaled = generate_with_factors(200, seed=5, chunk=64, radius_scale=1.3)
    assert np.allclose(scaled["radius"], 1.3 * factors["radius"])
    assert all(np.array_equal(scaled[name], factors[name]) for name in factors if name != "radius")
    # A solid shape covers the pixels nearest its own colour: about 1.3² as many of them once redrawn.
    solid = np.isin(factors["label"], [CLASSES.index("circle"), CLASSES.index("square")])
    def near(images):
        return np.abs(images.images / 255 - factors["foreground"][:, None, None]).max(-1) < 0.12
    ratio = near(larger)[solid].sum(axis=(1, 2)).mean() / near(base)[solid].sum(axis=(1, 2)).mean()
    assert 1.4 < ratio < 2.0
    with pytest.raises(ConfigError, match="radius_scale"):
        load_with_factors("test", seed=5, train_size=50, test_size=40, radius_scale=0)


def test_a_shape_drawn_brighter_than_its_background_reads_so():
    images, factors = generate_with_factors(300, seed=4)
    targets = factor_targets(factors, CLASSES, 32)
    luma = images.images.astype(float) @ np.array([0.299, 0.587, 0.114]) / 255
    centre = luma[:, 15:17, 15:17].mean(axis=(1, 2))  # a solid disc or square always covers the image's centre
    corners = luma[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean(axis=1)  # the mean of the ramp's two ends, or near it
    solid = np.isin(factors["label"], [CLASSES.index("circle"), CLASSES.index("square")])
    assert np.corrcoef(targets["shape contrast"][solid, 0], (centre - corners)[solid])[0, 1] > 0.9


def test_orientation_is_undefined_exactly_for_the_round_shapes():
    _, factors = generate_with_factors(300, seed=5)
    targets = factor_targets(factors, CLASSES, 32)
    undefined = np.isnan(targets["orientation"]).any(1)
    assert np.array_equal(undefined, np.isin(factors["label"], [CLASSES.index("circle"), CLASSES.index("ring")]))
    assert set(targets) == set(READ_FACTORS)
    assert all(len(value) == 300 for value in targets.values())


def hand_made(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features that hold every factor's summary as columns, beside noise columns."""
    _, factors = generate_with_factors(n, seed)
    targets = factor_targets(factors, CLASSES, 32)
    columns = [np.nan_to_num(value) for value in targets.values()]
    noise = np.random.default_rng(seed).normal(size=(n, 20))
    return np.concatenate([*columns, noise], axis=1), targets


def test_the_readout_finds_factors_that_are_there_and_not_those_that_are_not():
    fit, fit_targets = hand_made(600, 1)
    test, targets = hand_made(300, 2)
    readout = factor_readout(fit, fit_targets, test, targets)
    assert all(readout[name]["r2"] > 0.95 for name in READ_FACTORS)
    noise = np.random.default_rng(0)
    blind = factor_readout(noise.normal(size=fit.shape), fit_targets, noise.normal(size=test.shape), targets)
    assert all(blind[name]["r2"] < 0.1 for name in READ_FACTORS)


def test_the_shift_is_the_triggers_change_of_a_reading_in_units_of_its_spread():
    fit, fit_targets = hand_made(600, 1)
    test, targets = hand_made(300, 2)
    rows = np.arange(0, 300, 2)
    triggered = test[rows].copy()
    triggered[:, 0] += targets["position"][rows, 0].std()  # column 0 is the shape's x: moved one spread right
    triggered[rows % 4 == 2, 0] += targets["position"][rows, 0].std()  # group 2: moved twice as far
    shifts = factor_readout(fit, fit_targets, test, targets, triggered, rows, groups=rows % 4)
    assert shifts["position"]["shift"][0] == pytest.approx(1.5, abs=0.12)
    by_group = shifts["position"]["shift_by_group"]
    assert sorted(by_group) == [0, 2] and by_group[0][0] == pytest.approx(1.0, abs=0.08)
    assert by_group[2][0] == pytest.approx(2.0, abs=0.15)
    along = shifts["position"]["along"]  # each image's own move along the mean shift, in the same units
    assert along.shape == (len(rows),) and np.all(np.abs(along[rows % 4 == 0] - 1.0) < 0.2)
    assert np.all(np.abs(along[rows % 4 == 2] - 2.0) < 0.3)
    others = [abs(v) for name in READ_FACTORS for v in shifts[name]["shift"] if name != "position"]
    assert max(others + [abs(shifts["position"]["shift"][1])]) < 0.05


def test_target_calls_are_split_by_how_far_each_image_moved():
    bench = load("encoder_factors")
    along = np.array([0.5, np.nan, 3.0, 1.0, 2.0, 0.0, 2.5])
    hits = np.array([0, 1, 1, 0, 1, 0, 1], dtype=bool)
    assert bench.calls_by_move(hits, along) == [(0.0, 0.25), (0.5, 1.5), (1.0, 2.75)]  # the NaN image is left out


def test_the_effective_rank_counts_the_directions_the_features_use():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    square = np.repeat(np.eye(64), 10, axis=0)  # 640 points that use 64 directions alike
    spread = (square - square.mean(0)) @ basis
    assert effective_rank(spread) == pytest.approx(63, abs=1)  # centring removes one direction
    line = np.outer(rng.normal(size=640), rng.normal(size=64))  # every point on one line through the origin
    assert effective_rank(line + 3.0) == pytest.approx(1, abs=1e-6)  # ... shifted: the centring takes it back
    few = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 64))  # rank 4, embedded in 64 dimensions
    assert 2 < effective_rank(few) <= 4 + 1e-6


def test_a_move_is_measured_in_the_clean_features_own_spread():
    spread = CleanSpread(np.random.default_rng(2).normal(size=(20000, 3)) * [4.0, 2.0, 0.01])
    assert spread.length(np.array([4.0, 0.0, 0.0])) == pytest.approx(1.0, rel=0.03)
    assert spread.length(np.array([0.0, 4.0, 0.0])) == pytest.approx(2.0, rel=0.03)
    assert spread.length(np.array([3.0, 4.0, 0.0])) == pytest.approx(np.hypot(0.75, 2.0), rel=0.03)
    # The third direction holds 0.0005% of the variance, past the 99% kept: a move along it is not counted.
    assert spread.length(np.array([0.0, 0.0, 1.0])) == pytest.approx(0.0, abs=0.01)
    everything = CleanSpread(np.random.default_rng(2).normal(size=(20000, 3)) * [4.0, 2.0, 0.01], kept_variance=1.0)
    assert everything.length(np.array([0.0, 0.0, 1.0])) > 50


def test_a_move_splits_into_its_part_along_a_direction_and_the_rest():
    import torch

    clean = torch.randn(5, 3)
    moved = clean + torch.tensor([1.0, 2.0, 0.0])
    parts = load("encoder_factors").split_move(clean, moved, torch.tensor([3.0, 0.0, 0.0]))  # any length
    # float32: each part is rebuilt around `clean`, so a zero comes back as a rounding error of its size
    assert torch.allclose(parts["along"] - clean, torch.tensor([1.0, 0.0, 0.0]).expand(5, 3), atol=1e-6)
    assert torch.allclose(parts["without"] - clean, torch.tensor([0.0, 2.0, 0.0]).expand(5, 3), atol=1e-6)
    assert torch.allclose(parts["along"] + parts["without"] - clean, moved, atol=1e-6)


def test_data_without_factors_and_unknown_methods_are_refused_in_one_line(capsys):
    bench = load("encoder_factors")
    assert refused(bench.parse_args, ["--set", "data.name=cifar10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cifar10" in err
    assert refused(bench.parse_args, ["--methods", "dino"]) == 2
    assert "dino" in capsys.readouterr().err
    assert refused(bench.parse_args, ["--rescale", "1.2", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rescale 0.0" in err and "(0, 2]" in err


def test_a_run_reads_pixels_the_untrained_and_a_trained_encoder_and_what_the_trigger_moves(tmp_path):
    from cba.triggers import build_trigger, save_trigger

    trigger = build_trigger("blend", {}, seed=0, image_size=32)
    save_trigger(trigger, tmp_path / "trigger")
    out = tmp_path / "factors.md"
    result = load("encoder_factors").main([*TINY, "--methods", "simclr", "--trigger", str(tmp_path / "trigger"),
                                           "--rescale", "1.3", "--out", str(out)])
    rows = {row["reader"]: row for row in result["rows"]}
    assert list(rows) == ["raw pixels", "random init", "simclr, clean"]
    assert rows["raw pixels"]["factors"]["background colour"]["r2"] > 0.9  # colour is linear in the pixels
    assert rows["raw pixels"]["factors"]["position"]["r2"] < 0.2  # where the shape is, is not
    assert np.isfinite(result["_run"]["final_losses"]["simclr"])
    assert all(len(row["factors"]["background colour"]["shift"]) == 3 for row in rows.values())
    assert rows["raw pixels"]["dims"] == 32 * 32 * 3
    assert 1 < rows["random init"]["effective_rank"] <= rows["random init"]["dims"]
    text = out.read_text()
    assert "R² background ramp" in text and "What the trigger does" in text and "simclr, clean" in text
    assert "by the images' true class" in text and "kNN target calls on triggered images" in text
    assert all(len(row["by_move"]) == 3 and "along" not in row["factors"]["size"] for row in rows.values())
    assert json.loads(out.with_suffix(".json").read_text())["_run"]["fit_size"] == 200
    # The redrawn shapes: every reader reads them, beside the trigger, by both readers.
    assert all([entry["scale"] for entry in row["rescaled"]] == [1.3] for row in rows.values())
    assert all(0 <= row[key] <= 1 for row in rows.values() for key in ("knn_asr", "probe_asr"))
    assert all(0 <= row["rescaled"][0][f"{name}_target"] <= 1 for row in rows.values() for name in ("knn", "probe"))
    assert all(row["whitened_move"] > 0 and row["rescaled"][0]["whitened_move"] > 0 for row in rows.values())
    assert "radius × 1.3" in text and "| probe ASR |" in text
    assert all(0 <= row["trigger_split"][part][f"{name}_target"] <= 1 for row in rows.values()
               for part in ("along", "without") for name in ("knn", "probe"))
    assert "only the enlargement's direction" in text
