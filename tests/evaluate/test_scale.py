"""Regression at scale: the kNN graph, Leiden and UMAP on more than 10,000 cells.

scanpy 1.11.5 takes its approximate-neighbour path (pynndescent) from 4,096 cells on; with pynndescent
0.7 that path crashed above ~10,000 cells ('csr_array' object has no attribute 'getnnz'), which killed
every evaluation of real 10x data. pynndescent is pinned to 0.5.x (pyproject.toml, requirements/*.lock).
Sparse 10x data give many identical cells (all-zero or one-UMI profiles), so the test has them too.
"""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc

from neurofm.evaluate.cluster import cluster_embedding
from neurofm.evaluate.compare import subsample_cells


def _cells(n_cells: int = 15000, n_classes: int = 6, dims: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_classes, n_cells)
    embedding = rng.normal(size=(n_cells, dims)).astype(np.float32)
    embedding[np.arange(n_cells), codes] += 5.0
    embedding[: n_cells // 5] = embedding[0]  # a fifth of the cells share one profile
    codes[: n_cells // 5] = codes[0]
    return embedding, np.array([f"type{k}" for k in range(n_classes)])[codes]


@pytest.mark.slow  # 45-60 s; the evaluation's clustering on small data is pinned in test_cluster.py
def test_knn_leiden_and_umap_run_on_15000_cells_with_duplicates():
    embedding, labels = _cells()
    result = cluster_embedding(embedding, labels, seeds=(0,), optimise_resolutions=(0.1, 0.5, 1.0))
    graph = result.graph  # the evaluation's own kNN graph (neighbor_graph), built once
    assert graph.obsp["distances"].shape == (15000, 15000)
    assert type(graph.obsp["distances"]).__name__ in ("csr_matrix", "csr_array")
    assert graph.uns["neighbors"]["params"]["method"] == "umap"  # scanpy's approximate path
    assert result.metrics()["ari_optimised"] > 0.6  # 0.82 measured; shuffled labels give ~0
    sc.tl.umap(result.graph, random_state=0, maxiter=20)
    assert result.graph.obsm["X_umap"].shape == (15000, 2) and np.isfinite(result.graph.obsm["X_umap"]).all()


def test_large_evaluations_cluster_and_draw_a_seeded_sample():
    assert subsample_cells(5000, 20000, seed=0) is None
    first, second = subsample_cells(50000, 20000, seed=0), subsample_cells(50000, 20000, seed=0)
    np.testing.assert_array_equal(first, second)
    assert len(first) == 20000 and len(np.unique(first)) == 20000 and np.all(np.diff(first) > 0)
    assert not np.array_equal(first, subsample_cells(50000, 20000, seed=1))
