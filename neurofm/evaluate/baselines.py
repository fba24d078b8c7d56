"""Model-free baselines every model number is reported beside.

The PCA baseline is what the issue measured at accuracy 1.000 on the shared cortex data: PCA of
log-normalised counts, probed with the same logistic regression on the same split as the model.
The random-weights baseline (the same encoder, untrained) comes from :mod:`neurofm.embed`.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA

from neurofm import keys
from neurofm.errors import NeurofmError

logger = logging.getLogger(__name__)


def log_normalised_counts(adata: ad.AnnData, target_sum: float = 1e4) -> np.ndarray | sp.spmatrix:
    """Return log1p(counts scaled to ``target_sum`` per cell), computed on a copy.

    Counts are read from ``layers['counts']`` when present, else from ``X``. ``adata`` is not changed.
    """
    counts = adata.layers[keys.COUNTS_LAYER] if keys.COUNTS_LAYER in adata.layers else adata.X
    if counts is None:
        raise NeurofmError("AnnData has no X and no 'counts' layer; pass raw counts for the PCA baseline")
    work = ad.AnnData(X=counts.copy().astype(np.float32))
    sc.pp.normalize_total(work, target_sum=target_sum)
    sc.pp.log1p(work)
    return work.X


def pca_baseline(
    adata: ad.AnnData,
    n_components: int = 50,
    target_sum: float = 1e4,
    seed: int = 0,
    fit_indices: np.ndarray | None = None,
) -> np.ndarray:
    """PCA of log-normalised counts, one row per cell (``float32``, shape ``n_cells × k``).

    Counts (``layers['counts']`` or ``X``) are normalised per cell to ``target_sum`` and log1p'd on a
    copy, then projected on ``k = min(n_components, n_cells - 1, n_genes - 1)`` principal components.

    Honesty note: PCA is unsupervised (it never sees labels) but by default it is fit on *all* cells,
    test cells included — the usual transductive practice in single-cell analysis. Pass
    ``fit_indices`` (e.g. the probe's training indices) to fit the components on those cells only
    and project every cell with them. Nothing is written to ``adata``; store the result under
    ``obsm['X_pca_baseline']`` if wanted. Deterministic for a given ``seed``.
    """
    n_cells, n_genes = adata.shape
    fit_rows = n_cells if fit_indices is None else len(fit_indices)
    n_components_used = min(n_components, fit_rows - 1, n_genes - 1)
    if n_components_used < 1:
        raise NeurofmError(
            f"PCA baseline needs at least 2 cells and 2 genes, got {fit_rows} × {n_genes}; pass more data"
        )
    if n_components_used < n_components:
        logger.info("PCA baseline: %d components requested, %d used", n_components, n_components_used)
    values = log_normalised_counts(adata, target_sum=target_sum)
    if sp.issparse(values):
        values = values.toarray()  # PCA needs centring; the shared data fit comfortably in memory
    values = np.asarray(values, dtype=np.float64)
    # randomized SVD (seeded, so deterministic): 2-7x faster than the exact solvers at this size
    pca = PCA(n_components=n_components_used, svd_solver="randomized", random_state=seed)
    if fit_indices is None:
        pca.fit(values)
    else:
        pca.fit(values[np.asarray(fit_indices)])
    return pca.transform(values).astype(np.float32)
