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


# Every method and poisoning mode through run_attack, saved to a cache and loaded back, in a fresh interpreter:
# the cba modules it then holds are those a victim's training and readings can run.
_LOADED_BY_VICTIMS = """
import json, sys, tempfile
import numpy as np
from cba.attack import run_attack
from cba.data.synthetic import generate
from cba.ssl.registry import METHODS
from cba.triggers import build_trigger
from cba.triggers.optimized import OptimizedTrigger

train, test = generate(96, seed=21), generate(40, seed=22)
pattern = OptimizedTrigger.from_pattern(np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype("float32"), 8.0, 0)
runs = [(method, mode, rate, pattern) for method in METHODS.names()
        for mode, rate in (("dirty_label", 0.1), ("composite", 0.05), ("clean_label", 0.0))]
runs.append(("simclr", "clean_label", 0.05, build_trigger("patch", {}, seed=0)))  # every trigger module is imported
with tempfile.TemporaryDirectory() as cache:
    for method, mode, rate, trigger in runs:
        for _ in range(2):  # trained and saved, then loaded
            run_attack(train, test, trigger, method=method, mode=mode, poison_rate=rate, target_class=0, width=4,
                       epochs=1, batch_size=32, seed=0, cache=cache)
print(json.dumps(sorted(m.__file__ for name, m in sys.modules.items()
                        if (name == "cba" or name.startswith("cba.")) and getattr(m, "__file__", None))))
"""


def test_the_cache_key_covers_every_module_a_victim_runs():
    """The key digests `VICTIM_CODE`, not the whole package: a module a victim loads but the list leaves out
    would let a cache serve weights trained by other code."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import cba
    from cba.victim_cache import VICTIM_CODE

    done = subprocess.run([sys.executable, "-c", _LOADED_BY_VICTIMS], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    root = Path(cba.__file__).parent
    loaded = [Path(path).relative_to(root) for path in json.loads(done.stdout.strip().splitlines()[-1])]
    assert len(loaded) > 30  # the run reached the training code, not just the imports
    entries = [Path(entry) for entry in VICTIM_CODE]
    assert [str(path) for path in loaded if not any(path == e or e in path.parents for e in entries)] == []


def test_editing_a_module_no_victim_runs_keeps_the_key_and_editing_training_code_changes_it(tmp_path):
    import shutil
    from pathlib import Path

    import cba
    from cba.env import source_digest
    from cba.victim_cache import VICTIM_CODE

    copy = tmp_path / "cba"
    shutil.copytree(Path(cba.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_digest(copy, entries=VICTIM_CODE)
    with open(copy / "readings.py", "a") as readings:
        readings.write("\n# an edit to the benches' readings\n")
    assert source_digest(copy, entries=VICTIM_CODE) == before
    for edited in ("train.py", "ssl/simclr.py", "triggers/base.py", "poison.py"):
        with open(copy / edited, "a") as source:
            source.write("\n# an edit\n")
        assert source_digest(copy, entries=VICTIM_CODE) != before, edited
        before = source_digest(copy, entries=VICTIM_CODE)
