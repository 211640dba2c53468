"""The tables behind each defense's plots, from the result it already returns.

A detection defense gets its ROC curve; Fine-Pruning its ACC/ASR against the
prune ratio; Neural Cleanse the mask norm and anomaly index of every class;
STRIP the entropy histograms of clean and triggered inputs; every repair its
ACC and ASR before and after. `dvc.yaml` names these files in its plots.
"""

from __future__ import annotations

from typing import Any

import pandas as pd


def defense_plot_tables(result: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """name -> table; a defense whose result has none of these gets an empty dict."""
    tables: dict[str, pd.DataFrame] = {}
    roc = result.get("roc") or {}
    if roc.get("fpr"):
        tables["roc"] = pd.DataFrame({"fpr": roc["fpr"], "tpr": roc["tpr"]})
    if result.get("curve"):
        tables["prune_curve"] = pd.DataFrame(result["curve"])
    if result.get("mask_l1"):
        tables["mask_norms"] = pd.DataFrame({"class": range(len(result["mask_l1"])), "mask_l1": result["mask_l1"],
                                             "anomaly_index": result.get("anomaly_index") or [None] * len(result["mask_l1"])})
    histogram = result.get("entropy_histogram") or {}
    if histogram.get("edges"):
        edges = histogram["edges"]
        tables["entropy_histogram"] = pd.DataFrame({"entropy": [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])],
                                                    "clean": histogram["clean"], "triggered": histogram["triggered"]})
    if result.get("asr_after") is not None and result.get("acc_before") is not None:
        tables["before_after"] = pd.DataFrame({"step": [0, 1], "when": ["before", "after"],
                                               "acc": [result["acc_before"], result["acc_after"]],
                                               "asr": [result["asr_before"], result["asr_after"]]})
    return tables
