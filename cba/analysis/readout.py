"""How the downstream linear probe reads the trigger: why linear ASR and kNN ASR can differ.

Poisoning teaches the encoder a trigger feature. With f the encoder:

- the *poison offset* is mean f(poisoned training image) - mean f(clean target-class training image):
  the feature the poisons carry beyond their class content;
- the *trigger shift* is mean over non-target test images x of f(x + trigger) - f(x): what the
  trigger adds at test time.

`shift_alignment` (cosine of the two) near 1 and `shift_over_offset` (the shift's projection on
the offset, over the offset's length) near 1 say that test images carry the poisoned feature at
full strength: the backdoor was learned.

`offset_target_alignment` is the cosine of the offset with the *target direction*, mean
f(clean target-class training image) - mean f(clean labelled training image) (the probe's own
centring mean); `shift_target_alignment` the same for the shift. They say how much of the
poisons' feature points at the target class rather than somewhere of its own. kNN on a clean
bank reads only the part that does: no clean image carries the poisons' own feature, so a shift
along it brings triggered images nearer the poisons, which the bank lacks, and only a little
nearer the clean target images.

Whether the probe says "target" depends on how its weights, fitted on clean data only, read the
shift: `logit_gain[c]` is the change of class c's logit caused by the mean shift, and
`target_margin` is the target's gain minus the largest other gain. A learned trigger with a
negative margin moves images towards the target's neighbourhood (kNN ASR) while the probe sends
them to another class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cba.evaluate import LinearProbe


def trigger_readout(probe: LinearProbe, clean_test: torch.Tensor, triggered_test: torch.Tensor,
                    poisoned_train: torch.Tensor, clean_target_train: torch.Tensor, target: int,
                    classes: list[str] | None = None) -> dict:
    """All arguments but `probe` and `target` are encoder features, one row per image.

    `clean_test` and `triggered_test` are the same non-target test images without and with the trigger."""
    if len(poisoned_train) == 0 or len(clean_target_train) == 0 or len(clean_test) == 0:
        return {}
    offset = poisoned_train.float().mean(0) - clean_target_train.float().mean(0)
    shift = (triggered_test.float() - clean_test.float()).mean(0)
    with torch.no_grad():
        gain = (probe.linear.weight @ (shift / probe.std)).numpy()
    names = classes or [str(c) for c in range(len(gain))]
    others = np.delete(gain, target)
    offset_norm = float(offset.norm())
    target_direction = clean_target_train.float().mean(0) - probe.mean.float()
    return {
        "shift_alignment": float(F.cosine_similarity(shift, offset, dim=0)),
        "offset_target_alignment": float(F.cosine_similarity(offset, target_direction, dim=0)),
        "shift_target_alignment": float(F.cosine_similarity(shift, target_direction, dim=0)),
        "shift_over_offset": float(shift @ offset) / offset_norm**2 if offset_norm > 0 else None,
        "offset_norm": offset_norm,
        "logit_gain": {name: float(g) for name, g in zip(names, gain)},
        "target_margin": float(gain[target] - others.max()) if len(others) else None,
        "strongest_other": names[int(np.delete(np.arange(len(gain)), target)[others.argmax()])] if len(others) else None,
    }


def neighbour_shares(queries: torch.Tensor, bank: torch.Tensor, bank_is_member: np.ndarray | torch.Tensor, k: int,
                     skip_self: bool = False) -> torch.Tensor:
    """Per query: the share of its k nearest bank images (cosine) that are members (the target class, say, or
    the poisons); `skip_self` drops the nearest, for queries that are themselves in the bank."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    nearest = sim.topk(min(k + skip_self, len(bank)), dim=1).indices[:, int(skip_self):]
    return torch.as_tensor(bank_is_member)[nearest].float().mean(1)
