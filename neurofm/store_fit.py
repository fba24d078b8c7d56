"""What training fits on a cell store before it streams it: the tokenizer's bin edges and the count head's genes.

Both read a seeded sample of the store's cells — never the whole atlas in memory — among the rows the
caller does not exclude (the validation rows): :func:`fit_tokenizer` (per-gene bin edges, exactly those of
``ExpressionTokenizer.fit`` on the sampled cells) and :func:`variable_genes` (Seurat v3's most variable
genes). In a multi-file store each gene counts only the sampled cells of the files that measure it.
The streaming loader that uses the fitted tokenizer is :mod:`neurofm.stream`.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from neurofm.data.store import CellStore
from neurofm.errors import NeurofmError
from neurofm.tokenizer import MIN_CELLS, ExpressionTokenizer, TokenizerConfig

log = logging.getLogger(__name__)


def sample_rows(n_rows: int, exclude_rows: np.ndarray | None, size: int, seed_key: list[int]) -> np.ndarray:
    """Sorted rows of ``range(n_rows)`` not in ``exclude_rows`` (e.g. the validation rows): all of them
    when there are at most ``size``, else ``size`` of them drawn with ``default_rng(seed_key)``."""
    rows = np.arange(n_rows)
    if exclude_rows is not None and len(exclude_rows):
        rows = np.setdiff1d(rows, exclude_rows, assume_unique=True)
    if rows.size <= size:
        return rows
    return np.sort(np.random.default_rng(seed_key).choice(rows, size=size, replace=False))


def _measured_edges(
    tokenizer: ExpressionTokenizer, dense: np.ndarray, observed: np.ndarray, cell_datasets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(edges, constant) of the genes in the columns of ``dense`` (sampled cells × genes), each gene
    fit on the cells whose dataset (``cell_datasets``) measures it (``observed``: datasets × genes)."""
    if observed.all():
        return tokenizer._fit_edges(dense), np.ptp(dense, axis=0) == 0
    patterns, which = np.unique(observed.T, axis=0, return_inverse=True)  # genes measured by the same files
    which = np.asarray(which).ravel()
    edges, constant = None, np.ones(dense.shape[1], dtype=bool)
    for index, pattern in enumerate(patterns):
        genes, cells = np.flatnonzero(which == index), np.flatnonzero(pattern[cell_datasets])
        if cells.size < MIN_CELLS:
            log.warning("%d genes are measured in only %d sampled cells; their bins are unreliable",
                        genes.size, cells.size)  # fmt: skip
        values = dense[np.ix_(cells, genes)] if cells.size else np.zeros((1, genes.size), dense.dtype)
        part = tokenizer._fit_edges(values)
        if edges is None:
            edges = np.full((dense.shape[1], part.shape[1]), np.inf)
        edges[genes, : part.shape[1]] = part
        constant[genes] = np.ptp(values, axis=0) == 0
    return edges, constant


def _normalised(store: CellStore, rows: np.ndarray, config: TokenizerConfig) -> sp.csc_matrix:
    """log1p(CP-``target_sum``) values of store ``rows`` (CSC), as ``ExpressionTokenizer.normalise``."""
    counts = store.rows(rows)
    counts.indptr = counts.indptr.astype(np.int64)
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel().astype(np.float32)
    scale = np.divide(np.float32(config.target_sum), library, out=np.zeros_like(library), where=library > 0)
    values = counts.data
    values *= np.repeat(scale, np.diff(counts.indptr))
    if config.log1p:
        np.log1p(values, out=values)
    return counts.tocsc()


