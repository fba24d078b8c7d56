"""Crop a dataset to a small training set: depth-stratified cells, informative genes.

Cells are sampled within quantile strata of per-cell detected genes (non-zeros), proportionally, so the
crop keeps the depth distribution. Genes must be detected in at least ``min_detection`` of the sampled
cells (the threshold backs off when too few pass) and are drawn without replacement with weight
``detection**alpha * std**beta``, where ``std`` is the standard deviation of log1p(counts per 10k) — common,
variable genes are favoured over rare or flat ones.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm import keys
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path

log = logging.getLogger(__name__)


def sparsity_summary(adata: ad.AnnData) -> dict[str, Any]:
    """Shape, non-zero fraction, median non-zeros per cell / gene of ``adata.X`` (HDF5-serialisable)."""
    matrix = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    n_cells, n_genes = matrix.shape
    per_cell = np.diff(matrix.tocsr().indptr) if n_cells else np.zeros(0)
    per_gene = np.bincount(matrix.tocsr().indices, minlength=n_genes) if n_genes else np.zeros(0)
    total = np.asarray(matrix.sum(axis=1)).ravel()
    size = n_cells * n_genes
    return {
        "shape": np.array([n_cells, n_genes], dtype=np.int64),
        "nonzero_fraction": float(matrix.nnz / size) if size else 0.0,
        "median_nonzero_per_cell": float(np.median(per_cell)) if n_cells else 0.0,
        "median_nonzero_per_gene": float(np.median(per_gene)) if n_genes else 0.0,
        "median_counts_per_cell": float(np.median(total)) if n_cells else 0.0,
    }


def sparsity_report(
    before: ad.AnnData | Mapping[str, Any],
    after: ad.AnnData | Mapping[str, Any],
    path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """One row per stage (``before``, ``after``) of the sparsity summary; written as CSV to ``path`` if given.

    Each argument is an AnnData or a summary dict (as stored in ``uns['sparsity_summary']``).
    """
    rows = []
    for stage, item in (("before", before), ("after", after)):
        summary = sparsity_summary(item) if isinstance(item, ad.AnnData) else dict(item)
        shape = np.asarray(summary.pop("shape"))
        rows.append({"stage": stage, "n_cells": int(shape[0]), "n_genes": int(shape[1]), **summary})
    table = pd.DataFrame(rows)
    if path is not None:
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    return table


def _stratified_cells(
    detected_per_cell: np.ndarray, n_cells: int, n_strata: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted positions of ``n_cells`` cells, allocated to depth strata in proportion to their size."""
    total = detected_per_cell.size
    n_strata = max(1, min(n_strata, total))
    # equal-count quantile strata from ranks (ties broken by position, so strata are never empty)
    ranks = np.argsort(np.argsort(detected_per_cell, kind="stable"), kind="stable")
    strata = ranks * n_strata // total
    sizes = np.bincount(strata, minlength=n_strata)
    quota = sizes * n_cells / total
    allocation = np.floor(quota).astype(int)
    # largest remainders get the cells left over so the allocation sums to n_cells
    leftover = n_cells - allocation.sum()
    allocation[np.argsort(-(quota - allocation), kind="stable")[:leftover]] += 1
    chosen = [
        rng.choice(np.flatnonzero(strata == s), size=allocation[s], replace=False) for s in range(n_strata)
    ]
    return np.sort(np.concatenate(chosen))


