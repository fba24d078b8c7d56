"""Subset an .h5ad by cluster without loading it: the backed reads of an atlas file.

The Allen atlas keeps cluster membership and region in ``cell_metadata.csv``, not in the .h5ad, so a
subset is a join: metadata rows whose ``cluster_alias`` is wanted → their ``cell_label`` s → rows of the
.h5ad with those obs_names. :func:`subset_by_clusters` reads only those rows from disk (the file can be
tens of GB), a bounded number of rows at a time; :func:`read_csr_rows` is the row reader the cell stores
use too. The counts checks and the metadata reading are :mod:`neurofm.data.atlas`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm import keys
from neurofm.data.atlas import as_counts_matrix, check_counts, subset_metadata
from neurofm.errors import NeurofmError
from neurofm.io import check_h5ad_path

log = logging.getLogger(__name__)


def read_obs_names(handle: h5py.File) -> pd.Index:
    """The obs index of an open .h5ad without reading anything else."""
    obs = handle["obs"]
    index_key = obs.attrs.get("_index", "_index")
    return pd.Index(ad.io.read_elem(obs[index_key]).astype(str))


def matrix_element(handle: h5py.File, layer: str | None, path: Path) -> tuple[Any, str]:
    if layer is None:
        layer = keys.COUNTS_LAYER if "layers" in handle and keys.COUNTS_LAYER in handle["layers"] else None
    if layer is not None:
        available = list(handle["layers"].keys()) if "layers" in handle else []
        if layer not in available:
            raise NeurofmError(
                f"{path} has no layer '{layer}' (layers: {available or 'none'}); "
                "set layer= to one of them or None for X"
            )
        return handle["layers"][layer], f"layers['{layer}']"
    if "X" not in handle:
        raise NeurofmError(
            f"{path} has no X matrix; pass an .h5ad that stores counts in X or layers['counts']"
        )
    return handle["X"], "X"


def _runs(rows: np.ndarray, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted rows into runs of at most ``max_rows`` consecutive rows: (first, one past last)."""
    new_run = np.r_[True, np.diff(rows) != 1]
    first_position = np.flatnonzero(new_run)[np.cumsum(new_run) - 1]
    new_run |= (np.arange(rows.size) - first_position) % max_rows == 0
    first = np.flatnonzero(new_run)
    last = np.r_[first[1:], rows.size] - 1
    return rows[first], rows[last] + 1


def read_csr_rows(
    group: h5py.Group,
    rows: np.ndarray,
    max_rows_per_read: int = 4096,
    max_gap: int = 1 << 15,
    max_span: int = 1 << 24,
    check: Callable[[np.ndarray], None] | None = None,
) -> sp.csr_matrix:
    """Read rows ``rows`` (sorted, unique) of an on-disk CSR matrix group with h5py, never the whole matrix.

    The output arrays are allocated once at their final size (from ``indptr``) and filled read by read.
    Runs of consecutive rows are read as one slice; runs closer than ``max_gap`` stored values are merged
    into one read while it stays under ``max_span`` values and ``max_rows_per_read`` runs. Peak memory is
    the result plus one read. ``check`` is called on each read's values (e.g. to validate counts).
    """
    shape = tuple(int(v) for v in group.attrs["shape"])
    data_set, index_set = group["data"], group["indices"]
    if rows.size == 0:
        return sp.csr_matrix((0, shape[1]), dtype=data_set.dtype)
    base = int(rows[0])
    row_offsets = group["indptr"][base : int(rows[-1]) + 2].astype(np.int64)
    lengths = row_offsets[rows - base + 1] - row_offsets[rows - base]
    total = int(lengths.sum())
    index_dtype = (
        np.int32 if total < np.iinfo(np.int32).max and shape[1] < np.iinfo(np.int32).max else np.int64
    )
    indptr = np.zeros(rows.size + 1, dtype=index_dtype)
    np.cumsum(lengths, out=indptr[1:])
    data = np.empty(total, dtype=data_set.dtype)
    indices = np.empty(total, dtype=index_dtype)

    starts, ends = _runs(rows, max_rows_per_read)
    run_rows = np.concatenate([[0], np.cumsum(ends - starts)])
    run_start = row_offsets[starts - base]
    run_end = row_offsets[ends - base]
    run_out = np.concatenate([[0], np.cumsum(run_end - run_start)])  # where each run lands in the output
    # group runs into reads: a new read starts where the gap, the span or the run count gets too large
    new_read = np.ones(starts.size, dtype=bool)
    first = 0
    for run in range(1, starts.size):
        if (
            run_start[run] - run_end[run - 1] <= max_gap
            and run_end[run] - run_start[first] <= max_span
            and run_rows[run + 1] - run_rows[first] <= max_rows_per_read
        ):
            new_read[run] = False
        else:
            first = run
    read_first = np.flatnonzero(new_read)
    read_last = np.r_[read_first[1:], starts.size] - 1
    for first_run, last_run in zip(read_first.tolist(), read_last.tolist(), strict=True):
        span_start, span_end = int(run_start[first_run]), int(run_end[last_run])
        data_block = data_set[span_start:span_end]
        index_block = index_set[span_start:span_end]
        for run in range(first_run, last_run + 1):
            source = slice(int(run_start[run]) - span_start, int(run_end[run]) - span_start)
            target = slice(int(run_out[run]), int(run_out[run + 1]))
            data[target] = data_block[source]
            indices[target] = index_block[source]
        if check is not None:
            check(data[int(run_out[first_run]) : int(run_out[last_run + 1])])
    return sp.csr_matrix((data, indices, indptr), shape=(rows.size, shape[1]), copy=False)


