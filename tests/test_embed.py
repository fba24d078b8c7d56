"""Embeddings: every gene used, equal to the per-token reference, independent of batch size and batch mates,
written to obsm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofm import keys
from neurofm.embedding import embed, embed_bins, embed_matrix, feature_table, random_encoder_like
from neurofm.errors import NeurofmError
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from tests.test_tokenizer import synthetic_counts

CONFIG = ModelConfig(n_genes=50, n_bins=20, d_model=32, n_heads=4, n_layers=2, ffn_dim=64, max_tokens=16)


@pytest.fixture()
def setup():
    adata = synthetic_counts(n_cells=70, n_genes=50)
    return random_encoder_like(CONFIG, seed=0), ExpressionTokenizer().fit(adata), adata


def per_token_reference(model, bins: torch.Tensor, pooling: str) -> torch.Tensor:
    """The straightforward computation: every token through ``cell_features``, then pooled."""
    gene_ids = torch.arange(bins.shape[1]).expand(bins.shape[0], -1)
    bins = bins.long()
    expression = model.expression_features(bins)  # the count head's read of every gene, whatever the pooling
    if pooling == "max":
        return model.embedding_from_cell(model.cell_features(gene_ids, bins).amax(1), expression)
    if pooling == "mean_nonzero":
        zero = bins == 0
        zero[zero.all(1)] = False  # cells with every bin 0: plain mean
        return model.embedding_from_cell(model.pool(model.cell_features(gene_ids, bins), ~zero), expression)
    return model.cell_embedding(gene_ids, bins)  # "mean": what the cell head is trained on


@pytest.mark.parametrize("pooling", ["mean", "mean_nonzero", "max"])
def test_embed_bins_equals_the_per_token_reference(setup, pooling):
    model, _, _ = setup
    bins = torch.randint(0, 21, (9, 50))  # 20 = the mask token
    bins[0] = 0  # a cell with every bin 0
    bins[1, ::2] = 0
    with torch.no_grad():
        expected = per_token_reference(model, bins, pooling)
    assert (embed_bins(model, bins, pooling) - expected).abs().max() < 1e-5
    assert (embed_bins(model, bins.to(torch.int16), pooling) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "mean_nonzero", "max"])
def test_embed_equals_the_per_token_reference_on_raw_counts(setup, pooling):
    model, tokenizer, adata = setup
    result = embed_matrix(
        model, tokenizer, adata, batch_size=16, pooling=pooling, device="cpu", progress=False
    )
    with torch.no_grad():
        expected = per_token_reference(model, torch.from_numpy(tokenizer.transform(adata)), pooling).numpy()
    assert np.abs(result - expected).max() < 1e-5


def test_feature_table_built_in_blocks_is_every_gene_and_bin(setup, monkeypatch):
    model, _, _ = setup
    whole = feature_table(model)
    monkeypatch.setattr("neurofm.pooling._TABLE_TOKENS", 50)  # 2 genes of 21 bin ids per block
    blocks = feature_table(model)
    assert whole.shape == (50 * 21, 32)
    torch.testing.assert_close(blocks, whole, atol=0, rtol=0)
    genes, bin_ids = torch.tensor([[0], [7], [49]]), torch.tensor([[0, 5, 20]])
    with torch.no_grad():
        direct = model.cell_features(genes.expand(3, 3), bin_ids.expand(3, 3))
    torch.testing.assert_close(whole[genes * 21 + bin_ids], direct, atol=1e-6, rtol=0)


def test_embeddings_do_not_depend_on_batch_size_or_batch_mates(setup):
    model, tokenizer, adata = setup
    full = embed_matrix(model, tokenizer, adata, batch_size=64, device="cpu", progress=False)
    small = embed_matrix(model, tokenizer, adata, batch_size=7, device="cpu", progress=False)
    np.testing.assert_allclose(small, full, atol=1e-5, rtol=0)
    subset = adata[::-3].copy()
    alone = embed_matrix(model, tokenizer, subset, batch_size=1, device="cpu", progress=False)
    np.testing.assert_allclose(alone, full[::-3], atol=1e-5, rtol=0)


def test_embed_writes_obsm_and_uns_like_a_scanpy_verb(setup):
    model, tokenizer, adata = setup
    for pooling in ("mean", "mean_nonzero", "max"):
        returned = embed(adata, model, tokenizer, pooling=pooling, key_added=f"X_{pooling}", progress=False)
        assert returned is None
        expected = embed_matrix(model, tokenizer, adata, pooling=pooling, device="cpu", progress=False)
        np.testing.assert_array_equal(adata.obsm[f"X_{pooling}"], expected)
    record = adata.uns[keys.EMBEDDING_PARAMS]
    assert record["pooling"] == "max" and record["key_added"] == "X_max" and record["n_cells"] == 70
    assert record["gene_match"]["n_found"] == 50 and record["gene_match"]["overlap"] == 1.0
    assert {"model", "unobserved", "cells_per_second", "neurofm_version"} <= set(record)
    assert keys.EMBEDDING not in adata.obsm
    fresh = synthetic_counts(n_cells=70, n_genes=50)
    copied = embed(fresh, model, tokenizer, copy=True, progress=False)
    assert copied is not fresh and keys.EMBEDDING in copied.obsm
    assert keys.EMBEDDING not in fresh.obsm and keys.EMBEDDING_PARAMS not in fresh.uns
    with pytest.raises(NeurofmError, match="tokenizer"):
        embed(fresh, model)  # a loaded model needs its tokenizer


def test_model_stays_in_its_training_mode_and_dropout_is_off(setup):
    _, tokenizer, adata = setup
    model = random_encoder_like(ModelConfig(**{**CONFIG.__dict__, "dropout": 0.5}), seed=0).train()
    first = embed_matrix(model, tokenizer, adata, device="cpu", progress=False)
    second = embed_matrix(model, tokenizer, adata, device="cpu", progress=False)
    np.testing.assert_array_equal(first, second)
    assert model.training


def test_bad_arguments_are_refused(setup):
    model, tokenizer, adata = setup
    with pytest.raises(NeurofmError, match="pooling"):
        embed_matrix(model, tokenizer, adata, pooling="cls", progress=False)
    with pytest.raises(NeurofmError, match="genes do not match"):
        embed_matrix(model, tokenizer, adata[:, :40].copy(), device="cpu", progress=False)
    other_bins = ExpressionTokenizer(TokenizerConfig(n_bins=10)).fit(adata)
    with pytest.raises(NeurofmError, match="bins"):
        embed_matrix(model, other_bins, adata, device="cpu", progress=False)
    with pytest.raises(NeurofmError, match="bin ids"):
        embed_bins(model, torch.full((2, 50), 21))
    with pytest.raises(NeurofmError, match="bin ids"):
        embed_bins(model, torch.full((2, 50), -1))
    with pytest.raises(NeurofmError, match="genes"):
        embed_bins(model, torch.zeros((2, 49), dtype=torch.long))


def test_pretrained_embedding_beats_the_random_encoder_on_a_probe(tmp_path):
    from neurofm.data.synthetic import make_synthetic_counts
    from neurofm.evaluate.probe import ProbeConfig, run_probe
    from neurofm.model import load_pretrained
    from neurofm.tokenizer import TokenizerConfig
    from neurofm.train import TrainConfig, pretrain

    adata = make_synthetic_counts(n_cells=400, n_genes=150, seed=0)
    labels = adata.obs["class"].to_numpy()
    model_config = ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64)
    train_config = TrainConfig(
        epochs=8, max_tokens_per_cell=64, device="cpu", progress=False, num_threads=2, count_head_epochs=20
    )
    result = pretrain(adata, TokenizerConfig(), model_config, train_config, tmp_path)
    model, tokenizer = load_pretrained(result.model_dir)

    def probe(encoder) -> dict:
        embedding = embed_matrix(encoder, tokenizer, adata, device="cpu", progress=False)
        return run_probe(embedding, labels, ProbeConfig()).metrics()

    trained, random = probe(model), probe(random_encoder_like(model.config))
    # measured 1.00 vs 0.92: random weights on the expression read are a random projection, a strong control
    assert trained["probe_auc"] >= random["probe_auc"] + 0.04
    assert trained["probe_auc"] >= 0.9 and trained["probe_accuracy"] > random["probe_accuracy"]
