"""2-D embeddings of encoder features, for the entanglement plots.

``embed_2d`` projects features with t-SNE (sklearn, PCA init, fixed seed) or
PCA (fast, linear). Features are L2-normalised first by default, since
contrastive encoders are trained on cosine similarity. Large sets are
subsampled deterministically, always keeping the poisoned samples (up to the
cap) so the few of them that matter are never lost.

``plot_embedding`` draws the points coloured by class, with the poisoned ones
on top as black-edged stars: inside the target cluster = entangled.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from cba.errors import ConfigError
from cba.io import write_png

# sklearn and matplotlib are imported in the functions that use them: `METHODS` is read by the params check,
# which should not pay their start-up time.

METHODS = ("tsne", "pca")


def choose_points(n: int, poisoned: np.ndarray | None, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_points` rows: all poisoned first (capped), the rest random clean."""
    rng = np.random.default_rng(seed)
    poisoned = np.zeros(n, dtype=bool) if poisoned is None else np.asarray(poisoned, dtype=bool)
    if len(poisoned) != n:
        raise ConfigError("poisoned", f"length {len(poisoned)}", f"must match the {n} feature rows")
    if n <= max_points:
        return np.arange(n)
    pos, neg = np.flatnonzero(poisoned), np.flatnonzero(~poisoned)
    if len(pos) > max_points:
        pos = rng.choice(pos, size=max_points, replace=False)
    neg = rng.choice(neg, size=min(len(neg), max_points - len(pos)), replace=False)
    return np.sort(np.concatenate([pos, neg]))


def embed_2d(features: np.ndarray, method: str = "tsne", seed: int = 0, max_points: int = 3000,
             poisoned: np.ndarray | None = None, normalize: bool = True,
             perplexity: float = 30.0, max_iter: int = 1000,
             threads: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return (coords (M, 2), indices (M,)) of the embedded subset of `features` rows.

    `indices` are sorted row numbers into `features`; index `labels` and
    `poisoned` with them for `plot_embedding`. `perplexity` is clipped to what
    the subset size allows; `max_iter` (>= 250) is for t-SNE only. `threads`
    caps the OpenMP/BLAS threads (None = library default). It is 1 by default
    because on a busy 2-core machine spinning OpenMP threads made a 100-point
    t-SNE take 11 s instead of 0.1 s.
    """
    if method not in METHODS:
        raise ConfigError("method", method, f"one of {list(METHODS)}")
    if max_points < 1:
        raise ConfigError("max_points", max_points, "a positive integer")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ConfigError("features", f"shape {features.shape}", "must be a 2-D array (N, D)")
    indices = choose_points(len(features), poisoned, max_points, seed)
    x = features[indices]
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    m = len(x)
    if m < 3 or x.shape[1] < 2:  # too few points or dims for either method: pad a trivial layout
        coords, k = np.zeros((m, 2)), min(2, x.shape[1])
        if m:
            coords[:, :k] = (x - x.mean(axis=0))[:, :k]
        return coords, indices
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    with threadpool_limits(limits=threads):
        if method == "pca":
            coords = PCA(n_components=2, svd_solver="full").fit_transform(x)
        else:
            coords = TSNE(n_components=2, init="pca", random_state=seed, learning_rate="auto",
                          perplexity=min(perplexity, (m - 1) / 3),
                          max_iter=max(250, int(max_iter))).fit_transform(x)
    return np.asarray(coords, dtype=np.float64), indices


def plot_embedding(coords: np.ndarray, labels: np.ndarray, poisoned: np.ndarray,
                   class_names: Sequence[str] | None, path: str | os.PathLike, title: str = "") -> None:
    """Scatter `coords` coloured by class; poisoned samples on top as black-edged stars.

    `labels` and `poisoned` are for the embedded points (index them with the
    indices returned by `embed_2d`). Poisoned stars take their label's colour.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels)
    poisoned = np.asarray(poisoned, dtype=bool)
    if not len(coords) == len(labels) == len(poisoned):
        raise ConfigError("coords/labels/poisoned", f"lengths {len(coords)}/{len(labels)}/{len(poisoned)}",
                          "must all be the same length")
    classes = np.unique(labels)
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}

    def name(c: object) -> str:
        if class_names is not None and isinstance(c, (int, np.integer)) and 0 <= c < len(class_names):
            return str(class_names[c])
        return str(c)

    figure = Figure(figsize=(7, 6), layout="constrained")
    FigureCanvasAgg(figure)  # bare Agg canvas: no pyplot state, no display
    ax = figure.subplots()
    handles = []
    for c in classes:
        mask = (labels == c) & ~poisoned
        ax.scatter(coords[mask, 0], coords[mask, 1], s=6, color=colour[c], alpha=0.6, linewidths=0)
        handles.append(Line2D([], [], linestyle="", marker="o", color=colour[c], label=name(c)))
    if poisoned.any():
        point_colours = [colour[c] for c in labels[poisoned]]
        ax.scatter(coords[poisoned, 0], coords[poisoned, 1], s=70, marker="*", c=point_colours,
                   edgecolors="black", linewidths=0.7, zorder=3)
        handles.append(Line2D([], [], linestyle="", marker="*", markersize=11, color="white",
                              markeredgecolor="black", label=f"poisoned (n={int(poisoned.sum())})"))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    write_png(path, figure)
