"""Atlas files: load raw counts, read the cell metadata, and the cell store's :class:`Selection` (which cells
and genes of a source a store keeps).

Subsetting an .h5ad by cluster without loading it (the backed reads) is :mod:`neurofm.data.backed`; it
uses the counts checks and the metadata reading here (:func:`subset_metadata`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
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
from neurofm.io import file_fingerprint, read_h5ad

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


def as_counts_matrix(matrix: Any) -> sp.csr_matrix:
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
        X=as_counts_matrix(matrix),
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


def subset_metadata(
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

    The metadata is read and the IDs checked as :func:`neurofm.data.backed.subset_by_clusters` does
    (:func:`subset_metadata`); unlike there, a cell named twice in the metadata takes its first row, and
    ``obs['subtype']`` is plain strings, as the stores written so far hold them."""
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
        metadata, wanted = subset_metadata(
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
