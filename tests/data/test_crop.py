import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from neurofm import keys
from neurofm.data.crop import crop, sparsity_report, sparsity_summary
from neurofm.errors import NeurofmError


def test_crop_sizes_indices_and_uns(synthetic_adata):
    result = crop(synthetic_adata, n_cells=300, n_genes=150, seed=1)
    assert result.shape == (300, 150)
    cells = result.uns[keys.CROP_INDICES]["cell_indices"]
    genes = result.uns[keys.CROP_INDICES]["gene_indices"]
    assert np.all(np.diff(cells) > 0) and np.all(np.diff(genes) > 0)  # sorted, no replacement
    assert list(result.obs_names) == list(synthetic_adata.obs_names[cells])
    assert list(result.var_names) == list(synthetic_adata.var_names[genes])
    assert (result.X != synthetic_adata.X[cells][:, genes]).nnz == 0
    params = result.uns[keys.CROP_PARAMS]
    assert params["n_cells"] == 300 and params["seed"] == 1 and params["min_detection_used"] == 0.05
    summary = result.uns[keys.SPARSITY_SUMMARY]
    assert list(summary["before"]["shape"]) == [1200, 600] and list(summary["after"]["shape"]) == [300, 150]


def test_crop_is_deterministic_for_a_seed(synthetic_adata):
    first = crop(synthetic_adata, n_cells=200, n_genes=100, seed=5)
    second = crop(synthetic_adata, n_cells=200, n_genes=100, seed=5)
    other = crop(synthetic_adata, n_cells=200, n_genes=100, seed=6)
    assert list(first.obs_names) == list(second.obs_names) and list(first.var_names) == list(second.var_names)
    assert list(first.obs_names) != list(other.obs_names)


def test_cells_are_sampled_proportionally_across_depth_strata(synthetic_adata):
    detected = np.diff(synthetic_adata.X.indptr)
    edges = np.quantile(detected, [0.25, 0.5, 0.75])
    result = crop(synthetic_adata, n_cells=400, n_genes=None, n_strata=4, seed=0)
    chosen = detected[result.uns[keys.CROP_INDICES]["cell_indices"]]
    per_stratum = np.bincount(np.searchsorted(edges, chosen, side="right"), minlength=4)
    assert np.all(np.abs(per_stratum - 100) <= 6)  # ties at quantile edges move a few cells


def test_gene_weights_favour_detected_variable_genes(synthetic_adata):
    detection = np.asarray((synthetic_adata.X > 0).mean(axis=0)).ravel()
    result = crop(synthetic_adata, n_genes=60, alpha=2.0, beta=1.0, seed=0)
    chosen = detection[result.uns[keys.CROP_INDICES]["gene_indices"]]
    assert np.median(chosen) > np.median(detection[detection >= 0.05])


def test_backoff_lowers_the_threshold_with_a_warning(synthetic_adata, caplog):
    detection = np.asarray((synthetic_adata.X > 0).mean(axis=0)).ravel()
    strict = 0.9
    assert (detection >= strict).sum() < 100
    with caplog.at_level(logging.WARNING):
        result = crop(synthetic_adata, n_genes=100, min_detection=strict, detection_backoff=0.5, seed=0)
    assert result.n_vars == 100
    assert "lowering min_detection to 0.45" in caplog.text
    used = result.uns[keys.CROP_PARAMS]["min_detection_used"]
    assert used < strict and (detection[result.uns[keys.CROP_INDICES]["gene_indices"]] >= used).all()


def test_more_genes_than_pass_keeps_all_candidates_with_a_warning(synthetic_adata, caplog):
    with caplog.at_level(logging.WARNING):
        result = crop(synthetic_adata, n_genes=5000, seed=0)
    assert result.n_vars == synthetic_adata.n_vars
    assert "only 600 genes pass the detection filter" in caplog.text


def test_more_cells_than_exist_is_clamped_with_a_warning(synthetic_adata, caplog):
    with caplog.at_level(logging.WARNING):
        result = crop(synthetic_adata, n_cells=10_000, n_genes=50, seed=0)
    assert result.n_obs == synthetic_adata.n_obs
    assert "asked for 10000 cells but only 1200 exist" in caplog.text


def test_all_zero_genes_and_cells_are_dropped(synthetic_adata):
    matrix = synthetic_adata.X.tolil()
    matrix[:, 7] = 0  # a gene never detected
    matrix[3, :] = 0  # a cell with no counts
    synthetic_adata.X = matrix.tocsr()
    synthetic_adata.X.eliminate_zeros()
    result = crop(synthetic_adata, n_genes=None, drop_all_zero=True, min_detection=0.0, seed=0)
    assert synthetic_adata.var_names[7] not in result.var_names
    assert synthetic_adata.obs_names[3] not in result.obs_names
    kept = crop(synthetic_adata, n_genes=None, drop_all_zero=False, min_detection=0.0, seed=0)
    assert kept.shape == synthetic_adata.shape


