import numpy as np
import torch

from cba.evaluate import (accuracy, attack_success_rate, extract_features, knn_predict, non_target_mask,
                          train_linear_probe, probe_predict)
from cba.models import build_backbone


def test_knn_hand_made():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.0, 2.0], [0.6, 0.4]])
    # k=2: each query's two nearest neighbours decide.
    np.testing.assert_array_equal(knn_predict(bank, labels, queries, 2, k=2).numpy(), [0, 1, 0])


def test_knn_weights_by_similarity_not_by_count():
    # Two far neighbours of class 1 against one identical neighbour of class 0:
    # with a low temperature the identical one wins.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    assert knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 2, k=3, temperature=0.05).item() == 0
    # With a very high temperature the votes are nearly equal, so the majority wins.
    assert knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 2, k=3, temperature=100.0).item() == 1


def test_asr_only_counts_non_target_images():
    true = np.array([0, 1, 2, 3, 0, 5])
    keep = non_target_mask(true, target_class=0)
    preds_on_triggered = torch.tensor([0, 0, 3, 5])  # for the four non-target images
    assert keep.sum() == 4
    assert attack_success_rate(preds_on_triggered, 0) == 0.5
    assert np.isnan(attack_success_rate(torch.tensor([], dtype=torch.long), 0))


def test_accuracy():
    assert accuracy(torch.tensor([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5


def test_linear_probe_fits_separable_features():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=gen) * 5
    labels = torch.arange(300) % 3
    feats = centers[labels] + torch.randn(300, 8, generator=gen)
    probe = train_linear_probe(feats, labels, 3, epochs=20)
    assert accuracy(probe_predict(probe, feats), labels) > 0.97


def test_extract_features_shape_and_eval_mode():
    enc = build_backbone("convnet", width=4)
    enc.train()
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    feats = extract_features(enc, images, batch_size=4)
    assert feats.shape == (10, enc.feature_dim)
    assert enc.training  # restored
    # Eval mode: a sample's features do not depend on its batch.
    np.testing.assert_allclose(extract_features(enc, images[:1]).numpy(), feats[:1].numpy(), atol=1e-5)


def test_natural_rate_counts_clean_non_target_images_sent_to_the_target():
    """An encoder that maps everything to one point sends every image, triggered or not, to one class:
    its ASR is then no evidence of a backdoor, and the natural rate says so."""
    from cba.evaluate import evaluate_encoder

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.ones(len(x), 4) + 0 * x.mean()

        def parameters(self, recurse=True):
            return iter([torch.nn.Parameter(torch.zeros(1))])

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(40, dtype=np.int64)
    labels[30:] = 1  # class 0 dominates the bank, so every prediction is 0
    test_labels = np.array([0, 1, 1, 1, 1, 0, 1, 1])
    metrics, _ = evaluate_encoder(Constant(), images, labels, images[:8], test_labels, images[:6], 0, 2, k=10)
    for name in ("knn", "linear"):
        assert metrics[name]["asr"] == 1.0 and metrics[name]["natural_rate"] == 1.0


def test_evaluate_features_on_extracted_features_is_evaluate_encoder():
    """Readers of several triggered sets extract the clean features once: the figures must not change."""
    from cba.evaluate import evaluate_encoder, evaluate_features, extract_features

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 6))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(60) % 3
    triggered = np.clip(images[:20].astype(int) + 40, 0, 255).astype(np.uint8)
    direct, fit = evaluate_encoder(encoder, images, labels, images[:30], labels[:30], triggered, 1, 3, k=5)
    feats = [extract_features(encoder, x) for x in (images, images[:30], triggered)]
    again, _ = evaluate_features(feats[0], labels, feats[1], labels[:30], feats[2], 1, 3, k=5, probe=fit.probe)
    assert again == direct


