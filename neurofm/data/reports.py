"""Reports on datasets: a summary, a cell-ID/metadata overlap check and the atlas plot.

They replace the original project's inspection scripts; each is also a console command
(``neurofm inspect``, ``neurofm check-ids``, ``neurofm atlas-plot``). Summaries are plain JSON-ready dicts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm import keys
from neurofm.data.atlas import metadata_header, read_cell_metadata
from neurofm.data.backed import read_obs_names
from neurofm.errors import NeurofmError
from neurofm.io import check_h5ad_path

log = logging.getLogger(__name__)


def _matrix_stats(adata: ad.AnnData) -> dict[str, Any]:
    """dtype, storage format and non-zero count of X without loading a backed X."""
    matrix = adata.X
    if matrix is None:
        return {"x_format": "none", "x_dtype": None, "nonzero_fraction": None}
    size = adata.n_obs * adata.n_vars
    if sp.issparse(matrix):
        nnz, fmt, dtype = matrix.nnz, matrix.format, matrix.dtype
    elif isinstance(matrix, np.ndarray):
        nnz, fmt, dtype = int(np.count_nonzero(matrix)), "dense", matrix.dtype
    elif hasattr(matrix, "group") and "data" in matrix.group:  # backed sparse dataset
        nnz, fmt, dtype = int(matrix.group["data"].shape[0]), f"{matrix.format} (on disk)", matrix.dtype
    else:  # backed dense: counting would read the whole matrix
        nnz, fmt, dtype = None, "dense (on disk)", getattr(matrix, "dtype", None)
    return {
        "x_format": fmt,
        "x_dtype": None if dtype is None else str(dtype),
        "nonzero_fraction": None if nnz is None or not size else round(nnz / size, 6),
    }


def summarize(
    adata: ad.AnnData, path: str | os.PathLike | None = None, value_counts_column: str | None = None
) -> dict[str, Any]:
    """A JSON-ready summary: n_cells, n_genes, obs/var columns, layers, obsm and uns keys, X format, dtype
    and non-zero fraction, ``file_size_bytes`` of ``path`` (if given) and ``value_counts`` of
    ``obs[value_counts_column]`` (if given). Works on backed AnnData without loading X.
    """
    summary: dict[str, Any] = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "obs_columns": [str(c) for c in adata.obs.columns],
        "var_columns": [str(c) for c in adata.var.columns],
        "layers": [str(k) for k in adata.layers.keys()],
        "obsm_keys": [str(k) for k in adata.obsm.keys()],
        "uns_keys": [str(k) for k in adata.uns.keys()],
        **_matrix_stats(adata),
    }
    if path is not None:
        summary["file"] = str(path)
        summary["file_size_bytes"] = int(Path(path).stat().st_size)
    if value_counts_column is not None:
        if value_counts_column not in adata.obs.columns:
            raise NeurofmError(
                f"obs has no column '{value_counts_column}' (obs columns: {list(adata.obs.columns)}); "
                "pass one of them as the value-counts column"
            )
        counts = adata.obs[value_counts_column].value_counts(dropna=False)
        summary["value_counts_column"] = value_counts_column
        summary["value_counts"] = {str(k): int(v) for k, v in counts.items()}
    return summary


def write_summary(
    adata: ad.AnnData,
    out_dir: str | os.PathLike,
    value_counts_column: str | None = None,
    source_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`summarize` written to ``<out_dir>/dataset_summary.json`` and returned. A
    ``value_counts_column`` that is not in obs is left out with a warning (the summary then has no value
    counts): a report never stops a pipeline."""
    from neurofm.io import ensure_writable_dir, write_json

    if value_counts_column is not None and value_counts_column not in adata.obs:
        log.warning(
            "reports.value_counts_column %r is not in obs; the summary has no value counts",
            value_counts_column,
        )
        value_counts_column = None
    summary = summarize(adata, path=source_path, value_counts_column=value_counts_column)
    write_json(summary, Path(ensure_writable_dir(out_dir)) / "dataset_summary.json")
    return summary


def _overlap(obs_names: pd.Index, values: pd.Series, n_examples: int) -> dict[str, Any]:
    values = pd.Index(values.astype(str))
    in_obs = values.isin(obs_names)
    in_metadata = obs_names.isin(values)
    return {
        "n_metadata_values": int(values.size),
        "n_unique_metadata_values": int(values.nunique()),
        "n_obs_matched": int(in_metadata.sum()),
        "n_obs_missing_from_metadata": int((~in_metadata).sum()),
        "n_metadata_missing_from_obs": int((~in_obs).sum()),
        "examples_obs_missing": obs_names[~in_metadata][:n_examples].tolist(),
        "examples_metadata_missing": values[~in_obs][:n_examples].tolist(),
    }