def _read_rows(element: Any, rows: np.ndarray, chunk_size: int, path: Path, source: str) -> sp.csr_matrix:
    """Read ``rows`` of the counts (CSR group or dense dataset), ``chunk_size`` rows per read, validated."""

    def check(values: np.ndarray) -> None:
        check_counts(values, where=source)

    if isinstance(element, h5py.Dataset):  # dense X
        blocks = []
        for i in range(0, rows.size, chunk_size):
            block = sp.csr_matrix(element[rows[i : i + chunk_size]])
            check(block.data)
            blocks.append(block)
        return sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    encoding = element.attrs.get("encoding-type", "")
    if encoding != "csr_matrix":
        raise NeurofmError(
            f"{path} stores its counts as {encoding or 'an unknown encoding'}; subsetting cells needs CSR — "
            "re-save the file with a CSR matrix (adata.X = adata.X.tocsr())"
        )
    return read_csr_rows(element, rows, max_rows_per_read=chunk_size, check=check)


def subset_by_clusters(
    h5ad_path: str | os.PathLike,
    metadata_csv: str | os.PathLike,
    cluster_ids: Sequence[int] | int,
    obs_name_column: str = keys.CELL_LABEL,
    cluster_column: str = keys.CLUSTER_ALIAS,
    label_prefix: str = "cluster_",
    chunk_size: int = 4096,
    layer: str | None = None,
    metadata_columns: Sequence[str] | None = None,
) -> ad.AnnData:
    """Cells of ``h5ad_path`` whose metadata ``cluster_column`` is in ``cluster_ids``, read from disk.

    Joins ``metadata_csv`` on ``obs_name_column`` (its values are the .h5ad's obs_names), keeps the cells
    of the wanted clusters in file order, and reads only their rows of the counts (``layers['counts']`` if
    present, else ``X``; CSR or dense) ``chunk_size`` rows at a time with h5py — the matrix is never
    loaded whole. The result holds the counts in ``X`` (CSR float32), the file's obs, var and uns, and:

    - ``obs['subtype']``: ``f"{label_prefix}{cluster_id}"``, e.g. ``cluster_2523``;
    - ``obs[<metadata column>]`` for every other metadata column (or ``metadata_columns``) not already in
      obs: cluster_alias, anatomical_division_label, x, y, …;
    - ``uns['subset_params']``: input_file, metadata_csv, cluster_ids, obs_name_column, cluster_column,
      label_prefix, source, n_cells_in_file, n_cells_matched, n_cells_per_cluster.

    Raises NeurofmError when the file or metadata is unusable, the IDs are not of the column's type, no
    obs_name appears in the metadata, or no cell belongs to the clusters. IDs that match nothing while
    others do are logged as a warning.
    """
    path = check_h5ad_path(h5ad_path)
    if chunk_size < 1:
        raise NeurofmError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    metadata, wanted = subset_metadata(
        metadata_csv, cluster_ids, obs_name_column, cluster_column, metadata_columns
    )
    with open_h5ad(path) as handle:
        try:
            obs_names = read_obs_names(handle)
        except (KeyError, TypeError, ValueError) as error:
            raise NeurofmError(f"{path} has no readable obs index ({error}); pass an AnnData .h5ad") from None
        metadata = _index_by_obs_names(metadata, obs_names, obs_name_column, path)
        position = metadata.index.get_indexer(obs_names)  # -1: obs_name absent from the metadata
        keep = _cells_in_clusters(metadata[cluster_column], position, wanted, cluster_column, path)
        rows = np.flatnonzero(keep)
        element, source = matrix_element(handle, layer, path)
        counts = _read_rows(element, rows, chunk_size, path, source)
        obs = ad.io.read_elem(handle["obs"]).iloc[rows]
        var = ad.io.read_elem(handle["var"])
        uns = ad.io.read_elem(handle["uns"]) if "uns" in handle else {}

    kept_clusters = metadata[cluster_column].to_numpy()[position[keep]]
    obs = _subset_obs(obs, metadata.iloc[position[keep]], kept_clusters, label_prefix)
    adata = ad.AnnData(X=as_counts_matrix(counts), obs=obs, var=var, uns=uns)
    per_cluster = pd.Series(kept_clusters).value_counts()
    adata.uns[keys.SUBSET_PARAMS] = {
        "input_file": str(path.resolve()),
        "metadata_csv": str(Path(metadata_csv).resolve()),
        "cluster_ids": np.asarray(wanted),
        "obs_name_column": obs_name_column,
        "cluster_column": cluster_column,
        "label_prefix": label_prefix,
        "source": source,
        "n_cells_in_file": int(obs_names.size),
        "n_cells_matched": int(rows.size),
        "n_cells_per_cluster": {str(key): int(value) for key, value in per_cluster.items()},
    }
    log.info(
        "subset %d of %d cells in clusters %s from %s",
        rows.size,
        obs_names.size,
        sorted(set(kept_clusters.tolist())),
        path.name,
    )
    return adata


