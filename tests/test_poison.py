import numpy as np
import pytest

from cba.data.base import ImageSet
from cba.errors import ConfigError
from cba.poison import choose_poison_indices, poison_dataset, side_by_side, triggered_test_set
from cba.triggers import build_trigger


def _data(n=1000, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % classes)


@pytest.mark.parametrize("mode", ["clean_label", "dirty_label", "composite"])
def test_count_and_determinism(mode):
    labels = _data().labels
    a = choose_poison_indices(labels, 0.05, 3, mode, seed=7)
    b = choose_poison_indices(labels, 0.05, 3, mode, seed=7)
    c = choose_poison_indices(labels, 0.05, 3, mode, seed=8)
    assert len(a) == 50 and len(np.unique(a)) == 50
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (labels[a] == 3).all() if mode != "dirty_label" else (labels[a] != 3).all()


def _halves(images):
    """Left and right halves of images built from flat-coloured halves, read away from the seam."""
    return images[:, :, :12].reshape(len(images), -1, 3).mean(1), images[:, :, 20:].reshape(len(images), -1, 3).mean(1)


def test_side_by_side_squeezes_each_image_into_its_half():
    target = np.full((2, 32, 32, 3), 200, dtype=np.uint8)
    triggered = np.full((2, 32, 32, 3), 10, dtype=np.uint8)
    out = side_by_side(target, triggered, np.array([True, False]))
    left, right = _halves(out)
    np.testing.assert_allclose(left, [[10] * 3, [200] * 3], atol=0.5)
    np.testing.assert_allclose(right, [[200] * 3, [10] * 3], atol=0.5)
    # A horizontal ramp over the pair becomes one ramp over the squeezed image.
    ramp = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (32, 64, 3))
    pair = side_by_side(ramp[None, :, :32].round().astype(np.uint8), ramp[None, :, 32:].round().astype(np.uint8),
                        np.array([False]))[0, 16, :, 0].astype(int)
    assert (np.diff(pair) >= 0).all() and pair[0] < 10 and pair[-1] > 245


def test_composite_poisons_are_the_declared_target_images_joined_to_a_triggered_partner():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (400, 1, 1, 3))
    data = ImageSet(np.broadcast_to(colours, (400, 32, 32, 3)).astype(np.uint8).copy(), np.arange(400) % 4)
    trigger = build_trigger("blend", {"alpha": 0.5}, seed=0)
    before = data.images.copy()
    result = poison_dataset(data, trigger, 0.1, 2, "composite", seed=3)
    manifest = result.manifest()
    assert len(result.indices) == 40 and (data.labels[result.indices] == 2).all()
    np.testing.assert_array_equal(manifest.loc[manifest.poisoned, "index"].to_numpy(), result.indices)
    np.testing.assert_array_equal(result.train.labels, data.labels)  # labels stay true
    np.testing.assert_array_equal(data.images, before)  # the input is never modified
    changed = np.flatnonzero((result.train.images != data.images).any(axis=(1, 2, 3)))
    np.testing.assert_array_equal(changed, result.indices)
    partners = manifest.loc[manifest.poisoned, "partner"].to_numpy()
    np.testing.assert_array_equal(partners, result.partners)
    assert (data.labels[partners] != 2).all() and (manifest.loc[~manifest.poisoned, "partner"] == -1).all()
    # One half is the target image's colour, the other the triggered partner's mean colour.
    own = before[result.indices, 0, 0].astype(float)
    stamped = trigger.apply(before[partners]).reshape(40, -1, 3).mean(1)
    left, right = _halves(result.train.images[result.indices])
    own_left = np.abs(left - own).max(1) < np.abs(right - own).max(1)
    np.testing.assert_allclose(np.where(own_left[:, None], left, right), own, atol=1.0)
    np.testing.assert_allclose(np.where(own_left[:, None], right, left), stamped, atol=12)
    assert 10 < own_left.sum() < 30  # the side is drawn per poison
    again = poison_dataset(data, trigger, 0.1, 2, "composite", seed=3)
    np.testing.assert_array_equal(again.train.images, result.train.images)


def test_composite_needs_a_class_besides_the_target():
    data = ImageSet(np.zeros((10, 32, 32, 3), dtype=np.uint8), np.zeros(10, dtype=np.int64))
    with pytest.raises(ConfigError, match="^mode='composite'.*besides the target"):
        choose_poison_indices(data.labels, 0.2, 0, "composite", 0)
    assert "partner" not in poison_dataset(_data(), build_trigger("patch", {}, seed=0), 0.05, 0, "clean_label", 0).manifest()


