"""The bench scripts run end to end on tiny settings and write the tables they promise.

Their figures at real sizes are in docs/results.md; here only that each script works
and that every row and cell it reports is filled from a real run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
# The learned trigger at a size that fits in seconds (the benches fit it as the pipeline does).
TINY_TRIGGER = "{surrogate_size: 150, surrogate_epochs: 1, surrogate_width: 4, rounds: 2, trigger_steps: 2, batch_size: 16}"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_compare_writes_one_row_per_method(tmp_path):
    out = tmp_path / "trl.md"
    load("trl_compare").main(["--train-size", "200", "--test-size", "60", "--epochs", "2", "--width", "4",
                              "--trigger", "optimized", "--trigger-params", TINY_TRIGGER, "--methods", "simclr,supervised", "--eval-every", "1",
                              "--quiet", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["simclr", "supervised"]
    assert [r["mode"] for r in rows] == ["clean_label", "dirty_label"]
    for row in rows:
        assert 0 <= row["knn_acc"] <= 1 and 0 <= row["knn_asr"] <= 1 and 0 <= row["max_loss_auroc"] <= 1
        assert [c["epoch"] for c in row["curves"]] == [1, 2] and "knn_acc" in row["curves"][0]
    assert rows[1]["head_acc"] is not None and "head_acc" not in rows[0]
    text = out.read_text()
    assert "| simclr | clean_label |" in text and "| supervised | dirty_label |" in text


def test_trigger_ablation_writes_one_row_per_variant_and_rate(tmp_path):
    out = tmp_path / "ab.md"
    load("trigger_ablation").main(["--variants", "full,no_agree,random", "--clean", "random", "--dataset", "synthetic",
                                   "--train-size", "200", "--test-size", "60", "--epochs", "1", "--width", "4",
                                   "--trigger-params", TINY_TRIGGER, "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["variant"], r["poison_rate"]) for r in rows] == [("full", 0.05), ("no_agree", 0.05), ("random", 0.0),
                                                                 ("random", 0.05)]
    for row in rows:
        assert 0 <= row["probe_asr"] <= 1 and 0 <= row["knn_asr"] <= 1 and row["survival"] == row["survival"]
    assert rows[0]["fit_s"] > 0 and 0 <= rows[0]["hit_rate"] <= 1 and rows[2]["fit_s"] == 0
    assert "| no_agree | 0.05" in out.read_text()


def test_trl_compare_rejects_an_unknown_method():
    with pytest.raises(SystemExit):
        load("trl_compare").parse_args(["--methods", "simclr,dino"])


def test_defense_matrix_fills_every_cell(tmp_path):
    out = tmp_path / "dm.md"
    load("defense_matrix").main(["--train-size", "200", "--test-size", "60", "--epochs", "1", "--width", "4", "--fast",
                                 "--attacks", "badnets,optimized", "--trigger-params", TINY_TRIGGER,
                                 "--defenses", "spectral,strip", "--nc-steps", "2",
                                 "--nc-images", "10", "--quiet", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["matrix"]) == {"spectral", "strip"}
    for cells in result["matrix"].values():
        for attack in ("badnets", "optimized"):
            assert "error" not in cells[attack] and 0 <= cells[attack]["auroc"] <= 1
    timing = result["nc_timing"]
    assert (timing["steps"], timing["images"]) == (2, 10)
    assert timing["speedup"] == pytest.approx(timing["per_class"] / timing["batched"])
    assert "BadNets (supervised)" in out.read_text()


def test_throughput_times_both_pipelines_and_breaks_down_cba_step(tmp_path):
    bench = load("throughput")
    # The baseline's per-image augmentation: a valid image always; the identity with every probability at 0 and scale 1.
    import torch

    x = torch.rand(3, 32, 32)
    views = torch.stack([bench.PerImageAugment()(x) for _ in range(20)])
    assert views.shape == (20, 3, 32, 32) and views.dtype == torch.float32 and 0 <= views.min() and views.max() <= 1
    assert not torch.equal(views[0], views[1])
    identity = bench.PerImageAugment(scale=(1.0, 1.0), p_flip=0, p_jitter=0, p_gray=0)
    assert all(torch.equal(identity(x), x) for _ in range(5))
    assert torch.allclose(bench._hsv_to_rgb(bench._rgb_to_hsv(x)), x, atol=1e-5)

    out = tmp_path / "tp.md"
    argv = ["--images", "32", "--batch-size", "16", "--epochs", "1", "--steps", "2", "--width", "4", "--workers", "0",
            "--device", "cpu", "--quiet", "--out", str(out)]
    result = bench.main(argv)
    saved = json.loads(out.with_suffix(".json").read_text())
    cba, base = saved["rows"]
    assert (cba["pipeline"], base["pipeline"]) == ("cba", "baseline")
    for row in (cba, base):
        assert 0 < row["images_per_s"] < float("inf") and 0 < row["s_per_epoch"] < float("inf")
        assert row["images_per_s"] == pytest.approx(row["images_per_epoch"] / row["s_per_epoch"])
        assert row["images_per_epoch"] == 32 and row["steps_per_epoch"] == 2
    parts = cba["breakdown"]
    assert parts["aug_ms"] > 0 and parts["fwd_bwd_ms"] > 0 and parts["optimizer_ms"] > 0 and parts["steps"] == 2
    # The three parts are most of the instrumented step, never more; that step is the size of train()'s (loose: shared CPUs).
    assert 0.5 * parts["step_ms"] <= parts["aug_ms"] + parts["fwd_bwd_ms"] + parts["optimizer_ms"] <= parts["step_ms"]
    assert 1 / 20 < parts["step_ms"] / cba["step_ms"] < 20
    assert 0 <= base["breakdown"]["aug_ms"] <= base["step_ms"]
    assert saved["ratio"] == pytest.approx(cba["images_per_s"] / base["images_per_s"]) == result["ratio"]
    assert saved["env"]["device"] == "cpu" and saved["env"]["device_name"] and saved["env"]["torch"]
    assert saved["argv"][1:] == argv and saved["env"]["torch_threads"] >= 1
    text = out.read_text()
    assert "| cba | " in text and "| baseline | " in text and "Ratio cba / baseline" in text and "--images 32" in text


def test_attack_levers_selection_poisons_exactly_the_chosen_target_images():
    import numpy as np

    levers = load("attack_levers")
    labels = np.array([0, 1, 0, 0, 2, 0, 1, 0, 0, 0])
    ratio = np.array([0.9, 0.0, 0.1, 0.5, 0.0, 0.3, 0.0, 0.7, 0.2, 0.8])
    random_pick = levers.selection("random", ratio)(labels, 0.3, 0, "clean_label", 0)
    assert len(random_pick) == 3 and (labels[random_pick] == 0).all()
    assert levers.selection("gray", ratio)(labels, 0.3, 0, "clean_label", 0).tolist() == [2, 5, 8]  # lowest ratios
    assert levers.selection("strong", ratio)(labels, 0.3, 0, "clean_label", 0).tolist() == [0, 7, 9]  # highest
    assert levers.selection("typical", ratio)(labels, 0.3, 0, "clean_label", 0).tolist() == [0, 7, 9]  # highest score


def test_attack_levers_reads_the_attackers_settings_as_the_trigger_stage_does():
    """params.yaml's learned-trigger options over the trigger's defaults, checked by the trigger itself."""
    from cba.errors import ConfigError
    from cba.triggers.optimized import OptimizedTrigger

    levers = load("attack_levers")
    given = {"seed": 0, "trigger": {"name": "optimized", "params": {"surrogate_size": 400, "surrogate_epochs": 3}}}
    assert levers.attacker_settings(given) == (400, 3)
    defaults = (OptimizedTrigger.defaults["surrogate_size"], OptimizedTrigger.defaults["surrogate_epochs"])
    assert levers.attacker_settings({"seed": 0, "trigger": {"name": "optimized"}}) == defaults
    assert levers.attacker_settings({"seed": 0, "trigger": {"name": "ctrl", "params": {"magnitude": 50}}}) == defaults
    with pytest.raises(ConfigError, match="surrogate_epochs"):
        levers.attacker_settings({"seed": 0, "trigger": {"name": "optimized", "params": {"surrogate_epochs": -1}}})


def test_attack_levers_patterns_keep_their_budget():
    import numpy as np

    from cba.data import load_dataset

    levers = load("attack_levers")
    disc = levers.disc_pattern(32, 16.0)
    assert np.abs(disc).max() == 16.0 and disc[16, 16, 0] == 16.0 and disc[0, 0, 0] == -16.0
    tint = levers.tint_pattern(32, 16.0)
    assert (tint == np.array([16.0, -16.0, 16.0])).all()  # one cast on every pixel: no shape, no texture
    assert abs(float(tint[0, 0] @ levers.LUMA)) < 0.2 * 16  # nearly pure chroma
    data = load_dataset("synthetic", "train", seed=0, train_size=120)
    pattern = levers.supervised_pattern(data.images, data.labels == 0, 8.0, seed=0, epochs=1, steps=3)
    assert pattern.shape == (32, 32, 3) and 0 < np.abs(pattern).max() <= 8.0 + 1e-4


def test_attack_levers_sensitive_pattern_moves_the_encoder_more_than_a_random_one():
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cba.models import build_backbone

    levers = load("attack_levers")
    torch.manual_seed(0)
    encoder = build_backbone("convnet", width=4).eval()
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    pattern = levers.sensitive_pattern(encoder, images, 8.0, seed=0, steps=30, batch_size=32)
    assert pattern.shape == (32, 32, 3) and np.abs(pattern).max() <= 8.0 + 1e-4
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255

    def cosine(p: np.ndarray) -> float:
        delta = torch.as_tensor(p, dtype=torch.float32).permute(2, 0, 1) / 255
        with torch.no_grad():
            return float(F.cosine_similarity(encoder((x + delta).clamp(0, 1)), encoder(x)).mean())

    random_signs = np.sign(np.random.default_rng(1).standard_normal((32, 32, 3))) * 8.0
    assert cosine(pattern) < cosine(random_signs)


def test_attack_levers_runs_one_victim_end_to_end(tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(epochs=1, width=4, batch_size=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    row = load("attack_levers").main(["--pattern", "disc:16", "--select", "gray", "--params", str(tmp_path / "params.yaml")])
    assert row["pattern"] == "disc:16" and row["rate"] == params["poison_rate"]
    assert 0 <= row["probe_asr"] <= 1 and 0 <= row["knn_asr"] <= 1 and 0 <= row["probe_on_poisons"] <= 1
    assert row["final_loss"] == row["final_loss"]  # finite, not NaN
    assert 0 <= row["poisons_near_clean"] <= 1 and 0 <= row["poisons_near_triggered"] <= 1
    assert row["offset_norm"] > 0 and -1 <= row["offset_target_alignment"] <= 1


def test_attack_levers_caches_the_clean_twin_and_only_randomly_selected_poisoned_victims(tmp_path):
    """The cache key holds no selection rule: a poisoned victim whose poisons a lever chose must never be cached,
    or a later run with the pipeline's random choice would load it."""
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(epochs=1, width=4, batch_size=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    levers, cache = load("attack_levers"), tmp_path / "victims"
    common = ["--pattern", "disc:16", "--clean", "--cache", str(cache), "--params", str(tmp_path / "params.yaml")]
    gray = levers.main(["--select", "gray", *common])
    assert len(list(cache.iterdir())) == 1  # the clean twin alone
    again = levers.main(["--select", "gray", *common])
    assert again == gray  # the clean twin loaded, the gray-selected victim trained again the same way
    random = levers.main(["--select", "random", *common, "--out", str(tmp_path / "levers.jsonl")])
    assert len(list(cache.iterdir())) == 2 and random["clean_knn_asr"] == gray["clean_knn_asr"]
    assert levers.main(["--select", "random", *common, "--out", str(tmp_path / "levers.jsonl")]) == random
    lines = [json.loads(line) for line in (tmp_path / "levers.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0] == lines[1]  # appended, not overwritten; the same row from the cache
    assert lines[0]["select"] == "random" and "--select random" in lines[0]["command"]
    assert lines[0]["env"]["torch"] == torch.__version__ and lines[0]["knn_asr"] == round(random["knn_asr"], 4)


def test_attack_levers_typical_selection_end_to_end(tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(epochs=1, width=4, batch_size=64)
    params["trigger"]["params"].update(surrogate_size=100, surrogate_epochs=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    levers = load("attack_levers")
    row = levers.main(["--pattern", "disc:16", "--select", "typical", "--params", str(tmp_path / "params.yaml")])
    assert row["select"] == "typical" and 0 <= row["target_near_poisons"] <= 1 and 0 <= row["knn_asr"] <= 1


def test_attack_levers_composite_mode_with_a_patch(tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(epochs=1, width=4, batch_size=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    row = load("attack_levers").main(["--pattern", "patch:6", "--mode", "composite", "--min-scale", "0.2",
                                      "--params", str(tmp_path / "params.yaml")])
    assert row["mode"] == "composite" and row["min_scale"] == 0.2 and 0 <= row["probe_asr"] <= 1


def test_maturity_reads_poisoned_and_clean_victims_at_every_step(tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(width=4, batch_size=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "maturity.json"
    result = load("maturity").main(["--epochs", "2", "--every", "1", "--clean", "--trigger-params", TINY_TRIGGER,
                                    "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [run["victim"] for run in runs] == ["poisoned (0.05)", "clean (0)"] == [run["victim"] for run in result["runs"]]
    for run in runs:
        assert [r["epoch"] for r in run["rows"]] == [1, 2]
        for row in run["rows"]:
            assert row["loss"] == row["loss"] and all(0 <= row[k] <= 1 for k in ("knn_acc", "knn_asr", "linear_acc", "linear_asr"))
    assert "| clean (0) | 2 |" in out.with_suffix(".md").read_text()
    figure = out.with_suffix(".png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()
    assert load("maturity").main(["--plot-from", str(out)])["runs"] == runs  # redrawn from the JSON, no training
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as caught:
        load("maturity").main(["--plot-from", str(out.with_suffix(".md"))])
    assert str(caught.value).startswith("--plot-from ") and "\n" not in str(caught.value)


def test_surrogate_view_reads_the_surrogate_and_runs_both_matching_schedules(tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 300, "test_size": 200}
    params["trigger"]["params"].update(yaml.safe_load(TINY_TRIGGER))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "view.json"
    result = load("surrogate_view").main(["--epochs", "2", "--every", "1", "--matching-steps", "10",
                                          "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [row["epoch"] for row in result["separability"]] == [1, 2]
    for row in result["separability"]:
        for head in ("centroid", "probe"):
            assert set(row[head]) == {"all", "ring", "square", "triangle", "plus", "tee", "stripes", "checker", "crescent",
                                      "dumbbell"}
            assert all(0.0 <= v <= 1.0 for v in row[head].values())
    for schedule in ("fixed", "fresh"):
        rows = result["matching"][schedule]
        assert [r["step"] for r in rows] == [0, 10]
        # A zero pattern adds nothing to the poisons' gradient: no alignment, loss exactly 1.
        assert rows[0]["held_out_match"] == 1.0 and 0.0 <= rows[1]["held_out_match"] <= 2.0


def test_target_sweep_aims_each_variant_at_the_target_and_reads_all_on_one_clean_victim(tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(width=4, batch_size=64, epochs=1)
    params["trigger"]["params"].update(yaml.safe_load(TINY_TRIGGER))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "sweep.json"
    argv = ["--targets", "1", "--trigger-params", "{}", "{w_neutral: 0.0}", "--rates", "0.05", "0.06",
            "--params", str(tmp_path / "params.yaml"), "--cache", str(tmp_path / "victims"), "--out", str(out)]
    result = load("target_sweep").main(argv)
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["rows"] and [(r["target"], r["change"], r["poison_rate"]) for r in rows] == [
        ("ring", {}, 0.05), ("ring", {}, 0.06), ("ring", {"w_neutral": 0.0}, 0.05), ("ring", {"w_neutral": 0.0}, 0.06)]
    # One fit serves every rate: the attacker's figures are the pattern's, whatever the rate.
    assert rows[0]["hit_rate"] == rows[1]["hit_rate"] and rows[2]["hit_rate"] == rows[3]["hit_rate"]
    for row in rows:
        for victim in ("poisoned", "clean"):
            for reader in ("linear", "knn"):
                m = row[victim][reader]
                assert all(0 <= m[k] <= 1 for k in ("acc", "asr", "natural_rate"))
                assert row["target"] not in m["landing"] and len(m["landing"]) == 2
        assert 0 <= row["hit_rate"] <= 1 and 0 <= row["clean_hit_rate"] <= 1 and 0 <= row["clean_probe_hit_rate"] <= 1
        assert all(1 < loss < 6 for loss in row["final_loss"].values())  # NT-Xent at batch 64, after one epoch
    assert len({row["final_loss"]["clean"] for row in rows}) == 1
    # One clean victim reads every pattern: its clean accuracy cannot differ between targets.
    assert len({row["clean"]["linear"]["acc"] for row in rows}) == 1 == len({row["clean"]["knn"]["acc"] for row in rows})
    assert "| ring |" in out.with_suffix(".md").read_text()
    # The victims are cached: one clean and one per variant and rate. A second sweep loads them and reads the same.
    assert len(list((tmp_path / "victims").iterdir())) == 5
    assert load("target_sweep").main(argv)["rows"] == rows


def test_trigger_asr_reads_every_trigger_on_its_poisoned_victim_and_one_clean_one(tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(width=4, batch_size=64, epochs=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "asr.json"
    argv = ["--variants", "patch,ctrl_y", "--params", str(tmp_path / "params.yaml"), "--cache", str(tmp_path / "victims"),
            "--out", str(out)]
    load("trigger_asr").main(argv)
    result = json.loads(out.read_text())
    assert set(result) == {"patch", "ctrl_y", "_run"} and result["_run"]["train_size"] == 200
    for name in ("patch", "ctrl_y"):
        assert all(0 <= result[name][k] <= 1 for k in ("linear_asr", "knn_asr", "clean_asr", "clean_knn_asr", "linear_acc"))
        # SimCLR's NT-Xent at batch 64 starts near log(127) and one epoch cannot take it near zero
        assert 1 < result[name]["final_loss"] < 6 and 1 < result[name]["clean_final_loss"] < 6
    assert result["patch"]["clean_final_loss"] == result["ctrl_y"]["clean_final_loss"]
    # One clean victim serves both triggers: the cache holds it and one poisoned victim per trigger.
    assert len(list((tmp_path / "victims").iterdir())) == 3


@pytest.mark.parametrize("argv, message", [
    (["--targets", "12"], "--targets [12]: not a class of synthetic; allowed 0 to 9"),
    (["--trigger-params", "[1, 2]"], "--trigger-params [1, 2]: not a YAML mapping"),
])
def test_target_sweep_refuses_bad_input_before_training(argv, message):
    with pytest.raises(SystemExit) as caught:
        load("target_sweep").main([*argv, "--out", "/nonexistent/never_written.json"])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.parametrize("argv, message", [
    (["--trigger-params", "{w_neutral: -1}"], "w_neutral"),
    (["--rates", "0.05", "1.5"], r"poison_rate=1.5 is not valid: a number in \[0, 1\]"),
    (["--targets", "4", "--rates", "0.2"], "needs 2000 images from the target class, which holds 980; use at most 0.0980"),
])
def test_target_sweep_refuses_a_bad_trigger_option_or_rate_before_training(argv, message):
    from cba.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load("target_sweep").main([*argv, "--out", "/nonexistent/never_written.json"])


@pytest.mark.parametrize("bench", ["defense_matrix", "trl_compare"])
def test_benches_default_to_the_pipelines_attack_and_flags_win(bench, tmp_path):
    import yaml

    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params.update(seed=3, target_class=7, poison_rate=0.02)
    params["data"]["options"] = {"train_size": 400, "test_size": 80}
    params["pretrain"].update(epochs=6, width=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = load(bench).parse_args(["--params", str(tmp_path / "params.yaml")])
    got = {k: getattr(args, k) for k in ("seed", "target_class", "poison_rate", "train_size", "test_size", "epochs", "width")}
    assert got == {"seed": 3, "target_class": 7, "poison_rate": 0.02, "train_size": 400, "test_size": 80, "epochs": 6, "width": 8}
    args = load(bench).parse_args(["--params", str(tmp_path / "params.yaml"), "--target-class", "2", "--epochs", "1"])
    assert (args.target_class, args.epochs, args.seed) == (2, 1, 3)


@pytest.mark.parametrize("bench", ["defense_matrix", "trl_compare"])
@pytest.mark.parametrize("argv, message", [
    (["--params", "/nonexistent/params.yaml"], "--params /nonexistent/params.yaml: no such file"),
    (["--poison-rate", "1.5"], "--poison-rate 1.5: outside [0, 1]"),
])
def test_benches_refuse_bad_input_in_one_line(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        load(bench).parse_args(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def test_stage_startup_times_each_module_against_the_baseline(tmp_path):
    out = tmp_path / "startup.json"
    # Light modules keep the test quick; the bench's default baseline is torch.
    result = load("stage_startup").main(["--baseline", "json", "--modules", "cba.errors", "--runs", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["rows"] and list(result["rows"]) == ["json", "cba.errors"]
    for row in rows.values():
        assert row["runs"] == 2 and row["wall_median"] > 0 and row["cpu_median"] > 0 and row["wall_ratio"] > 0
        assert row["heavy"] == []
    assert rows["json"]["wall_ratio"] == 1.0
    assert "| cba.errors |" in out.with_suffix(".md").read_text()


def test_stage_startup_names_the_heavy_packages_a_module_loads():
    bench = load("stage_startup")
    assert bench.heavy_packages("sklearn.cluster") == ["sklearn", "scipy"]
    # No stage's start-up loads sklearn, scipy, matplotlib or kornia: the code that uses them imports them when it runs.
    assert bench.heavy_packages("stages.defend") == []
    assert bench.heavy_packages("stages.pretrain") == []
    assert bench.heavy_packages("kornia.augmentation") == ["kornia"]
