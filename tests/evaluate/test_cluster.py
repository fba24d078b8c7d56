"""cluster_embedding: Leiden on the kNN graph recovers separable blobs, deterministically, label-free."""

from __future__ import annotations

import numpy as np
import pytest

from neurofm.errors import NeurofmError
from neurofm.evaluate.cluster import cluster_embedding, majority_vote


def blobs(n_cells: int = 300, n_classes: int = 3, dims: int = 10, separation: float = 10.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_classes, n_cells)
    embedding = rng.normal(size=(n_cells, dims))
    embedding[np.arange(n_cells), codes] += separation
    return embedding.astype(np.float32), np.array([f"c{k}" for k in range(n_classes)])[codes]


def test_separated_blobs_are_recovered():
    embedding, labels = blobs()
    result = cluster_embedding(embedding, labels, resolution=0.3, match_n_classes=True)
    assert result.ari > 0.95 and result.nmi > 0.95
    assert result.homogeneity > 0.95 and result.completeness > 0.95
    assert result.majority_accuracy > 0.98
    assert result.matched["n_clusters"] == 3 and result.matched["ari"] > 0.95
    metrics = result.metrics()
    assert metrics["ari_optimised"] > 0.95 and metrics["nmi_optimised"] > 0.95
    assert metrics["silhouette"] > 0.3


def test_clustering_is_reported_as_a_distribution_over_seeds_and_resolutions():
    embedding, labels = blobs(separation=2.5)
    result = cluster_embedding(embedding, labels, seeds=(0, 1, 2))
    metrics = result.metrics()
    assert list(result.seed_scores["seed"]) == [0, 1, 2]
    assert metrics["ari_res1_mean"] == pytest.approx(result.seed_scores["ari"].mean())
    assert metrics["ari_res1_sd"] == pytest.approx(result.seed_scores["ari"].std(ddof=1))
    # the optimised ARI is the best of the scib sweep, so never below the resolution-1 draw of that seed
    assert list(result.optimised["resolution"]) == [round(0.1 * k, 1) for k in range(1, 21)]
    assert metrics["ari_optimised"] == pytest.approx(result.optimised["ari"].max())
    assert metrics["ari_optimised"] >= result.ari - 1e-12
    assert metrics["nmi_optimised"] == pytest.approx(result.optimised["nmi"].max())
    shuffled = np.random.default_rng(0).permutation(labels)
    noise = cluster_embedding(embedding, shuffled, seeds=(0,)).metrics()
    assert noise["ari_optimised"] < 0.05 and noise["silhouette"] < 0.05


def test_same_seed_same_clusters_and_cosine_metric_works():
    embedding, labels = blobs()
    first = cluster_embedding(embedding, labels, seed=3)
    second = cluster_embedding(embedding, labels, seed=3)
    np.testing.assert_array_equal(first.clusters, second.clusters)
    cosine = cluster_embedding(embedding, labels, metric="cosine", n_neighbors=10)
    assert cosine.config.metric == "cosine" and cosine.ari > 0.5


def test_random_embedding_scores_near_zero_ari():
    embedding, labels = blobs(separation=0.0)
    result = cluster_embedding(embedding, labels)
    assert abs(result.ari) < 0.05 and result.nmi < 0.1


def test_clusters_never_depend_on_labels():
    embedding, labels = blobs()
    shuffled = np.random.default_rng(4).permutation(labels)
    first = cluster_embedding(embedding, labels, select_resolution=True)
    second = cluster_embedding(embedding, shuffled, select_resolution=True)
    np.testing.assert_array_equal(first.clusters, second.clusters)
    assert first.resolution == second.resolution
    assert second.ari < 0.05


def test_resolution_sweep_picks_the_highest_modularity():
    embedding, labels = blobs()
    result = cluster_embedding(embedding, labels, select_resolution=True, resolutions=(0.1, 0.5, 1.0, 2.0))
    assert list(result.sweep["resolution"]) == [0.1, 0.5, 1.0, 2.0]
    best = result.sweep.loc[result.sweep["modularity"].idxmax()]
    assert result.resolution == best["resolution"]
    assert result.modularity == pytest.approx(best["modularity"])


def test_cluster_ids_are_ordered_by_size():
    embedding, labels = blobs()
    result = cluster_embedding(embedding, labels, resolution=2.0)
    sizes = result.cluster_table["size"].to_numpy()
    assert list(result.cluster_table.index) == list(range(result.n_clusters))
    assert (np.diff(sizes) <= 0).all()


def test_majority_vote_table_and_confusion():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array(["a", "a", "b", "b", "b", "a"])
    table, confusion, accuracy = majority_vote(clusters, labels)
    assert table["majority_label"].tolist() == ["a", "b", "a"]
    assert table["purity"].tolist() == pytest.approx([2 / 3, 1.0, 1.0])
    assert table["size"].tolist() == [3, 2, 1]
    assert confusion.loc["b", "a"] == 1 and confusion.loc["a", "a"] == 3
    assert accuracy == pytest.approx(5 / 6)


def test_bad_metric_is_refused():
    embedding, labels = blobs()
    with pytest.raises(NeurofmError, match="cosine"):
        cluster_embedding(embedding, labels, metric="manhattan")
