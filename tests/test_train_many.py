"""Pre-training on a multi-file store: genes a file did not measure get no token, are neither read nor
scored by the count head, and are not counted by the frequency baseline or the variable-gene choice."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import neurofm.train as train_module
from neurofm.data.store import CellStore, convert_many
from neurofm.masking import frequency_table, stream_frequency_table
from neurofm.model import GeneEncoder, ModelConfig, load_pretrained
from neurofm.pooling import cell_inputs, feature_table
from neurofm.store_fit import _measured_variances
from neurofm.stream import (
    CellStream,
    StreamConfig,
    densify,
    fit_tokenizer,
    partly_observed_genes,
    variable_genes,
)
from neurofm.tokenizer import TokenizerConfig
from tests.test_train import small_train_config

COUNT_MODEL = ModelConfig(
    d_model=32, n_heads=2, n_layers=1, ffn_dim=64, latent_dim=4, decoder_dim=16, count_genes=40
)


def _file(path: Path, n_cells: int, genes: list[str], seed: int, scale: float) -> Path:
    rng = np.random.default_rng(seed)
    kind = np.arange(n_cells) % 2
    means = rng.gamma(0.8, scale, size=(2, len(genes)))
    X = sp.csr_matrix(rng.poisson(means[kind]).astype(np.float32))
    obs = pd.DataFrame({"cell_type": kind.astype(str)}, index=[f"{path.stem}-{i}" for i in range(n_cells)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes))).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> CellStore:
    """a: 150 cells × genes G0-G59; b: 100 cells × G30-G89 (30 genes shared, deeper counts)."""
    root = tmp_path_factory.mktemp("train-many")
    a = _file(root / "a.h5ad", 150, [f"G{i}" for i in range(60)], seed=1, scale=2.0)
    b = _file(root / "b.h5ad", 100, [f"G{i}" for i in range(30, 90)], seed=2, scale=6.0)
    convert_many([a, b], root / "store", shard_size=128, seed=5)
    return CellStore(root / "store")


def test_a_two_file_store_with_partly_shared_genes_trains_and_saves_a_model(store, tmp_path):
    assert not store.observed_genes.all()
    result = pretrain_store(store, tmp_path)
    for row in result.metrics:
        for key in ("train_loss", "val_loss", "val_cell_loss", "val_count_loss", "val_total_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    head = result.count_head
    assert head is not None and math.isfinite(head["val_count_loss_after"])
    model, tokenizer = load_pretrained(result.model_dir)
    assert model.config.n_genes == store.n_genes == 90 and tokenizer.n_genes == 90


def pretrain_store(store, out_dir, **overrides):
    config = small_train_config(**{"epochs": 1, "count_head_epochs": 1, **overrides})
    return train_module.pretrain(store, TokenizerConfig(constant_genes="keep"), COUNT_MODEL, config, out_dir)


def test_no_training_or_validation_token_falls_on_an_unmeasured_gene(store, tmp_path, monkeypatch):
    made = []

    def recording(*args, **kwargs):
        batch = original(*args, **kwargs)
        made.append((batch, args[6] if len(args) > 6 else kwargs.get("observed")))
        return batch

    original = train_module.make_batch
    monkeypatch.setattr(train_module, "make_batch", recording)
    pretrain_store(store, tmp_path, count_head_epochs=0)
    assert made
    for batch, observed in made:
        assert observed is not None and batch.observed is observed  # the count head gets the mask too
        real = ~batch.padding_mask
        assert torch.gather(observed, 1, batch.gene_ids)[real].all()
        assert (batch.labels[batch.padding_mask] == -100).all()
    # the fixed validation batches, drawn by the scoring module
    from neurofm.scoring import validation_batches

    tokenizer = fit_tokenizer(store, TokenizerConfig(constant_genes="keep"))
    config = small_train_config()
    stream = CellStream(store, tokenizer, StreamConfig(batch_size=16, val_fraction=config.val_fraction))
    batches = validation_batches(stream, 32, 21, config, torch.device("cpu"))
    datasets = store.cell_datasets()[stream.val_rows]  # fewer than one part of 256: each draw in turn
    assert datasets.size < 256 and len(set(datasets.tolist())) == 2
    observed = torch.from_numpy(store.observed_genes[np.tile(datasets, config.val_draws)])
    gene_ids = torch.cat([b.gene_ids for b in batches])
    real = ~torch.cat([b.padding_mask for b in batches])
    assert torch.gather(observed, 1, gene_ids)[real].all()


def _count_inputs(store):
    """Bins, counts and the measured-gene mask of 24 cells of both files, and a count-head model."""
    tokenizer = fit_tokenizer(store, TokenizerConfig(constant_genes="keep"))
    stream = CellStream(store, tokenizer, StreamConfig(batch_size=24, val_fraction=0.1, counts=True))
    raw = next(iter(stream))
    assert len(set(raw["dataset"].tolist())) == 2
    observed = stream.observed_genes[raw["dataset"]]
    torch.manual_seed(0)
    config = ModelConfig(
        n_genes=store.n_genes, n_bins=tokenizer.config.n_bins, d_model=16, n_heads=2, n_layers=1,
        ffn_dim=16, latent_dim=4, decoder_dim=8, count_genes=40,
    )  # fmt: skip
    model = GeneEncoder(config).eval()
    model.count_head.set_count_genes(np.arange(20, 60))  # 10 genes of a only, 30 shared
    return model, densify(raw, stream.zero_bins).long(), raw["counts"], observed


def _count_losses(model, bins, counts, observed):
    """(pre-training's count NLL + KL, the count head phase's) per cell."""
    genes = torch.arange(bins.shape[1]).expand_as(bins)
    _, _, nll, kl = model.pretrain_outputs(genes, bins, None, counts, bins, observed)
    cell, expression = cell_inputs(model, bins, "auto", feature_table(model), observed)
    head_nll, head_kl = model.count_loss(cell, counts, expression, observed)
    return torch.cat([nll + kl, head_nll + head_kl])


def test_the_count_loss_never_reads_an_unmeasured_genes_placeholder(store):
    model, bins, counts, observed = _count_inputs(store)
    before = _count_losses(model, bins, counts, observed)
    assert torch.isfinite(before).all()
    changed_bins, changed_counts = bins.clone(), counts.clone()
    changed_bins[~observed] = 7
    changed_counts[~observed] = 50.0
    assert (changed_counts != counts).any()
    torch.testing.assert_close(
        _count_losses(model, changed_bins, changed_counts, observed), before, rtol=0, atol=0
    )
    # a measured count gene does change it (the test can fail)
    measured = changed_counts.clone()
    measured[:, 30] += 40.0
    assert (_count_losses(model, changed_bins, measured, observed) != before).all()


def test_the_count_nll_is_per_measured_count_gene(store):
    model, bins, counts, observed = _count_inputs(store)
    cell, expression = cell_inputs(model, bins, "auto", feature_table(model), observed)
    mean, _ = model.count_head.latent(cell, expression)
    index = model.count_head.count_gene_index
    nll_sum = model.count_head.nll(mean, counts[:, index], observed[:, index])
    nll, _ = model.count_loss(cell, counts, expression, observed)
    n_measured = observed[:, index].sum(1)
    assert set(n_measured.tolist()) == {30, 40}  # b's cells measure 30 of the count genes, a's all 40
    torch.testing.assert_close(nll, nll_sum / n_measured)
    # the decoder's shares of the library run over the measured genes only: a b cell's NLL is that of
    # a model reading those genes alone
    cell = int(torch.nonzero(n_measured == 30)[0])
    keep = observed[cell, index]
    logits = model.count_head.decode(mean[cell : cell + 1]).float()[:, keep]
    shares = torch.softmax(logits, -1)[0]
    theta = model.count_head.count_log_theta.float().exp()[keep]
    x = counts[cell, index][keep]
    mu = shares * x.sum().clamp(min=1)
    expected = -(
        torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
        + theta * (theta.log() - (theta + mu).log()) + x * (mu.log() - (theta + mu).log())
    ).sum()  # fmt: skip
    torch.testing.assert_close(nll_sum[cell], expected, rtol=1e-4, atol=1e-3)


def test_with_every_gene_measured_the_masked_count_path_is_todays(store):
    model, bins, counts, _ = _count_inputs(store)
    every = torch.ones_like(bins, dtype=torch.bool)
    genes = torch.arange(bins.shape[1]).expand_as(bins)
    torch.testing.assert_close(
        model.pretrain_outputs(genes, bins, None, counts, bins, every)[2:],
        model.pretrain_outputs(genes, bins, None, counts, bins)[2:],
    )
    table = feature_table(model)
    for pooling in ("mean", "mean_nonzero", "max"):
        torch.testing.assert_close(
            cell_inputs(model, bins, pooling, table, every)[0], cell_inputs(model, bins, pooling, table)[0]
        )


def test_the_frequency_baseline_counts_only_the_cells_that_measured_each_gene(store):
    tokenizer = fit_tokenizer(store, TokenizerConfig(constant_genes="keep"))
    table, n_cells = stream_frequency_table(store, tokenizer, np.array([], dtype=np.int64))
    assert n_cells == store.n_cells
    bins = tokenizer.transform(ad.AnnData(X=store.rows(np.arange(store.n_cells)), var=store.var()))
    measuring = store.observed_genes[store.cell_datasets()]
    for gene in (5, 45, 80):  # a only, shared, b only
        expected = frequency_table(bins[measuring[:, gene]][:, [gene]], tokenizer.config.n_bins)
        np.testing.assert_allclose(table[gene], expected[0])
    assert partly_observed_genes(CellStream(store, tokenizer, StreamConfig())) is not None


def test_the_variable_genes_ignore_unmeasured_placeholders():
    rng = np.random.default_rng(3)
    counts = sp.csr_matrix(rng.poisson(rng.gamma(0.7, 3.0, size=(300, 120))).astype(np.float32))
    # every cell measured: scanpy's Seurat v3 normalised variance
    import scanpy as sc

    work = ad.AnnData(X=counts.copy())
    sc.pp.highly_variable_genes(work, n_top_genes=30, flavor="seurat_v3")
    every = np.ones(counts.shape, dtype=bool)
    np.testing.assert_allclose(_measured_variances(counts, every), work.var["variances_norm"], rtol=1e-6)
    # placeholder rows of cells that measured none of the genes change nothing
    padded = sp.vstack([counts, sp.csr_matrix((200, 120), dtype=np.float32)]).tocsr()
    measuring = np.vstack([every, np.zeros((200, 120), dtype=bool)])
    np.testing.assert_allclose(_measured_variances(padded, measuring), _measured_variances(counts, every))


def test_the_variable_genes_of_a_two_file_store(store):
    chosen = variable_genes(store, 40, seed=0)
    assert chosen.size == 40 and np.all(np.diff(chosen) > 0)
    assert chosen.min() >= 0 and chosen.max() < store.n_genes


def test_store_cells_are_embedded_with_their_own_files_genes(store, tmp_path):
    from neurofm.cell_features import embed_reference_cells
    from neurofm.embedding import embed_matrix
    from neurofm.genes import match_adata

    result = pretrain_store(store, tmp_path, count_head_epochs=0, max_steps=2)
    model, tokenizer = load_pretrained(result.model_dir)
    embedding = embed_reference_cells(model, tokenizer, store, progress=False)
    b = store.dataset_names.index("b")
    rows = np.flatnonzero(store.cell_datasets() == b)
    genes = np.flatnonzero(store.observed_genes[b])
    alone = ad.AnnData(X=store.rows(rows)[:, genes], var=store.var().iloc[genes])  # b's cells, b's genes
    match = match_adata(alone, tokenizer.gene_ids, tokenizer.gene_symbols, min_overlap=0.0)
    expected = embed_matrix(model, tokenizer, alone, progress=False, match=match)
    np.testing.assert_allclose(embedding[rows], expected, rtol=1e-5, atol=1e-6)
    as_zeros = embed_matrix(model, tokenizer, ad.AnnData(X=store.rows(rows), var=store.var()), progress=False)
    assert not np.allclose(embedding[rows], as_zeros, atol=1e-4)  # unmeasured is not zero
