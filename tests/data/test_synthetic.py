import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from neurofm import keys
from neurofm.data.synthetic import cluster_classes, make_synthetic_counts, write_synthetic_atlas
from neurofm.errors import NeurofmError


def test_counts_are_csr_float32_integers_with_atlas_like_names(synthetic_adata):
    x = synthetic_adata.X
    assert x.format == "csr" and x.dtype == np.float32
    assert np.all(x.data == np.round(x.data)) and x.data.min() > 0
    assert synthetic_adata.obs_names.is_unique and synthetic_adata.var_names.is_unique
    assert synthetic_adata.obs_names.str.match(r"^10X\d+_\d:[ACGT]{16}$").all()
    assert synthetic_adata.var_names.str.match(r"^ENSG\d{11}$").all()
    assert synthetic_adata.var.index.name == keys.GENE_ID_INDEX


def test_obs_and_var_columns_match_the_atlas(synthetic_adata):
    for column in (
        keys.CELL_BARCODE,
        keys.LIBRARY_LABEL,
        keys.CLUSTER_ALIAS,
        keys.REGION,
        keys.X_COORD,
        keys.Y_COORD,
        keys.SUBTYPE,
        keys.CELL_CLASS,
    ):
        assert column in synthetic_adata.obs
    obs = synthetic_adata.obs
    assert (obs[keys.SUBTYPE] == "cluster_" + obs[keys.CLUSTER_ALIAS].astype(str)).all()
    assert set(obs[keys.CELL_CLASS]) == {"excitatory", "inhibitory"}
    assert {2523, 210} <= set(obs[keys.CLUSTER_ALIAS])
    assert obs[keys.REGION].nunique() >= 3
    symbols = set(synthetic_adata.var[keys.GENE_SYMBOL])
    assert {"SLC17A7", "SATB2", "GAD1", "GAD2", "LHX6", "SST", "PVALB", "VIP"} <= symbols


def test_has_a_few_duplicate_symbols_and_barcodes(synthetic_adata):
    assert synthetic_adata.var[keys.GENE_SYMBOL].duplicated().sum() == 3
    assert synthetic_adata.obs[keys.CELL_BARCODE].duplicated().sum() == 3


def test_markers_follow_the_cell_class(synthetic_adata):
    cp10k = synthetic_adata.X.multiply(1e4 / synthetic_adata.X.sum(axis=1)).tocsc()
    symbol = synthetic_adata.var[keys.GENE_SYMBOL].to_numpy()
    excitatory = (synthetic_adata.obs[keys.CELL_CLASS] == "excitatory").to_numpy()

    def mean(gene, rows):
        return cp10k[rows][:, np.flatnonzero(symbol == gene)].mean()

    for gene in ("SLC17A7", "SATB2"):
        assert mean(gene, excitatory) > 10 * mean(gene, ~excitatory)
    for gene in ("GAD1", "GAD2"):
        assert mean(gene, ~excitatory) > 10 * mean(gene, excitatory)


def test_depth_varies_and_counts_are_overdispersed(synthetic_adata):
    library = np.asarray(synthetic_adata.X.sum(axis=1)).ravel()
    assert library.max() / library.min() > 5
    dense = synthetic_adata.X.toarray()
    one_cluster = (synthetic_adata.obs[keys.CLUSTER_ALIAS] == 2523).to_numpy()
    normalised = dense[one_cluster] / library[one_cluster, None] * np.median(library[one_cluster])
    mean, var = normalised.mean(0), normalised.var(0)
    expressed = mean > 1
    assert np.median(var[expressed] / mean[expressed]) > 1.5  # Poisson would give ≈ 1


def test_class_is_learnable_from_log_normalised_pca(synthetic_adata):
    sc.pp.normalize_total(synthetic_adata, target_sum=1e4)
    sc.pp.log1p(synthetic_adata)
    sc.pp.pca(synthetic_adata, n_comps=10, random_state=0)
    scores = cross_val_score(
        LogisticRegression(max_iter=500),
        synthetic_adata.obsm["X_pca"],
        synthetic_adata.obs[keys.CELL_CLASS],
        cv=5,
    )
    assert scores.mean() > 0.98


def test_same_seed_same_data_other_seed_other_data():
    first, second = make_synthetic_counts(300, 200, seed=7), make_synthetic_counts(300, 200, seed=7)
    assert (first.X != second.X).nnz == 0
    pd.testing.assert_frame_equal(first.obs, second.obs)
    pd.testing.assert_frame_equal(first.var, second.var)
    other = make_synthetic_counts(300, 200, seed=8)
    assert (first.X != other.X).nnz > 0