def test_input_is_not_modified(synthetic_adata):
    original = synthetic_adata.copy()
    crop(synthetic_adata, n_cells=100, n_genes=50, seed=0)
    assert (synthetic_adata.X != original.X).nnz == 0 and set(synthetic_adata.uns) == set(original.uns)


def test_result_round_trips_through_h5ad(tmp_path, synthetic_adata):
    result = crop(synthetic_adata, n_cells=100, n_genes=50, seed=0)
    result.write_h5ad(tmp_path / "crop.h5ad")
    again = ad.read_h5ad(tmp_path / "crop.h5ad")
    np.testing.assert_array_equal(
        again.uns[keys.CROP_INDICES]["gene_indices"], result.uns[keys.CROP_INDICES]["gene_indices"]
    )
    assert again.uns[keys.CROP_PARAMS]["n_genes"] == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_cells": 0}, "n_cells=0 must be a positive integer"),
        ({"n_genes": -5}, "n_genes=-5 must be a positive integer"),
        ({"n_genes": 2.5}, "must be a positive integer"),
        ({"min_detection": 1.5}, "min_detection=1.5 must lie in"),
        ({"detection_backoff": 1.0}, "detection_backoff=1.0"),
        ({"n_strata": 0}, "n_strata=0"),
    ],
)
def test_bad_parameters(synthetic_adata, kwargs, message):
    with pytest.raises(NeurofmError, match=message):
        crop(synthetic_adata, **kwargs)


def test_empty_input_and_empty_result_are_errors(synthetic_adata):
    with pytest.raises(NeurofmError, match="empty dataset"):
        crop(synthetic_adata[:0].copy(), n_genes=10)
    zeros = synthetic_adata.copy()
    zeros.X = zeros.X * 0
    zeros.X.eliminate_zeros()
    with pytest.raises(NeurofmError, match="no gene is detected"):
        crop(zeros, n_genes=10)


def test_sparsity_report_table_and_csv(tmp_path, synthetic_adata):
    result = crop(synthetic_adata, n_cells=100, n_genes=50, seed=0)
    table = sparsity_report(synthetic_adata, result, path=tmp_path / "sparsity.csv")
    assert list(table["stage"]) == ["before", "after"]
    assert list(table["n_cells"]) == [1200, 100] and list(table["n_genes"]) == [600, 50]
    from_uns = sparsity_report(*[result.uns[keys.SPARSITY_SUMMARY][s] for s in ("before", "after")])
    pd.testing.assert_frame_equal(table, from_uns)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sparsity.csv"), table, check_dtype=False)
    assert 0 < sparsity_summary(result)["nonzero_fraction"] <= 1


def test_without_a_crop_all_zero_cells_and_genes_are_dropped_with_a_record(synthetic_adata, caplog):
    import scipy.sparse as sp

    from neurofm import keys
    from neurofm.data.crop import drop_empty

    assert drop_empty(synthetic_adata) is synthetic_adata  # nothing empty: passed through
    counts = synthetic_adata.X.toarray()
    counts[[2, 5], :] = 0
    counts[:, [0, 9, 11]] = 0
    adata = synthetic_adata.copy()
    adata.X = sp.csr_matrix(counts)
    with caplog.at_level("WARNING"):
        kept = drop_empty(adata)
    assert kept.shape == (adata.n_obs - 2, adata.n_vars - 3)
    assert kept.uns[keys.DROPPED_EMPTY]["n_cells"] == 2 and kept.uns[keys.DROPPED_EMPTY]["n_genes"] == 3
    assert kept.uns[keys.DROPPED_EMPTY]["genes"] == list(adata.var_names[[0, 9, 11]])
    assert "2 all-zero cells and 3 all-zero genes" in caplog.text
    assert adata.shape == synthetic_adata.shape  # the input is not modified


def test_crop_with_report_samples_or_passes_the_data_through(synthetic_adata):
    from neurofm.data.crop import crop_with_report

    cropped, report = crop_with_report(synthetic_adata, n_cells=100, n_genes=50, seed=1)
    assert cropped.shape == (100, 50) and report.equals(sparsity_report(synthetic_adata, cropped))
    assert np.array_equal(
        cropped.X.toarray(), crop(synthetic_adata, n_cells=100, n_genes=50, seed=1).X.toarray()
    )
    empty = synthetic_adata.copy()
    matrix = empty.X.tolil()
    matrix[0, :] = 0
    empty.X = matrix.tocsr()
    kept, report = crop_with_report(empty, n_cells=None, n_genes=None, drop_all_zero=True)
    assert kept.n_obs == empty.n_obs - 1 and "dropped_empty" in kept.uns
    assert report.equals(sparsity_report(empty, kept))
    same, _ = crop_with_report(empty, n_cells=None, n_genes=None, drop_all_zero=False)
    assert same is empty  # nothing sampled, nothing dropped
