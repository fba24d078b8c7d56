"""Data-preparation steps: load, subset, region filter, dedupe, crop, save.

Each step is one call into :mod:`neurofm.data`; parameters come from the YAML run configuration.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import anndata as ad
import pandas as pd
from zenml import step

from neurofm import io, keys
from neurofm.config import CropConfig, DedupeConfig, SubsetConfig
from neurofm.data import atlas, backed, region
from neurofm.data import crop as crop_module
from neurofm.data import dedupe as dedupe_module
from neurofm.data.pipeline_stores import convert_file_once, convert_files_once, store_anndata_once
from steps._cache import depends_on

log = logging.getLogger(__name__)


@step(cache_policy=depends_on("data"))
def load_data(path: str, fingerprint: str, layer: str | None = None) -> Annotated[ad.AnnData, "raw_cells"]:
    """Read an .h5ad of raw counts (``layers['counts']`` if present, else ``X``).

    ``fingerprint`` (size, mtime and a content hash, from :func:`neurofm.io.file_fingerprint`) is part
    of the cache key so that an edited input file is read again.
    """
    return atlas.load_counts(path, layer=layer)


@step(cache_policy=depends_on("data"))
def subset_clusters(
    path: str, metadata_csv: str, fingerprint: str, subset: SubsetConfig, layer: str | None = None
) -> Annotated[ad.AnnData, "subset_cells"]:
    """Keep the cells of ``subset.cluster_ids`` via the metadata join, reading ``path`` backed.

    Adds ``obs['subtype']`` (e.g. ``cluster_2523``), the metadata columns and ``uns['subset_params']``.
    """
    return backed.subset_by_clusters(
        path,
        metadata_csv,
        cluster_ids=subset.cluster_ids,
        obs_name_column=subset.obs_name_column,
        cluster_column=subset.cluster_column,
        label_prefix=subset.label_prefix,
        chunk_size=subset.chunk_size,
        layer=layer,
    )


@step(cache_policy=depends_on("data"))
def filter_region(adata: ad.AnnData, column: str, value: str | None) -> Annotated[ad.AnnData, "region_cells"]:
    """Keep cells whose ``obs[column] == value`` (all cells when ``value`` is None)."""
    if value is None:
        return adata
    return region.filter_region(adata, column=column, value=value)


@step(cache_policy=depends_on("data"))
def dedupe_ids(adata: ad.AnnData, dedupe: DedupeConfig) -> Annotated[ad.AnnData, "unique_cells"]:
    """Make cell and gene IDs unique (or collapse/drop duplicates); writes ``uns['dedupe_report']``."""
    return dedupe_module.dedupe(adata, **dedupe.model_dump())


@step(cache_policy=depends_on("data"))
def crop_data(
    adata: ad.AnnData, crop: CropConfig
) -> tuple[Annotated[ad.AnnData, "prepared_cells"], Annotated[pd.DataFrame, "sparsity_report"]]:
    """Depth-stratified cell and weighted gene sampling with a before/after sparsity report.

    Writes ``uns['crop_params']``, ``uns['crop_indices']``, ``uns['sparsity_summary']``. With
    ``n_cells`` and ``n_genes`` both None the data pass through, less all-zero cells and genes when
    ``drop_all_zero`` (recorded in ``uns['dropped_empty']``), and the report covers them as they are.
    """
    cropped, report = crop_module.crop_with_report(adata, **crop.model_dump(exclude={"report_csv"}))
    return cropped, report


@step(enable_cache=False)
def save_prepared(
    adata: ad.AnnData, sparsity: pd.DataFrame, out_dir: str, write_report_csv: bool = True
) -> Annotated[str, "prepared_h5ad"]:
    """Write the prepared AnnData to ``<out_dir>/prepared.h5ad`` (atomically) and its sparsity CSV."""
    out = io.ensure_writable_dir(out_dir)
    path = io.write_h5ad(adata, out / "prepared.h5ad")
    if write_report_csv:
        with io.atomic_path(out / "sparsity_report.csv") as tmp:
            sparsity.to_csv(tmp, index=False)
    subtypes = adata.obs[keys.SUBTYPE].value_counts().to_dict() if keys.SUBTYPE in adata.obs else {}
    log.info("prepared %d cells × %d genes → %s %s", adata.n_obs, adata.n_vars, path, subtypes)
    return str(Path(path).resolve())


@step(cache_policy=depends_on("data"))
def convert_cells(
    path: str,
    fingerprint: str,
    selection: dict[str, Any],
    out_dir: str,
    shard_size: int = 65536,
    seed: int = 0,
    layer: str | None = None,
) -> Annotated[dict, "cell_store"]:
    """Convert an .h5ad once into a cell store (``neurofm.data.store.convert``: one streaming pass,
    the cluster subset and region filter applied on the way) and return its reference
    (``{"uri", "manifest_sha256", "n_cells", "n_genes"}``) — never the cells themselves.

    Cached on the source's ``fingerprint`` (``neurofm.io.file_fingerprint``) and the selection; the store
    lives in ``<out_dir>/stores/<key>`` with the key a hash of both, so a changed input gets a new store.
    """
    return convert_file_once(path, fingerprint, selection, out_dir, shard_size, seed, layer).reference()


@step(cache_policy=depends_on("data"))
def convert_files(
    files: list[Any],
    fingerprints: list[str],
    out_dir: str,
    shard_size: int = 65536,
    seed: int = 0,
    layer: str | None = None,
) -> Annotated[dict, "cell_store"]:
    """Convert several .h5ad files once into one cell store of the union of their genes
    (``neurofm.data.store.convert_many``: the cells of all files shuffled together, ``obs['dataset']``
    and ``obs['batch']`` per cell, each file's measured genes in the manifest) and return its reference
    (see ``convert_cells``). Cached on the files' ``fingerprints`` and specs; the store lives in
    ``<out_dir>/stores/many-<key>``, an interrupted conversion resumes there."""
    return convert_files_once(files, fingerprints, out_dir, shard_size, seed, layer).reference()


@step(cache_policy=depends_on("data"))
def store_cells(adata: ad.AnnData, out_dir: str) -> Annotated[dict, "cell_store"]:
    """Small prepared data onto the same path as an atlas: ``adata`` written as a cell store under
    ``<out_dir>/stores/`` (``convert_anndata``); returns its reference (see ``convert_cells``)."""
    return store_anndata_once(adata, out_dir).reference()
