"""`cba report`: gather params, metrics and plots into reports/report.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from cba.io import atomic_path, read_json
from cba.report import attack_summary, params_block, plot_learning_curves
from stages.common import METRICS_DIR, PARAMS_OPTION, PLOTS_DIR, REPORT_DIR, TRIGGER_DIR, one_line_errors
from stages.params import Params


@one_line_errors
def report(params_path: Path = PARAMS_OPTION) -> None:
    """Write reports/report.md with the params, the metrics, the trigger preview and the learning curves."""
    params = Params.load(params_path)
    poison, pretrain, finetune = (read_json(METRICS_DIR / f"{name}.json") for name in ("poison", "pretrain", "finetune"))
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_path(REPORT_DIR / "trigger_preview.png") as tmp:
        shutil.copyfile(TRIGGER_DIR / "preview.png", tmp)
    plot_learning_curves(pd.read_csv(PLOTS_DIR / "pretrain_loss.csv"), pd.read_csv(PLOTS_DIR / "pretrain_knn.csv"),
                         REPORT_DIR / "learning_curves.png")
    parts = [
        "# cba report",
        "## Attack and result",
        attack_summary(poison, pretrain, finetune),
        "ASR counts triggered test images whose true class is not the target; ACC is on the clean test set.",
        "## Trigger",
        "Clean image, triggered image, and the amplified difference.",
        "![trigger preview](trigger_preview.png)",
        "## Learning curves",
        "![learning curves](learning_curves.png)",
    ]
    parts += ["## Parameters", params_block(params.data)]
    with atomic_path(REPORT_DIR / "report.md") as tmp:
        tmp.write_text("\n\n".join(parts) + "\n")
    print(f"report -> {REPORT_DIR / 'report.md'}")
