"""The cell store's format and its reader: an atlas written once as pre-shuffled shards of sparse counts.

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
the source's fingerprint, the selection and the seed. Opening a store checks every shard file's size
(cheap); ``verify=True`` also checks their SHA-256. Stores are written by :mod:`neurofm.data.convert` (one
file) and :mod:`neurofm.data.convert_many` (several); :mod:`neurofm.data.store` gathers the public names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm import keys
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path

STORE_FORMAT = "neurofm-cell-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
OBS_FILE = "obs.parquet"
SHARD_FILES = ("indptr.npy", "indices.npy", "data.npy")
SOURCE_ROW = "source_row"  # obs.parquet column: the cell's row in the source .h5ad


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


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
        indices, data = (
            self._pread(index, "indices.npy", first, last),
            self._pread(index, "data.npy", first, last),
        )
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
