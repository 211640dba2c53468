import dataclasses
import math

import numpy as np
import pytest
import torch

from cba.defenses import DEFENSES, build_defense
from cba.defenses.dbd import sce_loss, split_by_loss
from cba.errors import ConfigError

# Tiny settings for the plumbing tests: they check behaviour, not defense strength.
TINY = {"backbone_source": "pretrained", "head_epochs": 2, "semi_epochs": 1, "batch_size": 64}


def test_registered_as_repair():
    assert DEFENSES.get("dbd").kind == "repair"


def test_sce_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    labels = torch.tensor([0, 2])
    alpha, beta = 0.1, 1.0
    expected = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        exp = [math.exp(v) for v in row]
        p = [e / sum(exp) for e in exp]
        ce = -math.log(p[y])
        # Reverse CE: -sum_k p_k log q_k with the one-hot q clamped to 1e-4, so log q_k = log 1e-4 off the label.
        rce = -sum(pk * math.log(1.0 if k == y else 1e-4) for k, pk in enumerate(p))
        expected.append(alpha * ce + beta * rce)
    got = sce_loss(logits, labels, alpha, beta)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_sce_is_bounded_for_confident_wrong_predictions():
    # The reverse term caps at -log(1e-4) and the CE term is scaled by alpha,
    # which is what makes SCE robust to noisy labels.
    wrong = sce_loss(torch.tensor([[30.0, 0.0]]), torch.tensor([1]), alpha=0.0, beta=1.0)
    assert float(wrong) == pytest.approx(-math.log(1e-4), rel=1e-4)


def test_split_labels_exactly_the_lowest_loss_fraction():
    rng = np.random.default_rng(0)
    losses = rng.permutation(np.arange(100, dtype=float))
    labelled = split_by_loss(losses, 0.3)
    assert labelled.sum() == 30
    assert set(losses[labelled]) == set(range(30))
    assert losses[labelled].max() < losses[~labelled].min()
    assert split_by_loss(losses, 1.0).all()
    # Ties are broken by index, so the split is deterministic.
    np.testing.assert_array_equal(split_by_loss(np.zeros(4), 0.5), [True, True, False, False])


@pytest.mark.parametrize("key,value", [
    ("backbone_source", "imagenet"), ("ssl_backbone", "vgg"), ("ssl_width", 0), ("ssl_epochs", 0),
    ("head_epochs", 1.5), ("semi_epochs", -1), ("epsilon", 0.0), ("epsilon", 1.5), ("lr", 0), ("ssl_lr", -1.0),
    ("batch_size", 1), ("confidence", 1.2), ("sce_alpha", -0.1), ("unlabelled_weight", -1), ("device", "tpu"),
    ("ssl_epochs", True), ("ssl_temperature", 0), ("ssl_min_scale", 0.0), ("head_lr", "fast"),
])
def test_bad_params_name_their_key(key, value):
    with pytest.raises(ConfigError) as err:
        build_defense("dbd", **{key: value})
    assert err.value.key == key  # the defend stage reports it as defense.dbd.<key>


def test_unknown_param_is_rejected():
    with pytest.raises(ConfigError):
        build_defense("dbd", mixmatch_T=0.5)


def test_auto_source_depends_on_the_attack(supervised_badnets):
    dbd = build_defense("dbd")
    assert dbd.resolve_source(supervised_badnets) == "simclr"
    assert dbd.resolve_source(dataclasses.replace(supervised_badnets, method="simclr")) == "pretrained"
    assert build_defense("dbd", backbone_source="pretrained").resolve_source(supervised_badnets) == "pretrained"


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_record_unmodified_and_deterministic(supervised_badnets):
    rec = supervised_badnets
    enc, clf = _state(rec.encoder), _state(rec.classifier)
    images, labels, poisoned = rec.train.images.copy(), rec.train.labels.copy(), rec.poisoned.copy()
    first = build_defense("dbd", **TINY).run(rec)
    second = build_defense("dbd", **TINY).run(rec)
    for before, module in ((enc, rec.encoder), (clf, rec.classifier)):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(rec.train.images, images)
    np.testing.assert_array_equal(rec.train.labels, labels)
    np.testing.assert_array_equal(rec.poisoned, poisoned)
    assert first == second
    assert first["labelled"] == len(labels) // 2 and first["flagged"] == len(labels) - first["labelled"]
    assert isinstance(first["adaptation"], str) and first["backbone_source"] == "pretrained"
    for key in ("auroc", "tpr", "fpr", "acc_before", "asr_before", "acc_after", "asr_after"):
        assert isinstance(first[key], float)


def test_dbd_isolates_and_removes_a_supervised_backdoor(supervised_badnets):
    """The setting DBD was made for: a fresh SimCLR backbone cannot tie the patch
    to the target, so poisoned samples land in the high-loss, unlabelled part and
    semi-supervised fine-tuning does not relearn the backdoor.
    DBD pays in ACC here: its 20-epoch SimCLR backbone is weaker than the
    victim's supervised one (linear probe ~0.4 against the victim's ~0.6)."""
    rec = supervised_badnets
    out = build_defense("dbd", ssl_epochs=20).run(rec)
    assert out["backbone_source"] == "simclr"
    assert out["asr_before"] > 0.8
    assert out["auroc"] >= 0.75
    # The labelled part holds under half the data set's 5% of poisoned samples (1.9-2.2% on the float streams
    # measured: two threads, and one thread on an AVX-512 machine).
    assert out["poisoned_labelled"] / out["labelled"] < 0.5 * rec.poisoned.mean()
    assert out["asr_after"] < 0.3 and out["asr_after"] < out["asr_before"] / 3
    assert out["acc_after"] > 0.3  # chance is 0.1
