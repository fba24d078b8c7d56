"""Per-cell features a label head reads: the model's embedding and the log-normalised expression of the
model's genes, read from an AnnData (backed works) or a cell store a block of cells at a time.

Used by :mod:`neurofm.mapping` (reference building, label transfer) and the map pipeline's scoring.
"""

from __future__ import annotations

import numpy as np

from neurofm.errors import NeurofmError

BLOCK = 4096  # cells read at a time


def expression_matrix(adata, match, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(cells, the model's genes) float32 ``log1p(CP10k)`` expression of the cells ``start:stop`` (default:
    all) of ``adata`` (raw counts; backed works, read 4,096 cells at a time) on the genes of ``match`` (a
    :class:`neurofm.genes.GeneMatch`); a cell's library size is its total over the model genes found, and
    genes not found are NaN."""
    import scipy.sparse as sp

    from neurofm.tokenizer import normalise_counts

    found = np.flatnonzero(match.observed)
    stop = adata.n_obs if stop is None else stop
    out = np.full((stop - start, match.n_model_genes), np.nan, dtype=np.float32)
    for first in range(start, stop, BLOCK):
        block = adata[first : min(first + BLOCK, stop)].X
        block = sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        out[first - start : first - start + block.shape[0], found] = normalise_counts(
            block[:, match.source[found]]
        )
    return out


def cells_expression(adata, tokenizer, gene_col: str | None = None) -> np.ndarray:
    """:func:`expression_matrix` of every cell of ``adata`` on ``tokenizer``'s genes (matched as
    :func:`neurofm.embed` matches them, by ``var_names`` or ``var[gene_col]``)."""
    from neurofm.genes import match_adata

    match = match_adata(adata, tokenizer.gene_ids, tokenizer.gene_symbols, gene_col=gene_col, min_overlap=0.0)
    return expression_matrix(adata, match)


def cell_batches(model, cells, batch_key: str | None = None) -> np.ndarray | None:
    """Each cell's batch name for a model whose count head has a batch covariate: the obs column
    ``batch_key`` (default: the one the model was trained with, ``model.config.batch_key``) of ``cells``
    (AnnData or ``CellStore``); None for a model without the covariate, or when the cells lack that
    column and none was named (they then get the no-batch vector). A named column they lack is refused."""
    from neurofm.data.store import CellStore
    from neurofm.stream import store_batches

    if not model.config.n_batches:
        return None
    key = batch_key or model.config.batch_key
    if key is None:
        return None
    if isinstance(cells, CellStore):
        if key == "dataset" or key in cells.read_obs().columns:
            names, codes = store_batches(cells, key)
            return np.asarray(names, dtype=object)[codes]
    elif key in cells.obs:
        return cells.obs[key].astype(str).to_numpy()
    if batch_key is not None:
        raise NeurofmError(f"the cells have no batch column {batch_key!r}; name an obs column of theirs")
    return None


def reference_features(model, tokenizer, cells, rows: np.ndarray | None = None, progress: bool = True,
                       batch_size: int = 256, batches: np.ndarray | None = None,
                       unseen_batch: str = "none") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(embedding, expression)`` of the cells ``rows`` (default: all) of ``cells`` (an AnnData of raw
    counts, or a ``CellStore``) with the model's own genes (:func:`expression_matrix`). In a multi-file
    store each cell is read with only the genes its file measured (the others are unobserved: out of the
    library size and the pooling, as for query data that lacks genes). ``batches`` (a name per cell of
    ``cells``, :func:`cell_batches`): each cell's batch, for a model with a batch covariate."""
    import anndata as ad

    from neurofm.data.store import CellStore
    from neurofm.embedding import embed_matrix
    from neurofm.genes import match_adata

    n_cells = cells.n_cells if isinstance(cells, CellStore) else cells.n_obs
    rows = np.arange(n_cells) if rows is None else np.asarray(rows)
    if not isinstance(cells, CellStore):
        subset = cells if len(rows) == n_cells else cells[rows]
        match = match_adata(subset, tokenizer.gene_ids, tokenizer.gene_symbols)
        embedding = embed_matrix(
            model, tokenizer, subset, batch_size=batch_size, progress=progress, match=match,
            batches=None if batches is None else np.asarray(batches)[rows], unseen_batch=unseen_batch,
        )  # fmt: skip
        return embedding, expression_matrix(subset, match)
    var, observed, datasets = cells.var(), cells.observed_genes, cells.cell_datasets()
    embedding = np.empty((len(rows), model.embedding_dim), dtype=np.float32)
    expression = np.empty((len(rows), tokenizer.n_genes), dtype=np.float32)
    for start in range(0, len(rows), BLOCK):
        part = rows[start : start + BLOCK]
        counts = cells.rows(part)
        for dataset in np.unique(datasets[part]):  # one file's cells with the genes it measured
            mine, genes = np.flatnonzero(datasets[part] == dataset), np.flatnonzero(observed[dataset])
            block = ad.AnnData(X=counts[mine][:, genes], var=var.iloc[genes])
            match = match_adata(block, tokenizer.gene_ids, tokenizer.gene_symbols, min_overlap=0.0)
            embedding[start + mine] = embed_matrix(
                model, tokenizer, block, batch_size, progress=False, match=match, unseen_batch=unseen_batch,
                batches=None if batches is None else np.asarray(batches)[part[mine]],
            )  # fmt: skip
            expression[start + mine] = expression_matrix(block, match)
    return embedding, expression


def embed_reference_cells(
    model, tokenizer, cells, progress: bool = True, batch_size: int = 256
) -> np.ndarray:
    """The embeddings of :func:`reference_features` of every cell of ``cells``."""
    return reference_features(model, tokenizer, cells, progress=progress, batch_size=batch_size)[0]
