"""The cell store: an atlas written once, in one streaming pass, as pre-shuffled shards of sparse counts.

``convert(in_h5ad, out_dir)`` reads an ``.h5ad`` with h5py in row blocks (never the whole ``X``), applies
the prepare selection on the way (source rows, the cluster subset through the metadata join, a region
filter, a gene selection; obs names made unique), draws a seeded permutation of the kept cells and writes

    OUT_DIR/
        manifest.json          # written last (atomically): a directory without it is not a store
        obs.parquet            # kept obs columns in store order, + source_row; index = unique obs names
        shard-00000/           # rows [0, shard_size) of the permuted cells, one memory-mapped CSR
            indptr.npy         #   int64 (rows + 1)
            indices.npy        #   int32 gene positions (in the store's gene order)
            data.npy           #   integer counts, uint16 (uint32 when a count exceeds 65,535)
        shard-00001/ …

Store row ``r`` lives in shard ``r // shard_size`` at position ``r % shard_size``. The manifest holds the
format name and version, gene IDs (+ symbols), the shards' rows, non-zeros and per-file size + SHA-256,
the source's fingerprint, the selection and the seed.

Conversion is one pass over the source: every kept row's place in its shard is known up front (from the
CSR row lengths), so rows read in source order are copied straight to their final offsets in shard files
under ``OUT_DIR/.convert-progress/`` (memory-mapped, unmapped after each read block so resident memory
stays flat); then each shard is fsync'ed, hashed and renamed to its final name, and the manifest is
written last. Killed midway, it leaves no manifest (a :class:`CellStore` refuses the directory); run again
with the same arguments, it keeps every finished shard whose files still match their recorded SHA-256
and rewrites the rest (a kill during the pass itself means the pass is redone). Opening a store checks every shard
file's size (cheap); ``verify=True`` also checks their SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm import keys
from neurofm.data.atlas import (
    _matrix_element,
    _normalise_cluster_ids,
    _open_h5ad,
    read_cell_metadata,
    read_csr_rows,
)
from neurofm.data.dedupe import unique_names
from neurofm.data.region import filter_region
from neurofm.data.vocabulary import FileGenes, union_genes
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, check_h5ad_path, ensure_writable_dir, file_fingerprint, write_json

log = logging.getLogger(__name__)

STORE_FORMAT = "neurofm-cell-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
OBS_FILE = "obs.parquet"
SHARD_FILES = ("indptr.npy", "indices.npy", "data.npy")
SOURCE_ROW = "source_row"  # obs.parquet column: the cell's row in the source .h5ad
_PROGRESS = ".convert-progress"  # plan + temporaries of an unfinished conversion
_SHARD_RECORD = "shard.json"  # inside a finished shard directory: what the manifest will say of it


@dataclass(frozen=True)
class Selection:
    """Which cells and genes of the source a store keeps (the prepare selection, applied on the way).

    Cells are kept when they pass every given filter: ``rows`` (source row positions), the cluster
    subset (``cluster_ids`` looked up in ``metadata_csv``, joined on ``obs_name_column`` = the .h5ad
    obs_names; writes ``obs['subtype']`` = ``f"{label_prefix}{id}"`` and the other metadata columns)
    and the region filter (``obs[region_column] == region`` after the join). ``genes`` lists var_names to
    keep, in that order (None: all). ``obs_columns`` limits the obs columns written (None: all).
    """

    rows: Sequence[int] | None = None
    genes: Sequence[str] | None = None
    metadata_csv: str | None = None
    cluster_ids: Sequence[Any] | None = None
    obs_name_column: str = keys.CELL_LABEL
    cluster_column: str = keys.CLUSTER_ALIAS
    label_prefix: str = "cluster_"
    region: str | None = None
    region_column: str = keys.REGION
    obs_columns: Sequence[str] | None = None

    def describe(self) -> dict:
        """A JSON-able record for the manifest (row and gene lists as counts + SHA-256)."""
        record = asdict(self)
        for name in ("rows", "genes"):
            values = record.pop(name)
            if values is not None:
                array = np.asarray(values)
                record[name] = {"count": int(array.size), "sha256": _sha256_bytes(array.astype(str))}
            else:
                record[name] = None
        if record["metadata_csv"] is not None:
            record["metadata_fingerprint"] = file_fingerprint(record["metadata_csv"])
            record["metadata_csv"] = str(record["metadata_csv"])
        if record["cluster_ids"] is not None:
            record["cluster_ids"] = [str(v) for v in record["cluster_ids"]]
        if record["obs_columns"] is not None:
            record["obs_columns"] = list(record["obs_columns"])
        return record


def _sha256_bytes(array: np.ndarray) -> str:
    """SHA-256 of the values (as text, NUL-separated): one pass, fast for millions of row numbers."""
    return hashlib.sha256("\0".join(np.asarray(array).ravel().tolist()).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ selection
def _read_frame(handle: h5py.File, name: str, path: Path) -> pd.DataFrame:
    try:
        return ad.io.read_elem(handle[name])
    except Exception as error:  # h5py/anndata raise many types for broken files
        raise NeurofmError(
            f"{path} has no readable {name} table ({type(error).__name__}); pass an AnnData .h5ad"
        ) from None


def _select_cells(obs: pd.DataFrame, selection: Selection, path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(sorted source rows kept, their obs after the metadata join), reusing the prepare rules."""
    keep = np.ones(len(obs), dtype=bool)
    if selection.rows is not None:
        rows = np.asarray(selection.rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(obs)):
            raise NeurofmError(
                f"selection rows must be in [0, {len(obs)}) for {path.name}; got {rows.min()}..{rows.max()}"
            )
        keep[:] = False
        keep[rows] = True
    obs = obs.copy()
    if selection.cluster_ids is not None:
        if selection.metadata_csv is None:
            raise NeurofmError("selection cluster_ids needs metadata_csv; pass the atlas cell_metadata.csv")
        metadata = read_cell_metadata(
            selection.metadata_csv, required_columns=(selection.obs_name_column, selection.cluster_column)
        )
        integer_column = pd.api.types.is_integer_dtype(metadata[selection.cluster_column])
        wanted = _normalise_cluster_ids(selection.cluster_ids, integer_column)
        if not integer_column:
            metadata[selection.cluster_column] = metadata[selection.cluster_column].astype(str)
        metadata = metadata.drop_duplicates(selection.obs_name_column).set_index(selection.obs_name_column)
        matched = metadata.reindex(obs.index.astype(str))
        in_clusters = matched[selection.cluster_column].isin(wanted).to_numpy()
        if not (keep & in_clusters).any():
            raise NeurofmError(
                f"no cell of {path.name} belongs to clusters {wanted} through column "
                f"'{selection.obs_name_column}' of {Path(selection.metadata_csv).name}; check the IDs and "
                "obs_name_column (`neurofm check-ids` shows which column matches)"
            )
        keep &= in_clusters
        for column in matched.columns:
            if column not in obs.columns:
                obs[column] = matched[column].to_numpy()
        obs[keys.SUBTYPE] = [
            f"{selection.label_prefix}{value}" if ok else None
            for value, ok in zip(matched[selection.cluster_column], in_clusters, strict=True)
        ]
    if selection.region is not None:
        kept = filter_region(
            ad.AnnData(obs=obs[keep]), value=selection.region, column=selection.region_column
        )
        in_region = obs.index.isin(kept.obs_names)
        keep &= in_region
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise NeurofmError(f"the selection keeps no cell of {path.name}; loosen the selection")
    kept_obs = obs.iloc[rows]
    if selection.obs_columns is not None:
        absent = [c for c in selection.obs_columns if c not in kept_obs.columns]
        if absent:
            raise NeurofmError(
                f"obs has no column(s) {absent} (columns: {list(kept_obs.columns)}); drop them from obs_columns"
            )
        kept_obs = kept_obs[list(selection.obs_columns)]
    return rows, kept_obs


