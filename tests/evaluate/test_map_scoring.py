"""neurofm.evaluate.transfer's scoring of a mapped file without ZenML (the map pipeline's score step): the
seeded samples, where the reference's own cells are found, and the report on a tiny model and query."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from neurofm.data.store import CellStore, convert_anndata
from neurofm.embedding import random_encoder_like
from neurofm.evaluate.transfer import find_reference_cells, sample_rows, score_mapped_file
from neurofm.io import write_h5ad
from neurofm.mapping import ReferenceConfig, add_reference, map_file
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_mapping import typed_counts


def test_sample_rows_keeps_every_row_up_to_the_limit_and_a_seeded_sorted_sample_above():
    assert np.array_equal(sample_rows(5, None, seed=0), np.arange(5))
    assert np.array_equal(sample_rows(5, 5, seed=0), np.arange(5))
    rows = sample_rows(100, 10, seed=0)
    assert len(rows) == len(set(rows)) == 10 and np.all(np.diff(rows) > 0) and rows.max() < 100
    assert np.array_equal(rows, sample_rows(100, 10, seed=0))
    assert not np.array_equal(rows, sample_rows(100, 10, seed=1))


def _reference(meta: dict, rows=None) -> SimpleNamespace:
    return SimpleNamespace(meta=meta, rows=None if rows is None else np.asarray(rows))


def test_the_reference_cells_come_from_its_store_its_source_or_the_given_file(tmp_path):
    cells = typed_counts(20, 12, seed=0, types=[0, 1])
    convert_anndata(cells, tmp_path / "store", seed=0)
    store_obs = CellStore(tmp_path / "store").read_obs()
    source = write_h5ad(cells, tmp_path / "cells.h5ad")

    found, where = find_reference_cells(_reference({"store": str(tmp_path / "store")}, rows=[1, 3, 5]))
    assert where == f"the cell store {tmp_path / 'store'}" and list(found.obs_names) == list(
        store_obs.index[[1, 3, 5]]
    )
    found, where = find_reference_cells(_reference({"store": None, "source": str(source)}, rows=[0, 2]))
    assert where == str(source) and list(found.obs_names) == list(cells.obs_names[[0, 2]])
    given = write_h5ad(typed_counts(7, 12, seed=1, types=[0]), tmp_path / "given.h5ad")
    found, where = find_reference_cells(_reference({"store": str(tmp_path / "store")}, rows=[1]), str(given))
    assert where == str(given) and found.n_obs == 7  # the file given is read whole, whatever the rows
    found, where = find_reference_cells(_reference({"store": str(tmp_path / "gone"), "source": "x.csv"}, [0]))
    assert found is None and "--reference-data" in where


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """A tiny model whose reference (4 types, 120 cells) records its .h5ad; a query of 80 cells mapped onto it."""
    directory = tmp_path_factory.mktemp("map_scoring")
    reference = typed_counts(120, 30, seed=0, types=[0, 1, 2, 3])
    source = write_h5ad(reference, directory / "reference.h5ad")
    config = ModelConfig(n_genes=30, n_bins=20, d_model=16, n_heads=2, n_layers=1, ffn_dim=32, max_tokens=8)
    random_encoder_like(config, seed=3).save_pretrained(
        directory / "model", ExpressionTokenizer().fit(reference)
    )
    add_reference(
        directory / "model",
        reference,
        ReferenceConfig(label_columns=("cell_type",)),
        source=str(source),
        progress=False,
    )
    query = write_h5ad(typed_counts(80, 30, seed=1, types=[0, 1, 2, 3]), directory / "query.h5ad")
    record = map_file(query, directory / "query.mapped.h5ad", model=directory / "model", progress=False)
    return directory, record


def test_without_true_labels_nothing_is_scored_or_written(mapped, tmp_path):
    directory, record = mapped
    scores = score_mapped_file(
        directory / "query.mapped.h5ad", record, directory / "model", None, tmp_path / "r"
    )
    assert scores == {"scored": False, "metrics": {}, "out_dir": None} and not (tmp_path / "r").exists()


def test_a_mapped_file_is_scored_beside_a_baseline_on_sampled_cells_and_reported(mapped, tmp_path):
    directory, record = mapped
    out = tmp_path / "report"
    scores = score_mapped_file(
        directory / "query.mapped.h5ad", record, directory / "model", "cell_type", out,
        max_cells=50, baselines=["logcounts"], model="my-model",
    )  # fmt: skip
    assert scores["scored"] and scores["column"] == "cell_type" and scores["out_dir"] == str(out)
    assert {"model/transfer_f1", "logcounts/transfer_f1", "margin/transfer_f1"} <= set(scores["metrics"])
    assert scores["notes"] == ["every method's reference: a seeded sample of 50 of the reference's 120 cells"]
    transfer = pd.read_csv(out / "transfer.csv").set_index("method")
    assert list(transfer.index) == ["model", "logcounts"]
    assert transfer.loc["logcounts", "transfer_f1"] >= 0.9  # four types on their own genes
    report = (out / "report.md").read_text()
    assert "50 of 80" in report and "my-model" in report and str(directory / "reference.h5ad") in report