def test_too_few_genes_is_a_clear_error():
    with pytest.raises(NeurofmError, match="n_genes"):
        make_synthetic_counts(n_cells=200, n_genes=20)


def test_atlas_files_have_the_allen_columns(atlas_files):
    metadata = pd.read_csv(atlas_files.cell_metadata_csv)
    assert {
        keys.CELL_LABEL,
        keys.CELL_BARCODE,
        keys.LIBRARY_LABEL,
        keys.CLUSTER_ALIAS,
        keys.X_COORD,
        keys.Y_COORD,
        keys.REGION,
    } <= set(metadata.columns)
    clusters = pd.read_csv(atlas_files.cluster_csv)
    assert list(clusters.columns) == [keys.CLUSTER_ALIAS, keys.CLUSTER_LABEL, keys.CLUSTER_N_CELLS]
    assert clusters[keys.CLUSTER_N_CELLS].sum() == len(metadata)
    terms = pd.read_csv(atlas_files.cluster_annotation_term_csv)
    assert {keys.CLUSTER_LABEL, keys.TERM_NAME, keys.TERM_DESCRIPTION, keys.TERM_SET_LABEL} <= set(
        terms.columns
    )
    cluster_terms = terms[terms[keys.CLUSTER_LABEL].isin(clusters[keys.CLUSTER_LABEL])]
    assert len(cluster_terms) == len(clusters)
    assert cluster_terms[keys.TERM_DESCRIPTION].str.match(r"^.+ \(subcluster \d+\)$").all()


def test_atlas_h5ad_holds_only_what_the_raw_allen_file_holds(atlas_files):
    counts = ad.read_h5ad(atlas_files.counts_h5ad)
    assert list(counts.obs.columns) == [keys.CELL_BARCODE, keys.LIBRARY_LABEL]
    assert list(counts.var.columns) == [keys.GENE_SYMBOL]
    metadata = pd.read_csv(atlas_files.cell_metadata_csv)
    assert list(counts.obs_names) == list(metadata[keys.CELL_LABEL])
    # the small writer stores exactly make_synthetic_counts' matrix
    assert (counts.X != make_synthetic_counts(1200, 600, seed=0).X).nnz == 0


def test_chunked_writer_produces_a_valid_consistent_atlas(chunked_atlas_files):
    counts = ad.read_h5ad(chunked_atlas_files.counts_h5ad)
    metadata = pd.read_csv(chunked_atlas_files.cell_metadata_csv)
    assert counts.shape == (2000, 500) and counts.X.format == "csr"
    assert list(counts.obs_names) == list(metadata[keys.CELL_LABEL])
    assert np.all(counts.X.data == np.round(counts.X.data))
    assert counts.X.getnnz(axis=1).min() > 0  # every cell has counts
    # class markers survive the sparse sampler
    symbol = counts.var[keys.GENE_SYMBOL].to_numpy()
    gad1 = counts.X[:, np.flatnonzero(symbol == "GAD1")].toarray().ravel()
    inhibitory = metadata[keys.CLUSTER_ALIAS].to_numpy() < 1000
    assert gad1[inhibitory].mean() > 5 * gad1[~inhibitory].mean()


def test_rewriting_an_atlas_is_deterministic(tmp_path):
    first = write_synthetic_atlas(tmp_path / "a", n_cells=300, n_genes=200, seed=1)
    second = write_synthetic_atlas(tmp_path / "b", n_cells=300, n_genes=200, seed=1)
    for name in ("cell_metadata_csv", "cluster_csv", "cluster_annotation_term_csv"):
        assert getattr(first, name).read_bytes() == getattr(second, name).read_bytes()
    assert (ad.read_h5ad(first.counts_h5ad).X != ad.read_h5ad(second.counts_h5ad).X).nnz == 0
    assert not list((tmp_path / "a").glob("*.tmp"))  # nothing half-written left behind


def test_cluster_classes_matches_the_generated_labels(synthetic_adata):
    mapping = cluster_classes()
    pairs = synthetic_adata.obs[[keys.SUBTYPE, keys.CELL_CLASS]].drop_duplicates()
    assert dict(zip(pairs[keys.SUBTYPE], pairs[keys.CELL_CLASS], strict=True)) == mapping
    assert mapping["cluster_2523"] == "excitatory" and mapping["cluster_210"] == "inhibitory"
