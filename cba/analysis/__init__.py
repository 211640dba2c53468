"""Analysis of attacks: learning dynamics (claim 1), feature entanglement (claim 2), 2-D embeddings.

Pure functions on arrays and DataFrames; only the plot functions write files.
"""

from cba.analysis.dynamics import (
    GROUPS,
    learning_epochs,
    loss_auroc,
    loss_groups,
    plot_loss_auroc,
    plot_loss_groups,
    summarize_dynamics,
)
from cba.analysis.embedding import choose_points, embed_2d, plot_embedding
from cba.analysis.entanglement import (
    centroid_distance_ratio,
    entanglement_metrics,
    poison_silhouette,
    separability_auroc,
)

__all__ = [
    "GROUPS",
    "centroid_distance_ratio",
    "choose_points",
    "embed_2d",
    "entanglement_metrics",
    "learning_epochs",
    "loss_auroc",
    "loss_groups",
    "plot_embedding",
    "plot_loss_auroc",
    "plot_loss_groups",
    "poison_silhouette",
    "separability_auroc",
    "summarize_dynamics",
]
