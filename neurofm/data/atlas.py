"""Atlas files: load raw counts, read the cell metadata, subset an .h5ad by cluster without loading it.

The Allen atlas keeps cluster membership and region in ``cell_metadata.csv``, not in the .h5ad, so a
subset is a join: metadata rows whose ``cluster_alias`` is wanted → their ``cell_label`` s → rows of the
.h5ad with those obs_names. :func:`subset_by_clusters` reads only those rows from disk (the file can be
tens of GB), a bounded number of rows at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm import keys
from neurofm.data.region import filter_region
from neurofm.errors import NeurofmError
from neurofm.io import check_h5ad_path, file_fingerprint, read_h5ad

log = logging.getLogger(__name__)

# Column types checked by read_cell_metadata when the column is present.
_INTEGER_COLUMNS = (keys.CLUSTER_ALIAS,)
_NUMERIC_COLUMNS = (keys.X_COORD, keys.Y_COORD)
_STRING_COLUMNS = (keys.CELL_LABEL, keys.CELL_BARCODE, keys.LIBRARY_LABEL)


# --- counts ----------------------------------------------------------------------------------------------


def check_counts(matrix: Any, where: str = "X", layers: Iterable[str] = ()) -> None:
    """Raise NeurofmError unless ``matrix`` holds finite, non-negative, integer values (raw UMI counts)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    fix = "pass raw UMI counts"
    layers = [name for name in layers if f"layers['{name}']" != where]
    if layers:
        fix += f" or set layer= to one of {layers}"
    if not np.issubdtype(values.dtype, np.number):
        raise NeurofmError(f"{where} has non-numeric dtype {values.dtype}; {fix}")
    if np.issubdtype(values.dtype, np.integer):
        if values.size and values.min() < 0:
            raise NeurofmError(f"{where} holds negative values; {fix}")
        return
    finite = np.isfinite(values)
    if not finite.all():
        raise NeurofmError(f"{where} holds {int((~finite).sum())} NaN/infinite values; {fix}")
    if values.size and values.min() < 0:
        raise NeurofmError(f"{where} holds negative values (looks scaled or centred); {fix}")
    fractional = values != np.round(values)
    if fractional.any():
        raise NeurofmError(
            f"{where} holds non-integer values (looks log-normalised, e.g. {values[fractional][0]:.4g}); "
            f"{fix}"
        )


def _as_counts_matrix(matrix: Any) -> sp.csr_matrix:
    matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
    if matrix.dtype != np.float32:
        matrix = matrix.astype(np.float32)
    matrix.sort_indices()
    return matrix


def load_counts(path: str | os.PathLike, layer: str | None = None) -> ad.AnnData:
    """Read an .h5ad of raw counts into memory with the counts in ``X`` (CSR float32).

    ``layer`` None takes ``layers['counts']`` when the file has it, else ``X``. The counts are checked
    (finite, non-negative, integer) and other layers are dropped. Writes ``uns['load_params']``
    (``input_file``, ``source``). Raises NeurofmError for a missing/non-h5ad/corrupt file, a missing
    layer, non-count values or an empty matrix.
    """
    adata = read_h5ad(path)
    layers = list(adata.layers.keys())
    if layer is None:
        layer = keys.COUNTS_LAYER if keys.COUNTS_LAYER in adata.layers else None
    if layer is not None and layer not in adata.layers:
        raise NeurofmError(
            f"{path} has no layer '{layer}' (layers: {layers or 'none'}); "
            "set layer= to one of them or None for X"
        )
    where = "X" if layer is None else f"layers['{layer}']"
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise NeurofmError(
            f"{path} holds an empty matrix ({adata.n_obs} cells × {adata.n_vars} genes); "
            "pass a non-empty .h5ad"
        )
    check_counts(matrix, where=where, layers=layers)
    counts = ad.AnnData(
        X=_as_counts_matrix(matrix),
        obs=adata.obs,
        var=adata.var,
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        varm=dict(adata.varm),
    )
    counts.uns[keys.LOAD_PARAMS] = {"input_file": str(Path(path).resolve()), "source": where}
    return counts


# --- metadata ----------------------------------------------------------------------------------------------


def metadata_header(path: str | os.PathLike) -> list[str]:
    """Column names of a metadata CSV (reads one line); NeurofmError if it is missing or not a CSV."""
    path = Path(path)
    if not path.is_file():
        raise NeurofmError(f"metadata file {path} does not exist; pass the atlas cell_metadata.csv")
    try:
        return pd.read_csv(path, nrows=0).columns.tolist()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise NeurofmError(
            f"cannot read {path} as CSV ({str(error).splitlines()[0][:120]}); "
            "pass a comma-separated cell_metadata.csv"
        ) from None


