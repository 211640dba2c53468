"""Analysis of attacks: learning dynamics (claim 1), feature entanglement (claim 2), 2-D embeddings,
and what features say of the built-in images' generative factors.

Pure functions on arrays and DataFrames; only the plot functions write files.

The names load on first use (PEP 562): the submodules pull in sklearn and
matplotlib, about 2 s at start-up, and `cba.analysis.readout`, which the
finetune stage imports, needs neither.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    **dict.fromkeys(("GROUPS", "learning_epochs", "loss_auroc", "loss_groups", "plot_loss_auroc", "plot_loss_groups",
                     "summarize_dynamics"), "dynamics"),
    **dict.fromkeys(("choose_points", "embed_2d", "plot_embedding"), "embedding"),
    **dict.fromkeys(("centroid_distance_ratio", "entanglement_metrics", "poison_silhouette", "separability_auroc"),
                    "entanglement"),
    **dict.fromkeys(("READ_FACTORS", "effective_rank", "factor_readout", "factor_targets"), "factors"),
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
