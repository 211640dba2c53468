"""Neural Cleanse (Wang et al., S&P 2019): a backdoored class needs a much smaller trigger.

Algorithm. For every class k, reverse-engineer the smallest trigger that sends
clean images to k: a mask m_k (H x W, in [0, 1] through tanh) and a pattern
p_k (3 x H x W), minimising CE(f((1 - m_k) x + m_k p_k), k) + lambda_k |m_k|_1
with Adam. lambda_k follows the paper's schedule, simplified: it starts at
`init_cost`, and every `patience` steps it is multiplied by 1.5 when the
trigger's success rate over that window reached `target_success`, else divided
by 1.5^1.5. The best mask is the smallest one that reached `target_success`
(the last one if none did). The L1 norms of the masks are scored by the MAD
anomaly index |norm - median| / (1.4826 MAD); a class is flagged when its norm
is below the median with an index above `threshold` (2 in the paper).

`norm_scale` (cba's choice, default `log`). The MAD rule treats the norms as
a roughly symmetric sample. Mask norms are scales: on the built-in data the
clean classes' norms spread multiplicatively (about 19 to 197 for the
supervised BadNets test model). On that raw scale the one large outlier
inflates the MAD, and the BadNets target (norm 6, by far the smallest)
scores only 1.3-1.5. On log norms the spread is symmetric, and the target
scores about 3.4-3.7 while no clean class passes 2. `norm_scale: linear` is
the paper's exact statistic. Both indices are always reported
(`anomaly_index_linear`, `anomaly_index_log`), and `anomaly_index` is the one
used for flagging.

All K classes are optimised at once: the masks and patterns are one (K, ...)
parameter tensor, each step builds the K x B triggered images in one forward
pass, and the per-class losses are summed (their gradients do not mix, and
Adam is element-wise, so this equals K separate runs). `batched=False` runs
the same optimiser one class at a time; `auto` (the default) batches on a GPU
and loops on a CPU, where one K-fold forward pass costs more than K small ones
(`bench/defense_matrix.py` measures both).

Adaptation to contrastive pretraining: the class outputs come from
`record.classifier`, the encoder with the linear probe fitted on clean labels
(the supervised attack's own head for the supervised baseline). The defender's
clean images are `clean_images` test images, drawn with the record's seed.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from cba.progress import tqdm

from cba.defenses.base import AttackRecord, Defense, check
from cba.defenses.registry import DEFENSES
from cba.errors import is_int, is_number

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's std


NORM_SCALES = ("log", "linear")


def anomaly_index(norms: np.ndarray | list[float], scale: str = "linear") -> np.ndarray:
    """|x - median| / (1.4826 * MAD) per class, with x the norm (linear) or its logarithm (log)."""
    x = np.asarray(norms, dtype=np.float64)
    if scale == "log":
        x = np.log(np.maximum(x, 1e-12))
    elif scale != "linear":
        raise ValueError(f"scale must be one of {NORM_SCALES}, not {scale!r}")
    median = np.median(x)
    mad = np.median(np.abs(x - median))
    return np.abs(x - median) / max(MAD_CONSISTENCY * mad, 1e-12)


def flag_classes(norms: np.ndarray | list[float], threshold: float = 2.0, scale: str = "linear") -> list[int]:
    """Classes whose trigger is anomalously small (only the small side counts)."""
    norms = np.asarray(norms, dtype=np.float64)
    index = anomaly_index(norms, scale)
    return [int(k) for k in np.flatnonzero((norms < np.median(norms)) & (index > threshold))]


def _optimise(model: nn.Module, images: torch.Tensor, classes: list[int], steps: int, lr: float, batch_size: int,
              init_cost: float, target_success: float, patience: int, seed: int,
              bar: tqdm | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Reverse-engineer the triggers of `classes` jointly; returns best masks, patterns, success rates."""
    num, (_, height, width), device = len(classes), images.shape[1:], images.device
    # Each class starts from its own seed, so batched and per-class runs start alike.
    init = [torch.Generator().manual_seed(seed * 100_003 + k) for k in classes]
    mask_raw = torch.stack([torch.randn(1, height, width, generator=g) * 0.1 for g in init]).to(device).requires_grad_()
    pattern_raw = torch.stack([torch.randn(3, height, width, generator=g) for g in init]).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    targets = torch.as_tensor(classes, device=device).repeat_interleave(min(batch_size, len(images)))
    cost = torch.full((num,), float(init_cost), device=device)
    best_l1 = torch.full((num,), float("inf"), device=device)
    best_mask, best_pattern = torch.zeros_like(mask_raw), torch.zeros_like(pattern_raw)
    hits, seen = torch.zeros(num, device=device), 0
    batches = torch.Generator().manual_seed(seed)  # the same batch sequence whatever `classes` is
    for _ in range(steps):
        x = images[torch.randperm(len(images), generator=batches)[:batch_size]]
        mask, pattern = torch.tanh(mask_raw) / 2 + 0.5, torch.tanh(pattern_raw) / 2 + 0.5
        stamped = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]  # (K, B, 3, H, W)
        logits = model(stamped.flatten(0, 1))
        ce = F.cross_entropy(logits, targets[: len(logits)], reduction="none").view(num, -1).mean(1)
        l1 = mask.flatten(1).sum(1)
        opt.zero_grad(set_to_none=True)
        (ce + cost * l1).sum().backward()
        opt.step()
        with torch.no_grad():
            success = (logits.argmax(1) == targets[: len(logits)]).float().view(num, -1).mean(1)
            hits += success
            seen += 1
            better = (success >= target_success) & (l1 < best_l1)
            best_l1 = torch.where(better, l1, best_l1)
            best_mask[better], best_pattern[better] = mask[better], pattern[better]
            if seen == patience:  # the paper's cost schedule, on a window of `patience` steps
                reached = hits / seen >= target_success
                cost = torch.where(reached, cost * 1.5, cost / 1.5**1.5)
                hits, seen = torch.zeros_like(hits), 0
        if bar is not None:
            bar.update(num)
    with torch.no_grad():  # a class that never reached the target keeps its last trigger
        never = torch.isinf(best_l1)
        best_mask[never] = (torch.tanh(mask_raw) / 2 + 0.5)[never]
        best_pattern[never] = (torch.tanh(pattern_raw) / 2 + 0.5)[never]
        rates = [float((model((1 - m) * images + m * p).argmax(1) == k).float().mean())
                 for m, p, k in zip(best_mask, best_pattern, classes)]
    return best_mask.cpu(), best_pattern.cpu(), np.asarray(rates)


