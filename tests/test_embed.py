"""Embeddings: every gene used, independent of batch size and batch mates, written to obsm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofm import keys
from neurofm.embed import embed, embed_bins, gene_chunks, random_encoder_like
from neurofm.errors import NeurofmError
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_tokenizer import synthetic_counts

CONFIG = ModelConfig(n_genes=50, n_bins=20, d_model=32, n_heads=4, n_layers=2, ffn_dim=64, max_tokens=16)


@pytest.fixture()
def setup():
    adata = synthetic_counts(n_cells=70, n_genes=50)
    return random_encoder_like(CONFIG, seed=0), ExpressionTokenizer().fit(adata), adata


def test_chunks_cover_every_gene_once():
    genes, padding = gene_chunks(50, 16)
    assert genes.shape == (4, 13) and padding.sum() == 2
    assert sorted(genes[~padding].tolist()) == list(range(50))


def test_embeddings_do_not_depend_on_batch_size_or_batch_mates(setup):
    model, tokenizer, adata = setup
    full = embed(model, tokenizer, adata, batch_size=64, device="cpu", progress=False)
    small = embed(model, tokenizer, adata, batch_size=7, device="cpu", progress=False)
    np.testing.assert_allclose(small, full, atol=1e-5, rtol=0)
    subset = adata[::-3].copy()
    alone = embed(model, tokenizer, subset, batch_size=1, device="cpu", progress=False)
    np.testing.assert_allclose(alone, full[::-3], atol=1e-5, rtol=0)


def test_writes_obsm_and_supports_poolings(setup):
    model, tokenizer, adata = setup
    for pooling in ("mean", "mean_nonzero", "max"):
        result = embed(
            model, tokenizer, adata, pooling=pooling, device="cpu", progress=False, key_added=f"X_{pooling}"
        )
        assert result.shape == (70, 32) and np.isfinite(result).all()
        assert adata.obsm[f"X_{pooling}"] is result
    assert keys.EMBEDDING not in adata.obsm
    embed(model, tokenizer, adata, device="cpu", progress=False)
    assert adata.obsm[keys.EMBEDDING].shape == (70, 32)


def test_model_stays_in_its_training_mode_and_dropout_is_off(setup):
    _, tokenizer, adata = setup
    model = random_encoder_like(ModelConfig(**{**CONFIG.__dict__, "dropout": 0.5}), seed=0).train()
    first = embed(model, tokenizer, adata, device="cpu", progress=False)
    second = embed(model, tokenizer, adata, device="cpu", progress=False)
    np.testing.assert_array_equal(first, second)
    assert model.training


def test_mean_pooling_ignores_padding(setup):
    model, _, _ = setup
    bins = torch.randint(0, 20, (3, 50))
    direct = embed_bins(model, bins)
    genes, padding = gene_chunks(50, 16)
    features = model.cell_features(
        genes.repeat(3, 1), torch.gather(bins, 1, genes.view(1, -1).expand(3, -1)).view(12, -1)
    )
    manual = torch.stack([features[4 * i : 4 * i + 4][~padding].mean(0) for i in range(3)])
    torch.testing.assert_close(direct, manual, atol=1e-5, rtol=1e-5)
    whole = model.cell_embedding(torch.arange(50).expand(3, -1), bins)  # what the cell head is trained on
    torch.testing.assert_close(direct, whole, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused(setup):
    model, tokenizer, adata = setup
    with pytest.raises(NeurofmError, match="pooling"):
        embed(model, tokenizer, adata, pooling="cls", progress=False)
    with pytest.raises(NeurofmError, match="genes do not match"):
        embed(model, tokenizer, adata[:, :40].copy(), device="cpu", progress=False)


def test_pretrained_embedding_beats_the_random_encoder_on_a_probe(tmp_path):
    from neurofm.data.synthetic import make_synthetic_counts
    from neurofm.evaluate.probe import ProbeConfig, run_probe
    from neurofm.model import load_pretrained
    from neurofm.tokenizer import TokenizerConfig
    from neurofm.train import TrainConfig, pretrain

    adata = make_synthetic_counts(n_cells=400, n_genes=150, seed=0)
    labels = adata.obs["class"].to_numpy()
    model_config = ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64)
    train_config = TrainConfig(epochs=8, max_tokens_per_cell=64, device="cpu", progress=False, num_threads=2)
    result = pretrain(adata, TokenizerConfig(), model_config, train_config, tmp_path)
    model, tokenizer = load_pretrained(result.best_dir)

    def probe(encoder) -> dict:
        embedding = embed(encoder, tokenizer, adata, device="cpu", progress=False)
        return run_probe(embedding, labels, ProbeConfig()).metrics()

    trained, random = probe(model), probe(random_encoder_like(model.config))
    assert trained["probe_auc"] >= random["probe_auc"] + 0.1  # measured 0.96 vs 0.76
    assert trained["probe_auc"] >= 0.9 and trained["probe_accuracy"] > random["probe_accuracy"]
