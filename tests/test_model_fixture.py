"""A model directory saved by an older main still loads and embeds to the numbers it gave then, and a new
model still draws the same initial weights (``tests/fixtures/make_model_v1.py`` wrote both)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from neurofm.embedding import embed_matrix
from neurofm.model import GeneEncoder, load_pretrained

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def expected():
    return np.load(FIXTURES / "model_v1_expected.npz", allow_pickle=False)


def test_a_model_saved_before_the_count_head_moved_embeds_to_the_same_numbers(expected):
    model, tokenizer = load_pretrained(FIXTURES / "model_v1")
    assert model.count_head is not None and model.count_head.count_gene_index.numel() == 12
    adata = ad.AnnData(X=sp.csr_matrix(expected["counts"]))
    adata.var_names = list(expected["genes"])
    embedding = embed_matrix(model, tokenizer, adata, progress=False, device="cpu")
    np.testing.assert_allclose(embedding, expected["embedding"], rtol=1e-5, atol=1e-6)


def test_a_new_model_draws_the_initial_weights_it_drew_before(expected):
    config = load_pretrained(FIXTURES / "model_v1")[0].config
    torch.manual_seed(11)
    state = GeneEncoder(config).state_dict()
    before = {
        name.removeprefix("init/"): expected[name] for name in expected.files if name.startswith("init/")
    }
    from neurofm.model import _current_names

    renamed = {name: before[old] for name, old in zip(_current_names(before), before, strict=True)}
    assert set(renamed) == set(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(tensor.numpy(), renamed[name], err_msg=name)
