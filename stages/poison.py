"""`cba poison`: choose the poisoned indices, apply the trigger, write the data sets."""

from __future__ import annotations

from pathlib import Path

from cba.data.io import save_imageset
from cba.io import write_parquet
from cba.poison import MODES, poison_dataset, validate_poison
from cba.triggers import load_trigger
from cba.errors import in_section
from stages.common import (DETAILS_DIR, METRICS_DIR, PARAMS_OPTION, POISON_DIR, TRIGGER_DIR, check_outputs, load_split,
                           one_line_errors, write_metrics)
from stages.params import Params


@one_line_errors
def poison(params_path: Path = PARAMS_OPTION) -> None:
    """Poison the training set; write data/poisoned/ (train, clean_train, test, manifest.parquet)."""
    params = Params.load(params_path)
    check_outputs(POISON_DIR, METRICS_DIR, DETAILS_DIR)
    seed = params.integer("seed", 0, low=0, high=2**32 - 1)
    rate = params.number("poison_rate", low=0.0, high=1.0)
    target = params.integer("target_class", low=0)
    mode = params.choice("poison.mode", ("auto", *MODES), "auto")
    if mode == "auto":
        # The supervised baseline is BadNets (dirty label); SSL attacks are clean label.
        mode = "dirty_label" if params.raw("pretrain.method", "simclr") == "supervised" else "clean_label"
    trig = load_trigger(TRIGGER_DIR)
    train, test = load_split(params, "train"), load_split(params, "test")
    with in_section("poison", ["mode"]):
        count = validate_poison(train.labels, train.num_classes, rate, target, mode)
    poisoned = poison_dataset(train, trig, rate, target, mode, seed)
    save_imageset(POISON_DIR / "train.safetensors", poisoned.train)
    save_imageset(POISON_DIR / "clean_train.safetensors", train)
    save_imageset(POISON_DIR / "test.safetensors", test)
    write_parquet(POISON_DIR / "manifest.parquet", poisoned.manifest())
    write_metrics("poison", {
        "poisoned": count, "train_size": len(train), "test_size": len(test), "mode": mode,
        "target_class": target, "trigger": trig.name, "classes": train.classes,
    })
    print(f"poisoned {count}/{len(train)} training images ({mode}, target {target}) -> {POISON_DIR}/")
