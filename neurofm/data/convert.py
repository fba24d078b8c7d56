"""Converting one ``.h5ad`` into a cell store: ``convert(in_h5ad, out_dir)`` reads it with h5py in row blocks
(never the whole ``X``), applies the prepare selection on the way (:class:`neurofm.data.atlas.Selection`:
source rows, the cluster subset through the metadata join, a region filter, a gene selection; obs names
made unique), draws a seeded permutation of the kept cells and writes the shards
(:mod:`neurofm.data.shards`; the layout in :mod:`neurofm.data.cell_store`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np

from neurofm import keys
from neurofm.data.atlas import Selection, read_frame, select_cells, select_genes
from neurofm.data.backed import matrix_element, open_h5ad
from neurofm.data.cell_store import SOURCE_ROW, STORE_FORMAT, STORE_VERSION
from neurofm.data.shards import (
    Source,
    check_csr,
    check_out_dir,
    finish_store,
    finished_store,
    plan_for,
    source_fingerprint,
    store_manifest,
    write_obs,
    write_shards,
)
from neurofm.errors import NeurofmError
from neurofm.io import check_h5ad_path, ensure_writable_dir


def convert(
    in_h5ad: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    selection: Selection | None = None,
    shard_size: int = 65536,
    seed: int = 0,
    layer: str | None = None,
    read_nonzeros: int = 1 << 23,
    progress: bool = False,
    on_shard_written: Callable[[int], None] | None = None,
) -> dict:
    """Convert ``in_h5ad`` into a cell store in ``out_dir`` (see the module docstring); return the manifest.

    ``shard_size`` cells per shard (the last holds the rest); ``seed`` draws the permutation of the kept
    cells; ``layer`` reads counts from ``layers[layer]`` (default: ``layers['counts']`` if present, else
    ``X``); ``read_nonzeros`` bounds one read from the source (memory ≈ 20 bytes × this, plus ~24
    bytes per kept cell for the plan). ``on_shard_written(index)`` is called after
    each shard is final (a test hook). A finished store with the same inputs is returned as is.
    Raises NeurofmError for a non-.h5ad input, a matrix that is not CSR or dense, non-integer counts or
    a selection that keeps nothing. Several files make one store with :func:`convert_many`.
    """
    started = time.perf_counter()
    selection = selection or Selection()
    path = check_h5ad_path(in_h5ad)
    out_dir = check_out_dir(out_dir, shard_size)
    with open_h5ad(path) as handle:
        obs = read_frame(handle, "obs", path)
        var = read_frame(handle, "var", path)
        element, source_name = matrix_element(handle, layer, path)
        check_csr(element, source_name, path)
        rows, kept_obs = select_cells(obs, selection, path)
        gene_columns = select_genes(var, selection.genes, path)
        kept_var = var if gene_columns is None else var.iloc[gene_columns]
        if len(kept_var) == 0 or len(var) == 0 or len(obs) == 0:
            raise NeurofmError(
                f"{path} holds an empty matrix ({len(obs)} cells × {len(var)} genes, {len(kept_var)} genes "
                "kept); pass an .h5ad with counts"
            )
        fingerprint, describe = source_fingerprint(path), selection.describe()
        plan_record = {"source": fingerprint, "selection": describe, "layer": source_name, "seed": int(seed),
                       "shard_size": int(shard_size), "format": [STORE_FORMAT, STORE_VERSION]}  # fmt: skip
        plan = plan_for(plan_record, rows.size, shard_size)
        if (existing := finished_store(out_dir, plan, path.name)) is not None:
            return existing
        permutation = np.random.default_rng(seed).permutation(rows.size)
        destination = np.empty(rows.size, dtype=np.int64)  # store row of the i-th kept (sorted) source row
        destination[permutation] = np.arange(rows.size)
        source = Source(element, rows, gene_columns, path)
        done = write_shards(source, destination, plan, out_dir, read_nonzeros, progress, on_shard_written)
    store_obs = kept_obs.iloc[permutation].copy()  # obs in store order; index = unique obs names
    store_obs[SOURCE_ROW] = rows[permutation]
    write_obs(out_dir, store_obs)
    has_symbols = keys.GENE_SYMBOL in kept_var.columns
    symbols = kept_var[keys.GENE_SYMBOL].astype(str).tolist() if has_symbols else None
    gene_ids = kept_var.index.astype(str).tolist()
    manifest = store_manifest(plan, seed, gene_ids, symbols, store_obs.columns, done, out_dir)
    manifest["source"] = {**fingerprint, "layer": source_name, "n_cells": len(obs), "n_genes": len(var)}
    manifest["selection"] = describe
    return finish_store(manifest, out_dir, plan, started)


def convert_anndata(adata: ad.AnnData, out_dir: str | os.PathLike, **options) -> dict:
    """:func:`convert` for an in-memory AnnData (small data takes the same path as an atlas): the
    AnnData is written to a temporary ``.h5ad`` beside ``out_dir`` first. ``options`` go to convert."""
    import tempfile

    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir.parent)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as scratch:
        source = Path(scratch) / "cells.h5ad"
        adata.write_h5ad(source)
        return convert(source, out_dir, **options)