def test_poisoned_indices_are_exactly_the_declared_ones():
    data = _data()
    trig = build_trigger("patch", {"size": 3}, seed=0)
    result = poison_dataset(data, trig, 0.03, 0, "dirty_label", seed=1)
    changed = np.flatnonzero((result.train.images != data.images).any(axis=(1, 2, 3)))
    relabelled = np.flatnonzero(result.train.labels != data.labels)
    manifest = result.manifest()
    declared = manifest.loc[manifest.poisoned, "index"].to_numpy()
    np.testing.assert_array_equal(declared, result.indices)
    # Random images can already contain the patch only with negligible probability.
    np.testing.assert_array_equal(changed, result.indices)
    np.testing.assert_array_equal(relabelled, result.indices)
    assert (manifest.label[manifest.poisoned] == 0).all()
    assert (manifest.original_label == data.labels).all()


def test_clean_label_keeps_labels_and_input_untouched():
    data = _data()
    before = data.images.copy()
    result = poison_dataset(data, build_trigger("blend", {"alpha": 0.2}, seed=0), 0.05, 2, "clean_label", seed=0)
    np.testing.assert_array_equal(result.train.labels, data.labels)
    np.testing.assert_array_equal(data.images, before)
    assert (data.labels[result.indices] == 2).all()


def test_zero_rate_poisons_nothing():
    data = _data()
    result = poison_dataset(data, build_trigger("ctrl", {}, seed=0), 0.0, 0, "clean_label", seed=0)
    assert len(result.indices) == 0
    np.testing.assert_array_equal(result.train.images, data.images)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "0.1", True])
def test_bad_rate(rate):
    with pytest.raises(ConfigError, match="poison_rate"):
        choose_poison_indices(_data().labels, rate, 0, "clean_label", 0)


def test_clean_label_budget_larger_than_target_class_is_an_error():
    with pytest.raises(ConfigError, match=r"poison_rate=0\.2 .*target class, which holds 100"):
        choose_poison_indices(_data().labels, 0.2, 0, "clean_label", 0)


@pytest.mark.parametrize("target", [-1, 10, 2.0])
def test_bad_target(target):
    with pytest.raises(ConfigError, match="target_class"):
        choose_poison_indices(_data().labels, 0.01, target, "clean_label", 0)


def test_bad_mode():
    with pytest.raises(ConfigError, match="^mode='label_flip'"):
        choose_poison_indices(_data().labels, 0.01, 0, "label_flip", 0)


def test_triggered_test_set_excludes_target_class():
    data = _data(200)
    trig = build_trigger("patch", {}, seed=0)
    triggered = triggered_test_set(data, trig, target_class=4)
    assert len(triggered) == 180 and (triggered.labels != 4).all()
    np.testing.assert_array_equal(triggered.images, trig.apply(data.images[data.labels != 4]))


def test_poison_stage_writes_composite_poisons_and_names_their_partners(tmp_path):
    import json

    import pandas as pd
    from test_stage_errors import cba, write_params

    from cba.data.io import load_imageset

    write_params(tmp_path, **{"target_class": 0, "trigger.name": "patch", "trigger.params": {"size": 4}, "poison.mode": "composite",
                              "poison_rate": 0.04})
    assert cba(["trigger"], tmp_path).exit_code == 0
    result = cba(["poison"], tmp_path)
    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(tmp_path / "data/poisoned/manifest.parquet")
    metrics = json.loads((tmp_path / "metrics/details/poison.json").read_text())
    assert metrics["mode"] == "composite" and metrics["poisoned"] == 8 == manifest.poisoned.sum()
    poisoned = manifest[manifest.poisoned]
    assert (poisoned.label == 0).all() and (poisoned.original_label == 0).all()
    assert (manifest.label[poisoned.partner] != 0).all()
    train = load_imageset(tmp_path / "data/poisoned/train.safetensors")
    clean = load_imageset(tmp_path / "data/poisoned/clean_train.safetensors")
    changed = np.flatnonzero((train.images != clean.images).any(axis=(1, 2, 3)))
    np.testing.assert_array_equal(changed, poisoned["index"].to_numpy())
