"""Learning dynamics: do poisoned samples get learned earlier than clean ones? (claim 1)

Input is the per-sample loss log written by pretraining: a DataFrame with
columns ``epoch`` (1-based), ``index``, ``poisoned`` (bool) and ``loss``.

- ``loss_groups``: loss statistics per epoch for three groups: poisoned,
  clean samples of the target class, and the other clean samples. In a
  supervised attack the poisoned curve collapses within a few epochs while the
  clean ones lag. In a contrastive attack all three fall together.
- ``loss_auroc``: per epoch, how well a LOW loss singles out the poisoned
  samples (score = -loss, positives = poisoned). 0.5 means the loss carries no
  information, 1.0 means every poisoned sample has a lower loss than every clean
  one. This is the signal that loss-based defenses such as ABL rely on, so its
  maximum over training says how exploitable the dynamics are.
- ``learning_epochs``: when the backdoor (ASR > 0.5) and the clean task
  (ACC >= 90 % of its final value) are learned, from the per-epoch curves.
- ``cosine_to_init``: how far training turned a network's weights from where
  they started (1: not at all), which tells an encoder that did not train
  from one that trained towards features the task does not need.

NaN losses (samples not seen in an epoch) are ignored everywhere.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score
from torch import nn

from cba.errors import ConfigError
from cba.io import write_png

GROUPS = ("poisoned", "clean_target", "clean_other")
_COLUMNS = ("epoch", "index", "poisoned", "loss")


def _check_log(log: pd.DataFrame) -> None:
    missing = [c for c in _COLUMNS if c not in log.columns]
    if missing:
        raise ConfigError("loss log", f"columns {list(log.columns)}", f"needs columns {list(_COLUMNS)}; missing {missing}")


def loss_groups(log: pd.DataFrame, labels: np.ndarray, target_class: int) -> pd.DataFrame:
    """One row per (epoch, group): mean, q25, q50, q75 and count of the finite losses.

    Every epoch gets all three groups; a group with no finite loss has count 0
    and NaN statistics, so the frame always has the same shape.
    """
    _check_log(log)
    labels = np.asarray(labels)
    index = log["index"].to_numpy()
    if len(index) and (index.min() < 0 or index.max() >= len(labels)):
        raise ConfigError("labels", f"length {len(labels)}", f"must cover every index in the loss log (max {index.max()})")
    poisoned = log["poisoned"].to_numpy(dtype=bool)
    target = labels[index] == target_class
    group = np.where(poisoned, GROUPS[0], np.where(target, GROUPS[1], GROUPS[2]))
    frame = pd.DataFrame({"epoch": log["epoch"].to_numpy(), "group": group,
                          "loss": log["loss"].to_numpy(dtype=np.float64)})
    frame = frame[np.isfinite(frame["loss"])]
    stats = frame.groupby(["epoch", "group"])["loss"].agg(
        mean="mean", q25=lambda s: s.quantile(0.25), q50="median", q75=lambda s: s.quantile(0.75), count="count")
    epochs = np.sort(log["epoch"].unique())
    full = pd.MultiIndex.from_product([epochs, GROUPS], names=["epoch", "group"])
    out = stats.reindex(full).reset_index()
    out["count"] = out["count"].fillna(0).astype(np.int64)
    return out[["epoch", "group", "mean", "q25", "q50", "q75", "count"]]


def loss_auroc(log: pd.DataFrame) -> pd.DataFrame:
    """Per epoch, AUROC of score = -loss for poisoned (positive) vs clean samples."""
    _check_log(log)
    rows = []
    for epoch, part in log.groupby("epoch", sort=True):
        loss = part["loss"].to_numpy(dtype=np.float64)
        keep = np.isfinite(loss)
        y = part["poisoned"].to_numpy(dtype=bool)[keep]
        auroc = float(roc_auc_score(y, -loss[keep])) if 0 < y.sum() < len(y) else math.nan
        rows.append({"epoch": int(epoch), "auroc": auroc})
    return pd.DataFrame(rows, columns=["epoch", "auroc"])


def _series(curves: Sequence[dict], key: str) -> list[tuple[int, float]]:
    """(epoch, value) pairs of the curve rows that carry a finite `key`."""
    out = []
    for position, row in enumerate(curves):
        value = row.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        out.append((int(row.get("epoch", position + 1)), float(value)))
    return out


def learning_epochs(curves: Sequence[dict], acc_key: str = "knn_acc", asr_key: str = "knn_asr",
                    asr_threshold: float = 0.5, acc_fraction: float = 0.9) -> dict[str, Any]:
    """When the backdoor and the clean task are learned, from per-epoch curve rows.

    backdoor_epoch: first evaluated epoch with ASR > asr_threshold (None if never).
    clean_epoch: first evaluated epoch with ACC >= acc_fraction * final ACC.
    Rows without the key (epochs that were not evaluated) are skipped.
    """
    acc, asr = _series(curves, acc_key), _series(curves, asr_key)
    final_acc = acc[-1][1] if acc else None
    final_asr = asr[-1][1] if asr else None
    backdoor = next((e for e, v in asr if v > asr_threshold), None)
    clean = next((e for e, v in acc if v >= acc_fraction * final_acc), None) if acc else None
    return {"backdoor_epoch": backdoor, "clean_epoch": clean, "final_acc": final_acc, "final_asr": final_asr}


def summarize_dynamics(log: pd.DataFrame, curves: Sequence[dict] | None = None,
                       acc_key: str = "knn_acc", asr_key: str = "knn_asr") -> dict[str, Any]:
    """Headline numbers: the peak loss AUROC (and its epoch), the final one, and learning epochs."""
    auroc = loss_auroc(log)
    finite = auroc.dropna(subset=["auroc"])
    out: dict[str, Any] = {"max_loss_auroc": None, "max_loss_auroc_epoch": None, "final_loss_auroc": None}
    if len(finite):
        best = finite.loc[finite["auroc"].idxmax()]
        out.update(max_loss_auroc=float(best["auroc"]), max_loss_auroc_epoch=int(best["epoch"]),
                   final_loss_auroc=float(finite["auroc"].iloc[-1]))
    out.update(learning_epochs(curves or [], acc_key=acc_key, asr_key=asr_key))
    return out


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # bare Agg canvas: no pyplot state, no display
    return figure, figure.subplots()


def plot_loss_groups(groups: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> None:
    """Mean loss per group against epoch, with the q25-q75 band shaded."""
    figure, ax = _figure()
    colours = {"poisoned": "tab:red", "clean_target": "tab:blue", "clean_other": "tab:gray"}
    for name in GROUPS:
        part = groups[(groups["group"] == name) & (groups["count"] > 0)].sort_values("epoch")
        if part.empty:
            continue
        colour = colours[name]
        ax.plot(part["epoch"], part["mean"], color=colour, marker=".", label=f"{name} (n={int(part['count'].max())})")
        ax.fill_between(part["epoch"], part["q25"], part["q75"], color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("per-sample loss (mean, q25-q75)")
    ax.set_title(title or "per-sample loss by group")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    write_png(path, figure)


def plot_loss_auroc(auroc: pd.DataFrame, curves: Sequence[dict] | None, path: str | os.PathLike,
                    acc_key: str = "knn_acc", asr_key: str = "knn_asr", title: str | None = None) -> None:
    """Loss AUROC, and the kNN ACC and ASR where evaluated, against epoch (all on [0, 1])."""
    figure, ax = _figure()
    ax.plot(auroc["epoch"], auroc["auroc"], color="tab:red", marker=".", label="loss AUROC (poisoned vs clean)")
    for key, colour, label in ((acc_key, "tab:blue", "ACC"), (asr_key, "tab:orange", "ASR")):
        series = _series(curves or [], key)
        if series:
            epochs, values = zip(*series)
            ax.plot(epochs, values, color=colour, marker="o", label=f"{label} ({key})")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    ax.set_title(title or "loss separability and task accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    write_png(path, figure)


def cosine_to_init(trained: nn.Module, initial: nn.Module) -> float:
    """The mean, over the weight tensors of rank 2 or more (convolutions, linear layers), of the cosine between
    each tensor after training and at initialisation. Scale-free on purpose: a layer followed by batch norm
    computes the same function at any scale of its weights, and SGD with weight decay changes that scale
    on its own, so only the direction says whether the layer learned."""
    start = dict(initial.named_parameters())
    weights = {name: w for name, w in trained.named_parameters() if w.dim() >= 2}
    if not weights or any(name not in start or start[name].shape != w.shape for name, w in weights.items()):
        raise ConfigError("initial", type(initial).__name__, "the same architecture as the trained network")
    pairs = [(w.detach().cpu().flatten().double(), start[name].detach().cpu().flatten().double())
             for name, w in weights.items()]
    return float(np.mean([float(a @ b / (a.norm() * b.norm())) for a, b in pairs]))
