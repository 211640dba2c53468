"""`cba trigger`: build the trigger from params, save it and a preview."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cba.data import DATASETS
from cba.triggers import TRIGGERS, build_trigger, save_trigger
from cba.triggers.preview import save_preview
from stages.common import PARAMS_OPTION, TRIGGER_DIR, load_split, one_line_errors
from stages.params import Params


@one_line_errors
def trigger(params_path: Path = PARAMS_OPTION) -> None:
    """Build the trigger named by trigger.name; write data/trigger/ (safetensors + preview.png)."""
    params = Params.load(params_path)
    params.section("trigger", ["name", "params"])
    params.choice("data.name", DATASETS.names(), "synthetic")
    name = params.choice("trigger.name", TRIGGERS.names())
    seed = params.integer("seed", 0)
    trig = build_trigger(name, params.section("trigger.params"), seed=seed)
    test = load_split(params, "test")
    if test.images.shape[1] != trig.image_size:
        trig = build_trigger(name, params.section("trigger.params"), seed=seed, image_size=test.images.shape[1])
    save_trigger(trig, TRIGGER_DIR)
    rng = np.random.default_rng(seed)
    sample = test.images[rng.choice(len(test), size=min(4, len(test)), replace=False)]
    save_preview(trig, sample, TRIGGER_DIR / "preview.png", n=len(sample), rng=rng)
    print(f"trigger {name} -> {TRIGGER_DIR}/")
