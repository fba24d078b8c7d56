import pytest

from neurofm import keys
from neurofm.data.region import filter_region
from neurofm.errors import NeurofmError


def test_keeps_only_the_region_and_records_params(synthetic_adata):
    result = filter_region(synthetic_adata, value="Hippocampus")
    expected = (synthetic_adata.obs[keys.REGION] == "Hippocampus").sum()
    assert result.n_obs == expected > 0
    assert set(result.obs[keys.REGION]) == {"Hippocampus"}
    assert list(result.obs[keys.REGION].cat.categories) == ["Hippocampus"]
    assert result.uns[keys.REGION_PARAMS] == {
        "column": keys.REGION,
        "value": "Hippocampus",
        "n_cells_before": synthetic_adata.n_obs,
        "n_cells_after": int(expected),
    }


def test_does_not_modify_the_input(synthetic_adata):
    before = synthetic_adata.n_obs
    filter_region(synthetic_adata, value="Cerebral cortex")
    assert synthetic_adata.n_obs == before and keys.REGION_PARAMS not in synthetic_adata.uns


def test_other_column(synthetic_adata):
    result = filter_region(synthetic_adata, column=keys.CELL_CLASS, value="inhibitory")
    assert set(result.obs[keys.CELL_CLASS]) == {"inhibitory"}


def test_missing_column_lists_the_obs_columns(synthetic_adata):
    with pytest.raises(NeurofmError, match=r"no column 'region' \(obs columns: \['cell_barcode'"):
        filter_region(synthetic_adata, column="region", value="Cerebral cortex")


def test_absent_value_lists_the_values_present(synthetic_adata):
    with pytest.raises(NeurofmError, match=r"values present: 'Cerebral cortex' \(\d+\), 'Hippocampus'"):
        filter_region(synthetic_adata, value="Cerebellum")


def test_value_is_matched_exactly(synthetic_adata):
    with pytest.raises(NeurofmError):
        filter_region(synthetic_adata, value="cerebral cortex")
