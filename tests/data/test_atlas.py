import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from neurofm import keys
from neurofm.data.atlas import load_counts, read_cell_metadata
from neurofm.errors import NeurofmError

# --- load_counts ------------------------------------------------------------------------------------------


def test_load_counts_reads_x_and_records_the_source(atlas_files):
    adata = load_counts(atlas_files.counts_h5ad)
    assert adata.shape == (1200, 600) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert adata.uns[keys.LOAD_PARAMS]["source"] == "X"


def test_load_counts_prefers_the_counts_layer(tmp_path, synthetic_adata):
    raw = synthetic_adata.X.copy()
    synthetic_adata.layers[keys.COUNTS_LAYER] = raw
    synthetic_adata.X = sp.csr_matrix(np.log1p(raw.toarray()))  # X log-normalised, counts in the layer
    path = tmp_path / "layered.h5ad"
    synthetic_adata.write_h5ad(path)
    adata = load_counts(path)
    assert (adata.X != raw).nnz == 0
    assert adata.uns[keys.LOAD_PARAMS]["source"] == "layers['counts']"
    assert len(adata.layers) == 0


def test_load_counts_rejects_log_normalised_x_and_names_the_fix(tmp_path, synthetic_adata):
    synthetic_adata.X = synthetic_adata.X.log1p()
    path = tmp_path / "log.h5ad"
    synthetic_adata.write_h5ad(path)
    with pytest.raises(NeurofmError, match=r"non-integer values \(looks log-normalised.*pass raw UMI counts"):
        load_counts(path)


@pytest.mark.parametrize(
    ("value", "message"), [(-1.0, "negative values"), (np.nan, "NaN/infinite"), (np.inf, "NaN/infinite")]
)
def test_load_counts_rejects_non_count_values(tmp_path, synthetic_adata, value, message):
    synthetic_adata.X.data[5] = value
    path = tmp_path / "bad.h5ad"
    synthetic_adata.write_h5ad(path)
    with pytest.raises(NeurofmError, match=message):
        load_counts(path)


def test_load_counts_missing_layer_lists_the_layers(atlas_files):
    with pytest.raises(NeurofmError, match=r"no layer 'spliced' \(layers: none\)"):
        load_counts(atlas_files.counts_h5ad, layer="spliced")


def test_load_counts_missing_or_non_h5ad_file(tmp_path, atlas_files):
    with pytest.raises(NeurofmError, match="does not exist"):
        load_counts(tmp_path / "absent.h5ad")
    with pytest.raises(NeurofmError, match="not an HDF5"):
        load_counts(atlas_files.cell_metadata_csv)
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(atlas_files.counts_h5ad.read_bytes()[:5000])
    with pytest.raises(NeurofmError, match="truncated"):
        load_counts(truncated)


def test_load_counts_never_modifies_the_input(file_sha256, atlas_files):
    before = file_sha256(atlas_files.counts_h5ad)
    load_counts(atlas_files.counts_h5ad)
    assert file_sha256(atlas_files.counts_h5ad) == before


# --- read_cell_metadata -----------------------------------------------------------------------------------


def test_read_cell_metadata_types(atlas_files):
    table = read_cell_metadata(atlas_files.cell_metadata_csv)
    assert pd.api.types.is_integer_dtype(table[keys.CLUSTER_ALIAS])
    assert pd.api.types.is_float_dtype(table[keys.X_COORD])
    assert table[keys.CELL_BARCODE].map(type).eq(str).all()


def test_read_cell_metadata_missing_column_lists_the_columns(atlas_files):
    with pytest.raises(NeurofmError, match=r"lacks column\(s\) \['cell_id'\] \(columns: \['cell_label'"):
        read_cell_metadata(atlas_files.cell_metadata_csv, required_columns=["cell_id"])


def test_read_cell_metadata_wrong_types(tmp_path):
    path = tmp_path / "meta.csv"
    pd.DataFrame({"cell_label": ["a", "b"], "cluster_alias": ["2523", "cluster_210"]}).to_csv(
        path, index=False
    )
    with pytest.raises(NeurofmError, match="must hold integer cluster IDs.*'cluster_210'"):
        read_cell_metadata(path)
    pd.DataFrame({"cell_label": ["a"], "cluster_alias": [1], "x": ["left"]}).to_csv(path, index=False)
    with pytest.raises(NeurofmError, match="'x' must be numeric"):
        read_cell_metadata(path)


def test_read_cell_metadata_missing_file(tmp_path):
    with pytest.raises(NeurofmError, match="does not exist"):
        read_cell_metadata(tmp_path / "nope.csv")
