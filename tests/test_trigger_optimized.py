"""The optimized trigger: its budget, determinism, persistence, validation, and that it beats noise at surviving the views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cba.data.synthetic import generate
from cba.errors import ConfigError
from cba.survival import survival_table
from cba.triggers import build_trigger, load_trigger, save_trigger
from cba.triggers.optimized import OptimizedTrigger
from cba.triggers.stealth import stealth_metrics
from conftest import TINY_TRIGGER as TINY, fit_tiny  # the shared small learned trigger


@pytest.fixture(scope="module")
def fitted(attacker_data):
    return fit_tiny("optimized", attacker_data)


def test_pattern_respects_the_budget_exactly(fitted):
    trigger, info = fitted
    pattern = trigger.perturbation()
    assert np.abs(pattern).max() <= TINY["linf"]
    # Signed-gradient steps push most pixels to the budget's edge: the budget binds.
    assert np.abs(pattern).max() >= 0.99 * TINY["linf"]
    clean = generate(50, seed=5).images
    diff = trigger.apply(clean).astype(int) - clean.astype(int)
    assert np.abs(diff).max() <= TINY["linf"]
    assert stealth_metrics(trigger, clean)["linf"] <= TINY["linf"]
    assert len(info["history"]) == TINY["rounds"] and np.isfinite(info["final_objective"])


def test_fit_is_deterministic_from_the_seed(fitted, attacker_data):
    trigger, _ = fitted
    again = build_trigger("optimized", TINY, seed=3)
    again.fit(*attacker_data, progress=False)
    np.testing.assert_array_equal(again.perturbation(), trigger.perturbation())
    other = build_trigger("optimized", TINY, seed=4)
    other.fit(*attacker_data, progress=False)
    assert not np.array_equal(other.perturbation(), trigger.perturbation())


def test_fit_leaves_the_callers_random_state_alone(attacker_data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_trigger("optimized", {**TINY, "rounds": 1, "trigger_steps": 1, "surrogate_epochs": 1}, seed=0).fit(
        *attacker_data, progress=False)
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_survives_augmentation_better_than_noise_of_the_same_norm(fitted):
    trigger, _ = fitted
    pattern = trigger.perturbation()
    rng = np.random.default_rng(0)
    # Random signs at the budget, then rescaled to the learned pattern's L2 norm.
    noise = rng.choice([-1.0, 1.0], size=pattern.shape) * TINY["linf"]
    noise *= np.linalg.norm(pattern) / np.linalg.norm(noise)
    random = build_trigger("optimized", TINY, seed=3)
    random.set_tensors({"pattern": torch.from_numpy(noise.astype(np.float32))})
    images = np.full((64, 32, 32, 3), 128, dtype=np.uint8)  # mid-grey: no clipping hides either pattern
    images += np.random.default_rng(1).integers(0, 40, size=images.shape, dtype=np.uint8)
    learned = survival_table(trigger, images, 0.5, seed=0, draws=2, augmentations=["ssl"])[0]
    baseline = survival_table(random, images, 0.5, seed=0, draws=2, augmentations=["ssl"])[0]
    assert learned["survival"] > baseline["survival"] + 0.1
    assert learned["view_agreement"] > baseline["view_agreement"] + 0.1


def test_save_and_load_keep_the_learned_pattern(fitted, tmp_path):
    trigger, _ = fitted
    save_trigger(trigger, tmp_path)
    loaded = load_trigger(tmp_path)
    assert loaded.name == "optimized"
    np.testing.assert_array_equal(loaded.perturbation(), trigger.perturbation())


def test_an_unfitted_trigger_changes_nothing():
    clean = generate(4, seed=1).images
    np.testing.assert_array_equal(build_trigger("optimized", {}, seed=0).apply(clean), clean)


def test_from_pattern_adds_the_given_pattern_clipped_to_its_budget_and_saves_as_an_optimized_trigger(tmp_path):
    pattern = np.zeros((32, 32, 3), np.float32)
    pattern[:8] = 30.0  # beyond the budget: clipped to +8
    pattern[8:16] = -5.0
    trigger = OptimizedTrigger.from_pattern(pattern, 8, seed=2)
    clean = np.full((3, 32, 32, 3), 100, np.uint8)
    diff = trigger.apply(clean).astype(int) - clean
    assert (diff[:, :8] == 8).all() and (diff[:, 8:16] == -5).all() and (diff[:, 16:] == 0).all()
    save_trigger(trigger, tmp_path / "t")
    np.testing.assert_array_equal(load_trigger(tmp_path / "t").apply(clean), trigger.apply(clean))
    with pytest.raises(ConfigError, match="pattern"):
        OptimizedTrigger.from_pattern(np.zeros((32, 16, 3)), 8)
    with pytest.raises(ConfigError, match="linf"):
        OptimizedTrigger.from_pattern(pattern, 300)


@pytest.mark.parametrize("key, value", [
    ("linf", 0), ("linf", 300), ("linf", "16"), ("rounds", 0), ("trigger_steps", 1.5), ("surrogate_size", 3), ("surrogate_size", "half"),
    ("step_size", 0), ("min_scale", 1.5), ("poison_share", 0), ("poison_share", 1.5), ("bilevel", "yes"), ("eot", 1), ("surrogate_backbone", "vit"),
    ("w_target", -1), ("resolution", 0), ("head", "svm"), ("ensemble", 0), ("w_match", -0.5), ("match", "half"),
    ("hard_negatives", "no"), ("w_clean", -1), ("w_neutral", "high"), ("w_neutral", float("nan")),
    ("clip_gradient", "identity"), ("clean_head", "svm"), ("w_salient", -1),
])
def test_bad_params_fail_with_one_line(key, value):
    with pytest.raises(ConfigError) as caught:
        build_trigger("optimized", {key: value}, seed=0)
    assert caught.value.key == key and "\n" not in str(caught.value)  # the stage adds trigger.params.


def test_all_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="w_target"):
        build_trigger("optimized", {"w_target": 0, "w_agree": 0}, seed=0)
    build_trigger("optimized", {"w_target": 0, "w_agree": 0, "w_match": 1.0}, seed=0)  # matching alone is a goal


def test_surrogate_size_all_gives_the_attacker_every_training_image():
    from cba.triggers.fitting import attacker_pool

    assert build_trigger("optimized", {"surrogate_size": "all"}, seed=0).params["surrogate_size"] == "all"
    np.testing.assert_array_equal(attacker_pool(500, "all", seed=0), np.arange(500))
    # "all" is the whole set, the same pool as naming its size.
    np.testing.assert_array_equal(attacker_pool(500, 500, seed=3), np.arange(500))
    assert len(attacker_pool(500, 200, seed=0)) == 200
    with pytest.raises(ConfigError, match="surrogate_size"):
        attacker_pool(500, 501, seed=0)


def test_fit_needs_target_images(attacker_data):
    images, _ = attacker_data
    with pytest.raises(ValueError, match="target"):
        build_trigger("optimized", TINY, seed=0).fit(images, np.zeros(len(images), dtype=bool), progress=False)


def test_code_defaults_match_params_yaml():
    """params.yaml ships the fit's own defaults; the generated trigger takes them but the grid's and adds its own."""
    from pathlib import Path

    import yaml

    from cba.triggers.fit_options import OptimizeConfig
    from cba.triggers.generated import GeneratedTrigger
    from cba.triggers.optimized import OptimizedTrigger

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["trigger"]
    assert shipped["name"] == "optimized"
    assert shipped["params"] == OptimizedTrigger.defaults
    config = OptimizeConfig()
    for key, value in shipped["params"].items():
        if key != "surrogate_size":  # the stage's choice of data, not the optimiser's
            assert getattr(config, key) == value, key
    universal_only = {"resolution", "step_size", "w_match", "match", "symmetric", "test_weight", "test_steps",
                      "test_step_size", "test_labels"}
    assert set(GeneratedTrigger.defaults) == (set(OptimizedTrigger.defaults) - universal_only) | {"hidden", "lr"}
    assert not {"surrogate_lr", "temperature", "per_batch", "form"} & set(GeneratedTrigger.defaults)


def test_progress_bar_covers_the_surrogate_and_the_trigger_steps(attacker_data, capsys):
    """One bar over the whole fit: warm-up epochs, poisoned epochs and trigger steps, ending at its total."""
    params = {**TINY, "rounds": 2, "trigger_steps": 3, "surrogate_epochs": 1}
    build_trigger("optimized", params, seed=0).fit(*attacker_data, progress=True)
    steps_per_epoch = -(-len(attacker_data[0]) // 256)
    total = steps_per_epoch * (1 + 1) + 2 * 3  # one warm-up epoch, one poisoned epoch (round 2), 2 x 3 trigger steps
    assert f"{total}/{total}" in capsys.readouterr().err


def test_probe_head_learns_the_pseudo_labels_and_fits_within_budget(attacker_data):
    """The probe head is the attacker's stand-in for the victim's linear probe: trained on
    target-versus-clusters pseudo-labels, it must send the (clean) target images to class 0."""
    from cba.models import build_backbone
    from cba.triggers.optimize import target_head

    images, target_mask = attacker_data
    torch.manual_seed(0)
    encoder = build_backbone("convnet", width=4).eval()
    data = torch.as_tensor(images).permute(0, 3, 1, 2).float().div(255)
    head = target_head(encoder, data, target_mask, 4, "probe", torch.Generator().manual_seed(0))
    with torch.no_grad():
        preds = head(encoder(data)).argmax(1).numpy()
    # Even on a random encoder the target images go to class 0 many times more often than the others.
    assert (preds[target_mask] == 0).mean() > 4 * (preds[~target_mask] == 0).mean() + 0.05
    trigger = build_trigger("optimized", {**TINY, "head": "probe"}, seed=3)
    info = trigger.fit(images, target_mask, progress=False)
    assert np.abs(trigger.perturbation()).max() <= TINY["linf"]
    assert 0.0 <= info["history"][-1]["hit_rate"] <= 1.0


def test_the_clean_copy_reads_through_the_head_clean_head_names(attacker_data, fitted):
    """`clean_head: same` follows `head`; naming the same kind changes nothing, another kind changes the fit."""
    trigger, _ = fitted  # head centroid, clean_head same
    same = build_trigger("optimized", {**TINY, "clean_head": "centroid"}, seed=3)
    same.fit(*attacker_data, progress=False)
    np.testing.assert_array_equal(same.perturbation(), trigger.perturbation())
    probe = build_trigger("optimized", {**TINY, "clean_head": "probe"}, seed=3)
    info = probe.fit(*attacker_data, progress=False)
    assert not np.array_equal(probe.perturbation(), trigger.perturbation())
    assert np.abs(probe.perturbation()).max() <= TINY["linf"] and np.isfinite(info["history"][-1]["neutral"])


def test_the_salience_term_changes_the_fit_and_is_recorded_every_round(attacker_data, fitted):
    trigger, plain = fitted
    salient = build_trigger("optimized", {**TINY, "w_salient": 5.0}, seed=3)
    info = salient.fit(*attacker_data, progress=False)
    assert "salient" not in plain["history"][-1]
    assert all(-1.0 <= row["salient"] <= 1.0 for row in info["history"])
    assert not np.array_equal(salient.perturbation(), trigger.perturbation())
    assert np.abs(salient.perturbation()).max() <= TINY["linf"]
    # The objective counts the term at its weight: the round's sum of the weighted parts.
    row = info["history"][-1]
    parts = row["target"] + row["agree"] + 20.0 * row["neutral"] + 5.0 * row["salient"]
    assert row["objective"] == pytest.approx(parts, rel=1e-6)


def test_probe_hit_rate_counts_the_triggered_images_the_head_reads_as_the_target():
    from cba.triggers.optimize import probe_hit_rate

    encoder = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # each image's mean colour
    head = lambda f: torch.stack([f[:, 0] - 0.5, torch.zeros(len(f))], 1)  # target: red above one half
    x = torch.zeros(10, 3, 4, 4)
    x[:, 0] = 0.05 + 0.1 * torch.arange(10.0)[:, None, None]  # reds 0.05, 0.15, ..., 0.95
    assert probe_hit_rate(encoder, head, x, lambda part: torch.zeros_like(part), chunk=3) == pytest.approx(0.5)
    # +0.2 lifts reds 0.35 and 0.45 above one half; the clip keeps 0.95 at 1, still above.
    assert probe_hit_rate(encoder, head, x, lambda part: torch.full_like(part, 0.2), chunk=3) == pytest.approx(0.7)


def test_every_round_records_the_clean_copys_probe_reading(fitted):
    _, info = fitted
    assert all(0.0 <= row["clean_probe_hit_rate"] <= 1.0 for row in info["history"])


def test_an_ensemble_trains_one_surrogate_per_member_and_stays_deterministic(attacker_data, capsys):
    params = {**TINY, "ensemble": 2, "rounds": 2, "trigger_steps": 4, "surrogate_epochs": 1}
    first = build_trigger("optimized", params, seed=3)
    first.fit(*attacker_data, progress=True)
    steps_per_epoch = -(-len(attacker_data[0]) // 256)
    total = 2 * steps_per_epoch * (1 + 1) + 2 * 4  # each member: a warm-up and a poisoned epoch; then the trigger steps
    assert f"{total}/{total}" in capsys.readouterr().err
    again = build_trigger("optimized", params, seed=3)
    again.fit(*attacker_data, progress=False)
    np.testing.assert_array_equal(first.perturbation(), again.perturbation())
    single = build_trigger("optimized", {**params, "ensemble": 1}, seed=3)
    single.fit(*attacker_data, progress=False)
    assert not np.array_equal(single.perturbation(), first.perturbation())
    assert np.abs(first.perturbation()).max() <= TINY["linf"]


def test_hard_negatives_get_a_centroid_of_their_own():
    """The non-target points nearest the target centroid form cluster 1, whatever k-means does with the rest."""
    from cba.triggers.optimize import pseudo_labels

    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([[1.0, 0.0, 0.0]]).repeat(5, 1) + 0.01 * torch.randn(5, 3, generator=gen)
    near = torch.tensor([[0.9, 0.43, 0.0]]).repeat(5, 1) + 0.01 * torch.randn(5, 3, generator=gen)
    far = torch.tensor([[0.0, 0.0, 1.0]]).repeat(10, 1) + 0.01 * torch.randn(10, 3, generator=gen)
    features = torch.cat([target, near, far])
    mask = np.array([True] * 5 + [False] * 15)
    labels, centroids = pseudo_labels(features, mask, 4, torch.Generator().manual_seed(1), hard_negatives=True)
    assert (labels[:5] == 0).all() and (labels[5:10] == 1).all() and (labels[10:] > 1).all()
    assert len(centroids) == 4
    assert float(centroids[1] @ torch.nn.functional.normalize(near.mean(0), dim=0)) > 0.999


def test_gradient_matching_alone_fits_a_pattern_within_budget(attacker_data):
    params = {**TINY, "w_target": 0.0, "w_agree": 0.0, "w_match": 1.0, "rounds": 1, "trigger_steps": 3}
    trigger = build_trigger("optimized", params, seed=3)
    info = trigger.fit(*attacker_data, progress=False)
    pattern = trigger.perturbation()
    assert np.isfinite(pattern).all() and 0 < np.abs(pattern).max() <= TINY["linf"]
    assert 0.0 <= info["history"][-1]["match"] <= 2.0


def test_poison_carriers_are_the_declared_share_of_the_target_images():
    from cba.triggers.optimize import poison_carriers

    target = np.zeros(40, dtype=bool)
    target[::4] = True  # ten target images
    assert poison_carriers(target, 1.0, seed=0) is target
    half = poison_carriers(target, 0.5, seed=0)
    assert half.sum() == 5 and not (half & ~target).any()
    assert np.array_equal(half, poison_carriers(target, 0.5, seed=0))
    assert not np.array_equal(half, poison_carriers(target, 0.5, seed=1))
    assert poison_carriers(target, 0.01, seed=0).sum() == 1  # never none: the surrogate must see a poison


@pytest.mark.parametrize("mode, moves", [("zero", False), ("straight_through", True)])
def test_a_value_the_clip_zeroes_learns_only_through_a_straight_through_clip(mode, moves):
    from cba.triggers.perturbation import UniversalPattern, stamp

    black = torch.zeros(4, 3, 8, 8)  # a black background, as Fashion-MNIST's borders are
    half = torch.full_like(black, 0.5)
    pattern = UniversalPattern(8, 8, eps=16 / 255, step_size=0.25, device=torch.device("cpu"))
    with torch.no_grad():
        pattern.grid.fill_(-4 / 255)  # a first step that went dark: the clip removes it on black
    for round_index in range(8):
        delta = pattern(black)
        stamped = stamp(torch.cat([black, half]), delta, mode)
        # The same forward pass either way: what the poisons and the test set will carry.
        torch.testing.assert_close(stamped.detach(), (torch.cat([black, half]) + delta.detach()).clamp(0, 1))
        pattern.update(-stamped[:4].mean(), round_index)  # the objective wants the black pixels brighter
    brightest = float(pattern.grid.detach().max())
    if moves:
        assert brightest == pytest.approx(16 / 255)  # told which way to go, it uses the whole budget
    else:
        assert brightest == pytest.approx(-4 / 255)  # zero gradient: stuck where the first step left it


def test_the_surrogate_never_starts_from_the_victims_weights():
    from cba.models import build_backbone
    from cba.triggers.optimize import surrogate_seed

    for seed in (0, 1, 5):
        members = [surrogate_seed(seed, k) for k in range(4)]
        assert seed not in members and len(set(members)) == 4
    # The victim is initialised from the run's seed (stages/pretrain.py); the attacker's surrogate is not.
    torch.manual_seed(0)
    victim = build_backbone("convnet", width=4)
    torch.manual_seed(surrogate_seed(0))
    surrogate = build_backbone("convnet", width=4)
    assert not torch.equal(next(victim.parameters()), next(surrogate.parameters()))


def test_a_symmetric_pattern_is_its_own_mirror_image_and_a_flip_keeps_all_of_it(attacker_data, fitted):
    trigger = build_trigger("optimized", {**TINY, "symmetric": True}, seed=3)
    trigger.fit(*attacker_data, progress=False)
    pattern = trigger.perturbation()
    assert np.abs(pattern).max() > 1.0  # it learned something
    np.testing.assert_allclose(pattern, pattern[:, ::-1], atol=1e-4)
    images = np.full((64, 32, 32, 3), 128, dtype=np.uint8)
    images += np.random.default_rng(1).integers(0, 40, size=images.shape, dtype=np.uint8)
    kept = survival_table(trigger, images, 0.5, seed=0, draws=2, augmentations=["flip"])[0]["survival"]
    free = survival_table(fitted[0], images, 0.5, seed=0, draws=2, augmentations=["flip"])[0]["survival"]
    assert kept > 0.99 and kept > free + 0.1


def test_symmetric_is_a_flag():
    with pytest.raises(ConfigError, match="symmetric"):
        build_trigger("optimized", {**TINY, "symmetric": "yes"}, seed=0)
