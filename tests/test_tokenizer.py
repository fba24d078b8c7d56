"""Tokenizer: fit on training cells only, exact re-application after save/load, input validation."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from neurofm.errors import NeurofmError
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig


def synthetic_counts(n_cells: int = 80, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """Two cell types with different Poisson means; integer counts in a float32 CSR matrix."""
    rng = np.random.default_rng(seed)
    cell_type = np.arange(n_cells) % 2
    means = rng.gamma(1.0, 2.0, size=(2, n_genes))
    depth = rng.lognormal(0, 0.3, size=(n_cells, 1))
    counts = rng.poisson(means[cell_type] * depth).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.var_names = [f"ENSG{i:011d}" for i in range(n_genes)]
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.obs["subtype"] = np.where(cell_type == 0, "cluster_2523", "cluster_210")
    return adata


def test_quantile_binning_matches_the_original_per_gene_loop():
    adata = synthetic_counts()
    train = np.arange(60)
    bins = ExpressionTokenizer().fit(adata, train).transform(adata)
    counts = adata.X.toarray()
    values = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    for gene in range(adata.n_vars):  # the original script's loop, as the reference
        edges = np.unique(np.quantile(values[train, gene], np.linspace(0, 1, 21)))
        expected = np.clip(np.searchsorted(edges, values[:, gene], side="right") - 1, 0, 19)
        assert np.array_equal(bins[:, gene], expected)
    assert bins.min() >= 0 and bins.max() <= 19


def test_edges_depend_on_the_training_cells_only():
    adata = synthetic_counts()
    train = np.arange(60)
    first = ExpressionTokenizer().fit(adata, train)
    changed = adata.copy()
    changed.X = changed.X.toarray()
    changed.X[60:] *= 7  # only validation cells change
    second = ExpressionTokenizer().fit(changed, train)
    assert np.array_equal(first.bin_edges, second.bin_edges)


def test_nonzero_scheme_puts_zeros_alone_in_bin_zero():
    adata = synthetic_counts()
    bins = ExpressionTokenizer(TokenizerConfig(binning="quantile_nonzero")).fit(adata).transform(adata)
    zero = adata.X.toarray() == 0
    assert np.all(bins[zero] == 0) and np.all(bins[~zero] >= 1)


def test_save_load_reapplies_identically_without_pickle(tmp_path):
    adata = synthetic_counts()
    tokenizer = ExpressionTokenizer(TokenizerConfig(n_bins=10)).fit(adata, np.arange(50))
    tokenizer.save(tmp_path)
    loaded = ExpressionTokenizer.load(tmp_path)
    assert loaded.config == tokenizer.config
    assert np.array_equal(loaded.transform(adata), tokenizer.transform(adata))
    with np.load(tmp_path / "tokenizer_edges.npz", allow_pickle=False) as archive:
        assert archive["bin_edges"].dtype == np.float64
    assert json.loads((tmp_path / "tokenizer.json").read_text())["gene_ids"] == list(adata.var_names)


def test_genes_are_matched_by_id_and_mismatches_refused():
    adata = synthetic_counts()
    tokenizer = ExpressionTokenizer().fit(adata)
    shuffled = adata[:, adata.var_names[::-1]].copy()
    assert np.array_equal(tokenizer.transform(shuffled), tokenizer.transform(adata))
    missing = adata[:, adata.var_names[:-3]].copy()
    with pytest.raises(NeurofmError, match="3 missing"):
        tokenizer.transform(missing)
    filled = tokenizer.transform(missing, missing_genes="zero")
    assert filled.shape == (adata.n_obs, adata.n_vars)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda x: x.__setitem__((0, 0), np.nan), "NaN"),
        (lambda x: x.__setitem__((0, 0), -1.0), "negative"),
        (lambda x: np.log1p(x, out=x), "not integers"),
    ],
    ids=["nan", "negative", "log-normalised"],
)
def test_bad_counts_are_refused(corrupt, message):
    adata = synthetic_counts()
    dense = adata.X.toarray()
    corrupt(dense)
    adata.X = dense
    with pytest.raises(NeurofmError, match=message):
        ExpressionTokenizer().fit(adata)


def test_too_few_cells_and_constant_genes_in_strict_mode_are_refused():
    with pytest.raises(NeurofmError, match="at least"):
        ExpressionTokenizer().fit(synthetic_counts(n_cells=5))
    flat = synthetic_counts()
    dense = flat.X.toarray()
    dense[:, 3] = 0  # a gene never detected
    flat.X = dense
    with pytest.raises(NeurofmError, match="zero variance"):
        ExpressionTokenizer(TokenizerConfig(constant_genes="error")).fit(flat)
    kept = ExpressionTokenizer(TokenizerConfig(constant_genes="keep")).fit(flat).transform(flat)
    assert np.all(kept[:, 3] == 0)
    flat.X = np.ones(flat.shape, dtype=np.float32)
    with pytest.raises(NeurofmError, match="zero variance"):
        ExpressionTokenizer(TokenizerConfig(constant_genes="keep")).fit(flat)


def test_config_out_of_range_is_refused():
    with pytest.raises(NeurofmError, match="n_bins"):
        TokenizerConfig(n_bins=1).validate()
    with pytest.raises(NeurofmError, match="binning"):
        ExpressionTokenizer(TokenizerConfig(binning="kmeans"))


def test_all_zero_genes_are_dropped_by_default_and_the_data_still_transforms(tmp_path, caplog):
    adata = synthetic_counts()
    dense = adata.X.toarray()
    dense[:, [3, 7]] = 0  # genes never detected (real 10x files have some)
    adata.X = dense
    with caplog.at_level("WARNING"):
        tokenizer = ExpressionTokenizer().fit(adata)
    assert tokenizer.n_genes == adata.n_vars - 2
    assert list(tokenizer.dropped_genes) == list(adata.var_names[[3, 7]])
    assert sum("dropping 2 of" in record.getMessage() for record in caplog.records) == 1
    # the data it was fit on (with the dropped genes) transforms without complaint, dropped genes ignored
    bins = tokenizer.transform(adata)
    kept = np.setdiff1d(np.arange(adata.n_vars), [3, 7])
    assert np.array_equal(bins, tokenizer.transform(adata[:, kept].copy()))
    # the library size is over the kept genes only, the same at fit and transform time
    loaded = ExpressionTokenizer.load(tokenizer.save(tmp_path / "tok"))
    assert list(loaded.dropped_genes) == list(tokenizer.dropped_genes)
    assert np.array_equal(loaded.transform(adata), bins)
    # another gene that the tokenizer never saw is still refused in strict matching
    other = adata.copy()
    other.var_names = [f"new_{name}" if i == 0 else name for i, name in enumerate(other.var_names)]
    with pytest.raises(NeurofmError, match="do not match"):
        tokenizer.transform(other)


def test_gene_symbols_are_kept_with_the_tokenizer(tmp_path):
    adata = synthetic_counts()
    adata.var["gene_symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    tokenizer = ExpressionTokenizer().fit(adata)
    loaded = ExpressionTokenizer.load(tokenizer.save(tmp_path / "tok"))
    assert list(loaded.gene_symbols) == list(adata.var["gene_symbol"])
    plain = synthetic_counts()
    assert (
        ExpressionTokenizer.load(ExpressionTokenizer().fit(plain).save(tmp_path / "p")).gene_symbols is None
    )
