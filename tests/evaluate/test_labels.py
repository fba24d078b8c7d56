"""resolve_labels: one obs column → class labels, with clear errors for bad label columns."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from neurofm.errors import NeurofmError
from neurofm.evaluate.labels import check_labels, resolve_labels

MAPPING = {"cluster_2523": "excitatory", "cluster_210": "inhibitory"}


def _adata(values: list) -> ad.AnnData:
    obs = pd.DataFrame({"subtype": values, "other": "x"}, index=[f"cell{i}" for i in range(len(values))])
    return ad.AnnData(X=np.zeros((len(values), 2), dtype=np.float32), obs=obs)


def test_mapping_renames_raw_values_in_obs_order():
    adata = _adata(["cluster_2523", "cluster_210", "cluster_2523"])
    labels = resolve_labels(adata, "subtype", MAPPING)
    assert labels.tolist() == ["excitatory", "inhibitory", "excitatory"]


def test_without_mapping_raw_values_are_strings():
    adata = _adata([1, 2, 1])
    assert resolve_labels(adata, "subtype").tolist() == ["1", "2", "1"]


def test_missing_column_lists_available_columns():
    with pytest.raises(NeurofmError, match="pick one of: subtype, other"):
        resolve_labels(_adata(["a", "b"]), "cell_type")


def test_single_class_is_refused():
    with pytest.raises(NeurofmError, match="single class"):
        resolve_labels(_adata(["cluster_2523", "cluster_2523"]), "subtype", MAPPING)


def test_mapping_to_one_class_is_refused():
    with pytest.raises(NeurofmError, match="single class"):
        resolve_labels(_adata(["a", "b"]), "subtype", {"a": "neuron", "b": "neuron"})


def test_labels_not_covered_by_mapping_are_named():
    with pytest.raises(NeurofmError, match="cluster_99.*not covered"):
        resolve_labels(_adata(["cluster_2523", "cluster_210", "cluster_99"]), "subtype", MAPPING)


@pytest.mark.parametrize("missing", [np.nan, None, ""])
def test_unlabelled_cells_are_refused(missing):
    with pytest.raises(NeurofmError, match="no value"):
        resolve_labels(_adata(["a", missing, "b"]), "subtype")


def test_check_labels_rejects_length_mismatch_and_nan():
    with pytest.raises(NeurofmError, match="3 labels for 4 cells"):
        check_labels(np.array(["a", "b", "a"]), n_cells=4)
    with pytest.raises(NeurofmError, match="NaN"):
        check_labels(np.array(["a", None, "b"], dtype=object))
