"""pca_baseline: PCA of log-normalised counts, deterministic, clamped, optionally fit on train cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from neurofm.evaluate.baselines import pca_baseline


def _counts(n_cells: int = 120, n_genes: int = 80, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    rates = rng.gamma(1.0, 2.0, size=(2, n_genes))
    kind = rng.integers(0, 2, n_cells)
    counts = rng.poisson(rates[kind] * rng.uniform(0.5, 2.0, size=(n_cells, 1))).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs["kind"] = kind.astype(str)
    return adata


def test_shape_dtype_and_determinism():
    adata = _counts()
    first, second = pca_baseline(adata, n_components=10), pca_baseline(adata, n_components=10)
    assert first.shape == (120, 10) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)


def test_components_are_clamped_to_the_data():
    adata = _counts(n_cells=12, n_genes=30)
    assert pca_baseline(adata, n_components=50).shape == (12, 11)


def test_input_is_left_unchanged():
    adata = _counts()
    before = adata.X.copy()
    pca_baseline(adata, n_components=5)
    assert (adata.X != before).nnz == 0


def test_counts_layer_is_preferred_over_x():
    adata = _counts()
    expected = pca_baseline(adata, n_components=5)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.zeros(adata.shape, dtype=np.float32))
    np.testing.assert_allclose(pca_baseline(adata, n_components=5), expected, rtol=1e-5, atol=1e-5)


def test_fit_on_training_cells_projects_every_cell():
    adata = _counts()
    embedding = pca_baseline(adata, n_components=5, fit_indices=np.arange(60))
    assert embedding.shape == (120, 5) and np.isfinite(embedding).all()
    # the first component separates the two kinds of cells the counts were drawn from
    kind = adata.obs["kind"].to_numpy()
    assert abs(embedding[kind == "0", 0].mean() - embedding[kind == "1", 0].mean()) > 1.0