def check_ids(
    h5ad_path: str | os.PathLike,
    metadata_csv: str | os.PathLike,
    obs_name_column: str = keys.CELL_LABEL,
    barcode_column: str = keys.CELL_BARCODE,
    n_examples: int = 5,
) -> dict[str, Any]:
    """How well the .h5ad's obs_names match the metadata's cell labels and barcodes (X is not read).

    Returns ``n_obs``, ``n_metadata_rows``, ``n_duplicate_obs_names``, one overlap block per metadata column
    (``obs_name_column`` and ``barcode_column`` when present: matched / missing counts and example misses),
    ``n_duplicate_barcodes`` and ``best_column`` — the column matching most obs_names, None when none does.
    """
    path = check_h5ad_path(h5ad_path)
    columns = [obs_name_column] + (
        [barcode_column] if barcode_column and barcode_column != obs_name_column else []
    )
    header = metadata_header(metadata_csv)
    present = [c for c in columns if c in header]
    metadata = read_cell_metadata(metadata_csv, required_columns=[obs_name_column], usecols=present)
    try:
        with h5py.File(path, "r") as handle:
            obs_names = read_obs_names(handle)
    except (OSError, KeyError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise NeurofmError(
            f"cannot read the obs index of {path} ({reason}); the file is truncated or not an .h5ad — re-export it"
        ) from None
    result: dict[str, Any] = {
        "h5ad": str(path),
        "metadata_csv": str(metadata_csv),
        "n_obs": int(obs_names.size),
        "n_metadata_rows": int(len(metadata)),
        "n_duplicate_obs_names": int(obs_names.duplicated().sum()),
    }
    for column in present:
        result[column] = _overlap(obs_names, metadata[column], n_examples)
    if barcode_column in metadata:
        result["n_duplicate_barcodes"] = int(metadata[barcode_column].duplicated().sum())
    matched = {column: result[column]["n_obs_matched"] for column in present}
    best = max(matched, key=matched.get)
    result["best_column"] = best if matched[best] > 0 else None
    return result


def write_id_check(
    path: str | os.PathLike, metadata_csv: str | os.PathLike, obs_name_column: str, out_dir: str | os.PathLike
) -> dict[str, Any]:
    """:func:`check_ids` written to ``<out_dir>/barcode_check.json`` and returned."""
    from neurofm.io import ensure_writable_dir, write_json

    result = check_ids(path, metadata_csv, obs_name_column=obs_name_column)
    write_json(result, Path(ensure_writable_dir(out_dir)) / "barcode_check.json")
    return result


def atlas_cells(
    metadata_csv: str | os.PathLike,
    cluster_csv: str | os.PathLike,
    annotation_csv: str | os.PathLike,
    cluster_column: str = keys.CLUSTER_ALIAS,
) -> pd.DataFrame:
    """Metadata cells with ``x``, ``y``, ``cluster_alias`` and ``base_name`` — the cluster's annotation
    description before " (" (its name when there is no description; "unannotated" when missing).

    ``cluster.csv`` maps cluster_alias → label; ``cluster_annotation_term.csv`` maps label → description.
    """
    metadata = read_cell_metadata(metadata_csv, required_columns=(cluster_column, keys.X_COORD, keys.Y_COORD))
    metadata = metadata[[cluster_column, keys.X_COORD, keys.Y_COORD]]
    clusters = _read_table(cluster_csv, (keys.CLUSTER_ALIAS, keys.CLUSTER_LABEL), "cluster.csv")
    terms = _read_table(annotation_csv, (keys.CLUSTER_LABEL,), "cluster_annotation_term.csv")
    text_column = keys.TERM_DESCRIPTION if keys.TERM_DESCRIPTION in terms else keys.TERM_NAME
    if text_column not in terms:
        raise NeurofmError(
            f"{annotation_csv} has neither a '{keys.TERM_DESCRIPTION}' nor a '{keys.TERM_NAME}' column; "
            "pass the atlas cluster_annotation_term.csv"
        )
    base = terms.drop_duplicates(keys.CLUSTER_LABEL).set_index(keys.CLUSTER_LABEL)[text_column].astype(str)
    base = base.str.split(" (", n=1, regex=False).str[0].str.strip()
    label_of = clusters.drop_duplicates(keys.CLUSTER_ALIAS).set_index(keys.CLUSTER_ALIAS)[keys.CLUSTER_LABEL]
    label_of.index = label_of.index.astype(str)
    labels = label_of.reindex(metadata[cluster_column].astype(str)).to_numpy()
    names = base.reindex(labels.astype(str)).fillna("unannotated").to_numpy()
    return pd.DataFrame(
        {
            keys.CLUSTER_ALIAS: metadata[cluster_column].to_numpy(),
            keys.X_COORD: metadata[keys.X_COORD].to_numpy(),
            keys.Y_COORD: metadata[keys.Y_COORD].to_numpy(),
            "base_name": names,
        }
    )


def _read_table(path: str | os.PathLike, required: Sequence[str], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise NeurofmError(f"{what} file {path} does not exist; pass the atlas {what}")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise NeurofmError(
            f"cannot read {path} as CSV ({str(error).splitlines()[0][:100]}); pass the atlas {what}"
        ) from None
    if missing := [c for c in required if c not in table.columns]:
        raise NeurofmError(
            f"{path.name} lacks column(s) {missing} (columns: {list(table.columns)}); pass the atlas {what}"
        )
    return table


def atlas_plot(
    metadata_csv: str | os.PathLike,
    cluster_csv: str | os.PathLike,
    annotation_csv: str | os.PathLike,
    out_png: str | os.PathLike,
    top_k: int = 10,
    highlight_clusters: Sequence[int] = (),
    cluster_column: str = keys.CLUSTER_ALIAS,
) -> Path:
    """Draw the atlas: cells at metadata x/y coloured by the ``top_k`` most populous base cluster names,
    the rest grey, the cells of ``highlight_clusters`` as hollow black circles. Returns the PNG path."""
    from neurofm.plots import plot_atlas

    cells = atlas_cells(metadata_csv, cluster_csv, annotation_csv, cluster_column=cluster_column)
    highlight = [str(value) for value in highlight_clusters]
    if highlight and not cells[keys.CLUSTER_ALIAS].astype(str).isin(highlight).any():
        raise NeurofmError(
            f"highlight clusters {list(highlight_clusters)} match no cell in {Path(metadata_csv).name}; "
            f"choose IDs from its '{cluster_column}' column"
        )
    return plot_atlas(cells, out_png, top_k=top_k, highlight_clusters=highlight_clusters)
