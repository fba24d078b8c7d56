"""The store and the streaming loader on the real Allen M1 10x file (skipped when ../shared/data is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from neurofm.data.store import CellStore, convert
from neurofm.stream import CellStream, StreamConfig, StreamLoader, fit_tokenizer, validation_rows
from neurofm.tokenizer import TokenizerConfig

SHARED_DATA = Path(
    os.environ.get("NEUROFM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
M1 = SHARED_DATA / "allen_m1_10x_donor1_141markers.h5ad"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def m1_path():
    if not M1.is_file():
        pytest.skip(f"real data not found at {M1}")
    return M1


def test_m1_store_round_trip_and_streamed_bins_match_transform(tmp_path, m1_path):
    manifest = convert(m1_path, tmp_path / "m1", shard_size=16384, seed=0)
    source = ad.read_h5ad(m1_path)
    assert manifest["n_cells"] == source.n_obs and manifest["n_genes"] == source.n_vars
    store = CellStore(tmp_path / "m1", verify=True)
    obs = store.read_obs()
    assert "subclass_approx" in obs.columns
    order = obs["source_row"].to_numpy()
    np.testing.assert_array_equal(
        store.rows(np.arange(store.n_cells)).toarray(), np.asarray(source.X[order].todense())
    )
    config = StreamConfig(batch_size=256, seed=3)
    val = validation_rows(store.n_cells, config.val_fraction, config.seed, config.max_val_cells)
    tokenizer = fit_tokenizer(store, TokenizerConfig(constant_genes="keep"), exclude_rows=val, seed=0)
    expected = tokenizer.transform(store.to_anndata())
    loader = StreamLoader(CellStream(store, tokenizer, config, num_workers=2), num_workers=2)
    seen = []
    for batch in loader:
        rows = batch["rows"].numpy()
        np.testing.assert_array_equal(batch["bins"].numpy(), expected[rows])
        seen.append(rows)
    seen = np.concatenate(seen)
    assert seen.size == store.n_cells - val.size == np.unique(seen).size
