"""A universal additive pattern learned against the SSL augmentations (see `cba.triggers.optimize`).

Until `fit` runs, the pattern is zero: the trigger stage fits it on the
attacker's data and saves it, and every later stage loads the saved pattern.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cba.errors import ConfigError, is_int, is_number
from cba.triggers.base import Trigger, map_in_chunks, to_uint8
from cba.triggers.fit_options import OptimizeConfig, fit_defaults

if TYPE_CHECKING:
    from cba.triggers.perturbation import UniversalPattern
from cba.triggers.registry import TRIGGERS

BACKBONE_CHOICES = ("convnet", "resnet18")
HEAD_CHOICES = ("centroid", "probe")
CLEAN_HEAD_CHOICES = ("same", *HEAD_CHOICES)
MATCH_CHOICES = ("differential", "full")
CLIP_GRADIENT_CHOICES = ("zero", "straight_through")  # cba.triggers.perturbation.stamp


def _integer(low: int):
    return lambda v: int(v) if is_int(v) and v >= low else None, f"must be an integer >= {low}"


def _size_or_all(low: int):
    return (lambda v: "all" if v == "all" else int(v) if is_int(v) and v >= low else None,
            f"must be an integer >= {low}, or all")


def _number(low: float, high: float, allowed: str, *, open_low: bool = True):
    def check(v):
        inside = is_number(v) and (low < v if open_low else low <= v) and v <= high
        return float(v) if inside else None
    return check, allowed


def _choice(choices: tuple[str, ...]):
    return lambda v: v if v in choices else None, f"choose one of {', '.join(choices)}"


_FLAG = (lambda v: v if isinstance(v, bool) else None, "must be true or false")
_WEIGHT = _number(0.0, float("inf"), "must be a number >= 0", open_low=False)

# option -> (check returning the normalised value or None, what is allowed); one entry per option that
# any learned trigger takes.
OPTION_CHECKS = {
    "linf": _number(0.0, 255.0, "must be a number in (0, 255] (0-255 pixel scale)"),
    "surrogate_size": _size_or_all(16), "surrogate_epochs": _integer(0), "surrogate_width": _integer(1),
    "surrogate_backbone": _choice(BACKBONE_CHOICES), "rounds": _integer(1), "trigger_steps": _integer(1),
    "batch_size": _integer(2), "resolution": _integer(1), "clusters": _integer(2), "ensemble": _integer(1),
    "hidden": _integer(1), "test_steps": _integer(1),
    "step_size": _number(0.0, 1.0, "must be a number in (0, 1] (a fraction of linf)"),
    "test_step_size": _number(0.0, 1.0, "must be a number in (0, 1] (a fraction of linf)"),
    "lr": _number(0.0, 1.0, "must be a number in (0, 1]"),
    "min_scale": _number(0.0, 1.0, "must be a number in (0, 1]"),
    "poison_share": _number(0.0, 1.0, "must be a number in (0, 1] (a share of the attacker's target-class images)"),
    "w_target": _WEIGHT, "w_agree": _WEIGHT, "w_match": _WEIGHT, "w_clean": _WEIGHT, "w_neutral": _WEIGHT,
    "w_divert": _WEIGHT, "w_salient": _WEIGHT,
    "test_weight": _WEIGHT,
    "bilevel": _FLAG, "eot": _FLAG, "hard_negatives": _FLAG, "symmetric": _FLAG, "test_labels": _FLAG,
    "fit_labels": _FLAG,
    "head": _choice(HEAD_CHOICES), "clean_head": _choice(CLEAN_HEAD_CHOICES), "match": _choice(MATCH_CHOICES),
    "clip_gradient": _choice(CLIP_GRADIENT_CHOICES),
}


@TRIGGERS.register("optimized")
class OptimizedTrigger(Trigger):
    """x' = clip(x + pattern), |pattern| <= linf on the 0-255 scale."""

    learns_from_data = True
    form = "universal"  # what the fit optimises (cba.triggers.perturbation)
    # The attacker holds every unlabelled training image (BLTO's threat model), or a seeded subset of this size;
    # the rest is the fit's own table (cba.triggers.fit_options), so params.yaml, the trigger and the optimiser agree.
    defaults = {"surrogate_size": "all", **fit_defaults(form)}

    def _validate(self) -> None:
        # Each option is checked only where this trigger takes it (the generated trigger drops some).
        p = self.params
        for key in self.defaults:
            check, allowed = OPTION_CHECKS[key]
            value = check(p[key])
            if value is None:
                self._fail(key, allowed)
            p[key] = value
        if p["w_target"] == 0 and p["w_agree"] == 0 and p.get("w_match", 0.0) == 0:
            self._fail("w_target", "w_agree and w_match must not all be 0 (nothing to optimise)")
        if p["fit_labels"] and p["hard_negatives"]:
            self._fail("hard_negatives", "must be false with fit_labels: true (hard negatives are a pseudo-label "
                       "centroid; true labels have none)")

    def _build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        zeros = np.zeros((self.image_size, self.image_size, 3), dtype=np.float32)
        return {"pattern": zeros, **({"test_pattern": zeros.copy()} if self._separate_test_pattern() else {})}

    def _separate_test_pattern(self) -> bool:
        return self.params.get("test_weight", 0.0) > 0

    @classmethod
    def from_pattern(cls, pattern: np.ndarray, linf: float, seed: int = 0) -> "OptimizedTrigger":
        """A trigger of this kind that adds a given (H, W, 3) pattern, clipped to +-`linf`, with no fit.

        For patterns made elsewhere: by hand, by another attack, or a learned one rescaled."""
        pattern = np.asarray(pattern, dtype=np.float32)
        if pattern.ndim != 3 or pattern.shape[0] != pattern.shape[1] or pattern.shape[2] != 3:
            raise ConfigError("pattern", f"shape {pattern.shape}", "must be (H, W, 3) with H == W")
        trigger = cls(seed=seed, image_size=pattern.shape[0], linf=float(linf))
        trigger._arrays = {"pattern": np.clip(pattern, -float(linf), float(linf))}
        return trigger

    def fit(self, images: np.ndarray, target_mask: np.ndarray, *, device: torch.device | None = None,
            progress: bool = True, keep: dict | None = None, labels: np.ndarray | None = None) -> dict[str, Any]:
        """Learn the pattern from the attacker's images; return the optimisation's figures (`keep`: see
        `optimize_trigger`; `labels`: the images' classes, which `fit_labels` and `test_labels` need)."""
        from cba.triggers.activation import fit_test_pattern  # torch-heavy, needed only here
        from cba.triggers.optimize import optimize_trigger

        images = self._check_images(images)
        target_mask = np.asarray(target_mask, dtype=bool)
        if len(target_mask) != len(images) or not target_mask.any():
            raise ValueError("target_mask must mark at least one of the attacker's images as target class")
        options = {k: v for k, v in self.params.items() if k != "surrogate_size"}
        config = OptimizeConfig(**options, form=self.form)
        separate = self._separate_test_pattern()
        test_labels = separate and self.params["test_labels"]
        labels = self._heads_labels(labels, target_mask) if test_labels or self.params["fit_labels"] else None
        if separate and keep is None:
            keep = {}
        perturbation, history = optimize_trigger(images, target_mask, config, self.seed, device, progress, keep,
                                                 labels=labels if self.params["fit_labels"] else None)
        self._adopt(perturbation)
        figures: dict[str, Any] = {"history": history, "final_objective": history[-1]["objective"]}
        if separate:

            p = self.params
            self._arrays["test_pattern"], figures["test_pattern"] = fit_test_pattern(
                self._arrays["pattern"], keep, target_mask, p["clusters"], p["linf"], p["test_weight"],
                p["test_steps"], p["test_step_size"], self.seed, progress=progress,
                labels=labels if test_labels else None)
        return figures

    @staticmethod
    def _heads_labels(labels: np.ndarray | None, target_mask: np.ndarray) -> np.ndarray:
        """The attacker's images' classes as its heads take them (`target_first`), checked against `target_mask`."""
        from cba.triggers.activation import target_first

        if labels is None or len(labels) != len(target_mask):
            raise ValueError("fit_labels and test_labels need the attacker's images' labels, one per image")
        labels = np.asarray(labels)
        target = labels[target_mask]
        if (target != target[0]).any() or (labels[~target_mask] == target[0]).any():
            raise ValueError("the labels must give the target-class images, and only them, one class")
        return target_first(labels, target[0])

    def at_test_time(self) -> "OptimizedTrigger":
        """The poison pattern, or the test-time pattern fitted after it (`test_weight` > 0)."""
        if "test_pattern" not in self._arrays:
            return self
        return OptimizedTrigger.from_pattern(self._arrays["test_pattern"], self.params["linf"], self.seed)

    def _adopt(self, perturbation: "UniversalPattern") -> None:
        """Keep the fitted perturbation as this trigger's tensors."""
        self._arrays = {"pattern": perturbation.pattern()}

    def perturbation(self) -> np.ndarray:
        return self._arrays["pattern"].astype(np.float64)

    def _apply(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        delta = self.perturbation()
        return map_in_chunks(lambda chunk: to_uint8(chunk + delta), images)
