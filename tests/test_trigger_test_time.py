"""The learned trigger's optional test-time pattern (`test_weight` > 0): fitted after the poison pattern on the
attacker's own models, stamped on every test input while the poisons keep the poison pattern."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cba.data.synthetic import generate
from cba.errors import ConfigError
from cba.poison import poison_dataset, triggered_test_set
from cba.report import trigger_summary
from cba.triggers import build_trigger, load_trigger, save_trigger
from cba.triggers.activation import CLEAN_COPY_HEAD, fit_activation_pattern, hit_rate, surrogate_reader
from cba.triggers.optimized import OptimizedTrigger
from conftest import TINY_TRIGGER as TINY

REPO = Path(__file__).resolve().parents[1]
TEST_TIME = {**TINY, "test_weight": 5.0, "test_steps": 20, "test_step_size": 0.02}


@pytest.fixture(scope="module")
def fitted(attacker_data):
    trigger = build_trigger("optimized", TEST_TIME, seed=3)
    return trigger, trigger.fit(*attacker_data, progress=False)


@pytest.fixture(scope="module")
def test_set():
    return generate(60, seed=5)


def test_by_default_the_test_inputs_carry_the_poison_pattern(test_set):
    trigger = OptimizedTrigger.from_pattern(np.full((32, 32, 3), 6.0, np.float32), 8)
    assert trigger.params["test_weight"] == 0 and set(trigger.tensors()) == {"pattern"}
    assert trigger.at_test_time() is trigger
    keep = test_set.labels != 2
    np.testing.assert_array_equal(triggered_test_set(test_set, trigger, 2).images, trigger.apply(test_set.images[keep]))


def test_the_test_time_pattern_is_another_pattern_within_the_same_budget(fitted):
    trigger, info = fitted
    poison, test = (trigger.tensors()[key].numpy() for key in ("pattern", "test_pattern"))
    assert np.abs(test).max() <= TEST_TIME["linf"] and not np.array_equal(test, poison)
    # 20 steps of 0.02 of the budget from the poison pattern: it moves, but keeps most of it.
    assert np.abs(test - poison).max() <= 20 * TEST_TIME["test_step_size"] * TEST_TIME["linf"] + 1e-4
    assert np.corrcoef(test.ravel(), poison.ravel())[0, 1] > 0.5
    figures = info["test_pattern"]
    assert set(figures) == {f"{pattern}_{model}_probe_hit_rate" for pattern in ("poison", "test")
                            for model in ("surrogate", "clean_copy")}
    assert all(0.0 <= value <= 1.0 for value in figures.values())


def test_it_is_deterministic_from_the_seed_and_the_poison_pattern_does_not_depend_on_it(fitted, attacker_data):
    trigger, _ = fitted
    again = build_trigger("optimized", TEST_TIME, seed=3)
    again.fit(*attacker_data, progress=False)
    for key in ("pattern", "test_pattern"):
        np.testing.assert_array_equal(again.tensors()[key].numpy(), trigger.tensors()[key].numpy())
    without = build_trigger("optimized", TINY, seed=3)
    without.fit(*attacker_data, progress=False)
    np.testing.assert_array_equal(without.perturbation(), trigger.perturbation())


def test_it_is_the_fit_the_activation_bench_makes_on_the_attackers_models(fitted, attacker_data):
    """The stage's pattern equals bench/activation_pattern.py's at the same weight: the models a plain fit
    leaves, the surrogate read through the bench's probe, the clean copy through its own."""
    trigger, info = fitted
    images, mask = attacker_data
    keep: dict = {}
    plain = build_trigger("optimized", TINY, seed=3)
    plain.fit(images, mask, progress=False, keep=keep)
    surrogate = surrogate_reader(keep["poisoned"][0].requires_grad_(False), keep["data"], mask,
                                 plain.params["clusters"], 3)
    clean = (keep["clean"], keep["clean_probe"])
    pool = keep["data"][np.flatnonzero(~mask)]
    expected = fit_activation_pattern(plain.perturbation().astype(np.float32), [surrogate], [clean], pool,
                                      TEST_TIME["linf"], TEST_TIME["test_weight"], TEST_TIME["test_steps"],
                                      TEST_TIME["test_step_size"], 3)
    np.testing.assert_array_equal(trigger.tensors()["test_pattern"].numpy(), expected)
    assert info["test_pattern"]["test_clean_copy_probe_hit_rate"] == hit_rate(clean, pool, expected)


def test_the_poisons_carry_the_poison_pattern_and_the_test_set_the_test_time_one(fitted, test_set):
    trigger, _ = fitted
    train = generate(200, seed=8)
    poisoned = poison_dataset(train, trigger, 0.05, 1, "clean_label", seed=0)
    chosen = poisoned.indices
    assert len(chosen)
    np.testing.assert_array_equal(poisoned.train.images[chosen], trigger.apply(train.images[chosen]))
    triggered = triggered_test_set(test_set, trigger, 1)
    others = test_set.images[test_set.labels != 1]
    np.testing.assert_array_equal(triggered.images, trigger.at_test_time().apply(others))
    assert not np.array_equal(triggered.images, trigger.apply(others))
    change = triggered.images.astype(int) - others.astype(int)
    assert np.abs(change).max() <= TEST_TIME["linf"]


