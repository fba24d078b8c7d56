"""The count head's batch covariate (``train.batch_key`` → ``ModelConfig.batch_names``): batches flow from
the store through the stream into the count head, are saved with the model, and embed back the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofm.data.store import CellStore, convert_anndata
from neurofm.embedding import embed_matrix
from neurofm.errors import NeurofmError
from neurofm.model import GeneEncoder, ModelConfig, batch_codes, load_pretrained
from neurofm.stream import CellStream, StreamConfig, store_batches
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from neurofm.train import pretrain
from tests.test_tokenizer import synthetic_counts
from tests.test_train import small_train_config

MODEL = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_dim=32, latent_dim=4, decoder_dim=16)


def two_donors(n_cells: int = 96):
    """Two cell types × two donors; donor "b" has its genes' counts scaled unevenly (a batch effect)."""
    adata = synthetic_counts(n_cells=n_cells, n_genes=30, seed=5)
    donor = np.where(np.arange(n_cells) % 4 < 2, "a", "b")
    scale = np.random.default_rng(1).uniform(0.3, 3.0, size=30).astype(np.float32)
    dense = adata.X.toarray()
    dense[donor == "b"] = np.round(dense[donor == "b"] * scale)
    adata.X = type(adata.X)(dense)
    adata.obs["donor"] = donor
    return adata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adata = two_donors()
    out = tmp_path_factory.mktemp("batches") / "run"
    result = pretrain(adata, TokenizerConfig(), MODEL, small_train_config(batch_key="donor"), out)
    return adata, result


def test_two_batches_train_save_load_and_embed_the_same(trained, tmp_path):
    adata, result = trained
    model, tokenizer = load_pretrained(result.model_dir)
    assert model.config.batch_names == ["a", "b"]
    head = model.count_head
    for table in (head.batch_encoder, head.batch_decoder):  # trained away from zero, one row per batch
        assert table.shape == (2, MODEL.decoder_dim) and bool((table != 0).any(1).all())
    donors = adata.obs["donor"].to_numpy()
    embedded = embed_matrix(model, tokenizer, adata, batches=donors, progress=False, device="cpu")
    model.save_pretrained(tmp_path / "again", tokenizer)
    again, again_tokenizer = load_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(
        embed_matrix(again, again_tokenizer, adata, batches=donors, progress=False, device="cpu"), embedded
    )
    # the batch enters the latent: the same cells told the other donor embed elsewhere
    swapped = np.where(donors == "a", "b", "a")
    other = embed_matrix(model, tokenizer, adata, batches=swapped, progress=False, device="cpu")
    assert np.abs(other - embedded).max() > 1e-3


def test_the_no_batch_vector_and_an_unseen_batch(trained):
    adata, result = trained
    model, tokenizer = load_pretrained(result.model_dir)
    new = np.array(["c"] * adata.n_obs)
    with pytest.raises(NeurofmError, match="never saw") as error:
        embed_matrix(model, tokenizer, adata, batches=new, progress=False, device="cpu")
    assert "\n" not in str(error.value)
    unseen = embed_matrix(
        model, tokenizer, adata, batches=new, unseen_batch="none", progress=False, device="cpu"
    )
    no_batch = embed_matrix(model, tokenizer, adata, progress=False, device="cpu")  # no batches given
    np.testing.assert_array_equal(unseen, no_batch)
    # the no-batch vector is the mean of the batches' vectors
    head = model.count_head
    codes = batch_codes(model.config, ["a", "b", "c"], unseen="none")
    assert codes.tolist() == [0, 1, -1]
    torch.testing.assert_close(head.batch_vectors(head.batch_encoder, codes)[2], head.batch_encoder.mean(0))
    with pytest.raises(NeurofmError, match="batch"):
        head.latent(torch.zeros(1, MODEL.d_model), torch.zeros(1, MODEL.decoder_dim))  # no batch at all


def test_the_stream_carries_each_cells_batch(tmp_path):
    adata = two_donors(64)
    convert_anndata(adata, tmp_path / "store")
    store = CellStore(tmp_path / "store")
    tokenizer = ExpressionTokenizer(TokenizerConfig()).fit(adata)
    names, codes = store_batches(store, "donor")
    assert names == ["a", "b"]
    stream = CellStream(store, tokenizer, StreamConfig(batch_size=16, counts=True, batch_key="donor"))
    obs = store.read_obs(["donor"])["donor"].to_numpy()
    seen = 0
    for batch in stream:
        expected = np.searchsorted(names, obs[batch["rows"].numpy()])
        np.testing.assert_array_equal(batch["batch_index"].numpy(), expected)
        seen += len(batch["rows"])
    assert seen == stream.n_train_cells
    plain = next(iter(CellStream(store, tokenizer, StreamConfig(batch_size=16))))
    assert "batch_index" not in plain


def test_bad_batch_settings_are_refused_in_one_line(tmp_path):
    adata = two_donors(64)
    convert_anndata(adata, tmp_path / "store")
    store = CellStore(tmp_path / "store")
    with pytest.raises(NeurofmError, match="'tissue' is not in the cells' obs") as error:
        store_batches(store, "tissue")
    assert "\n" not in str(error.value)
    with pytest.raises(NeurofmError, match="latent_dim"):
        pretrain(
            adata, TokenizerConfig(), ModelConfig(d_model=16, n_heads=2, n_layers=1, latent_dim=0),
            small_train_config(batch_key="donor"), tmp_path / "run",
        )  # fmt: skip
    plain = GeneEncoder(MODEL)  # a model without batches refuses cells given batches
    with pytest.raises(NeurofmError, match="no batch covariate"):
        plain.count_head.latent(torch.zeros(2, 16), torch.zeros(2, 16), torch.tensor([0, 1]))
