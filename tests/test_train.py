"""Training: masking statistics, a short run whose loss falls, checkpoints, resume, bad settings."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neurofm.errors import NeurofmError
from neurofm.model import ModelConfig, load_pretrained
from neurofm.tokenizer import TokenizerConfig
from neurofm.train import (
    IGNORE_INDEX,
    TrainConfig,
    frequency_table,
    make_batch,
    mask_tokens,
    pretrain,
    sample_genes,
    split_cells,
)
from tests.test_tokenizer import synthetic_counts

# the bin heads alone (the count head has its own tests in tests/test_count_head.py)
SMALL_MODEL = ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64, latent_dim=0)


def small_train_config(**overrides) -> TrainConfig:
    settings = dict(
        epochs=2,
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        max_tokens_per_cell=32,
        progress=False,
        device="cpu",
        num_threads=1,
        count_head_epochs=2,  # the count head's own phase (models with latent_dim > 0), kept short
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_mask_ratio_and_nonzero_share():
    generator = torch.Generator().manual_seed(0)
    bins = torch.randint(0, 20, (500, 200), generator=generator)
    bins[torch.rand(500, 200, generator=generator) < 0.6] = 0  # 60 % zeros, like sparse data
    masked = mask_tokens(bins, 0.15, 0.5, generator)
    assert torch.all(masked.sum(1) == 30)  # int(0.15 * 200) per cell
    nonzero_share = (masked & (bins > 0)).sum().item() / masked.sum().item()
    assert abs(nonzero_share - 0.5) < 0.01
    # cells short of non-zero tokens fill the rest with zeros, and vice versa
    sparse = torch.zeros(1, 200, dtype=torch.long)
    sparse[0, :5] = 3
    masked = mask_tokens(sparse, 0.15, 0.5, generator)
    assert masked.sum() == 30 and masked[0, :5].all()
    dense = torch.ones(1, 200, dtype=torch.long)
    assert mask_tokens(dense, 0.15, 0.5, generator).sum() == 30


def test_masking_differs_per_cell_and_respects_padding():
    generator = torch.Generator().manual_seed(0)
    bins = torch.randint(1, 20, (4, 50), generator=generator)
    padding = torch.zeros(4, 50, dtype=torch.bool)
    padding[:, 40:] = True
    masked = mask_tokens(bins, 0.2, 0.5, generator, padding)
    assert not (masked & padding).any()
    assert torch.all(masked.sum(1) == 8)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in masked}) == 4


def test_batch_samples_distinct_genes_and_labels_only_masked_tokens():
    generator = torch.Generator().manual_seed(0)
    genes = sample_genes(8, 100, 30, generator)
    assert all(len(set(row.tolist())) == 30 for row in genes)
    bins = torch.randint(0, 20, (8, 100), generator=generator)
    batch = make_batch(bins, 30, 20, small_train_config(), generator)
    scored = batch.labels != IGNORE_INDEX
    assert torch.all(batch.input_bins[scored] == 20)
    assert torch.equal(batch.labels[scored], torch.gather(bins, 1, batch.gene_ids)[scored])


def test_split_is_seeded_and_refuses_too_few_cells():
    train, val = split_cells(100, 0.2, 42)
    again_train, _ = split_cells(100, 0.2, 42)
    assert np.array_equal(train, again_train) and len(val) == 20
    assert not set(train) & set(val)
    with pytest.raises(NeurofmError, match="too few"):
        split_cells(8, 0.2, 42)


def test_frequency_table_rows_are_probabilities():
    table = frequency_table(np.array([[0, 1], [0, 2], [1, 2]]), n_bins=3)
    np.testing.assert_allclose(table.sum(1), 1.0)
    assert table[0].argmax() == 0 and table[1].argmax() == 2


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mask_ratio=0.0),
        dict(nonzero_mask_share=1.5),
        dict(epochs=0),
        dict(val_fraction=1.0),
        dict(lr=-1.0),
        dict(max_tokens_per_cell=1),
        dict(cell_loss_weight=-1.0),
        dict(cell_loss_tokens="some"),
        dict(device="tpu"),
    ],
    ids=lambda o: next(iter(o)),
)
def test_out_of_range_settings_are_refused(overrides):
    with pytest.raises(NeurofmError):
        TrainConfig(**overrides).validate()


def test_short_run_loss_falls_and_writes_artifacts(tmp_path):
    adata = synthetic_counts(n_cells=120, n_genes=48)
    result = pretrain(
        adata, TokenizerConfig(n_bins=8), SMALL_MODEL, small_train_config(epochs=6, lr=5e-3), tmp_path
    )
    # (the per-epoch train loss of 96 streamed cells is too noisy to assert on; the fixed validation is not)
    losses = [row["val_loss"] for row in result.metrics]
    assert losses[-1] < losses[0] - 0.02
    assert result.metrics[-1]["val_total_loss"] < result.metrics[0]["val_total_loss"]  # the objective
    assert result.metrics[-1]["val_perplexity"] < result.baseline_perplexity  # context beats the table
    assert math.isfinite(result.baseline_perplexity) and 1 < result.baseline_perplexity < 8
    for path in result.artifacts.values():
        assert Path(path).is_file()
    assert "true" in result.demo
    model, tokenizer = load_pretrained(result.model_dir)
    assert model.config.n_genes == 48 and tokenizer.config.n_bins == 8


def test_the_cell_loss_is_trained_and_logged(tmp_path):
    import torch

    adata = synthetic_counts(n_cells=120, n_genes=48)
    result = pretrain(
        adata, TokenizerConfig(n_bins=8), SMALL_MODEL, small_train_config(epochs=4, lr=5e-3), tmp_path
    )
    rows = result.metrics
    assert all(math.isfinite(row["train_cell_loss"]) and math.isfinite(row["val_cell_loss"]) for row in rows)
    assert rows[-1]["val_cell_loss"] < rows[0]["val_cell_loss"]
    assert rows[-1]["val_total_loss"] == rows[-1]["val_loss"] + rows[-1]["val_cell_loss"]  # weight 1.0
    assert result.best == min(rows, key=lambda row: row["val_total_loss"])
    from neurofm.model import GeneEncoder

    trained, _ = load_pretrained(result.last_dir)
    torch.manual_seed(small_train_config().seed)
    untrained = GeneEncoder(trained.config)  # same seed as pretrain: the initial weights
    assert not torch.equal(trained.cell_head.weight, untrained.cell_head.weight)
    assert not torch.equal(trained.gene_query.weight, untrained.gene_query.weight)


def test_cell_loss_weight_zero_leaves_the_cell_head_untrained(tmp_path):
    import torch

    from neurofm.model import GeneEncoder

    adata = synthetic_counts(n_cells=60, n_genes=24)
    config = small_train_config(epochs=1, cell_loss_weight=0.0, weight_decay=0.0)
    result = pretrain(adata, TokenizerConfig(), SMALL_MODEL, config, tmp_path)
    trained, _ = load_pretrained(result.last_dir)
    torch.manual_seed(config.seed)
    untrained = GeneEncoder(trained.config)  # same seed as pretrain: the initial weights
    assert torch.equal(trained.cell_head.weight, untrained.cell_head.weight)
    assert result.metrics[0]["val_total_loss"] == result.metrics[0]["val_loss"]


def test_a_fitted_tokenizer_can_be_passed_in(tmp_path):
    from neurofm.tokenizer import ExpressionTokenizer

    adata = synthetic_counts(n_cells=60, n_genes=24)
    train, _ = split_cells(adata.n_obs, 0.2, 42)  # any fitted tokenizer is accepted
    tokenizer = ExpressionTokenizer(TokenizerConfig(n_bins=6)).fit(adata, train)
    result = pretrain(
        adata,
        model_config=SMALL_MODEL,
        train_config=small_train_config(epochs=1),
        out_dir=tmp_path,
        tokenizer=tokenizer,
    )
    model, saved = load_pretrained(result.last_dir)
    assert model.config.n_bins == 6 and np.array_equal(saved.bin_edges, tokenizer.bin_edges)


def test_callback_sees_each_validation_and_can_stop_training(tmp_path):
    adata = synthetic_counts(n_cells=60, n_genes=24)
    seen = []

    def stop_after_two(step: int, metrics: dict) -> None:
        seen.append((step, metrics["epoch"], sorted(metrics)))
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt("pruned")

    with pytest.raises(KeyboardInterrupt):
        pretrain(
            adata,
            TokenizerConfig(),
            SMALL_MODEL,
            small_train_config(epochs=5),
            tmp_path,
            on_validation=stop_after_two,
        )
    # 48 training cells in batches of 16: validation (by default) after each epoch of 3 steps
    assert [(step, epoch) for step, epoch, _ in seen] == [(3, 1), (6, 2)]
    assert "val_perplexity" in seen[0][2] and "step" in seen[0][2]
    assert (tmp_path / "last" / "model.safetensors").is_file()


def test_resume_gives_the_same_metrics_and_weights(tmp_path):
    adata = synthetic_counts(n_cells=60, n_genes=24)
    straight = pretrain(adata, TokenizerConfig(), SMALL_MODEL, small_train_config(epochs=2), tmp_path / "a")
    pretrain(adata, TokenizerConfig(), SMALL_MODEL, small_train_config(epochs=1), tmp_path / "b")
    resumed = pretrain(
        adata, TokenizerConfig(), SMALL_MODEL, small_train_config(epochs=2), tmp_path / "b", resume=True
    )
    assert [row["val_loss"] for row in resumed.metrics] == [row["val_loss"] for row in straight.metrics]
    assert resumed.metrics[-1]["train_loss"] == straight.metrics[-1]["train_loss"]
    first, _ = load_pretrained(straight.last_dir)
    second, _ = load_pretrained(resumed.last_dir)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_resume_without_state_or_with_other_settings_is_refused(tmp_path):
    adata = synthetic_counts(n_cells=60, n_genes=24)
    with pytest.raises(NeurofmError, match="nothing to resume"):
        pretrain(adata, TokenizerConfig(), SMALL_MODEL, small_train_config(), tmp_path, resume=True)
    pretrain(adata, TokenizerConfig(), SMALL_MODEL, small_train_config(epochs=1), tmp_path)
    with pytest.raises(NeurofmError, match="differ"):
        pretrain(adata, TokenizerConfig(), SMALL_MODEL, small_train_config(lr=1e-2), tmp_path, resume=True)


def test_resume_state_is_loadable_without_pickle(tmp_path):
    adata = synthetic_counts(n_cells=60, n_genes=24)
    pretrain(adata, TokenizerConfig(), SMALL_MODEL, small_train_config(epochs=1), tmp_path)
    state = torch.load(tmp_path / "resume_state.pt", weights_only=True)
    assert state["step"] == 3 and "optimizer" in state
    assert state["loader"]["epoch"] == 1 and state["loader"]["batches_consumed"] == 0  # epoch 0 done


def test_too_few_cells_are_refused(tmp_path):
    with pytest.raises(NeurofmError):
        pretrain(
            synthetic_counts(n_cells=9, n_genes=24),
            TokenizerConfig(),
            SMALL_MODEL,
            small_train_config(),
            tmp_path,
        )


def test_streamed_frequency_table_equals_the_dense_one_and_skips_validation_rows(tmp_path):
    from neurofm.train import fit_training_tokenizer, split_store, store_from_anndata, stream_frequency_table

    adata = synthetic_counts(n_cells=80, n_genes=30)
    config = small_train_config()
    store = store_from_anndata(adata, tmp_path / "cells")
    train_rows, val_rows = split_store(store, config)
    assert len(val_rows) == 16 and not set(train_rows) & set(val_rows)
    tokenizer = fit_training_tokenizer(store, TokenizerConfig(n_bins=6), config)
    dense = tokenizer.transform(store.to_anndata(train_rows))
    table, n_cells = stream_frequency_table(store, tokenizer, val_rows, chunk_cells=7)
    assert n_cells == 64
    np.testing.assert_allclose(table, frequency_table(dense, 6))
    sampled, n_sampled = stream_frequency_table(store, tokenizer, val_rows, max_cells=20)
    assert n_sampled == 20 and not np.allclose(sampled, table)


def test_step_based_run_validates_every_n_steps_and_resumes_mid_epoch_exactly(tmp_path):
    adata = synthetic_counts(n_cells=60, n_genes=24)  # 48 training cells: 3 steps per epoch

    def config(max_steps):
        return small_train_config(max_steps=max_steps, val_every_steps=2, batch_size=16)

    straight = pretrain(adata, TokenizerConfig(), SMALL_MODEL, config(7), tmp_path / "a")
    assert [(row["step"], row["epoch"]) for row in straight.metrics] == [(2, 1), (4, 2), (6, 2), (7, 3)]
    # stopped after 4 steps (mid-epoch 2; same schedule), then resumed with the loader position of step 4

    def stop_at_4(step, metrics):
        if step == 4:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        pretrain(adata, TokenizerConfig(), SMALL_MODEL, config(7), tmp_path / "b", on_validation=stop_at_4)
    state = torch.load(tmp_path / "b" / "resume_state.pt", weights_only=True)
    assert state["loader"]["epoch"] == 1 and state["loader"]["batches_consumed"] == 1
    resumed = pretrain(adata, TokenizerConfig(), SMALL_MODEL, config(7), tmp_path / "b", resume=True)
    assert [row["step"] for row in resumed.metrics] == [2, 4, 6, 7]
    for key in ("train_loss", "val_loss", "val_cell_loss"):
        assert [row[key] for row in resumed.metrics[2:]] == [row[key] for row in straight.metrics[2:]]
    first, _ = load_pretrained(straight.last_dir)
    second, _ = load_pretrained(resumed.last_dir)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_each_metrics_row_names_the_time_spent_waiting_for_the_loader(tmp_path, monkeypatch):
    import neurofm.stream as stream_module

    adata = synthetic_counts(n_cells=96, n_genes=20, seed=3)
    config = small_train_config(epochs=2, count_head_epochs=0)
    plain = pretrain(
        adata, TokenizerConfig(), ModelConfig(d_model=16, n_heads=2, n_layers=1), config, tmp_path / "a"
    )
    for row in plain.metrics:
        assert 0.0 < row["data_wait_s"] <= row["epoch_time_s"]
    original = stream_module.CellStream.__iter__

    def slow(self):  # a loader 50 ms late with every batch
        for batch in original(self):
            time.sleep(0.05)
            yield batch

    monkeypatch.setattr(stream_module.CellStream, "__iter__", slow)
    slowed = pretrain(
        adata, TokenizerConfig(), ModelConfig(d_model=16, n_heads=2, n_layers=1), config, tmp_path / "b"
    )
    n_batches = [row["step"] for row in slowed.metrics]
    waits = [row["data_wait_s"] for row in slowed.metrics]
    assert waits[0] >= 0.05 * n_batches[0] and waits[1] >= 0.05 * (n_batches[1] - n_batches[0])
