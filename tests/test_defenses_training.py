"""ABL, downstream fine-tuning and the synthetic texture data set."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cba.data import load_dataset
from cba.defenses import KINDS, build_defense
from cba.defenses.abl import copy_method, isolate, isolation_loss, loss_augment, loss_matrix, per_sample_losses
from cba.defenses.downstream_ft import effective_asr
from cba.errors import ConfigError

DETECTION_KEYS = {"auroc", "tpr", "fpr", "precision", "flagged"}
REPAIR_KEYS = {"acc_before", "asr_before", "acc_after", "asr_after"}


def loss_log(matrix: np.ndarray) -> pd.DataFrame:
    epochs, n = matrix.shape
    return pd.DataFrame({"epoch": np.repeat(np.arange(1, epochs + 1), n), "index": np.tile(np.arange(n), epochs),
                         "poisoned": False, "loss": matrix.reshape(-1)})


def log_record(matrix: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(losses=loss_log(matrix), train=np.zeros(matrix.shape[1]))


# --- isolation ------------------------------------------------------------------------------

def test_isolation_picks_exactly_the_lowest_loss_fraction():
    rng = np.random.default_rng(0)
    matrix = rng.uniform(1, 2, (3, 40))
    matrix[:, [5, 17, 33, 38]] = [[0.1, 0.2, 0.3, 0.4]] * 3
    abl = build_defense("abl", loss_source="log", isolation_rate=0.1, isolation_epochs=3)
    loss, used = abl.isolation_losses(log_record(matrix))
    assert used == 3
    assert np.flatnonzero(isolate(loss, 0.1)).tolist() == [5, 17, 33, 38]
    assert isolate(loss, 0.001).sum() == 1  # at least one sample


def test_epoch_mode_mean_and_last():
    matrix = np.array([[0.1, 1.0, 1.0, 1.0], [2.0, 0.2, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    mean = isolation_loss(matrix, 2, "mean")  # the third epoch lies outside the window
    last = isolation_loss(matrix, 2, "last")
    assert np.allclose(mean, [1.05, 0.6, 1.0, 1.0]) and np.allclose(last, [2.0, 0.2, 1.0, 1.0])
    assert isolate(mean, 0.25)[1] and isolate(last, 0.25)[1]
    assert isolate(isolation_loss(matrix, 1, "mean"), 0.25)[0]
    assert len(isolation_loss(matrix, 99, "mean")) == 4  # more epochs asked than logged: all of them


def test_unlogged_samples_are_never_isolated():
    frame = loss_log(np.ones((2, 5))).query("index != 3")
    loss = isolation_loss(loss_matrix(frame, 5), 2, "mean")
    assert np.isinf(loss[3]) and not isolate(loss, 0.8)[3]


def test_abl_trains_a_copy_and_leaves_the_record_untouched():
    from cba.models import build_backbone
    from cba.ssl import build_method

    method = build_method("simclr", build_backbone("convnet", width=4), proj_hidden_dim=24, proj_dim=12)
    record = SimpleNamespace(model=method)
    copied = copy_method(record)
    assert copied.projector[-1].out_features == 12 and copied.encoder is not method.encoder
    with torch.no_grad():
        next(copied.parameters()).add_(1.0)
    assert not torch.equal(next(copied.parameters()), next(method.parameters()))


@pytest.mark.parametrize("params", [
    {"isolation_rate": 0}, {"isolation_rate": 1.5}, {"isolation_epochs": 0}, {"epoch_mode": "median"},
    {"loss_source": "oracle"}, {"unlearn_epochs": -1}, {"unlearn_lr": -1e-3}, {"clean_finetune": "yes"},
    {"lga_lr": 0}, {"device": "tpu"}, {"not_a_param": 1},
])
def test_abl_rejects_bad_params(params):
    with pytest.raises(ConfigError) as err:
        build_defense("abl", **params)
    assert err.value.key == next(iter(params))  # named plainly; the defend stage adds defense.abl.


@pytest.mark.parametrize("params", [{"dataset": "nope"}, {"epochs": 0}, {"train_size": 1.5}, {"lr": -1},
                                    {"head_init": "zeros"}, {"device": "x"}])
def test_downstream_ft_rejects_bad_params(params):
    with pytest.raises(ConfigError) as err:
        build_defense("downstream_ft", **params)
    assert err.value.key == next(iter(params))


def test_kinds():
    assert build_defense("abl").kind in KINDS and build_defense("downstream_ft").kind == "repair"


# --- synthetic textures ---------------------------------------------------------------------

def _radial_spectrum(images: np.ndarray) -> np.ndarray:
    """Rotation-invariant structure: log power by spatial frequency of the grey image."""
    grey = images.astype(np.float64).mean(-1)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True)), axes=(1, 2))) ** 2
    size = images.shape[1]
    radius = np.minimum(np.hypot(*(np.indices((size, size)) - size // 2)).astype(int), size // 2)
    return np.log1p(np.stack([power[:, radius == k].mean(1) for k in range(size // 2 + 1)], 1))


def _nearest_centroid_acc(train_f, train_y, test_f, test_y) -> float:
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-9
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    centroids = np.stack([train_f[train_y == c].mean(0) for c in range(10)])
    return float((np.argmin(((test_f[:, None] - centroids[None]) ** 2).sum(-1), 1) == test_y).mean())


def test_synthetic_textures_basic_properties():
    train = load_dataset("synthetic_textures", "train", seed=3, train_size=600, test_size=300)
    test = load_dataset("synthetic_textures", "test", seed=3, train_size=600, test_size=300)
    again = load_dataset("synthetic_textures", "train", seed=3, train_size=600)
    other = load_dataset("synthetic_textures", "train", seed=4, train_size=600)
    assert train.images.shape == (600, 32, 32, 3) and train.images.dtype == np.uint8 and len(test) == 300
    assert train.num_classes == 10 and set(np.unique(train.labels)) == set(range(10))
    assert np.array_equal(train.images, again.images) and np.array_equal(train.labels, again.labels)
    assert not np.array_equal(train.images, other.images) and not np.array_equal(train.images[:300], test.images)
    shapes = load_dataset("synthetic", "train", seed=3, train_size=600)
    assert not np.array_equal(shapes.images, train.images)
    # Class lives in structure, not colour: frequency content separates classes, mean colour does not.
    spectrum = _nearest_centroid_acc(_radial_spectrum(train.images), train.labels, _radial_spectrum(test.images), test.labels)
    colour = _nearest_centroid_acc(train.images.mean((1, 2)), train.labels, test.images.mean((1, 2)), test.labels)
    assert spectrum > 0.25 and colour < 0.2, (spectrum, colour)
    assert load_dataset("synthetic_textures", "test", test_size=20, image_size=64).images.shape == (20, 64, 64, 3)


def test_synthetic_textures_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="train_size"):
        load_dataset("synthetic_textures", "train", train_size=3)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("synthetic_textures", "train", train_size=20, image_size=4)


# --- downstream ASR -------------------------------------------------------------------------

def test_effective_asr_definition():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    preds = np.array([2, 2, 2, 1, 2, 2, 0, 2])
    # class 2: images not of class 2 are 0,0,1,1,3 -> four of five predicted 2
    assert effective_asr(preds, labels, 4) == (pytest.approx(0.8), 2)
    assert effective_asr(labels, labels, 4)[0] == 0.0  # perfect predictions pile nothing up


# --- on the attacked models -----------------------------------------------------------------

def test_abl_isolates_badnets(supervised_badnets):
    """ABL's own LGA isolation run starts from a fresh initialisation, and one init in five fails on this
    fixture (seed 0: AUROC 0.70, precision 0.01; seeds 1-4: 0.999-1.0): the patch is not learned in the
    five LGA epochs, so the mislabelled poisons keep a high loss. The claim is judged on three inits."""
    results = [build_defense("abl", loss_source="retrain_lga", unlearn_epochs=0).run(dataclasses.replace(supervised_badnets, seed=seed))
               for seed in (0, 1, 2)]
    print("ABL (LGA) on supervised BadNets, inits 0-2:", [(round(r["auroc"], 3), r["isolation_precision"]) for r in results])
    out = results[1]
    assert DETECTION_KEYS | REPAIR_KEYS | {"isolation_precision", "adaptation"} <= set(out)
    json.dumps(out)  # JSON-serialisable
    assert sorted(r["auroc"] for r in results)[1] >= 0.9  # the median init
    assert sum(r["isolation_precision"] >= 0.5 for r in results) >= 2
    assert all(r["flagged"] == round(0.05 * r["total"]) for r in results)


def test_abl_unlearning_ascends_the_loss_of_the_isolated_samples(supervised_badnets):
    """ABL's second phase must raise the loss of what it isolated (it does not, on this fixture, remove the
    backdoor: the clean task goes first, see docs/results/claims.md), and must leave the record's model as it was."""
    record = supervised_badnets
    abl = build_defense("abl", loss_source="log")
    loss, _ = abl.isolation_losses(record)
    isolated = isolate(loss, abl.isolation_rate)
    original = copy_method(record)
    augment = loss_augment(original, record.train.images.shape[1])
    images, labels = record.train.images[isolated], record.train.labels[isolated]
    before = per_sample_losses(original, augment, images, labels, record.seed).mean()
    unlearned, stats = abl.unlearn(copy_method(record), record, isolated)
    after = per_sample_losses(unlearned, augment, images, labels, record.seed).mean()
    print(f"isolated samples' mean loss {before:.3f} -> {after:.3f}; {stats}")
    assert stats["unlearn_ascent_steps"] > 0 and after > before + 0.1
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in record.model.state_dict().items())


