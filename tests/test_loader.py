"""The streaming loader: bins equal the tokenizer's, seeded order, exactly-once epochs, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofm.data.store import CellStore, convert
from neurofm.errors import NeurofmError
from neurofm.stream import (
    CellStream,
    StreamConfig,
    StreamLoader,
    densify,
    fit_tokenizer,
    validation_rows,
)
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig

SMALL = StreamConfig(batch_size=40, block_size=16, buffer_blocks=4, val_fraction=0.1, seed=5)


@pytest.fixture(scope="module")
def store(tmp_path_factory, chunked_atlas_files) -> CellStore:
    out = tmp_path_factory.mktemp("loader") / "store"
    convert(chunked_atlas_files.counts_h5ad, out, shard_size=700, seed=2)
    return CellStore(out)


@pytest.fixture(scope="module")
def tokenizer(store) -> ExpressionTokenizer:
    val = validation_rows(store.n_cells, SMALL.val_fraction, SMALL.seed, SMALL.max_val_cells)
    return fit_tokenizer(store, TokenizerConfig(constant_genes="keep"), exclude_rows=val, seed=1)


def _rows(batches) -> list[np.ndarray]:
    return [batch["rows"].numpy() for batch in batches]


@pytest.mark.parametrize("binning", ["quantile", "quantile_nonzero"])
def test_fit_equals_tokenizer_fit_on_the_sample_and_streamed_bins_equal_transform(store, binning):
    config = TokenizerConfig(binning=binning, constant_genes="keep")
    fitted = fit_tokenizer(store, config, max_cells=900, seed=4, chunk_values=900 * 37)  # several chunks
    sample = np.sort(np.random.default_rng([4, 11]).choice(store.n_cells, size=900, replace=False))
    reference = ExpressionTokenizer(config).fit(store.to_anndata(sample))
    assert np.array_equal(fitted.bin_edges, reference.bin_edges)
    expected = fitted.transform(store.to_anndata())
    stream = CellStream(store, fitted, SMALL)
    n_seen = 0
    for batch in stream:
        rows = batch["rows"].numpy()
        assert batch["bins"].dtype == torch.int16
        np.testing.assert_array_equal(batch["bins"].numpy(), expected[rows])
        n_seen += rows.size
    assert n_seen == stream.n_train_cells
    validation = np.concatenate([b["rows"].numpy() for b in stream.validation_batches(64)])
    np.testing.assert_array_equal(validation, stream.val_rows)
    np.testing.assert_array_equal(
        np.concatenate([b["bins"].numpy() for b in stream.validation_batches(64)]), expected[stream.val_rows]
    )


def test_same_seed_same_batches_next_epoch_new_order(store, tokenizer):
    first = _rows(CellStream(store, tokenizer, SMALL))
    again = _rows(CellStream(store, tokenizer, SMALL))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    stream = CellStream(store, tokenizer, SMALL)
    stream.set_epoch(1)
    second_epoch = np.concatenate(_rows(stream))
    assert not np.array_equal(np.concatenate(first), second_epoch)
    assert sorted(second_epoch) == sorted(np.concatenate(first))
    other_seed = StreamConfig(**{**SMALL.__dict__, "seed": 6})
    assert not np.array_equal(
        np.concatenate(_rows(CellStream(store, tokenizer, other_seed)))[:50], np.concatenate(first)[:50]
    )


def test_every_training_row_once_per_epoch_across_two_ranks_and_two_workers(store, tokenizer):
    seen = []
    for rank in range(2):
        stream = CellStream(store, tokenizer, SMALL, rank=rank, world_size=2, num_workers=2)
        loader = StreamLoader(stream, num_workers=2)
        rows = _rows(loader)
        assert len(rows) == stream.batches_per_epoch(0)
        seen.append(np.concatenate(rows))
    everything = np.concatenate(seen)
    val = validation_rows(store.n_cells, SMALL.val_fraction, SMALL.seed, SMALL.max_val_cells)
    assert everything.size == store.n_cells - val.size
    assert np.unique(everything).size == everything.size
    assert np.intersect1d(everything, val).size == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_equals_an_uninterrupted_pass(store, tokenizer, num_workers):
    def loader():
        stream = CellStream(store, tokenizer, SMALL, num_workers=num_workers)
        return StreamLoader(stream, num_workers=num_workers)

    uninterrupted = loader()
    reference = _rows(uninterrupted) + _rows(uninterrupted)  # two epochs
    assert uninterrupted.state_dict()["epoch"] == 2
    for stop_after in (1, 7, len(reference) // 2 - 1):
        interrupted = loader()
        got = []
        for batch in interrupted:
            got.append(batch["rows"].numpy())
            if len(got) == stop_after:
                break
        state = interrupted.state_dict()
        assert state["batches_consumed"] == stop_after and state["epoch"] == 0
        resumed = loader()
        resumed.load_state_dict(state)
        got += _rows(resumed) + _rows(resumed)
        assert len(got) == len(reference)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))


def test_resume_refuses_a_position_from_other_settings(store, tokenizer):
    loader = StreamLoader(CellStream(store, tokenizer, SMALL))
    state = {**loader.state_dict(), "batch_size": 99}
    with pytest.raises(NeurofmError, match="batch_size"):
        loader.load_state_dict(state)


def test_tokenizer_with_other_genes_is_refused(store, tokenizer):
    other = ExpressionTokenizer(tokenizer.config)
    other.gene_ids, other.bin_edges = tokenizer.gene_ids[::-1].copy(), tokenizer.bin_edges
    with pytest.raises(NeurofmError, match="genes differ"):
        CellStream(store, other, SMALL)


def test_sparse_batches_densify_to_the_dense_ones(store, tokenizer):
    dense = list(CellStream(store, tokenizer, SMALL))
    sparse_stream = CellStream(store, tokenizer, StreamConfig(**{**SMALL.__dict__, "output": "sparse"}))
    sparse = list(sparse_stream)
    assert len(dense) == len(sparse)
    for d, s in zip(dense, sparse, strict=True):
        assert set(s) >= {"indptr", "genes", "nonzero_bins"} and "bins" not in s
        assert s["nonzero_bins"].numel() == s["indptr"][-1]
        np.testing.assert_array_equal(densify(s, sparse_stream.zero_bins).numpy(), d["bins"].numpy())
    with pytest.raises(NeurofmError, match="output"):
        StreamConfig(output="csr").validate()


def test_common_batches_is_the_smallest_rank_count(store, tokenizer):
    counts = [
        CellStream(store, tokenizer, SMALL, rank=rank, world_size=3).batches_per_epoch(0) for rank in range(3)
    ]
    assert CellStream(store, tokenizer, SMALL, rank=1, world_size=3).common_batches(0) == min(counts)