def _gene_statistics(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene detection fraction and std of log1p(counts per 10k), sparse throughout."""
    n_cells = matrix.shape[0]
    detection = np.bincount(matrix.indices, minlength=matrix.shape[1]) / n_cells
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    logged = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    logged.data = np.log1p(logged.data * np.repeat(scale, np.diff(logged.indptr)))
    mean = np.asarray(logged.mean(axis=0)).ravel()
    mean_square = np.asarray(logged.multiply(logged).mean(axis=0)).ravel()
    return detection, np.sqrt(np.maximum(mean_square - mean**2, 0.0))


def drop_empty(adata: ad.AnnData) -> ad.AnnData:
    """``adata`` without all-zero cells and all-zero genes (real 10x files have some), logged in one line.

    Returns ``adata`` itself when nothing is empty, else a copy with ``uns['dropped_empty']``:
    ``n_cells``, ``n_genes`` (how many were dropped) and ``genes`` (their names). Raises NeurofmError
    when nothing would be left.
    """
    nonzero = sp.csr_matrix(adata.X != 0)  # explicitly stored zeros do not count
    cells = np.diff(nonzero.indptr) > 0
    genes = np.bincount(nonzero.indices, minlength=adata.n_vars) > 0
    if cells.all() and genes.all():
        return adata
    if not cells.any() or not genes.any():
        raise NeurofmError("every cell or every gene of the data is all-zero; pass a matrix of raw counts")
    dropped_genes = np.asarray(adata.var_names[~genes], dtype=str)
    log.warning(
        "dropping %d all-zero cells and %d all-zero genes (e.g. %s); set crop.drop_all_zero=false to keep them",
        int((~cells).sum()),
        int((~genes).sum()),
        list(dropped_genes[:3]),
    )
    result = adata[cells, genes].copy()
    result.uns[keys.DROPPED_EMPTY] = {
        "n_cells": int((~cells).sum()),
        "n_genes": int((~genes).sum()),
        "genes": dropped_genes.tolist(),
    }
    return result


def crop(
    adata: ad.AnnData,
    n_cells: int | None = None,
    n_genes: int | None = 2000,
    min_detection: float = 0.05,
    detection_backoff: float = 0.5,
    min_detection_floor: float = 0.001,
    alpha: float = 1.0,
    beta: float = 0.5,
    n_strata: int = 4,
    drop_all_zero: bool = True,
    seed: int = 42,
) -> ad.AnnData:
    """Return a cropped copy of ``adata`` (raw counts in ``X``); ``adata`` itself is not modified.

    1. Cells: ``n_cells`` drawn without replacement within ``n_strata`` quantile strata of per-cell
       non-zeros, allocated proportionally (largest remainder), seeded by ``seed``. ``n_cells`` None keeps
       every cell; asking for more cells than exist keeps all of them and logs a warning (clamp, no error).
    2. Genes: candidates are genes detected (count > 0) in at least ``min_detection`` of the sampled cells.
       If fewer than ``n_genes`` pass, the threshold is multiplied by ``detection_backoff`` until enough pass
       or it falls below ``min_detection_floor`` (then any detected gene is a candidate); each back-off is
       logged as a warning, and if still too few genes exist all candidates are kept (warning). ``n_genes``
       are drawn without replacement with weight ``detection**alpha * std**beta`` (std of log1p counts per
       10k); ``n_genes`` None keeps every candidate. Genes keep their original order.
    3. ``drop_all_zero``: genes never detected in the sampled cells are never candidates, and cells left
       with no counts over the chosen genes are dropped (so the result may have fewer than ``n_cells``).
       With ``drop_all_zero=False`` the back-off floor is 0 and all-zero cells are kept.

    Writes ``uns['crop_params']`` (the arguments plus ``min_detection_used``, ``n_cells_input``,
    ``n_genes_input``, ``n_candidate_genes``), ``uns['crop_indices']`` (``cell_indices``, ``gene_indices``:
    positions in the input) and ``uns['sparsity_summary']`` (``before``/``after`` dicts of
    :func:`sparsity_summary`). Raises NeurofmError for invalid sizes/parameters or an empty result.
    """
    _check_crop_arguments(adata, n_cells, n_genes, min_detection, detection_backoff, n_strata)
    rng = np.random.default_rng(seed)
    matrix = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    matrix = matrix.tocsr()
    cell_indices = _sample_cells(matrix, n_cells, n_strata, rng)
    sampled = matrix[cell_indices]

    detection, spread = _gene_statistics(sampled)
    wanted = adata.n_vars if n_genes is None else int(n_genes)
    floor = min_detection_floor if drop_all_zero else 0.0
    candidates, threshold = _candidate_genes(
        detection, wanted, min_detection, detection_backoff, floor, drop_all_zero
    )
    gene_indices = _draw_genes(candidates, detection, spread, n_genes, alpha, beta, rng)
    cell_indices, cropped = _cells_with_counts(cell_indices, sampled[:, gene_indices], drop_all_zero)
    cropped.sort_indices()
    result = ad.AnnData(
        X=cropped,
        obs=adata.obs.iloc[cell_indices].copy(),
        var=adata.var.iloc[gene_indices].copy(),
        uns=copy.deepcopy(dict(adata.uns)),
    )
    result.uns[keys.CROP_PARAMS] = {
        "n_cells": "all" if n_cells is None else int(n_cells),
        "n_genes": "all" if n_genes is None else int(n_genes),
        "min_detection": float(min_detection),
        "min_detection_used": float(threshold),
        "detection_backoff": float(detection_backoff),
        "min_detection_floor": float(min_detection_floor),
        "alpha": float(alpha),
        "beta": float(beta),
        "n_strata": int(n_strata),
        "drop_all_zero": bool(drop_all_zero),
        "seed": int(seed),
        "n_cells_input": int(adata.n_obs),
        "n_genes_input": int(adata.n_vars),
        "n_candidate_genes": int(candidates.size),
    }
    result.uns[keys.CROP_INDICES] = {
        "cell_indices": cell_indices.astype(np.int64),
        "gene_indices": gene_indices.astype(np.int64),
    }
    result.uns[keys.SPARSITY_SUMMARY] = {"before": sparsity_summary(adata), "after": sparsity_summary(result)}
    return result


def crop_with_report(
    adata: ad.AnnData, n_cells: int | None, n_genes: int | None, drop_all_zero: bool = True, **options: Any
) -> tuple[ad.AnnData, pd.DataFrame]:
    """:func:`crop` and its before/after :func:`sparsity_report`. With ``n_cells`` and ``n_genes`` both None
    nothing is sampled: the data pass through, less all-zero cells and genes when ``drop_all_zero``
    (:func:`drop_empty`, recorded in ``uns['dropped_empty']``), and the report covers them as they are."""
    if n_cells is None and n_genes is None:
        kept = drop_empty(adata) if drop_all_zero else adata
        return kept, sparsity_report(adata, kept)
    cropped = crop(adata, n_cells=n_cells, n_genes=n_genes, drop_all_zero=drop_all_zero, **options)
    return cropped, sparsity_report(adata, cropped)


def _check_crop_arguments(
    adata: ad.AnnData,
    n_cells: int | None,
    n_genes: int | None,
    min_detection: float,
    detection_backoff: float,
    n_strata: int,
) -> None:
    """Refuse an empty dataset, sizes that are not positive integers (or None), a detection threshold
    outside [0, 1], a back-off factor outside (0, 1) and fewer than one stratum."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise NeurofmError(
            f"cannot crop an empty dataset ({adata.n_obs} cells × {adata.n_vars} genes); "
            "check the earlier filters"
        )
    for name, value in (("n_cells", n_cells), ("n_genes", n_genes)):
        if value is not None and (
            not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1
        ):
            raise NeurofmError(f"{name}={value!r} must be a positive integer or None (keep all)")
    if not 0.0 <= min_detection <= 1.0 or not 0.0 < detection_backoff < 1.0:
        raise NeurofmError(
            f"min_detection={min_detection} must lie in [0, 1] and "
            f"detection_backoff={detection_backoff} in (0, 1)"
        )
    if n_strata < 1:
        raise NeurofmError(f"n_strata={n_strata} must be at least 1")


