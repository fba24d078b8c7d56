"""One cell store from several ``.h5ad`` files (:func:`convert_many`): the union gene vocabulary, a batch
and dataset per cell, and the shards written as :func:`neurofm.data.convert.convert` writes them
(:mod:`neurofm.data.shards`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm import keys
from neurofm.data.atlas import read_frame
from neurofm.data.backed import matrix_element, open_h5ad
from neurofm.data.cell_store import SOURCE_ROW, STORE_FORMAT, STORE_VERSION
from neurofm.data.dedupe import unique_names
from neurofm.data.shards import (
    Source,
    Sources,
    check_csr,
    check_out_dir,
    finish_store,
    finished_store,
    plan_for,
    source_fingerprint,
    store_manifest,
    synced_digest,
    write_obs,
    write_shards,
)
from neurofm.data.vocabulary import FileGenes, union_genes
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, check_h5ad_path

log = logging.getLogger(__name__)

CELL_DATASETS_FILE = "datasets.npy"  # multi-file store: uint16 dataset index of every store row
_INPUT_KEYS = {"path": "path", "batch": "batch_column", "genes": "gene_column", "name": "name"}


@dataclass(frozen=True)
class InputFile:
    """One file of a multi-file store (:func:`convert_many`).

    ``batch_column``: the obs column of its batches (None: the dataset name is every cell's batch);
    ``gene_column``: the var column naming its genes (None: ``var_names``); ``name``: the dataset name
    (None: the file's stem, made unique).
    """

    path: str
    batch_column: str | None = None
    gene_column: str | None = None
    name: str | None = None

    @classmethod
    def parse(
        cls, spec: str | os.PathLike | Mapping | InputFile, batch_column: str | None = None,
        gene_column: str | None = None,
    ) -> InputFile:  # fmt: skip
        """An input from ``PATH``, ``PATH:batch=COL,genes=COL,name=NAME`` (any of the three keys) or a
        mapping ``{path, batch_column, gene_column, name}``; ``batch_column``/``gene_column`` fill the
        keys the spec leaves out."""
        if isinstance(spec, InputFile):
            values = asdict(spec)
        elif isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(_INPUT_KEYS.values()))
            if unknown or "path" not in spec:
                raise NeurofmError(
                    f"data file entry {dict(spec)} has unknown keys {unknown} or no path; use "
                    "{path: FILE.h5ad, batch_column: COL, gene_column: COL}"
                )
            values = dict(spec)
        else:
            values = _parse_spec(str(spec))
        values.setdefault("batch_column", batch_column)
        values.setdefault("gene_column", gene_column)
        return cls(**{key: values.get(key) for key in ("path", "batch_column", "gene_column", "name")})


def _parse_spec(text: str) -> dict:
    """``PATH[:key=value,…]`` → {path, batch_column, gene_column, name} (keys given only)."""
    path, _, options = text.rpartition(":") if "=" in text.rpartition(":")[2] else (text, "", "")
    values: dict[str, Any] = {"path": path}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key.strip() not in _INPUT_KEYS or key.strip() == "path" or not value.strip():
            raise NeurofmError(
                f"input {text!r}: {option!r} is not batch=COL, genes=COL or name=NAME; write e.g. "
                "cells.h5ad:batch=donor,genes=gene_symbol"
            )
        values[_INPUT_KEYS[key.strip()]] = value.strip()
    return values


@dataclass
class _Input:
    """One opened input: what convert_many reads of it."""

    spec: InputFile
    path: Path
    obs: pd.DataFrame
    genes: FileGenes
    element: Any
    layer: str


def _open_input(stack: ExitStack, spec: InputFile, layer: str | None) -> _Input:
    path = check_h5ad_path(spec.path)
    handle = stack.enter_context(open_h5ad(path))
    obs, var = read_frame(handle, "obs", path), read_frame(handle, "var", path)
    element, source_name = matrix_element(handle, layer, path)
    check_csr(element, source_name, path)
    if len(obs) == 0 or len(var) == 0:
        raise NeurofmError(
            f"{path} holds an empty matrix ({len(obs)} × {len(var)}); pass an .h5ad with counts"
        )
    for column, table, flag in ((spec.batch_column, obs, "batch"), (spec.gene_column, var, "genes")):
        if column is not None and column not in table.columns:
            raise NeurofmError(
                f"{path.name} has no {'obs' if flag == 'batch' else 'var'} column {column!r} (columns: "
                f"{list(table.columns)[:8]}); name an existing one ({path.name}:{flag}=COL) or leave it out"
            )
    if spec.gene_column is None:
        names, key = var.index.astype(str).to_numpy(), "var_names"
    else:
        names, key = var[spec.gene_column].astype(str).to_numpy(), f"var['{spec.gene_column}']"
    symbols = var[keys.GENE_SYMBOL].astype(str).to_numpy() if keys.GENE_SYMBOL in var.columns else None
    return _Input(spec, path, obs, FileGenes(names, key, symbols), element, source_name)


def _dataset_names(inputs: Sequence[_Input]) -> list[str]:
    names = [item.spec.name or item.path.stem for item in inputs]
    return list(unique_names(pd.Index(names))) if len(set(names)) < len(names) else names


def _multi_obs(inputs: Sequence[_Input], names: list[str]) -> pd.DataFrame:
    """All files' obs, one after the other, + ``dataset``, ``batch`` and ``source_row`` (row in its file)."""
    parts = []
    for item, name in zip(inputs, names, strict=True):
        obs = item.obs.copy()
        column = item.spec.batch_column
        obs[keys.BATCH] = name if column is None else obs[column].astype(str).to_numpy()
        obs[keys.DATASET] = name
        obs[SOURCE_ROW] = np.arange(len(obs), dtype=np.int64)
        parts.append(obs)
    return pd.concat(parts, axis=0, join="outer")


def convert_many(
    files: Sequence[str | os.PathLike | Mapping | InputFile],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 65536,
    seed: int = 0,
    layer: str | None = None,
    read_nonzeros: int = 1 << 23,
    progress: bool = False,
    on_shard_written: Callable[[int], None] | None = None,
) -> dict:
    """One cell store from several ``.h5ad`` files (each a path, a ``PATH:batch=COL,genes=COL`` spec, a
    mapping or an :class:`InputFile`); return the manifest.

    The store holds the union gene vocabulary (:mod:`neurofm.data.vocabulary`); the cells of all files
    are permuted together (``seed``) and written file by file in the same one-pass, row-block way as
    :func:`convert` (never densified; resumable; ``shard_size``, ``layer``, ``read_nonzeros`` as there).
    obs gets ``dataset`` (the dataset name), ``batch`` (the file's batch column, else the dataset name)
    and ``source_row`` (the row in its file); ``datasets.npy`` holds each store row's dataset index; the
    manifest's ``datasets`` list records per file its source, cells, gene match and ``measured_genes``
    (the store genes it measures: the others are unobserved for its cells, not zero).
    """
    started = time.perf_counter()
    specs = [InputFile.parse(spec) for spec in files]
    if not specs:
        raise NeurofmError("convert_many needs at least one input file; pass .h5ad paths")
    out_dir = check_out_dir(out_dir, shard_size)
    with ExitStack() as stack:
        inputs = [_open_input(stack, spec, layer) for spec in specs]
        names = _dataset_names(inputs)
        union = union_genes([item.genes for item in inputs])
        records = [
            {"name": name, **source_fingerprint(item.path), "layer": item.layer, "n_cells": len(item.obs),
             "batch_column": item.spec.batch_column, "gene_column": item.spec.gene_column,
             "genes": record, "n_measured": int(union.measured(f).size),
             "measured_genes": union.measured(f).tolist()}
            for f, (item, name, record) in enumerate(zip(inputs, names, union.records, strict=True))
        ]  # fmt: skip
        plan_record = {"datasets": [{k: v for k, v in r.items() if k != "measured_genes"} for r in records],
                       "seed": int(seed), "shard_size": int(shard_size), "format": [STORE_FORMAT, STORE_VERSION]}  # fmt: skip
        n_cells = sum(len(item.obs) for item in inputs)
        plan = plan_for(plan_record, n_cells, shard_size)
        if (existing := finished_store(out_dir, plan, f"{len(inputs)} files")) is not None:
            return existing
        permutation = np.random.default_rng(seed).permutation(n_cells)
        destination = np.empty(n_cells, dtype=np.int64)  # store row of each cell (files one after the other)
        destination[permutation] = np.arange(n_cells)
        sources = Sources([
            Source(item.element, np.arange(len(item.obs)), None, item.path, column_map=column)
            for item, column in zip(inputs, union.columns, strict=True)
        ])  # fmt: skip
        done = write_shards(sources, destination, plan, out_dir, read_nonzeros, progress, on_shard_written)
        store_obs = _multi_obs(inputs, names).iloc[permutation].copy()
    write_obs(out_dir, store_obs)
    dataset_of_cell = np.repeat(np.arange(len(inputs), dtype=np.uint16), np.diff(sources.offsets))
    manifest = store_manifest(
        plan, seed, union.gene_ids, union.gene_symbols, store_obs.columns, done, out_dir
    )
    manifest["datasets"] = records
    manifest["cell_datasets"] = _write_cell_datasets(out_dir, dataset_of_cell[permutation])
    for record in records:
        log.info("dataset %s: %d cells, %d of the store's %d genes measured (%s)", record["name"],
                 record["n_cells"], record["n_measured"], union.n_genes, record["genes"]["matched_by"])  # fmt: skip
    return finish_store(manifest, out_dir, plan, started)


def _write_cell_datasets(out_dir: Path, dataset_of_row: np.ndarray) -> dict:
    """Write ``datasets.npy`` (atomically, fsync'ed); its manifest record {file, size, sha256}."""
    with atomic_path(out_dir / CELL_DATASETS_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(dataset_of_row, dtype=np.uint16), allow_pickle=False)
    return {"file": CELL_DATASETS_FILE, **synced_digest(out_dir / CELL_DATASETS_FILE)}