def open_h5ad(path: Path) -> h5py.File:
    """``path`` opened read-only with h5py; NeurofmError when it is not a readable HDF5 file."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise NeurofmError(
            f"cannot open {path} ({error}); the file is truncated or not an .h5ad — re-export it"
        ) from None


def _index_by_obs_names(
    metadata: pd.DataFrame, obs_names: pd.Index, obs_name_column: str, path: Path
) -> pd.DataFrame:
    """``metadata`` indexed by ``obs_name_column``; refuses a column that names none of the file's cells
    or repeats a value."""
    if not obs_names.isin(metadata[obs_name_column]).any():
        raise NeurofmError(
            f"no obs_name of {path.name} (e.g. {obs_names[0]!r}) appears in metadata column "
            f"'{obs_name_column}' (e.g. {metadata[obs_name_column].iloc[0]!r}); set obs_name_column "
            "to the column whose values are the .h5ad obs_names (`neurofm check-ids` shows which matches)"
        )
    duplicated = metadata[obs_name_column].duplicated()
    if duplicated.any():
        raise NeurofmError(
            f"metadata column '{obs_name_column}' repeats {int(duplicated.sum())} value(s) such as "
            f"{metadata[obs_name_column][duplicated].iloc[0]!r}; pick a column that identifies each cell"
        )
    return metadata.set_index(obs_name_column)


def _cells_in_clusters(
    clusters: pd.Series, position: np.ndarray, wanted: list, cluster_column: str, path: Path
) -> np.ndarray:
    """A mask over the file's cells: joined to the metadata (``position`` >= 0 into ``clusters``) and in
    a ``wanted`` cluster. Refuses IDs that match no cell; warns about the IDs that match none when
    others do."""
    in_metadata = position >= 0
    joined_clusters = pd.Series(clusters.to_numpy()[position[in_metadata]])
    keep = np.zeros(position.size, dtype=bool)
    keep[in_metadata] = joined_clusters.isin(wanted).to_numpy()
    if not keep.any():
        present = joined_clusters.value_counts().index[:10].tolist()
        raise NeurofmError(
            f"cluster IDs {wanted} match no cell of {path.name} "
            f"({int(in_metadata.sum())} cells joined to the "
            f"metadata; their most common '{cluster_column}' values: {present}); choose IDs from those"
        )
    found = set(clusters.to_numpy()[position[keep]].tolist())
    if unmatched := [value for value in wanted if value not in found]:
        log.warning(
            "cluster IDs %s match no cell of %s; keeping the %d others", unmatched, path.name, len(found)
        )
    return keep


def _subset_obs(
    obs: pd.DataFrame, joined: pd.DataFrame, kept_clusters: np.ndarray, label_prefix: str
) -> pd.DataFrame:
    """The kept cells' obs: string index, unused categories removed, every ``joined`` metadata column not
    already there, and ``obs['subtype']`` = ``label_prefix`` + cluster ID."""
    obs.index = obs.index.astype(str)
    for column in obs.columns:
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = obs[column].cat.remove_unused_categories()
    for column in joined.columns:
        if column not in obs.columns:
            obs[column] = joined[column].to_numpy()
    obs[keys.SUBTYPE] = pd.Categorical(np.char.add(label_prefix, kept_clusters.astype(str)))
    return obs