def _sample_cells(
    matrix: sp.csr_matrix, n_cells: int | None, n_strata: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted positions of the cells kept: all of them when ``n_cells`` is None or not below the number of
    cells (more than exist: a warning), else a depth-stratified sample (:func:`_stratified_cells`)."""
    n_obs = matrix.shape[0]
    if n_cells is not None and n_cells < n_obs:
        return _stratified_cells(np.diff(matrix.indptr), int(n_cells), n_strata, rng)
    if n_cells is not None and n_cells > n_obs:
        log.warning("crop asked for %d cells but only %d exist; keeping all of them", n_cells, n_obs)
    return np.arange(n_obs)


def _candidate_genes(
    detection: np.ndarray,
    wanted: int,
    min_detection: float,
    detection_backoff: float,
    floor: float,
    drop_all_zero: bool,
) -> tuple[np.ndarray, float]:
    """``(candidate gene positions, detection threshold used)``: genes detected in at least the threshold's
    share of the sampled cells (and in some cell at all with ``drop_all_zero``). The threshold starts at
    ``min_detection`` and is multiplied by ``detection_backoff`` (0 once under ``floor``), with a warning
    each time, while fewer than ``wanted`` genes pass. Raises NeurofmError when no gene is a candidate."""

    def candidates_at(level: float) -> np.ndarray:
        passing = detection >= level
        if drop_all_zero:
            passing &= detection > 0
        return np.flatnonzero(passing)

    threshold = min_detection
    candidates = candidates_at(threshold)
    while candidates.size < wanted and threshold > floor:
        previous = threshold
        threshold = threshold * detection_backoff
        threshold = threshold if threshold >= floor else 0.0
        log.warning(
            "only %d genes are detected in >= %.4g of the sampled cells (%d wanted); "
            "lowering min_detection to %.4g",
            candidates.size,
            previous,
            wanted,
            threshold,
        )
        candidates = candidates_at(threshold)
    if candidates.size == 0:
        raise NeurofmError(
            "no gene is detected in the sampled cells; the crop would be empty — check the input counts"
        )
    return candidates, threshold


def _draw_genes(
    candidates: np.ndarray,
    detection: np.ndarray,
    spread: np.ndarray,
    n_genes: int | None,
    alpha: float,
    beta: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Sorted positions of the genes kept: ``n_genes`` candidates drawn without replacement with weight
    ``detection**alpha * spread**beta``, or every candidate when ``n_genes`` is None or not above their
    number (fewer than ``n_genes``: a warning)."""
    if n_genes is not None and candidates.size < n_genes:
        log.warning(
            "only %d genes pass the detection filter; keeping all %d (%d wanted)",
            candidates.size,
            candidates.size,
            n_genes,
        )
    if n_genes is None or candidates.size <= n_genes:
        return candidates
    weights = detection[candidates] ** alpha * (spread[candidates] + 1e-8) ** beta
    return np.sort(rng.choice(candidates, size=int(n_genes), replace=False, p=weights / weights.sum()))


def _cells_with_counts(
    cell_indices: np.ndarray, cropped: sp.csr_matrix, drop_all_zero: bool
) -> tuple[np.ndarray, sp.csr_matrix]:
    """``cell_indices`` and ``cropped`` without the cells that have no count over the chosen genes when
    ``drop_all_zero`` (how many is logged). Raises NeurofmError when no cell is left."""
    if drop_all_zero:
        nonempty = np.diff(cropped.indptr) > 0
        if not nonempty.all():
            log.info("dropping %d cells with no counts over the chosen genes", int((~nonempty).sum()))
            cell_indices, cropped = cell_indices[nonempty], cropped[nonempty]
    if cropped.shape[0] == 0:
        raise NeurofmError(
            "every sampled cell is all-zero over the chosen genes; the crop would be empty — keep more genes"
        )
    return cell_indices, cropped
