"""Neural Cleanse, STRIP and Fine-Pruning: the core math on hand-made models, and the
literature's claims on the supervised BadNets fixture (where these defenses should work)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cba.defenses import build_defense
from cba.defenses.fine_pruning import ChannelPruner, channel_activations, pruning_mask
from cba.defenses.neural_cleanse import anomaly_index, flag_classes, reverse_engineer
from cba.defenses.strip import strip_entropy
from cba.errors import ConfigError
from stages.common import defense_section


class Planted(nn.Module):
    """A 3-class linear model on 8x8 images with a planted backdoor: a bright top-left
    2x2 corner votes for class 0, so class 0 needs a far smaller trigger than 1 or 2."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(3, 192, generator=torch.Generator().manual_seed(0)) * 0.05)
            self.linear.bias.zero_()

    def forward(self, x):
        corner = x[:, :, :2, :2].mean((1, 2, 3))
        bonus = torch.stack([20 * (corner - 0.5), torch.zeros_like(corner), torch.zeros_like(corner)], 1)
        return self.linear((x - 0.5).flatten(1)) + bonus


class Constant(nn.Module):
    """Ignores its input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- Neural Cleanse: the math -------------------------------------------------

def test_mad_anomaly_index_by_hand():
    norms = [10, 100, 102, 98, 101, 99, 103, 97, 100, 100]
    # median 100; |deviations| sorted 0,0,0,1,1,2,2,3,3,90 -> MAD 1.5
    index = anomaly_index(norms)
    assert index[0] == pytest.approx(90 / (1.4826 * 1.5))
    assert index[1] == pytest.approx(0.0) and index[6] == pytest.approx(3 / (1.4826 * 1.5))
    assert flag_classes(norms, 2.0) == [0]  # class 6 deviates, but only by 1.35 < 2
    # Only the small side is suspicious: an unusually *large* trigger is not a backdoor.
    assert flag_classes([100, 101, 99, 100, 1000], 2.0) == []
    assert flag_classes([100, 101, 99, 100, 10], 2.0) == [4]


def test_log_scale_anomaly_index_by_hand():
    norms = [6.0, 48, 197, 99, 71, 96, 38, 20, 54, 67]  # multiplicative spread, one large clean outlier
    logs = np.log(norms)
    median = np.median(logs)
    mad = np.median(np.abs(logs - median))
    np.testing.assert_allclose(anomaly_index(norms, "log"), np.abs(logs - median) / (1.4826 * mad))
    assert anomaly_index(norms, "linear")[0] < 2 and flag_classes(norms, 2.0, "linear") == []
    assert anomaly_index(norms, "log")[0] > 3 and flag_classes(norms, 2.0, "log") == [0]
    # a uniform rescaling of every mask changes nothing on the log scale
    np.testing.assert_allclose(anomaly_index(np.multiply(norms, 7.0), "log"), anomaly_index(norms, "log"))
    with pytest.raises(ValueError, match="scale"):
        anomaly_index(norms, "sqrt")


def test_batched_and_per_class_reverse_engineering_agree():
    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(steps=40, batch_size=16, lr=0.1, init_cost=1e-2, seed=3)
    batched = reverse_engineer(Planted(), images, 3, batched=True, **kwargs)
    looped = reverse_engineer(Planted(), images, 3, batched=False, **kwargs)
    assert batched["masks"].shape == (3, 1, 8, 8) and batched["patterns"].shape == (3, 3, 8, 8)
    norms_b = batched["masks"].flatten(1).sum(1).numpy()
    norms_l = looped["masks"].flatten(1).sum(1).numpy()
    np.testing.assert_allclose(norms_b, norms_l, rtol=0.05)
    assert int(norms_b.argmin()) == int(norms_l.argmin()) == 0  # the planted class
    assert flag_classes(norms_b) == flag_classes(norms_l) == [0]
    assert batched["seconds"] > 0 and (batched["success"] >= 0.9).all()


# --- STRIP: the math ----------------------------------------------------------

def test_strip_entropy_of_an_input_blind_classifier_is_its_fixed_entropy():
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    p = torch.softmax(logits, 0)
    expected = float(-(p * p.log()).sum())
    inputs, pool = torch.rand(5, 3, 8, 8), torch.rand(7, 3, 8, 8)
    overlays = torch.randint(0, 7, (5, 4))
    entropy = strip_entropy(Constant(logits), inputs, pool, overlays)
    np.testing.assert_allclose(entropy.numpy(), expected, rtol=1e-5)
    uniform = strip_entropy(Constant(torch.zeros(4)), inputs, pool, overlays)
    np.testing.assert_allclose(uniform.numpy(), math.log(4), rtol=1e-5)


def test_strip_entropy_separates_a_planted_trigger_from_a_random_classifier():
    gen = torch.Generator().manual_seed(0)
    clean, pool = torch.rand(40, 3, 8, 8, generator=gen), torch.rand(30, 3, 8, 8, generator=gen)
    triggered = clean.clone()
    triggered[:, :, :2, :2] = 1.0
    overlays = torch.randint(0, 30, (40, 10), generator=gen)
    model = Planted()
    with torch.no_grad():  # a large random linear part: clean blends land on random classes
        model.linear.weight.mul_(10)
    h_clean = strip_entropy(model, clean, pool, overlays)
    h_trig = strip_entropy(model, triggered, pool, overlays)
    assert ((h_clean >= 0) & (h_clean <= math.log(3) + 1e-6)).all()
    assert h_trig.mean() < h_clean.mean()


# --- Fine-Pruning: the math ---------------------------------------------------

def test_pruning_mask_zeroes_the_least_active_channels():
    activations = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0])
    assert pruning_mask(activations, 0.4).tolist() == [1, 0, 1, 0, 1]
    assert pruning_mask(activations, 0.0).tolist() == [1] * 5
    assert pruning_mask(activations, 0.99).tolist() == [1, 0, 0, 0, 0]  # only the most active (5.0) stays


def test_channel_pruner_zeroes_exactly_those_channels():
    from cba.models import build_backbone

    torch.manual_seed(0)
    encoder = build_backbone("convnet", width=4).eval()
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    activations = channel_activations(encoder, images)
    assert activations.shape == (encoder.feature_dim,)
    mask = pruning_mask(activations, 0.5)
    pruner = ChannelPruner(encoder)
    pruner.set(mask)
    x = torch.rand(4, 3, 32, 32)
    maps = encoder.forward_maps(x)
    pruned = torch.argsort(activations)[: encoder.feature_dim // 2]
    assert set(torch.nonzero(mask == 0).flatten().tolist()) == set(pruned.tolist())
    assert maps[:, mask == 0].abs().max() == 0 and maps[:, mask == 1].abs().max() > 0
    assert (encoder(x)[:, mask == 0] == 0).all()  # pooled features miss them too
    pruner.handle.remove()
    assert encoder.forward_maps(x)[:, mask == 0].abs().max() > 0


# --- validation ---------------------------------------------------------------

@pytest.mark.parametrize("name, params, key", [
    ("neural_cleanse", {"steps": 0}, "steps"),
    ("neural_cleanse", {"target_success": 1.5}, "target_success"),
    ("neural_cleanse", {"batched": "yes"}, "batched"),
    ("neural_cleanse", {"batched": 1}, "batched"),
    ("neural_cleanse", {"norm_scale": "sqrt"}, "norm_scale"),
    ("strip", {"frr": 1.0}, "frr"),
    ("strip", {"n_overlays": 0}, "n_overlays"),
    ("fine_pruning", {"prune_ratio": "max"}, "prune_ratio"),
    ("fine_pruning", {"prune_ratios": [0.5, 1.2]}, "prune_ratios"),
    ("fine_pruning", {"augment": "ssl"}, "augment"),
    ("strip", {"overlays": 3}, "overlays"),
])
def test_bad_parameters_name_their_key(name, params, key):
    with pytest.raises(ConfigError) as err:
        build_defense(name, **params)
    assert err.value.key == key  # named plainly; the stage puts it where params.yaml has it:
    with pytest.raises(ConfigError) as err, defense_section(name, params):
        build_defense(name, **params)
    assert err.value.key == f"defense.{name}.{key}"


# --- the literature's claims on supervised BadNets ------------------------------

@pytest.fixture(scope="module")
def badnets_runs(supervised_badnets):
    """Each defense once on the fixture, checking that none touches the record's model."""
    record = supervised_badnets
    before = state_of(record.classifier)
    runs = {
        "neural_cleanse": build_defense("neural_cleanse", steps=150, batch_size=16, clean_images=200).run(record),
        "strip": build_defense("strip", max_inputs=250).run(record),
        # Pruning 90% of the last stage, as Liu et al. prune until accuracy drops: at 80% the short fine-tune can
        # grow the backdoor back on some float streams (one thread on an AVX-512 machine: ASR 1.00 -> 0.86).
        "fine_pruning": build_defense("fine_pruning", prune_ratios=[0.0, 0.4, 0.8, 0.9], prune_ratio=0.9).run(record),
    }
    runs["unmodified"] = same_state(before, state_of(record.classifier)) and not record.encoder.stages[-1]._forward_hooks
    return runs


