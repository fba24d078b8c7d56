"""The cell store's public names in one place (what callers import): an atlas written once, in one
streaming pass, as pre-shuffled shards of sparse counts.

- the format and the reader, :class:`CellStore` and :func:`open_reference`: :mod:`neurofm.data.cell_store`;
- which cells and genes a store keeps, :class:`Selection`: :mod:`neurofm.data.atlas`;
- one ``.h5ad`` → a store, :func:`convert` and :func:`convert_anndata`: :mod:`neurofm.data.convert`;
- several files → one store, :func:`convert_many` and :class:`InputFile`: :mod:`neurofm.data.convert_many`;
- the one-pass, resumable shard writing both share: :mod:`neurofm.data.shards`.
"""

from __future__ import annotations

from neurofm.data.atlas import Selection
from neurofm.data.cell_store import (
    MANIFEST,
    OBS_FILE,
    SHARD_FILES,
    SOURCE_ROW,
    STORE_FORMAT,
    STORE_VERSION,
    CellStore,
    file_sha256,
    open_reference,
)
from neurofm.data.convert import convert, convert_anndata
from neurofm.data.convert_many import CELL_DATASETS_FILE, InputFile, convert_many

__all__ = [
    "CELL_DATASETS_FILE",
    "MANIFEST",
    "OBS_FILE",
    "SHARD_FILES",
    "SOURCE_ROW",
    "STORE_FORMAT",
    "STORE_VERSION",
    "CellStore",
    "InputFile",
    "Selection",
    "convert",
    "convert_anndata",
    "convert_many",
    "file_sha256",
    "open_reference",
]
