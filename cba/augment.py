"""Batched augmentations on the training device (kornia).

The default draws random parameters per sample, as SimCLR prescribes (and as
CTRL's official code does for crop, flip and grayscale; only its colour-jitter
on/off switch is drawn per batch). `per_batch=True` draws one set of parameters
for the whole batch, so every poisoned image in a batch carries the trigger
transformed the same way. The choice is recorded with every run;
bench/trigger_survival.py measures what each protocol leaves of a trigger.
"""

from __future__ import annotations

from torch import nn

from cba.errors import ConfigError

KINDS = ("ssl", "weak", "none")


def build_augment(kind: str, image_size: int = 32, per_batch: bool = False, min_scale: float = 0.2) -> nn.Module:
    import kornia.augmentation as K  # here, not at the top: most stages never augment, and kornia takes ~0.5 s to load

    same = bool(per_batch)
    if kind == "ssl":
        return nn.Sequential(
            K.RandomResizedCrop((image_size, image_size), scale=(min_scale, 1.0), same_on_batch=same),
            K.RandomHorizontalFlip(same_on_batch=same),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8, same_on_batch=same),
            K.RandomGrayscale(p=0.2, same_on_batch=same),
        )
    if kind == "weak":
        return nn.Sequential(
            K.RandomCrop((image_size, image_size), padding=4, same_on_batch=same),
            K.RandomHorizontalFlip(same_on_batch=same),
        )
    if kind == "none":
        return nn.Identity()
    raise ConfigError("kind", kind, f"choose one of {', '.join(KINDS)}")
