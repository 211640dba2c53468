"""The gradient-matching term of the learned trigger (cba.triggers.matching)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cba.augment import build_augment
from cba.models import build_backbone
from cba.ssl import build_method
from cba.triggers.matching import (backdoor_gradient, batch_statistics, encoder_parameters, matching_loss,
                                   poison_gradient)


def _surrogate(seed: int = 0):
    torch.manual_seed(seed)
    return build_method("simclr", build_backbone("convnet", width=4), temperature=0.2).eval()


def test_matching_loss_is_one_minus_the_cosine_over_all_parameters():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0]])]
    assert float(matching_loss(a, a)) == 0.0
    assert abs(float(matching_loss(a, [-t for t in a])) - 2.0) < 1e-6
    b = [torch.tensor([0.0, 1.0]), torch.tensor([[0.0, 0.0]])]
    # cos = (1*0 + 0*1 + 0 + 0) / ... = 0
    assert abs(float(matching_loss(a, b)) - 1.0) < 1e-6
    c = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0]])]
    expected = 1 - 1 / (5 ** 0.5)  # a = (1, 0, 0, 2), c = (1, 0, 0, 0)
    assert abs(float(matching_loss(a, c)) - expected) < 1e-6


def test_batch_statistics_trains_on_batch_statistics_and_leaves_the_running_ones_alone():
    method = _surrogate()
    norm = method.backbone.stem[1]
    before = {k: v.clone() for k, v in method.state_dict().items()}
    x = torch.rand(8, 3, 32, 32)
    with batch_statistics(method):
        assert method.training
        out = method.backbone(x)
    assert not method.training and not method.backbone.training
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The pass inside really used batch statistics: it differs from the evaluation-mode pass.
    assert not torch.allclose(out, method.backbone(x))
    assert norm.running_mean is not None
    # A method in training mode around an evaluation-mode encoder gets exactly that back.
    method.train()
    method.encoder.eval()
    with batch_statistics(method):
        assert method.backbone.training
    assert method.training and not method.backbone.training and not norm.training


def test_poison_gradient_is_the_anchors_nt_xent_gradient_and_differentiable_in_the_pattern():
    method = _surrogate()
    augment = nn.Sequential()  # no augmentation: both views are the images
    targets = torch.rand(4, 3, 32, 32) * 0.8 + 0.1
    delta = torch.full((1, 3, 32, 32), 0.05, requires_grad=True)
    negatives = torch.rand(4, 3, 32, 32)
    with batch_statistics(method):
        grads = poison_gradient(method, targets, delta, negatives, augment, temperature=0.2, differential=False)
        # Without augmentation both views are equal; the same loss written out directly:
        params = encoder_parameters(method.encoder)
        z = method.projector(method.backbone(torch.cat([targets + 0.05, negatives])))
        z = F.normalize(torch.cat([z, z]), dim=1)
        logits = z @ z.T / 0.2
        logits.fill_diagonal_(float("-inf"))
        targets_index = torch.cat([torch.arange(8, 16), torch.arange(0, 8)])
        per_anchor = F.cross_entropy(logits, targets_index, reduction="none")
        direct = torch.autograd.grad(((per_anchor[:8] + per_anchor[8:]) / 2)[:4].mean(), params)
    assert len(grads) == len(params)
    assert all(torch.allclose(g, d, atol=1e-5) for g, d in zip(grads, direct))
    second, = torch.autograd.grad(sum(g.sum() for g in grads), delta)
    assert second.abs().sum() > 0


def test_the_differential_gradient_is_what_the_pattern_adds():
    method = _surrogate()
    augment = build_augment("ssl", 32, min_scale=0.5)
    targets, negatives = torch.rand(4, 3, 32, 32) * 0.8 + 0.1, torch.rand(4, 3, 32, 32)
    with batch_statistics(method):
        torch.manual_seed(1)
        nothing = poison_gradient(method, targets, torch.zeros(1, 3, 32, 32), negatives, augment, 0.2)
        torch.manual_seed(1)
        something = poison_gradient(method, targets, torch.full((1, 3, 32, 32), 0.06), negatives, augment, 0.2)
    # The same augmentation draws replay on the clean batch, so a zero pattern adds exactly nothing.
    assert all(float(g.detach().abs().max()) == 0.0 for g in nothing)
    assert sum(float(g.detach().abs().sum()) for g in something) > 0


def test_backdoor_gradient_lowers_the_target_loss_when_followed():
    method = _surrogate()
    encoder = method.encoder
    centroids = F.normalize(torch.randn(3, encoder.feature_dim), dim=1)
    head = lambda raw: F.normalize(raw, dim=1) @ centroids.T / 0.1  # noqa: E731
    x = torch.rand(16, 3, 32, 32)

    def target_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(head(encoder(x)), torch.zeros(16, dtype=torch.long)))

    start = target_loss()
    grads = backdoor_gradient(encoder, head, x)
    with torch.no_grad():
        for p, g in zip(encoder_parameters(encoder), grads):
            p -= 1e-2 * g
    assert target_loss() < start
