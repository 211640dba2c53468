"""`dvc repro` end to end on a tiny config, in a throwaway git repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from cba.compare import flatten, runs_from_exp_show
from pipeline_project import DEFENSES, make_project, ran_stages, run


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))


def test_repro_writes_every_contracted_artifact(project):
    out = run(["dvc", "repro"], project)
    stages = {"validate", "trigger", "poison", "pretrain", "reference", "finetune", "analyze", "report"} | {f"defend@{d}" for d in DEFENSES}
    assert ran_stages(out) == stages
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    for evaluation in ("knn", "linear"):
        assert 0 <= finetune[evaluation]["acc"] <= 1 and 0 <= finetune[evaluation]["asr"] <= 1
    assert finetune["acc"] == finetune["linear"]["acc"]
    assert 0 <= finetune["linear"]["robust_acc"] <= 1 and 0 <= finetune["linear"]["natural_rate"] <= 1
    pretrain = json.loads((project / "metrics/details/pretrain.json").read_text())
    assert pretrain["env"]["torch"] and pretrain["augmentation_protocol"] == "per_sample"
    # The kernels' instruction set, which decides the float stream: what tells two machines' figures apart.
    assert pretrain["env"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for name in DEFENSES:
        result = json.loads((project / f"metrics/details/defense/{name}.json").read_text())
        assert result["defense"] == name and 0 <= result["auroc"] <= 1 and result["env"]["torch"]
    # The DVC metrics files hold comparable scalars only: no text, lists, environment or timings.
    for path in [*project.glob("metrics/*.json"), *project.glob("metrics/defense/*.json")]:
        assert all(isinstance(value, (int, float, bool)) for value in flatten(json.loads(path.read_text())).values()), path
        assert not any(key.split(".")[-1] in ("env", "seconds") or key.startswith("env.")
                       for key in flatten(json.loads(path.read_text()))), path
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert summary["ACC"] == finetune["acc"] and summary["ASR"] == finetune["asr"]
    assert summary["RA"] == finetune["linear"]["robust_acc"] and summary["kNN_ASR"] == finetune["knn"]["asr"]
    # The same trigger read on the reference victim (no poisons): the baseline of the 3x rule.
    assert summary["ref_ASR"] == finetune["reference"]["linear"]["asr"] and summary["ref_kNN_ASR"] == finetune["reference"]["knn"]["asr"]
    assert 0 <= finetune["reference"]["linear"]["acc"] <= 1 and 0 <= finetune["reference"]["knn"]["natural_rate"] <= 1
    assert torch.isfinite(torch.tensor(json.loads((project / "metrics/reference.json").read_text())["final_loss"]))
    assert summary["strip_auroc"] == json.loads((project / "metrics/defense/strip.json").read_text())["auroc"]
    for path in ("data/trigger/trigger.safetensors", "data/trigger/preview.png", "data/poisoned/manifest.parquet",
                 "data/pretrain/encoder.safetensors", "data/pretrain/losses.parquet", "plots/pretrain_loss.csv",
                 "reports/report.md", "reports/learning_curves.png", "reports/trigger_preview.png"):
        assert (project / path).stat().st_size > 0, path
    report = (project / "reports/report.md").read_text()
    assert "](trigger_preview.png)" in report and "](learning_curves.png)" in report
    assert "### Defenses x attacks: claim 3" in report and "#### Attacks" in report and "| strip | AUROC .95 |" in report
    assert "](bench_maturity_plus.png)" in report and (project / "reports/bench_maturity_plus.png").stat().st_size > 0


def test_second_repro_runs_nothing(project):
    assert ran_stages(run(["dvc", "repro"], project)) == set()


def test_finetune_param_reruns_only_downstream_stages(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["knn"]["k"] = 50
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = ran_stages(run(["dvc", "repro"], project))
    # The kNN k does not change the probe file the defenses read, so DVC's content hashes
    # keep every defense cached: only finetune and report rerun, nothing upstream (the params check reruns on
    # any params change, and its unchanged output keeps everything else cached).
    assert ran == {"validate", "finetune", "report"}


def test_defense_param_reruns_only_that_defense(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["defense"]["strip"]["n_overlays"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(["dvc", "repro"], project)) == {"validate", "defend@strip", "report"}


def test_editing_one_defense_module_reruns_only_that_defense(project):
    module = project / "cba/defenses/strip.py"
    module.write_text(module.read_text() + "\n# an edit that changes the file, not the results\n")
    assert ran_stages(run(["dvc", "repro"], project)) == {"defend@strip", "report"}


def test_a_poison_free_run_trains_the_reference_victim_bit_for_bit_and_never_retrains_it(project):
    """poison_rate 0 reruns the poisons and the victim but not the reference, which depends on neither; the victim
    it trains is the reference victim byte for byte, so finetune reads the same ASR on both. This is the run the
    3x rule compares with, without running it."""
    original = (project / "params.yaml").read_text()
    reference = (project / "data/reference/encoder.safetensors").read_bytes()
    params = yaml.safe_load(original)
    params["poison_rate"] = 0.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = ran_stages(run(["dvc", "repro", "finetune"], project))  # up to the readings: the defenses are not the point
    assert {"poison", "pretrain", "finetune"} <= ran and not ran & {"reference", "trigger"}, ran
    assert (project / "data/pretrain/encoder.safetensors").read_bytes() == reference
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    for name in ("linear", "knn"):
        assert finetune[name]["asr"] == finetune["reference"][name]["asr"], name
        assert finetune[name]["acc"] == finetune["reference"][name]["acc"], name
    (project / "params.yaml").write_text(original)
    run(["dvc", "repro"], project)
    assert json.loads((project / "metrics/poison.json").read_text())["poisoned"] > 0


def wait_for_queue(project: Path, seconds: float = 600) -> str:
    """`dvc queue status` once no experiment is queued or running (polled every few seconds: each poll is a
    DVC process, which competes with the experiments for the cores)."""
    deadline = time.monotonic() + seconds
    status = run(["dvc", "queue", "status"], project)
    while re.search(r"\b(Queued|Running)\b", status) and time.monotonic() < deadline:
        time.sleep(5)
        status = run(["dvc", "queue", "status"], project)
    return status


def test_queued_experiments_rerun_only_what_changed_and_read_back(project):
    """Two experiments queued, run two at a time (`dvc queue start -j 2`): a pretraining param reruns pretraining
    and what follows, never the trigger or the poison; a defense param reruns that defense alone. `dvc exp show`,
    `cba compare`, `dvc exp apply`, `dvc metrics diff` and `dvc plots show` read them; and returning to the
    baseline leaves nothing to run."""
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    pattern = (project / "data/trigger/trigger.safetensors").read_bytes()
    overlays = yaml.safe_load((project / "params.yaml").read_text())["defense"]["strip"]["n_overlays"]
    run(["dvc", "exp", "run", "--queue", "-S", "pretrain.epochs=3"], project)
    run(["dvc", "exp", "run", "--queue", "-S", f"defense.strip.n_overlays={overlays + 2}"], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    status = wait_for_queue(project)
    assert "Failed" not in status and status.count("Success") == 2, status
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True).stdout)
    runs = {(row["params"]["pretrain.epochs"], row["params"]["defense.strip.n_overlays"]): row
            for row in runs_from_exp_show(shown)}
    assert set(runs) == {(2, overlays), (3, overlays), (2, overlays + 2)}  # the baseline commit and the experiments
    pretraining, defense = runs[3, overlays], runs[2, overlays + 2]
    ran = ran_stages(run(["dvc", "queue", "logs", pretraining["name"]], project))
    assert "pretrain" in ran and "validate" in ran and "trigger" not in ran and "poison" not in ran, ran
    assert ran_stages(run(["dvc", "queue", "logs", defense["name"]], project)) == {"validate", "defend@strip", "report"}
    for row in (pretraining, defense):
        assert all(0 <= row["metrics"][key] <= 1 for key in ("ACC", "ASR", "kNN_ACC", "kNN_ASR"))
    assert defense["metrics"]["ASR"] == runs[2, overlays]["metrics"]["ASR"]  # the victim is the baseline's
    table = run(["cba", "compare", "--by", "pretrain.epochs", "--metrics", "ASR,kNN_ASR"], project)
    # Columns: the varying params in name order (defense.strip.n_overlays, pretrain.epochs), then n and seeds.
    assert all(f"| {n} | {epochs} | 1 | 0 |" in table for epochs, n in runs), table
    assert (project / "experiments/compare.png").stat().st_size > 0

    run(["dvc", "exp", "apply", pretraining["name"]], project)
    assert (project / "data/trigger/trigger.safetensors").read_bytes() == pattern
    assert json.loads((project / "metrics/pretrain.json").read_text())["epochs"] == 3
    trigger = json.loads((project / "metrics/trigger.json").read_text())
    assert 0 < trigger["linf"] <= 16 and trigger["psnr"] > 20 and 0 < trigger["ssim"] <= 1
    assert 0 <= trigger["surrogate_hit_rate"] <= 1 and 0 <= trigger["surrogate_clean_hit_rate"] <= 1
    assert 0 <= trigger["surrogate_clean_probe_hit_rate"] <= 1
    # The experiment's metrics differ from the committed baseline's.
    diff = json.loads(subprocess.run(["dvc", "metrics", "diff", "--json"], cwd=project, capture_output=True, text=True).stdout)
    assert "metrics/pretrain.json" in diff
    plots = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=project, capture_output=True, text=True).stdout)
    rendered = json.dumps(plots)
    assert "kNN ACC (clean test) and ASR (triggered) during pretraining" in rendered and '"domain": [0, 1]' in rendered
    # Returning to the committed baseline (git for the small files, DVC for the cached data) leaves nothing to run:
    # resume checkpoints are no DVC output, so the experiment's training left no hash behind.
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout", "--force"], project)
    assert ran_stages(run(["dvc", "repro"], project)) == set()


def test_a_bad_defense_fails_the_repro_in_seconds_with_cbas_line(project):
    """An unknown defense, or a bad defense value, stops `dvc repro` at the params check, before any other stage."""
    original = (project / "params.yaml").read_text()
    try:
        for change, fragment in ((lambda p: p["defenses"].append("sparkle"), "defenses='sparkle' is not valid"),
                                 (lambda p: p["defense"]["spectral"].update(expected_rate="abc"),
                                  "defense.spectral.expected_rate='abc' is not valid")):
            params = yaml.safe_load(original)
            change(params)
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            env = {**os.environ, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
            done = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode != 0 and fragment in done.stdout + done.stderr
            assert ran_stages(done.stdout + done.stderr) == {"validate"}
    finally:
        (project / "params.yaml").write_text(original)


