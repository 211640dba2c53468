"""DBD's last stage: semi-supervised fine-tuning of the whole model.

The DBD paper uses MixMatch. This is a FixMatch-style step instead (Sohn et
al. 2020), which needs no mixing or sharpening and fewer knobs:

- labelled (high-credible) samples: cross-entropy on a weakly augmented view
  (crop with padding + flip), with the labels as the victim saw them;
- unlabelled samples (labels dropped): the model's prediction on a weak view
  becomes a pseudo-label when its confidence reaches `confidence`, and the
  model is trained to predict it on a strong view (the SSL augmentation:
  resized crop, colour jitter, grayscale).

Labelled, weak and strong views go through one forward pass in training
mode, so batch-norm statistics see all of them, as in FixMatch; pseudo-labels
come from the weak views' logits, detached. SGD with Nesterov momentum, a
one-epoch warmup (the SCE head's logits start large) and a cosine decay.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cba.augment import build_augment
from cba.fit import fit


def semi_supervised_finetune(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, labelled: np.ndarray, *, epochs: int, lr: float,
    batch_size: int, confidence: float, unlabelled_weight: float = 1.0, weight_decay: float = 5e-4, seed: int = 0,
    device: torch.device | None = None, progress: bool = False,
) -> dict[str, float]:
    """Fine-tune `model` ([0, 1] images (N, 3, H, W) -> logits) in place on uint8 `images` (N, H, W, 3).

    An epoch is one pass over the labelled samples; each labelled batch is
    paired with an equally large random batch of unlabelled ones. Returns the
    fraction of unlabelled samples whose pseudo-label passed the threshold in
    the last epoch."""
    device = device or torch.device("cpu")
    labelled = np.asarray(labelled, dtype=bool)
    data = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 stays compact
    targets = torch.as_tensor(labels).long().to(device)
    lab_idx, unl_idx = torch.as_tensor(np.flatnonzero(labelled)), torch.as_tensor(np.flatnonzero(~labelled))
    if len(lab_idx) == 0:
        return {"pseudo_label_rate": float("nan")}
    size = images.shape[1]
    weak, strong = build_augment("weak", size).to(device), build_augment("ssl", size).to(device)
    model.to(device).to(memory_format=torch.channels_last)
    bs = min(batch_size, len(lab_idx))
    steps = math.ceil(len(lab_idx) / bs)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # kornia draws its augmentation parameters from the global generator
    counts = {"passed": 0, "seen": 0}  # pseudo-labels that passed the threshold, in the last epoch

    def loss(batch: torch.Tensor) -> torch.Tensor:
        x_l = weak(data[batch.to(device)].float().div_(255))
        y_l = targets[batch.to(device)]
        if len(unl_idx) == 0:
            return F.cross_entropy(model(x_l.contiguous(memory_format=torch.channels_last)).float(), y_l)
        x_u = data[unl_idx[torch.randint(len(unl_idx), (len(batch),), generator=gen)].to(device)].float().div_(255)
        views = torch.cat([x_l, weak(x_u), strong(x_u)]).contiguous(memory_format=torch.channels_last)
        logits_l, logits_weak, logits_strong = model(views).float().split([len(batch), len(x_u), len(x_u)])
        conf, pseudo = F.softmax(logits_weak.detach(), 1).max(1)
        mask = (conf >= confidence).float()
        counts["passed"] += int(mask.sum())
        counts["seen"] += len(x_u)
        loss_u = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
        return F.cross_entropy(logits_l, y_l) + unlabelled_weight * loss_u

    model.train()
    fit(model.parameters(), lambda _: lab_idx[torch.randperm(len(lab_idx), generator=gen)].split(bs), loss,
        epochs=epochs, lr=lr, weight_decay=weight_decay, nesterov=True, warmup_steps=min(steps, epochs * steps // 4),
        on_epoch=lambda _: counts.update(passed=0, seen=0), desc="dbd semi", progress=progress)
    passed, seen = counts["passed"], counts["seen"]
    model.eval()
    return {"pseudo_label_rate": passed / seen if seen else float("nan")}
