"""What a pre-training run reads: its cell store (an AnnData converted to one first), the split into
training and validation rows, the tokenizer fit on the training rows and the stream settings.

The split is the stream's fixed seeded validation rows (:func:`neurofm.stream.validation_rows`,
``val_fraction`` capped at ``max_val_cells``) and the rest, the same in every process and on every resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np

from neurofm.data.store import SOURCE_ROW, CellStore, convert_anndata
from neurofm.errors import NeurofmError
from neurofm.store_fit import fit_tokenizer
from neurofm.stream import StreamConfig, validation_rows
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from neurofm.train_config import TrainConfig


def stream_config_for(config: TrainConfig, counts: bool = False) -> StreamConfig:
    """The :class:`~neurofm.stream.StreamConfig` a training run reads its store with (``counts``: the
    raw counts too, for a model with a count head): :meth:`StreamConfig.from_train`."""
    return StreamConfig.from_train(config, counts=counts)


def split_store(store: CellStore, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of ``store``: the stream's fixed seeded validation rows
    (:func:`neurofm.stream.validation_rows`, ``val_fraction`` capped at ``max_val_cells``) and the rest.
    Raises NeurofmError when either side is too small."""
    n_val = min(int(store.n_cells * config.val_fraction), config.max_val_cells)
    if n_val < 1:
        raise NeurofmError(
            f"{store.n_cells} cells are too few for a {config.val_fraction:.0%} validation split (need >= 1 "
            "validation cell); pass more cells or raise val_fraction"
        )
    val_rows = validation_rows(store.n_cells, config.val_fraction, config.seed, config.max_val_cells)
    return np.setdiff1d(np.arange(store.n_cells), val_rows, assume_unique=True), val_rows


def fit_training_tokenizer(
    store: CellStore, tokenizer_config: TokenizerConfig | None, config: TrainConfig
) -> ExpressionTokenizer:
    """The tokenizer ``pretrain`` fits: bin edges on the training rows only (the validation rows of
    :func:`split_store` excluded), a seeded sample of at most 200,000 of them (``fit_tokenizer``)."""
    _, val_rows = split_store(store, config)
    return fit_tokenizer(store, tokenizer_config, exclude_rows=val_rows, seed=config.seed)


def store_from_anndata(adata: ad.AnnData, out_dir: str | os.PathLike) -> CellStore:
    """Small data takes the atlas path: ``adata`` written as a cell store in ``out_dir`` (seed 0, one
    shard), deterministic for the same cells — a resumed run re-creates the same store rows."""
    convert_anndata(adata, out_dir, seed=0)
    return CellStore(out_dir)


def validation_source_rows(adata: ad.AnnData, config: TrainConfig) -> np.ndarray:
    """Positions in ``adata`` of the cells ``pretrain(adata, ...)`` validates on (never trains on), in
    store order (for probes that score held-out cells)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".neurofm-cells-") as scratch:
        store = store_from_anndata(adata, Path(scratch) / "cells")
        _, val_rows = split_store(store, config)
        source = store.read_obs([SOURCE_ROW])[SOURCE_ROW].to_numpy()
        store.close()
    return source[val_rows].astype(np.int64)


def open_data(data, scratch_parent: Path) -> tuple[CellStore, Callable[[], None]]:
    """A CellStore for ``data`` (AnnData → a temporary store under ``scratch_parent``) and its cleanup."""
    if isinstance(data, CellStore):
        return data, lambda: None
    if isinstance(data, ad.AnnData):
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix=".cells-", dir=scratch_parent))
        store = store_from_anndata(data, scratch / "cells")

        def cleanup() -> None:
            store.close()
            shutil.rmtree(scratch, ignore_errors=True)

        return store, cleanup
    if isinstance(data, (str, os.PathLike)):
        return CellStore(data), lambda: None
    raise NeurofmError(
        f"pretrain takes an AnnData, a CellStore or a store directory, not {type(data).__name__}; "
        "convert the data first (neurofm convert)"
    )
