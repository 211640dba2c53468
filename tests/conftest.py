"""Shared fixtures: small data and a backdoored supervised model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The cores are shared by every test worker (pytest-xdist): one worker's torch gets its share of them,
# so OpenMP threads never outnumber the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_configure(config) -> None:
    """ART writes its config file (~/.art/config.json) on first import, and on a fresh machine two test workers
    importing it at once race: one sees the file the other is writing and fails with a NameError inside
    art/config.py. Imported once here, in the controller before any worker starts, ART writes it for all."""
    if hasattr(config, "workerinput") or (Path.home() / ".art" / "config.json").exists():
        return
    try:
        import art.config  # noqa: F401
    except ImportError:  # without ART its tests skip
        pass


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored afterwards: tiny tensors gain nothing from a second one, and
    an in-process re-reading of a stage's figures must sum in the order the stages' one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LONGEST_FIRST = ("test_pipeline_e2e.py", "test_benches_on_pipeline.py")
# The slow tier: whole pipelines, several processes, bench scripts and trained fixtures. `pytest -m "not slow"`
# runs the rest (the fast tier) in under a minute; plain `pytest`, as CI runs it, runs both.
SLOW_FILES = {"test_pipeline_e2e.py", "test_benches_on_pipeline.py", "test_poison_scale.py",
              "test_distributed.py", "test_bench_smoke.py",
              "test_trigger_test_time.py",
              "test_bench_attack_levers.py", "test_analyze_stage.py", "test_art_oracle.py", "test_defense_dbd.py",
              "test_defenses_detection.py", "test_defenses_model.py", "test_trigger_optimized.py",
              "test_trigger_generated.py"}
SLOW_FIXTURES = {"supervised_badnets"}
SLOW_TESTS = {"test_ctrl_c_in_pretraining_is_one_line_and_the_run_resumes", "test_abl_on_a_contrastive_encoder",
              "test_a_run_reads_the_untrained_encoder_then_the_trained_one",
              "test_a_run_reads_pixels_the_untrained_and_a_trained_encoder_and_what_the_trigger_moves"}


def pytest_collection_modifyitems(items: list) -> None:
    """Mark the slow tier; start the longest file first, so that under xdist it runs beside the others."""
    for item in items:
        if (item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


# A learned trigger small enough to fit in seconds on two cores, large enough that the objective has something to
# learn; `attacker_data` is what it is fitted on.
TINY_TRIGGER = {"linf": 8, "surrogate_size": 300, "surrogate_epochs": 2, "surrogate_width": 4, "rounds": 2,
                "trigger_steps": 8, "batch_size": 32}


@pytest.fixture(scope="session")
def attacker_data():
    from cba.data.synthetic import generate

    data = generate(300, seed=21)
    return data.images, data.labels == 0


def fit_tiny(name: str, attacker_data, seed: int = 3):
    """The learned trigger `name` at TINY_TRIGGER, fitted on `attacker_data`: (trigger, the fit's figures)."""
    from cba.triggers import build_trigger

    trigger = build_trigger(name, TINY_TRIGGER, seed=seed)
    return trigger, trigger.fit(*attacker_data, progress=False)


@pytest.fixture(scope="session")
def small_synthetic():
    from cba.data.synthetic import generate

    return generate(2000, seed=11), generate(500, seed=12)


# BadNets (dirty-label 4x4 checkerboard patch, 5%) on a supervised ConvNet. Small batches and a higher rate: 12 quick
# epochs reach ACC ~0.6 with ASR ~0.99, so the defenses are judged on a model that learned both the task and the backdoor.
BADNETS = {"method": "supervised", "mode": "dirty_label", "poison_rate": 0.05, "target_class": 0, "backbone": "convnet",
           "width": 16, "epochs": 12, "batch_size": 64, "lr": 0.1, "seed": 0}


@pytest.fixture(scope="session")
def supervised_badnets(small_synthetic, tmp_path_factory, worker_id):
    """The BadNets attack record: the setting where the literature says every defense works.

    Under xdist the first worker that needs it trains it and leaves it in a victim cache (`cba.victim_cache`) in
    the session's shared temporary folder; the others rebuild the same record from it instead of training it
    again (one training per session, not one per worker)."""
    from filelock import FileLock

    from cba.attack import run_attack
    from cba.triggers import build_trigger

    train, test = small_synthetic
    trigger = build_trigger("patch", {"size": 4}, seed=0)
    if worker_id == "master":
        return run_attack(train, test, trigger, **BADNETS)
    # The victim cache keys the record by its settings, data, trigger and code, and checks on loading that
    # the rebuilt record's ACC/ASR baseline equals the trained one.
    cache = tmp_path_factory.getbasetemp().parent / "victims"
    with FileLock(f"{cache}.lock"):
        return run_attack(train, test, trigger, **BADNETS, cache=cache)
