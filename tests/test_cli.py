"""The command line a user meets: --version, help that lists the choices, key figures, log-friendly progress."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stages.cli import build_app


def invoke(*args: str):
    return CliRunner().invoke(build_app(), list(args))


def test_version():
    import cba

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"cba {cba.__version__}"


def test_defend_help_lists_every_defense_and_every_flag_has_help():
    from cba.defenses import DEFENSES

    text = " ".join(invoke("defend", "--help").stdout.split())
    for name in DEFENSES.names():
        assert name in text
    for stage in ("trigger", "poison", "pretrain", "reference", "finetune", "analyze", "defend", "report"):
        options = [line for line in invoke(stage, "--help").stdout.splitlines() if line.strip().startswith("│ --")]
        assert options, stage
        for line in options:  # every option line carries words besides the flag and its type
            words = [w for w in line.strip("│ ").split() if not w.startswith("-") and not w.startswith("<")]
            assert words, (stage, line)


def test_a_wrong_defense_name_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    result = invoke("defend", "sparkle")
    assert result.exit_code == 2 and "defense='sparkle'" in result.stderr and "strip" in result.stderr


def test_progress_in_a_log_is_plain_lines(capsys):
    """stderr is not a terminal under capture: no carriage returns, one line per update and a final one."""
    from cba.progress import tqdm

    for _ in tqdm(range(1000), desc="demo"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("demo: 100%") and "1000/1000" in lines[-1]
    assert len(lines) <= 3


def test_defense_key_figures_line():
    from stages.defend import key_figures

    detection = {"auroc": 0.91, "tpr": 0.8, "fpr": 0.1}
    assert key_figures(detection) == "AUROC 0.910; TPR 0.800 FPR 0.100"
    repair = {"acc_before": 0.7, "acc_after": 0.6, "asr_before": 0.9, "asr_after": 0.1, "der": 0.85}
    assert key_figures(repair) == "ACC 0.700 -> 0.600, ASR 0.900 -> 0.100, DER 0.850"
    assert "not flagged" in key_figures({"target_flagged": False, "target_anomaly_index": 0.9})


@pytest.mark.parametrize("before, after, der", [
    ({"acc": 0.8, "asr": 0.9}, {"acc": 0.8, "asr": 0.1}, 0.9),    # ASR removed at no cost
    ({"acc": 0.8, "asr": 0.9}, {"acc": 0.8, "asr": 0.9}, 0.5),    # nothing happened
    ({"acc": 0.8, "asr": 0.9}, {"acc": 0.2, "asr": 0.9}, 0.2),    # only the model was damaged
    ({"acc": 0.8, "asr": 0.1}, {"acc": 0.9, "asr": 0.5}, 0.5),    # gains are not rewarded, ASR rises are not punished
])
def test_der_is_backdoorbench_defense_effectiveness(before, after, der):
    from cba.defenses.base import defense_effectiveness, repair_metrics

    assert defense_effectiveness(before, after) == pytest.approx(der)
    assert repair_metrics(before, after)["der"] == pytest.approx(der)


def test_metric_scalars_keep_only_comparable_numbers():
    from stages.common import metric_scalars

    record = {"acc": 0.7, "ok": True, "method": "simclr", "classes": ["a", "b"], "seconds": 12.0, "missing": None,
              "nan": float("nan"), "env": {"torch": "2"}, "linear": {"asr": 0.1, "landing": [1, 2], "probe": {"val_acc": {"1e-4": 0.7}}},
              "readout": {"logit_gain": {"circle": 1.0}, "target_margin": 0.5}}
    assert metric_scalars(record) == {"acc": 0.7, "ok": True, "linear": {"asr": 0.1}, "readout": {"target_margin": 0.5}}


def test_summary_has_one_figure_per_defense():
    from cba.summary import summary_figures

    finetune = {"primary": "linear", "linear": {"acc": 0.7, "asr": 0.2, "natural_rate": 0.03, "robust_acc": 0.6},
                "knn": {"acc": 0.5, "asr": 0.3, "natural_rate": 0.05}}
    defenses = [{"defense": "strip", "kind": "input_detection", "auroc": 0.6},
                {"defense": "neural_cleanse", "kind": "model_detection", "target_anomaly_index": 1.2},
                {"defense": "fine_pruning", "kind": "repair", "asr_after": 0.1, "der": 0.7},
                {"defense": "abl", "kind": "data_detection", "auroc": 0.55, "asr_after": 0.2}]
    assert summary_figures(finetune, defenses) == {
        "ACC": 0.7, "ASR": 0.2, "natural": 0.03, "RA": 0.6, "kNN_ACC": 0.5, "kNN_ASR": 0.3, "kNN_natural": 0.05,
        "strip_auroc": 0.6, "nc_index": 1.2, "fp_asr": 0.1, "fp_der": 0.7, "abl_auroc": 0.55, "abl_asr": 0.2}


def test_roc_points_and_defense_plot_tables():
    import numpy as np

    from cba.defenses.base import detection_metrics
    from cba.defenses.plots import defense_plot_tables

    positive = np.r_[np.ones(10, bool), np.zeros(30, bool)]
    perfect = detection_metrics(positive.astype(float), positive, positive)
    assert perfect["auroc"] == 1.0 and perfect["roc"]["tpr"][0] == 1.0  # every positive found at FPR 0
    chance = detection_metrics(np.zeros(40), positive, np.zeros(40, bool))
    np.testing.assert_allclose(chance["roc"]["tpr"], chance["roc"]["fpr"])  # a constant score is the diagonal
    tables = defense_plot_tables({**perfect, "curve": [{"prune_ratio": 0.0, "acc": 0.7, "asr": 0.9}],
                                  "mask_l1": [5.0, 50.0], "anomaly_index": [3.0, 0.5],
                                  "entropy_histogram": {"edges": [0.0, 1.0, 2.0], "clean": [1, 9], "triggered": [8, 2]},
                                  "acc_before": 0.7, "acc_after": 0.6, "asr_before": 0.9, "asr_after": 0.2})
    assert set(tables) == {"roc", "prune_curve", "mask_norms", "entropy_histogram", "before_after"}
    assert tables["entropy_histogram"]["entropy"].tolist() == [0.5, 1.5]
    assert tables["before_after"]["asr"].tolist() == [0.9, 0.2]
    assert defense_plot_tables({"auroc": 0.5}) == {}


def test_the_readmes_paper_scale_preset_passes_the_params_check(tmp_path):
    """The documented `dvc exp run -n paper-cifar10 -S ...` command names real keys with valid values."""
    import re
    import shlex
    from pathlib import Path

    import yaml

    from test_stage_errors import REPO, cba

    readme = (REPO / "README.md").read_text()
    command = re.search(r"dvc exp run -n paper-cifar10 (.*?)\n```", readme, re.S).group(1).replace("\\\n", " ")
    args = shlex.split(command)
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "-S"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        dotted, value = item.split("=", 1)
        *parents, last = dotted.split(".")
        node = params
        for part in parents:
            assert part in node, dotted  # -S on a missing key would add a typo silently
            node = node[part]
        assert last in node, dotted
        node[last] = yaml.safe_load(value)
    assert (params["pretrain"]["backbone"], params["pretrain"]["width"], params["pretrain"]["epochs"]) == ("resnet18", 64, 800)
    assert params["data"]["name"] == "cifar10" and params["trigger"]["name"] == "ctrl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = cba(["validate"], Path(tmp_path))
    assert result.exit_code == 0, result.output
