"""Reference mapping: a reference stored in the model directory, label transfer with ``unknown``, the
``map_query`` / ``neurofm map`` / ``neurofm reference`` entry points, and their refusals of bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from neurofm import keys
from neurofm.classify import HeadConfig, LabelHead, fit_head
from neurofm.cli import main
from neurofm.embedding import random_encoder_like
from neurofm.errors import NeurofmError
from neurofm.mapping import (
    UNKNOWN,
    ReferenceConfig,
    add_reference,
    build_reference,
    has_reference,
    load_reference,
    map_query,
    sample_reference_cells,
    save_reference,
    transfer_labels,
)
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer

CENTRES = np.array([[0, 0, 0, 0], [6, 0, 0, 0], [0, 6, 0, 0], [0, 0, 6, 6]], dtype=float)


def blobs(n_per: int, which: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    points = np.concatenate([CENTRES[i] + rng.normal(size=(n_per, 4)) for i in which])
    labels = np.repeat([f"type{i}" for i in which], n_per)
    return points.astype(np.float32), labels


def reference_of(points, labels, **settings) -> object:
    obs = pd.DataFrame({"cell_type": labels, "coarse": np.where(labels == "type0", "a", "b")})
    config = ReferenceConfig(label_columns=("cell_type", "coarse"), **settings)
    return build_reference(points, obs, config)


def test_transfer_labels_known_cells_and_calls_a_type_the_reference_lacks_unknown():
    reference = reference_of(*blobs(200, [0, 1, 2], seed=0), unknown_quantile=0.99)  # 1 % of known cells
    query, truth = blobs(100, [0, 1, 2, 3], seed=1)  # type3: never in the reference
    frame = transfer_labels(reference, query, "cell_type")
    novel = truth == "type3"
    known = ~novel
    assert (frame["label"][known] == truth[known]).mean() >= 0.97
    assert (frame["label"][novel] == UNKNOWN).mean() >= 0.95
    assert (frame["label"][known] == UNKNOWN).mean() <= 0.05
    assert frame["score"].between(0, 1).all()
    assert frame["score"][novel].max() < frame["score"][known].median()
    never = reference_of(*blobs(200, [0, 1, 2], seed=0), unknown_quantile=1.0)
    assert (transfer_labels(never, query, "cell_type")["label"] != UNKNOWN).all()


@pytest.mark.parametrize(
    "head", [{"hidden": 0}, {"hidden": 32}, {"hidden": 32, "features": "genes+embedding"}]
)
def test_a_saved_reference_predicts_exactly_what_it_predicted_before(tmp_path, head):
    points, labels = blobs(60, [0, 1, 2], seed=2)
    genes = np.random.default_rng(0).normal(size=(len(points), 5)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": labels})
    config = ReferenceConfig(label_columns=("cell_type",), head=HeadConfig(**head))
    reference = build_reference(points, obs, config, expression=genes)
    save_reference(reference, tmp_path)
    assert has_reference(tmp_path)
    loaded = load_reference(tmp_path)
    query, _ = blobs(30, [0, 1, 2, 3], seed=3)
    query_genes = np.random.default_rng(1).normal(size=(len(query), 5)).astype(np.float32)
    query_genes[:, 0] = np.nan  # a gene the query lacks: the reference mean
    pd.testing.assert_frame_equal(
        transfer_labels(reference, query, "cell_type", query_genes),
        transfer_labels(loaded, query, "cell_type", query_genes),
    )
    assert loaded.columns["cell_type"].classifier_name == reference.columns["cell_type"].classifier_name
    assert loaded.config == reference.config
    assert "pickle" not in (tmp_path / "reference.json").read_text()
    if head.get("features") == "genes+embedding":
        with pytest.raises(NeurofmError, match="gene expression"):
            transfer_labels(loaded, query, "cell_type")


def test_the_head_picks_the_features_that_carry_the_labels_on_reference_cells_only():
    rng = np.random.default_rng(4)
    labels = np.repeat(["a", "b", "c"], 150)
    codes = np.unique(labels, return_inverse=True)[1]
    informative = (
        rng.normal(size=(len(labels), 3)).astype(np.float32) + 4.0 * np.eye(3, dtype=np.float32)[codes]
    )
    noise = rng.normal(size=(len(labels), 4)).astype(np.float32)
    head = fit_head(labels, embedding=noise, expression=informative, config=HeadConfig(hidden=16))
    assert head.features in ("genes", "genes+embedding") and head.validation_f1 >= 0.95
    head = fit_head(labels, embedding=informative, expression=noise, config=HeadConfig(hidden=16))
    assert head.features in ("embedding", "genes+embedding") and head.validation_f1 >= 0.95
    only = fit_head(labels, embedding=noise, expression=None, config=HeadConfig(hidden=16))
    assert only.features == "embedding" and only.validation_f1 < 0.7
    again = fit_head(labels, embedding=noise, expression=informative, config=HeadConfig(hidden=16))
    np.testing.assert_array_equal(
        again.layers[0][0], fit_head(labels, noise, informative, HeadConfig(hidden=16)).layers[0][0]
    )
    with pytest.raises(NeurofmError, match="features"):
        HeadConfig(features="pca").validate()


def test_a_version_1_reference_still_loads_and_maps(tmp_path):
    """References saved before the label heads (a probe-menu classifier on the embedding) keep working."""
    import json

    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from neurofm.classify import probe_to_json

    points, labels = blobs(60, [0, 1, 2], seed=2)
    reference = build_reference(
        points, pd.DataFrame({"cell_type": labels}), ReferenceConfig(label_columns=("cell_type",))
    )
    save_reference(reference, tmp_path)
    menu = Pipeline([("scaler", StandardScaler()), ("logistic", LogisticRegression(C=1.0))]).fit(
        points, labels
    )
    exported = probe_to_json(menu)
    meta = json.loads((tmp_path / "reference.json").read_text())
    meta["format_version"] = 1
    meta["config"].pop("head")
    info = meta["columns"]["cell_type"]
    info.pop("head")
    info.update(classifier="logistic C=1 z-scored", kind="logistic", classifier_classes=exported["classes"],
                params=exported["params"])  # fmt: skip
    from safetensors.numpy import load_file

    tensors = {
        k: v for k, v in load_file(str(tmp_path / "reference.safetensors")).items() if "/head/" not in k
    }
    tensors.update({f"cell_type/{name}": np.asarray(exported[name], dtype=np.float64)
                    for name in ("coef", "intercept", "scaler_mean", "scaler_scale")})  # fmt: skip
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    (tmp_path / "reference.json").write_text(json.dumps(meta))
    loaded = load_reference(tmp_path)
    query, truth = blobs(30, [0, 1, 2], seed=3)
    frame = transfer_labels(loaded, query, "cell_type")
    np.testing.assert_array_equal(frame["predicted"].to_numpy(), menu.predict(query))
    assert not isinstance(loaded.columns["cell_type"].classifier, LabelHead)


def test_a_sampled_reference_keeps_every_label():
    labels = np.array(["common"] * 990 + ["rare"] * 10)
    rows = sample_reference_cells(
        pd.DataFrame({"c": labels}), ReferenceConfig(label_columns=("c",), max_cells=100)
    )
    assert 100 <= len(rows) <= 110 and np.all(np.diff(rows) > 0)
    assert (labels[rows] == "rare").sum() == 10


def test_build_reference_refuses_bad_labels_in_one_line():
    points, labels = blobs(20, [0, 1], seed=0)
    config = ReferenceConfig(label_columns=("missing",))
    with pytest.raises(NeurofmError, match="no obs column"):
        build_reference(points, pd.DataFrame({"cell_type": labels}), config)
    with pytest.raises(NeurofmError, match="fewer than two labels"):
        build_reference(points, pd.DataFrame({"c": ["x"] * 40}), ReferenceConfig(label_columns=("c",)))
    with pytest.raises(NeurofmError, match="without a label"):
        build_reference(
            points, pd.DataFrame({"c": [None] + list(labels[1:])}), ReferenceConfig(label_columns=("c",))
        )
    with pytest.raises(NeurofmError, match="unknown_quantile"):
        ReferenceConfig(label_columns=("c",), unknown_quantile=0.2).validate()


# ------------------------------------------------------------------------------ through a model dir


def typed_counts(n_cells: int, n_genes: int, seed: int, types: list[int]) -> ad.AnnData:
    """Raw counts of cell types whose means differ on their own block of genes."""
    rng = np.random.default_rng(seed)
    cell_type = np.array(types)[np.arange(n_cells) % len(types)]
    means = np.full((5, n_genes), 0.5)
    for t in range(5):
        means[t, t * 6 : t * 6 + 6] = 12.0
    counts = rng.poisson(means[cell_type] * rng.lognormal(0, 0.2, (n_cells, 1))).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.var_names = [f"ENSG{i:011d}" for i in range(n_genes)]
    adata.var[keys.GENE_SYMBOL] = [f"Sym{i}" for i in range(n_genes)]
    adata.obs_names = [f"c{seed}_{i}" for i in range(n_cells)]
    adata.obs["cell_type"] = [f"type{t}" for t in cell_type]
    adata.obs["group"] = np.where(cell_type < 2, "low", "high")
    return adata


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    reference = typed_counts(240, 30, seed=0, types=[0, 1, 2, 3])
    tokenizer = ExpressionTokenizer().fit(reference)
    config = ModelConfig(n_genes=30, n_bins=20, d_model=16, n_heads=2, n_layers=1, ffn_dim=32, max_tokens=8)
    directory = tmp_path_factory.mktemp("mapping") / "model"
    random_encoder_like(config, seed=3).save_pretrained(directory, tokenizer)
    add_reference(directory, reference, ReferenceConfig(label_columns=("cell_type", "group")), progress=False)
    return directory


def test_map_query_writes_labels_scores_and_its_record_and_leaves_the_input_alone(model_dir):
    query = typed_counts(100, 30, seed=1, types=[0, 1, 2, 3])
    before = query.copy()
    mapped = map_query(query, model=model_dir, copy=True, progress=False)
    assert list(query.obs.columns) == list(before.obs.columns) and not query.obsm  # input untouched
    assert mapped.obsm[keys.EMBEDDING].shape[0] == 100
    for column in ("cell_type", "group"):
        assert f"neurofm_{column}" in mapped.obs and f"neurofm_{column}_score" in mapped.obs
    predicted = mapped.obs["neurofm_cell_type"].astype(str)
    known = predicted != UNKNOWN
    assert (predicted[known] == query.obs["cell_type"][known]).mean() >= 0.9
    record = mapped.uns[keys.MAP_PARAMS]
    assert record["gene_match"]["n_found"] == 30 and record["label_columns"] == ["cell_type", "group"]
    assert sum(record["counts"]["cell_type"].values()) == 100
    assert set(record["score_threshold"]) == {"cell_type", "group"}
    assert all(0 < threshold < 0.5 for threshold in record["score_threshold"].values())


def test_map_query_by_symbol_on_another_gene_naming(model_dir):
    query = typed_counts(60, 30, seed=2, types=[0, 1])
    query.var_names = list(query.var[keys.GENE_SYMBOL].str.upper())
    map_query(query, model=model_dir, label_columns=["group"], progress=False)
    assert query.uns[keys.MAP_PARAMS]["gene_match"]["model_key"] == "gene_symbols"
    assert "neurofm_cell_type" not in query.obs and "neurofm_group" in query.obs


def test_map_query_takes_map_labels_options_and_refuses_others(model_dir):
    query = typed_counts(40, 30, seed=5, types=[0, 1])
    mapped = map_query(
        query, model=model_dir, copy=True, key_added="X_other", label_columns=["group"], progress=False
    )
    assert mapped.obsm["X_other"].shape[0] == 40 and keys.EMBEDDING not in mapped.obsm
    assert mapped.uns[keys.MAP_PARAMS]["label_columns"] == ["group"]
    with pytest.raises(TypeError, match="not_an_option"):
        map_query(query, model=model_dir, not_an_option=1)


def test_the_map_and_reference_commands(model_dir, tmp_path, file_sha256, capsys):
    query = typed_counts(80, 30, seed=4, types=[0, 1, 2, 3, 4])  # type4: not in the reference
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    before = file_sha256(path)
    out = tmp_path / "query.mapped.h5ad"
    assert main(["map", str(path), "--out", str(out), "--model", str(model_dir)]) == 0
    assert file_sha256(path) == before
    printed = capsys.readouterr().out
    assert "obs['neurofm_cell_type']" in printed and "unknown" in printed
    mapped = ad.read_h5ad(out)
    assert mapped.n_obs == 80 and keys.EMBEDDING in mapped.obsm
    assert set(mapped.obs["neurofm_cell_type"].astype(str)) <= {"type0", "type1", "type2", "type3", UNKNOWN}
    novel = query.obs["cell_type"].to_numpy() == "type4"
    assert (mapped.obs["neurofm_cell_type"].astype(str).to_numpy()[novel] == UNKNOWN).mean() >= 0.5
    assert mapped.uns[keys.MAP_PARAMS]["input"] == str(path)
    # a second reference for the same model, from the command
    cells = tmp_path / "cells.h5ad"
    typed_counts(100, 30, seed=5, types=[0, 1, 2]).write_h5ad(cells)
    copy_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(model_dir, copy_dir)
    assert main(["reference", str(copy_dir), str(cells), "--labels", "cell_type"]) == 0
    assert load_reference(copy_dir).label_columns == ["cell_type"]


def bad_cases(model_dir, tmp_path):
    bare = tmp_path / "bare"
    config = ModelConfig(n_genes=30, n_bins=20, d_model=16, n_heads=2, n_layers=1, ffn_dim=32, max_tokens=8)
    random_encoder_like(config).save_pretrained(
        bare, ExpressionTokenizer().fit(typed_counts(40, 30, 0, [0, 1]))
    )
    good = typed_counts(40, 30, seed=6, types=[0, 1])
    other_genes = good.copy()
    other_genes.var_names = [f"other{i}" for i in range(30)]
    other_genes.var = other_genes.var.drop(columns=[keys.GENE_SYMBOL])
    logged = good.copy()
    logged.X = sp.csr_matrix(np.log1p(good.X.toarray()))
    files = {}
    for name, adata in {"good": good, "other_genes": other_genes, "logged": logged, "empty": good[:0].copy()}.items():
        files[name] = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(files[name])
    out = str(tmp_path / "out.h5ad")
    return {
        "a model without a reference": (["map", str(files["good"]), "--out", out, "--model", str(bare)],
                                        "no reference"),
        "a label column the reference lacks": (["map", str(files["good"]), "--out", out, "--model", str(model_dir),
                                                "--labels", "layer"], "no label column 'layer'"),
        "too few of the model's genes": (["map", str(files["other_genes"]), "--out", out, "--model", str(model_dir)],
                                         "of the model's"),
        "non-count data": (["map", str(files["logged"]), "--out", out, "--model", str(model_dir)], "not integers"),
        "an empty query": (["map", str(files["empty"]), "--out", out, "--model", str(model_dir)], "no cells"),
        "a reference of cells without labels": (["reference", str(bare), str(files["good"]), "--labels", ","],
                                                "--labels names no column"),
        "a reference column the cells lack": (["reference", str(bare), str(files["good"]), "--labels", "nope"],
                                              "in --labels"),
    }  # fmt: skip


def test_bad_input_to_map_and_reference_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys):
    for case, (argv, expected) in bad_cases(model_dir, tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("neurofm: error:") and len(err.splitlines()) == 1, (case, err)
        assert expected in err, (case, err)
        assert not (tmp_path / "out.h5ad").exists(), case


def test_the_mapping_baselines_are_fit_on_the_reference_and_project_the_query():
    from neurofm.evaluate.baselines import (
        log_count_features,
        pca_reference_projection,
        scarches_baseline,
        shared_gene_views,
    )

    reference = typed_counts(90, 30, seed=0, types=[0, 1, 2])
    query = typed_counts(40, 30, seed=1, types=[0, 1, 2])
    query = query[:, ::-1].copy()  # another gene order, named by symbol
    query.var_names = list(query.var[keys.GENE_SYMBOL].str.upper())
    ref_view, query_view = shared_gene_views(reference, query)
    assert list(ref_view.var[keys.GENE_SYMBOL].str.upper()) == list(query_view.var_names)
    ref_x, query_x = pca_reference_projection(ref_view, query_view, n_components=5)
    assert ref_x.shape == (90, 5) and query_x.shape == (40, 5)
    again, _ = pca_reference_projection(ref_view, query_view[:10], n_components=5)  # the query never fits it
    np.testing.assert_array_equal(again, ref_x)
    counts_ref, counts_query = log_count_features(ref_view, query_view)
    assert counts_ref.shape == (90, 30) and counts_query.shape == (40, 30)
    latent_ref, latent_query = scarches_baseline(
        ref_view, query_view, n_latent=4, query_epochs=2, max_epochs=2
    )
    assert latent_ref.shape == (90, 4) and latent_query.shape == (40, 4)
    assert np.isfinite(latent_query).all()


def test_the_registered_pyfunc_returns_the_transferred_labels(model_dir):
    import mlflow

    from neurofm import tracking

    with mlflow.start_run(experiment_id=tracking.ensure_experiment("pyfunc-labels")):
        registered = tracking.log_and_register_model(model_dir, "neurofm-mapping-test")
    pyfunc = mlflow.pyfunc.load_model(registered.uri)
    query = typed_counts(30, 30, seed=8, types=[0, 1, 2, 3])
    frame = pd.DataFrame(query.X.toarray(), columns=list(query.var_names), index=list(query.obs_names))
    predicted = pyfunc.predict(frame, params={"labels": True})
    expected = map_query(query, model=model_dir, copy=True, progress=False)
    assert list(predicted.index) == list(query.obs_names)
    np.testing.assert_array_equal(
        predicted["neurofm_cell_type"], expected.obs["neurofm_cell_type"].astype(str)
    )
    np.testing.assert_allclose(
        predicted["neurofm_group_score"], expected.obs["neurofm_group_score"], atol=1e-6
    )
    embedding = predicted[[c for c in predicted if c.startswith("X_neurofm_")]].to_numpy()
    np.testing.assert_allclose(embedding, expected.obsm[keys.EMBEDDING], atol=1e-6)
    assert np.asarray(pyfunc.predict(frame)).shape == embedding.shape  # without the param: embeddings
