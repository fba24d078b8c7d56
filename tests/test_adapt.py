"""``--adapt``: a model with a batch covariate learns a query's new batches (only their rows train), the
adapted model goes beside the output, and bad requests are refused in one line with nothing written."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from neurofm.adapt import AdaptConfig, adapt_model, with_batches
from neurofm.cli import main
from neurofm.embedding import embed_matrix
from neurofm.errors import NeurofmError
from neurofm.mapping import ReferenceConfig, add_reference
from neurofm.model import GeneEncoder, load_pretrained
from tests.test_batch_covariate import MODEL, trained, two_donors  # noqa: F401  (trained: a fixture)

FAST = AdaptConfig(epochs=5, batch_size=32)


def new_donor(n_cells: int = 64):
    """Cells of a third donor, "c", with a batch effect of its own."""
    query = two_donors(n_cells)
    dense = query.X.toarray()
    scale = np.random.default_rng(9).uniform(0.2, 4.0, size=dense.shape[1]).astype(np.float32)
    query.X = type(query.X)(np.round(dense * scale))
    query.obs["donor"] = "c"
    return query


def test_only_the_new_batches_rows_train_and_the_query_fits_better(trained):  # noqa: F811
    _, result = trained
    model, tokenizer = load_pretrained(result.model_dir)
    query = new_donor()
    adapted, summary = adapt_model(model, tokenizer, query, query.obs["donor"].to_numpy(), FAST)
    assert summary["new_batches"] == ["c"] and adapted.config.batch_names == ["a", "b", "c"]
    assert summary["loss_after"] < summary["loss_before"]
    before, after = model.state_dict(), adapted.state_dict()
    for name, tensor in before.items():
        if name.endswith(("batch_encoder", "batch_decoder")):
            torch.testing.assert_close(after[name][:2], tensor, rtol=0, atol=0)  # known batches kept
            assert not torch.allclose(after[name][2], tensor.mean(0))  # the new row moved from its start
        else:
            torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    donors = query.obs["donor"].to_numpy()
    own = embed_matrix(adapted, tokenizer, query, batches=donors, progress=False, device="cpu")
    none = embed_matrix(model, tokenizer, query, progress=False, device="cpu")
    assert np.abs(own - none).max() > 1e-4
    with pytest.raises(NeurofmError, match="never saw"):  # the unadapted model refuses the new donor
        embed_matrix(model, tokenizer, query, batches=donors, progress=False, device="cpu")


def test_adapt_on_a_model_without_a_batch_covariate_is_refused():
    with pytest.raises(NeurofmError, match="--adapt needs a model whose count head has a batch covariate"):
        with_batches(GeneEncoder(MODEL), ["c"])


def _digest(directory) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())).hexdigest()


def test_neurofm_map_adapt_writes_the_adapted_model_beside_the_output(trained, tmp_path, capsys):  # noqa: F811
    reference_cells, result = trained
    model_dir = tmp_path / "model"
    shutil.copytree(result.model_dir, model_dir)
    add_reference(model_dir, reference_cells, ReferenceConfig(label_columns=("subtype",)), progress=False)
    before = _digest(model_dir)
    query = new_donor()
    query.write_h5ad(tmp_path / "query.h5ad")
    out = tmp_path / "query.mapped.h5ad"
    args = ["map", str(tmp_path / "query.h5ad"), "--model", str(model_dir), "--out", str(out)]
    assert main([*args, "--batch-col", "donor"]) != 0  # donor "c" unseen, no --adapt: refused
    assert "never saw" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--batch-col", "donor", "--adapt"]) == 0
    adapted = tmp_path / "query.mapped.adapted"
    assert out.exists() and (adapted / "reference.json").is_file() and (adapted / "adapted.json").is_file()
    assert load_pretrained(adapted)[0].config.batch_names == ["a", "b", "c"]
    assert _digest(model_dir) == before  # the model given is never written
    whole = tmp_path / "whole.h5ad"  # no --batch-col: the whole query is one new batch, named after the file
    assert main(["map", str(tmp_path / "query.h5ad"), "--model", str(model_dir), "--out", str(whole), "--adapt"]) == 0
    assert load_pretrained(tmp_path / "whole.adapted")[0].config.batch_names == ["a", "b", "query"]
    plain = tmp_path / "plain"
    shutil.copytree(result.model_dir, plain)
    plain_model, tokenizer = load_pretrained(plain)
    GeneEncoder(replace(plain_model.config, batch_names=[], batch_key=None)).save_pretrained(plain, tokenizer)
    add_reference(plain, reference_cells, ReferenceConfig(label_columns=("subtype",)), progress=False)
    other = tmp_path / "other.h5ad"
    capsys.readouterr()
    assert main(["map", str(tmp_path / "query.h5ad"), "--model", str(plain), "--out", str(other), "--adapt"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "batch covariate" in error[0]
    assert not other.exists() and not (tmp_path / "other.adapted").exists()
