"""The count head (ModelConfig.latent_dim > 0): its negative-binomial likelihood, the raw counts the
stream carries for it, training with it, and the embedding it defines (the latent mean)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from neurofm.config import POOLINGS as CONFIG_POOLINGS
from neurofm.config import UNOBSERVED_MODES as CONFIG_UNOBSERVED
from neurofm.data.store import SOURCE_ROW, CellStore, convert_anndata
from neurofm.embedding import POOLINGS, UNOBSERVED_MODES, embed_bins, embed_matrix, resolve_pooling
from neurofm.errors import NeurofmError
from neurofm.loop import kl_weight_at
from neurofm.model import GeneEncoder, ModelConfig, load_pretrained
from neurofm.stream import CellStream, StreamConfig, densify_counts, fit_tokenizer
from neurofm.tokenizer import TokenizerConfig
from neurofm.train import pretrain
from tests.test_tokenizer import synthetic_counts
from tests.test_train import small_train_config

COUNT_MODEL = ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64, latent_dim=4, decoder_dim=16)


def test_count_nll_is_the_negative_binomial_of_mean_softmax_times_library():
    torch.manual_seed(0)
    model = GeneEncoder(ModelConfig(n_genes=7, d_model=8, n_heads=2, n_layers=1, ffn_dim=8, latent_dim=3))
    with torch.no_grad():
        model.count_head.count_log_theta.copy_(torch.linspace(-1.0, 2.0, 7))
    latent = torch.randn(2, 3)
    counts = torch.tensor([[0, 1, 5, 0, 2, 9, 3], [4, 0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    nll = model.count_head.nll(latent, counts).detach().numpy()
    shares = torch.softmax(model.count_head.decode(latent), -1).detach().numpy()
    theta = model.count_head.count_log_theta.exp().detach().numpy()
    for cell in range(2):
        mu = shares[cell] * counts[cell].sum().item()
        # scipy's nbinom(n=theta, p=theta / (theta + mu)) has mean mu
        expected = -stats.nbinom.logpmf(counts[cell].numpy(), theta, theta / (theta + mu)).sum()
        assert nll[cell] == pytest.approx(expected, rel=1e-4)


def test_the_embedding_is_the_latent_mean_and_equals_the_table_lookup():
    torch.manual_seed(1)
    config = ModelConfig(
        n_genes=30, d_model=16, n_heads=2, n_layers=1, ffn_dim=16, latent_dim=5, latent_reads_expression=False
    )
    model = GeneEncoder(config).eval()
    assert model.embedding_dim == 5 and GeneEncoder(ModelConfig(n_genes=30, d_model=16)).embedding_dim == 16
    bins = torch.randint(0, 21, (6, 30))
    bins[bins == 20] = 0  # no mask tokens in real data
    genes = torch.arange(30).expand(6, 30)
    direct = model.cell_embedding(genes, bins)
    assert direct.shape == (6, 5)
    torch.testing.assert_close(embed_bins(model, bins, "mean"), direct, rtol=1e-5, atol=1e-5)
    assert resolve_pooling(model, "auto") == "mean"
    # what the count head reads in training ("all_genes") is what embedding pools, for both poolings
    torch.testing.assert_close(
        model.count_head.latent(model.pooled_cell(bins))[0], direct, rtol=1e-5, atol=1e-5
    )
    nonzero = GeneEncoder(replace(config, cell_pooling="nonzero")).eval()
    assert resolve_pooling(nonzero, "auto") == "mean_nonzero"
    torch.testing.assert_close(
        nonzero.count_head.latent(nonzero.pooled_cell(bins))[0],
        embed_bins(nonzero, bins, "auto"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_the_stream_carries_each_cells_raw_counts_in_both_formats(tmp_path):
    adata = synthetic_counts(n_cells=120, n_genes=25, seed=3)
    convert_anndata(adata, tmp_path / "store")
    store = CellStore(tmp_path / "store")
    tokenizer = fit_tokenizer(store, TokenizerConfig())
    dense_config = StreamConfig(batch_size=16, block_size=8, buffer_blocks=2, val_fraction=0.1, counts=True)
    sparse_config = StreamConfig(**{**dense_config.__dict__, "output": "sparse"})
    source = store.read_obs([SOURCE_ROW])[SOURCE_ROW].to_numpy()  # the store shuffles cells
    counts = adata.X.toarray()[source]
    dense_batches = list(CellStream(store, tokenizer, dense_config))
    sparse_batches = list(CellStream(store, tokenizer, sparse_config))
    assert len(dense_batches) == len(sparse_batches) > 0
    for dense, sparse in zip(dense_batches, sparse_batches, strict=True):
        rows = dense["rows"].numpy()
        np.testing.assert_array_equal(densify_counts(dense, 25).numpy(), counts[rows])
        np.testing.assert_array_equal(densify_counts(sparse, 25).numpy(), counts[rows])
    for batch in CellStream(store, tokenizer, dense_config).validation_batches():
        np.testing.assert_array_equal(batch["counts"].numpy(), counts[batch["rows"].numpy()])
    without = next(iter(CellStream(store, tokenizer, StreamConfig(batch_size=16, val_fraction=0.1))))
    with pytest.raises(NeurofmError, match="counts=True"):
        densify_counts(without, 25)


def test_training_with_the_count_head_lowers_its_loss_and_saves_a_latent_model(tmp_path):
    adata = synthetic_counts(n_cells=160, n_genes=40, seed=1)
    result = pretrain(
        adata, TokenizerConfig(), COUNT_MODEL, small_train_config(epochs=4, kl_warmup=0.25), tmp_path / "run"
    )
    rows = result.metrics
    assert all(math.isfinite(row["val_count_loss"]) for row in rows)
    assert rows[-1]["val_count_loss"] < rows[0]["val_count_loss"]
    last = rows[-1]
    expected_total = last["val_loss"] + last["val_cell_loss"] + last["val_count_loss"]  # both weights 1
    assert last["val_total_loss"] == pytest.approx(expected_total)
    model, tokenizer = load_pretrained(result.model_dir)
    embedding = embed_matrix(model, tokenizer, adata, progress=False, device="cpu")
    assert embedding.shape == (160, 4) and np.isfinite(embedding).all()
    # the latent separates the two synthetic cell types better than chance: centroid gap > spread
    kinds = adata.obs["subtype"].to_numpy()
    first, second = embedding[kinds == kinds[0]], embedding[kinds != kinds[0]]
    gap = np.linalg.norm(first.mean(0) - second.mean(0))
    assert gap > 0.5 * (first.std(0).mean() + second.std(0).mean())


def test_a_count_head_without_count_loss_and_bad_settings_are_refused(tmp_path):
    adata = synthetic_counts(n_cells=80, n_genes=40)
    with pytest.raises(NeurofmError, match="count_loss_weight"):
        pretrain(
            adata, TokenizerConfig(), COUNT_MODEL, small_train_config(count_loss_weight=0.0), tmp_path / "a"
        )
    with pytest.raises(NeurofmError, match="latent_dim"):
        ModelConfig(latent_dim=-1).validate()
    with pytest.raises(NeurofmError, match="kl_warmup"):
        small_train_config(kl_warmup=2.0).validate()


def test_kl_weight_rises_linearly_over_the_warmup_share():
    config = small_train_config(kl_warmup=0.5)
    weight = lambda step: kl_weight_at(step, 100, config.kl_weight, config.kl_warmup)  # noqa: E731
    assert [weight(step) for step in (0, 25, 50, 99)] == [0.0, 0.5, 1.0, 1.0]
    assert kl_weight_at(0, 100, 1.0, small_train_config(kl_warmup=0.0).kl_warmup) == 1.0


def test_the_phase_warms_the_kl_weight_over_its_share_of_the_steps_or_not_at_all():
    """The count head's phase uses the pre-training schedule with its own warm-up share."""

    def weights(config, steps):
        return [kl_weight_at(step, 100, config.kl_weight, config.count_head_kl_warmup) for step in steps]

    whole = small_train_config(count_head_kl_warmup=1.0)  # over the whole phase, as scVI
    assert weights(whole, (0, 50, 99)) == [0.0, 0.5, 0.99]
    half = small_train_config(count_head_kl_warmup=0.5, kl_weight=2.0)
    assert weights(half, (0, 25, 50, 99)) == [0.0, 1.0, 2.0, 2.0]
    none = small_train_config()  # the default: the full weight from the first step
    assert none.count_head_kl_warmup == 0.0
    assert weights(none, (0, 1, 99)) == [1.0, 1.0, 1.0]
    with pytest.raises(NeurofmError, match="count_head_kl_warmup"):
        small_train_config(count_head_kl_warmup=1.5).validate()


