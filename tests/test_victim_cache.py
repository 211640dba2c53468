"""The victim cache: a victim trained once is loaded, not retrained, and only when nothing it depends on changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cba.attack
from cba.attack import run_attack
from cba.data.synthetic import generate
from cba.triggers import build_trigger
from cba.victim_cache import victim_key

TINY = {"method": "supervised", "mode": "dirty_label", "poison_rate": 0.1, "target_class": 0, "width": 4,
        "epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 0}


@pytest.fixture(scope="module")
def data():
    return generate(96, seed=21), generate(40, seed=22)


@pytest.fixture
def trainings(monkeypatch):
    """Counts the trainings run_attack starts (the real training runs)."""
    calls = []
    real = cba.attack.train

    def counted(*args, **kwargs):
        calls.append(kwargs.get("progress"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cba.attack, "train", counted)
    return calls


def same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_cached_victim_is_loaded_not_retrained(data, tmp_path, trainings):
    trigger = build_trigger("patch", {"size": 3}, seed=0)
    first = run_attack(*data, trigger, **TINY, cache=tmp_path)
    again = run_attack(*data, trigger, **TINY, cache=tmp_path)
    assert len(trainings) == 1 and len(list(tmp_path.iterdir())) == 1
    assert same_weights(first, again) and again.baseline == first.baseline
    # In the layout training left the fresh one in, so that both read images to the same bits.
    layouts = [{name: p.is_contiguous(memory_format=torch.channels_last) for name, p in r.model.named_parameters()
                if p.dim() == 4} for r in (first, again)]
    assert layouts[0] == layouts[1] and all(layouts[0].values())
    assert again.losses.equals(first.losses) and again.curves == first.curves
    np.testing.assert_array_equal(again.poisoned, first.poisoned)
    # The final loss, which a bench prints beside every ASR, is the last epoch's mean over its samples.
    last = first.losses[first.losses["epoch"] == TINY["epochs"]]
    assert np.isfinite(first.final_loss) and first.final_loss == pytest.approx(float(last["loss"].mean()))
    assert again.final_loss == first.final_loss
    # Without a cache the same settings train the same victim: the cache changes nothing but the time.
    uncached = run_attack(*data, trigger, **TINY)
    assert len(trainings) == 2 and same_weights(first, uncached) and uncached.baseline == first.baseline


def test_any_change_to_what_the_victim_depends_on_trains_a_new_one(data, tmp_path, trainings):
    trigger = build_trigger("patch", {"size": 3}, seed=0)
    run_attack(*data, trigger, **TINY, cache=tmp_path)
    run_attack(*data, trigger, **{**TINY, "epochs": 2}, cache=tmp_path)
    run_attack(*data, build_trigger("patch", {"size": 4}, seed=0), **TINY, cache=tmp_path)  # other poisons
    run_attack(generate(96, seed=23), data[1], trigger, **TINY, cache=tmp_path)  # other training data
    run_attack(data[0], generate(40, seed=24), trigger, **TINY, cache=tmp_path)  # other test data: other ACC/ASR
    assert len(trainings) == 5 and len(list(tmp_path.iterdir())) == 5


def test_one_clean_victim_serves_every_trigger_and_target(data, tmp_path, trainings):
    clean = {**TINY, "poison_rate": 0.0}
    first = run_attack(*data, build_trigger("patch", {"size": 3}, seed=0), **clean, cache=tmp_path)
    other = build_trigger("blend", {}, seed=0)
    again = run_attack(*data, other, **{**clean, "target_class": 2}, cache=tmp_path)
    assert len(trainings) == 1 and same_weights(first, again)
    assert again.trigger is other and again.target_class == 2  # the record reads the trigger it was given


@pytest.mark.parametrize("damage, retrained", [("asr", False), ("acc", True)])
def test_a_clean_victim_is_checked_by_its_accuracy_alone(data, tmp_path, trainings, damage, retrained):
    # Its stored ASR was read with the trigger it was first trained beside; another trigger reads another ASR.
    clean = {**TINY, "poison_rate": 0.0}
    first = run_attack(*data, build_trigger("patch", {"size": 3}, seed=0), **clean, cache=tmp_path)
    entry, = tmp_path.iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    meta["baseline"][damage] += 0.5
    (entry / "meta.json").write_text(json.dumps(meta))
    again = run_attack(*data, build_trigger("blend", {}, seed=0), **clean, cache=tmp_path)
    assert len(trainings) == 1 + retrained and same_weights(first, again)


def test_the_key_covers_the_code(data):
    trigger = build_trigger("patch", {"size": 3}, seed=0)
    device = torch.device("cpu")
    key = lambda code: victim_key(TINY, *data, trigger, device, code=code)  # noqa: E731
    assert key("a") != key("b") and key("a") == key("a")


@pytest.mark.parametrize("damage", ["weights", "baseline"])
def test_a_damaged_entry_is_retrained_and_replaced(data, tmp_path, trainings, damage):
    trigger = build_trigger("patch", {"size": 3}, seed=0)
    first = run_attack(*data, trigger, **TINY, cache=tmp_path)
    entry, = tmp_path.iterdir()
    if damage == "weights":
        (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    else:  # weights that no longer give the stored ACC/ASR
        meta = json.loads((entry / "meta.json").read_text())
        meta["baseline"] = {k: v + 0.5 for k, v in meta["baseline"].items()}
        (entry / "meta.json").write_text(json.dumps(meta))
    again = run_attack(*data, trigger, **TINY, cache=tmp_path)
    assert len(trainings) == 2 and same_weights(first, again) and again.baseline == first.baseline
    assert run_attack(*data, trigger, **TINY, cache=tmp_path).baseline == first.baseline and len(trainings) == 2


def test_a_run_with_an_evaluate_hook_is_never_cached(data, tmp_path, trainings):
    trigger = build_trigger("patch", {"size": 3}, seed=0)
    for _ in range(2):
        run_attack(*data, trigger, **TINY, cache=tmp_path, evaluate=lambda encoder, epoch: {})
    assert len(trainings) == 2 and not list(tmp_path.iterdir())
