"""The test-time pattern fitted against the attacker's poisoned and clean readers (cba.triggers.activation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cba.triggers.activation import diverse_input, fit_activation_pattern, hit_rate, surrogate_reader

LINF = 16.0


class ChannelMeans(nn.Module):
    """An 'encoder' whose features are the image's mean red, green and blue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def reader(red: float, green: float, bias: float):
    """Target logit = 50 * (red * R + green * G - bias), the other class's 0: reads only what it weighs."""
    head = lambda f: torch.stack([50 * (red * f[:, 0] + green * f[:, 1] - bias), torch.zeros(len(f))], 1)  # noqa: E731
    return ChannelMeans(), head


GREY = torch.full((64, 3, 8, 8), 0.5)
# The poisoned reader sends grey to the target once R + 2G rises above 1.5; the clean one once R rises above 0.5.
POISONED, CLEAN = reader(1.0, 2.0, 1.5), reader(1.0, 0.0, 0.5)


def fit(weight: float, start: np.ndarray | None = None, seed: int = 0, steps: int = 60) -> np.ndarray:
    start = np.zeros((8, 8, 3), dtype=np.float32) if start is None else start
    return fit_activation_pattern(start, [POISONED], [CLEAN], GREY, LINF, weight, steps, 0.05, seed, batch_size=16)


def test_without_the_clean_term_every_channel_the_poisoned_reader_weighs_goes_up_and_both_read_it():
    pattern = fit(0.0)
    assert np.all(pattern[..., 0] == LINF) and np.all(pattern[..., 1] == LINF)
    assert np.all(pattern[..., 2] == 0)  # no reader sees blue: its gradient is 0, so it keeps its start
    assert hit_rate(POISONED, GREY, pattern) == 1.0 and hit_rate(CLEAN, GREY, pattern) == 1.0


def test_the_clean_term_moves_the_pattern_onto_what_only_the_poisoned_reader_reads():
    pattern = fit(10.0)
    assert np.all(pattern[..., 0] == -LINF) and np.all(pattern[..., 1] == LINF)  # red down, green up
    assert hit_rate(POISONED, GREY, pattern) == 1.0 and hit_rate(CLEAN, GREY, pattern) == 0.0


def test_the_pattern_stays_within_its_budget_and_follows_the_seed():
    rng = np.random.default_rng(0)
    start = rng.uniform(-3 * LINF, 3 * LINF, (8, 8, 3)).astype(np.float32)  # a start outside the budget is clipped
    torch.manual_seed(0)
    images = torch.rand(64, 3, 8, 8)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    readers = [(conv, nn.Linear(4, 3)), (conv, nn.Linear(4, 3))]

    def run(seed: int) -> np.ndarray:  # few small steps: where each batch pushes still shows
        return fit_activation_pattern(start, readers[:1], readers[1:], images, LINF, 5.0, 4, 0.05, seed, batch_size=4)

    first = run(3)
    assert np.abs(first).max() <= LINF and first.dtype == np.float32 and first.shape == start.shape
    assert np.array_equal(first, run(3)) and not np.array_equal(first, run(4))


def test_two_poisoned_readers_share_the_pull_to_the_target():
    """Reader A weighs red only, B green only, each with a margin the pattern can just clear alone: together
    they move both channels up; with A alone, green (which no reader sees) keeps its start."""
    red_only, green_only = reader(1.0, 0.0, 0.52), reader(0.0, 1.0, 0.52)
    start = np.zeros((8, 8, 3), dtype=np.float32)
    both = fit_activation_pattern(start, [red_only, green_only], [], GREY, LINF, 0.0, 30, 0.05, 0, batch_size=16)
    alone = fit_activation_pattern(start, [red_only], [], GREY, LINF, 0.0, 30, 0.05, 0, batch_size=16)
    assert np.all(both[..., :2] == LINF) and np.all(alone[..., 0] == LINF) and np.all(alone[..., 1] == 0)
    assert hit_rate(green_only, GREY, both) == 1.0 and hit_rate(green_only, GREY, alone) == 0.0


def test_missing_readers_are_refused():
    with pytest.raises(ValueError, match="clean reader"):
        fit_activation_pattern(np.zeros((8, 8, 3), np.float32), [POISONED], [], GREY, LINF, 1.0, 1, 0.1, 0)
    with pytest.raises(ValueError, match="poisoned reader"):
        fit_activation_pattern(np.zeros((8, 8, 3), np.float32), [], [CLEAN], GREY, LINF, 1.0, 1, 0.1, 0)


def test_input_diversity_rescales_and_shifts_a_batch_and_the_gradient_reaches_the_pattern():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0  # a white square on black
    views = [diverse_input(x, gen) for _ in range(20)]
    assert all(v.shape == x.shape and 0 <= float(v.min()) and float(v.max()) <= 1 for v in views)
    # The square moves about: its centre of mass is not where it was in every view.
    rows = torch.arange(8.0).view(1, 1, 8, 1)
    centres = {round(float((v * rows).sum() / v.sum()), 2) for v in views}
    assert len(centres) > 1
    delta = torch.zeros(1, 3, 8, 8, requires_grad=True)
    diverse_input(x + delta, gen).sum().backward()
    assert float(delta.grad.abs().sum()) > 0


def test_a_diverse_fit_stays_within_budget_and_diversity_zero_is_the_plain_fit():
    rng = np.random.default_rng(0)
    start = rng.uniform(-LINF, LINF, (8, 8, 3)).astype(np.float32)
    torch.manual_seed(0)
    images = torch.rand(64, 3, 8, 8)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    readers = [(conv, nn.Linear(4, 3)), (conv, nn.Linear(4, 3))]

    def run(diversity: float) -> np.ndarray:
        return fit_activation_pattern(start, readers[:1], readers[1:], images, LINF, 5.0, 6, 0.05, 3, batch_size=4,
                                      diversity=diversity)

    plain = fit_activation_pattern(start, readers[:1], readers[1:], images, LINF, 5.0, 6, 0.05, 3, batch_size=4)
    assert np.array_equal(run(0.0), plain)
    diverse = run(1.0)
    assert np.abs(diverse).max() <= LINF and not np.array_equal(diverse, plain) and np.array_equal(diverse, run(1.0))


def test_given_labels_replace_the_pseudo_labels_in_the_readers_heads():
    """Images of three colours, labelled by colour (red the target, 0): a head fitted on the labels reads each
    colour as its class, whatever k-means would have made of them."""
    colours = torch.eye(3)[torch.arange(60) % 3]  # red, green, blue, red, ...
    images = colours[:, :, None, None].expand(60, 3, 8, 8).clone() * 0.8 + 0.1
    labels = torch.arange(60) % 3
    mask = (labels == 0).numpy()
    for kind in ("probe", "centroid"):
        encoder, head = surrogate_reader(ChannelMeans(), images, mask, 2, seed=0, kind=kind, labels=labels)
        assert torch.equal(head(encoder(images)).argmax(1), labels), kind
    _, pseudo = surrogate_reader(ChannelMeans(), images, mask, 2, seed=0)  # two clusters: target and the rest
    assert pseudo(ChannelMeans()(images)).shape[1] == 2
