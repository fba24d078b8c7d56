"""Unsupervised structure of an embedding: kNN graph, Leiden clusters, agreement with the labels.

The kNN graph is scanpy's (``scanpy.pp.neighbors`` on the embedding: exact neighbours below 4,096
cells, UMAP connectivity weights); Leiden runs through ``leidenalg`` (RB-configuration / modularity
objective, seeded, two iterations as in scanpy), so a given embedding, configuration and seed always
give the same clusters. Labels are used only to *score* the clusters, never to choose them — see
:class:`ClusterConfig` for how the resolution is chosen.

Because one Leiden run is one draw, the scores are reported as a distribution (the scib protocol,
written here on the same graph because scib-metrics would pull in jax):

- ``ari_res1_mean`` ± ``ari_res1_sd`` (and NMI): Leiden at ``resolution`` over ``seeds``;
- ``ari_optimised`` / ``nmi_optimised``: the best ARI and the best NMI (each optimised on its own) over
  the resolution sweep ``optimise_resolutions`` (0.1 … 2.0, step 0.1) — scib's "cluster-optimised"
  metric, the headline, which does not depend on how many clusters one resolution happens to cut;
- ``silhouette``: the silhouette width of the labels in the embedding (Euclidean, −1 … 1; scib reports
  (s + 1) / 2), on a seeded sample of at most ``silhouette_max_cells`` cells.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import anndata as ad
import igraph as ig
import leidenalg
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import (
    adjusted_rand_score,
    completeness_score,
    homogeneity_score,
    normalized_mutual_info_score,
    silhouette_score,
)

from neurofm import keys
from neurofm.cluster_config import (  # noqa: F401  (re-exported: the evaluation's settings)
    DEFAULT_RESOLUTIONS,
    OPTIMISE_RESOLUTIONS,
    ClusterConfig,
)
from neurofm.errors import NeurofmError
from neurofm.evaluate.labels import check_labels

logger = logging.getLogger(__name__)

EMBEDDING_KEY = keys.EVALUATED_EMBEDDING  # obsm key of the embedding inside the graph AnnData
METRICS = ("euclidean", "cosine")
LEIDEN_ITERATIONS = 2  # scanpy's default; -1 (until stable) costs up to 4x on diffuse graphs


@dataclass
class ClusterResult:
    """Leiden clusters of one embedding and their agreement with the labels.

    ``clusters`` holds an integer cluster id per cell (0 = largest). ``cluster_table`` has one row per
    cluster: size, purity (share of its majority label), majority label, and the count of each label.
    ``majority_confusion`` compares true labels (rows) with each cell's cluster's majority label
    (columns). ``graph`` is the AnnData holding the kNN graph (``obsp['connectivities']``), reusable
    for UMAP. ``sweep`` lists every resolution tried (empty when none was swept).
    """

    clusters: np.ndarray
    labels: np.ndarray
    resolution: float
    modularity: float
    ari: float
    nmi: float
    homogeneity: float
    completeness: float
    majority_accuracy: float
    cluster_table: pd.DataFrame
    majority_confusion: pd.DataFrame
    graph: ad.AnnData
    config: ClusterConfig
    sweep: pd.DataFrame = field(default_factory=pd.DataFrame)
    matched: dict[str, float] = field(default_factory=dict)
    seed_scores: pd.DataFrame = field(default_factory=pd.DataFrame)  # seed, ari, nmi, n_clusters at res
    optimised: pd.DataFrame = field(default_factory=pd.DataFrame)  # resolution, ari, nmi, n_clusters
    silhouette: float = float("nan")

    @property
    def n_clusters(self) -> int:
        return int(len(np.unique(self.clusters)))

    def metrics(self) -> dict[str, float]:
        """Flat metrics named as in ``summary.json`` (without the method prefix)."""
        out = {
            "ari": self.ari,
            "nmi": self.nmi,
            "homogeneity": self.homogeneity,
            "completeness": self.completeness,
            "n_clusters": float(self.n_clusters),
            "cluster_majority_accuracy": self.majority_accuracy,
            "leiden_resolution": self.resolution,
            "modularity": self.modularity,
        }
        if len(self.seed_scores):
            for name in ("ari", "nmi", "n_clusters"):
                values = self.seed_scores[name].to_numpy(dtype=float)
                out[f"{name}_res1_mean"] = float(values.mean())
                out[f"{name}_res1_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        if len(self.optimised):
            out["ari_optimised"] = float(self.optimised["ari"].max())
            out["nmi_optimised"] = float(self.optimised["nmi"].max())
            out["ari_optimised_resolution"] = float(
                self.optimised.loc[self.optimised["ari"].idxmax(), "resolution"]
            )
        out["silhouette"] = self.silhouette
        if self.matched:
            out["ari_matched"] = self.matched["ari"]
            out["nmi_matched"] = self.matched["nmi"]
            out["n_clusters_matched"] = float(self.matched["n_clusters"])
        return out


def neighbor_graph(
    embedding: np.ndarray, n_neighbors: int = 15, metric: str = "euclidean", seed: int = 0
) -> ad.AnnData:
    """An AnnData holding ``embedding`` in ``obsm['X_embedding']`` and its kNN graph.

    Written by ``scanpy.pp.neighbors``: ``obsp['distances']``, ``obsp['connectivities']`` and
    ``uns['neighbors']``. ``n_neighbors`` is clamped to ``n_cells - 1``.
    """
    if metric not in METRICS:
        raise NeurofmError(f"cluster metric {metric!r} is not supported; use one of {', '.join(METRICS)}")
    embedding = np.asarray(embedding, dtype=np.float32)
    n_cells = embedding.shape[0]
    if n_cells < 3:
        raise NeurofmError(f"clustering needs at least 3 cells, got {n_cells}; pass more cells")
    if n_neighbors < 2:
        raise NeurofmError(f"n_neighbors must be at least 2, got {n_neighbors}; set e.g. 15")
    graph = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n_cells)]))
    graph.obsm[EMBEDDING_KEY] = embedding
    sc.pp.neighbors(
        graph,
        n_neighbors=min(n_neighbors, n_cells - 1),
        use_rep=EMBEDDING_KEY,
        metric=metric,
        random_state=seed,
    )
    return graph


def _igraph(graph: ad.AnnData) -> ig.Graph:
    connectivities = graph.obsp["connectivities"].tocoo()
    upper = connectivities.row < connectivities.col  # the matrix is symmetric: one edge per pair
    edges = np.column_stack([connectivities.row[upper], connectivities.col[upper]])
    return ig.Graph(
        n=graph.n_obs,
        edges=edges.tolist(),
        edge_attrs={"weight": connectivities.data[upper].astype(float).tolist()},
    )


def leiden(network: ig.Graph, resolution: float, seed: int) -> tuple[np.ndarray, float]:
    """Leiden partition (ids renumbered by size, 0 = largest) and its modularity at resolution 1."""
    partition = leidenalg.find_partition(
        network,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=resolution,
        seed=seed,
        n_iterations=LEIDEN_ITERATIONS,
    )
    membership = np.asarray(partition.membership)
    ids, counts = np.unique(membership, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    renumber = np.empty(ids.max() + 1, dtype=int)
    renumber[order] = np.arange(len(order))
    clusters = renumber[membership]
    return clusters, float(network.modularity(clusters.tolist(), weights="weight"))


def _match_n_classes(network: ig.Graph, n_classes: int, seed: int) -> tuple[np.ndarray, float]:
    """Bisect the resolution for a partition with ``n_classes`` clusters (else the closest found)."""
    low, high = 1e-3, 5.0
    best: tuple[int, np.ndarray, float] | None = None
    for _ in range(24):
        middle = float(np.sqrt(low * high))  # bisect on a log scale
        clusters, _ = leiden(network, middle, seed)
        n_found = int(clusters.max() + 1)
        if best is None or abs(n_found - n_classes) < abs(best[0] - n_classes):
            best = (n_found, clusters, middle)
        if n_found == n_classes:
            break
        if n_found < n_classes:
            low = middle
        else:
            high = middle
    assert best is not None
    return best[1], best[2]


def cluster_embedding(
    embedding: np.ndarray,
    labels: np.ndarray,
    n_neighbors: int = 15,
    metric: str = "euclidean",
    resolution: float = 1.0,
    seed: int = 0,
    select_resolution: bool = False,
    resolutions: tuple[float, ...] = DEFAULT_RESOLUTIONS,
    match_n_classes: bool = False,
    seeds: tuple[int, ...] = (0, 1, 2),
    optimise_resolutions: tuple[float, ...] = OPTIMISE_RESOLUTIONS,
    silhouette_max_cells: int = 5000,
) -> ClusterResult:
    """Cluster ``embedding`` with Leiden on its kNN graph and score the clusters against ``labels``.

    Returns a :class:`ClusterResult` with ARI, NMI, homogeneity and completeness, the majority-vote
    cluster → label mapping with its confusion matrix, cluster sizes and purities. The arguments are
    the fields of :class:`ClusterConfig` (``cluster_embedding(e, y, **asdict(config))``). Labels never
    influence the clusters. Deterministic for a given ``seed``. Nothing is written to disk.
    """
    config = ClusterConfig(
        n_neighbors=n_neighbors,
        metric=metric,
        resolution=resolution,
        seed=seed,
        select_resolution=select_resolution,
        resolutions=tuple(resolutions),
        match_n_classes=match_n_classes,
        seeds=tuple(seeds),
        optimise_resolutions=tuple(optimise_resolutions),
        silhouette_max_cells=silhouette_max_cells,
    )
    embedding = np.asarray(embedding)
    labels = check_labels(labels, n_cells=embedding.shape[0])
    graph = neighbor_graph(embedding, n_neighbors, metric, seed)
    network = _igraph(graph)
    chosen, clusters, modularity, sweep = _partition(network, config)
    matched = _matched_scores(network, labels, seed) if match_n_classes else {}
    seed_scores = _seed_scores(network, labels, chosen, clusters, config)
    optimised = _optimised_scores(network, labels, config)
    silhouette = _label_silhouette(embedding, labels, silhouette_max_cells, seed)
    cluster_table, majority_confusion, majority_accuracy = majority_vote(clusters, labels)
    return ClusterResult(
        clusters=clusters,
        labels=labels,
        resolution=chosen,
        modularity=modularity,
        ari=float(adjusted_rand_score(labels, clusters)),
        nmi=float(normalized_mutual_info_score(labels, clusters)),
        homogeneity=min(1.0, float(homogeneity_score(labels, clusters))),
        completeness=min(1.0, float(completeness_score(labels, clusters))),
        majority_accuracy=majority_accuracy,
        cluster_table=cluster_table,
        majority_confusion=majority_confusion,
        graph=graph,
        config=config,
        sweep=sweep,
        matched=matched,
        seed_scores=seed_scores,
        optimised=optimised,
        silhouette=silhouette,
    )


def _partition(network: ig.Graph, config: ClusterConfig) -> tuple[float, np.ndarray, float, pd.DataFrame]:
    """The headline partition: ``(resolution, clusters, modularity, sweep)``.

    At ``config.resolution``, or with ``select_resolution`` the resolution of ``config.resolutions``
    whose partition has the highest modularity; ``sweep`` lists every resolution tried (resolution,
    n_clusters, modularity), empty when none was swept.
    """
    if not config.select_resolution:
        chosen = float(config.resolution)
        clusters, modularity = leiden(network, chosen, config.seed)
        return chosen, clusters, modularity, pd.DataFrame()
    if not config.resolutions:
        raise NeurofmError("select_resolution is on but no resolutions are given; list some, e.g. [0.5, 1.0]")
    rows, partitions = [], {}
    for value in config.resolutions:
        clusters, modularity = leiden(network, float(value), config.seed)
        partitions[float(value)] = (clusters, modularity)
        rows.append(
            {"resolution": float(value), "n_clusters": int(clusters.max() + 1), "modularity": modularity}
        )
    sweep = pd.DataFrame(rows)
    chosen = float(sweep.loc[sweep["modularity"].idxmax(), "resolution"])
    clusters, modularity = partitions[chosen]
    return chosen, clusters, modularity, sweep


def _agreement(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """ARI and NMI of ``clusters`` against ``labels``, and the number of clusters."""
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "n_clusters": int(clusters.max() + 1),
    }


def _matched_scores(network: ig.Graph, labels: np.ndarray, seed: int) -> dict[str, float]:
    """Resolution, n_clusters, ARI and NMI of the partition with as many clusters as classes."""
    n_classes = len(np.unique(labels))
    matched_clusters, matched_resolution = _match_n_classes(network, n_classes, seed)
    return {
        "resolution": matched_resolution,
        "n_clusters": int(matched_clusters.max() + 1),
        "ari": float(adjusted_rand_score(labels, matched_clusters)),
        "nmi": float(normalized_mutual_info_score(labels, matched_clusters)),
    }


def _seed_scores(
    network: ig.Graph, labels: np.ndarray, resolution: float, clusters: np.ndarray, config: ClusterConfig
) -> pd.DataFrame:
    """One row per Leiden seed of ``config.seeds`` at ``resolution``: seed, ari, nmi, n_clusters
    (``clusters`` is reused for ``config.seed``)."""
    rows = []
    for value in config.seeds:
        seed_clusters = clusters if int(value) == config.seed else leiden(network, resolution, int(value))[0]
        rows.append({"seed": int(value), **_agreement(labels, seed_clusters)})
    return pd.DataFrame(rows)


def _optimised_scores(network: ig.Graph, labels: np.ndarray, config: ClusterConfig) -> pd.DataFrame:
    """One row per resolution of ``config.optimise_resolutions``: resolution, ari, nmi, n_clusters."""
    rows = []
    for value in config.optimise_resolutions:
        sweep_clusters, _ = leiden(network, float(value), config.seed)
        rows.append({"resolution": float(value), **_agreement(labels, sweep_clusters)})
    return pd.DataFrame(rows)


def _label_silhouette(embedding: np.ndarray, labels: np.ndarray, max_cells: int, seed: int) -> float:
    """Silhouette of the labels in ``embedding`` on a seeded sample of at most ``max_cells`` cells;
    NaN with one label or with as many labels as cells."""
    if not 2 <= len(np.unique(labels)) < len(labels):
        return float("nan")
    return float(
        silhouette_score(embedding, labels, sample_size=min(max_cells, len(labels)), random_state=seed)
    )


def majority_vote(clusters: np.ndarray, labels: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Map each cluster to its most frequent label.

    Returns ``(cluster_table, confusion, accuracy)``: one row per cluster (``size``, ``purity``,
    ``majority_label`` and a count column per label); the label × mapped-label confusion matrix; and
    the share of cells whose cluster's majority label is their own (ties go to the label sorted first).
    """
    contingency = pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(labels, name="label"))
    contingency = contingency.reindex(columns=sorted(contingency.columns))
    sizes = contingency.sum(axis=1)
    majority = contingency.idxmax(axis=1)
    table = pd.DataFrame(
        {
            "size": sizes,
            "purity": contingency.max(axis=1) / sizes,
            "majority_label": majority,
        }
    )
    table = pd.concat([table, contingency.add_prefix("n_")], axis=1)
    table.index.name = "cluster"
    mapped = majority.loc[clusters].to_numpy()
    classes = sorted(np.unique(labels))
    confusion = pd.crosstab(
        pd.Categorical(labels, categories=classes), pd.Categorical(mapped, categories=classes), dropna=False
    )
    confusion.index.name = "true_label"
    confusion.columns.name = "cluster_majority_label"
    accuracy = float(np.mean(mapped == labels))
    return table, confusion, accuracy


def config_dict(config: ClusterConfig) -> dict[str, Any]:
    """``config`` as a plain dict (for run_meta.json)."""
    data = asdict(config)
    for name in ("resolutions", "seeds", "optimise_resolutions"):
        data[name] = list(data[name])
    return data
