"""A PNG that shows what a trigger does: clean, triggered, and the amplified difference.

Faint triggers (blend, ctrl) are invisible side by side, so the third column
scales |triggered - clean| until the largest difference is full white.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cba.io import write_png
from cba.triggers.base import Trigger


def save_preview(trigger: Trigger, images: np.ndarray, path: str | os.PathLike, n: int = 4,
                 rng: np.random.Generator | None = None, title: str | None = None) -> None:
    """Write a grid of the first `n` images: one row per example, three columns (`title`: instead of the
    trigger's name and params)."""
    clean = images[: max(1, min(n, len(images)))]
    triggered = trigger.apply(clean, rng=rng)
    diff = np.abs(triggered.astype(np.int16) - clean.astype(np.int16))
    largest = int(diff.max())
    factor = 255 / largest if largest else 1.0
    amplified = np.clip(diff * factor, 0, 255).astype(np.uint8)

    titles = ("clean", "triggered", f"|diff| x{factor:.3g}")
    rows = len(clean)
    # A bare Figure on an Agg canvas: no pyplot, no global backend switch, no display needed.
    figure = Figure(figsize=(6, 2 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 3, squeeze=False)
    for row in range(rows):
        for col, picture in enumerate((clean[row], triggered[row], amplified[row])):
            ax = axes[row, col]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=10)
        axes[row, 0].set_ylabel(f"example {row}", fontsize=9)
    params = textwrap.fill(", ".join(f"{k}={v}" for k, v in trigger.params.items()), width=70)
    heading = f"trigger '{trigger.name}'" if title is None else title
    figure.suptitle(f"{heading}, max |diff| = {largest}" + ("" if title else f"\n{params}"), fontsize=9)
    write_png(path, figure)
