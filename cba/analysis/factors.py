"""What an encoder's features say about the factors the built-in images were drawn from.

`cba.data.synthetic.generate_with_factors` returns, beside each image, the draws that made it: the class,
the shape's rotation, size, place and colour, and the background's two colours and the direction of the
ramp between them. A contrastive method is meant to keep the class and drop what its augmentations
change; a method that learns nothing of the class may still have learned something, and which factor it
kept says which shortcut met its loss. The readable summaries (`factor_targets`):

- `position`: the shape's centre, over the image side (crops move it);
- `size`: the shape's radius in pixels (crops rescale it);
- `orientation`: (cos kθ, sin kθ) with k the shape's rotational symmetry (4 for a square), only for the
  shapes that have one (not circle, ring);
- `background colour`: the mean of the ramp's two colours (colour jitter changes it);
- `background ramp`: the ramp's luminance change across the image as a 2-vector, its direction and
  strength (the part of the background a crop and grayscale keep);
- `shape colour`: the shape's RGB;
- `shape contrast`: the shape's luminance minus the background's mean luminance.

`effective_rank` says how many directions the features use at all (Roy and Vetterli's entropy of the
normalised singular values): a method whose features collapsed onto a few directions has few left for
any factor.

`factor_readout` fits a ridge regression from features to each summary on one set of images (the penalty
chosen by cross-validation there) and scores it on another: R² 1 is a linear read of the factor, 0 no
better than its mean. With triggered copies of the scored images it also gives the trigger's systematic
effect on each read factor: the mean change of the prediction, in units of the factor's spread.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# Rotations after which each shape looks the same: orientation is read modulo 2π / k.
SYMMETRY_ORDER = {"square": 4, "triangle": 3, "plus": 4, "tee": 1, "stripes": 2, "checker": 2, "crescent": 1,
                  "dumbbell": 2}
LUMA = np.array([0.299, 0.587, 0.114])
READ_FACTORS = ("position", "size", "orientation", "background colour", "background ramp", "shape colour",
                "shape contrast")
ALPHAS = np.logspace(-2, 4, 7)


def factor_targets(factors: dict[str, np.ndarray], classes: list[str], image_size: int) -> dict[str, np.ndarray]:
    """Each readable summary of `factors` as an (N, d) array; NaN rows where it is undefined (orientation)."""
    theta, labels = factors["theta"], factors["label"]
    order = np.array([SYMMETRY_ORDER.get(name, np.nan) for name in classes])[labels]
    ramp = (factors["background_to"] - factors["background_from"]) @ LUMA
    background = (factors["background_from"] + factors["background_to"]) / 2
    angle = factors["gradient_angle"]
    return {
        "position": factors["centre"] / image_size,
        "size": factors["radius"][:, None],
        "orientation": np.stack([np.cos(order * theta), np.sin(order * theta)], axis=1),
        "background colour": background,
        "background ramp": ramp[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1),
        "shape colour": factors["foreground"],
        "shape contrast": (factors["foreground"] @ LUMA - background @ LUMA)[:, None],
    }


def factor_readout(fit_features: np.ndarray, fit_targets: dict[str, np.ndarray], features: np.ndarray,
                   targets: dict[str, np.ndarray], triggered: np.ndarray | None = None,
                   triggered_rows: np.ndarray | None = None,
                   groups: np.ndarray | None = None) -> dict[str, dict]:
    """Per factor: `r2` on (`features`, `targets`) of a ridge fitted on (`fit_features`, `fit_targets`), the
    penalty `alpha` it chose, and, given `triggered` (features of the images `features[triggered_rows]`, all
    of them by default, with the trigger), `shift`: the mean change of the prediction per target dimension
    over that dimension's standard deviation on those images; given also `groups` (a label per triggered
    image, e.g. its class), `shift_by_group`: the same mean within each group, in the same units; and
    `along`, each triggered image's own change along the mean shift's direction, in the same units (an
    array, NaN where the factor is undefined)."""
    out: dict[str, dict] = {}
    for name, fit_target in fit_targets.items():
        keep_fit, keep = ~np.isnan(fit_target).any(1), ~np.isnan(targets[name]).any(1)
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
        model.fit(fit_features[keep_fit], fit_target[keep_fit])
        predicted = model.predict(features).reshape(len(features), -1)  # once: for R² and as the shift's baseline
        row = {"r2": float(r2_score(targets[name][keep], predicted[keep])), "alpha": float(model[-1].alpha_)}
        if triggered is not None:
            rows = np.arange(len(features)) if triggered_rows is None else np.asarray(triggered_rows)
            defined = ~np.isnan(targets[name][rows]).any(1)
            change = model.predict(triggered[defined]).reshape(int(defined.sum()), -1) - predicted[rows][defined]
            spread = targets[name][rows][defined].std(0)
            shift = change.mean(0) / spread
            row["shift"] = shift.tolist()
            direction = shift / (np.linalg.norm(shift) or 1.0)
            row["along"] = np.full(len(rows), np.nan)
            row["along"][defined] = (change / spread) @ direction
            if groups is not None:
                kept = np.asarray(groups)[defined]
                row["shift_by_group"] = {int(g): (change[kept == g].mean(0) / spread).tolist()
                                         for g in np.unique(kept)}
        out[name] = row
    return out


def effective_rank(features: np.ndarray) -> float:
    """exp of the entropy of the centred features' singular values, normalised to sum to 1: d for d equally
    used directions, 1 for features on one line."""
    singular = np.linalg.svd(features - features.mean(0), compute_uv=False)
    p = singular / singular.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


class CleanSpread:
    """The clean features' own units: their principal directions that hold `kept_variance` of the variance,
    and each one's standard deviation. Directions past `kept_variance` are left out, so that near-empty ones
    (pixels outside every image's variation) do not dominate a length."""

    def __init__(self, fit_features: np.ndarray, kept_variance: float = 0.99):
        centred = fit_features - fit_features.mean(0)
        _, singular, directions = np.linalg.svd(centred, full_matrices=False)
        variance = singular**2 / (len(fit_features) - 1)
        kept = int(np.searchsorted(np.cumsum(variance) / variance.sum(), kept_variance)) + 1
        self.directions, self.std = directions[:kept], np.sqrt(variance[:kept])

    def length(self, move: np.ndarray) -> float:
        """The feature-space vector `move` in these units: a move that natural images make often is short;
        one along directions they hardly vary in is long."""
        return float(np.linalg.norm((self.directions @ move) / self.std))
