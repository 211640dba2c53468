"""The bench scripts run end to end on tiny settings and write the tables they promise.

Their figures at real sizes are in docs/results.md; here only that each script works
and that every row and cell it reports is filled from a real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benches import BENCH, load

from cba.errors import ConfigError

# The learned trigger at a size that fits in seconds (the benches fit it as the pipeline does).
TINY_TRIGGER = "{surrogate_size: 150, surrogate_epochs: 1, surrogate_width: 4, rounds: 2, trigger_steps: 2, batch_size: 16}"


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
        # Two epochs of training turn the weights, but not all the way round.
        assert 0 <= row["init_knn_acc"] <= 1 and 0 < row["init_cosine"] < 1
    assert rows[0]["init_knn_acc"] == rows[1]["init_knn_acc"]  # one seed, one backbone: the same untrained encoder
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


def test_maturity_reads_poisoned_and_clean_victims_at_every_step(tmp_path):
    out = tmp_path / "maturity.json"
    result = load("maturity").main(["--epochs", "2", "--every", "1", "--clean", "--trigger-params", TINY_TRIGGER,
                                    "--set", "data.options={train_size: 200, test_size: 60}", "--set", "pretrain.width=4",
                                    "--set", "pretrain.batch_size=64", "--out", str(out)])
    victim = result["_run"]["victim"]
    assert (victim["width"], victim["batch_size"]) == (4, 64) and "--set pretrain.width=4" in result["_run"]["command"]
    runs = json.loads(out.read_text())["runs"]
    assert [run["victim"] for run in runs] == ["poisoned (0.05)", "clean (0)"] == [run["victim"] for run in result["runs"]]
    for run in runs:
        assert [r["epoch"] for r in run["rows"]] == [1, 2]
        for row in run["rows"]:
            assert row["loss"] == row["loss"] and all(0 <= row[k] <= 1 for k in ("knn_acc", "knn_asr", "linear_acc", "linear_asr"))
    assert "| clean (0) | 2 |" in out.with_suffix(".md").read_text() and json.loads(out.read_text())["_run"]["complete"]
    assert "Incomplete" not in out.with_suffix(".md").read_text()
    figure = out.with_suffix(".png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()
    assert load("maturity").main(["--plot-from", str(out)])["runs"] == runs  # redrawn from the JSON, no training
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as caught:
        load("maturity").main(["--plot-from", str(out.with_suffix(".md"))])
    assert str(caught.value).startswith("--plot-from ") and "\n" not in str(caught.value)


def test_maturity_keeps_the_victims_it_finished_when_stopped(tmp_path, monkeypatch):
    bench = load("maturity")
    real_curve, calls = bench.curve, []

    def stopped_at_the_clean_victim(*args, **kwargs):
        calls.append(args[-1])
        if args[-1] == "clean":
            raise KeyboardInterrupt  # a time limit's kill, as the training of the second victim starts
        return real_curve(*args, **kwargs)

    monkeypatch.setattr(bench, "curve", stopped_at_the_clean_victim)
    out = tmp_path / "maturity.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--epochs", "1", "--every", "1", "--clean", "--trigger-params", TINY_TRIGGER,
                    "--set", "data.options={train_size: 200, test_size: 60}", "--set", "pretrain.width=4",
                    "--set", "pretrain.batch_size=64", "--quiet", "--out", str(out)])
    assert calls == ["poisoned", "clean"]
    saved = json.loads(out.read_text())
    assert [run["victim"] for run in saved["runs"]] == ["poisoned (0.05)"] and saved["_run"]["complete"] is False
    row = saved["runs"][0]["rows"][0]
    assert row["epoch"] == 1 and row["loss"] == row["loss"] and 0 <= row["linear_asr"] <= 1
    text = out.with_suffix(".md").read_text()
    assert "**Incomplete" in text and "| poisoned (0.05) | 1 |" in text and "clean (0)" not in text


def test_maturity_builds_a_fixed_trigger_without_a_fit(tmp_path, capsys):
    out = tmp_path / "maturity.json"
    result = load("maturity").main(["--epochs", "1", "--every", "1", "--trigger-name", "ssl_patch", "--trigger-params",
                                    "{size: 4}", "--set", "data.options={train_size: 200, test_size: 60}",
                                    "--set", "pretrain.width=4", "--set", "pretrain.batch_size=64", "--quiet",
                                    "--out", str(out)])
    assert (result["_run"]["trigger"], result["_run"]["trigger_params"]) == ("ssl_patch", {"size": 4})
    assert "trigger fit" not in capsys.readouterr().out  # nothing to fit
    assert [run["victim"] for run in result["runs"]] == ["poisoned (0.05)"] and len(result["runs"][0]["rows"]) == 1


def test_maturity_reads_the_poisoned_encoders_trigger_feature(tmp_path):
    tiny = ["--trigger-name", "ssl_patch", "--trigger-params", "{size: 4}", "--set",
            "data.options={train_size: 300, test_size: 60}", "--set", "pretrain.width=4", "--set", "pretrain.batch_size=64",
            "--quiet"]
    out = tmp_path / "maturity.json"
    result = load("maturity").main(["--epochs", "1", "--every", "1", "--clean", "--readout", "--out", str(out)] + tiny)
    poisoned, clean = (run["rows"][0] for run in result["runs"])
    readout = ("offset_over_target", "shift_over_offset", "offset_target_alignment", "target_margin")
    assert all(isinstance(poisoned[k], float) for k in readout) and poisoned["offset_over_target"] > 0
    assert -1 <= poisoned["offset_target_alignment"] <= 1 and not any(k in clean for k in readout)  # no poisons, no offset
    assert "| clean (0) | 1 | " in out.with_suffix(".md").read_text() and "| – | – | – | – |" in out.with_suffix(".md").read_text()
    with pytest.raises(ConfigError) as caught:  # every target image poisoned: no clean one to measure from; no training
        load("maturity").main(["--rate", "0.1", "--readout", "--out", str(tmp_path / "refused.json")] + tiny)
    assert "--rate=0.1" in str(caught.value) and not (tmp_path / "refused.json").exists()


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
            "--params", str(tmp_path / "params.yaml"), "--cache", str(tmp_path / "victims"), "--out", str(out),
            "--save-triggers", str(tmp_path / "patterns")]
    result = load("target_sweep").main(argv)
    rows = json.loads(out.read_text())["rows"]
    # Each variant's fitted pattern is kept as the trigger stage keeps it, its change in its parameters.
    from cba.triggers import load_trigger

    saved = [load_trigger(tmp_path / "patterns" / f"1_{variant}") for variant in (0, 1)]
    assert [t.params["w_neutral"] for t in saved] == [params["trigger"]["params"]["w_neutral"], 0.0]
    assert not np.array_equal(saved[0].perturbation(), saved[1].perturbation())
    assert all(0 < np.abs(t.perturbation()).max() <= t.params["linf"] for t in saved)
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
    text = out.with_suffix(".md").read_text()
    # The kernels' instruction set, and the caps that forced it where a run set them (docs/results.md).
    assert "| ring |" in text and f"(cpu, {torch.backends.cpu.get_cpu_capability()} kernels" in text
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
    # The same settings as --set changes of the shipped params.yaml, as `dvc exp run -S` would make them.
    args = load(bench).parse_args(["--set", "seed=3", "--set", "target_class=7", "--set", "poison_rate=0.02",
                                   "--set", "data.options={train_size: 400, test_size: 80}", "--set", "pretrain.epochs=6",
                                   "--set", "pretrain.width=8"])
    assert {k: getattr(args, k) for k in got} == got and args.pipeline == params


@pytest.mark.parametrize("bench", ["defense_matrix", "trl_compare"])
@pytest.mark.parametrize("argv, message", [
    (["--params", "/nonexistent/params.yaml"], "--params='/nonexistent/params.yaml' is not valid: an existing params.yaml file"),
    (["--set", "poison_rate"], "--set='poison_rate' is not valid: KEY=VALUE"),
    (["--set", "pretrain.widht=8"], "pretrain.widht=8 is not valid: a key the file holds; did you mean width?"),
    (["--poison-rate", "1.5"], "--poison-rate 1.5: outside [0, 1]"),
])
def test_benches_refuse_bad_input_in_one_line(bench, argv, message, capsys):
    from cba.errors import run_script

    with pytest.raises(SystemExit) as stop:
        run_script(lambda: load(bench).parse_args(argv))  # as the script's entry point runs it
    error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(error) == 1 and error[0].startswith("error: ") and message in error[0]


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


def test_reader_floor_reads_the_pipelines_untrained_encoder_and_raw_pixels(tmp_path):
    """The random-init row is the encoder `cba pretrain` starts from: the same weights, saved by the pipeline's
    own initialisation and read back through --encoder, give the same figures to the last digit."""
    import yaml

    from cba.models.io import save_encoder
    from cba.train import TrainConfig
    from cba.triggers import build_trigger, save_trigger
    from stages.pretrain import new_method

    params = {"seed": 3, "target_class": 2, "data": {"name": "synthetic", "options": {"train_size": 300, "test_size": 100}},
              "pretrain": {"method": "simclr", "backbone": "convnet", "width": 4},
              "finetune": {"linear": {"max_iter": 50}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    save_trigger(build_trigger("patch", {"size": 4}, seed=3), tmp_path / "trigger")
    method, _ = new_method(TrainConfig(seed=3), {"method": "simclr", "backbone": "convnet", "width": 4, "hparams": {},
                                                 "augmentation": "auto"}, num_classes=10)
    save_encoder(tmp_path / "init.safetensors", method.encoder, "convnet", 4)
    out = tmp_path / "floor.json"
    bench = load("reader_floor")
    result = bench.main(["--params", str(tmp_path / "params.yaml"), "--trigger", str(tmp_path / "trigger"),
                         "--encoder", f"saved init={tmp_path / 'init.safetensors'}", "--out", str(out)])
    rows = {row["reader"]: row for row in result["rows"]}
    assert list(rows) == ["raw pixels", "random init (convnet, width 4, seed 3)", "saved init"]
    for name in ("knn", "linear"):
        assert rows["saved init"][name] == rows["random init (convnet, width 4, seed 3)"][name]
        assert all(0 <= rows["raw pixels"][name][key] <= 1 for key in ("acc", "asr", "natural_rate"))
    assert rows["raw pixels"]["knn"] != rows["saved init"]["knn"]  # pixels are not the encoder's features
    assert "| raw pixels |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        bench.main(["--params", str(tmp_path / "params.yaml"), "--encoder", "no-equals-sign", "--out", str(out)])
    with pytest.raises(SystemExit, match="root="):
        bench.main(["--params", str(tmp_path / "params.yaml"), "--set", "data.name=fashion_mnist",
                    "--set", f"data.root={tmp_path / 'none'}", "--trigger", str(tmp_path / "trigger"), "--out", str(out)])


def test_a_bench_run_from_the_shell_ends_bad_input_in_one_line_without_a_traceback(tmp_path):
    """A rate the target class cannot fill is found after the data set is read, past argparse: still one line, exit 2."""
    import subprocess
    import sys

    out = tmp_path / "never_written.json"
    done = subprocess.run([sys.executable, str(BENCH / "target_sweep.py"), "--targets", "4", "--rates", "0.5",
                           "--set", "data.options={train_size: 500, test_size: 100}", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == [
        "error: poison_rate=0.5 is not valid: clean_label needs 250 images from the target class, which holds 45; "
        "use at most 0.0900"]


@pytest.mark.parametrize("script, argv, message", [
    # argparse's own check: no usage block, one line
    ("trl_compare.py", ["--methods", "dino"], "error: --methods: unknown ['dino']; choose from byol, mocov2, simclr, "
                                              "simsiam, supervised or all (see --help)"),
    # a bench's own check, raised as SystemExit with a message
    ("pull_push.py", ["never_written.json"], "error: results 'never_written.json': no such file; give target_sweep "
                                              "result files (JSON)"),
])
def test_a_bench_refuses_a_bad_argument_in_one_line_with_status_2(tmp_path, script, argv, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [message]
    help_ = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: ")
