"""`cba analyze`: learning dynamics (claim 1) and feature entanglement (claim 2) of the pretrained attack.

Reads what poison and pretrain wrote; trains nothing.

- Dynamics, from data/pretrain/losses.parquet and plots/pretrain_knn.csv: per
  epoch, the loss of poisoned, clean target-class and other clean samples
  (plots/analysis_loss_groups.csv, wide: one mean column per group, for
  `dvc plots`; the quartiles are in data/analysis/loss_groups.csv), and how well
  a low loss singles out poisoned samples (plots/analysis_loss_auroc.csv).
- Entanglement, from the encoder's features of the TRAINING images the victim
  saw: all poisoned samples against the clean target-class samples (capped at
  max_points), and a 2-D embedding of a max_points subsample that keeps every
  poisoned sample (data/analysis/embedding.png).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cba import analysis  # its functions load on first use: the params check imports this module too
from cba.analysis.embedding import METHODS as EMBEDDINGS
from cba.env import environment
from cba.errors import ConfigError
from cba.evaluate import extract_features
from cba.io import write_csv
from cba.models.io import encoder_metadata, load_encoder
from stages.common import (DETAILS_DIR, ANALYSIS_DIR, METRICS_DIR, PARAMS_OPTION, PLOTS_DIR, POISON_DIR, PRETRAIN_DIR,
                           check_outputs, load_stage_set, one_line_errors, read_table, write_metrics, MANIFEST_COLUMNS)
from stages.params import Params


KEYS = ("embedding", "max_points", "folds", "tsne_iter")


def read_config(params: Params) -> dict[str, Any]:
    params.section("analyze", KEYS)
    return {
        "embedding": params.choice("analyze.embedding", EMBEDDINGS, "tsne"),
        "max_points": params.integer("analyze.max_points", 2000, low=10),
        "folds": params.integer("analyze.folds", 5, low=2),
        "tsne_iter": params.integer("analyze.tsne_iter", 1000, low=250),
        "target_class": params.integer("target_class", low=0),
        "seed": params.integer("seed", 0, low=0, high=2**32 - 1),
    }


def _clean(value: Any) -> Any:
    """NaN -> None everywhere, so the metrics file is strict JSON that DVC can read."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def analyze_dynamics(losses: pd.DataFrame, labels: np.ndarray, curves: list[dict], target: int) -> dict[str, Any]:
    """Write the loss-group and loss-AUROC tables and plots; return the dynamics summary."""
    groups = analysis.loss_groups(losses, labels, target)
    auroc = analysis.loss_auroc(losses)
    wide = groups.pivot(index="epoch", columns="group", values="mean")[list(analysis.GROUPS)].reset_index()
    write_csv(PLOTS_DIR / "analysis_loss_groups.csv", wide)
    write_csv(PLOTS_DIR / "analysis_loss_auroc.csv", auroc)
    write_csv(ANALYSIS_DIR / "loss_groups.csv", groups)
    analysis.plot_loss_groups(groups, ANALYSIS_DIR / "loss_groups.png")
    analysis.plot_loss_auroc(auroc, curves, ANALYSIS_DIR / "loss_auroc.png")
    summary = analysis.summarize_dynamics(losses, curves)
    backdoor, clean = summary["backdoor_epoch"], summary["clean_epoch"]
    # > 0: the backdoor was learned that many epochs before the clean task (the supervised signature).
    summary["backdoor_lead_epochs"] = clean - backdoor if backdoor is not None and clean is not None else None
    summary["epochs"] = int(losses["epoch"].max()) if len(losses) else 0
    return summary


