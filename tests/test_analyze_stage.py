"""The analyze stage, end to end on artifacts the real trigger, poison and pretrain stages wrote (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml

from cba.analysis import GROUPS

REPO = Path(__file__).resolve().parents[1]
TINY_TRIGGER = {"surrogate_size": 150, "surrogate_epochs": 1, "surrogate_width": 4, "rounds": 2, "trigger_steps": 2, "batch_size": 16}


def write_params(path: Path, **analyze) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 300, "test_size": 100}
    params["trigger"]["params"].update(TINY_TRIGGER)  # the learned trigger, fitted in seconds
    params["poison_rate"] = 0.05
    params["pretrain"].update(epochs=2, width=4, batch_size=64, eval_every=1, eval_bank_size=200, warmup_epochs=0,
                              device="cpu")
    params["analyze"] = {"embedding": "tsne", "max_points": 120, "folds": 3, "tsne_iter": 250, **analyze}
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny trigger -> poison -> pretrain -> analyze run; returns its folder."""
    from stages.analyze import analyze
    from stages.poison import poison
    from stages.pretrain import pretrain
    from stages.trigger import trigger

    folder = tmp_path_factory.mktemp("analyze")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        params = write_params(folder / "params.yaml")
        trigger(params)
        poison(params)
        pretrain(params, progress=False)
        analyze(params)
    return folder


def test_metrics_keys_and_ranges(pipeline):
    metrics = json.loads((pipeline / "metrics/details/analysis.json").read_text())
    assert {"dynamics", "entanglement", "method", "env", "poison_mode", "embedding"} <= set(metrics)
    assert metrics["method"] == "simclr" and metrics["poison_mode"] == "clean_label"
    dyn, ent = metrics["dynamics"], metrics["entanglement"]
    assert {"max_loss_auroc", "max_loss_auroc_epoch", "final_loss_auroc", "backdoor_epoch", "clean_epoch",
            "final_acc", "final_asr", "backdoor_lead_epochs", "epochs"} <= set(dyn)
    assert dyn["epochs"] == 2 and 0.0 <= dyn["max_loss_auroc"] <= 1.0 and dyn["max_loss_auroc_epoch"] in (1, 2)
    assert 0.0 <= dyn["final_acc"] <= 1.0 and 0.0 <= dyn["final_asr"] <= 1.0
    assert dyn["clean_epoch"] in (1, 2)  # ACC >= 90 % of its final value by the last epoch at the latest
    assert ent["n_poisoned"] == 15  # 5 % of 300, clean label: all from the target class
    assert ent["n_clean_target"] > 2
    assert 0.0 <= ent["separability_auroc"] <= 1.0
    assert -1.0 <= ent["silhouette"] <= 1.0 and ent["centroid_distance_ratio"] > 0
    assert metrics["embedding"] == {"method": "tsne", "points": 120}


def test_plot_tables_and_figures(pipeline):
    groups = pd.read_csv(pipeline / "plots/analysis_loss_groups.csv")
    assert list(groups.columns) == ["epoch", *GROUPS] and groups["epoch"].tolist() == [1, 2]
    assert groups[list(GROUPS)].notna().all().all()
    auroc = pd.read_csv(pipeline / "plots/analysis_loss_auroc.csv")
    assert list(auroc.columns) == ["epoch", "auroc"] and auroc["auroc"].between(0, 1).all()
    quartiles = pd.read_csv(pipeline / "data/analysis/loss_groups.csv")
    assert len(quartiles) == 2 * len(GROUPS)
    for name in ("embedding.png", "loss_groups.png", "loss_auroc.png"):
        png = pipeline / "data/analysis" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p.name for p in (pipeline / "data/analysis").iterdir() if p.name.startswith(".")]
    assert not leftovers  # atomic writes leave no temporary files


@pytest.mark.parametrize("analyze_params", [{"embedding": "umap"}, {"max_points": 0}, {"tsne_iter": 100}, {"perplexity": 30}])
def test_bad_params_exit_2(pipeline, monkeypatch, capsys, analyze_params):
    from stages.analyze import analyze

    monkeypatch.chdir(pipeline)
    params = write_params(pipeline / "bad.yaml", **analyze_params)
    with pytest.raises(typer.Exit) as exc:
        analyze(params)
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: analyze.") and "\n" not in err


def test_missing_artifacts_exit_2(tmp_path, monkeypatch, capsys):
    from stages.analyze import analyze

    monkeypatch.chdir(tmp_path)
    with pytest.raises(typer.Exit) as exc:
        analyze(write_params(tmp_path / "params.yaml"))
    assert exc.value.exit_code == 2
    assert "does not exist" in capsys.readouterr().err


def test_pca_embedding(pipeline, monkeypatch):
    from stages.analyze import analyze

    monkeypatch.chdir(pipeline)
    analyze(write_params(pipeline / "pca.yaml", embedding="pca", max_points=50))
    metrics = json.loads((pipeline / "metrics/details/analysis.json").read_text())
    assert metrics["embedding"] == {"method": "pca", "points": 50}
    assert metrics["entanglement"]["n_poisoned"] == 15