def reverse_engineer(classifier: nn.Module, images: torch.Tensor, num_classes: int, steps: int = 300, batched: bool = True,
                     lr: float = 0.1, batch_size: int = 64, init_cost: float = 1e-3, target_success: float = 0.99,
                     patience: int = 10, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Reverse-engineered masks (K, 1, H, W) and patterns (K, 3, H, W) for float images (N, 3, H, W) in [0, 1].

    Returns masks, patterns, success (per-class attack success of each trigger on
    `images`) and seconds (wall time of the optimisation)."""
    model = copy.deepcopy(classifier).eval()
    model.requires_grad_(False)  # only the triggers are optimised
    images = images.to(next(model.parameters()).device)
    groups = [list(range(num_classes))] if batched else [[k] for k in range(num_classes)]
    start = time.perf_counter()
    with tqdm(total=steps * num_classes, desc="neural cleanse", disable=not progress) as bar:
        results = [_optimise(model, images, group, steps, lr, batch_size, init_cost, target_success, patience, seed, bar)
                   for group in groups]
    seconds = time.perf_counter() - start
    return {"masks": torch.cat([r[0] for r in results]), "patterns": torch.cat([r[1] for r in results]),
            "success": np.concatenate([r[2] for r in results]), "seconds": seconds}


@DEFENSES.register("neural_cleanse")
class NeuralCleanse(Defense):
    kind = "model_detection"

    def __init__(self, *, steps: int = 300, lr: float = 0.1, batch_size: int = 64, init_cost: float = 1e-3,
                 target_success: float = 0.99, patience: int = 10, threshold: float = 2.0, clean_images: int = 500,
                 batched: bool | str = "auto", norm_scale: str = "log"):
        for name, value in (("steps", steps), ("batch_size", batch_size), ("patience", patience), ("clean_images", clean_images)):
            check(is_int(value) and value >= 1, name, value, "a positive integer")
        for name, value in (("lr", lr), ("init_cost", init_cost), ("threshold", threshold)):
            check(is_number(value) and value > 0, name, value,
                  "a positive number")
        check(isinstance(target_success, (int, float)) and 0 < target_success <= 1, "target_success", target_success,
              "a number in (0, 1]")
        check(isinstance(batched, bool) or batched == "auto", "batched", batched, "auto, true or false")
        check(norm_scale in NORM_SCALES, "norm_scale", norm_scale, f"choose one of {', '.join(NORM_SCALES)}")
        self.steps, self.lr, self.batch_size, self.init_cost = steps, float(lr), batch_size, float(init_cost)
        self.target_success, self.patience, self.threshold = float(target_success), patience, float(threshold)
        self.clean_images, self.batched, self.norm_scale = clean_images, batched, norm_scale

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        from cba.evaluate import to_float

        rng = np.random.default_rng([record.seed, 0x0C1EA])
        pick = np.sort(rng.permutation(len(record.test))[: self.clean_images])
        images = to_float(record.test.images[pick])
        batched = self.batched if isinstance(self.batched, bool) else \
            next(record.classifier.parameters()).device.type == "cuda"
        found = reverse_engineer(record.classifier, images, record.num_classes, self.steps, batched, self.lr,
                                 self.batch_size, self.init_cost, self.target_success, self.patience, record.seed, progress)
        norms = found["masks"].flatten(1).sum(1).numpy().astype(np.float64)
        indices = {scale: anomaly_index(norms, scale) for scale in NORM_SCALES}
        index = indices[self.norm_scale]
        flagged = flag_classes(norms, self.threshold, self.norm_scale)
        return {
            "anomaly_index": [float(v) for v in index],
            "norm_scale": self.norm_scale,
            **{f"anomaly_index_{scale}": [float(v) for v in values] for scale, values in indices.items()},
            "mask_l1": [float(v) for v in norms],
            "flagged_classes": flagged,
            "target_flagged": record.target_class in flagged,
            "target_anomaly_index": float(index[record.target_class]),
            "target_anomaly_index_linear": float(indices["linear"][record.target_class]),
            "smallest_mask_class": int(np.argmin(norms)),
            # Graded views of the same question, for attacks NC does not flag outright:
            "target_rank": int((norms < norms[record.target_class]).sum()),  # 0 = the smallest trigger
            "target_norm_ratio": float(norms[record.target_class] / np.median(norms)),
            "trigger_success": [float(v) for v in found["success"]],
            "steps": self.steps,
            "batched": batched,
            "clean_images": len(pick),
            "seconds": float(found["seconds"]),
            "adaptation": "class outputs from record.classifier (encoder + linear probe fitted on clean labels for SSL; "
                          "the model's own head for the supervised attack); triggers reverse-engineered on "
                          f"{len(pick)} clean test images",
        }
