"""Keep the cells of one anatomical region (or any exact value of an obs column)."""

from __future__ import annotations

import anndata as ad
import pandas as pd

from neurofm import keys
from neurofm.errors import NeurofmError


def filter_region(adata: ad.AnnData, *, value: str, column: str = keys.REGION) -> ad.AnnData:
    """Return a copy of the cells whose ``obs[column]`` equals ``value`` exactly.

    Writes ``uns['region_params']`` (column, value, n_cells_before, n_cells_after). ``adata`` is not
    modified. Raises NeurofmError when the column is missing (listing obs columns) or no cell has the
    value (listing the values present with their counts).
    """
    if column not in adata.obs.columns:
        raise NeurofmError(
            f"obs has no column '{column}' (obs columns: {list(adata.obs.columns)}); "
            "set the region column to one of them, or subset with the metadata join first"
        )
    values = adata.obs[column]
    keep = (values.astype(str) == str(value)).to_numpy() & values.notna().to_numpy()
    if not keep.any():
        present = values.value_counts().head(15)
        listing = ", ".join(f"{name!r} ({count})" for name, count in present.items())
        raise NeurofmError(
            f"no cell has obs['{column}'] == {value!r}; values present: {listing or 'none'} — use one of them"
        )
    result = adata[keep].copy()
    for name in result.obs.columns:
        if isinstance(result.obs[name].dtype, pd.CategoricalDtype):
            result.obs[name] = result.obs[name].cat.remove_unused_categories()
    result.uns[keys.REGION_PARAMS] = {
        "column": column,
        "value": str(value),
        "n_cells_before": int(adata.n_obs),
        "n_cells_after": int(result.n_obs),
    }
    return result