def test_config_choices_match_the_embedding_choices():
    assert tuple(CONFIG_POOLINGS) == tuple(POOLINGS)
    assert tuple(CONFIG_UNOBSERVED) == tuple(UNOBSERVED_MODES)


def test_a_resumed_count_head_run_matches_the_straight_run(tmp_path):
    """Exact resume with the count head (latent sampling is seeded per step). The KL warm-up, like the
    learning-rate schedule, spans the run's total steps, so it is off here: a 1-epoch run and the first
    epoch of a 2-epoch run then follow the same schedule."""
    adata = synthetic_counts(n_cells=60, n_genes=24)
    config = dict(kl_warmup=0.0)
    straight = pretrain(
        adata, TokenizerConfig(), COUNT_MODEL, small_train_config(epochs=2, **config), tmp_path / "a"
    )
    pretrain(adata, TokenizerConfig(), COUNT_MODEL, small_train_config(epochs=1, **config), tmp_path / "b")
    resumed = pretrain(
        adata,
        TokenizerConfig(),
        COUNT_MODEL,
        small_train_config(epochs=2, **config),
        tmp_path / "b",
        resume=True,
    )
    for key in ("val_loss", "val_count_loss", "val_total_loss"):
        assert [row[key] for row in resumed.metrics] == [row[key] for row in straight.metrics], key
    first, _ = load_pretrained(straight.last_dir)
    second, _ = load_pretrained(resumed.last_dir)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_a_model_saved_before_the_count_head_loads_as_it_was_built(tmp_path):
    """config.json of a model saved before ``latent_dim`` existed has no such key: it loads without a
    count head (its weights have none), not with today's default."""
    import json

    from neurofm.tokenizer import ExpressionTokenizer

    tokenizer = ExpressionTokenizer().fit(synthetic_counts(n_cells=40, n_genes=12))
    old = GeneEncoder(ModelConfig(n_genes=12, d_model=8, n_heads=2, n_layers=1, ffn_dim=8, latent_dim=0))
    directory = old.save_pretrained(tmp_path / "old", tokenizer)
    meta = json.loads((directory / "config.json").read_text())
    del meta["model"]["latent_dim"], meta["model"]["decoder_dim"]
    (directory / "config.json").write_text(json.dumps(meta))
    model, _ = load_pretrained(directory)
    assert model.config.latent_dim == 0 and model.count_head is None and model.embedding_dim == 8
    # a count-head model saved before its latent read the expression loads without that read
    count = GeneEncoder(replace(COUNT_MODEL, n_genes=12, latent_reads_expression=False))
    directory = count.save_pretrained(tmp_path / "count", tokenizer)
    meta = json.loads((directory / "config.json").read_text())
    del meta["model"]["latent_reads_expression"]
    (directory / "config.json").write_text(json.dumps(meta))
    model, _ = load_pretrained(directory)
    assert model.config.latent_dim == 4 and model.count_head.expression_weight is None