def _blobs(n=600, dim=12, classes=4, spread=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * spread
    labels = torch.arange(n) % classes
    return centers[labels] + torch.randn(n, dim, generator=gen) * 1.5, labels


def objective(weight, bias, z, labels, C):
    """scikit-learn's LogisticRegression objective divided by C·N."""
    import torch.nn.functional as F
    z = torch.as_tensor(z).double()
    return float(F.cross_entropy(z @ weight.double().T + bias.double(), labels) + weight.double().pow(2).sum() / (2 * C * len(z)))


def test_converged_probe_matches_scikit_learn_logistic_regression():
    """The probe's objective is LogisticRegression(C)'s divided by C·N, so weight_decay = 1/(C·N) gives its solution."""
    from sklearn.linear_model import LogisticRegression
    from cba.probe import fit_linear_probe

    feats, labels = _blobs()
    for C in (0.01, 1.0):
        fit = fit_linear_probe(feats, labels, 4, weight_decays=[1.0 / (C * len(feats))])
        assert fit.converged and fit.grad_max < 1e-5
        z = ((feats - fit.probe.mean) / fit.probe.std).numpy()
        reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(z, labels.numpy())
        # Same objective value (the optimum is flat near separability, so parameters agree less tightly than it).
        ours = objective(fit.probe.linear.weight.detach(), fit.probe.linear.bias.detach(), z, labels, C)
        theirs = objective(torch.tensor(reference.coef_), torch.tensor(reference.intercept_), z, labels, C)
        assert ours <= theirs + 1e-6
        np.testing.assert_allclose(fit.probe.linear.weight.detach().numpy(), reference.coef_, atol=1e-2)
        np.testing.assert_array_equal(probe_predict(fit.probe, feats).numpy(), reference.predict(z))


def test_converged_probe_chooses_the_weight_decay_on_held_out_data():
    """Few samples in many dimensions: a huge decay underfits, so the sweep must prefer a smaller one, and it
    must report the held-out ACC of every candidate; the sweep is deterministic from the seed."""
    from cba.probe import fit_linear_probe

    feats, labels = _blobs(n=200, dim=40, spread=1.0)
    fit = fit_linear_probe(feats, labels, 4, weight_decays=[1e-3, 10.0], val_fraction=0.25, seed=3)
    assert set(fit.val_acc) == {1e-3, 10.0}
    assert fit.val_acc[1e-3] > fit.val_acc[10.0]
    assert fit.weight_decay == 1e-3
    again = fit_linear_probe(feats, labels, 4, weight_decays=[1e-3, 10.0], val_fraction=0.25, seed=3)
    assert torch.equal(again.probe.linear.weight, fit.probe.linear.weight)


def test_converged_probe_beats_a_short_sgd_probe_on_its_own_objective():
    """The SGD probe stops where its schedule ends; L-BFGS reaches a lower training loss at the same decay."""
    import torch.nn.functional as F
    from cba.probe import fit_linear_probe

    feats, labels = _blobs(spread=0.8)
    wd = 1e-4
    converged = fit_linear_probe(feats, labels, 4, weight_decays=[wd]).probe
    sgd = train_linear_probe(feats, labels, 4, epochs=2, weight_decay=wd)
    objective = lambda p: float((F.cross_entropy(p(feats), labels) + 0.5 * wd * p.linear.weight.pow(2).sum()).detach())  # noqa: E731
    assert objective(converged) < objective(sgd) - 1e-3


def test_probe_options_are_checked():
    import pytest
    from cba.errors import ConfigError
    from cba.probe import check_probe_options

    for bad in ({"weight_decays": []}, {"weight_decays": [-1]}, {"weight_decays": "abc"}, {"val_fraction": 1.0},
                {"max_iter": 0}, {"max_iter": True}):
        options = {"weight_decays": [1e-4], "val_fraction": 0.2, "max_iter": 10, **bad}
        with pytest.raises(ConfigError, match=next(iter(bad))):
            check_probe_options(**options)


def test_robust_accuracy_and_landing():
    """RA counts triggered images still given their true class; landing counts where triggered images went."""
    from cba.evaluate import evaluate_encoder

    class Colour(torch.nn.Module):  # features: the mean of each channel, so a red trigger reads as "red"
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # extract_features reads the device from a parameter

        def forward(self, x):
            return x.mean(dim=(2, 3))

    rng = np.random.default_rng(0)
    def images(channel, n):
        out = rng.integers(0, 40, (n, 32, 32, 3), dtype=np.uint8)
        out[..., channel] += 200
        return out
    train = np.concatenate([images(c, 30) for c in range(3)])
    train_labels = np.repeat(np.arange(3), 30)
    test = np.concatenate([images(c, 4) for c in range(3)])
    test_labels = np.repeat(np.arange(3), 4)
    triggered = test[4:].copy()
    triggered[:2, ..., 0] = 255  # two of the eight non-target images get a strong "class 0" colour on top
    triggered[:2, ..., 1:] //= 8
    metrics, _ = evaluate_encoder(Colour(), train, train_labels, test, test_labels, triggered, 0, 3, k=5,
                                  triggered_labels=test_labels[4:])
    for name in ("knn", "linear"):
        assert metrics[name]["acc"] == 1.0
        assert metrics[name]["asr"] == 0.25 and metrics[name]["robust_acc"] == 0.75
        assert metrics[name]["landing"] == [2, 2, 4]  # two of the class-1 images moved to 0
