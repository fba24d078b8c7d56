"""The prepare chain on the real 1,152-cell Allen subset in ../shared/data (skipped when absent)."""

import numpy as np
import pytest

from neurofm import keys
from neurofm.data.atlas import load_counts
from neurofm.data.crop import crop, sparsity_report
from neurofm.data.dedupe import dedupe
from neurofm.data.region import filter_region

pytestmark = pytest.mark.integration


def test_load_region_dedupe_crop_on_the_real_subset(file_sha256, real_subset_path):
    before = file_sha256(real_subset_path)
    adata = load_counts(real_subset_path)
    assert adata.shape == (1152, 2000)
    assert adata.obs[keys.SUBTYPE].value_counts().to_dict() == {"cluster_2523": 620, "cluster_210": 532}

    cortex = filter_region(adata, value="Cerebral cortex")
    assert cortex.n_obs == 1152
    unique = dedupe(cortex, genes="collapse", cells="drop", gene_column=keys.GENE_SYMBOL)
    assert unique.uns[keys.DEDUPE_REPORT]["n_duplicate_cells"] == 0

    cropped = crop(unique, n_cells=800, n_genes=500, seed=42)
    assert cropped.shape == (800, 500)
    # depth strata keep both subtypes in roughly their original proportions
    share = (cropped.obs[keys.SUBTYPE] == "cluster_2523").mean()
    assert abs(share - 620 / 1152) < 0.08
    table = sparsity_report(unique, cropped)
    assert table.loc[1, "nonzero_fraction"] >= table.loc[0, "nonzero_fraction"] * 0.9
    assert np.all(cropped.X.data == np.round(cropped.X.data))
    assert file_sha256(real_subset_path) == before  # the input file is never modified
