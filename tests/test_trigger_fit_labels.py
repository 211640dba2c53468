"""The learned trigger fitted by an attacker that holds its images' true labels (`fit_labels: true`): every
head of the fit reads through those labels instead of the pseudo-labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cba.data.synthetic import generate
from cba.errors import ConfigError
from cba.triggers import build_trigger
from cba.triggers.fitting import fit_trigger
from cba.triggers.optimize import target_head
from conftest import TINY_TRIGGER as TINY

LABELLED = {**TINY, "fit_labels": True}


@pytest.fixture(scope="module")
def classes():
    return generate(300, seed=21).labels  # attacker_data's own labels; its target is class 0


@pytest.fixture(scope="module")
def labelled_fit(attacker_data, classes):
    trigger, keep = build_trigger("optimized", LABELLED, seed=3), {}
    info = trigger.fit(*attacker_data, progress=False, keep=keep, labels=classes)
    return trigger, info, keep


def test_the_fit_needs_the_labels_and_keeps_its_budget(attacker_data, labelled_fit):
    with pytest.raises(ValueError, match="labels"):
        build_trigger("optimized", LABELLED, seed=3).fit(*attacker_data, progress=False)
    trigger, info, _ = labelled_fit
    pattern = trigger.perturbation()
    assert np.abs(pattern).max() <= TINY["linf"] and np.abs(pattern).max() >= 0.99 * TINY["linf"]
    assert len(info["history"]) == TINY["rounds"] and np.isfinite(info["final_objective"])


def test_labels_that_contradict_the_target_mask_are_refused(attacker_data, classes):
    images, mask = attacker_data
    wrong = classes.copy()
    wrong[np.flatnonzero(~mask)[0]] = 0  # a non-target image labelled as the target
    with pytest.raises(ValueError, match="target-class images, and only them"):
        build_trigger("optimized", LABELLED, seed=3).fit(images, mask, progress=False, labels=wrong)


def test_the_clean_copy_is_read_through_a_probe_on_the_true_labels(attacker_data, classes, labelled_fit):
    """The copy's probe (the attacker's estimate of a clean victim's reading) is the one fitted on the classes,
    which a probe on the pseudo-labels is not."""
    images, mask = attacker_data
    _, info, keep = labelled_fit
    given = torch.as_tensor(classes)  # target 0 already: the heads' classes are the labels themselves
    expected = target_head(keep["clean"], keep["data"], mask, 10, "probe",
                           torch.Generator().manual_seed(3 + 2), labels=given)
    pseudo = target_head(keep["clean"], keep["data"], mask, 10, "probe", torch.Generator().manual_seed(3 + 2))
    with torch.no_grad():
        raw = keep["clean"](keep["data"])
        kept, true_read, pseudo_read = (head(raw).argmax(1) for head in (keep["clean_probe"], expected, pseudo))
    torch.testing.assert_close(keep["clean_probe"](raw), expected(raw))
    assert int(kept.max()) > 1  # ten classes, not target-against-rest
    assert (true_read == given).float().mean() > (pseudo_read == given).float().mean()  # it learned the classes
    assert all(0 <= row["clean_probe_hit_rate"] <= 1 for row in info["history"])


def test_true_labels_change_the_pattern_and_the_fit_stays_deterministic(attacker_data, classes, labelled_fit):
    trigger, _, _ = labelled_fit
    again = build_trigger("optimized", LABELLED, seed=3)
    again.fit(*attacker_data, progress=False, labels=classes)
    np.testing.assert_array_equal(again.perturbation(), trigger.perturbation())
    pseudo = build_trigger("optimized", TINY, seed=3)
    pseudo.fit(*attacker_data, progress=False, labels=classes)  # labels it is not asked to read change nothing
    unlabelled = build_trigger("optimized", TINY, seed=3)
    unlabelled.fit(*attacker_data, progress=False)
    np.testing.assert_array_equal(pseudo.perturbation(), unlabelled.perturbation())
    assert not np.array_equal(pseudo.perturbation(), trigger.perturbation())


def test_the_stages_fit_hands_the_attackers_labels_over(attacker_data, classes, labelled_fit):
    images, _ = attacker_data
    trigger = build_trigger("optimized", LABELLED, seed=3)
    keep: dict = {}
    fit_trigger(trigger, images, classes, 0, 3, progress=False, keep=keep)  # surrogate_size 300: every image, in order
    np.testing.assert_array_equal(trigger.perturbation(), labelled_fit[0].perturbation())
    # What a bench refitting the attacker's models gets back: its images' classes and which are the target's.
    np.testing.assert_array_equal(keep["labels"], classes)
    np.testing.assert_array_equal(keep["target_mask"], classes == 0)


@pytest.mark.parametrize("params, key", [({"fit_labels": "yes"}, "fit_labels"),
                                         ({"fit_labels": True, "hard_negatives": True}, "hard_negatives")])
def test_bad_values_fail_with_one_line(params, key):
    with pytest.raises(ConfigError) as caught:
        build_trigger("optimized", params, seed=0)
    assert caught.value.key == key and "\n" not in str(caught.value)