def test_save_and_load_keep_both_patterns(fitted, tmp_path):
    trigger, _ = fitted
    save_trigger(trigger, tmp_path)
    loaded = load_trigger(tmp_path)
    for key in ("pattern", "test_pattern"):
        np.testing.assert_array_equal(loaded.tensors()[key].numpy(), trigger.tensors()[key].numpy())
    np.testing.assert_array_equal(loaded.at_test_time().perturbation(), trigger.at_test_time().perturbation())


@pytest.mark.parametrize("key, value", [("test_weight", -1), ("test_weight", "high"), ("test_steps", 0),
                                        ("test_steps", 2.5), ("test_step_size", 0), ("test_step_size", 1.5),
                                        ("test_labels", "yes")])
def test_bad_test_time_options_fail_with_one_line(key, value):
    with pytest.raises(ConfigError) as caught:
        build_trigger("optimized", {key: value}, seed=0)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_the_generated_trigger_has_no_test_time_pattern():
    with pytest.raises(ConfigError, match="test_weight"):
        build_trigger("generated", {"test_weight": 5.0}, seed=0)


def test_the_trigger_stage_saves_both_and_measures_the_test_time_patterns_visibility(tmp_path, monkeypatch):
    import yaml

    from stages.trigger import trigger as trigger_stage

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 300, "test_size": 100}
    params["trigger"]["params"].update(TEST_TIME)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    trigger_stage(tmp_path / "params.yaml", progress=False)
    metrics = json.loads((tmp_path / "metrics/trigger.json").read_text())
    saved = load_trigger(tmp_path / "data/trigger")
    assert not np.array_equal(saved.at_test_time().perturbation(), saved.perturbation())
    assert metrics["test_linf"] <= TEST_TIME["linf"] and metrics["linf"] <= TEST_TIME["linf"]
    assert 0 < metrics["test_ssim"] <= 1 and metrics["test_psnr"] > 20
    assert 0 <= metrics["test_surrogate_probe_hit_rate"] <= 1 and 0 <= metrics["poison_clean_copy_probe_hit_rate"] <= 1
    assert (tmp_path / "data/trigger/test_preview.png").stat().st_size > 0
    line = trigger_summary(metrics)  # the report's trigger section names both patterns
    assert f"PSNR {metrics['psnr']:.1f} dB" in line and f"PSNR {metrics['test_psnr']:.1f} dB" in line
    assert f"its clean copy {metrics['test_clean_copy_probe_hit_rate']:.3f}" in line


def test_with_labels_both_models_are_read_through_probes_on_them_as_the_bench_reads_them(attacker_data):
    images, mask = attacker_data
    classes = generate(300, seed=21).labels  # attacker_data's own labels; its target is class 0
    trigger = build_trigger("optimized", {**TEST_TIME, "test_labels": True}, seed=3)
    with pytest.raises(ValueError, match="labels"):
        trigger.fit(images, mask, progress=False)
    info = trigger.fit(images, mask, progress=False, labels=classes)
    keep: dict = {}
    plain = build_trigger("optimized", TINY, seed=3)
    plain.fit(images, mask, progress=False, keep=keep)
    np.testing.assert_array_equal(trigger.perturbation(), plain.perturbation())  # the poison pattern does not care
    given = torch.as_tensor(classes)  # target 0 already: the heads' classes are the labels themselves
    readers = [surrogate_reader(encoder, keep["data"], mask, plain.params["clusters"], 3, k, labels=given)
               for encoder, k in ((keep["poisoned"][0].requires_grad_(False), 0), (keep["clean"], CLEAN_COPY_HEAD))]
    pool = keep["data"][np.flatnonzero(~mask)]
    expected = fit_activation_pattern(plain.perturbation().astype(np.float32), readers[:1], readers[1:], pool,
                                      TEST_TIME["linf"], TEST_TIME["test_weight"], TEST_TIME["test_steps"],
                                      TEST_TIME["test_step_size"], 3)
    np.testing.assert_array_equal(trigger.tensors()["test_pattern"].numpy(), expected)
    assert info["test_pattern"]["test_clean_copy_probe_hit_rate"] == hit_rate(readers[1], pool, expected)


def test_pretraining_never_resumes_readings_of_another_test_time_pattern(tmp_path, monkeypatch):
    """The poisons stay the same when only the test-time pattern changes, so a pretraining checkpoint would
    match them; its learning curves, though, read the old pattern, so the stage must train afresh."""
    import yaml

    from stages.poison import poison
    from stages.pretrain import pretrain
    from stages.trigger import trigger as trigger_stage

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 300, "test_size": 100}
    params["trigger"]["params"].update(TINY)
    params["pretrain"].update(epochs=1, width=4, batch_size=64, eval_every=1, eval_bank_size=100, warmup_epochs=0,
                              device="cpu")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    trigger_stage(tmp_path / "params.yaml", progress=False)
    poison(tmp_path / "params.yaml")

    def resumed() -> int:
        pretrain(tmp_path / "params.yaml", progress=False)
        return json.loads((tmp_path / "metrics/pretrain.json").read_text())["resumed_epochs"]

    assert resumed() == 0 and resumed() == 1  # the same run again resumes its checkpoint
    saved = load_trigger(tmp_path / "data/trigger")
    other = build_trigger("optimized", {**saved.params, "test_weight": 1.0}, seed=saved.seed)
    pattern = saved.tensors()["pattern"]
    other.set_tensors({"pattern": pattern, "test_pattern": -pattern})
    save_trigger(other, tmp_path / "data/trigger")  # the same poisons, another test-time pattern
    assert resumed() == 0
