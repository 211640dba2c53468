"""The generated trigger: a per-image perturbation from a fitted generator, within budget, from the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cba.data.synthetic import generate
from cba.errors import ConfigError
from cba.triggers import build_trigger, load_trigger, save_trigger
from cba.triggers.optimize import clean_terms, objective_terms
from cba.triggers.perturbation import GeneratedPattern, PatternGenerator, UniversalPattern, stamp
from cba.triggers.stealth import stealth_metrics
from conftest import TINY_TRIGGER as TINY, fit_tiny  # the shared small learned trigger


@pytest.fixture(scope="module")
def fitted(attacker_data):
    return fit_tiny("generated", attacker_data)


def test_every_image_stays_within_budget_and_gets_its_own_perturbation(fitted):
    trigger, info = fitted
    clean = generate(40, seed=5).images
    diff = trigger.apply(clean).astype(int) - clean.astype(int)
    assert np.abs(diff).max() <= TINY["linf"]
    assert stealth_metrics(trigger, clean)["linf"] <= TINY["linf"]
    # Sample-specific: the perturbations of two images differ (a universal pattern's would not, but for clipping).
    deltas = trigger.perturbations(clean)
    assert np.abs(deltas).max() <= TINY["linf"]
    assert np.abs(deltas[0] - deltas[1]).mean() > 0.5
    assert len(info["history"]) == TINY["rounds"] and np.isfinite(info["final_objective"])


def test_an_unfitted_generator_changes_nothing_and_has_no_single_pattern():
    trigger = build_trigger("generated", TINY, seed=0)
    clean = generate(10, seed=1).images
    np.testing.assert_array_equal(trigger.apply(clean), clean)
    with pytest.raises(TypeError, match="each image"):
        trigger.perturbation()


def test_fit_is_deterministic_from_the_seed(fitted, attacker_data):
    trigger, _ = fitted
    clean = generate(20, seed=6).images
    again = build_trigger("generated", TINY, seed=3)
    again.fit(*attacker_data, progress=False)
    np.testing.assert_array_equal(again.apply(clean), trigger.apply(clean))
    other = build_trigger("generated", TINY, seed=4)
    other.fit(*attacker_data, progress=False)
    assert not np.array_equal(other.apply(clean), trigger.apply(clean))


def test_save_and_load_keep_the_generator(fitted, tmp_path):
    trigger, _ = fitted
    save_trigger(trigger, tmp_path / "t")
    loaded = load_trigger(tmp_path / "t")
    clean = generate(20, seed=7).images
    np.testing.assert_array_equal(loaded.apply(clean), trigger.apply(clean))
    # Weights saved for one generator width do not load into another.
    wider = build_trigger("generated", {**TINY, "hidden": 8}, seed=3)
    with pytest.raises(ConfigError, match="expected"):
        wider.set_tensors(trigger.tensors(), source="t")


@pytest.mark.parametrize("key, value", [("hidden", 0), ("lr", 0), ("lr", 2.0), ("linf", 300)])
def test_bad_params_fail_with_one_line(key, value):
    with pytest.raises(ConfigError) as err:
        build_trigger("generated", {key: value}, seed=0)
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["resolution", "step_size", "w_match", "symmetric"])
def test_options_of_the_universal_pattern_are_refused(key):
    with pytest.raises(ConfigError, match="not a parameter of trigger 'generated'"):
        build_trigger("generated", {key: 1}, seed=0)


def _toy_problem():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for p in encoder.parameters():
        p.requires_grad_(False)
    x = torch.rand(32, 3, 16, 16)
    centroids = F.normalize(torch.randn(4, 8), dim=1)
    head = lambda raw: F.normalize(raw, dim=1) @ centroids.T / 0.1  # noqa: E731
    return encoder, x, head


@pytest.mark.parametrize("form", ["universal", "generator"])
def test_the_updates_lower_the_target_term_and_keep_the_budget(form):
    encoder, x, head = _toy_problem()
    eps = 8 / 255
    perturbation = (UniversalPattern(16, 16, eps, 0.1, torch.device("cpu")) if form == "universal"
                    else GeneratedPattern(PatternGenerator(8), eps, lr=0.01))
    losses = []
    for step in range(30):
        delta = perturbation(x)
        assert delta.abs().max() <= eps + 1e-7
        loss = objective_terms(encoder, x, delta, head, None)["target"]
        losses.append(float(loss.detach()))
        perturbation.update(loss, step)
    assert losses[-1] < losses[0] - 0.05


def test_a_non_finite_gradient_stops_the_fit():
    generator = PatternGenerator(4)
    perturbation = GeneratedPattern(generator, 8 / 255, lr=0.01)
    x = torch.rand(2, 3, 8, 8)
    loss = (perturbation(x) * float("nan")).sum()
    with pytest.raises(FloatingPointError, match="round 3"):
        perturbation.update(loss, 2)


def test_the_clean_term_measures_and_lowers_the_clean_encoders_pull_to_the_target():
    encoder, x, _ = _toy_problem()
    # The target centroid is the images' own mean feature, so the clean reading starts high and has room to fall.
    centroids = F.normalize(torch.cat([encoder(x).mean(0, keepdim=True), torch.randn(3, 8)]), dim=1)
    head = lambda raw: F.normalize(raw, dim=1) @ centroids.T * 2  # noqa: E731
    perturbation = UniversalPattern(16, 16, 32 / 255, 0.1, torch.device("cpu"))
    first = clean_terms(encoder, head, x, perturbation(x))
    probabilities = head(encoder(x)).softmax(1)[:, 0]
    assert torch.allclose(first["clean"], probabilities.mean())  # a zero pattern: the clean images' own reading
    assert first["clean_hit_rate"] == (head(encoder(x)).argmax(1) == 0).float().mean()
    for step in range(30):
        perturbation.update(clean_terms(encoder, head, x, perturbation(x))["clean"], step)
    assert float(first["clean"].detach()) > 0.5
    assert float(clean_terms(encoder, head, x, perturbation(x))["clean"].detach()) < float(first["clean"].detach()) - 0.05


def test_the_neutral_term_is_zero_without_a_pattern_and_its_steps_undo_any_pull():
    encoder, x, head = _toy_problem()
    perturbation = UniversalPattern(16, 16, 32 / 255, 0.1, torch.device("cpu"))
    assert float(clean_terms(encoder, head, x, perturbation(x), neutral=True)["neutral"].detach()) == pytest.approx(0.0, abs=1e-6)
    # Push the pattern towards centroid 0 (a pull, as a look-alike texture would cause) ...
    for step in range(20):
        perturbation.update(objective_terms(encoder, x, perturbation(x), head, None)["target"], step)
    pulled = float(clean_terms(encoder, head, x, perturbation(x), neutral=True)["neutral"].detach())
    expected = F.kl_div(head(encoder((x + perturbation(x)).clamp(0, 1))).log_softmax(1),
                        head(encoder(x)).log_softmax(1), log_target=True, reduction="batchmean")
    assert pulled == pytest.approx(float(expected.detach()), rel=1e-5) and pulled > 0.01
    # ... then the neutral term's own steps take most of it back.
    for step in range(30):
        perturbation.update(clean_terms(encoder, head, x, perturbation(x), neutral=True)["neutral"], step)
    assert float(clean_terms(encoder, head, x, perturbation(x), neutral=True)["neutral"].detach()) < pulled / 2


def test_the_fit_records_the_clean_surrogates_reading_every_round(fitted):
    _, info = fitted
    for row in info["history"]:
        assert 0 <= row["clean"] <= 1 and 0 <= row["clean_hit_rate"] <= 1


def test_the_diversion_term_counts_moves_between_other_classes_and_not_a_pull_to_the_target():
    # Features: each channel's mean. The target's logit reads channel 0 only; the other three read channels 1-2.
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(3, 4, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[10.0, 0, 0], [0, 10, 0], [0, 0, 10], [0, -10, -10]]))
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8) * 0.5 + 0.25  # no pixel near the clip, so a pattern moves every feature
    on_channel = lambda c: torch.zeros(1, 3, 8, 8).index_fill_(1, torch.tensor([c]), 0.1)  # noqa: E731

    def diversion_term(e, h, images, delta):  # the fit's divert term: `h` read over the non-target classes
        return clean_terms(e, h, images, delta, divert_head=h)["divert"]

    assert float(diversion_term(encoder, head, x, torch.zeros(1, 3, 8, 8)).detach()) == pytest.approx(0.0, abs=1e-6)
    towards_target = on_channel(0)
    assert float(diversion_term(encoder, head, x, towards_target).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(clean_terms(encoder, head, x, towards_target, neutral=True)["neutral"].detach()) > 0.05
    assert float(diversion_term(encoder, head, x, on_channel(1)).detach()) > 0.05
    # Its own steps take a diversion back.
    perturbation = UniversalPattern(8, 8, 0.1, 0.1, torch.device("cpu"))
    for step in range(10):
        perturbation.update(-head(encoder(stamp(x, perturbation(x))))[:, 1].mean(), step)
    diverted = float(diversion_term(encoder, head, x, perturbation(x)).detach())
    for step in range(30):
        perturbation.update(diversion_term(encoder, head, x, perturbation(x)), step)
    assert diverted > 0.05 and float(diversion_term(encoder, head, x, perturbation(x)).detach()) < diverted / 2


def test_the_salience_term_measures_how_far_a_pattern_moves_the_features_whatever_the_head_reads():
    # Features: each channel's mean. The head reads channels 0 and 1 only, so a pattern on channel 2 moves the
    # features without changing the reading: salient (cosine below 1) and neutral (KL 0) at once.
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(3, 3, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[10.0, 0, 0], [0, 10, 0], [-10, -10, 0]]))
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8) * 0.5 + 0.25
    unread = torch.zeros(1, 3, 8, 8).index_fill_(1, torch.tensor([2]), 0.1)
    untouched = clean_terms(encoder, head, x, torch.zeros(1, 3, 8, 8), salient=True)
    assert float(untouched["salient"]) == pytest.approx(1.0, abs=1e-6)
    moved = clean_terms(encoder, head, x, unread, salient=True, neutral=True)
    assert float(moved["salient"].detach()) < 0.999 and float(moved["neutral"].detach()) == pytest.approx(0.0, abs=1e-6)
    planted = F.cosine_similarity(encoder(x + unread), encoder(x), dim=1).mean()
    assert float(moved["salient"].detach()) == pytest.approx(float(planted), abs=1e-6)
    # Its own steps move the features further (a lower cosine) within the budget.
    perturbation = UniversalPattern(8, 8, 0.1, 0.1, torch.device("cpu"))
    before = float(clean_terms(encoder, head, x, perturbation(x), salient=True)["salient"].detach())
    for step in range(20):
        perturbation.update(clean_terms(encoder, head, x, perturbation(x), salient=True)["salient"], step)
    after = float(clean_terms(encoder, head, x, perturbation(x), salient=True)["salient"].detach())
    assert after < before - 0.01 and float(perturbation(x).detach().abs().max()) <= 0.1 + 1e-6
