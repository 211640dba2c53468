"""`cba defend NAME`: run one defense against the attack the pipeline built."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from cba.attack import downstream_classifier
from cba.defenses import DEFENSES, AttackRecord, Classifier, build_defense
from cba.env import environment
from cba.evaluate import LinearProbe
from cba.io import load_tensors, write_json
from cba.poison import triggered_test_set
from cba.ssl.io import load_method
from cba.triggers import load_trigger
from stages.common import (FINETUNE_DIR, MANIFEST_COLUMNS, METRICS_DIR, PARAMS_OPTION, POISON_DIR, PRETRAIN_DIR,
                           TRIGGER_DIR, check_outputs, check_target, load_stage_set, one_line_errors, read_table)
from stages.params import Params

DEFENSE_DIR = METRICS_DIR / "defense"


def load_attack_record(params: Params) -> AttackRecord:
    """Assemble the attack's one record from the DVC artifacts of the earlier stages."""
    seed, target = params.integer("seed", 0, low=0, high=2**32 - 1), params.integer("target_class", low=0)
    method, meta = load_method(PRETRAIN_DIR / "model.safetensors")
    train, clean, test = load_stage_set("train"), load_stage_set("clean_train"), load_stage_set("test")
    check_target(target, clean)
    trigger = load_trigger(TRIGGER_DIR)
    manifest = read_table(POISON_DIR / "manifest.parquet", MANIFEST_COLUMNS)
    if getattr(method, "uses_labels", False):
        classifier = downstream_classifier(method, clean)
    else:
        state = load_tensors(FINETUNE_DIR / "probe.safetensors")
        probe = LinearProbe(state["mean"], state["std"], state["linear.weight"].shape[0])
        probe.load_state_dict(state)
        classifier = Classifier(method.encoder, probe.eval()).eval()
    return AttackRecord(
        encoder=method.encoder, classifier=classifier, train=train, clean_train=clean, test=test,
        triggered=triggered_test_set(test, trigger, target, seed), poisoned=manifest["poisoned"].to_numpy(),
        target_class=target, trigger=trigger, method=meta["method"],
        losses=read_table(PRETRAIN_DIR / "losses.parquet", ("epoch", "index", "poisoned", "loss")), model_state=method.state_dict(), seed=seed,
        extra={"backbone": meta["backbone"], "width": int(meta["width"]), "hparams": json.loads(meta["hparams"])},
    )


@one_line_errors
def defend(
    name: str = typer.Argument(..., help="The defense to run: one of the names under `defenses:` in params.yaml."),
    params_path: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run one defense; write metrics/defense/NAME.json in the schema of its kind."""
    params = Params.load(params_path)
    check_outputs(METRICS_DIR / "defense")
    DEFENSES.get(name, key="defenses")
    defense = build_defense(name, **params.section(f"defense.{name}"))
    record = load_attack_record(params)
    started = time.perf_counter()
    result = defense.run(record, progress=progress)
    write_json(DEFENSE_DIR / f"{name}.json", {
        "defense": name, "kind": defense.kind, **result, "seconds": time.perf_counter() - started,
        "attack": {"method": record.method, "trigger": record.trigger.name, "poisoned": int(record.poisoned.sum()),
                   "target_class": record.target_class},
        "env": environment("cpu"),
    })
    print(f"defense {name} ({defense.kind}) -> {DEFENSE_DIR / (name + '.json')}")
