"""Writing a cell store's shards (:mod:`neurofm.data.cell_store`) in one streaming pass over the source.

Conversion is one pass over the source: every kept row's place in its shard is known up front (from the
CSR row lengths), so rows read in source order are copied straight to their final offsets in shard files
under ``OUT_DIR/.convert-progress/`` (memory-mapped, unmapped after each read block so resident memory
stays flat); then each shard is fsync'ed, hashed and renamed to its final name, and the manifest is
written last. Killed midway, it leaves no manifest (a :class:`CellStore` refuses the directory); run again
with the same arguments, it keeps every finished shard whose files still match their recorded SHA-256
and rewrites the rest (a kill during the pass itself means the pass is redone). The callers —
:func:`neurofm.data.convert.convert` (one file) and :func:`neurofm.data.convert_many.convert_many`
(several) — choose the cells and genes, make the plan and write what is their own in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm.data.backed import read_csr_rows
from neurofm.data.cell_store import (
    MANIFEST,
    OBS_FILE,
    SHARD_FILES,
    STORE_FORMAT,
    STORE_VERSION,
    CellStore,
    file_sha256,
)
from neurofm.data.dedupe import unique_names
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, ensure_writable_dir, file_fingerprint, write_json

log = logging.getLogger(__name__)

_PROGRESS = ".convert-progress"  # plan + temporaries of an unfinished conversion
_SHARD_RECORD = "shard.json"  # inside a finished shard directory: what the manifest will say of it


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


def check_out_dir(out_dir: str | os.PathLike, shard_size: int) -> Path:
    """``out_dir`` ready for a store (new, empty or an earlier store/conversion of it)."""
    if shard_size < 1:
        raise NeurofmError(f"shard_size must be a positive number of cells, got {shard_size}")
    out_dir = ensure_writable_dir(out_dir)
    if any(out_dir.iterdir()) and not ((out_dir / MANIFEST).exists() or (out_dir / _PROGRESS).exists()):
        raise NeurofmError(
            f"{out_dir} is a non-empty directory that is not a cell store; choose an empty or new directory"
        )
    return out_dir


def check_csr(element, source_name: str, path: Path) -> None:
    if isinstance(element, h5py.Group) and element.attrs.get("encoding-type", "") != "csr_matrix":
        raise NeurofmError(
            f"{path.name} stores {source_name} as {element.attrs.get('encoding-type', 'unknown')}; "
            "convert needs CSR rows — re-save it with adata.X = adata.X.tocsr()"
        )


def source_fingerprint(path: Path) -> dict:
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sample_sha256": file_fingerprint(path)}


def plan_for(plan_record: dict, n_cells: int, shard_size: int) -> _Plan:
    key = hashlib.sha256(json.dumps(plan_record, sort_keys=True).encode()).hexdigest()
    return _Plan(key=key, n_cells=int(n_cells), shard_size=int(shard_size))


def finished_store(out_dir: Path, plan: _Plan, what: str) -> dict | None:
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


def write_shards(
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


def write_obs(out_dir: Path, store_obs: pd.DataFrame) -> None:
    """``obs.parquet`` (atomically); object columns as strings (parquet wants one type per column)."""
    store_obs.index = unique_names(pd.Index(store_obs.index.astype(str)))
    store_obs.index.name = "obs_name"
    for column in store_obs.columns:
        if store_obs[column].dtype == object:
            store_obs[column] = store_obs[column].astype(str).where(store_obs[column].notna(), None)
    with atomic_path(out_dir / OBS_FILE) as tmp:
        store_obs.to_parquet(tmp)


def store_manifest(
    plan: _Plan, seed: int, gene_ids: list, gene_symbols, columns: list, done: dict, out_dir: Path
):
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


def finish_store(manifest: dict, out_dir: Path, plan: _Plan, started: float) -> dict:
    write_json(manifest, out_dir / MANIFEST)
    shutil.rmtree(out_dir / _PROGRESS, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info(
        "wrote cell store %s: %d cells × %d genes in %d shards (%.1f s, %.0f cells/s)",
        out_dir, plan.n_cells, manifest["n_genes"], plan.n_shards, seconds, plan.n_cells / max(seconds, 1e-9),
    )  # fmt: skip
    return manifest


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


class Source:
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


class Sources:
    """Several :class:`Source` read one after the other, as one: rows numbered across all of them."""

    def __init__(self, sources: Sequence[Source]):
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
    source: Source,
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


def synced_digest(path: Path) -> dict:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _finalize_shard(index: int, plan: _Plan, progress_dir: Path, out_dir: Path, pool) -> dict:
    """Hash a written shard, record it, and move it under its final name (one atomic rename)."""
    directory = progress_dir / _shard_name(index)
    files = dict(zip(SHARD_FILES, pool.map(synced_digest, [directory / n for n in SHARD_FILES]), strict=True))
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
