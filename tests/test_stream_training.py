"""Training from the cell store: the pipeline's store steps pass references, tokenize and pretrain share
one split, a store directory trains like the AnnData it came from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neurofm.data.store import open_reference
from neurofm.errors import NeurofmError
from neurofm.io import file_fingerprint, write_h5ad
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from neurofm.train import TrainConfig, fit_training_tokenizer, pretrain, split_store
from tests.test_tokenizer import synthetic_counts

TINY_MODEL = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_dim=32)


def _train_config(**overrides) -> TrainConfig:
    settings = dict(
        epochs=1,
        batch_size=16,
        max_tokens_per_cell=16,
        progress=False,
        device="cpu",
        num_threads=1,
        count_head_epochs=2,
    )
    return TrainConfig(**{**settings, **overrides})


def test_convert_step_returns_a_reference_not_cells_and_is_keyed_on_the_source(tmp_path):
    from steps.data import convert_cells

    path = write_h5ad(synthetic_counts(n_cells=50, n_genes=12), tmp_path / "cells.h5ad")
    selection = {"region": None}
    reference = convert_cells.entrypoint(str(path), file_fingerprint(path), selection, str(tmp_path / "out"))
    assert set(reference) == {"uri", "manifest_sha256", "n_cells", "n_genes"}
    assert (reference["n_cells"], reference["n_genes"]) == (50, 12)
    store = open_reference(reference)
    assert store.path.parent == tmp_path / "out" / "stores"
    again = convert_cells.entrypoint(str(path), file_fingerprint(path), selection, str(tmp_path / "out"))
    assert again == reference  # the same source and selection: the same store
    manifest = store.path / "manifest.json"
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**record, "seed": 99}))
    with pytest.raises(NeurofmError, match="changed since it was referenced"):
        open_reference(reference)


def test_store_cells_step_reuses_the_store_of_the_same_cells(tmp_path):
    from steps.data import store_cells

    adata = synthetic_counts(n_cells=40, n_genes=10)
    first = store_cells.entrypoint(adata, str(tmp_path))
    second = store_cells.entrypoint(adata.copy(), str(tmp_path))
    assert first == second
    other = store_cells.entrypoint(adata[:35].copy(), str(tmp_path))
    assert other["uri"] != first["uri"] and other["n_cells"] == 35


def test_tokenize_step_uses_the_split_pretrain_uses(tmp_path):

    from steps.data import store_cells
    from steps.train import tokenize

    adata = synthetic_counts(n_cells=60, n_genes=16)
    reference = store_cells.entrypoint(adata, str(tmp_path))
    config = _train_config()
    saved = tokenize.entrypoint(reference, TokenizerConfig(n_bins=6), config, str(tmp_path))
    fitted = ExpressionTokenizer.load(saved)
    store = open_reference(reference)
    expected = fit_training_tokenizer(store, TokenizerConfig(n_bins=6), config)
    np.testing.assert_array_equal(fitted.bin_edges, expected.bin_edges)
    # the edges are those of the dense fit on the training rows only
    train_rows, val_rows = split_store(store, config)
    dense = ExpressionTokenizer(TokenizerConfig(n_bins=6)).fit(store.to_anndata(train_rows))
    np.testing.assert_allclose(fitted.bin_edges, dense.bin_edges)
    with_val = ExpressionTokenizer(TokenizerConfig(n_bins=6)).fit(store.to_anndata())
    assert not np.allclose(with_val.bin_edges, fitted.bin_edges)  # so leaking validation would show
    # pretrain from the store directory with that tokenizer == pretrain from the AnnData
    from_store = pretrain(store.path, model_config=TINY_MODEL, train_config=config, out_dir=tmp_path / "a",
                          tokenizer=fitted)  # fmt: skip
    from_cells = pretrain(adata, model_config=TINY_MODEL, train_config=config, out_dir=tmp_path / "b",
                          tokenizer=fitted)  # fmt: skip
    assert from_store.metrics[0]["val_loss"] == from_cells.metrics[0]["val_loss"]
    assert not list((tmp_path / "b").glob(".cells-*"))  # the AnnData's temporary store is removed


def test_direct_conversion_only_for_a_user_file_without_crop():
    from pipelines.pretrain import uses_direct_conversion

    from neurofm.config import load_config

    yours = load_config(None, values={"data.path": "cells.h5ad"})
    assert uses_direct_conversion(yours, {"default_data": False})
    assert not uses_direct_conversion(load_config(None), {"default_data": True})
    cropped = load_config(None, values={"data.path": "cells.h5ad", "crop.n_cells": 100})
    assert not uses_direct_conversion(cropped, {"default_data": False})


def test_bad_streaming_settings_are_refused_in_one_line():
    for overrides, field in [
        ({"max_steps": 0}, "max_steps"),
        ({"val_every_steps": -1}, "val_every_steps"),
        ({"stream_output": "csr"}, "stream_output"),
        ({"num_workers": -1}, "num_workers"),
    ]:
        with pytest.raises(NeurofmError, match=field):
            TrainConfig(**overrides).validate()


def test_pretrain_refuses_other_data_types(tmp_path):
    with pytest.raises(NeurofmError, match="AnnData, a CellStore or a store directory"):
        pretrain(np.zeros((3, 3)), train_config=_train_config(), out_dir=tmp_path)


@pytest.mark.parametrize("cell_loss_tokens", ["all", "masked"])
def test_validation_batches_held_in_blocks_equal_the_batches_made_one_by_one(tmp_path, cell_loss_tokens):
    import torch

    from neurofm.data.store import CellStore, convert_anndata
    from neurofm.masking import make_batch
    from neurofm.scoring import validation_batches
    from neurofm.stream import CellStream, densify, fit_tokenizer
    from neurofm.training_data import stream_config_for

    convert_anndata(synthetic_counts(n_cells=150, n_genes=30, seed=2), tmp_path / "store")
    store = CellStore(tmp_path / "store")
    config = _train_config(val_draws=3, cell_loss_tokens=cell_loss_tokens)
    stream = CellStream(store, fit_tokenizer(store, TokenizerConfig()), stream_config_for(config))
    cpu = torch.device("cpu")
    held = validation_batches(stream, 12, TINY_MODEL.mask_token, config, cpu, eval_batch_size=8)
    generator = torch.Generator().manual_seed(config.seed + 1)
    expected = [
        make_batch(densify(part, stream.zero_bins), 12, TINY_MODEL.mask_token, config, generator)
        for part in stream.validation_batches(8)
        for _ in range(config.val_draws)
    ]
    assert len(held) == len(expected) == 3 * -(-stream.val_rows.size // 8)  # the last part is short
    for got, want in zip(held, expected, strict=True):
        for name in ("gene_ids", "input_bins", "labels", "cell_labels"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert (got.cell_labels is got.labels) == (cell_loss_tokens == "masked")
