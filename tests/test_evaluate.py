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
    metrics, _ = evaluate_encoder(Constant(), images, labels, images[:8], test_labels, images[:6], 0, 2, k=10, probe_epochs=100)
    for name in ("knn", "linear"):
        assert metrics[name]["asr"] == 1.0 and metrics[name]["natural_rate"] == 1.0