def test_abl_log_source_on_badnets(supervised_badnets):
    """The pretraining log alone (augmented views, few steps per epoch) separates less well than ABL's
    own LGA run; it must still rank poisoned samples above chance."""
    out = build_defense("abl", loss_source="log", unlearn_epochs=0).run(supervised_badnets)
    print("ABL (log) on supervised BadNets:", json.dumps(out))
    assert out["auroc"] > 0.6 and out["isolation_epochs_used"] == 5
    assert out["acc_after"] == out["acc_before"]  # no unlearning, no change


def test_downstream_ft_on_badnets(supervised_badnets):
    record = supervised_badnets
    state = {k: v.clone() for k, v in record.encoder.state_dict().items()}
    out = build_defense("downstream_ft", epochs=1, train_size=500, test_size=200).run(record)
    print("downstream_ft on supervised BadNets:", json.dumps(out))
    json.dumps(out)
    assert REPAIR_KEYS | {"downstream_acc_before", "downstream_acc_after", "downstream_acc_triggered_after",
                          "downstream_asr_before", "downstream_asr_after", "downstream_target_after", "adaptation"} <= set(out)
    # Above chance (0.1) on both tasks, before and after fine-tuning.
    assert min(out["acc_after"], out["downstream_acc_before"], out["downstream_acc_after"]) > 0.15
    assert out["acc_before"] == record.baseline["acc"] and out["asr_before"] == record.baseline["asr"]
    assert all(torch.equal(v, record.encoder.state_dict()[k]) for k, v in state.items())  # the record is untouched


def test_abl_on_a_contrastive_encoder():
    """The SSL path: a fresh SimCLR for the LGA run, ascend its contrastive loss, re-read with a refitted probe."""
    from cba.attack import run_attack
    from cba.data.synthetic import generate
    from cba.triggers import build_trigger

    record = run_attack(generate(128, seed=1), generate(60, seed=2), build_trigger("patch", {"size": 4}, seed=0),
                        method="simclr", mode="clean_label", poison_rate=0.05, width=4, epochs=1, batch_size=64,
                        hparams={"proj_hidden_dim": 32, "proj_dim": 16})
    abl = build_defense("abl", loss_source="retrain_lga", isolation_epochs=1, lga_batch_size=64, unlearn_epochs=1)
    out = abl.run(record)
    assert DETECTION_KEYS | REPAIR_KEYS | {"knn_acc_after", "adaptation"} <= set(out) and out["flagged"] == 6
    assert "linear probe" in out["adaptation"] and "augmented views" in out["adaptation"]
    first, _ = abl.isolation_losses(record)
    assert np.array_equal(first, abl.isolation_losses(record)[0])  # the LGA run is deterministic given the seed
