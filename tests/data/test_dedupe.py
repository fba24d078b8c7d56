import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from neurofm import keys
from neurofm.data.dedupe import dedupe
from neurofm.errors import NeurofmError

pytestmark = pytest.mark.filterwarnings("ignore:.* names are not unique")


def _with_duplicate_cells(adata: ad.AnnData) -> ad.AnnData:
    doubled = ad.concat([adata, adata[:4]])  # 4 cells appear twice, as after a bad concatenation
    assert not doubled.obs_names.is_unique
    return doubled


def test_collapse_sums_duplicate_symbol_columns(synthetic_adata):
    symbols = synthetic_adata.var[keys.GENE_SYMBOL]
    duplicated_symbol = symbols[symbols.duplicated()].iloc[0]
    columns = np.flatnonzero(symbols == duplicated_symbol)
    expected = np.asarray(synthetic_adata.X[:, columns].sum(axis=1)).ravel()
    result = dedupe(synthetic_adata, genes="collapse", gene_column=keys.GENE_SYMBOL)
    assert result.n_vars == synthetic_adata.n_vars - 3
    assert result.var[keys.GENE_SYMBOL].is_unique
    kept = np.flatnonzero(result.var[keys.GENE_SYMBOL] == duplicated_symbol)[0]
    assert result.var_names[kept] == synthetic_adata.var_names[columns[0]]  # first ID is kept
    np.testing.assert_array_equal(result.X[:, kept].toarray().ravel(), expected)
    assert result.X.sum() == synthetic_adata.X.sum()  # no counts lost
    report = result.uns[keys.DEDUPE_REPORT]
    assert report["n_duplicate_genes"] == 3 and report["n_genes_after"] == synthetic_adata.n_vars - 3
    assert duplicated_symbol in report["example_duplicate_genes"]


def test_make_unique_on_a_symbol_column_keeps_the_matrix(synthetic_adata):
    result = dedupe(synthetic_adata, genes="make_unique", gene_column=keys.GENE_SYMBOL)
    assert result.var[keys.GENE_SYMBOL].is_unique and result.shape == synthetic_adata.shape
    assert result.var[keys.GENE_SYMBOL].str.endswith("-1").sum() == 3
    assert (result.X != synthetic_adata.X).nnz == 0


def test_make_unique_on_var_names(synthetic_adata):
    names = synthetic_adata.var_names.to_numpy().copy()
    names[10] = names[11]
    synthetic_adata.var_names = names
    result = dedupe(synthetic_adata, genes="make_unique")
    assert result.var_names.is_unique and result.var_names[11] == names[11] + "-1"


def test_collapse_on_var_names(synthetic_adata):
    names = synthetic_adata.var_names.to_numpy().copy()
    names[10] = names[11]
    synthetic_adata.var_names = names
    expected = synthetic_adata.X[:, 10] + synthetic_adata.X[:, 11]
    result = dedupe(synthetic_adata, genes="collapse")
    assert result.n_vars == synthetic_adata.n_vars - 1
    assert (result[:, names[10]].X != expected).nnz == 0


def test_drop_keeps_the_first_of_duplicate_cells(synthetic_adata):
    doubled = _with_duplicate_cells(synthetic_adata)
    result = dedupe(doubled, cells="drop")
    assert result.n_obs == synthetic_adata.n_obs and result.obs_names.is_unique
    assert (result.X != synthetic_adata.X).nnz == 0
    assert result.uns[keys.DEDUPE_REPORT]["n_duplicate_cells"] == 4


def test_make_unique_cells_and_error_mode(synthetic_adata):
    doubled = _with_duplicate_cells(synthetic_adata)
    result = dedupe(doubled, cells="make_unique")
    assert result.obs_names.is_unique and result.n_obs == doubled.n_obs
    with pytest.raises(NeurofmError, match=r"4 duplicate cell IDs.*set cells='drop'"):
        dedupe(doubled, cells="error")


def test_cells_judged_on_a_barcode_column(synthetic_adata):
    result = dedupe(synthetic_adata, cells="drop", cell_column=keys.CELL_BARCODE)
    assert result.n_obs == synthetic_adata.n_obs - 3
    assert result.obs[keys.CELL_BARCODE].is_unique


def test_none_modes_change_nothing_and_input_is_untouched(synthetic_adata):
    original = synthetic_adata.copy()
    result = dedupe(synthetic_adata, genes="none", cells="none", gene_column=keys.GENE_SYMBOL)
    assert result.shape == original.shape and (result.X != original.X).nnz == 0
    dedupe(synthetic_adata, genes="collapse", gene_column=keys.GENE_SYMBOL)
    assert synthetic_adata.shape == original.shape and keys.DEDUPE_REPORT not in synthetic_adata.uns
    assert (synthetic_adata.var[keys.GENE_SYMBOL] == original.var[keys.GENE_SYMBOL]).all()


def test_collapse_works_on_dense_x(synthetic_adata):
    synthetic_adata.X = synthetic_adata.X.toarray()
    result = dedupe(synthetic_adata, genes="collapse", gene_column=keys.GENE_SYMBOL)
    assert sp.issparse(result.X) and result.X.sum() == synthetic_adata.X.sum()


def test_report_is_h5ad_serialisable(tmp_path, synthetic_adata):
    result = dedupe(synthetic_adata, genes="collapse", gene_column=keys.GENE_SYMBOL)
    result.write_h5ad(tmp_path / "d.h5ad")
    assert ad.read_h5ad(tmp_path / "d.h5ad").uns[keys.DEDUPE_REPORT]["n_duplicate_genes"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"genes": "sum"}, "genes='sum' is not a dedupe mode"),
        ({"cells": "first"}, "cells='first' is not a dedupe mode"),
        ({"gene_column": "symbol"}, "var has no column 'symbol'"),
        ({"cell_column": "barcode"}, "obs has no column 'barcode'"),
    ],
)
def test_bad_arguments(synthetic_adata, kwargs, message):
    with pytest.raises(NeurofmError, match=message):
        dedupe(synthetic_adata, **kwargs)
