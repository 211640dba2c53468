"""`cba defend NAME`: run one defense against the attack the pipeline built."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from cba.defenses import DEFENSES
from cba.env import environment
from cba.defenses.plots import defense_plot_tables
from cba.io import write_csv
from cba.probe import load_probe
from cba.record import AttackRecord, build_record, own_head
from cba.ssl.io import load_method
from cba.triggers import load_trigger
from stages.common import (PROGRESS_OPTION, DETAILS_DIR, PLOTS_DIR, FINETUNE_DIR, METRICS_DIR, PARAMS_OPTION, PRETRAIN_DIR,
                           TRIGGER_DIR, check_outputs, check_target, defense_from_params, defense_section, load_stage_set, one_line_errors,
                           read_table, write_metrics, read_manifest)
from stages.params import Params

DEFENSE_DIR = METRICS_DIR / "defense"


def load_attack_record(params: Params) -> AttackRecord:
    """Assemble the attack's one record from the DVC artifacts of the earlier stages."""
    seed, target = params.integer("seed", 0, low=0, high=2**32 - 1), params.integer("target_class", low=0)
    method, meta = load_method(PRETRAIN_DIR / "model.safetensors")
    train, clean, test = load_stage_set("train"), load_stage_set("clean_train"), load_stage_set("test")
    check_target(target, clean)
    trigger = load_trigger(TRIGGER_DIR)
    manifest = read_manifest(len(train))
    probe = None if own_head(method) is not None else load_probe(FINETUNE_DIR / "probe.safetensors")
    return build_record(
        method, method=meta["method"], backbone=meta["backbone"], width=int(meta["width"]), hparams=json.loads(meta["hparams"]),
        train=train, clean_train=clean, test=test, trigger=trigger, poisoned=manifest["poisoned"].to_numpy(),
        target_class=target, seed=seed, probe=probe,
        losses=read_table(PRETRAIN_DIR / "losses.parquet", ("epoch", "index", "poisoned", "loss")),
    )


def write_plot_tables(folder: Path, tables: dict) -> None:
    """One CSV per table; tables an earlier run of this defense wrote and this one did not are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.csv"):
        if stale.stem not in tables:
            stale.unlink()
    for table, frame in tables.items():
        write_csv(folder / f"{table}.csv", frame)


def key_figures(result: dict) -> str:
    """One line of the figures that rate a defense, for the log."""
    parts = []
    if result.get("auroc") is not None:
        parts.append(f"AUROC {result['auroc']:.3f}")
    if result.get("tpr") is not None and result.get("fpr") is not None:
        parts.append(f"TPR {result['tpr']:.3f} FPR {result['fpr']:.3f}")
    if "target_flagged" in result:
        index = result.get("target_anomaly_index")
        parts.append(f"target {'flagged' if result['target_flagged'] else 'not flagged'}"
                     + (f" (anomaly index {index:.2f})" if index is not None else ""))
    if result.get("asr_after") is not None:
        parts.append(f"ACC {result['acc_before']:.3f} -> {result['acc_after']:.3f}, "
                     f"ASR {result['asr_before']:.3f} -> {result['asr_after']:.3f}, DER {result.get('der', float('nan')):.3f}")
    return "; ".join(parts) or "no figures"


@one_line_errors
def defend(
    name: str = typer.Argument(..., help=f"The defense to run, one of: {', '.join(DEFENSES.names())}. "
                               "`dvc repro` runs one per entry of `defenses:` in params.yaml."),
    params_path: Path = PARAMS_OPTION,
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Run one defense; write metrics/defense/NAME.json in the schema of its kind."""
    params = Params.load(params_path)
    check_outputs(METRICS_DIR / "defense", DETAILS_DIR / "defense", PLOTS_DIR / "defense" / name)
    defense = defense_from_params(params, name)  # an unknown name is named as `defense=` before any work
    record = load_attack_record(params)
    started = time.perf_counter()
    with defense_section(name):  # an option that fails only at run time is still named where params.yaml has it
        result = defense.run(record, progress=progress)
    write_metrics(f"defense/{name}", {
        "defense": name, "kind": defense.kind, **result, "seconds": time.perf_counter() - started,
        "attack": {"method": record.method, "trigger": record.trigger.name, "poisoned": int(record.poisoned.sum()),
                   "target_class": record.target_class},
        "env": environment("cpu"),
    })
    write_plot_tables(PLOTS_DIR / "defense" / name, defense_plot_tables(result))
    print(f"defense {name} ({defense.kind}): {key_figures(result)} -> {DEFENSE_DIR / (name + '.json')}")
