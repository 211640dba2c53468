"""bench/attack_levers.py: its patterns, its choice of poisons, its settings and one victim end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from benches import BENCH, load


def tiny_params(tmp_path, trigger: dict | None = None, **trigger_params) -> dict:
    """params.yaml at a size that trains in seconds, written to tmp_path/params.yaml: 200 training images, one
    epoch at width 4; `trigger` replaces the trigger section, `trigger_params` update its params."""
    params = yaml.safe_load((BENCH.parent / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 60}
    params["pretrain"].update(epochs=1, width=4, batch_size=64)
    if trigger is not None:
        params["trigger"] = trigger
    params["trigger"]["params"].update(trigger_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return params


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


def test_attack_levers_min_scale_reaches_the_attackers_surrogate_too(tmp_path, capsys):
    """`--min-scale` is the crop that the victim and the attacker's surrogate both train under."""
    from unittest import mock

    tiny_params(tmp_path, trigger={"name": "optimized", "params": {"surrogate_epochs": 1}})
    levers = load("attack_levers")
    with mock.patch.object(levers, "clean_surrogate", wraps=levers.clean_surrogate) as surrogate:
        row = levers.main(["--pattern", "sensitive:8", "--min-scale", "0.3", "--quiet",
                           "--params", str(tmp_path / "params.yaml")])
    assert surrogate.call_count == 1 and surrogate.call_args.args[3]["min_scale"] == 0.3
    assert "pretrain" not in capsys.readouterr().err  # --quiet: neither the surrogate's bar nor the victim's
    assert row["min_scale"] == 0.3 and row["final_loss"] == row["final_loss"]


def test_attack_levers_runs_one_victim_end_to_end(tmp_path, capsys):
    params = tiny_params(tmp_path)
    row = load("attack_levers").main(["--pattern", "disc:16", "--select", "gray", "--params", str(tmp_path / "params.yaml")])
    assert row["pattern"] == "disc:16" and row["rate"] == params["poison_rate"]
    assert 0 <= row["probe_asr"] <= 1 and 0 <= row["knn_asr"] <= 1 and 0 <= row["probe_on_poisons"] <= 1
    assert row["final_loss"] == row["final_loss"]  # finite, not NaN
    assert 0 <= row["poisons_near_clean"] <= 1 and 0 <= row["poisons_near_triggered"] <= 1
    assert row["offset_norm"] > 0 and -1 <= row["offset_target_alignment"] <= 1
    assert "pretrain: 100%" in capsys.readouterr().err  # the victim's progress bar, as plain lines off a terminal


def test_attack_levers_caches_the_clean_twin_and_only_randomly_selected_poisoned_victims(tmp_path):
    """The cache key holds no selection rule: a poisoned victim whose poisons a lever chose must never be cached,
    or a later run with the pipeline's random choice would load it."""
    tiny_params(tmp_path)
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
    tiny_params(tmp_path, surrogate_size=100, surrogate_epochs=1)
    levers = load("attack_levers")
    row = levers.main(["--pattern", "disc:16", "--select", "typical", "--params", str(tmp_path / "params.yaml")])
    assert row["select"] == "typical" and 0 <= row["target_near_poisons"] <= 1 and 0 <= row["knn_asr"] <= 1


def test_attack_levers_composite_mode_with_a_patch(tmp_path):
    tiny_params(tmp_path)
    row = load("attack_levers").main(["--pattern", "patch:6", "--mode", "composite", "--min-scale", "0.2",
                                      "--params", str(tmp_path / "params.yaml")])
    assert row["mode"] == "composite" and row["min_scale"] == 0.2 and 0 <= row["probe_asr"] <= 1
