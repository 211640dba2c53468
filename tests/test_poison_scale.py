"""`bench/poison_scale.py` on a tiny `dvc repro` in a throwaway git repository: the poisons at other amplitudes,
antithetic and hardened poisons, and victims that do not see some training images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benches import load
from pipeline_project import make_project, run


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("project"))
    run(["dvc", "repro"], root)
    return root


def test_poison_scale_retrains_the_pipelines_victim_at_scale_one_and_scales_only_the_poisons(project, tmp_path,
                                                                                           one_thread):
    """The first row is the pipeline's own victim; a victim the bench trains with the poisons at scale 1 is that
    victim again (the same readings to the digit), so the bench changes nothing but the poisons' amplitude. The
    reference and the test-time trigger are the pipeline's in every row."""
    bench = load("poison_scale")
    out = tmp_path / "poison_scale.json"
    result = bench.main(["--root", str(project), "--scales", "1", "2", "--quiet", "--out", str(out)])
    finetune = json.loads((project / "metrics/finetune.json").read_text())
    own, again, doubled = result["rows"]
    assert own["pipeline"] and not again["pipeline"]
    for name in ("linear", "knn"):
        assert own["readings"][0][name]["asr"] == pytest.approx(finetune[name]["asr"])
        assert result["reference"][0][name]["asr"] == pytest.approx(finetune["reference"][name]["asr"])
        assert again["readings"][0][name] == pytest.approx(own["readings"][0][name])
    losses = pd.read_parquet(project / "data/pretrain/losses.parquet")
    assert again["final_loss"] == pytest.approx(losses.loc[losses["epoch"] == losses["epoch"].max(), "loss"].mean())
    # Only the poisons change: twice the amplitude is a more visible poison, and a finite victim.
    assert (own["linf"], doubled["linf"]) == (16, 32)
    assert own["stealth"]["linf"] <= 16 < doubled["stealth"]["linf"] <= 32
    assert doubled["stealth"]["psnr"] < own["stealth"]["psnr"]
    assert np.isfinite(doubled["final_loss"]) and "| 2 (32) |" in out.with_suffix(".md").read_text()
    for bad in (["--scales", "0"], ["--scales", "1", "--test-scales", "-1"], ["--scales", "16"],
                ["--scales", "1", "--rate", "1.5"], ["--scales", "1", "--negatives", "-1"],
                ["--scales", "1", "--negatives", "100000"], ["--scales", "1", "--harden", "300"],
                ["--scales", "1", "--harden", "4", "--harden-steps", "0"], ["--scales", "1", "--harden-kind", "blur"]):
        with pytest.raises(SystemExit):
            bench.main(["--root", str(project), *bad, "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_poison_scale_negatives_stamp_the_negated_pattern_on_non_target_images_only(project):
    """Antithetic poisons: exactly `count` non-target images change, each by minus the pattern (up to the clip),
    and no target image."""
    from cba.readings import pipeline_params, pipeline_sets, scaled_pattern
    from cba.triggers import load_trigger

    bench = load("poison_scale")
    clean, _ = pipeline_sets(project)
    target = int(pipeline_params(project)["target_class"])
    trigger = scaled_pattern(load_trigger(project / "data/trigger"), 1.0)
    stamped = bench.with_negatives(clean, trigger, 20, target=target, seed=0)
    changed = np.flatnonzero((stamped.images != clean.images).reshape(len(clean), -1).any(1))
    assert len(changed) == 20 and not np.any(clean.labels[changed] == target)
    delta = stamped.images[changed].astype(float) - clean.images[changed].astype(float)
    expected = (np.clip(clean.images[changed] - trigger.perturbation(), 0, 255).round() - clean.images[changed])
    assert np.abs(delta - expected).max() <= 1
    assert bench.with_negatives(clean, trigger, 0, target=target, seed=0) is clean
    again = bench.with_negatives(clean, trigger, 20, target=target, seed=0)
    assert np.array_equal(again.images, stamped.images)  # seeded


def test_poison_scale_hardening_changes_only_the_poisons_within_its_budget(project, tmp_path, one_thread):
    """`--harden`: each poison, and no other image, carries its own perturbation within the budget, and the victim
    trains on the hardened poisons, with the pipeline's pattern on top."""
    from cba.poison import choose_poison_indices
    from cba.readings import pipeline_params, pipeline_sets

    bench = load("poison_scale")
    clean, test = pipeline_sets(project)
    params = pipeline_params(project)
    target, rate, seed = int(params["target_class"]), float(params["poison_rate"]), int(params["seed"])
    mode = bench.pipeline_poison_mode(project)
    chosen = choose_poison_indices(clean.labels, rate, target, mode, seed)
    plan = pipeline_plan(bench, project, ["--scales", "1", "--harden", "4", "--harden-kind", "random"])
    hardened, readings = bench.with_hardening(plan, "random", None)
    assert readings == {}  # no surrogate reads an unaimed perturbation
    changed = np.flatnonzero((hardened.images != clean.images).reshape(len(clean), -1).any(1))
    assert np.array_equal(changed, chosen)
    assert np.abs(hardened.images.astype(int) - clean.images.astype(int)).max() == 4
    out = tmp_path / "views.json"
    result = bench.main(["--root", str(project), "--scales", "1", "--harden", "4", "--harden-kind", "views",
                         "random", "--harden-steps", "5", "--quiet", "--out", str(out)])
    own, views, blind = result["rows"]
    assert (views["harden_kind"], blind["harden_kind"], blind["surrogate"]) == ("views", "random", {})
    # The surrogate's readings are recorded (what they do is tested on a trained encoder in test_hardening.py;
    # the tiny pipeline's surrogate reads every view nearly alike).
    assert set(views["surrogate"]) == {"before", "after"}
    assert views["surrogate"]["before"] != views["surrogate"]["after"]
    assert views["stealth"]["linf"] <= own["stealth"]["linf"] + 4 and views["stealth"]["psnr"] < own["stealth"]["psnr"]
    assert np.isfinite(views["final_loss"]) and views["readings"][0] != own["readings"][0]
    text = out.with_suffix(".md").read_text()
    assert "hardened 4 (views)" in text and "hardened 4 (random)" in text and "- hardened 4 (views): view" in text


def test_poison_scale_drop_leaves_out_exactly_the_chosen_clean_images_and_keeps_the_poisons(project, tmp_path,
                                                                                           one_thread):
    """`--drop`: the dropped images are a seeded choice among the target's unpoisoned images (or, as the control,
    the non-target ones), never a poison; the victim trains on the pipeline's poisoned set less them. Stamping the
    poisons on the whole set first, as the drop path does, and training at rate 0 is the pipeline's victim again,
    so the drop path changes nothing but the images it leaves out."""
    from cba.poison import poison_dataset
    from cba.readings import pipeline_params, pipeline_sets

    bench = load("poison_scale")
    clean, _ = pipeline_sets(project)
    params = pipeline_params(project)
    target, rate, seed = int(params["target_class"]), float(params["poison_rate"]), int(params["seed"])
    mode = bench.pipeline_poison_mode(project)
    poisoned = poison_dataset(clean, load_pipeline_trigger(project), rate, target, mode, seed)
    chosen = poisoned.indices
    spare = np.setdiff1d(np.flatnonzero(clean.labels == target), chosen)
    dropped = bench.dropped_images(clean.labels, chosen, len(spare) - 1, "target", target, seed)
    assert len(dropped) == len(spare) - 1 and set(dropped) <= set(spare)
    assert np.array_equal(dropped, bench.dropped_images(clean.labels, chosen, len(spare) - 1, "target", target, seed))
    others = bench.dropped_images(clean.labels, chosen, 7, "other", target, seed)
    assert len(others) == 7 and not np.any(clean.labels[others] == target)
    assert not np.array_equal(others, bench.dropped_images(clean.labels, chosen, 7, "other", target, seed + 1))
    with pytest.raises(SystemExit, match=f"more than the {len(spare)} clean target"):
        bench.dropped_images(clean.labels, chosen, len(spare) + 1, "target", target, seed)
    smaller = bench.without(poisoned.train, dropped)
    assert len(smaller) == len(clean) - len(dropped)
    keep = np.setdiff1d(np.arange(len(clean)), dropped)
    assert np.array_equal(smaller.images, poisoned.train.images[keep])
    # Every poison is still in, and the only target images left beside them are the one spare not dropped.
    assert int(np.sum(smaller.labels == target)) == len(chosen) + 1

    out = tmp_path / "drop.json"
    result = bench.main(["--root", str(project), "--scales", "1", "--drop", str(len(spare)), "--drop-reference",
                         "--quiet", "--out", str(out)])
    own, dropped_row, reference = result["rows"]
    assert dropped_row["poisons"] == own["poisons"] == len(chosen) and reference["poisons"] == 0
    assert dropped_row["stealth"] == pytest.approx(own["stealth"]) and reference["stealth"] is None
    assert np.isfinite(dropped_row["final_loss"]) and np.isfinite(reference["final_loss"])
    assert dropped_row["readings"][0] != own["readings"][0] != reference["readings"][0]
    saved = json.loads(out.read_text())
    assert sorted(saved["dropped"]) == sorted(spare.tolist())  # every unpoisoned target image, and only those
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Victims that do not see some training images")
    assert f"| 1 (16) | {len(chosen)}, {len(spare)} clean " in text and f"| – | 0, {len(spare)} clean " in text

    # The drop path's way of poisoning (stamp on the whole set, train at rate 0) reproduces the pipeline's victim.
    plan = pipeline_plan(bench, project, ["--scales", "1", "--quiet"])
    assert np.array_equal(plan.chosen, chosen) and len(plan.dropped) == 0
    record, _ = bench.train_victim(plan, poisoned.train, load_pipeline_trigger(project), 0.0, "check")
    again = bench.readings_of(plan, record.encoder)
    for name in ("linear", "knn"):
        assert again[0][name] == pytest.approx(own["readings"][0][name])
    # Another draw of the control: the images the seed picks, named in the table.
    drawn = tmp_path / "drawn.json"
    bench.main(["--root", str(project), "--scales", "1", "--drop", "3", "--drop-from", "other", "--drop-seed", "7",
                "--quiet", "--out", str(drawn)])
    assert json.loads(drawn.read_text())["dropped"] == bench.dropped_images(clean.labels, chosen, 3, "other",
                                                                           target, 7).tolist()
    assert "3 non-target images left out (draw 7)" in drawn.with_suffix(".md").read_text()
    for bad in (["--drop", "-1"], ["--drop", "5", "--negatives", "5"], ["--drop-reference"],
                ["--drop", str(len(spare) + 1)]):
        with pytest.raises(SystemExit):
            bench.main(["--root", str(project), "--scales", "1", *bad, "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def load_pipeline_trigger(project: Path):
    from cba.readings import scaled_pattern
    from cba.triggers import load_trigger

    return scaled_pattern(load_trigger(project / "data/trigger"), 1.0)


def pipeline_plan(bench, project: Path, argv: list[str]):
    """The bench's plan for `argv` on the pipeline, as its `main` makes it."""
    from cba.readings import pipeline_params, pipeline_sets
    from cba.triggers import load_trigger

    args = bench.parse_args(["--root", str(project), *argv])
    trigger = load_trigger(project / "data/trigger")
    return bench.plan_for(args, pipeline_params(project), pipeline_sets(project), trigger, bench.pick_device("cpu"))