def test_the_count_head_can_read_the_sampled_tokens_only(tmp_path):
    adata = synthetic_counts(n_cells=160, n_genes=40, seed=2)
    config = small_train_config(epochs=4, kl_warmup=0.25, count_input="sampled", max_tokens_per_cell=16)
    rows = pretrain(adata, TokenizerConfig(), COUNT_MODEL, config, tmp_path / "run").metrics
    assert all(math.isfinite(row["val_count_loss"]) for row in rows)
    assert rows[-1]["val_count_loss"] < rows[0]["val_count_loss"]
    with pytest.raises(NeurofmError, match="count_input"):
        small_train_config(count_input="tokens").validate()


EXPRESSION_MODEL = replace(COUNT_MODEL, latent_reads_expression=True)


def test_a_latent_reading_the_expression_embeds_as_it_was_trained():
    torch.manual_seed(3)
    config = ModelConfig(
        n_genes=30, d_model=16, n_heads=2, n_layers=1, ffn_dim=16, latent_dim=5, latent_reads_expression=True
    )
    model = GeneEncoder(config).eval()
    with torch.no_grad():
        model.count_head.bin_value.copy_(torch.rand(21) + 0.5)
    bins = torch.randint(0, 20, (6, 30))
    bins[:, :10] = 0  # many zero genes, as in real data
    genes = torch.arange(30).expand(6, 30)
    # the same latent whichever way it is reached: tokens, the training path, the embedding's table lookup
    direct = model.cell_embedding(genes, bins)
    trained = model.count_head.latent(model.pooled_cell(bins), model.expression_features(bins))[0]
    torch.testing.assert_close(trained, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embed_bins(model, bins, "auto"), direct, rtol=1e-5, atol=1e-5)
    # unobserved genes are left out of both the pooling and the expression mean
    observed = torch.zeros(30, dtype=torch.bool)
    observed[::2] = True
    subset = model.cell_embedding(genes[:, observed], bins[:, observed])
    torch.testing.assert_close(
        embed_bins(model, bins, "auto", observed=observed), subset, rtol=1e-5, atol=1e-5
    )
    # a zero count (bin 0) adds nothing; the expression is a mean of bin value x gene vector
    zero = model.expression_features(torch.zeros(2, 30, dtype=torch.long))
    assert torch.equal(zero, torch.zeros(2, config.decoder_dim))
    one = torch.zeros(1, 30, dtype=torch.long)
    one[0, 4] = 7
    expected = model.count_head.bin_value[7] * model.count_head.expression_weight[4] / 30
    torch.testing.assert_close(model.expression_features(one)[0], expected)
    with pytest.raises(NeurofmError, match="reads the expression"):
        model.count_head.latent(model.pooled_cell(bins))
    with pytest.raises(NeurofmError, match="latent_reads_expression"):
        replace(config, latent_reads_expression="yes").validate()


