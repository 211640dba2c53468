"""`cba trigger`: build (and, for a learned trigger, fit) the trigger; save it, a preview and its stealth figures."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from cba.data import DATASETS
from cba.errors import ConfigError
from cba.evaluate import pick_device
from cba.io import write_csv
from cba.triggers import save_trigger
from cba.triggers.fitting import fit_trigger
from cba.triggers.preview import save_preview
from cba.triggers.stealth import stealth_metrics
from stages.common import (PROGRESS_OPTION, DETAILS_DIR, METRICS_DIR, PARAMS_OPTION, PLOTS_DIR, TRIGGER_DIR, check_outputs, load_split,
                           trigger_from_params, trigger_section,
                           one_line_errors, write_metrics)
from stages.params import Params

STEALTH_IMAGES = 500  # test images the visibility figures average over


@one_line_errors
def trigger(params_path: Path = PARAMS_OPTION, progress: bool = PROGRESS_OPTION) -> None:
    """Build the trigger named by trigger.name (fitting a learned one); write data/trigger/ and metrics/trigger.json."""
    params = Params.load(params_path)
    check_outputs(TRIGGER_DIR, METRICS_DIR, DETAILS_DIR, PLOTS_DIR)
    params.section("trigger", ["name", "params"])
    params.choice("data.name", DATASETS.names(), "synthetic")
    seed = params.integer("seed", 0, low=0, high=2**32 - 1)
    target = params.integer("target_class", low=0)
    trig = trigger_from_params(params, seed)
    name = trig.name
    test = load_split(params, "test")
    if test.images.shape[1] != trig.image_size:
        trig = trigger_from_params(params, seed, image_size=test.images.shape[1])
    metrics: dict = {}
    if trig.learns_from_data:
        train = load_split(params, "train")
        if target >= train.num_classes:
            raise ConfigError("target_class", target, f"an integer in [0, {train.num_classes - 1}]")
        started = time.perf_counter()
        with trigger_section(params):
            fitted = fit_trigger(trig, train.images, train.labels, target, seed, device=pick_device("auto"), progress=progress)
        history = pd.DataFrame(fitted["history"])
        # hit rate: the share of triggered images the attacker's own surrogate sends to the target (a proxy of ASR);
        # clean hit rate: the same on a copy that never saw a poison (a proxy of what the pattern does on its own);
        # clean probe hit rate: that copy read through a linear probe, as the victim's probe reads.
        last = fitted["history"][-1]
        metrics.update(final_objective=fitted["final_objective"], surrogate_hit_rate=last["hit_rate"],
                       surrogate_clean_hit_rate=last["clean_hit_rate"],
                       surrogate_clean_probe_hit_rate=last["clean_probe_hit_rate"],
                       # test_weight > 0: both models read through probes, with the poison and the test-time pattern
                       **fitted.get("test_pattern", {}),
                       fit_seconds=time.perf_counter() - started)
    else:
        history = pd.DataFrame(columns=["round", "target", "agree", "objective"])  # a fixed trigger learns nothing
    rng = np.random.default_rng(seed)
    sample = test.images[rng.choice(len(test), size=min(STEALTH_IMAGES, len(test)), replace=False)]
    metrics.update(stealth_metrics(trig, sample, rng=np.random.default_rng([seed, 1])))
    at_test = trig.at_test_time()
    if at_test is not trig:  # the test inputs carry another pattern, within the same budget: its visibility too
        visibility = stealth_metrics(at_test, sample, rng=np.random.default_rng([seed, 1]))
        metrics.update({f"test_{k}": v for k, v in visibility.items()})
    save_trigger(trig, TRIGGER_DIR)
    write_csv(PLOTS_DIR / "trigger_objective.csv", history)
    save_preview(trig, sample[:4], TRIGGER_DIR / "preview.png", n=min(4, len(sample)), rng=rng)
    if at_test is not trig:
        save_preview(at_test, sample[:4], TRIGGER_DIR / "test_preview.png", n=min(4, len(sample)),
                     rng=np.random.default_rng([seed, 2]),
                     title=f"test-time pattern of trigger '{name}' (test_weight={trig.params['test_weight']:g})")
    write_metrics("trigger", metrics)
    print(f"trigger {name}: L-inf {metrics['linf']:.1f}/255, PSNR {metrics['psnr']:.1f} dB, SSIM {metrics['ssim']:.3f} -> {TRIGGER_DIR}/")
