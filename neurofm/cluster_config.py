"""How an embedding is clustered: :class:`ClusterConfig`, the kNN graph and Leiden settings of
``neurofm.evaluate.cluster`` (the ``evaluate.cluster`` section of a run configuration), as plain values."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_RESOLUTIONS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
OPTIMISE_RESOLUTIONS = tuple(round(0.1 * step, 1) for step in range(1, 21))  # scib: 0.1 … 2.0


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of the kNN graph and of Leiden.

    The resolution is ``resolution`` unless ``select_resolution`` is on; then every value of
    ``resolutions`` is tried and the partition with the highest modularity (at resolution 1) is kept
    — a label-free choice, so the reported ARI/NMI carry no label leakage. ``match_n_classes`` adds a
    second, clearly named score (``ari_matched``, ``nmi_matched``) at the resolution giving as many
    clusters as there are classes: it uses the *number* of classes only, never which cell is which,
    and shows agreement without the penalty ARI puts on splitting a class into sub-clusters.
    """

    n_neighbors: int = 15  # neighbours per cell in the kNN graph
    metric: str = "euclidean"  # "euclidean" or "cosine"
    resolution: float = 1.0  # Leiden resolution when not selecting one
    seed: int = 0  # seeds the graph (approximate neighbours) and Leiden
    select_resolution: bool = False  # sweep `resolutions`, keep the best modularity (label-free)
    resolutions: tuple[float, ...] = DEFAULT_RESOLUTIONS
    match_n_classes: bool = False  # also score the partition with as many clusters as classes
    seeds: tuple[int, ...] = (0, 1, 2)  # Leiden seeds of the resolution-1 distribution
    optimise_resolutions: tuple[float, ...] = OPTIMISE_RESOLUTIONS  # the cluster-optimised sweep
    silhouette_max_cells: int = 5000  # silhouette on a seeded sample of at most this many cells