def test_the_count_head_phase_follows_scvis_epoch_rule():
    from neurofm.count_phase import head_epochs

    assert head_epochs(921, None) == 400  # small data: scVI's cap
    assert head_epochs(38_000, None) == round(20_000 / 38_000 * 400) == 211
    assert head_epochs(2_000_000, None) == 4
    assert head_epochs(921, 25) == 25 and head_epochs(921, 0) == 0
    with pytest.raises(NeurofmError, match="count_head_epochs"):
        small_train_config(count_head_epochs=-1).validate()
    with pytest.raises(NeurofmError, match="count_head_batch_size"):
        small_train_config(count_head_batch_size=1).validate()


def _state(directory):
    model, _ = load_pretrained(directory)
    return model.state_dict()


def test_the_count_head_phase_fits_only_the_head_and_releases_it_as_the_run_model(tmp_path):
    from neurofm.count_phase import is_head_parameter

    adata = synthetic_counts(n_cells=160, n_genes=40, seed=4)
    config = small_train_config(epochs=2, count_head_epochs=6, count_head_batch_size=32)
    result = pretrain(adata, TokenizerConfig(), EXPRESSION_MODEL, config, tmp_path / "run")
    assert result.model_dir == tmp_path / "run" / "model"
    summary = result.count_head
    assert summary["epochs"] == 6 and summary["steps"] == 6 * (128 // 32)
    assert summary["val_count_loss_after"] < summary["val_count_loss_before"]
    before, after = _state(tmp_path / "run" / "best"), _state(result.model_dir)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(is_head_parameter(name) for name in changed)
    assert {f"count_head.{name}" for name in ("expression_weight", "bin_value", "count_log_theta")} <= changed
    without = pretrain(
        adata, TokenizerConfig(), EXPRESSION_MODEL, replace(config, count_head_epochs=0), tmp_path / "none"
    )
    assert without.count_head is None and without.model_dir == tmp_path / "none" / "model"
    assert _state(without.model_dir).keys() == _state(without.best_dir).keys()
    assert all(torch.equal(a, _state(without.best_dir)[k]) for k, a in _state(without.model_dir).items())


@pytest.mark.parametrize("killed_at", ["before the head is saved", "before model/ is written"])
def test_a_run_killed_in_the_count_head_phase_resumes_to_the_same_model(tmp_path, monkeypatch, killed_at):
    import neurofm.count_phase as count_phase_module

    adata = synthetic_counts(n_cells=120, n_genes=30, seed=5)
    config = small_train_config(epochs=2, count_head_epochs=4, count_head_batch_size=32)
    straight = pretrain(adata, TokenizerConfig(), EXPRESSION_MODEL, config, tmp_path / "a")

    class Killed(Exception):
        pass

    def kill(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        if killed_at == "before the head is saved":
            patch.setattr(count_phase_module, "save_head", kill)
        else:
            original = GeneEncoder.save_pretrained

            def save(self, directory, tokenizer):
                if str(directory).endswith("model"):
                    raise Killed
                return original(self, directory, tokenizer)

            patch.setattr(GeneEncoder, "save_pretrained", save)
        with pytest.raises(Killed):
            pretrain(adata, TokenizerConfig(), EXPRESSION_MODEL, config, tmp_path / "b")
    assert not (tmp_path / "b" / "model").exists()
    assert (tmp_path / "b" / "count_head.pt").exists() == (killed_at == "before model/ is written")
    resumed = pretrain(adata, TokenizerConfig(), EXPRESSION_MODEL, config, tmp_path / "b", resume=True)
    timeless = lambda summary: {k: v for k, v in summary.items() if k != "seconds"}  # noqa: E731
    assert timeless(resumed.count_head) == timeless(straight.count_head)
    first, second = _state(straight.model_dir), _state(resumed.model_dir)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def _phase_inputs(tmp_path, n_cells=96, n_genes=20, seed=6):
    """A model with an expression-reading count head, its store and tokenizer, for fit_count_head."""
    adata = synthetic_counts(n_cells=n_cells, n_genes=n_genes, seed=seed)
    convert_anndata(adata, tmp_path / "store")
    store = CellStore(tmp_path / "store")
    tokenizer = fit_tokenizer(store, TokenizerConfig())
    torch.manual_seed(seed)
    model = GeneEncoder(replace(EXPRESSION_MODEL, n_genes=n_genes, n_bins=tokenizer.config.n_bins))
    stream_config = StreamConfig(batch_size=16, block_size=8, buffer_blocks=2, val_fraction=0.2, counts=True)
    return model, store, tokenizer, stream_config


def test_the_count_head_phase_keeps_its_best_epoch_and_stops_after_the_patience(tmp_path):
    from neurofm.count_phase import fit_count_head, head_state

    model, store, tokenizer, stream_config = _phase_inputs(tmp_path)
    losses = iter([5.0, 4.0, 4.5, 4.2, 4.1, 3.0])  # best after epoch 2, then 3 epochs without a better one
    heads = []

    def validate():
        heads.append(head_state(model))  # the head as each epoch left it
        return next(losses)

    config = small_train_config(count_head_epochs=10, count_head_batch_size=16, count_head_patience=3)
    summary = fit_count_head(model, store, tokenizer, stream_config, config, torch.device("cpu"), validate)
    assert summary["epochs"] == 10 and summary["epochs_run"] == 5 and summary["best_epoch"] == 2
    assert summary["val_count_loss_by_epoch"] == [5.0, 4.0, 4.5, 4.2, 4.1]
    stream = CellStream(store, tokenizer, stream_config)
    assert len(heads) == 5 and summary["steps"] == sum(stream.common_batches(epoch) for epoch in range(5))
    kept = head_state(model)
    assert all(torch.equal(kept[name], heads[1][name]) for name in kept)  # epoch 2's head, not epoch 5's
    assert any(not torch.equal(kept[name], heads[4][name]) for name in kept)


def test_without_patience_the_count_head_phase_runs_every_epoch_and_keeps_the_last(tmp_path):
    from neurofm.count_phase import fit_count_head, head_state

    model, store, tokenizer, stream_config = _phase_inputs(tmp_path)
    calls = []
    config = small_train_config(count_head_epochs=4, count_head_batch_size=16, count_head_patience=0)
    summary = fit_count_head(
        model,
        store,
        tokenizer,
        stream_config,
        config,
        torch.device("cpu"),
        validate=lambda: calls.append(head_state(model)) or 1.0,
    )
    assert calls == [] and "val_count_loss_by_epoch" not in summary
    assert summary["epochs_run"] == summary["best_epoch"] == 4
    with pytest.raises(NeurofmError, match="count_head_patience"):
        small_train_config(count_head_patience=-1).validate()


def test_early_stopping_in_a_real_run_keeps_the_epoch_of_the_lowest_validation_loss(tmp_path):
    adata = synthetic_counts(n_cells=120, n_genes=30, seed=7)
    # a learning rate far too high for 120 cells: the validation loss turns up within a few epochs
    config = small_train_config(
        epochs=2, count_head_epochs=60, count_head_batch_size=32, count_head_patience=3, count_head_lr=0.05
    )
    result = pretrain(adata, TokenizerConfig(), EXPRESSION_MODEL, config, tmp_path / "run")
    summary = result.count_head
    curve = summary["val_count_loss_by_epoch"]
    assert len(curve) == summary["epochs_run"] < 60  # stopped early…
    assert summary["best_epoch"] == int(np.argmin(curve)) + 1
    assert summary["epochs_run"] == summary["best_epoch"] + 3  # …once the patience ran out
    # model/ holds the best epoch's head: scored again, it gives that epoch's validation loss
    assert summary["val_count_loss_after"] == pytest.approx(min(curve), rel=1e-5)
    assert summary["val_count_loss_after"] < summary["val_count_loss_before"]


# ------------------------------------------------------------------ the count genes (the most variable)
def test_a_count_head_on_fewer_genes_reads_and_scores_only_those():
    torch.manual_seed(3)
    config = replace(EXPRESSION_MODEL, n_genes=30, count_genes=8)
    model = GeneEncoder(config).eval()
    assert config.n_count_genes == 8 and replace(config, count_genes=0).n_count_genes == 30
    assert replace(config, count_genes=500).n_count_genes == 30
    assert (
        GeneEncoder(replace(config, count_genes=30)).count_head.count_gene_index is None
    )  # every gene: no index
    assert model.count_head.expression_weight.shape[0] == model.count_head.count_log_theta.shape[0] == 8
    assert model.count_head.count_decoder[-1].out_features == 8
    chosen = torch.tensor([27, 1, 5, 9, 12, 14, 20, 3])
    model.count_head.set_count_genes(chosen)
    index = chosen.sort().values
    assert torch.equal(model.count_head.count_gene_index, index)
    bins = torch.randint(0, 21, (5, 30))
    bins[bins == 20] = 0
    counts = torch.poisson(torch.full((5, 30), 3.0))
    # the read: the mean over the 8 count genes of bin_value[bin] × their weight, the other genes ignored
    expected = (
        (model.count_head.bin_value[bins[:, index]] * (bins[:, index] > 0))
        @ model.count_head.expression_weight
        / 8
    )
    torch.testing.assert_close(model.expression_features(bins), expected)
    # the same read from tokens (every gene as a token, shuffled): genes outside the count genes add nothing
    order = torch.randperm(30)
    tokens = model.expression_features(
        bins[:, order], order.expand(5, -1), torch.ones(5, 30, dtype=torch.bool)
    )
    torch.testing.assert_close(tokens, expected)
    other = torch.tensor([g for g in range(30) if g not in index.tolist()])
    assert torch.equal(model.expression_features(bins[:, other], other.expand(5, -1)), torch.zeros(5, 16))
    # the loss scores the count genes' counts only; every gene's counts or only theirs give the same
    cell = model.pooled_cell(bins)
    expression = model.expression_features(bins)
    full = model.count_loss(cell, counts, expression)
    only = model.count_loss(cell, counts[:, index], expression)
    torch.testing.assert_close(full, only)
    mean, _ = model.count_head.latent(cell, expression)
    torch.testing.assert_close(full[0], model.count_head.nll(mean, counts[:, index]) / 8)
    for bad in ([1, 2], [1, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 30]):
        with pytest.raises(NeurofmError, match="count genes"):
            model.count_head.set_count_genes(bad)
    with pytest.raises(NeurofmError, match="every gene"):
        GeneEncoder(replace(config, count_genes=0)).count_head.set_count_genes(chosen)


def test_the_count_genes_are_seurat_v3s_most_variable_of_the_training_cells(tmp_path):
    import anndata as ad
    import scanpy as sc

    from neurofm.stream import variable_genes

    adata = synthetic_counts(n_cells=300, n_genes=60, seed=8)
    counts = adata.X.toarray()
    rng = np.random.default_rng(0)
    markers = [4, 17, 33, 50]
    on = rng.random(300) < 0.2  # markers of a rare type: on in a fifth of the cells, the most variable
    counts[:, markers] = np.where(on[:, None], rng.poisson(30, size=(300, 4)), 0)
    adata.X = sp.csr_matrix(counts)
    convert_anndata(adata, tmp_path / "store")
    store = CellStore(tmp_path / "store")
    validation = np.arange(0, 300, 5)
    chosen = variable_genes(store, 12, exclude_rows=validation, seed=1)
    assert chosen.size == 12 and np.all(np.diff(chosen) > 0)
    assert list(store.gene_ids) == list(adata.var_names)  # the store keeps the genes' order
    assert set(markers) <= set(chosen.tolist())
    source = store.read_obs([SOURCE_ROW])[SOURCE_ROW].to_numpy()  # the store shuffles cells
    # exactly scanpy's ranking on the same sample of training rows
    sample = np.sort(
        np.random.default_rng([1, 13]).choice(np.setdiff1d(np.arange(300), validation), 240, replace=False)
    )
    reference = ad.AnnData(X=sp.csr_matrix(counts[source[sample]]))
    sc.pp.highly_variable_genes(reference, n_top_genes=12, flavor="seurat_v3")
    expected = np.flatnonzero(reference.var["highly_variable"].to_numpy())
    np.testing.assert_array_equal(chosen, expected)
    assert np.array_equal(variable_genes(store, 60), np.arange(60))  # no fewer genes asked: all of them


def test_pretrain_picks_the_count_genes_and_the_saved_model_keeps_them(tmp_path):
    from neurofm.stream import variable_genes
    from neurofm.train import split_store, store_from_anndata

    adata = synthetic_counts(n_cells=160, n_genes=40, seed=9)
    store = store_from_anndata(adata, tmp_path / "store")
    config = small_train_config(epochs=2, count_head_epochs=3, count_head_batch_size=32)
    model_config = replace(EXPRESSION_MODEL, count_genes=10)
    result = pretrain(store, TokenizerConfig(), model_config, config, tmp_path / "run")
    model, tokenizer = load_pretrained(result.model_dir)
    assert model.config.count_genes == 10 and model.count_head.count_gene_index.numel() == 10
    _, val_rows = split_store(store, config)
    expected = variable_genes(store, 10, exclude_rows=val_rows, seed=config.seed)
    np.testing.assert_array_equal(model.count_head.count_gene_index.numpy(), expected)
    assert not np.array_equal(expected, np.arange(10))  # chosen, not the placeholder
    embedding = embed_matrix(model, tokenizer, adata, progress=False, device="cpu")
    assert embedding.shape == (160, 4) and np.isfinite(embedding).all()
    assert math.isfinite(result.count_head["val_count_loss_after"])


def test_max_steps_caps_the_phase_at_as_many_steps():
    from neurofm.count_phase import phase_steps

    assert phase_steps([4, 4, 4], None) == [4, 4, 4]
    assert phase_steps([4, 4, 4], 6) == [4, 2]  # the last epoch cut short
    assert phase_steps([4, 4, 4], 12) == [4, 4, 4] and phase_steps([4, 4], 100) == [4, 4]


def test_a_short_pretrain_bounds_the_count_head_phase_too(tmp_path, caplog):
    adata = synthetic_counts(n_cells=160, n_genes=40, seed=4)
    config = small_train_config(max_steps=3, count_head_epochs=50, count_head_batch_size=32)
    with caplog.at_level("INFO", logger="neurofm.count_phase"):
        result = pretrain(adata, TokenizerConfig(), EXPRESSION_MODEL, config, tmp_path / "run")
    assert result.count_head["steps"] <= 3  # 50 epochs of 4 steps without the cap
    said = [r.getMessage() for r in caplog.records if "count head phase: at most" in r.getMessage()]
    assert said and "capped by train.max_steps=3" in said[0]  # the budget is shown before the phase
