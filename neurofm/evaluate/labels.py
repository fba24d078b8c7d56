"""Cell labels for evaluation: one column of ``adata.obs``, optionally mapped to coarser classes."""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd

from neurofm.errors import NeurofmError


def resolve_labels(
    adata: ad.AnnData, label_column: str, mapping: Mapping[str, str] | None = None
) -> np.ndarray:
    """Return one string label per cell from ``adata.obs[label_column]``, mapped through ``mapping``.

    ``mapping`` (e.g. ``{"cluster_2523": "excitatory", "cluster_210": "inhibitory"}``) renames raw
    values to classes; every raw value present must be a key of it. Without a mapping the raw values
    are used as they are (converted to ``str``).

    Returns an object array of length ``adata.n_obs`` in ``obs`` order. Nothing is written to ``adata``.

    Raises :class:`NeurofmError` when the column is missing (the message lists the columns there are),
    when a cell has no label (NaN/None/empty), when a raw value is not covered by ``mapping``, or when
    fewer than two classes remain.
    """
    if label_column not in adata.obs.columns:
        available = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise NeurofmError(
            f"label column {label_column!r} is not in obs; pick one of: {available} (set --label-col)"
        )
    column = adata.obs[label_column]
    missing = column.isna().to_numpy()
    values = column.astype(object).to_numpy()
    missing |= np.array([isinstance(value, str) and value.strip() == "" for value in values], dtype=bool)
    if missing.any():
        first = [str(name) for name in adata.obs_names[missing][:3]]
        raise NeurofmError(
            f"{int(missing.sum())} cells have no value in obs[{label_column!r}] (e.g. {', '.join(first)}); "
            "drop them before evaluating or choose a fully labelled column"
        )
    raw = np.array([str(value) for value in values], dtype=object)
    if mapping is not None:
        mapping = {str(key): str(value) for key, value in mapping.items()}
        uncovered = sorted(set(pd.unique(raw)) - set(mapping))
        if uncovered:
            shown = ", ".join(uncovered[:5]) + (" …" if len(uncovered) > 5 else "")
            raise NeurofmError(
                f"labels {shown} in obs[{label_column!r}] are not covered by the label mapping "
                f"(keys: {', '.join(sorted(mapping))}); add them to the mapping or subset the cells"
            )
        labels = np.array([mapping[value] for value in raw], dtype=object)
    else:
        labels = raw
    classes = pd.unique(labels)
    if len(classes) < 2:
        raise NeurofmError(
            f"obs[{label_column!r}] has a single class ({classes[0]!r}) after mapping; the probe needs two "
            "or more classes — choose another label column or a mapping that keeps classes apart"
        )
    return labels


def check_labels(labels: np.ndarray, n_cells: int | None = None) -> np.ndarray:
    """Return ``labels`` as a 1-D object array of strings, checking length and that ≥ 2 classes exist."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise NeurofmError(
            f"labels must be one value per cell (1-D), got shape {labels.shape}; pass a vector"
        )
    if n_cells is not None and labels.shape[0] != n_cells:
        raise NeurofmError(
            f"{labels.shape[0]} labels for {n_cells} cells; labels and embeddings must cover the same cells"
        )
    if pd.isna(labels).any():
        raise NeurofmError("labels contain NaN/None; drop unlabelled cells before evaluating")
    labels = np.array([str(value) for value in labels], dtype=object)
    if len(np.unique(labels)) < 2:
        raise NeurofmError(
            "labels have a single class; the probe needs two or more — choose another label column"
        )
    return labels
