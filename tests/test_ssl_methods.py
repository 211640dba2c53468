"""SSL methods: each loss against a naive per-sample formula, momentum networks,
the MoCo queue, per-sample alignment, gradient isolation, and a smoke train."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cba.augment import build_augment
from cba.errors import ConfigError
from cba.io import load_tensors, save_tensors
from cba.models import build_backbone
from cba.ssl import METHODS, build_method
from cba.ssl.byol import byol_per_sample, byol_tau, ema_update
from cba.ssl.simclr import nt_xent_per_sample
from cba.ssl.simsiam import simsiam_per_sample
from cba.train import TrainConfig, train

SMALL = {  # small heads keep every test fast
    "simclr": dict(proj_hidden_dim=16, proj_dim=8),
    "byol": dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16),
    "mocov2": dict(proj_hidden_dim=16, proj_dim=8, queue_size=32),
    "simsiam": dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=4),
    "supervised": {},
}


class FlatNet(nn.Module):
    """A BN-free linear backbone: per-sample outputs never depend on the batch."""

    feature_dim = 12

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, self.feature_dim)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make(name: str, **extra):
    torch.manual_seed(0)
    return build_method(name, FlatNet(), num_classes=3, **{**SMALL[name], **extra})


def batch(b: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    views = [torch.rand(b, 3, 4, 4, generator=gen) for _ in range(2)]
    return views, torch.randint(0, 3, (b,), generator=gen)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


# --- losses against naive formulas ---------------------------------------

def test_nt_xent_matches_per_anchor_loop():
    z1, z2, t = torch.randn(5, 4), torch.randn(5, 4), 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, b = len(z), len(z1)
    naive = []
    for i in range(n):
        pos = (i + b) % n
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        naive.append(-math.log(math.exp(float(z[i] @ z[pos]) / t) / denom))
    expected = [(naive[i] + naive[i + b]) / 2 for i in range(b)]
    assert torch.allclose(nt_xent_per_sample(z1, z2, t), torch.tensor(expected), atol=1e-5)


@torch.no_grad()
def test_byol_loss_matches_loop():
    method = make("byol").eval()
    views, labels = batch()
    loss, per_sample = method.loss(views, labels)
    p = [method.predictor(method.projector(method.backbone(v))) for v in views]
    t = [method.target_projector(method.target_backbone(v)) for v in views]
    for i in range(len(labels)):
        expected = ((2 - 2 * cos(p[0][i], t[1][i])) + (2 - 2 * cos(p[1][i], t[0][i]))) / 2
        assert per_sample[i].item() == pytest.approx(expected, abs=1e-5)
    assert loss.item() == pytest.approx(per_sample.mean().item(), abs=1e-6)


@torch.no_grad()
def test_mocov2_loss_matches_loop():
    method = make("mocov2").eval()
    views, labels = batch()
    queue = method.queue.clone()
    _, per_sample = method.loss(views, labels)
    q = [F.normalize(method.projector(method.backbone(v)), dim=1) for v in views]
    k = [F.normalize(method.key_projector(method.key_backbone(v)), dim=1) for v in views]
    t = method.temperature
    for i in range(len(labels)):
        def one(qi, ki):
            pos = math.exp(float(qi @ ki) / t)
            return -math.log(pos / (pos + sum(math.exp(float(qi @ n) / t) for n in queue)))
        expected = (one(q[0][i], k[1][i]) + one(q[1][i], k[0][i])) / 2
        assert per_sample[i].item() == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def test_simsiam_loss_matches_loop():
    method = make("simsiam").eval()
    views, labels = batch()
    _, per_sample = method.loss(views, labels)
    z = [method.projector(method.backbone(v)) for v in views]
    p = [method.predictor(zi) for zi in z]
    for i in range(len(labels)):
        expected = -(cos(p[0][i], z[1][i]) + cos(p[1][i], z[0][i])) / 2
        assert per_sample[i].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@torch.no_grad()
def test_supervised_loss_matches_loop(smoothing):
    method = make("supervised", label_smoothing=smoothing)
    views, labels = batch()
    _, per_sample = method.loss(views[:1], labels)
    logits = method.head(method.backbone(views[0]))
    assert torch.equal(method.logits(views[0]), logits)
    for i, y in enumerate(labels.tolist()):
        nll = -torch.log_softmax(logits[i], dim=0)
        expected = (1 - smoothing) * nll[y] + smoothing * nll.mean()
        assert per_sample[i].item() == pytest.approx(expected.item(), abs=1e-5)
    assert (method.num_views, method.augmentation, method.uses_labels) == (1, "weak", True)


# --- momentum networks ---------------------------------------------------

def test_ema_update_formula_is_exact():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-7)


def test_byol_tau_schedule():
    assert byol_tau(0.0, 0.99) == pytest.approx(0.99)
    assert byol_tau(1.0, 0.99) == pytest.approx(1.0)
    assert byol_tau(0.5, 0.99) == pytest.approx(0.995)


def test_byol_after_step_moves_target_by_scheduled_tau():
    method = make("byol")
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    old = method.target_backbone.fc.weight.clone()
    method.after_step(0.0)
    expected = 0.99 * old + 0.01 * method.backbone.fc.weight
    assert torch.allclose(method.target_backbone.fc.weight, expected, atol=1e-6)


@pytest.mark.parametrize("name,frozen", [("byol", ("target_backbone", "target_projector")),
                                         ("mocov2", ("key_backbone", "key_projector"))])
def test_no_gradient_into_momentum_networks(name, frozen):
    method = make(name)
    views, labels = batch()
    loss, _ = method.loss(views, labels)
    loss.backward()
    for part in frozen:
        assert all(p.grad is None and not p.requires_grad for p in getattr(method, part).parameters())
    assert method.backbone.fc.weight.grad is not None


def test_stop_gradient_in_simsiam_and_byol():
    p1, p2, z1, z2 = (torch.randn(4, 5, requires_grad=True) for _ in range(4))
    for fn in (simsiam_per_sample, byol_per_sample):
        fn(p1, p2, z1, z2).sum().backward()
        assert z1.grad is None and z2.grad is None
        assert p1.grad is not None and p2.grad is not None


# --- the MoCo queue ------------------------------------------------------

def test_enqueue_ring_buffer_wraps_and_stays_normalised():
    method = make("mocov2", queue_size=10)
    keys = torch.randn(3, 8) * 5  # deliberately not unit length
    method.enqueue(keys)
    assert torch.allclose(method.queue[:3], F.normalize(keys, dim=1)) and int(method.queue_ptr) == 3
    method.enqueue(torch.randn(4, 8))
    assert int(method.queue_ptr) == 7
    wrap = torch.randn(5, 8)
    method.enqueue(wrap)  # slots 7, 8, 9, 0, 1
    assert torch.allclose(method.queue[[7, 8, 9, 0, 1]], F.normalize(wrap, dim=1)) and int(method.queue_ptr) == 2
    many = torch.randn(13, 8)
    method.enqueue(many)  # more than fit: the newest 10 fill the ring from the pointer
    assert torch.allclose(method.queue[(2 + torch.arange(10)) % 10], F.normalize(many[-10:], dim=1))
    assert int(method.queue_ptr) == 2
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(10))


def test_mocov2_loss_enqueues_keys_only_in_training():
    method = make("mocov2")
    views, labels = batch()
    method.eval()
    before = method.queue.clone()
    method.loss(views, labels)
    assert torch.equal(method.queue, before) and int(method.queue_ptr) == 0
    method.train()
    loss, _ = method.loss(views, labels)
    loss.backward()  # the in-place enqueue must not break autograd
    assert int(method.queue_ptr) == 12
    method.eval()
    keys = torch.cat([method.key(v) for v in views])
    assert torch.allclose(method.queue[:12], keys, atol=1e-6)


def test_shuffled_key_batches_match_plain_keys_without_batch_norm():
    method = make("mocov2", shuffle_bn_splits=3)  # BN-free backbone: shuffling must change nothing
    views, _ = batch(b=7)
    shuffled = method.key(views[0])
    method.eval()
    assert torch.allclose(shuffled, method.key(views[0]), atol=1e-6)


# --- per-sample alignment, validation, state ------------------------------

@pytest.mark.parametrize("name", sorted(SMALL))
def test_per_sample_loss_follows_the_batch_order(name):
    method = make(name).eval()  # eval: BN running stats, so samples do not interact
    views, labels = batch(b=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    _, per_sample = method.loss(views, labels)
    _, permuted = method.loss([v[perm] for v in views], labels[perm])
    assert per_sample.shape == (6,) and not per_sample.requires_grad
    assert torch.allclose(permuted, per_sample[perm], atol=1e-5)


def test_unknown_hyperparameter_is_a_config_error():
    for name in METHODS:
        with pytest.raises(ConfigError):
            build_method(name, FlatNet(), not_an_option=1)
    with pytest.raises(ConfigError):
        make("mocov2", temperature=0)
    with pytest.raises(ConfigError):
        make("byol", ema_momentum=1.5)


@pytest.mark.parametrize("name,state", [("byol", "target_backbone.fc.weight"), ("mocov2", "queue")])
def test_state_dict_round_trips_momentum_state(tmp_path, name, state):
    method = make(name)
    views, labels = batch()
    method.loss(views, labels)[0].backward()
    with torch.no_grad():
        method.backbone.fc.weight.add_(1.0)
    method.after_step(0.3)
    save_tensors(tmp_path / "m.safetensors", method.state_dict())
    torch.manual_seed(123)
    fresh = build_method(name, FlatNet(), num_classes=3, **SMALL[name])
    fresh.load_state_dict(load_tensors(tmp_path / "m.safetensors"))
    for key, value in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert state in fresh.state_dict()
    if name == "mocov2":
        assert int(fresh.queue_ptr) == 12


@pytest.mark.parametrize("name", sorted(SMALL))
def test_two_step_smoke_train(name):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, size=(64, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(64) % 3
    method = build_method(name, build_backbone("convnet", width=4), num_classes=3, **SMALL[name])
    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, warmup_epochs=0)
    result = train(method, images, labels, build_augment(method.augmentation, image_size=16), config,
                   torch.device("cpu"), progress=False)
    assert result.losses.shape == (1, 64) and np.isfinite(result.losses).all()
    assert math.isfinite(result.curves[0]["loss"])
