import numpy as np
import pytest

from cba.data.base import ImageSet
from cba.errors import ConfigError
from cba.poison import choose_poison_indices, poison_dataset, triggered_test_set
from cba.triggers import build_trigger


def _data(n=1000, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % classes)


@pytest.mark.parametrize("mode", ["clean_label", "dirty_label"])
def test_count_and_determinism(mode):
    labels = _data().labels
    a = choose_poison_indices(labels, 0.05, 3, mode, seed=7)
    b = choose_poison_indices(labels, 0.05, 3, mode, seed=7)
    c = choose_poison_indices(labels, 0.05, 3, mode, seed=8)
    assert len(a) == 50 and len(np.unique(a)) == 50
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (labels[a] == 3).all() if mode == "clean_label" else (labels[a] != 3).all()


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
