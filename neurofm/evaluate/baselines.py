"""The baselines every model number is reported beside, as strong as we can make them.

- **PCA** on scanpy's standard recipe: ``normalize_total`` (10,000 counts per cell), ``log1p``, the
  2,000 most variable genes when there are more (``highly_variable_genes``, Seurat flavour), 50
  principal components — what a user gets from ``sc.pp.pca`` before any model.
- **scVI** (scvi-tools): a variational autoencoder with a negative-binomial likelihood of the raw counts
  and the library size as an offset, trained on the evaluation data itself (CPU, seeded, scvi-tools'
  default epoch rule ``min(round(20,000 / n_cells × 400), 400)``; 2,000 Seurat-v3 variable genes when
  there are more; ``n_latent`` 10, scvi-tools' default). It sees the evaluation cells (not labels)
  during training, as PCA does — the usual transductive practice.
- The random-weights encoder (the same architecture, untrained) comes from :mod:`neurofm.embedding`.

Every baseline is scored by the same probe menu, split and clustering as the model.
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


def highly_variable(adata: ad.AnnData, values, n_top_genes: int, flavor: str = "seurat") -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` most variable genes (all genes when there are no more)."""
    if adata.n_vars <= n_top_genes:
        return np.ones(adata.n_vars, dtype=bool)
    work = ad.AnnData(X=values)
    sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, flavor=flavor)
    return work.var["highly_variable"].to_numpy()


def pca_baseline(
    adata: ad.AnnData,
    n_components: int = 50,
    target_sum: float = 1e4,
    seed: int = 0,
    fit_indices: np.ndarray | None = None,
    n_top_genes: int = 2000,
) -> np.ndarray:
    """PCA of log-normalised counts, one row per cell (``float32``, shape ``n_cells × k``).

    Counts (``layers['counts']`` or ``X``) are normalised per cell to ``target_sum`` and log1p'd on a
    copy, restricted to the ``n_top_genes`` most variable genes when there are more (scanpy's recipe),
    then projected on ``k = min(n_components, n_cells - 1, n_genes - 1)`` principal components.

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
    genes = highly_variable(adata, values, n_top_genes)
    if not genes.all():
        values = values[:, genes]
        n_components_used = min(n_components_used, int(genes.sum()) - 1)
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


def scvi_baseline(
    adata: ad.AnnData,
    n_latent: int = 10,
    seed: int = 0,
    max_epochs: int | None = None,
    n_top_genes: int = 2000,
    early_stopping: bool = True,
) -> np.ndarray:
    """scVI's latent mean for every cell (``float32``, ``n_cells × n_latent``), trained on ``adata``.

    Raw counts (``layers['counts']`` or ``X``; the 2,000 Seurat-v3 variable genes when there are more)
    train an ``scvi.model.SCVI`` on the CPU, seeded; ``max_epochs`` None uses scvi-tools' own rule,
    with its early stopping on the held-out ELBO (``early_stopping``; 10 % of cells held out).
    ``adata`` is not changed. Deterministic for a given ``seed`` on a given machine.
    """
    import logging as _logging
    import warnings

    import scvi

    counts = adata.layers[keys.COUNTS_LAYER] if keys.COUNTS_LAYER in adata.layers else adata.X
    counts = sp.csr_matrix(counts, dtype=np.float32)
    nonempty = np.diff(counts.indptr) > 0
    if nonempty.sum() < 3:
        raise NeurofmError("the scVI baseline needs at least 3 cells with counts; pass more cells")
    work = ad.AnnData(X=counts)
    if work.n_vars > n_top_genes:
        work = work[:, highly_variable(work, counts, n_top_genes, flavor="seurat_v3")].copy()
    scvi.settings.seed = seed
    scvi.settings.verbosity = _logging.ERROR
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        _logging.getLogger(name).setLevel(_logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(work)
        model = scvi.model.SCVI(work, n_latent=n_latent)
        model.train(
            max_epochs=max_epochs,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
            early_stopping=early_stopping,
        )
        latent = model.get_latent_representation()
    logger.info("scVI baseline: %d latent dimensions on %d cells × %d genes", n_latent, *work.shape)
    return np.asarray(latent, dtype=np.float32)
