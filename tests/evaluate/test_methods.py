"""neurofm.evaluate.methods without ZenML (the evaluate pipeline's embed, t-SNE and probe steps): which
methods are embedded and named how, the files written, the report's model table, one-line refusals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from neurofm import keys
from neurofm.embedding import random_encoder_like
from neurofm.errors import NeurofmError
from neurofm.evaluate.cluster import ClusterConfig
from neurofm.evaluate.methods import (
    METHOD_KEYS,
    draw_tsne,
    embed_methods,
    method_embeddings,
    method_name,
    model_table,
    score_methods,
)
from neurofm.evaluate.probe import ProbeConfig
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_mapping import typed_counts

LABELS = {"label_column": "cell_type", "label_mapping": None}


def test_a_capped_scvi_is_named_apart_and_only_present_methods_are_returned():
    assert method_name("scvi", 20) == "scvi_capped" and method_name("scvi", None) == "scvi"
    assert method_name("pca", 20) == "pca"
    cells = typed_counts(6, 30, seed=0, types=[0, 1])
    cells.obsm[keys.EMBEDDING] = np.ones((6, 3))
    cells.obsm[keys.SCVI_BASELINE] = np.zeros((6, 2))
    embeddings = method_embeddings(cells, scvi_max_epochs=20)
    assert list(embeddings) == ["model", "scvi_capped"] and embeddings["scvi_capped"].shape == (6, 2)
    assert list(METHOD_KEYS) == ["model", "pca", "scvi", "random"]  # the order of every table and figure


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """60 cells of 3 types embedded by a tiny random model, with the random and PCA baselines."""
    directory = tmp_path_factory.mktemp("methods")
    cells = typed_counts(60, 30, seed=0, types=[0, 1, 2])
    config = ModelConfig(n_genes=30, n_bins=20, d_model=16, n_heads=2, n_layers=1, ffn_dim=32, max_tokens=8)
    random_encoder_like(config, seed=3).save_pretrained(directory / "model", ExpressionTokenizer().fit(cells))
    embed_methods(
        cells, directory / "model", directory / "evaluation", **LABELS, gene_col=None, min_gene_overlap=0.5,
        batch_size=32, pooling="mean", unobserved="exclude", baselines=["random", "pca"], pca_components=5,
        scvi_latent=4, scvi_max_epochs=None,
    )  # fmt: skip
    return cells, directory


def test_embedding_writes_each_methods_obsm_and_the_model_embedding_labels_and_cells(embedded):
    cells, directory = embedded
    assert {keys.EMBEDDING, keys.RANDOM_BASELINE, keys.PCA_BASELINE} == set(cells.obsm)
    assert cells.obsm[keys.PCA_BASELINE].shape == (60, 5)
    assert not np.allclose(cells.obsm[keys.EMBEDDING], cells.obsm[keys.RANDOM_BASELINE])  # another encoder
    assert cells.uns[keys.EMBEDDING_PARAMS]["model_dir"] == str(directory / "model")
    out = directory / "evaluation"
    assert np.array_equal(np.load(out / "embeddings.npy"), cells.obsm[keys.EMBEDDING])
    assert list(np.load(out / "labels.npy")) == list(cells.obs["cell_type"])
    table = pd.read_csv(out / "cells.tsv", sep="\t")
    assert list(table.columns) == ["cell", "label"] and list(table["cell"]) == list(cells.obs_names)


def test_a_missing_label_column_is_refused_before_anything_is_embedded(tmp_path):
    cells = typed_counts(10, 30, seed=0, types=[0, 1])
    with pytest.raises(NeurofmError, match="nope"):
        embed_methods(
            cells, tmp_path / "no-model", tmp_path, label_column="nope", label_mapping=None, gene_col=None,
            min_gene_overlap=0.5, batch_size=8, pooling="mean", unobserved="exclude", baselines=[], pca_components=2,
            scvi_latent=2, scvi_max_epochs=None,
        )  # fmt: skip
    assert not cells.obsm and not list(tmp_path.iterdir())


def test_tsne_is_drawn_for_every_method_on_a_sample(embedded, tmp_path):
    cells, _ = embedded
    paths = draw_tsne(cells, tmp_path, **LABELS, max_cells=40, scvi_max_epochs=None)
    assert list(paths) == ["model", "pca", "random"]
    assert all(path == tmp_path / method / "tsne.png" and path.is_file() for method, path in paths.items())


def test_the_model_table_reports_the_pretraining_only_when_known(embedded):
    cells, _ = embedded
    info = {"model_uri": "models:/m/2", "mlflow_run_id": None, "epochs": 3, "steps": 30}
    table = model_table(info, "toy", cells, ["first note"])
    assert table["model"] == "models:/m/2" and "MLflow run of the model" not in table  # None is left out
    assert table["data"] == "toy (60 cells × 30 genes)" and table["pre-training"] == "3 epochs, 30 steps"
    assert table["genes"].startswith("30 of the model's 30 genes") and table["note 1"] == "first note"
    assert "pre-training validation perplexity" not in table
    perplexity = {"best_val_perplexity": 4.0, "baseline_perplexity": 8.0, "perplexity_ratio": 0.5,
                  "best_val_masked_accuracy": 0.4, "baseline_masked_accuracy": 0.2}  # fmt: skip
    table = model_table({"source": "dir", **perplexity}, "toy", cells, [])
    assert table["model"] == "dir" and table["pre-training validation perplexity"].endswith("(ratio 0.500)")


SCORING = dict(
    probe_config=ProbeConfig(n_splits=3, n_repeats=1), cluster_config=ClusterConfig(n_neighbors=10),
    label_efficiency_shots=[5], label_efficiency_draws=1, max_cells_cluster=None, max_cells_visualize=None,
    scvi_max_epochs=None,
)  # fmt: skip


def test_a_missing_group_column_is_refused_in_one_line(embedded, tmp_path):
    cells, _ = embedded
    with pytest.raises(NeurofmError, match="group column 'donor' is not in obs.*--group-col"):
        score_methods(cells, tmp_path, {}, "toy", **LABELS, group_column="donor", **SCORING)


def test_every_method_is_scored_on_the_groups_and_reported_with_its_tsne_linked(
    embedded, tmp_path, monkeypatch
):
    """The wiring around compare.evaluate_embeddings and write_report (both tested in test_compare.py)."""
    from neurofm.evaluate import compare

    cells, _ = embedded
    cells = cells.copy()
    cells.obs["donor"] = np.where(np.arange(cells.n_obs) % 2, "d1", "d2")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tsne.png").write_bytes(b"png")  # drawn before by draw_tsne; pca's was not
    seen = {}
    result = SimpleNamespace(
        methods={"model": SimpleNamespace(paths={}), "pca": SimpleNamespace(paths={})}, summary={"model/probe_f1": 0.9},
        settings={"strongest_baselines": {"probe_f1": "pca"}}, class_counts={"type0": 20},
    )  # fmt: skip

    def evaluate_embeddings(embeddings, labels, out, **options):
        seen.update(embeddings=embeddings, labels=labels, out=out, **options)
        return result

    def write_report(result, out, extra):
        seen["extra"] = extra
        return out / "report.md"

    monkeypatch.setattr(compare, "evaluate_embeddings", evaluate_embeddings)
    monkeypatch.setattr(compare, "write_report", write_report)
    scores = score_methods(cells, tmp_path, {"source": "dir"}, "toy", **LABELS, group_column="donor",
                           notes=["a note"], **SCORING)  # fmt: skip
    assert list(seen["embeddings"]) == ["model", "pca", "random"] and seen["views"] == ("umap",)
    assert list(seen["labels"]) == list(cells.obs["cell_type"]) and list(seen["groups"]) == list(
        cells.obs["donor"]
    )
    assert seen["probe_config"] is SCORING["probe_config"] and seen["label_efficiency_shots"] == [5]
    assert (
        result.methods["model"].paths == {"tsne": tmp_path / "model" / "tsne.png"}
        and not result.methods["pca"].paths
    )
    assert seen["extra"] == model_table({"source": "dir"}, "toy", cells, ["a note"])
    assert scores == {
        "metrics": {"model/probe_f1": 0.9}, "strongest": {"probe_f1": "pca"}, "report": str(tmp_path / "report.md"),
        "report_html": str(tmp_path / "report.html"), "classes": {"type0": 20}, "out_dir": str(tmp_path),
        "notes": ["a note"],
    }  # fmt: skip
