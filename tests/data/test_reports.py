import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from neurofm import keys
from neurofm.data.reports import atlas_cells, atlas_plot, check_ids, summarize
from neurofm.errors import NeurofmError
from neurofm.io import read_h5ad


def test_summarize_in_memory(synthetic_adata):
    summary = summarize(synthetic_adata, value_counts_column=keys.CELL_CLASS)
    assert summary["n_cells"] == 1200 and summary["n_genes"] == 600
    assert keys.SUBTYPE in summary["obs_columns"] and summary["var_columns"] == [keys.GENE_SYMBOL]
    assert sum(summary["value_counts"].values()) == 1200
    assert summary["nonzero_fraction"] == pytest.approx(synthetic_adata.X.nnz / (1200 * 600), abs=1e-6)
    json.dumps(summary)  # JSON-ready


def test_summarize_backed_file_does_not_load_x(atlas_files):
    adata = read_h5ad(atlas_files.counts_h5ad, backed=True)
    summary = summarize(adata, path=atlas_files.counts_h5ad)
    assert adata.isbacked and summary["x_format"] == "csr (on disk)"
    assert summary["file_size_bytes"] == atlas_files.counts_h5ad.stat().st_size
    assert 0 < summary["nonzero_fraction"] < 1
    adata.file.close()


def test_summarize_missing_value_counts_column(synthetic_adata):
    with pytest.raises(NeurofmError, match="obs has no column 'cluster'"):
        summarize(synthetic_adata, value_counts_column="cluster")


def test_check_ids_matches_cell_labels_and_flags_barcodes(atlas_files):
    result = check_ids(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv)
    assert result["best_column"] == keys.CELL_LABEL
    assert result[keys.CELL_LABEL]["n_obs_matched"] == 1200
    assert result[keys.CELL_BARCODE]["n_obs_matched"] == 0
    assert result["n_duplicate_barcodes"] == 3
    json.dumps(result)


def test_check_ids_reports_misses_with_examples(file_sha256, tmp_path, atlas_files):
    metadata = pd.read_csv(atlas_files.cell_metadata_csv)
    metadata = metadata.iloc[10:]  # 10 obs_names are missing from the metadata
    metadata.loc[metadata.index[:2], keys.CELL_LABEL] = ["ghost-1", "ghost-2"]
    path = tmp_path / "meta.csv"
    metadata.to_csv(path, index=False)
    before = file_sha256(atlas_files.counts_h5ad)
    result = check_ids(atlas_files.counts_h5ad, path, n_examples=3)[keys.CELL_LABEL]
    assert result["n_obs_missing_from_metadata"] == 12 and result["n_metadata_missing_from_obs"] == 2
    assert (
        result["examples_metadata_missing"] == ["ghost-1", "ghost-2"]
        and len(result["examples_obs_missing"]) == 3
    )
    assert file_sha256(atlas_files.counts_h5ad) == before


def test_check_ids_bad_inputs(tmp_path, atlas_files):
    with pytest.raises(NeurofmError, match=r"lacks column\(s\) \['label_id'\]"):
        check_ids(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, obs_name_column="label_id")
    with pytest.raises(NeurofmError, match="does not exist"):
        check_ids(tmp_path / "x.h5ad", atlas_files.cell_metadata_csv)


def test_atlas_cells_uses_the_description_before_the_parenthesis(atlas_files):
    cells = atlas_cells(
        atlas_files.cell_metadata_csv, atlas_files.cluster_csv, atlas_files.cluster_annotation_term_csv
    )
    assert len(cells) == 1200
    assert set(cells.loc[cells[keys.CLUSTER_ALIAS] == 210, "base_name"]) == {"MGE interneuron"}
    assert not cells["base_name"].str.contains(r"\(").any()


def test_atlas_plot_writes_a_png(tmp_path, atlas_files):
    out = atlas_plot(
        atlas_files.cell_metadata_csv,
        atlas_files.cluster_csv,
        atlas_files.cluster_annotation_term_csv,
        tmp_path / "atlas.png",
        top_k=3,
        highlight_clusters=[2523, 210],
    )
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 400 and image.shape[1] > 600
    grey = np.all(np.abs(image.astype(int) - 200) <= 3, axis=-1)
    assert grey.sum() > 100  # "other" cells drawn in grey


def test_atlas_plot_highlight_matching_nothing(tmp_path, atlas_files):
    with pytest.raises(NeurofmError, match="highlight clusters"):
        atlas_plot(
            atlas_files.cell_metadata_csv,
            atlas_files.cluster_csv,
            atlas_files.cluster_annotation_term_csv,
            tmp_path / "atlas.png",
            highlight_clusters=[1],
        )
    assert not (tmp_path / "atlas.png").exists()


def test_atlas_plot_missing_columns(tmp_path, atlas_files):
    broken = tmp_path / "cluster.csv"
    pd.read_csv(atlas_files.cluster_csv).drop(columns=[keys.CLUSTER_LABEL]).to_csv(broken, index=False)
    with pytest.raises(NeurofmError, match=r"lacks column\(s\) \['label'\]"):
        atlas_plot(
            atlas_files.cell_metadata_csv, broken, atlas_files.cluster_annotation_term_csv, tmp_path / "a.png"
        )


def test_the_written_summary_leaves_out_a_missing_value_counts_column_with_a_warning(
    synthetic_adata, tmp_path, caplog
):
    from neurofm.data.reports import write_summary

    summary = write_summary(synthetic_adata, tmp_path, value_counts_column=keys.CELL_CLASS)
    assert json.loads((tmp_path / "dataset_summary.json").read_text()) == summary and summary["value_counts"]
    with caplog.at_level("WARNING"):
        summary = write_summary(synthetic_adata, tmp_path / "new", value_counts_column="cluster")
    assert "value_counts" not in summary and "'cluster' is not in obs" in caplog.text
    assert json.loads((tmp_path / "new" / "dataset_summary.json").read_text()) == summary


def test_the_written_id_check_is_the_check(atlas_files, tmp_path):
    from neurofm.data.reports import write_id_check

    result = write_id_check(atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, keys.CELL_LABEL, tmp_path)
    assert result == check_ids(
        atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, obs_name_column=keys.CELL_LABEL
    )
    assert json.loads((tmp_path / "barcode_check.json").read_text()) == json.loads(
        json.dumps(result, default=str)
    )
