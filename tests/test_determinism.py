"""Determinism on CPU: the same seed and config give bit-identical pre-training metrics, checkpoints and
embeddings; a different seed does not (so the comparison can fail)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neurofm.data.synthetic import make_synthetic_counts
from neurofm.embedding import embed_matrix
from neurofm.model import WEIGHTS_FILE, ModelConfig, load_pretrained
from neurofm.tokenizer import TokenizerConfig
from neurofm.train import METRIC_COLUMNS, TrainConfig, pretrain

TIMING_COLUMNS = {"epoch_time_s", "data_wait_s"}  # wall-clock, the only columns allowed to differ


@pytest.fixture(scope="module")
def small_adata():
    return make_synthetic_counts(n_cells=300, n_genes=120, seed=0)


def _run(adata, out_dir: Path, seed: int = 7):
    model_config = ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_dim=32, dropout=0.1)
    train_config = TrainConfig(
        epochs=2,
        batch_size=32,
        max_tokens_per_cell=48,
        warmup_steps=3,
        seed=seed,
        device="cpu",
        progress=False,
        count_head_epochs=2,
    )
    result = pretrain(adata, TokenizerConfig(), model_config, train_config, out_dir)
    model, tokenizer = load_pretrained(result.last_dir)
    embedding = embed_matrix(model, tokenizer, adata, batch_size=64, device="cpu", progress=False)
    return result, embedding


def _comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in metrics]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, small_adata):
    torch.manual_seed(12345)  # scramble the global RNG between the runs: pretrain must seed everything itself
    first = _run(small_adata, tmp_path_factory.mktemp("first"))
    torch.rand(100)
    np.random.seed(999)
    second = _run(small_adata, tmp_path_factory.mktemp("second"))
    return first, second


def test_same_seed_and_config_give_identical_pretrain_metrics(two_runs):
    (first, _), (second, _) = two_runs
    assert len(first.metrics) == 2
    assert set(first.metrics[0]) == set(METRIC_COLUMNS)
    assert _comparable(first.metrics) == _comparable(second.metrics)  # exact float equality
    assert first.baseline_perplexity == second.baseline_perplexity
    assert all(math.isfinite(row["val_perplexity"]) for row in first.metrics)


def test_same_seed_and_config_give_identical_checkpoints(two_runs):
    (first, _), (second, _) = two_runs
    for name in ("model_dir", "best_dir", "last_dir"):
        a = load_file(str(getattr(first, name) / WEIGHTS_FILE))
        b = load_file(str(getattr(second, name) / WEIGHTS_FILE))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}/{key} differs"
    assert first.demo == second.demo


def test_same_seed_and_config_give_identical_embeddings(two_runs):
    (_, first), (_, second) = two_runs
    assert first.shape == (300, 16)
    np.testing.assert_array_equal(first, second)


def test_a_different_seed_gives_different_metrics(two_runs, small_adata, tmp_path: Path):
    """Guards the tests above against comparing something constant."""
    (first, embedding), _ = two_runs
    other, other_embedding = _run(small_adata, tmp_path, seed=8)
    assert _comparable(other.metrics) != _comparable(first.metrics)
    assert not np.array_equal(other_embedding, embedding)


def test_the_count_heads_gradients_do_not_depend_on_the_threads_timing():
    """``bin_value[bins]``'s backward accumulates into a 21-entry table; with two threads and another
    process on the cores its atomic adds land in a different order each time unless training runs
    torch's deterministic kernels (``neurofm.train._torch_threads``)."""
    import subprocess
    import sys

    from neurofm.embedding import random_encoder_like
    from neurofm.train import _torch_threads

    model = random_encoder_like(ModelConfig(n_genes=800, n_bins=20, d_model=16, n_heads=2, n_layers=1,
                                            ffn_dim=32, max_tokens=16, latent_dim=8))  # fmt: skip
    bins = torch.randint(0, 21, (256, 800), generator=torch.Generator().manual_seed(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with _torch_threads(2):
            assert torch.are_deterministic_algorithms_enabled()
            grads = []
            for _ in range(6):
                model.zero_grad()
                model.expression_features(bins).pow(2).sum().backward()
                grads.append(model.count_head.bin_value.grad.clone())
    finally:
        busy.kill()
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the block
    assert all(torch.equal(grads[0], g) for g in grads[1:])
