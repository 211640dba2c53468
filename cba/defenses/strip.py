"""STRIP (Gao et al., ACSAC 2019): a triggered input stays confident when superimposed.

Algorithm. Each input is blended with `n_overlays` random clean images
((1 - alpha) x + alpha overlay, alpha = 0.5) and the Shannon entropy of the
classifier's softmax is averaged over the overlays. A clean input's prediction
is scrambled by the overlays (high entropy); a trigger keeps pulling the blend
to the target class (low entropy). The decision threshold is the `frr` quantile
of the entropies of held-out clean inputs, so about `frr` of clean inputs are
rejected; inputs below it are flagged.

The clean test set is split once, from the record's seed: a `holdout` fraction
is the defender's clean pool (the overlays and the threshold calibration, each
held-out input overlaid with the others), the rest are the clean inputs that
are scored beside the triggered test images. `max_inputs` caps each scored group.

Adaptation to contrastive pretraining: the softmax comes from
`record.classifier`, the encoder with the linear probe fitted on clean labels
(the supervised attack's own head for the supervised baseline).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from cba.progress import tqdm

from cba.defenses.base import AttackRecord, Defense, check, detection_metrics
from cba.defenses.registry import DEFENSES
from cba.errors import is_int, is_number
from cba.evaluate import to_float


@torch.no_grad()
def strip_entropy(model: nn.Module, inputs: torch.Tensor, pool: torch.Tensor, overlay_index: torch.Tensor,
                  alpha: float = 0.5, chunk_images: int = 2048, progress: bool = False) -> torch.Tensor:
    """Mean softmax entropy of each input blended with pool[overlay_index[i, j]] for every j.

    inputs (N, 3, H, W) and pool (M, 3, H, W) are floats in [0, 1]; overlay_index is (N, n)."""
    model.eval()
    device = next(model.parameters()).device
    n_overlays = overlay_index.shape[1]
    per_chunk = max(1, chunk_images // n_overlays)  # inputs per forward pass
    out = []
    for start in tqdm(range(0, len(inputs), per_chunk), desc="strip", disable=not progress):
        x = inputs[start : start + per_chunk].to(device)
        overlays = pool[overlay_index[start : start + per_chunk]].to(device)  # (c, n, 3, H, W)
        blended = ((1 - alpha) * x[:, None] + alpha * overlays).flatten(0, 1)
        probs = torch.softmax(model(blended).float(), dim=1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
        out.append(entropy.view(len(x), n_overlays).mean(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def _histogram(clean: np.ndarray, triggered: np.ndarray, bins: int = 20) -> dict[str, list]:
    """Entropy histograms of both groups on shared bins, for the report's plot."""
    edges = np.histogram_bin_edges(np.concatenate([clean, triggered]), bins=bins)
    return {"edges": [float(e) for e in edges], "clean": [int(c) for c in np.histogram(clean, edges)[0]],
            "triggered": [int(c) for c in np.histogram(triggered, edges)[0]]}


@DEFENSES.register("strip")
class Strip(Defense):
    kind = "input_detection"

    def __init__(self, *, n_overlays: int = 20, alpha: float = 0.5, frr: float = 0.05, holdout: float = 0.5,
                 max_inputs: int = 500):
        for name, value in (("n_overlays", n_overlays), ("max_inputs", max_inputs)):
            check(is_int(value) and value >= 1, name, value, "a positive integer")
        for name, value in (("alpha", alpha), ("frr", frr), ("holdout", holdout)):
            check(is_number(value) and 0 < value < 1, name, value,
                  "a number strictly between 0 and 1")
        self.n_overlays, self.alpha, self.frr = n_overlays, float(alpha), float(frr)
        self.holdout, self.max_inputs = float(holdout), max_inputs

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        rng = np.random.default_rng([record.seed, 0x5781])
        order = rng.permutation(len(record.test))
        n_pool = int(round(self.holdout * len(order)))
        check(2 <= n_pool < len(order), "holdout", self.holdout,
              f"leave at least 2 held-out and 1 scored image of the {len(order)} test images")
        pool = to_float(record.test.images[order[:n_pool]])
        scored_clean = order[n_pool:][: self.max_inputs]
        scored_triggered = np.sort(rng.permutation(len(record.triggered))[: self.max_inputs])
        inputs = torch.cat([to_float(record.test.images[scored_clean]), to_float(record.triggered.images[scored_triggered])])
        is_triggered = np.r_[np.zeros(len(scored_clean), bool), np.ones(len(scored_triggered), bool)]

        # Calibration: each held-out image overlaid with the *other* held-out images.
        shift = rng.integers(1, n_pool, size=(n_pool, self.n_overlays))
        calib_index = torch.as_tensor((np.arange(n_pool)[:, None] + shift) % n_pool)
        calib = strip_entropy(record.classifier, pool, pool, calib_index, self.alpha, progress=progress).numpy()
        threshold = float(np.quantile(calib, self.frr))

        overlay_index = torch.as_tensor(rng.integers(0, n_pool, size=(len(inputs), self.n_overlays)))
        entropy = strip_entropy(record.classifier, inputs, pool, overlay_index, self.alpha, progress=progress).numpy()
        metrics = detection_metrics(-entropy, is_triggered, entropy < threshold)
        clean, triggered = entropy[~is_triggered], entropy[is_triggered]
        return {
            **metrics,
            "far": 1.0 - metrics["tpr"],  # triggered inputs accepted
            "frr": metrics["fpr"],  # clean inputs rejected
            "threshold": threshold,
            "target_frr": self.frr,
            "entropy_clean_mean": float(clean.mean()),
            "entropy_triggered_mean": float(triggered.mean()),
            "entropy_histogram": _histogram(clean, triggered),
            "holdout_images": n_pool,
            "n_overlays": self.n_overlays,
            "adaptation": "softmax from record.classifier (encoder + linear probe fitted on clean labels for SSL; the "
                          "model's own head for the supervised attack); overlays and threshold from held-out clean test images",
        }