def test_the_record_is_not_modified_and_outputs_are_json(badnets_runs):
    import json

    assert badnets_runs["unmodified"]
    for name in ("neural_cleanse", "strip", "fine_pruning"):
        assert isinstance(badnets_runs[name]["adaptation"], str)
        json.dumps(badnets_runs[name])


def test_neural_cleanse_flags_the_badnets_target(badnets_runs, supervised_badnets):
    out = badnets_runs["neural_cleanse"]
    assert len(out["anomaly_index"]) == len(out["mask_l1"]) == supervised_badnets.num_classes
    norms = out["mask_l1"]
    detail = f"mask L1 {norms}, log index {out['anomaly_index_log']}, linear index {out['anomaly_index_linear']}"
    # The reversed trigger of the true target is the smallest by far, and the default log-scale MAD flags it with
    # the largest index. (Whether a second class also crosses 2.0 varies across processors: on one machine class 7
    # scored 2.7 with the same code, so "flagged alone" is not asserted.)
    assert out["target_rank"] == 0 and norms[0] < 0.25 * sorted(norms)[len(norms) // 2], detail
    assert out["norm_scale"] == "log" and out["target_flagged"] and 0 in out["flagged_classes"], detail
    assert max(range(len(norms)), key=lambda c: out["anomaly_index_log"][c]) == 0, detail
    # The paper's linear-scale index is reported beside it (below 2 on this model: see the module docstring).
    assert out["target_anomaly_index_linear"] == pytest.approx(out["anomaly_index_linear"][0])


def test_strip_detects_badnets_inputs(badnets_runs):
    out = badnets_runs["strip"]
    assert out["auroc"] >= 0.9, out
    assert out["entropy_triggered_mean"] < out["entropy_clean_mean"]
    assert out["far"] == pytest.approx(1 - out["tpr"]) and out["frr"] == out["fpr"]


def test_fine_pruning_removes_the_badnets_backdoor(badnets_runs):
    out = badnets_runs["fine_pruning"]
    assert out["asr_after"] < out["asr_before"] - 0.3, out
    assert [row["prune_ratio"] for row in out["curve"]] == [0.0, 0.4, 0.8, 0.9]
    assert out["curve"][0]["acc"] == out["acc_before"] and out["prune_ratio"] == 0.9


def test_every_defense_lives_in_the_module_dvc_yaml_names():
    """dvc.yaml's defend stage depends on cba/defenses/<name>.py: a defense elsewhere would go untracked."""
    from cba.defenses import DEFENSES

    for name in DEFENSES.names():
        assert DEFENSES.get(name).__module__ == f"cba.defenses.{name}", name