def fit_tokenizer(
    store: CellStore,
    config: TokenizerConfig | None = None,
    *,
    exclude_rows: np.ndarray | None = None,
    max_cells: int = 200_000,
    max_nonzeros: int = 30_000_000,
    seed: int = 0,
    chunk_values: int = 1 << 24,
) -> ExpressionTokenizer:
    """Fit per-gene bin edges on a seeded sample of the store's cells, never the whole atlas in memory.

    The sample is ``min(max_cells, max_nonzeros / mean non-zeros per cell)`` cells drawn with
    ``default_rng([seed, 11])`` among the rows not in ``exclude_rows`` (pass the validation rows). The
    edges are exactly those of ``ExpressionTokenizer.fit`` on the sampled cells, computed ``chunk_values``
    dense values at a time (genes in column chunks). In a multi-file store a gene's edges (and its
    constant-gene check) use only the sampled cells of the datasets that measure it
    (``store.observed_genes``). Returns a fitted tokenizer in the store's gene order.
    """
    tokenizer = ExpressionTokenizer((config or TokenizerConfig()).validate())
    if tokenizer.config.counts_layer is not None:
        raise NeurofmError("a cell store holds one counts matrix; set counts_layer to None")
    total_nonzeros = sum(shard["nnz"] for shard in store.shards)
    mean_nonzeros = max(1.0, total_nonzeros / max(1, store.n_cells))
    sample = sample_rows(
        store.n_cells,
        exclude_rows,
        int(min(max_cells, max(MIN_CELLS, max_nonzeros // mean_nonzeros))),
        [seed, 11],
    )
    n_sample = sample.size
    if n_sample < MIN_CELLS:
        raise NeurofmError(f"only {n_sample} training cells; fitting bin edges needs at least {MIN_CELLS}")
    binner_config = tokenizer.config
    normalised = _normalised(store, sample, binner_config)
    genes_per_chunk = max(1, chunk_values // n_sample)
    observed, sample_datasets = store.observed_genes, store.cell_datasets()[sample]
    edges_parts, constant_parts = [], []
    for g0 in range(0, store.n_genes, genes_per_chunk):
        dense = normalised[:, g0 : g0 + genes_per_chunk].toarray()
        part, constant_part = _measured_edges(
            tokenizer, dense, observed[:, g0 : g0 + genes_per_chunk], sample_datasets
        )
        edges_parts.append(part)
        constant_parts.append(constant_part)
    constant = np.concatenate(constant_parts)
    if constant.all():
        raise NeurofmError(
            "every gene has zero variance across the sampled cells; the store carries no signal"
        )
    if constant.any() and binner_config.constant_genes == "error":
        examples = store.gene_ids[constant][:3].tolist()
        raise NeurofmError(
            f"{int(constant.sum())} genes have zero variance across the sampled cells (e.g. {examples}); "
            "drop them (convert --genes) or set constant_genes='keep'"
        )
    width = max(part.shape[1] for part in edges_parts)
    edges = np.full((store.n_genes, width), np.inf)
    row = 0
    for part in edges_parts:
        edges[row : row + part.shape[0], : part.shape[1]] = part
        row += part.shape[0]
    if constant.any():  # a streamed vocabulary keeps every stored gene: constant ones always share a bin
        log.warning(
            "%d of %d genes have one value in every sampled cell (e.g. %s); they always fall in one bin",
            int(constant.sum()),
            store.n_genes,
            store.gene_ids[constant][:3].tolist(),
        )
    tokenizer.bin_edges = edges
    tokenizer.gene_ids = store.gene_ids.copy()
    symbols = store.manifest.get("gene_symbols")
    tokenizer.gene_symbols = None if symbols is None else np.asarray(symbols, dtype=str)  # gene matching
    log.info("fit bin edges on %d sampled cells of %d", n_sample, store.n_cells)
    return tokenizer


def variable_genes(
    store: CellStore,
    n_top_genes: int,
    *,
    exclude_rows: np.ndarray | None = None,
    max_cells: int = 20_000,
    seed: int = 0,
) -> np.ndarray:
    """Sorted store-gene indices of the ``n_top_genes`` most variable genes: scanpy's Seurat-v3 ranking
    (variance of the standardised raw counts against a loess fit of mean and variance, scVI's recipe) on
    a seeded sample of at most ``max_cells`` cells drawn with ``default_rng([seed, 13])`` among the rows
    not in ``exclude_rows`` (pass the validation rows). Every gene when the store has no more. In a
    multi-file store each gene's statistics count only the sampled cells whose file measured it
    (:func:`_measured_variances`)."""
    if n_top_genes >= store.n_genes:
        return np.arange(store.n_genes)
    import anndata as ad
    import scanpy as sc

    sample = sample_rows(store.n_cells, exclude_rows, max_cells, [seed, 13])
    observed = store.observed_genes
    if not observed.all():
        measuring = observed[store.cell_datasets()[sample]]  # (sampled cells, genes)
        variances = _measured_variances(store.rows(sample), measuring)
        chosen = np.sort(np.argsort(-variances, kind="stable")[:n_top_genes])
    else:
        work = ad.AnnData(X=store.rows(sample))  # float32 CSR raw counts
        sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, flavor="seurat_v3")
        chosen = np.flatnonzero(work.var["highly_variable"].to_numpy())
    log.info(
        "count head: the %d most variable of %d genes (Seurat v3 on %d training cells)",
        chosen.size, store.n_genes, sample.size,
    )  # fmt: skip
    return chosen


def _measured_variances(counts: sp.csr_matrix, measuring: np.ndarray) -> np.ndarray:
    """Seurat v3's normalised variance per gene (scanpy's ``flavor="seurat_v3"``, one batch) of raw
    ``counts`` (cells × genes CSR), each gene over its ``measuring`` cells (cells × genes bool) only:
    their mean and variance, a loess fit of log variance on log mean, values clipped at mean +
    sqrt(cells) × the fitted standard deviation. A gene fewer than 2 cells measured, or constant, gets
    -inf (never chosen before a measured, varying one)."""
    from skmisc.loess import loess

    n_cells = measuring.sum(0).astype(np.float64)  # per gene; unmeasured counts are 0 placeholders
    values, genes = counts.data.astype(np.float64), counts.indices
    total = np.bincount(genes, values, minlength=counts.shape[1])
    mean = total / np.maximum(n_cells, 1)
    var = (np.bincount(genes, values**2, minlength=counts.shape[1]) - n_cells * mean**2) / np.maximum(
        n_cells - 1, 1
    )
    varying = (n_cells > 1) & (var > 0)
    fit = loess(np.log10(mean[varying]), np.log10(var[varying]), span=0.3, degree=2)
    fit.fit()
    reg_std = np.ones_like(mean)
    reg_std[varying] = np.sqrt(10**fit.outputs.fitted_values)
    clipped = np.minimum(values, (reg_std * np.sqrt(n_cells) + mean)[genes])
    clipped_sum = np.bincount(genes, clipped, minlength=counts.shape[1])
    clipped_squares = np.bincount(genes, clipped**2, minlength=counts.shape[1])
    normalised = (n_cells * mean**2 + clipped_squares - 2 * clipped_sum * mean) / (
        np.maximum(n_cells - 1, 1) * reg_std**2
    )
    return np.where(varying, normalised, -np.inf)