def read_cell_metadata(
    path: str | os.PathLike,
    required_columns: Sequence[str] = (keys.CELL_LABEL, keys.CLUSTER_ALIAS),
    usecols: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read ``cell_metadata.csv`` and check it: the required columns exist, and where present
    ``cluster_alias`` is integer, ``x``/``y`` numeric; label/barcode/library columns are read as strings.

    ``usecols`` limits the columns read (the real file has ~3 million rows); required columns are always
    read. Raises NeurofmError naming the missing columns and those present.
    """
    path = Path(path)
    header = metadata_header(path)
    missing = [column for column in required_columns if column not in header]
    if missing:
        raise NeurofmError(
            f"metadata {path.name} lacks column(s) {missing} (columns: {header[:20]}); "
            "pass a metadata file with these columns, or name its columns in the config "
            "(subset.obs_name_column / subset.cluster_column)"
        )
    columns = None if usecols is None else list(dict.fromkeys([*required_columns, *usecols]))
    if columns is not None and (absent := [c for c in columns if c not in header]):
        raise NeurofmError(
            f"metadata {path.name} lacks column(s) {absent} (columns: {header[:20]}); drop them from usecols"
        )
    string_columns = {c: str for c in _STRING_COLUMNS if c in header}
    try:
        table = pd.read_csv(path, usecols=columns, dtype=string_columns, low_memory=False)
    except (pd.errors.ParserError, ValueError) as error:
        raise NeurofmError(
            f"cannot parse {path} ({str(error).splitlines()[0][:120]}); check the CSV is well formed"
        ) from None
    for column in _INTEGER_COLUMNS:
        if column in table and not pd.api.types.is_integer_dtype(table[column]):
            bad = table[column][
                pd.to_numeric(table[column], errors="coerce").isna()
                | (pd.to_numeric(table[column], errors="coerce") % 1 != 0)
            ]
            if len(bad):
                raise NeurofmError(
                    f"metadata column '{column}' must hold integer c"
                    f"luster IDs but has {len(bad)} other value(s) "
                    f"such as {bad.iloc[0]!r}; "
                    "fix the CSV or point cluster_column at the integer alias column"
                )
            table[column] = pd.to_numeric(table[column]).astype(np.int64)
    for column in _NUMERIC_COLUMNS:
        if column in table and not pd.api.types.is_numeric_dtype(table[column]):
            raise NeurofmError(
                f"metadata column '{column}' must be numeric (got e.g. {table[column].iloc[0]!r}); "
                "fix the CSV"
            )
    return table


def _is_int_like(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, (float, np.floating)):
        return float(value).is_integer()
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _normalise_cluster_ids(cluster_ids: Any, integer_column: bool) -> list:
    """IDs as a list of int (for an integer metadata column) or str; NeurofmError for the wrong type."""
    if isinstance(cluster_ids, (str, int, np.integer)):
        cluster_ids = [cluster_ids]
    try:
        cluster_ids = list(cluster_ids)
    except TypeError:
        raise NeurofmError(f"cluster_ids must be a list like [2523, 210], got {cluster_ids!r}") from None
    if not cluster_ids:
        raise NeurofmError("cluster_ids is empty; list at least one cluster alias such as [2523, 210]")
    if not integer_column:
        return [str(value) for value in cluster_ids]
    if bad := [value for value in cluster_ids if not _is_int_like(value)]:
        raise NeurofmError(
            f"cluster ID {bad[0]!r} is not an integer cluster alias; list IDs as integers like [2523, 210] "
            "(without a 'cluster_' prefix)"
        )
    return list(dict.fromkeys(int(float(value)) for value in cluster_ids))


# --- backed subset -----------------------------------------------------------------------------------------


def _read_obs_names(handle: h5py.File) -> pd.Index:
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
    metadata, wanted = _subset_metadata(
        metadata_csv, cluster_ids, obs_name_column, cluster_column, metadata_columns
    )
    with open_h5ad(path) as handle:
        try:
            obs_names = _read_obs_names(handle)
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
    adata = ad.AnnData(X=_as_counts_matrix(counts), obs=obs, var=var, uns=uns)
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


def _subset_metadata(
    metadata_csv: str | os.PathLike,
    cluster_ids: Sequence[int] | int,
    obs_name_column: str,
    cluster_column: str,
    metadata_columns: Sequence[str] | None,
) -> tuple[pd.DataFrame, list]:
    """``(metadata, wanted cluster IDs)``: the metadata columns read (obs names as strings, cluster IDs as
    strings unless the column is integer) and ``cluster_ids`` normalised to the column's type."""
    usecols = None if metadata_columns is None else [*metadata_columns]
    metadata = read_cell_metadata(
        metadata_csv, required_columns=(obs_name_column, cluster_column), usecols=usecols
    )
    integer_column = pd.api.types.is_integer_dtype(metadata[cluster_column])
    wanted = _normalise_cluster_ids(cluster_ids, integer_column)
    if not integer_column:
        metadata[cluster_column] = metadata[cluster_column].astype(str)
    metadata[obs_name_column] = metadata[obs_name_column].astype(str)
    return metadata, wanted


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


# --- the cell store's selection (neurofm.data.convert) --------------------------------------------------


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


def read_frame(handle: h5py.File, name: str, path: Path) -> pd.DataFrame:
    try:
        return ad.io.read_elem(handle[name])
    except Exception as error:  # h5py/anndata raise many types for broken files
        raise NeurofmError(
            f"{path} has no readable {name} table ({type(error).__name__}); pass an AnnData .h5ad"
        ) from None


def select_cells(obs: pd.DataFrame, selection: Selection, path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(sorted source rows kept, their obs after the metadata join), reusing the prepare rules.

    The metadata is read and the IDs checked as :func:`subset_by_clusters` does (``_subset_metadata``);
    unlike there, a cell named twice in the metadata takes its first row, and ``obs['subtype']`` is
    plain strings, as the stores written so far hold them."""
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
        metadata, wanted = _subset_metadata(
            selection.metadata_csv,
            selection.cluster_ids,
            selection.obs_name_column,
            selection.cluster_column,
            None,
        )
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


def select_genes(var: pd.DataFrame, genes: Sequence[str] | None, path: Path) -> np.ndarray | None:
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