def feature_rows(poisoned: np.ndarray, labels: np.ndarray, target: int, max_points: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows embedded, rows for the entanglement metrics): all poisoned, capped clean target."""
    embedded = analysis.choose_points(len(labels), poisoned, max_points, seed)
    clean_target = np.flatnonzero(~poisoned & (labels == target))
    if len(clean_target) > max_points:
        clean_target = np.random.default_rng([seed, 0xE47]).choice(clean_target, size=max_points, replace=False)
    return embedded, np.sort(np.concatenate([np.flatnonzero(poisoned), clean_target]))


@one_line_errors
def analyze(params_path: Path = PARAMS_OPTION) -> None:
    """Learning dynamics and feature entanglement of the attack; write metrics/analysis.json and plots."""
    params = Params.load(params_path)
    check_outputs(ANALYSIS_DIR, METRICS_DIR, DETAILS_DIR, PLOTS_DIR)
    config = read_config(params)
    target, seed = config["target_class"], config["seed"]
    started = time.perf_counter()

    manifest = read_table(POISON_DIR / "manifest.parquet", MANIFEST_COLUMNS)
    losses = read_table(PRETRAIN_DIR / "losses.parquet", ("epoch", "index", "poisoned", "loss"))
    curves = read_table(PLOTS_DIR / "pretrain_knn.csv", ("epoch",)).to_dict("records")
    labels = manifest["original_label"].to_numpy()  # true classes: where poisoned samples came from
    poisoned = manifest["poisoned"].to_numpy(dtype=bool)
    if not 0 <= target < int(labels.max()) + 1:
        raise ConfigError("target_class", target, f"an integer in [0, {int(labels.max())}]")
    print(f"analyze: learning dynamics of {losses['epoch'].nunique()} epochs x {len(manifest)} samples")
    dynamics = analyze_dynamics(losses, labels, curves, target)

    meta = encoder_metadata(PRETRAIN_DIR / "encoder.safetensors")
    encoder = load_encoder(PRETRAIN_DIR / "encoder.safetensors")
    train = load_stage_set("train")
    if len(train) != len(manifest):
        raise ConfigError("path", str(POISON_DIR), f"train set has {len(train)} images but the manifest {len(manifest)} rows")
    embedded, measured = feature_rows(poisoned, labels, target, config["max_points"], seed)
    rows = np.union1d(embedded, measured)
    print(f"analyze: encoder features of {len(rows)} training images")
    features = extract_features(encoder, train.images[rows]).numpy()
    position = np.searchsorted(rows, measured)
    entanglement = analysis.entanglement_metrics(features[position], poisoned[measured], labels[measured], target,
                                        folds=config["folds"], seed=seed)
    print(f"analyze: {config['embedding']} embedding of {len(embedded)} points")
    coords, chosen = analysis.embed_2d(features[np.searchsorted(rows, embedded)], config["embedding"], seed=seed,
                              max_points=config["max_points"], poisoned=poisoned[embedded],
                              max_iter=config["tsne_iter"])
    points = embedded[chosen]
    mode = ("composite" if "partner" in manifest else
            "dirty_label" if (manifest["label"] != manifest["original_label"]).any() else "clean_label")
    method = meta.get("method", "unknown")
    analysis.plot_embedding(coords, labels[points], poisoned[points], train.classes, ANALYSIS_DIR / "embedding.png",
                   title=f"{method}, {mode}: training features ({config['embedding']}), target {target}")

    seconds = time.perf_counter() - started
    write_metrics("analysis", _clean({
        "dynamics": dynamics,
        "entanglement": entanglement,
        "embedding": {"method": config["embedding"], "points": int(len(points))},
        "method": method, "poison_mode": mode, "target_class": target,
        "augmentation_protocol": "per_batch" if meta.get("per_batch") == "True" else "per_sample",
        "seconds": seconds, "env": environment("cpu"),
    }))
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"  # noqa: E731
    print(f"analyze {method}: max loss AUROC {fmt(dynamics['max_loss_auroc'])}, backdoor epoch "
          f"{dynamics['backdoor_epoch']} vs clean epoch {dynamics['clean_epoch']}; feature separability AUROC "
          f"{fmt(entanglement['separability_auroc'])}, silhouette {fmt(entanglement['silhouette'])} in {seconds:.0f}s")
