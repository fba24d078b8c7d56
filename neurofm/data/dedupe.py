"""Duplicate gene and cell IDs: make them unique, collapse (sum) duplicate genes, or drop duplicate cells.

Gene duplicates are judged on ``var_names`` and, when ``gene_column`` is given, on that var column
(e.g. ``gene_symbol``: two Ensembl IDs with one symbol). Cell duplicates are judged on ``obs_names`` and,
when ``cell_column`` is given, on that obs column. Note that the same 10x barcode in two libraries is two
different cells; judge cells on ``cell_barcode`` only when the file holds a single library.
"""

from __future__ import annotations

import logging
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.utils import make_index_unique

from neurofm import keys
from neurofm.errors import NeurofmError

log = logging.getLogger(__name__)

GeneMode = Literal["make_unique", "collapse", "none"]
CellMode = Literal["make_unique", "drop", "error", "none"]
_GENE_MODES = ("make_unique", "collapse", "none")
_CELL_MODES = ("make_unique", "drop", "error", "none")


def _names(frame: pd.DataFrame, column: str | None, axis: str) -> pd.Index:
    if column is None:
        return pd.Index(frame.index.astype(str))
    if column not in frame.columns:
        raise NeurofmError(
            f"{axis} has no column '{column}' ({axis} columns: {list(frame.columns)}); "
            f"set the {axis} duplicate column to one of them or to None"
        )
    return pd.Index(frame[column].astype(str))


def unique_names(names: pd.Index) -> pd.Index:
    """``names`` with repeats suffixed ``-1``, ``-2``…: the ``make_unique`` rule for genes and cells."""
    return make_index_unique(pd.Index(names), join="-")


def _collapse_genes(adata: ad.AnnData, names: pd.Index) -> ad.AnnData:
    """Sum the columns that share a name into the first of them (one sparse product, no loops)."""
    codes, uniques = pd.factorize(names)
    first = pd.Series(np.arange(names.size)).groupby(codes).min().to_numpy()
    # (n_genes × n_groups) 0/1 matrix mapping each column to its group
    membership = sp.csr_matrix(
        (np.ones(names.size, dtype=np.float32), (np.arange(names.size), codes)),
        shape=(names.size, uniques.size),
    )
    matrix = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    summed = sp.csr_matrix(matrix @ membership, dtype=matrix.dtype)
    summed.sort_indices()
    return ad.AnnData(X=summed, obs=adata.obs.copy(), var=adata.var.iloc[first].copy(), uns=dict(adata.uns))


def dedupe(
    adata: ad.AnnData,
    genes: GeneMode = "make_unique",
    cells: CellMode = "make_unique",
    gene_column: str | None = None,
    cell_column: str | None = None,
) -> ad.AnnData:
    """Return a copy of ``adata`` with duplicate gene/cell IDs resolved; ``adata`` is not modified.

    ``genes``: ``make_unique`` appends ``-1``, ``-2``… to repeats (of var_names, or of ``var[gene_column]``);
    ``collapse`` sums duplicate gene columns into the first one (counts stay integers; other layers and
    varm are dropped); ``none`` leaves genes alone. ``cells``: ``make_unique`` suffixes repeated obs_names
    (or ``obs[cell_column]`` values); ``drop`` keeps the first of each duplicate group; ``error`` raises
    NeurofmError if any exist; ``none`` leaves cells alone.

    Writes ``uns['dedupe_report']``: genes_mode, cells_mode, gene_column, cell_column, n_genes_before/after,
    n_duplicate_genes (repeats beyond the first), n_cells_before/after, n_duplicate_cells, and up to five
    example duplicated names of each kind.
    """
    if genes not in _GENE_MODES:
        raise NeurofmError(f"genes='{genes}' is not a dedupe mode; use one of {list(_GENE_MODES)}")
    if cells not in _CELL_MODES:
        raise NeurofmError(f"cells='{cells}' is not a dedupe mode; use one of {list(_CELL_MODES)}")
    gene_names = _names(adata.var, gene_column, "var")
    cell_names = _names(adata.obs, cell_column, "obs")
    gene_repeats = gene_names.duplicated()
    cell_repeats = cell_names.duplicated()
    report = {
        "genes_mode": genes,
        "cells_mode": cells,
        "gene_column": gene_column or "var_names",
        "cell_column": cell_column or "obs_names",
        "n_genes_before": int(adata.n_vars),
        "n_duplicate_genes": int(gene_repeats.sum()),
        "n_cells_before": int(adata.n_obs),
        "n_duplicate_cells": int(cell_repeats.sum()),
        "example_duplicate_genes": np.asarray(gene_names[gene_repeats].unique()[:5], dtype=str),
        "example_duplicate_cells": np.asarray(cell_names[cell_repeats].unique()[:5], dtype=str),
    }
    if cells == "error" and cell_repeats.any():
        raise NeurofmError(
            f"{int(cell_repeats.sum())} duplicate cell IDs (e.g. {cell_names[cell_repeats][0]!r}); "
            "set cells='drop' or 'make_unique' to resolve them"
        )

    result = adata.copy()
    if cells == "drop" and cell_repeats.any():
        result = result[~cell_repeats].copy()
    elif cells == "make_unique" and cell_repeats.any():
        unique = unique_names(cell_names)
        if cell_column is None:
            result.obs_names = unique
        else:
            result.obs[cell_column] = unique.to_numpy()

    if genes == "collapse" and gene_repeats.any():
        result = _collapse_genes(result, gene_names)
    elif genes == "make_unique" and gene_repeats.any():
        unique = unique_names(gene_names)
        if gene_column is None:
            result.var_names = unique
        else:
            result.var[gene_column] = unique.to_numpy()

    report["n_genes_after"] = int(result.n_vars)
    report["n_cells_after"] = int(result.n_obs)
    if report["n_duplicate_genes"] or report["n_duplicate_cells"]:
        log.info(
            "dedupe: %d duplicate genes (%s), %d duplicate cells (%s)",
            report["n_duplicate_genes"],
            genes,
            report["n_duplicate_cells"],
            cells,
        )
    result.uns[keys.DEDUPE_REPORT] = report
    return result