def _select_genes(var: pd.DataFrame, genes: Sequence[str] | None, path: Path) -> np.ndarray | None:
    """Source column of each kept gene (None: all genes in file order)."""
    if genes is None:
        return None
    names = pd.Index(var.index.astype(str))
    if not names.is_unique:
        raise NeurofmError(
            f"{path.name} has duplicate var_names; a gene selection needs unique gene IDs (dedupe first)"
        )
    wanted = pd.Index(np.asarray(genes, dtype=str))
    if not wanted.is_unique:
        raise NeurofmError("the gene selection lists a gene twice; list each gene ID once")
    position = names.get_indexer(wanted)
    if (position < 0).any():
        missing = list(wanted[position < 0][:3])
        raise NeurofmError(
            f"{int((position < 0).sum())} selected genes are not var_names of {path.name} (e.g. {missing}); "
            "list gene IDs as in the file's var index"
        )
    return position.astype(np.int64)


# ------------------------------------------------------------------------------------------ conversion
@dataclass
class _Plan:
    key: str  # hash of everything that decides the store's bytes
    n_cells: int
    shard_size: int
    n_shards: int = field(init=False)

    def __post_init__(self):
        self.n_shards = max(1, -(-self.n_cells // self.shard_size))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _finished_shard(directory: Path, plan_key: str) -> dict | None:
    """The record of a finished shard written for ``plan_key`` whose files still match it, else None."""
    record_path = directory / _SHARD_RECORD
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != plan_key:
        return None
    for name, expected in record["files"].items():
        path = directory / name
        if (
            not path.is_file()
            or path.stat().st_size != expected["size"]
            or file_sha256(path) != expected["sha256"]
        ):
            return None
    return record


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _as_counts(values: np.ndarray, path: Path) -> np.ndarray:
    """``values`` as uint32 counts; NeurofmError (naming the problem) unless they are raw UMI counts."""
    with np.errstate(invalid="ignore", over="ignore"):
        counts = values.astype(np.uint32)
    if np.issubdtype(values.dtype, np.unsignedinteger) and values.dtype.itemsize <= 4:
        return counts
    if not np.array_equal(counts, values):
        _check_block_counts(values, path)  # names the problem
        raise NeurofmError(f"{path.name} holds values that are not uint32 counts; pass raw UMI counts")
    return counts


def _check_block_counts(values: np.ndarray, path: Path) -> None:
    if values.size == 0:
        return
    if np.issubdtype(values.dtype, np.integer):
        if values.min() < 0:
            raise NeurofmError(f"{path.name} holds negative counts; pass raw UMI counts")
        return
    if not np.isfinite(values).all():
        raise NeurofmError(f"{path.name} holds NaN/infinite counts; pass raw UMI counts")
    if values.min() < 0:
        raise NeurofmError(f"{path.name} holds negative values (scaled or centred?); pass raw UMI counts")
    if (values != np.floor(values)).any():
        raise NeurofmError(
            f"{path.name} holds non-integer values (log-normalised?); pass raw UMI counts (or layer='counts')"
        )
    if values.max() >= 2**32:
        raise NeurofmError(f"{path.name} holds counts >= 2**32; these are not UMI counts")


def _check_out_dir(out_dir: str | os.PathLike, shard_size: int) -> Path:
    """``out_dir`` ready for a store (new, empty or an earlier store/conversion of it)."""
    if shard_size < 1:
        raise NeurofmError(f"shard_size must be a positive number of cells, got {shard_size}")
    out_dir = ensure_writable_dir(out_dir)
    if any(out_dir.iterdir()) and not ((out_dir / MANIFEST).exists() or (out_dir / _PROGRESS).exists()):
        raise NeurofmError(
            f"{out_dir} is a non-empty directory that is not a cell store; choose an empty or new directory"
        )
    return out_dir


def _check_csr(element, source_name: str, path: Path) -> None:
    if isinstance(element, h5py.Group) and element.attrs.get("encoding-type", "") != "csr_matrix":
        raise NeurofmError(
            f"{path.name} stores {source_name} as {element.attrs.get('encoding-type', 'unknown')}; "
            "convert needs CSR rows — re-save it with adata.X = adata.X.tocsr()"
        )


def _fingerprint(path: Path) -> dict:
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sample_sha256": file_fingerprint(path)}


def _plan_for(plan_record: dict, n_cells: int, shard_size: int) -> _Plan:
    key = hashlib.sha256(json.dumps(plan_record, sort_keys=True).encode()).hexdigest()
    return _Plan(key=key, n_cells=int(n_cells), shard_size=int(shard_size))


def _finished_store(out_dir: Path, plan: _Plan, what: str) -> dict | None:
    """The manifest of the finished store in ``out_dir`` made by ``plan`` (intact), else None — and then
    the directory is no store any more (its manifest removed) until the new manifest lands."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        existing = json.loads(manifest_path.read_text())
    except ValueError:
        existing = {}
    if existing.get("plan") == plan.key:
        try:
            CellStore(out_dir, verify=False)
        except NeurofmError:
            pass
        else:
            log.info("%s is already a finished store of %s; kept", out_dir, what)
            return existing
    manifest_path.unlink()
    return None


def _write_shards(
    source,
    destination: np.ndarray,
    plan: _Plan,
    out_dir: Path,
    read_nonzeros: int,
    progress: bool,
    on_shard_written: Callable[[int], None] | None,
) -> dict[int, dict]:
    """Every shard of ``plan`` final in ``out_dir`` (finished ones of the same plan kept): their records."""
    progress_dir = out_dir / _PROGRESS
    progress_dir.mkdir(exist_ok=True)
    done = {}
    for index in range(plan.n_shards):
        record = _finished_shard(out_dir / _shard_name(index), plan.key)
        if record is not None:
            done[index] = record
    for stale in out_dir.glob("shard-*"):
        if stale.is_dir() and int(stale.name.split("-")[1]) not in done:
            shutil.rmtree(stale)
    if done:
        log.info("resuming: %d of %d shards already written", len(done), plan.n_shards)
    pending = [k for k in range(plan.n_shards) if k not in done]
    if not pending:
        return done
    with ThreadPoolExecutor(max_workers=2) as pool:  # copies, hashing and fsync release the GIL
        try:
            _scatter_into_shards(
                source, destination, plan, pending, progress_dir, read_nonzeros, np.uint16, progress, pool
            )
        except _WideCounts:
            log.info("a count exceeds 65,535: writing the shards' counts as uint32")
            _scatter_into_shards(
                source, destination, plan, pending, progress_dir, read_nonzeros, np.uint32, progress, pool
            )
        for index in pending:
            done[index] = _finalize_shard(index, plan, progress_dir, out_dir, pool)
            if on_shard_written is not None:
                on_shard_written(index)
    _fsync_directory(out_dir)
    return done


def _write_obs(out_dir: Path, store_obs: pd.DataFrame) -> None:
    """``obs.parquet`` (atomically); object columns as strings (parquet wants one type per column)."""
    store_obs.index = unique_names(pd.Index(store_obs.index.astype(str)))
    store_obs.index.name = "obs_name"
    for column in store_obs.columns:
        if store_obs[column].dtype == object:
            store_obs[column] = store_obs[column].astype(str).where(store_obs[column].notna(), None)
    with atomic_path(out_dir / OBS_FILE) as tmp:
        store_obs.to_parquet(tmp)


def _manifest(plan: _Plan, seed: int, gene_ids: list, gene_symbols, columns: list, done: dict, out_dir: Path):
    """The manifest fields every store has (the caller adds where its cells came from)."""
    return {
        "format": STORE_FORMAT,
        "format_version": STORE_VERSION,
        "plan": plan.key,
        "n_cells": plan.n_cells,
        "n_genes": len(gene_ids),
        "shard_size": plan.shard_size,
        "seed": int(seed),
        "gene_ids": list(gene_ids),
        "gene_symbols": gene_symbols,
        "obs_file": OBS_FILE,
        "obs_columns": list(columns),
        "obs_sha256": file_sha256(out_dir / OBS_FILE),
        "shards": [{k: v for k, v in done[index].items() if k != "plan"} for index in range(plan.n_shards)],
    }


def _finish(manifest: dict, out_dir: Path, plan: _Plan, started: float) -> dict:
    write_json(manifest, out_dir / MANIFEST)
    shutil.rmtree(out_dir / _PROGRESS, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info(
        "wrote cell store %s: %d cells × %d genes in %d shards (%.1f s, %.0f cells/s)",
        out_dir, plan.n_cells, manifest["n_genes"], plan.n_shards, seconds, plan.n_cells / max(seconds, 1e-9),
    )  # fmt: skip
    return manifest


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
    out_dir = _check_out_dir(out_dir, shard_size)
    with _open_h5ad(path) as handle:
        obs = _read_frame(handle, "obs", path)
        var = _read_frame(handle, "var", path)
        element, source_name = _matrix_element(handle, layer, path)
        _check_csr(element, source_name, path)
        rows, kept_obs = _select_cells(obs, selection, path)
        gene_columns = _select_genes(var, selection.genes, path)
        kept_var = var if gene_columns is None else var.iloc[gene_columns]
        if len(kept_var) == 0 or len(var) == 0 or len(obs) == 0:
            raise NeurofmError(
                f"{path} holds an empty matrix ({len(obs)} cells × {len(var)} genes, {len(kept_var)} genes "
                "kept); pass an .h5ad with counts"
            )
        fingerprint, describe = _fingerprint(path), selection.describe()
        plan_record = {"source": fingerprint, "selection": describe, "layer": source_name, "seed": int(seed),
                       "shard_size": int(shard_size), "format": [STORE_FORMAT, STORE_VERSION]}  # fmt: skip
        plan = _plan_for(plan_record, rows.size, shard_size)
        if (existing := _finished_store(out_dir, plan, path.name)) is not None:
            return existing
        permutation = np.random.default_rng(seed).permutation(rows.size)
        destination = np.empty(rows.size, dtype=np.int64)  # store row of the i-th kept (sorted) source row
        destination[permutation] = np.arange(rows.size)
        source = _Source(element, rows, gene_columns, path)
        done = _write_shards(source, destination, plan, out_dir, read_nonzeros, progress, on_shard_written)
    store_obs = kept_obs.iloc[permutation].copy()  # obs in store order; index = unique obs names
    store_obs[SOURCE_ROW] = rows[permutation]
    _write_obs(out_dir, store_obs)
    has_symbols = keys.GENE_SYMBOL in kept_var.columns
    symbols = kept_var[keys.GENE_SYMBOL].astype(str).tolist() if has_symbols else None
    gene_ids = kept_var.index.astype(str).tolist()
    manifest = _manifest(plan, seed, gene_ids, symbols, store_obs.columns, done, out_dir)
    manifest["source"] = {**fingerprint, "layer": source_name, "n_cells": len(obs), "n_genes": len(var)}
    manifest["selection"] = describe
    return _finish(manifest, out_dir, plan, started)


# ------------------------------------------------------------------------------------------ several files
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
    handle = stack.enter_context(_open_h5ad(path))
    obs, var = _read_frame(handle, "obs", path), _read_frame(handle, "var", path)
    element, source_name = _matrix_element(handle, layer, path)
    _check_csr(element, source_name, path)
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
    out_dir = _check_out_dir(out_dir, shard_size)
    with ExitStack() as stack:
        inputs = [_open_input(stack, spec, layer) for spec in specs]
        names = _dataset_names(inputs)
        union = union_genes([item.genes for item in inputs])
        records = [
            {"name": name, **_fingerprint(item.path), "layer": item.layer, "n_cells": len(item.obs),
             "batch_column": item.spec.batch_column, "gene_column": item.spec.gene_column,
             "genes": record, "n_measured": int(union.measured(f).size),
             "measured_genes": union.measured(f).tolist()}
            for f, (item, name, record) in enumerate(zip(inputs, names, union.records, strict=True))
        ]  # fmt: skip
        plan_record = {"datasets": [{k: v for k, v in r.items() if k != "measured_genes"} for r in records],
                       "seed": int(seed), "shard_size": int(shard_size), "format": [STORE_FORMAT, STORE_VERSION]}  # fmt: skip
        n_cells = sum(len(item.obs) for item in inputs)
        plan = _plan_for(plan_record, n_cells, shard_size)
        if (existing := _finished_store(out_dir, plan, f"{len(inputs)} files")) is not None:
            return existing
        permutation = np.random.default_rng(seed).permutation(n_cells)
        destination = np.empty(n_cells, dtype=np.int64)  # store row of each cell (files one after the other)
        destination[permutation] = np.arange(n_cells)
        sources = _Sources([
            _Source(item.element, np.arange(len(item.obs)), None, item.path, column_map=column)
            for item, column in zip(inputs, union.columns, strict=True)
        ])  # fmt: skip
        done = _write_shards(sources, destination, plan, out_dir, read_nonzeros, progress, on_shard_written)
        store_obs = _multi_obs(inputs, names).iloc[permutation].copy()
    _write_obs(out_dir, store_obs)
    dataset_of_cell = np.repeat(np.arange(len(inputs), dtype=np.uint16), np.diff(sources.offsets))
    manifest = _manifest(plan, seed, union.gene_ids, union.gene_symbols, store_obs.columns, done, out_dir)
    manifest["datasets"] = records
    manifest["cell_datasets"] = _write_cell_datasets(out_dir, dataset_of_cell[permutation])
    for record in records:
        log.info("dataset %s: %d cells, %d of the store's %d genes measured (%s)", record["name"],
                 record["n_cells"], record["n_measured"], union.n_genes, record["genes"]["matched_by"])  # fmt: skip
    return _finish(manifest, out_dir, plan, started)


def _write_cell_datasets(out_dir: Path, dataset_of_row: np.ndarray) -> dict:
    """Write ``datasets.npy`` (atomically, fsync'ed); its manifest record {file, size, sha256}."""
    with atomic_path(out_dir / CELL_DATASETS_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(dataset_of_row, dtype=np.uint16), allow_pickle=False)
    return {"file": CELL_DATASETS_FILE, **_synced_digest(out_dir / CELL_DATASETS_FILE)}


def _read_blocks(rows: np.ndarray, lengths: np.ndarray, read_nonzeros: int):
    """Split sorted ``rows`` (stored values per row: ``lengths``) into pieces of ~``read_nonzeros`` values."""
    cumulative = np.cumsum(lengths)
    start = 0
    while start < rows.size:
        base = cumulative[start - 1] if start else 0
        stop = max(int(np.searchsorted(cumulative, base + read_nonzeros, side="right")), start + 1)
        yield start, min(stop, rows.size)
        start = stop


class _WideCounts(Exception):
    """A count above 65,535 met while writing uint16 shards: convert again with uint32."""


class _Source:
    """The kept rows of the source matrix, read in row blocks (CSR group or dense dataset)."""

    def __init__(
        self,
        element,
        rows: np.ndarray,
        gene_columns: np.ndarray | None,
        path: Path,
        column_map: np.ndarray | None = None,
    ):
        """``gene_columns``: the source columns kept, in store order; or ``column_map``: the store gene
        of every source column (-1: dropped), as a multi-file store maps a file onto its vocabulary."""
        self.element, self.rows, self.path = element, rows, path
        self.is_csr = isinstance(element, h5py.Group)
        n_source_genes = int(element.attrs["shape"][1]) if self.is_csr else int(element.shape[1])
        self.column_map = None
        self.reordered = False
        if gene_columns is not None:
            self.column_map = np.full(n_source_genes, -1, dtype=np.int32)
            self.column_map[gene_columns] = np.arange(gene_columns.size, dtype=np.int32)
            self.reordered = not np.all(np.diff(gene_columns) > 0)
        elif column_map is not None:
            self.column_map = np.asarray(column_map, dtype=np.int32)
            kept = self.column_map[self.column_map >= 0]
            identity = kept.size == n_source_genes and np.array_equal(kept, np.arange(n_source_genes))
            self.column_map = None if identity else self.column_map
            self.reordered = not np.all(np.diff(kept) > 0)
        if self.is_csr:
            self.indptr = element["indptr"][:].astype(np.int64)
            self.stored = self.indptr[rows + 1] - self.indptr[rows]  # values per kept row in the file
        else:
            self.stored = np.full(rows.size, n_source_genes, dtype=np.int64)

    def blocks(self, read_nonzeros: int):
        """Yield ``(start, stop, data uint32, indices int32, row_lengths int64)`` for kept rows
        ``rows[start:stop]``, genes already selected (and each row's genes sorted)."""
        for start, stop in _read_blocks(self.rows, self.stored, read_nonzeros):
            block_rows = self.rows[start:stop]
            first, last = int(block_rows[0]), int(block_rows[-1])
            if self.is_csr and last - first + 1 == block_rows.size:  # one contiguous slice
                lo, hi = int(self.indptr[first]), int(self.indptr[last + 1])
                data, indices = self.element["data"][lo:hi], self.element["indices"][lo:hi]
                row_lengths = np.diff(self.indptr[first : last + 2])
            else:
                if self.is_csr:
                    block = read_csr_rows(self.element, block_rows, max_rows_per_read=max(1, block_rows.size))
                else:
                    block = sp.csr_matrix(self.element[first : last + 1][block_rows - first])
                data, indices, row_lengths = block.data, block.indices, np.diff(block.indptr)
            data = _as_counts(data, self.path)
            indices = indices.astype(np.int32, copy=False)
            row_lengths = row_lengths.astype(np.int64, copy=False)
            if self.column_map is not None:
                new_columns = self.column_map[indices]
                kept = new_columns >= 0
                row_of_entry = np.repeat(np.arange(row_lengths.size), row_lengths)[kept]
                row_lengths = np.bincount(row_of_entry, minlength=row_lengths.size).astype(np.int64)
                data, indices = data[kept], new_columns[kept]
                if self.reordered:
                    order = np.lexsort((indices, row_of_entry))
                    data, indices = data[order], indices[order]
            yield start, stop, data, indices, row_lengths

    def kept_lengths(self, read_nonzeros: int) -> np.ndarray:
        """Stored values per kept row after the gene selection (a pass over the indices if genes are
        selected or the matrix is dense; else straight from ``indptr``)."""
        if self.is_csr and self.column_map is None:
            return self.stored
        lengths = np.empty(self.rows.size, dtype=np.int64)
        for start, stop, _, _, row_lengths in self.blocks(read_nonzeros):
            lengths[start:stop] = row_lengths
        return lengths


class _Sources:
    """Several :class:`_Source` read one after the other, as one: rows numbered across all of them."""

    def __init__(self, sources: Sequence[_Source]):
        self.sources = list(sources)
        self.offsets = np.concatenate([[0], np.cumsum([s.rows.size for s in self.sources])]).astype(np.int64)

    def blocks(self, read_nonzeros: int):
        for offset, source in zip(self.offsets[:-1].tolist(), self.sources, strict=True):
            for start, stop, data, indices, row_lengths in source.blocks(read_nonzeros):
                yield start + offset, stop + offset, data, indices, row_lengths

    def kept_lengths(self, read_nonzeros: int) -> np.ndarray:
        return np.concatenate([source.kept_lengths(read_nonzeros) for source in self.sources])


def _create_shard_files(
    lengths: np.ndarray,
    destination: np.ndarray,
    plan: _Plan,
    pending: list[int],
    progress_dir: Path,
    data_dtype,
) -> np.ndarray:
    """Create the pending shards' files (``indptr`` written, the others sized) from the kept rows'
    stored-value ``lengths``; return each kept row's value offset inside its shard."""
    store_lengths = np.empty_like(lengths)
    store_lengths[destination] = lengths
    offsets = np.empty(lengths.size, dtype=np.int64)
    for k in range(plan.n_shards):
        first, last = k * plan.shard_size, min((k + 1) * plan.shard_size, plan.n_cells)
        indptr = np.concatenate([[0], np.cumsum(store_lengths[first:last])]).astype(np.int64)
        offsets_sel = np.flatnonzero((destination >= first) & (destination < last))
        offsets[offsets_sel] = indptr[:-1][destination[offsets_sel] - first]
        if k in pending:
            directory = progress_dir / _shard_name(k)
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            np.save(directory / "indptr.npy", indptr)
            for name, dtype in (("indices.npy", np.int32), ("data.npy", data_dtype)):
                np.lib.format.open_memmap(directory / name, mode="w+", dtype=dtype, shape=(int(indptr[-1]),))
    return offsets


def _scatter_into_shards(
    source: _Source,
    destination: np.ndarray,
    plan: _Plan,
    pending: list[int],
    progress_dir: Path,
    read_nonzeros: int,
    data_dtype: type,
    progress: bool,
    pool,
) -> None:
    """Write the pending shards under ``progress_dir`` in one pass over the source.

    Every kept row's place in its shard is known up front (from the row lengths), so each row read in
    source order is copied straight to its final offset in the shard files (memory-mapped, re-opened
    per read block so that written pages leave this process's resident memory).
    """
    offsets = _create_shard_files(
        source.kept_lengths(read_nonzeros), destination, plan, pending, progress_dir, data_dtype
    )
    is_pending = np.zeros(plan.n_shards, dtype=bool)
    is_pending[pending] = True
    limit = np.iinfo(data_dtype).max
    blocks = _prefetched(source.blocks(read_nonzeros))
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, desc="convert", unit="read")
    for start, stop, data, indices, row_lengths in blocks:
        if data.size and int(data.max()) > limit:
            raise _WideCounts
        shard_of_row = destination[start:stop] // plan.shard_size
        entry_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]]).tolist()
        row_offsets, row_counts = offsets[start:stop].tolist(), row_lengths.tolist()
        maps = {}
        for k in np.unique(shard_of_row[is_pending[shard_of_row]]).tolist():
            directory = progress_dir / _shard_name(k)
            maps[k] = (  # plain views: memmap's per-slice bookkeeping costs more than the copy
                np.load(directory / "indices.npy", mmap_mode="r+").view(np.ndarray),
                np.load(directory / "data.npy", mmap_mode="r+").view(np.ndarray),
            )
        data = data.astype(data_dtype, copy=False)
        shards = shard_of_row.tolist()

        def copy_rows(
            part: slice,
            data=data,
            indices=indices,
            maps=maps,
            shards=shards,
            row_offsets=row_offsets,
            row_counts=row_counts,
            entry_starts=entry_starts,
        ):
            for k, offset, count, entry in zip(
                shards[part], row_offsets[part], row_counts[part], entry_starts[part], strict=True
            ):
                if k in maps:
                    out_indices, out_data = maps[k]
                    out_indices[offset : offset + count] = indices[entry : entry + count]
                    out_data[offset : offset + count] = data[entry : entry + count]

        # two threads: the copies (and the page faults of fresh shard pages) run without the GIL
        half = len(shards) // 2
        list(pool.map(copy_rows, [slice(0, half), slice(half, None)]))
        del maps  # unmapped: the written pages stay in the page cache (fsync'ed when the shard is final)


