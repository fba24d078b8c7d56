"""The cell stores a pipeline run trains from, each converted once: under ``<out_dir>/stores/``, named by
a hash of what it was converted from, so the same inputs find the same store and changed inputs get a
new one. Each function returns the :class:`~neurofm.data.cell_store.CellStore`; steps pass on its
``reference()`` (``{"uri", "manifest_sha256", "n_cells", "n_genes"}``), never the cells.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from neurofm.data.atlas import Selection
from neurofm.data.cell_store import CellStore
from neurofm.data.convert import convert, convert_anndata
from neurofm.data.convert_many import convert_many

log = logging.getLogger(__name__)

STORES_DIR = "stores"


def _key(values: list[Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def convert_file_once(
    path: str | Path,
    fingerprint: str,
    selection: Mapping[str, Any],
    out_dir: str | Path,
    shard_size: int = 65536,
    seed: int = 0,
    layer: str | None = None,
) -> CellStore:
    """The .h5ad ``path`` converted into ``<out_dir>/stores/<stem>-<key>`` (one streaming pass, the
    ``selection`` — a :class:`~neurofm.data.atlas.Selection` as a dict — applied on the way); the key hashes
    the file's ``fingerprint`` (:func:`neurofm.io.file_fingerprint`), the selection and the settings."""
    key = _key([fingerprint, selection, shard_size, seed, layer])
    target = Path(out_dir) / STORES_DIR / f"{Path(path).stem}-{key}"
    convert(path, target, selection=Selection(**selection), shard_size=shard_size, seed=seed, layer=layer)
    store = CellStore(target)
    log.info("cell store %s: %d cells × %d genes", target, store.n_cells, store.n_genes)
    return store


def convert_files_once(
    files: Sequence[Any],
    fingerprints: Sequence[str],
    out_dir: str | Path,
    shard_size: int = 65536,
    seed: int = 0,
    layer: str | None = None,
) -> CellStore:
    """Several .h5ad ``files`` (paths or specs, see :func:`~neurofm.data.convert_many.convert_many`)
    converted into one store of the union of their genes, ``<out_dir>/stores/many-<key>``; the key hashes
    the files, their ``fingerprints`` and the settings. A finished store is kept, an interrupted one resumes."""
    key = _key([files, fingerprints, shard_size, seed, layer])
    target = Path(out_dir) / STORES_DIR / f"many-{key}"
    convert_many(files, target, shard_size=shard_size, seed=seed, layer=layer)
    store = CellStore(target)
    log.info("cell store %s: %d cells × %d genes from %d files", target, store.n_cells, store.n_genes,
             len(store.datasets))  # fmt: skip
    return store


def anndata_digest(adata: ad.AnnData) -> str:
    """A SHA-256 of the cells: obs and var names, the matrix ``X`` (CSR parts or dense bytes) and the sum of
    ``layers['counts']`` when present."""
    digest = hashlib.sha256()
    digest.update(np.asarray(adata.obs_names).astype(str).tobytes())
    digest.update(np.asarray(adata.var_names).astype(str).tobytes())
    matrix = adata.X
    if sp.issparse(matrix):
        matrix = matrix.tocsr()
        for part in (matrix.indptr, matrix.indices, matrix.data):
            digest.update(np.ascontiguousarray(part).tobytes())
    else:
        digest.update(np.ascontiguousarray(matrix).tobytes())
    if "counts" in adata.layers:
        digest.update(str(adata.layers["counts"].sum()).encode())
    return digest.hexdigest()


def store_anndata_once(adata: ad.AnnData, out_dir: str | Path) -> CellStore:
    """``adata`` (small prepared data) written as a store ``<out_dir>/stores/prepared-<digest>`` (seed 0),
    or the store the same cells were written to before (:func:`anndata_digest`)."""
    target = Path(out_dir) / STORES_DIR / f"prepared-{anndata_digest(adata)[:16]}"
    if not (target / "manifest.json").is_file():  # the same cells were stored before: reuse them
        convert_anndata(adata, target, seed=0)
    store = CellStore(target)
    log.info("cell store %s: %d cells × %d genes", target, store.n_cells, store.n_genes)
    return store
