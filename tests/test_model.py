"""Model: shapes, padding-mask invariance, model directory round trip and refusals."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from neurofm.errors import NeurofmError
from neurofm.model import GeneEncoder, ModelConfig, load_pretrained
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_tokenizer import synthetic_counts

# the architecture without the count head: its embedding is the pooled cell vector (tests/test_count_head.py)
CONFIG = ModelConfig(
    n_genes=40, n_bins=20, d_model=32, n_heads=4, n_layers=2, ffn_dim=64, max_tokens=40, latent_dim=0
)


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = GeneEncoder(CONFIG).eval()
    tokenizer = ExpressionTokenizer().fit(synthetic_counts())
    model.save_pretrained(tmp_path / "model", tokenizer)
    return model, tmp_path / "model"


def test_forward_and_encode_shapes():
    model = GeneEncoder(CONFIG)
    gene_ids = torch.randint(0, 40, (3, 17))
    bin_ids = torch.randint(0, 21, (3, 17))
    assert model(gene_ids, bin_ids).shape == (3, 17, 20)
    assert model.encode(gene_ids, bin_ids).shape == (3, 17, 32)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(1)
    model = GeneEncoder(CONFIG).eval()
    gene_ids, bin_ids = torch.randint(0, 40, (1, 10)), torch.randint(0, 21, (1, 10))
    alone = model(gene_ids, bin_ids)
    padded_genes = torch.cat([gene_ids, torch.randint(0, 40, (1, 6))], 1)
    padded_bins = torch.cat([bin_ids, torch.randint(0, 21, (1, 6))], 1)
    padding = torch.zeros(1, 16, dtype=torch.bool)
    padding[:, 10:] = True
    with_padding = model(padded_genes, padded_bins, padding)
    torch.testing.assert_close(with_padding[:, :10], alone, atol=1e-5, rtol=1e-5)


def test_too_many_tokens_are_refused():
    model = GeneEncoder(CONFIG)
    with pytest.raises(NeurofmError, match="max_tokens"):
        model(torch.zeros(1, 41, dtype=torch.long), torch.zeros(1, 41, dtype=torch.long))


def test_save_load_round_trip_is_exact(model_dir):
    model, directory = model_dir
    loaded, tokenizer = load_pretrained(directory)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert tokenizer.n_genes == 40
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_edges.npz",
    ]


def test_incomplete_directory_is_refused(model_dir):
    _, directory = model_dir
    (directory / "tokenizer_edges.npz").unlink()
    with pytest.raises(NeurofmError, match="tokenizer"):
        load_pretrained(directory)
    with pytest.raises(NeurofmError, match="does not exist"):
        load_pretrained(directory / "nowhere")


def test_corrupt_safetensors_is_refused(model_dir):
    _, directory = model_dir
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(NeurofmError, match="safetensors"):
        load_pretrained(directory)


def test_pickle_planted_as_weights_is_refused(model_dir, tmp_path):
    _, directory = model_dir
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (directory / "model.safetensors").write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(NeurofmError, match="safetensors"):
        load_pretrained(directory)
    assert not marker.exists()


def test_config_mismatching_weights_is_refused(model_dir):
    _, directory = model_dir
    meta = json.loads((directory / "config.json").read_text())
    meta["model"]["d_model"] = 64
    (directory / "config.json").write_text(json.dumps(meta))
    with pytest.raises(NeurofmError, match="do not match"):
        load_pretrained(directory)


def test_config_out_of_range_is_refused():
    with pytest.raises(NeurofmError, match="multiple of n_heads"):
        ModelConfig(d_model=30, n_heads=4).validate()
    with pytest.raises(NeurofmError, match="dropout"):
        GeneEncoder(ModelConfig(dropout=1.5))


def test_random_init_is_seeded():
    from neurofm.embedding import random_encoder_like

    first, second = random_encoder_like(CONFIG, seed=3), random_encoder_like(CONFIG, seed=3)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not np.allclose(
        random_encoder_like(CONFIG, seed=4).head.weight.detach(), first.head.weight.detach()
    )


def test_gene_bin_bias_is_added_to_the_logits_and_can_be_turned_off():
    model = GeneEncoder(CONFIG).eval()
    gene_ids, bin_ids = torch.randint(0, 40, (2, 9)), torch.randint(0, 21, (2, 9))
    before = model(gene_ids, bin_ids)
    with torch.no_grad():
        model.gene_bin_bias.weight[:, 3] += 5.0
    torch.testing.assert_close(model(gene_ids, bin_ids)[..., 3], before[..., 3] + 5.0)
    plain = GeneEncoder(ModelConfig(**{**CONFIG.__dict__, "gene_bin_bias": False}))
    assert plain.gene_bin_bias is None and plain(gene_ids, bin_ids).shape == (2, 9, 20)


def test_cell_embedding_is_the_pooled_cell_features_and_ignores_padding():
    torch.manual_seed(2)
    model = GeneEncoder(CONFIG).eval()
    gene_ids, bin_ids = torch.randint(0, 40, (2, 12)), torch.randint(0, 20, (2, 12))
    cell = model.cell_embedding(gene_ids, bin_ids)
    assert cell.shape == (2, 32)
    torch.testing.assert_close(cell, model.cell_features(gene_ids, bin_ids).mean(1))
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[:, 12:] = True
    padded = model.cell_embedding(
        torch.cat([gene_ids, torch.randint(0, 40, (2, 4))], 1),
        torch.cat([bin_ids, torch.randint(0, 20, (2, 4))], 1),
        padding,
    )
    torch.testing.assert_close(padded, cell, atol=1e-5, rtol=1e-5)


def test_cell_head_sees_only_the_cell_vector_and_gets_gradients():
    torch.manual_seed(3)
    model = GeneEncoder(CONFIG)
    gene_ids, bin_ids = torch.randint(0, 40, (3, 10)), torch.randint(0, 21, (3, 10))
    token_logits, cell_logits = model.pretrain_logits(gene_ids, bin_ids)
    assert token_logits.shape == cell_logits.shape == (3, 10, 20)
    cell_logits.logsumexp(-1).sum().backward()
    for module in (model.cell_head, model.gene_query, model.gene_embedding, model.bin_scale):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # the token head is not on the cell path
    # the visible tokens make the cell vector; masked ones only ask for their genes' bins
    visible = bin_ids.clone()
    visible[:, :3] = CONFIG.mask_token
    moved = torch.cat([gene_ids[:, :3].roll(1, 0), gene_ids[:, 3:]], 1)  # other genes behind the masks
    with torch.no_grad():
        first = model.pretrain_logits(gene_ids, visible)[1][:, 3:]
        second = model.pretrain_logits(moved, visible)[1][:, 3:]
    torch.testing.assert_close(first, second)


def test_nonzero_cell_pooling_ignores_zero_bin_tokens():
    from dataclasses import replace

    torch.manual_seed(4)
    model = GeneEncoder(replace(CONFIG, cell_pooling="nonzero")).eval()
    gene_ids, bin_ids = torch.randint(0, 40, (2, 10)), torch.randint(1, 20, (2, 10))
    extra_genes = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        alone = model.pretrain_logits(gene_ids, bin_ids)[1]
        # five more genes at bin 0 (undetected): the cell vector, hence the cell logits of the first ten
        # genes, must not move
        with_zeros = model.pretrain_logits(
            torch.cat([gene_ids, extra_genes], 1),
            torch.cat([bin_ids, torch.zeros(2, 5, dtype=torch.long)], 1),
        )[1][:, :10]
    torch.testing.assert_close(alone, with_zeros)
    with pytest.raises(NeurofmError, match="cell_pooling"):
        GeneEncoder(replace(CONFIG, cell_pooling="median"))


@pytest.mark.parametrize("pooling", ["all", "nonzero"])
def test_the_sparse_whole_cell_vector_equals_the_dense_mean_and_its_gradient(pooling):
    torch.manual_seed(0)
    model = GeneEncoder(
        ModelConfig(n_genes=120, d_model=16, n_heads=2, n_layers=1, ffn_dim=16, cell_pooling=pooling)
    )
    bins = torch.randint(1, 20, (6, 120))
    bins[torch.rand(6, 120) < 0.8] = 0
    bins[2] = 0  # a cell with no counts
    bins[:, 7] = torch.arange(3, 9)  # a gene expressed in every cell: its lowest bin is not 0
    genes = torch.arange(120).expand(6, -1)
    dense = model.pool(model.cell_features(genes, bins), bins > 0 if pooling == "nonzero" else None)
    sparse = model.pooled_cell(bins)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    weights = torch.randn(6, 16)
    parameters = [model.gene_embedding.weight, model.bin_embedding.weight, model.ln_input.weight]
    expected = torch.autograd.grad((dense * weights).sum(), parameters)
    for got, want in zip(torch.autograd.grad((sparse * weights).sum(), parameters), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
