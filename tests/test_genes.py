"""Gene matching: Ensembl versions, case, symbols, overlap threshold; unobserved genes left out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofm.embedding import embed, embed_bins, embed_matrix, feature_table, random_encoder_like
from neurofm.errors import NeurofmError
from neurofm.genes import match_adata, match_genes, normalise_gene_name
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_tokenizer import synthetic_counts

IDS = np.array(["ENSG00000000001", "ENSG00000000002", "ENSG00000000003", "ENSG00000000004"])
SYMBOLS = np.array(["GAD1", "SLC17A7", "SST", "PVALB"])


def test_names_are_compared_without_version_and_case():
    assert normalise_gene_name("ENSG00000141510.17") == "ENSG00000141510"
    assert normalise_gene_name("ENSMUSG00000070880.3") == "ENSMUSG00000070880"
    assert normalise_gene_name(" Gad1 ") == "GAD1"
    assert normalise_gene_name("MT-CO1.2") == "MT-CO1.2"  # only Ensembl IDs lose a suffix


def test_versioned_ids_match_ids():
    match = match_genes(IDS, np.array(["ENSG00000000004.2", "ENSG00000000001.9", "other"]), min_overlap=0.5)
    assert list(match.source) == [1, -1, -1, 0] and match.model_key == "gene_ids" and match.n_found == 2


def test_mouse_symbols_match_the_model_symbols_case_insensitively():
    data = np.array(["Pvalb", "Gad1", "Sst", "Vip"])
    match = match_genes(IDS, data, model_gene_symbols=SYMBOLS, min_overlap=0.5)
    assert match.model_key == "gene_symbols"
    assert list(match.source) == [1, -1, 2, 0]
    assert match.record()["n_found"] == 3 and match.record()["n_data_genes"] == 4


def test_too_small_an_overlap_is_one_line_naming_the_fix():
    with pytest.raises(NeurofmError, match="only 1 of the model's 4 genes") as caught:
        match_genes(IDS, np.array(["GAD1", "X", "Y"]), model_gene_symbols=SYMBOLS, min_overlap=0.5)
    assert "--gene-col" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(NeurofmError, match="only 0"):
        match_genes(IDS, np.array(["A", "B"]), min_overlap=0.0)
    assert match_genes(IDS, np.array(["GAD1"]), model_gene_symbols=SYMBOLS, min_overlap=0.2).n_found == 1


def test_a_missing_gene_column_is_refused():
    adata = synthetic_counts(n_cells=20, n_genes=10)
    with pytest.raises(NeurofmError, match="gene column 'symbol' is not in"):
        match_adata(adata, np.asarray(adata.var_names), gene_col="symbol")


@pytest.fixture()
def trained():
    adata = synthetic_counts(n_cells=90, n_genes=40)
    adata.var["gene_symbol"] = [f"Sym{i}" for i in range(40)]
    tokenizer = ExpressionTokenizer().fit(adata)
    config = ModelConfig(n_genes=40, n_bins=20, d_model=16, n_heads=2, n_layers=1, ffn_dim=32, max_tokens=8)
    return random_encoder_like(config, seed=1), tokenizer, adata


def test_unobserved_genes_are_left_out_of_library_size_and_pooling(trained):
    """Data holding a subset S of the model's genes (named by symbol) embeds as the pooled mean over S of
    the cells' S-genes binned with the library size over S — by definition, no zero filled in."""
    model, tokenizer, adata = trained
    subset = np.sort(np.random.default_rng(0).choice(40, size=25, replace=False))
    data = adata[:, subset].copy()
    data.var_names = [name.upper() for name in data.var["gene_symbol"]]  # named by symbol now
    embed(data, model, tokenizer, progress=False)
    # the definition: zero the other genes' counts (library = sum over S), bin, pool over S only
    reference = adata.copy()
    counts = reference.X.toarray() if hasattr(reference.X, "toarray") else np.array(reference.X)
    outside = np.setdiff1d(np.arange(40), subset)
    counts[:, outside] = 0
    reference.X = counts
    bins = torch.from_numpy(tokenizer.transform(reference))
    table = feature_table(model)
    rows = (bins.long() + torch.arange(40) * 21)[:, torch.from_numpy(subset)]
    with torch.no_grad():  # the count head's latent mean of the pooled vector (the default embedding)
        keep = torch.zeros(bins.shape, dtype=torch.bool)
        keep[:, torch.from_numpy(subset)] = True  # the count head reads the observed genes' expression only
        expected = model.embedding_from_cell(table[rows].mean(1), model.expression_features(bins, keep=keep))
        expected = expected.numpy()
    np.testing.assert_allclose(data.obsm["X_neurofm"], expected, atol=1e-5, rtol=0)
    assert data.uns["neurofm"]["gene_match"]["n_found"] == 25
    # zero-fill is a different, worse-defined embedding: it pools the absent genes as bin-0 tokens
    zero = embed(data, model, tokenizer, unobserved="zero", copy=True, progress=False)
    observed = np.zeros(40, dtype=bool)
    observed[subset] = True
    np.testing.assert_allclose(
        zero.obsm["X_neurofm"], embed_bins(model, bins, "mean", table).numpy(), atol=1e-5, rtol=0
    )
    assert not np.allclose(zero.obsm["X_neurofm"], data.obsm["X_neurofm"], atol=1e-3)


def test_full_vocabulary_data_embeds_exactly_as_before(trained):
    model, tokenizer, adata = trained
    embed(adata, model, tokenizer, progress=False)
    np.testing.assert_array_equal(
        adata.obsm["X_neurofm"], embed_matrix(model, tokenizer, adata, device="cpu", progress=False)
    )


def test_matching_through_a_var_column(trained):
    model, tokenizer, adata = trained
    data = adata.copy()
    data.var["ensembl"] = [f"{name}.5" for name in data.var_names]
    data.var_names = [f"cell_gene_{i}" for i in range(40)]
    with pytest.raises(NeurofmError, match="only 0 of the model's 40"):
        embed(data, model, tokenizer, progress=False)
    embed(data, model, tokenizer, gene_col="ensembl", progress=False)
    np.testing.assert_allclose(
        data.obsm["X_neurofm"], embed_matrix(model, tokenizer, adata, device="cpu", progress=False), atol=1e-6
    )
    assert data.uns["neurofm"]["gene_match"]["data_key"] == "var['ensembl']"


def test_a_tokenizer_fit_on_a_cell_store_keeps_the_gene_symbols_for_matching(tmp_path):
    """Models pre-trained through the streaming path must still match data named by symbol."""
    from neurofm.data.store import CellStore, convert_anndata
    from neurofm.stream import fit_tokenizer

    adata = synthetic_counts(n_cells=60, n_genes=20)
    adata.var["gene_symbol"] = [f"Sym{i}" for i in range(20)]
    adata.X = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
    adata.X[:, 4] = 0  # an all-zero gene: kept in a streamed vocabulary (it always falls in one bin)
    convert_anndata(adata, tmp_path / "store")
    tokenizer = fit_tokenizer(CellStore(tmp_path / "store"))
    assert list(tokenizer.gene_symbols) == [f"Sym{i}" for i in range(20)]
    data = adata.copy()
    data.var_names = [name.upper() for name in data.var["gene_symbol"]]
    assert match_adata(data, tokenizer.gene_ids, tokenizer.gene_symbols).n_found == 20
