"""The backed cluster subset (:mod:`neurofm.data.backed`): only the wanted rows read, in bounded pieces."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from neurofm import keys
from neurofm.data import backed
from neurofm.data.backed import subset_by_clusters
from neurofm.data.synthetic import make_synthetic_counts
from neurofm.errors import NeurofmError

# --- subset_by_clusters -----------------------------------------------------------------------------------


def test_subset_keeps_exactly_the_cells_of_the_clusters(atlas_files):
    subset = subset_by_clusters(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, [2523, 210])
    reference = make_synthetic_counts(1200, 600, seed=0)
    reference = reference[reference.obs[keys.CLUSTER_ALIAS].isin([2523, 210])]
    assert list(subset.obs_names) == list(reference.obs_names)
    assert (subset.X != reference.X).nnz == 0
    assert set(subset.obs[keys.SUBTYPE]) == {"cluster_2523", "cluster_210"}
    assert (subset.obs[keys.SUBTYPE].astype(str) == reference.obs[keys.SUBTYPE]).all()
    for column in (keys.REGION, keys.X_COORD, keys.Y_COORD, keys.CLUSTER_ALIAS, keys.CELL_BARCODE):
        assert column in subset.obs
    assert (subset.obs[keys.REGION].astype(str) == reference.obs[keys.REGION].astype(str)).all()
    params = subset.uns[keys.SUBSET_PARAMS]
    assert list(params["cluster_ids"]) == [2523, 210]
    assert params["n_cells_matched"] == subset.n_obs
    assert (
        params["n_cells_per_cluster"] == {"2523": 105, "210": 126}
        or sum(params["n_cells_per_cluster"].values()) == subset.n_obs
    )


def test_subset_result_is_writable_h5ad(tmp_path, atlas_files):
    subset = subset_by_clusters(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, [2523])
    subset.write_h5ad(tmp_path / "subset.h5ad")
    again = ad.read_h5ad(tmp_path / "subset.h5ad")
    assert again.uns[keys.SUBSET_PARAMS]["label_prefix"] == "cluster_"


def test_subset_reads_the_same_from_the_chunked_writer_and_small_chunks(chunked_atlas_files):
    full = ad.read_h5ad(chunked_atlas_files.counts_h5ad)
    metadata = pd.read_csv(chunked_atlas_files.cell_metadata_csv)
    wanted = metadata[keys.CLUSTER_ALIAS].isin([2523, 213]).to_numpy()
    for chunk_size in (1, 7, 10_000):
        subset = subset_by_clusters(
            chunked_atlas_files.counts_h5ad,
            chunked_atlas_files.cell_metadata_csv,
            [2523, 213],
            chunk_size=chunk_size,
        )
        assert (subset.X != full.X[wanted]).nnz == 0
        assert list(subset.obs_names) == list(full.obs_names[wanted])


def test_subset_never_reads_the_whole_matrix(monkeypatch, chunked_atlas_files):
    total = h5py.File(chunked_atlas_files.counts_h5ad, "r")["X/data"].shape[0]
    reads = []
    original = h5py.Dataset.__getitem__

    def recording_getitem(self, selection):
        value = original(self, selection)
        if self.name in ("/X/data", "/X/indices"):
            reads.append(np.asarray(value).size)
        return value

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording_getitem)
    monkeypatch.setattr(ad, "read_h5ad", lambda *a, **k: pytest.fail("subset must not call read_h5ad"))
    subset = subset_by_clusters(
        chunked_atlas_files.counts_h5ad, chunked_atlas_files.cell_metadata_csv, [2523], chunk_size=50
    )
    assert reads and max(reads) < total / 4  # bounded reads: chunk_size rows (plus merged gaps) at a time
    assert sum(reads) / 2 >= subset.X.nnz  # data and indices are read in pairs


def test_subset_accepts_string_digit_ids_and_warns_about_unmatched(atlas_files, caplog):
    subset = subset_by_clusters(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, ["2523", 99999])
    assert set(subset.obs[keys.SUBTYPE]) == {"cluster_2523"}
    assert "[99999] match no cell" in caplog.text


def test_subset_custom_label_prefix(atlas_files):
    subset = subset_by_clusters(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, 210, label_prefix="c")
    assert set(subset.obs[keys.SUBTYPE]) == {"c210"}


def test_subset_cluster_ids_matching_nothing(atlas_files):
    with pytest.raises(NeurofmError, match=r"cluster IDs \[1, 2\] match no cell.*choose IDs from those"):
        subset_by_clusters(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, [1, 2])


@pytest.mark.parametrize("bad_ids", [["cluster_2523"], [2523.5], [], [True]])
def test_subset_wrong_id_type(atlas_files, bad_ids):
    with pytest.raises(NeurofmError, match="cluster"):
        subset_by_clusters(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, bad_ids)


def test_subset_no_overlap_between_metadata_and_obs_names(tmp_path, atlas_files):
    metadata = pd.read_csv(atlas_files.cell_metadata_csv)
    metadata[keys.CELL_LABEL] = "other:" + metadata[keys.CELL_LABEL]
    path = tmp_path / "meta.csv"
    metadata.to_csv(path, index=False)
    with pytest.raises(NeurofmError, match="no obs_name .* appears in metadata column 'cell_label'"):
        subset_by_clusters(atlas_files.counts_h5ad, path, [2523])
    # joining on the barcode column is the classic mistake: also no overlap
    with pytest.raises(NeurofmError, match="set obs_name_column"):
        subset_by_clusters(
            atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, [2523], obs_name_column=keys.CELL_BARCODE
        )


def test_subset_metadata_missing_the_named_columns(atlas_files):
    with pytest.raises(NeurofmError, match=r"lacks column\(s\) \['cluster'\]"):
        subset_by_clusters(
            atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, [2523], cluster_column="cluster"
        )


def test_subset_bad_h5ad_inputs(tmp_path, atlas_files):
    with pytest.raises(NeurofmError, match="does not exist"):
        subset_by_clusters(tmp_path / "none.h5ad", atlas_files.cell_metadata_csv, [2523])
    with pytest.raises(NeurofmError, match="not an HDF5"):
        subset_by_clusters(atlas_files.cluster_csv, atlas_files.cell_metadata_csv, [2523])


def test_subset_refuses_csc_with_a_fix(tmp_path, synthetic_adata, atlas_files):
    synthetic_adata.X = synthetic_adata.X.tocsc()
    path = tmp_path / "csc.h5ad"
    ad.AnnData(X=synthetic_adata.X, obs=synthetic_adata.obs[[]], var=synthetic_adata.var).write_h5ad(path)
    with pytest.raises(NeurofmError, match="needs CSR"):
        subset_by_clusters(path, atlas_files.cell_metadata_csv, [2523])


def test_subset_reads_dense_x(tmp_path, synthetic_adata, atlas_files):
    path = tmp_path / "dense.h5ad"
    ad.AnnData(
        X=synthetic_adata.X.toarray(), obs=synthetic_adata.obs[[]], var=synthetic_adata.var
    ).write_h5ad(path)
    subset = subset_by_clusters(path, atlas_files.cell_metadata_csv, [210], chunk_size=16)
    wanted = (synthetic_adata.obs[keys.CLUSTER_ALIAS] == 210).to_numpy()
    assert (subset.X != synthetic_adata.X[wanted]).nnz == 0


def test_subset_never_modifies_its_inputs(file_sha256, atlas_files):
    hashes = [file_sha256(atlas_files.counts_h5ad), file_sha256(atlas_files.cell_metadata_csv)]
    subset_by_clusters(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, [2523, 210])
    assert [file_sha256(atlas_files.counts_h5ad), file_sha256(atlas_files.cell_metadata_csv)] == hashes


def test_read_csr_rows_merges_nearby_rows_into_few_reads(chunked_atlas_files):
    with h5py.File(chunked_atlas_files.counts_h5ad, "r") as handle:
        rows = np.arange(0, 2000, 3)
        merged = backed.read_csr_rows(handle["X"], rows, max_gap=1 << 20)
        separate = backed.read_csr_rows(handle["X"], rows, max_gap=0)
        capped = backed.read_csr_rows(handle["X"], rows, max_gap=1 << 20, max_span=5000)
        few_rows = backed.read_csr_rows(handle["X"], rows, max_rows_per_read=3)
        full = ad.io.read_elem(handle["X"])
    for result in (merged, separate, capped, few_rows):
        assert (result != full[rows]).nnz == 0


def test_consecutive_rows_are_still_read_in_bounded_pieces(monkeypatch, chunked_atlas_files):
    reads = []
    original = h5py.Dataset.__getitem__

    def recording_getitem(self, selection):
        value = original(self, selection)
        if self.name == "/X/data":
            reads.append(np.asarray(value).size)
        return value

    with h5py.File(chunked_atlas_files.counts_h5ad, "r") as handle:
        total = handle["X/data"].shape[0]
        full = ad.io.read_elem(handle["X"])
        monkeypatch.setattr(h5py.Dataset, "__getitem__", recording_getitem)
        every_row = backed.read_csr_rows(handle["X"], np.arange(2000), max_rows_per_read=100)
    assert (every_row != full).nnz == 0
    assert len(reads) == 20 and max(reads) < total / 10
