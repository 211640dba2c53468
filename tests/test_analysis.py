"""cba.analysis on constructed data where the answer is known."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cba.analysis import (
    centroid_distance_ratio,
    embed_2d,
    entanglement_metrics,
    learning_epochs,
    loss_auroc,
    loss_groups,
    plot_embedding,
    plot_loss_auroc,
    plot_loss_groups,
    poison_silhouette,
    separability_auroc,
    summarize_dynamics,
)
from cba.errors import ConfigError

# ---------------------------------------------------------------- dynamics

# Ten samples; target class 0. Samples 8 and 9 are poisoned (whatever their label).
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0, 1])
POISONED = np.zeros(10, dtype=bool)
POISONED[[8, 9]] = True
LOSSES = {
    1: [2.0] * 10,  # nothing learned yet: all equal
    2: [1.0, 2.0, 4.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.01, 0.03],  # poisoned collapsed
    3: [np.nan, 2.0, 4.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.01, 0.03],  # one clean sample unseen
    4: [1.0, 2.0, 4.0, 1.0, 2.0, 3.0, 4.0, 5.0, np.nan, np.nan],  # no poisoned loss
}


def make_log() -> pd.DataFrame:
    rows = [{"epoch": e, "index": i, "poisoned": bool(POISONED[i]), "loss": v}
            for e, losses in LOSSES.items() for i, v in enumerate(losses)]
    return pd.DataFrame(rows)


def _row(groups: pd.DataFrame, epoch: int, group: str) -> pd.Series:
    return groups[(groups["epoch"] == epoch) & (groups["group"] == group)].iloc[0]


def test_loss_groups_hand_computed():
    groups = loss_groups(make_log(), LABELS, target_class=0)
    assert list(groups.columns) == ["epoch", "group", "mean", "q25", "q50", "q75", "count"]
    assert len(groups) == 4 * 3
    expected = {  # epoch 2, numpy linear quantiles
        "poisoned": (0.02, 0.015, 0.02, 0.025, 2),
        "clean_target": (7 / 3, 1.5, 2.0, 3.0, 3),
        "clean_other": (3.0, 2.0, 3.0, 4.0, 5),
    }
    for group, (mean, q25, q50, q75, count) in expected.items():
        row = _row(groups, 2, group)
        assert row[["mean", "q25", "q50", "q75"]].to_numpy(dtype=float) == pytest.approx([mean, q25, q50, q75])
        assert row["count"] == count
    # NaN losses are ignored: epoch 3 drops sample 0 from the clean target group.
    row = _row(groups, 3, "clean_target")
    assert row["count"] == 2 and row["mean"] == pytest.approx(3.0)
    # A group with no finite loss keeps its row, with count 0 and NaN statistics.
    row = _row(groups, 4, "poisoned")
    assert row["count"] == 0 and math.isnan(row["mean"]) and math.isnan(row["q50"])


def test_loss_groups_rejects_short_labels_and_missing_columns():
    with pytest.raises(ConfigError):
        loss_groups(make_log(), LABELS[:5], target_class=0)
    with pytest.raises(ConfigError):
        loss_groups(make_log().drop(columns="poisoned"), LABELS, target_class=0)


def test_loss_auroc_orientation_and_nan():
    auroc = loss_auroc(make_log()).set_index("epoch")["auroc"]
    assert auroc[1] == pytest.approx(0.5)  # all losses equal
    assert auroc[2] == pytest.approx(1.0)  # poisoned all lower
    assert auroc[3] == pytest.approx(1.0)  # NaN ignored
    assert math.isnan(auroc[4])  # no poisoned loss that epoch
    # Reversed: poisoned losses all higher -> 0, not folded to 1.
    log = make_log()
    log.loc[log["poisoned"] & (log["epoch"] == 2), "loss"] = 99.0
    assert loss_auroc(log).set_index("epoch")["auroc"][2] == pytest.approx(0.0)


CURVES = [
    {"epoch": 1, "loss": 5.0},
    {"epoch": 5, "loss": 4.0, "knn_acc": 0.3, "knn_asr": 0.1},
    {"epoch": 8, "loss": 3.5},
    {"epoch": 10, "loss": 3.0, "knn_acc": 0.7, "knn_asr": 0.5},  # 0.5 is not > 0.5
    {"epoch": 15, "loss": 2.5, "knn_acc": 0.75, "knn_asr": 0.9},  # 0.75 >= 0.9 * 0.8
    {"epoch": 20, "loss": 2.0, "knn_acc": 0.8, "knn_asr": 0.95},
]


def test_learning_epochs():
    out = learning_epochs(CURVES)
    assert out == {"backdoor_epoch": 15, "clean_epoch": 15, "final_acc": 0.8, "final_asr": 0.95}
    never = [dict(row, knn_asr=0.1) if "knn_asr" in row else row for row in CURVES]
    assert learning_epochs(never)["backdoor_epoch"] is None
    custom = [{"epoch": 2, "lin_acc": 0.5, "lin_asr": 0.6}, {"epoch": 4, "lin_acc": 0.9, "lin_asr": float("nan")}]
    assert learning_epochs(custom, acc_key="lin_acc", asr_key="lin_asr") == {
        "backdoor_epoch": 2, "clean_epoch": 4, "final_acc": 0.9, "final_asr": 0.6}
    assert learning_epochs([]) == {"backdoor_epoch": None, "clean_epoch": None, "final_acc": None, "final_asr": None}


def test_summarize_dynamics():
    out = summarize_dynamics(make_log(), CURVES)
    assert out["max_loss_auroc"] == pytest.approx(1.0)
    assert out["max_loss_auroc_epoch"] == 2
    assert out["final_loss_auroc"] == pytest.approx(1.0)  # epoch 4 is NaN and skipped
    assert out["backdoor_epoch"] == 15 and out["clean_epoch"] == 15
    assert summarize_dynamics(make_log().assign(poisoned=False))["max_loss_auroc"] is None


def test_dynamics_plots(tmp_path):
    log = make_log()
    plot_loss_groups(loss_groups(log, LABELS, 0), tmp_path / "groups.png")
    plot_loss_auroc(loss_auroc(log), CURVES, tmp_path / "sub" / "auroc.png")
    for name in ("groups.png", "sub/auroc.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["auroc.png", "groups.png"]


# ---------------------------------------------------------------- entanglement

def make_features(separate: bool, n_target: int = 200, n_poison: int = 40, n_other: int = 100, dim: int = 16,
                  seed: int = 0):
    """Target class 0 around 6*e0, class 1 around 6*e2; poisoned around 6*e1 or drawn like class 0."""
    rng = np.random.default_rng(seed)
    centre = np.eye(dim) * 6.0
    target = centre[0] + rng.normal(size=(n_target, dim))
    other = centre[2] + rng.normal(size=(n_other, dim))
    poison = (centre[1] if separate else centre[0]) + rng.normal(size=(n_poison, dim))
    features = np.concatenate([target, other, poison]).astype(np.float32)
    labels = np.concatenate([np.zeros(n_target), np.ones(n_other), rng.integers(0, 2, n_poison)]).astype(int)
    poisoned = np.concatenate([np.zeros(n_target + n_other, bool), np.ones(n_poison, bool)])
    return features, poisoned, labels


def test_separate_blob_is_detected():
    features, poisoned, labels = make_features(separate=True)
    assert separability_auroc(features, poisoned, labels, 0) > 0.95
    assert poison_silhouette(features, poisoned, labels, 0) > 0.3
    assert centroid_distance_ratio(features, poisoned, labels, 0) > 2.0


@pytest.mark.parametrize("seed", [0, 1])
def test_same_distribution_is_entangled(seed):
    features, poisoned, labels = make_features(separate=False, seed=seed)
    metrics = entanglement_metrics(features, poisoned, labels, 0, seed=seed)
    assert metrics["separability_auroc"] == pytest.approx(0.5, abs=0.15)
    assert metrics["silhouette"] == pytest.approx(0.0, abs=0.05)
    assert metrics["centroid_distance_ratio"] == pytest.approx(1.0, abs=0.2)
    assert metrics["n_poisoned"] == 40 and metrics["n_clean_target"] == 200


@pytest.mark.parametrize("n_poison", [0, 1])
def test_too_few_poisoned_gives_nan(n_poison):
    features, poisoned, labels = make_features(separate=True, n_poison=n_poison)
    metrics = entanglement_metrics(features, poisoned, labels, 0)
    for key in ("separability_auroc", "silhouette", "centroid_distance_ratio"):
        assert math.isnan(metrics[key]), key
    assert metrics["n_poisoned"] == n_poison


def test_small_groups_reduce_folds_and_silhouette_subsamples():
    features, poisoned, labels = make_features(separate=True, n_poison=3)
    assert separability_auroc(features, poisoned, labels, 0, folds=5) > 0.9  # 3 folds, no crash
    features, poisoned, labels = make_features(separate=True, n_target=150, n_poison=30)
    full = poison_silhouette(features, poisoned, labels, 0)
    capped = poison_silhouette(features, poisoned, labels, 0, max_points=60)
    assert capped == poison_silhouette(features, poisoned, labels, 0, max_points=60)  # deterministic
    assert capped == pytest.approx(full, abs=0.1)


def test_entanglement_rejects_bad_shapes():
    features, poisoned, labels = make_features(separate=True)
    with pytest.raises(ConfigError):
        separability_auroc(features, poisoned[:-1], labels, 0)
    with pytest.raises(ConfigError):
        centroid_distance_ratio(features[:, 0], poisoned, labels, 0)


# ---------------------------------------------------------------- embedding

def test_embed_2d_tsne_keeps_poisoned_and_is_deterministic():
    features, poisoned, labels = make_features(separate=True, n_target=120, n_poison=30, n_other=100)
    coords, idx = embed_2d(features, method="tsne", seed=3, max_points=100, poisoned=poisoned, max_iter=250)
    assert coords.shape == (100, 2) and idx.shape == (100,)
    assert np.all(np.diff(idx) > 0)
    assert set(np.flatnonzero(poisoned)) <= set(idx)
    again, idx2 = embed_2d(features, method="tsne", seed=3, max_points=100, poisoned=poisoned, max_iter=250)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(coords, again)
    assert np.isfinite(coords).all()


def test_embed_2d_pca_and_caps():
    features, poisoned, labels = make_features(separate=True, n_target=50, n_poison=30, n_other=50)
    coords, idx = embed_2d(features, method="pca", max_points=1000, poisoned=poisoned)
    assert coords.shape == (130, 2) and np.array_equal(idx, np.arange(130))
    _, idx = embed_2d(features, method="pca", max_points=20, poisoned=poisoned)
    assert len(idx) == 20 and poisoned[idx].all()  # more poisoned than the cap: only poisoned
    coords, idx = embed_2d(features[:2], method="tsne")  # too few points: trivial layout, no crash
    assert coords.shape == (2, 2)
    with pytest.raises(ConfigError):
        embed_2d(features, method="umap")


def test_plot_embedding_writes_png(tmp_path):
    features, poisoned, labels = make_features(separate=True, n_target=50, n_poison=10, n_other=50)
    coords, idx = embed_2d(features, method="pca", poisoned=poisoned)
    path = tmp_path / "embedding.png"
    plot_embedding(coords, labels[idx], poisoned[idx], ["airplane", "automobile"], path, "test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["embedding.png"]  # no temp file left behind
    plot_embedding(coords, labels[idx], np.zeros(len(idx), bool), None, tmp_path / "clean.png")
    assert (tmp_path / "clean.png").stat().st_size > 0


def test_trigger_readout_on_hand_made_features():
    """The shift is measured against the poisons' offset, and read by the probe's own weights."""
    import torch

    from cba.analysis.readout import trigger_readout
    from cba.evaluate import LinearProbe

    probe = LinearProbe(torch.zeros(2), torch.tensor([1.0, 2.0]), 3)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    clean_test = torch.zeros(4, 2)
    triggered = clean_test + torch.tensor([1.0, 4.0])  # shift (1, 4): standardised (1, 2)
    poisoned = torch.tensor([[2.0, 8.0], [2.0, 8.0]])
    clean_target = torch.zeros(3, 2)  # offset (2, 8): same direction, twice as long
    out = trigger_readout(probe, clean_test, triggered, poisoned, clean_target, target=0, classes=["a", "b", "c"])
    assert out["shift_alignment"] == pytest.approx(1.0)
    assert out["shift_over_offset"] == pytest.approx(0.5)
    assert out["logit_gain"] == pytest.approx({"a": 1.0, "b": 2.0, "c": -3.0})
    assert out["target_margin"] == pytest.approx(-1.0) and out["strongest_other"] == "b"
    # The target direction is the clean target mean (0, 0) minus the probe's centring mean (0, 0) here: none.
    # Centred at (-1, 0), the target lies along +x: the offset (2, 8) points at it with cosine 2 / sqrt(68).
    probe.mean.copy_(torch.tensor([-1.0, 0.0]))
    out = trigger_readout(probe, clean_test, triggered, poisoned, clean_target, target=0, classes=["a", "b", "c"])
    assert out["offset_target_alignment"] == pytest.approx(2 / 68**0.5)
    assert out["shift_target_alignment"] == pytest.approx(1 / 17**0.5)
    # An offset at right angles to the target direction: the poisons' feature is all their own.
    aside = trigger_readout(probe, clean_test, triggered, torch.tensor([[0.0, 3.0]]), clean_target, target=0)
    assert aside["offset_target_alignment"] == pytest.approx(0.0, abs=1e-6)
    assert trigger_readout(probe, clean_test, triggered, poisoned[:0], clean_target, target=0) == {}


def test_cosine_to_init_reads_turned_weights_and_ignores_their_scale():
    from cba.analysis.dynamics import cosine_to_init
    from cba.models import build_backbone

    torch.manual_seed(0)
    initial = build_backbone("convnet", width=4)
    same = copy.deepcopy(initial)
    assert cosine_to_init(same, initial) == pytest.approx(1.0)
    with torch.no_grad():
        for p in same.parameters():
            p.mul_(3.0)  # what weight growth under batch norm does: the same function, the same direction
    assert cosine_to_init(same, initial) == pytest.approx(1.0)
    torch.manual_seed(1)
    other = build_backbone("convnet", width=4)  # every layer drawn afresh: unrelated directions
    assert abs(cosine_to_init(other, initial)) < 0.2
    with pytest.raises(ConfigError, match="initial"):
        cosine_to_init(other, build_backbone("convnet", width=8))