def _prefetched(iterator, depth: int = 1):
    """Run ``iterator`` in a background thread, ``depth`` items ahead (reads overlap the copying)."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put(item)
            items.put(done)
        except BaseException as error:  # handed to the consumer
            items.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def _synced_digest(path: Path) -> dict:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _finalize_shard(index: int, plan: _Plan, progress_dir: Path, out_dir: Path, pool) -> dict:
    """Hash a written shard, record it, and move it under its final name (one atomic rename)."""
    directory = progress_dir / _shard_name(index)
    files = dict(
        zip(SHARD_FILES, pool.map(_synced_digest, [directory / n for n in SHARD_FILES]), strict=True)
    )
    data = np.load(directory / "data.npy", mmap_mode="r")
    indptr = np.load(directory / "indptr.npy", mmap_mode="r")
    record = {
        "name": _shard_name(index),
        "rows": int(indptr.size - 1),
        "nnz": int(indptr[-1]),
        "data_dtype": data.dtype.name,
        "files": files,
        "plan": plan.key,
    }
    del data, indptr
    (directory / _SHARD_RECORD).write_text(json.dumps(record, indent=2))
    target = out_dir / _shard_name(index)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(directory, target)
    return record


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


# ------------------------------------------------------------------------------------------ reading
class CellStore:
    """A finished cell store, opened read-only; shards are memory-mapped lazily (per process).

    ``CellStore(path)`` reads the manifest and checks each shard file's size and SHA-256 — the checksum
    once per file and per change of it (``verify="once"``, the default: a file whose size, mtime and inode
    match the record ``.verified.json`` of its last good check is not hashed again, so opening a store a
    second time costs a ``stat`` per file); ``verify=True`` hashes every file every time, ``False`` checks
    sizes only. A missing manifest, another format or a changed shard raises NeurofmError naming the shard
    and the fix. Reads refuse what they cannot trust (pointers out of order or range, gene indices out of
    range, non-finite or negative counts). Pickling drops the memory maps, so a store can be handed to
    DataLoader workers, which re-open the files themselves.
    """

    def __init__(self, path: str | os.PathLike, verify: bool | str = "once"):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise NeurofmError(
                f"{self.path} is not a finished cell store (no {MANIFEST}); run `neurofm convert IN.h5ad "
                f"{self.path}` (again, if it was interrupted)"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except ValueError:
            raise NeurofmError(f"{manifest_path} is not valid JSON; convert the store again") from None
        if (
            self.manifest.get("format") != STORE_FORMAT
            or self.manifest.get("format_version") != STORE_VERSION
        ):
            raise NeurofmError(
                f"{self.path} is not a {STORE_FORMAT} v{STORE_VERSION} store (found "
                f"{self.manifest.get('format')} v{self.manifest.get('format_version')}); convert it again"
            )
        self.shards = self.manifest["shards"]
        self.shard_rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_rows)])
        self.gene_ids = np.asarray(self.manifest["gene_ids"], dtype=str)
        self._mapped: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._files: dict[tuple[int, str], tuple[int, int, np.dtype]] = {}  # (fd, data offset, dtype)
        self._cell_datasets: np.ndarray | None = None
        self.check(verify=verify)

    @property
    def n_cells(self) -> int:
        return int(self.manifest["n_cells"])

    @property
    def n_genes(self) -> int:
        return int(self.manifest["n_genes"])

    @property
    def manifest_sha256(self) -> str:
        return file_sha256(self.path / MANIFEST)

    def reference(self) -> dict:
        """A small dataset reference for pipeline steps: ``{"uri", "manifest_sha256", "n_cells", "n_genes"}``."""
        return {
            "uri": str(self.path.resolve()),
            "manifest_sha256": self.manifest_sha256,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
        }

    def check(self, verify: bool | str = False) -> None:
        """Raise NeurofmError (one line) when a shard file is missing, of the wrong size or (``verify``)
        of the wrong SHA-256; ``verify="once"`` hashes only the files changed since their last good check."""
        stamps = self._read_stamps() if verify == "once" else {}
        checked: dict[str, list[int]] = {}
        for key, expected in self._recorded_files():
            file = self.path / key
            problem = None
            if not file.is_file():
                problem = "is missing"
            elif (stat := file.stat()).st_size != expected["size"]:
                problem = f"has {stat.st_size} bytes, the manifest says {expected['size']}"
            elif verify:
                identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
                if stamps.get(key) != [*identity, expected["sha256"]]:
                    if file_sha256(file) != expected["sha256"]:
                        problem = "does not match its SHA-256 in the manifest"
                checked[key] = [*identity, expected["sha256"]]
            if problem:
                raise NeurofmError(
                    f"cell store file {file} {problem} (changed or corrupt); convert the store again "
                    "(in a pipeline: delete the store directory or rerun with --no-cache)"
                )
        if verify == "once" and checked != stamps:
            self._write_stamps(checked)

    def _recorded_files(self) -> list[tuple[str, dict]]:
        """(path inside the store, its {size, sha256}) of every file the manifest records."""
        files = [
            (f"{shard['name']}/{name}", expected)
            for shard in self.shards
            for name, expected in shard["files"].items()
        ]
        if "cell_datasets" in self.manifest:
            record = self.manifest["cell_datasets"]
            files.append((record["file"], record))
        return files

    _STAMPS = ".verified.json"

    def _read_stamps(self) -> dict:
        try:
            stamps = json.loads((self.path / self._STAMPS).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(stamps, dict) or stamps.pop("manifest_sha256", None) != self.manifest_sha256:
            return {}
        return stamps

    def _write_stamps(self, checked: dict) -> None:
        """Record the files just found intact (best effort: a read-only store is hashed on every open)."""
        try:
            with atomic_path(self.path / self._STAMPS) as tmp:
                tmp.write_text(json.dumps({"manifest_sha256": self.manifest_sha256, **checked}))
        except (OSError, NeurofmError):
            pass

    # ------------------------------------------------------------------------------ datasets
    @property
    def datasets(self) -> list[dict]:
        """Per source file (``convert_many``): its manifest record (name, source, gene match,
        ``measured_genes``). A single-file store is one dataset measuring every gene."""
        if "datasets" in self.manifest:
            return self.manifest["datasets"]
        return [{"name": Path(self.manifest.get("source", {}).get("path", "cells")).stem,
                 "n_cells": self.n_cells, "measured_genes": None}]  # fmt: skip

    @property
    def dataset_names(self) -> list[str]:
        return [record["name"] for record in self.datasets]

    @property
    def observed_genes(self) -> np.ndarray:
        """bool (datasets × genes): which store genes each dataset measures (the others are unobserved
        in its cells: no token, not in the library size — never a measured zero)."""
        observed = np.zeros((len(self.datasets), self.n_genes), dtype=bool)
        for index, record in enumerate(self.datasets):
            measured = record.get("measured_genes")
            observed[index, slice(None) if measured is None else np.asarray(measured, dtype=np.int64)] = True
        return observed

    def cell_datasets(self) -> np.ndarray:
        """uint16 (n_cells,): the dataset index of every store row (zeros for a single-file store)."""
        if "cell_datasets" not in self.manifest:
            return np.zeros(self.n_cells, dtype=np.uint16)
        if self._cell_datasets is None:
            path = self.path / self.manifest["cell_datasets"]["file"]
            try:
                values = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise NeurofmError(f"cannot read {path} ({error}); convert the store again") from None
            if values.shape != (self.n_cells,) or (values.size and int(values.max()) >= len(self.datasets)):
                raise NeurofmError(
                    f"{path} does not give a dataset of each of the {self.n_cells} cells (corrupt); convert the "
                    "store again"
                )
            self._cell_datasets = values
        return self._cell_datasets

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mapped"], state["_files"] = {}, {}
        return state

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, data) of shard ``index``, memory-mapped read-only."""
        if index not in self._mapped:
            directory = self.path / self.shards[index]["name"]
            try:
                self._mapped[index] = tuple(
                    np.load(directory / name, mmap_mode="r", allow_pickle=False) for name in SHARD_FILES
                )
            except (OSError, ValueError) as error:
                raise NeurofmError(
                    f"cannot read cell store shard {directory} ({error}); convert the store again"
                ) from None
        return self._mapped[index]

    def read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR pieces ``(indptr from 0, indices, data)`` of store rows ``[start, stop)`` (one shard)."""
        index = int(np.searchsorted(self.shard_offsets, start, side="right") - 1)
        local = start - int(self.shard_offsets[index])
        if stop - int(self.shard_offsets[index]) > self.shard_rows[index]:
            raise ValueError("read_range must stay inside one shard")
        pointers = self._pread(index, "indptr.npy", local, local + (stop - start) + 1)
        self._check_pointers(index, pointers)
        first, last = int(pointers[0]), int(pointers[-1])
        indices, data = self._pread(index, "indices.npy", first, last), self._pread(index, "data.npy", first, last)
        self._check_values(index, indices, data)
        return pointers - first, indices, data

    def _damaged(self, index: int, what: str) -> NeurofmError:
        return NeurofmError(
            f"cell store shard {self.path / self.shards[index]['name']} {what} (corrupt); convert the store "
            "again (in a pipeline: delete the store directory or rerun with --no-cache)"
        )

    def _check_pointers(self, index: int, pointers: np.ndarray) -> None:
        """Row pointers must rise and stay inside the shard's stored values."""
        _, offset, dtype = self._file(index, "data.npy")
        n_values = (self.shards[index]["files"]["data.npy"]["size"] - offset) // dtype.itemsize
        if pointers.size and (pointers[0] < 0 or np.any(np.diff(pointers) < 0) or pointers[-1] > n_values):
            raise self._damaged(index, "has row pointers out of order or out of range")

    def _check_values(self, index: int, indices: np.ndarray, data: np.ndarray) -> None:
        """Gene indices in range; counts finite and non-negative."""
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_genes):
            raise self._damaged(index, f"has gene indices outside [0, {self.n_genes})")
        if data.size and not (np.isfinite(data).all() and data.min() >= 0):
            raise self._damaged(index, "holds non-finite or negative counts")

    def _file(self, index: int, name: str) -> tuple[int, int, np.dtype]:
        """(descriptor, data offset, dtype) of one shard file, opened on first use."""
        key = (index, name)
        if key not in self._files:
            path = self.path / self.shards[index]["name"] / name
            try:
                with open(path, "rb") as handle:
                    major, _ = np.lib.format.read_magic(handle)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    _, _, dtype = read_header(handle)
                    offset = handle.tell()
                descriptor = os.open(path, os.O_RDONLY)
            except (OSError, ValueError) as error:
                raise NeurofmError(
                    f"cannot read cell store shard file {path} ({error}); convert the store again"
                ) from None
            self._files[key] = (descriptor, offset, np.dtype(dtype))
        return self._files[key]

    def _pread(
        self, index: int, name: str, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Items ``[start, stop)`` of one shard file, read with ``pread`` (no memory map: streaming an
        epoch leaves resident memory flat however large the store) into ``out`` when given (a
        contiguous array of ``stop - start`` items; cast when its dtype is not the file's)."""
        descriptor, offset, dtype = self._file(index, name)
        if out is not None and out.dtype != dtype:
            out[:] = self._pread(index, name, start, stop)
            return out
        if out is None:
            out = np.empty(stop - start, dtype=dtype)
        wanted = out.nbytes
        got = os.preadv(descriptor, [memoryview(out).cast("B")], offset + start * dtype.itemsize)
        if got != wanted:
            raise NeurofmError(
                f"cell store shard {self.shards[index]['name']}/{name} is shorter than its manifest says; "
                "convert the store again"
            )
        return out

    def close(self) -> None:
        """Drop memory maps and close the file descriptors (they re-open on the next read)."""
        self._mapped.clear()
        for descriptor, _, _ in self._files.values():
            os.close(descriptor)
        self._files.clear()

    def rows(self, store_rows: Sequence[int] | np.ndarray) -> sp.csr_matrix:
        """Counts of ``store_rows`` (any order, repeats allowed) as CSR float32 (cells × genes), in that
        order. Runs of consecutive rows are read with one ``pread`` each (no memory map, so scattered
        rows do not pull whole shard files into resident memory)."""
        store_rows = np.asarray(store_rows, dtype=np.int64)
        if store_rows.size and (store_rows.min() < 0 or store_rows.max() >= self.n_cells):
            raise NeurofmError(f"store rows must be in [0, {self.n_cells})")
        unique_rows, inverse = np.unique(store_rows, return_inverse=True)
        shard_of = np.searchsorted(self.shard_offsets, unique_rows, side="right") - 1
        new_run = np.ones(unique_rows.size, dtype=bool)
        new_run[1:] = (np.diff(unique_rows) != 1) | (np.diff(shard_of) != 0)
        run_starts = np.flatnonzero(new_run)
        run_stops = np.append(run_starts[1:], unique_rows.size)
        # two passes, so that the counts land in one pre-sized array each: many small live arrays (one
        # per run) fragment the heap, and resident memory then grows with every chunk read
        lengths = np.zeros(unique_rows.size, dtype=np.int64)
        run_first = np.zeros(run_starts.size, dtype=np.int64)  # each run's first stored value
        for run, (first, last) in enumerate(zip(run_starts.tolist(), run_stops.tolist(), strict=True)):
            shard = int(shard_of[first])
            local = int(unique_rows[first]) - int(self.shard_offsets[shard])
            pointers = self._pread(shard, "indptr.npy", local, local + (last - first) + 1)
            self._check_pointers(shard, pointers)
            lengths[first:last] = np.diff(pointers)
            run_first[run] = pointers[0]
        indptr = np.zeros(unique_rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        touched = int(shard_of[0]) if unique_rows.size else None
        index_dtype = np.int32 if touched is None else self._file(touched, "indices.npy")[2]
        data_dtype = np.float32 if touched is None else self._file(touched, "data.npy")[2]
        indices = np.empty(int(indptr[-1]), dtype=index_dtype)
        data = np.empty(int(indptr[-1]), dtype=data_dtype)
        for run, (first, last) in enumerate(zip(run_starts.tolist(), run_stops.tolist(), strict=True)):
            shard, begin, end = int(shard_of[first]), int(indptr[first]), int(indptr[last])
            if end > begin:
                stored = int(run_first[run])
                self._pread(shard, "indices.npy", stored, stored + end - begin, out=indices[begin:end])
                self._pread(shard, "data.npy", stored, stored + end - begin, out=data[begin:end])
                self._check_values(shard, indices[begin:end], data[begin:end])
        matrix = sp.csr_matrix(
            (data.astype(np.float32, copy=False), indices, indptr), shape=(unique_rows.size, self.n_genes)
        )
        if unique_rows.size == store_rows.size and np.array_equal(unique_rows, store_rows):
            return matrix
        return matrix[inverse.ravel()]

    def read_obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The kept obs columns in store order (index: unique obs names; column ``source_row``)."""
        return pd.read_parquet(self.path / OBS_FILE, columns=None if columns is None else list(columns))

    def var(self) -> pd.DataFrame:
        """Gene table in store order: index gene IDs, column ``gene_symbol`` when the source had one."""
        var = pd.DataFrame(index=pd.Index(self.gene_ids, name=keys.GENE_ID_INDEX))
        if self.manifest.get("gene_symbols") is not None:
            var[keys.GENE_SYMBOL] = self.manifest["gene_symbols"]
        return var

    def to_anndata(self, store_rows: Sequence[int] | np.ndarray | None = None) -> ad.AnnData:
        """Rows of the store (all if None) as an in-memory AnnData (CSR float32 counts, obs, var)."""
        store_rows = np.arange(self.n_cells) if store_rows is None else np.asarray(store_rows)
        obs = self.read_obs().iloc[store_rows]
        return ad.AnnData(X=self.rows(store_rows), obs=obs, var=self.var())


def open_reference(reference: dict, verify: bool | str = "once") -> CellStore:
    """The store a ``CellStore.reference()`` dict names (what pipeline steps pass instead of an AnnData),
    checked to be the very store referenced (same manifest SHA-256)."""
    store = CellStore(reference["uri"], verify=verify)
    if store.manifest_sha256 != reference["manifest_sha256"]:
        raise NeurofmError(
            f"the cell store at {reference['uri']} changed since it was referenced (manifest SHA-256 "
            f"differs); rerun the pipeline without the cache (--no-cache) to convert it again"
        )
    return store
