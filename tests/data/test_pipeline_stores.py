"""neurofm.data.pipeline_stores: each store a pipeline trains from is converted once, named by its inputs."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from neurofm.data.pipeline_stores import (
    anndata_digest,
    convert_file_once,
    convert_files_once,
    store_anndata_once,
)
from neurofm.io import file_fingerprint, write_h5ad
from tests.test_tokenizer import synthetic_counts


def test_the_same_cells_find_the_same_store_and_other_cells_another(tmp_path):
    cells = synthetic_counts(n_cells=30, n_genes=10, seed=0)
    store = store_anndata_once(cells, tmp_path)
    assert store.path.parent == tmp_path / "stores" and store.path.name.startswith("prepared-")
    assert (store.n_cells, store.n_genes) == (30, 10)
    manifest = (store.path / "manifest.json").stat().st_mtime_ns
    again = store_anndata_once(cells.copy(), tmp_path)
    assert (
        again.path == store.path and (store.path / "manifest.json").stat().st_mtime_ns == manifest
    )  # reused
    other = cells.copy()
    other.X = sp.csr_matrix(other.X.toarray() + np.eye(30, 10, dtype=np.float32))
    assert store_anndata_once(other, tmp_path).path != store.path


def test_the_digest_sees_names_counts_and_the_counts_layer_in_sparse_and_dense_data():
    cells = synthetic_counts(n_cells=12, n_genes=6, seed=1)
    digest = anndata_digest(cells)
    assert len(digest) == 64 and digest == anndata_digest(cells.copy())
    renamed = cells.copy()
    renamed.obs_names = [f"x{i}" for i in range(12)]
    dense = cells.copy()
    dense.X = dense.X.toarray()
    layered = cells.copy()
    layered.layers["counts"] = cells.X * 2
    assert len({digest, anndata_digest(renamed), anndata_digest(dense), anndata_digest(layered)}) == 4


def test_a_file_converts_once_per_fingerprint_and_selection(tmp_path):
    path = write_h5ad(synthetic_counts(n_cells=40, n_genes=8), tmp_path / "cells.h5ad")
    first = convert_file_once(path, file_fingerprint(path), {"region": None}, tmp_path / "out")
    assert first.path.parent == tmp_path / "out" / "stores" and first.path.name.startswith("cells-")
    assert (
        convert_file_once(path, file_fingerprint(path), {"region": None}, tmp_path / "out").path == first.path
    )
    assert (
        convert_file_once(path, "another-fingerprint", {"region": None}, tmp_path / "out").path != first.path
    )
    assert (
        convert_file_once(path, file_fingerprint(path), {"region": None}, tmp_path / "out", seed=1).path
        != first.path
    )


def test_several_files_make_one_store_named_by_all_of_them(tmp_path):
    paths = [
        str(write_h5ad(synthetic_counts(n_cells=20, n_genes=8, seed=s), tmp_path / f"f{s}.h5ad"))
        for s in (0, 1)
    ]
    fingerprints = [file_fingerprint(p) for p in paths]
    store = convert_files_once(paths, fingerprints, tmp_path / "out")
    assert store.path.name.startswith("many-") and store.n_cells == 40 and len(store.datasets) == 2
    assert convert_files_once(paths, fingerprints, tmp_path / "out").path == store.path
    assert convert_files_once(paths[:1], fingerprints[:1], tmp_path / "out").path != store.path
