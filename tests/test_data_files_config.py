"""Several data files in a run configuration: ``data.files`` and ``run.py --data A --data B``."""

from __future__ import annotations

import pytest

import run
from neurofm.config import load_config
from neurofm.errors import NeurofmError


def test_data_files_take_paths_and_mappings():
    files = ["a.h5ad", {"path": "b.h5ad", "batch_column": "donor", "gene_column": "gene_symbol"}]
    config = load_config(None, values={"data.files": files})
    assert config.data.files == files and config.data.path is None
    assert load_config(None).data.files is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data.files": []}, "must be a list"),
        ({"data.files": "a.h5ad"}, "must be a list"),
        ({"data.files": ["a.h5ad"], "data.path": "b.h5ad"}, "both set"),
        ({"data.files": [{"path": "a.h5ad", "batch": "donor"}]}, "unknown keys \\['batch'\\]"),
        ({"data.files": [{"batch_column": "donor"}]}, "no path"),
        ({"data.files": [3]}, "neither a path"),
    ],
)
def test_bad_data_files_are_refused_naming_the_fix(values, message):
    with pytest.raises(NeurofmError, match=message):
        load_config(None, values=values)


def test_one_data_flag_keeps_data_path_and_several_fill_data_files(tmp_path):
    one = run.load_run_config(run.build_parser().parse_args(["--data", "a.h5ad", "--out", str(tmp_path)]))
    assert one.data.path == "a.h5ad" and one.data.files is None
    argv = [
        "--pipeline",
        "pretrain",
        "--data",
        "a.h5ad",
        "--data",
        "b.h5ad:batch=donor",
        "--out",
        str(tmp_path),
    ]
    several = run.load_run_config(run.build_parser().parse_args(argv))
    assert several.data.path is None and several.data.files == ["a.h5ad", "b.h5ad:batch=donor"]


@pytest.mark.parametrize("pipeline", ["full", "evaluate", "prepare", "map", "tune"])
def test_several_data_files_outside_pretrain_end_in_one_line(pipeline, tmp_path, capsys):
    argv = ["--pipeline", pipeline, "--data", "a.h5ad", "--data", "b.h5ad", "--out", str(tmp_path)]
    assert run.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "only --pipeline pretrain takes several files" in error


def test_several_data_files_resolve_to_their_specs_and_fingerprints(tmp_path):
    import anndata as ad
    import numpy as np

    from neurofm.runs import resolve_inputs

    for name in ("a", "b"):
        ad.AnnData(X=np.ones((3, 2), dtype=np.float32)).write_h5ad(tmp_path / f"{name}.h5ad")
    files = [str(tmp_path / "a.h5ad"), f"{tmp_path / 'b.h5ad'}:batch=donor"]
    inputs = resolve_inputs(load_config(None, values={"data.files": files, "data.out_dir": str(tmp_path)}))
    assert [spec["path"] for spec in inputs["files"]] == [str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")]
    assert [spec["batch_column"] for spec in inputs["files"]] == [None, "donor"]
    assert len(inputs["fingerprints"]) == 2 and inputs["name"] == "a+b" and inputs["path"] is None
    with pytest.raises(NeurofmError, match="crop"):
        resolve_inputs(load_config(None, values={"data.files": files, "crop.n_cells": 10}))
    with pytest.raises(NeurofmError, match="does not exist|not found|no such"):
        resolve_inputs(load_config(None, values={"data.files": [str(tmp_path / "missing.h5ad")]}))


def test_several_data_files_are_not_the_built_in_data():
    several = load_config(None, values={"data.files": ["a.h5ad", "b.h5ad"]})
    builtin = load_config(None)
    assert several.train.epochs == load_config(None, values={"data.path": "a.h5ad"}).train.epochs
    assert list(several.reference.label_columns) == []  # not the synthetic atlas's label columns
    assert list(builtin.reference.label_columns) == ["subtype"]
