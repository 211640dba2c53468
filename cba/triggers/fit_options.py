"""The learned triggers' fit options and their defaults: the one table the optimiser and the triggers share.

`OptimizeConfig` is what `cba.triggers.optimize.optimize_trigger` reads. Each field is a trigger option
(`trigger.params` in params.yaml) unless its metadata says otherwise: `internal` fields are fixed by the
code, and `form` fields belong to one form of perturbation only (`universal`: one pattern for every image;
`generator`: delta(x) from a small conv net). This module imports no torch, so a trigger's defaults are
known without loading the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _internal(default: Any) -> Any:
    return field(default=default, metadata={"internal": True})


def _only(form: str, default: Any) -> Any:
    return field(default=default, metadata={"form": form})


@dataclass
class OptimizeConfig:
    linf: float = 16.0  # L-inf budget on the 0-255 scale
    surrogate_epochs: int = 20  # SimCLR warm-up of the attacker's surrogate on its clean data (the victim's schedule)
    surrogate_backbone: str = "convnet"
    surrogate_width: int = 16
    rounds: int = 8  # bi-level rounds; each = one poisoned surrogate epoch, then `trigger_steps`
    trigger_steps: int = 25
    batch_size: int = 128
    step_size: float = _only("universal", 0.1)  # signed-gradient step, as a fraction of the budget
    w_target: float = 1.0  # pull of triggered images to the target cluster
    w_agree: float = 1.0  # agreement of two views of a triggered image
    bilevel: bool = True  # False: the surrogate stays as the warm-up left it
    # Share of the attacker's target-class images that carry the pattern in the poisoned surrogate epochs. The
    # victim's share is its poison count over its target-class images; below 1 the surrogate, like the victim,
    # also sees clean target images to tell the poisons from.
    poison_share: float = 1.0
    eot: bool = True  # expectation over the augmentation pipeline
    min_scale: float = 0.5  # the attacker's assumption of the victim's RandomResizedCrop scale
    clusters: int = 10  # centroids the target competes with: the target's own plus k-means of the other images
    resolution: int = _only("universal", 32)  # the pattern is a resolution x resolution grid, upsampled to the image
    symmetric: bool = _only("universal", False)  # the pattern is its own left-right mirror image (a flip keeps it)
    head: str = "centroid"  # centroid: nearest centroid by cosine | probe: a linear probe fitted on the pseudo-labels
    clean_head: str = "same"  # the frozen clean copy's head (w_clean, w_neutral): same (as `head`) | centroid | probe
    ensemble: int = 1  # independently initialised surrogates; the trigger steps take turns on them
    w_match: float = _only("universal", 0.0)  # gradient matching: training on the poisons should teach the backdoor
    w_clean: float = 0.0  # a surrogate that never saw a poison should not send triggered images to the target
    w_neutral: float = 20.0  # ... nor read them differently from the clean images at all
    w_divert: float = 0.0  # the clean copy's probe should not move triggered images between non-target classes
    w_salient: float = 0.0  # the clean copy's features of a triggered image should move away from the clean one's
    hard_negatives: bool = False  # the non-target images nearest the target get a centroid of their own
    # The attacker also holds its images' true labels: the pattern's fit reads its surrogates and their clean copy
    # through heads on them (class centroids, or probes) instead of pseudo-labels.
    fit_labels: bool = False
    # differential: match what the pattern adds to the poisons' gradient | full: all of it
    match: str = _only("universal", "differential")
    clip_gradient: str = "zero"  # the clip's gradient in the objective: zero (exact) | straight_through
    # A test-time pattern fitted after the poison pattern (cba.triggers.activation): the weight of the clean copy's
    # reading against the poisoned surrogate's; 0: the test inputs carry the poison pattern.
    test_weight: float = _only("universal", 0.0)
    test_steps: int = _only("universal", 200)  # its signed steps
    test_step_size: float = _only("universal", 0.02)  # each step, as a fraction of the budget
    # The attacker also holds its images' true labels: the test-time fit reads its models through probes on them.
    test_labels: bool = _only("universal", False)
    hidden: int = _only("generator", 16)  # the generator's channels
    lr: float = _only("generator", 0.002)  # the generator's Adam rate
    surrogate_lr: float = _internal(0.6)
    temperature: float = _internal(0.2)
    per_batch: bool = _internal(False)
    form: str = _internal("universal")


def fit_defaults(form: str) -> dict[str, Any]:
    """The trigger options of a learned trigger of `form` and their defaults, in the table's order."""
    return {f.name: f.default for f in fields(OptimizeConfig)
            if not f.metadata.get("internal") and f.metadata.get("form", form) == form}
