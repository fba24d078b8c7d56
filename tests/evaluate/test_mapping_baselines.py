"""The label-transfer tools a user would pick instead: CellTypist's default trainer on today's scikit-learn,
Symphony's reference and mapping (neurofm.evaluate.baselines)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from neurofm.evaluate.baselines import (
    OneVsRestLogisticRegression,
    celltypist_train,
    symphony_map,
    symphony_reference,
)


def _cells(n_cells: int = 300, n_genes: int = 60, n_types: int = 3, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    rates = rng.gamma(1.0, 2.0, size=(n_types, n_genes))
    kind = np.arange(n_cells) % n_types
    counts = rng.poisson(rates[kind] * rng.uniform(0.5, 2.0, size=(n_cells, 1))).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.obs["kind"] = [f"type{k}" for k in kind]
    return adata


def test_one_vs_rest_is_one_binary_logistic_regression_per_class():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 5)), rng.integers(0, 3, 200).astype(str)
    x[:, 0] += y.astype(int)
    model = OneVsRestLogisticRegression(C=0.5, max_iter=500).fit(x, y)
    for row, label in enumerate(model.classes_):
        binary = LogisticRegression(C=0.5, max_iter=500).fit(x, y == label)
        np.testing.assert_allclose(model.coef_[row], binary.coef_[0], rtol=1e-6)
        np.testing.assert_allclose(model.decision_function(x)[:, row], binary.decision_function(x), rtol=1e-6)
    assert (model.predict(x) == y).mean() > 0.6


def test_celltypist_trains_its_default_model_and_annotates():
    import celltypist

    adata = _cells()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    model = celltypist_train(adata, "kind")
    assert getattr(model.classifier, "multi_class", "ovr") == "ovr"  # one-vs-rest, whichever scikit-learn
    assert model.classifier.coef_.shape == (3, adata.n_vars)
    result = celltypist.annotate(adata, model, majority_voting=False)
    assert (result.predicted_labels["predicted_labels"].to_numpy() == adata.obs["kind"].to_numpy()).mean() > 0.9
    probability = result.probability_matrix.to_numpy()
    assert probability.shape == (adata.n_obs, 3) and ((probability >= 0) & (probability <= 1)).all()
    import importlib

    from sklearn.linear_model import LogisticRegression

    assert importlib.import_module("celltypist.train").LogisticRegression is LogisticRegression  # restored


def test_symphony_maps_a_query_onto_its_reference_and_says_how_sure():
    import symphonypy

    reference_counts, query_counts = _cells(seed=0), _cells(n_cells=150, seed=0)[::-1].copy()
    reference = symphony_reference(reference_counts, n_components=10, n_clusters=6)
    assert reference.obsm["X_pca_harmony"].shape == (300, 10) and reference.uns["harmony"]["K"] == 6
    labels, distance = symphony_map(reference, query_counts, ["kind"])
    predicted, vote_share = labels["kind"]
    assert (predicted == query_counts.obs["kind"].to_numpy()).mean() > 0.9
    assert ((vote_share > 0) & (vote_share <= 1)).all() and distance.shape == (150,) and np.isfinite(distance).all()
    # the same labels as symphonypy's own kNN transfer
    query = query_counts.copy()
    sc.pp.normalize_total(query, target_sum=1e5)
    sc.pp.log1p(query)
    symphonypy.tl.map_embedding(query, reference)
    symphonypy.tl.transfer_labels_kNN(query, reference, "kind")
    np.testing.assert_array_equal(predicted, query.obs["kind"].astype(str).to_numpy())


def test_one_vs_rest_refuses_a_multinomial_request():
    from neurofm.errors import NeurofmError

    with pytest.raises(NeurofmError, match="one-vs-rest"):
        OneVsRestLogisticRegression(multi_class="multinomial")
