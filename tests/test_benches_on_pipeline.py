"""The benches that read a finished pipeline, on a tiny `dvc repro` in a throwaway git repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from benches import load
from pipeline_project import DEFENSES, make_project, run


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("project"))
    run(["dvc", "repro"], root)
    return root


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
    from cba.readings import scaled_pattern
    from cba.triggers import load_trigger
    learned = load_trigger(project / "data/trigger")
    doubled = scaled_pattern(learned, 2.0)
    grey = np.full((1, 32, 32, 3), 128, dtype=np.uint8)  # mid-grey: no clip within +-32
    added = doubled.apply(grey).astype(float) - learned.apply(grey).astype(float)
    assert np.abs(added - (learned.apply(grey).astype(float) - 128)).max() <= 1  # twice the pattern, up to rounding
    with pytest.raises(SystemExit, match="L-inf would be 320; allowed a scale above 0 and up to 15.9375"):
        scaled_pattern(learned, 20.0)


def test_pull_matrix_reads_each_pipelines_own_pull_on_the_diagonal_and_splits_the_spread(project, tmp_path, one_thread):
    """The diagonal is each pipeline's own reference reading; a second root with the same encoder and four times
    the pattern makes two identical columns, so the whole spread belongs to the trigger."""
    from cba.readings import scaled_pattern
    from cba.triggers import load_trigger, save_trigger

    bench = load("pull_matrix")
    other = tmp_path / "other"
    for path in ("params.yaml", "data/reference/encoder.safetensors", "data/poisoned/clean_train.safetensors",
                 "data/poisoned/test.safetensors"):
        (other / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(project / path, other / path)
    learned = load_trigger(project / "data/trigger")
    save_trigger(scaled_pattern(learned, 4.0), other / "data/trigger")
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
    seed = yaml.safe_load((project / "params.yaml").read_text())["seed"]
    assert result["fit_seed"] == seed  # by default the fits draw as the pipeline does
    other_draws = bench.main(["--root", str(project), "--weights", "5", "--steps", "4", "--fit-seed", str(seed + 1),
                              "--quiet", "--out", str(tmp_path / "draws.json")])
    for key in ("poisoned", "reference", "clean_copy_hit_rate"):  # the victims and the refit's copy read it as before
        assert other_draws["rows"][0][key] == rows["own"][key]
    assert not np.array_equal(other_draws["patterns"]["weight 5"], result["patterns"]["weight 5"])
    assert f"fit seed {seed + 1}" in (tmp_path / "draws.md").read_text()
    twins = bench.main(["--root", str(project), "--poisoned-root", str(other), "--weights", "5", "--steps", "4",
                        "--diversity", "0.5", "--labels", "true", "--quiet", "--out", str(tmp_path / "twins.json")])
    for name in ("linear", "knn"):  # the other root's poisoned victim (here the same encoder), as its pipeline reads it
        assert twins["rows"][0]["poisoned_roots"][0][name] == pytest.approx(finetune[name]["asr"])
    assert twins["rows"][0]["poisoned"] == rows["own"]["poisoned"] and twins["diversity"] == 0.5
    assert not np.array_equal(twins["patterns"]["weight 5"], result["patterns"]["weight 5"])  # more readers, other steps
    text = (tmp_path / "twins.md").read_text()
    assert "input diversity 0.5, heads on true labels, 1 more poisoned reader" in text and "; their poisoned victims " in text
    for flag in ("--clean-root", "--poisoned-root"):
        with pytest.raises(SystemExit, match="own victims"):
            bench.parse_args(["--root", str(project), flag, str(project)])


def test_test_pattern_defenses_reruns_the_pipelines_own_stages_with_the_test_time_pattern(
        project, tmp_path, one_thread, monkeypatch):
    from benches import refused
    from cba.readings import ENCODERS, asr_by_trigger, read_pipeline_triggers
    from cba.triggers import load_trigger
    from cba.triggers.optimized import OptimizedTrigger

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the stages rerun as the pipeline ran them
    bench = load("test_pattern_defenses")
    trigger = load_trigger(project / "data/trigger")
    own = trigger.tensors()["pattern"].numpy()
    patterns = tmp_path / "act.json"  # what bench/activation_pattern.py writes, cut to what this bench reads
    patterns.write_text(json.dumps({"patterns": {"own": own.tolist(), "negated": (-own).tolist()}}))
    finetune_before = (project / "metrics/finetune.json").read_text()
    out = tmp_path / "tpd.json"
    result = bench.main(["--root", str(project), "--patterns", str(patterns), "--pattern", "own", "--pattern", "negated",
                         "--out", str(out)])
    runs = result["runs"]
    assert list(runs) == ["pipeline's own (root's metrics)", "own", "negated"]
    pipeline, again, negated = runs.values()
    assert again == pipeline  # the pipeline's stages, rerun on its own pattern, give its figures back
    assert set(negated["defenses"]) == set(DEFENSES)
    # The poisons and encoders are the pipeline's: a training-set detector and both victims' ACC do not move ...
    assert negated["defenses"]["spectral"] == pipeline["defenses"]["spectral"]
    assert negated["acc"] == pipeline["acc"]
    # ... while what reads triggered test images does: the readings are the negated pattern's on both victims,
    params = yaml.safe_load((project / "params.yaml").read_text())
    expected = asr_by_trigger(read_pipeline_triggers(
        project, params, [OptimizedTrigger.from_pattern(-own, float(trigger.params["linf"]))], ENCODERS))[0]
    for victim in ("poisoned", "reference"):
        for reader in ("linear", "knn"):
            assert negated["readings"][victim][reader] == pytest.approx(expected[victim][reader])
    # ... which differ from the own pattern's wherever the two patterns read differently at all (on a processor
    # whose float stream makes them tie on this small fixture, the runs must tie too).
    own_expected = asr_by_trigger(read_pipeline_triggers(project, params, [trigger], ENCODERS))[0]
    assert (negated["readings"] != pipeline["readings"]) == (expected != own_expected)
    assert negated["defenses"]["strip"] != pipeline["defenses"]["strip"]  # STRIP screens the triggered inputs
    # The root is only read.
    assert np.array_equal(load_trigger(project / "data/trigger").tensors()["pattern"].numpy(), own)
    assert (project / "metrics/finetune.json").read_text() == finetune_before
    table = out.with_suffix(".md").read_text()
    assert "test-time pattern: negated" in table and "| strip | input_detection |" in table
    # Patterns fitted on another pipeline, a pattern the result lacks, a defense the root never ran: refused.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"patterns": {"own": (own / 2).tolist()}}))
    base = ["--root", str(project), "--patterns", str(patterns)]
    assert refused(bench.parse_args, ["--root", str(project), "--patterns", str(other), "--pattern", "own"]) == 2
    assert refused(bench.parse_args, [*base, "--pattern", "weight 7"]) == 2
    assert refused(bench.parse_args, [*base, "--pattern", "own", "--defenses", "abl"]) == 2


def test_cross_target_reads_the_pipelines_asr_and_patterns_aimed_elsewhere(project, tmp_path, one_thread):
    """With no other aim, the pipeline's own pattern is read as the pipeline reads it; a pattern aimed at another
    class is fitted once, saved, read on images of neither class, and reused from its folder."""
    bench = load("cross_target")
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    target = params["target_class"]
    alone = bench.main(["--root", str(project), "--quiet", "--out", str(tmp_path / "alone.json")])
    own, noise = alone["rows"]
    assert (own["aimed_at"], noise["aimed_at"]) == (alone["target"], bench.RANDOM)
    for reader in ("linear", "knn"):
        assert own["poisoned"][reader]["target"] == pytest.approx(finetune[reader]["asr"])
        assert own["reference"][reader]["target"] == pytest.approx(finetune["reference"][reader]["asr"])

    aim = (target + 1) % 10
    patterns = tmp_path / "patterns"
    first = bench.main(["--root", str(project), "--aims", str(aim), "--patterns", str(patterns), "--quiet",
                        "--out", str(tmp_path / "cross.json")])
    from cba.data.io import load_imageset
    from cba.triggers import load_trigger, save_trigger

    test_labels = load_imageset(project / "data/poisoned/test.safetensors").labels
    assert first["images"] == int(np.sum((test_labels != target) & (test_labels != aim)))
    aimed = first["rows"][1]
    assert aimed["aim"] == aim and (patterns / f"aim_{aim}").is_dir()
    for reader in ("linear", "knn"):  # as the test-time trigger, the own pattern is read on the pipeline's ASR set
        assert first["rows"][0]["asr"]["poisoned"][reader] == pytest.approx(finetune[reader]["asr"])
        assert first["rows"][0]["asr"]["reference"][reader] == pytest.approx(finetune["reference"][reader]["asr"])
    for reader in ("linear", "knn"):
        got, ref = aimed["poisoned"][reader], aimed["reference"][reader]
        assert 0 <= got["target"] + got["aim"] <= 1 and 0 <= ref["target"] + ref["aim"] <= 1
        odds = lambda p: min(max(p, 1e-3), 1 - 1e-3) / (1 - min(max(p, 1e-3), 1 - 1e-3))  # noqa: E731
        assert aimed["multiplier"][reader]["aim"] == pytest.approx(odds(got["aim"]) / odds(ref["aim"]))
    # A pattern already in the folder is read, not refitted: put the random one there, and the aimed row reads it.
    save_trigger(bench.random_signs(load_trigger(project / "data/trigger"), params["seed"]), patterns / f"aim_{aim}")
    again = bench.main(["--root", str(project), "--aims", str(aim), "--patterns", str(patterns), "--quiet",
                        "--out", str(tmp_path / "again.json")])
    for name in ("poisoned", "reference"):
        for reader in ("linear", "knn"):
            assert again["rows"][1][name][reader]["target"] == again["rows"][2][name][reader]["target"]
    assert "| random signs |" in (tmp_path / "cross.md").read_text()
    with pytest.raises(SystemExit, match="--aims"):
        bench.main(["--root", str(project), "--aims", str(target), "--out", str(tmp_path / "bad.json")])
    # A fixed trigger is not fitted to a class: aiming it elsewhere is refused before any work.
    fixed = tmp_path / "fixed"
    for path in ("params.yaml", "data/pretrain/encoder.safetensors", "data/reference/encoder.safetensors",
                 "data/poisoned/clean_train.safetensors", "data/poisoned/test.safetensors"):
        (fixed / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(project / path, fixed / path)
    from cba.triggers import build_trigger

    save_trigger(build_trigger("patch", {}, seed=0, image_size=32), fixed / "data/trigger")
    with pytest.raises(SystemExit, match="patch, is fixed"):
        bench.main(["--root", str(fixed), "--aims", str(aim), "--out", str(tmp_path / "fixed.json")])
