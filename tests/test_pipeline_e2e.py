"""`dvc repro` end to end on a tiny config, in a throwaway git repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from benches import load
from cba.compare import flatten, runs_from_exp_show

REPO = Path(__file__).resolve().parents[1]
DEFENSES = ["spectral", "strip"]


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 400, "test_size": 120}
    params["pretrain"].update(epochs=2, width=4, batch_size=64, eval_every=1, eval_bank_size=200)
    params["finetune"]["linear"]["max_iter"] = 200
    params["analyze"].update(embedding="pca", max_points=200)
    params["defenses"] = DEFENSES
    # The learned trigger, at a size that fits in seconds: the stage still trains its surrogate and optimises.
    params["trigger"] = {"name": "optimized", "params": {"linf": 16, "surrogate_size": 200, "surrogate_epochs": 1,
                                                         "surrogate_width": 4, "rounds": 2, "trigger_steps": 3,
                                                         "batch_size": 32}}
    params.setdefault("defense", {})
    params["defense"]["strip"] = {**params["defense"].get("strip", {}), "max_inputs": 40, "n_overlays": 4}
    # Every defense at a size that runs in seconds: the pipeline repeats them in several tests.
    small = {"neural_cleanse": {"steps": 30, "clean_images": 60}, "dbd": {"ssl_epochs": 1, "semi_epochs": 1, "head_epochs": 10},
             "fine_pruning": {"finetune_epochs": 1, "clean_images": 100}, "abl": {"isolation_epochs": 1, "unlearn_epochs": 1},
             "downstream_ft": {"epochs": 1, "train_size": 200, "test_size": 60}}
    for name, changes in small.items():
        params["defense"][name] = {**params["defense"].get(name, {}), **changes}
    return params


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for folder in ("cba", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    (root / "bench/results").mkdir(parents=True)  # the report shows the committed bench tables; a small stand-in here
    (root / "bench/results/defense_matrix.md").write_text("# Defense matrix\n\n## Attacks\n\n| defense | BadNets |\n|---|---|\n| strip | AUROC .95 |\n")
    shutil.copy(REPO / "bench/results/maturity_plus.md", root / "bench/results/maturity_plus.md")
    shutil.copy(REPO / "bench/results/maturity_plus.png", root / "bench/results/maturity_plus.png")  # a bench's figure
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")  # the plot template dvc.yaml names
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    return root


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


def test_readout_ceiling_reads_the_pipelines_own_asr(project, tmp_path, one_thread):
    """The bench's ASR column is the pipeline's ASR, recomputed from the stage outputs (on the stages' one
    thread: `run` sets OMP_NUM_THREADS=1, and a second thread sums in another order)."""
    bench = load("readout_ceiling")
    result = bench.main(["--root", str(project), "--out", str(tmp_path / "ceiling.json")])
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    knn = next(row for name, row in result["rows"].items() if name.startswith("kNN"))
    probe = result["rows"]["linear probe"]
    assert knn["asr"] == pytest.approx(finetune["knn"]["asr"]) and probe["asr"] == pytest.approx(finetune["linear"]["asr"])
    assert probe["natural"] == pytest.approx(finetune["linear"]["natural_rate"])
    for row in result["rows"].values():
        assert all(0 <= row[group] <= 1 for group in ("recall", "ceiling", "natural", "asr"))
    assert "| linear probe |" in (tmp_path / "ceiling.md").read_text()
    near = result["poison_neighbours"]
    manifest = pd.read_parquet(project / "data/poisoned/manifest.parquet")
    assert near["poison_rate"] == pytest.approx(manifest["poisoned"].mean())
    assert all(0 <= near[key] <= 1 for key in ("clean", "triggered", "target_near_poisons", "target_near_clean_target"))


def test_trigger_scale_reads_the_pipelines_asr_at_scale_one_and_scales_the_pattern(project, tmp_path, one_thread):
    """At scale 1 the bench's readings are the pipeline's own (victim and reference); other scales add s times
    the learned pattern."""
    bench = load("trigger_scale")
    result = bench.main(["--root", str(project), "--scales", "1", "2", "--out", str(tmp_path / "scale.json")])
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    one, two = result["rows"]
    for name in ("linear", "knn"):
        assert one["poisoned"][name]["asr"] == pytest.approx(finetune[name]["asr"])
        assert one["reference"][name]["asr"] == pytest.approx(finetune["reference"][name]["asr"])
        # the clean images are read the same whatever the scale: one probe per encoder
        assert two["poisoned"][name]["acc"] == one["poisoned"][name]["acc"]
    assert (one["linf"], two["linf"]) == (16, 32) and "| 2 | 32 |" in (tmp_path / "scale.md").read_text()
    from cba.triggers import load_trigger
    learned = load_trigger(project / "data/trigger")
    doubled = bench.scaled(learned, 2.0)
    grey = np.full((1, 32, 32, 3), 128, dtype=np.uint8)  # mid-grey: no clip within +-32
    added = doubled.apply(grey).astype(float) - learned.apply(grey).astype(float)
    assert np.abs(added - (learned.apply(grey).astype(float) - 128)).max() <= 1  # twice the pattern, up to rounding
    with pytest.raises(SystemExit, match="exceed the 0-255 range"):
        bench.scaled(learned, 20.0)

def test_pull_matrix_reads_each_pipelines_own_pull_on_the_diagonal_and_splits_the_spread(project, tmp_path, one_thread):
    """The diagonal is each pipeline's own reference reading; a second root with the same encoder and four times
    the pattern makes two identical columns, so the whole spread belongs to the trigger."""
    from cba.triggers import load_trigger, save_trigger

    bench = load("pull_matrix")
    other = tmp_path / "other"
    for path in ("params.yaml", "data/reference/encoder.safetensors", "data/poisoned/clean_train.safetensors",
                 "data/poisoned/test.safetensors"):
        (other / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(project / path, other / path)
    learned = load_trigger(project / "data/trigger")
    save_trigger(load("trigger_scale").scaled(learned, 4.0), other / "data/trigger")
    result = bench.main(["--root", str(project), "--root", str(other), "--out", str(tmp_path / "matrix.json")])
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    differ = []
    for name in ("linear", "knn"):
        asr = np.array(result["asr"][name])  # rows: whose trigger, columns: whose encoder
        assert asr[0, 0] == pytest.approx(finetune["reference"][name]["asr"])
        assert np.array_equal(asr[:, 0], asr[:, 1])  # one encoder: two identical columns
        differ.append(asr[0, 0] != asr[1, 0])
        assert result["split"][name]["encoder"] == pytest.approx(0) and result["split"][name]["rest"] == pytest.approx(0)
        assert result["split"][name]["trigger"] == pytest.approx(1 if differ[-1] else 0)
    assert any(differ)  # four times the pattern reads differently under at least one reader
    assert np.allclose(result["pixel_correlation"], 1)  # the same pattern as an image, four times as strong
    assert "| mean |" in (tmp_path / "matrix.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--root", str(project), "--root", str(project), "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit):
        bench.main(["--root", str(project), "--root", str(other), "--victim", "poisoned", "--out", str(tmp_path / "m.json")])


def test_pattern_parts_reads_the_pipelines_own_pattern_first_on_both_victims(project, tmp_path, one_thread):
    bench = load("pattern_parts")
    result = bench.main(["--root", str(project), "--out", str(tmp_path / "parts.json")])
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    rows = {row["variant"]: row for row in result["roots"][0]["rows"]}
    for name in ("linear", "knn"):
        assert rows["own"]["poisoned"][name] == pytest.approx(finetune[name]["asr"])
        assert rows["own"]["reference"][name] == pytest.approx(finetune["reference"][name]["asr"])
    assert rows["mirrored"]["rms"] == pytest.approx(rows["own"]["rms"]) and rows["noise"]["rms"] == pytest.approx(16)
    assert "| shuffled |" in (tmp_path / "parts.md").read_text()


def test_pull_matrix_splits_additive_log_odds_into_rows_and_columns():
    """On a matrix whose log-odds add a row and a column effect, nothing is left for the rest; a pure column
    effect is all encoder."""
    split = load("pull_matrix").split_variance
    logit = np.array([0.0, 1.0, -1.0])[:, None] + np.array([0.5, -0.5])[None, :]
    additive = split(1 / (1 + np.exp(-logit)), count=10**9)
    assert additive["rest"] == pytest.approx(0, abs=1e-9)
    assert additive["trigger"] + additive["encoder"] == pytest.approx(1)
    assert additive["trigger"] == pytest.approx(2 * 2 / (2 * 2 + 3 * 0.5))  # row SS 2*(0+1+1), column SS 3*(.25+.25)
    columns = split(np.array([[0.2, 0.6], [0.2, 0.6]]), count=1000)
    assert columns == pytest.approx({"trigger": 0.0, "encoder": 1.0, "rest": 0.0})


def test_hit_overlap_reads_the_pipelines_asrs_and_splits_the_hits(project, tmp_path, one_thread):
    """The bench's ASRs are the pipeline's (victim and reference, recomputed from the stage outputs); its hit
    counts add up to them; with --rates and --trigger-params it reads a victim trained at that rate with a pattern
    refitted with the change, against the same reference."""
    bench = load("hit_overlap")
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    rate = yaml.safe_load((project / "params.yaml").read_text())["poison_rate"]
    rates = ["--rates", str(rate), "--cache", str(tmp_path / "victims"), "--quiet"]
    for extra in ([], [*rates, "--trigger-params", "{rounds: 1}"]):
        result = bench.main(["--root", str(project), *extra, "--out", str(tmp_path / "overlap.json")])
        rows = {row["reader"]: row["compare"] for row in result["rows"]}
        assert set(rows) == {"linear", "knn"}
        for name, row in rows.items():
            if "--trigger-params" not in extra:  # the pipeline's pattern: the reference reads what finetune read
                assert row["asr_reference"] == pytest.approx(finetune["reference"][name]["asr"])
            if not extra:
                assert row["asr_poisoned"] == pytest.approx(finetune[name]["asr"])
            assert row["both"] + row["poisoned_only"] == round(row["asr_poisoned"] * row["n"])
            assert row["both"] + row["reference_only"] == round(row["asr_reference"] * row["n"])
            assert np.isfinite([row["slope"], row["push"], row["pull"]]).all()
        assert (f"| rate {rate:g} | linear |" if extra else "| the pipeline's (") in (tmp_path / "overlap.md").read_text()
    written = json.loads((tmp_path / "overlap.json").read_text())["_run"]
    assert written["trigger_change"] == {"rounds": 1}


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


def test_activation_pattern_refits_the_attackers_models_and_reads_each_test_time_pattern_on_both_victims(
        project, tmp_path, one_thread):
    bench = load("activation_pattern")
    other = tmp_path / "other"  # another pipeline's files: here a copy, its reference encoder one more clean reader
    for path in bench.NEEDED:
        source = project / path
        (other / path).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, other / path)
    out = tmp_path / "act.json"
    result = bench.main(["--root", str(project), "--clean-root", str(other), "--weights", "0", "5", "--steps", "4",
                         "--quiet", "--out", str(out)])
    assert result["refit_matches"]  # the refit is the trigger stage's fit, to the bit: the same attacker's models
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    rows = {row["pattern"]: row for row in result["rows"]}
    assert list(rows) == ["own", "weight 0", "weight 5"]
    for name in ("linear", "knn"):  # the pipeline's own pattern first: the pipeline's own figures
        assert rows["own"]["poisoned"][name] == pytest.approx(finetune[name]["asr"])
        assert rows["own"]["reference"][name] == pytest.approx(finetune["reference"][name]["asr"])
    assert rows["own"]["correlation_with_own"] == pytest.approx(1)
    for name in ("linear", "knn"):  # the other root's reference victim (here the same encoder), as its pipeline reads it
        assert rows["own"]["clean_roots"][0][name] == pytest.approx(finetune["reference"][name]["asr"])
    for name, pattern in result["patterns"].items():
        assert np.abs(np.array(pattern)).max() <= 16
        assert 0 <= rows[name]["surrogate_hit_rate"] <= 1 and 0 <= rows[name]["clean_readers_hit_rate"] <= 1
    assert not np.array_equal(result["patterns"]["own"], result["patterns"]["weight 0"])  # the steps moved it
    assert "| weight 5 |" in out.with_suffix(".md").read_text()
    both = bench.main(["--root", str(project), "--weights", "0", "--steps", "2", "--poisoned-heads", "probe", "centroid",
                       "--quiet", "--out", str(tmp_path / "both.json")])
    assert both["poisoned_heads"] == ["probe", "centroid"] and "surrogate's probe and centroid" in (tmp_path / "both.md").read_text()
    for key in ("surrogate_hit_rate", "surrogate_centroid_hit_rate", "clean_copy_hit_rate", "poisoned", "reference"):
        assert both["rows"][0][key] == rows["own"][key]  # the same attacker's models, whatever heads the fit uses
    with pytest.raises(SystemExit, match="own reference victim"):
        bench.parse_args(["--root", str(project), "--clean-root", str(project)])
