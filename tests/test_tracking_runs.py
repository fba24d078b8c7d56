"""neurofm.tracking's pipeline runs without ZenML (the resolve_model, track_evaluation and track_mapping
steps): what is known of a model, the evaluation's run and promotion, the mapping's run. On the session's
MLflow store (conftest.py), under names of each test's own."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from neurofm import registry, tracking
from neurofm.config import EvaluateConfig, MapConfig, TrackingConfig
from neurofm.embedding import random_encoder_like
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_tokenizer import synthetic_counts


@pytest.fixture()
def names() -> dict:
    name = f"tracking-runs-{uuid.uuid4().hex[:8]}"
    return {"experiment": name, "tracking_uri": None, "registered_model_name": f"{name}-model"}


def _registered(tmp_path, names, metrics: dict) -> str:
    """A tiny model registered from a run that logged ``metrics``; returns its version."""
    adata = synthetic_counts(n_cells=40, n_genes=12)
    config = ModelConfig(n_genes=12, n_bins=20, d_model=8, n_heads=2, n_layers=1, ffn_dim=16, max_tokens=4)
    model_dir = random_encoder_like(config).save_pretrained(
        tmp_path / "best", ExpressionTokenizer().fit(adata)
    )
    with tracking.start_run(names["experiment"], run_name="pretrain"):
        tracking.log_metrics(metrics)
        return tracking.log_and_register_model(model_dir, names["registered_model_name"]).version


def test_a_directory_is_its_own_uri_and_a_version_brings_its_pretraining_figures(tmp_path, names):
    model_dir, info = tracking.resolve_model_info(str(tmp_path), names["registered_model_name"])
    assert model_dir == tmp_path and info == {
        "source": str(tmp_path), "model_name": None, "model_version": None, "model_uri": str(tmp_path),
        "mlflow_run_id": None,
    }  # fmt: skip
    figures = dict(zip(tracking.PRETRAIN_FIGURES, (4.0, 8.0, 0.5, 0.4, 0.2), strict=True))
    version = _registered(tmp_path, names, figures)
    _, info = tracking.resolve_model_info(None, names["registered_model_name"])  # the newest version
    assert info["source"] == f"models:/{names['registered_model_name']}@{registry.NEWEST_ALIAS}"
    assert info["model_version"] == version and info["mlflow_run_id"] and info["perplexity_ratio"] == 0.5
    assert {key: info[key] for key in tracking.PRETRAIN_FIGURES} == figures


def test_an_evaluation_is_one_run_linked_to_the_version_and_promotes_only_when_asked(tmp_path, names):
    version = _registered(tmp_path, names, {})
    _, info = tracking.resolve_model_info(None, names["registered_model_name"])
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "report.md").write_text("# report")
    metrics = {
        "model/probe_auc": 0.97,
        "model/probe_accuracy": 0.92,
        "pca/probe_auc": 0.9,
        "pca/probe_accuracy": 0.9,
    }
    evaluation = {"metrics": metrics, "out_dir": str(tmp_path / "evaluation"), "report": "r"}
    settings = EvaluateConfig(promote=False, model="ignored", label_column="subtype")
    summary = tracking.log_evaluation(evaluation, info, settings, TrackingConfig(**names), "toy")
    assert summary["promotion"] == "evaluate.promote is false; no alias moved" and summary["report"] == "r"
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "evaluate-toy" and run.data.tags["neurofm.model_version"] == version
    assert run.data.params["evaluate.label_column"] == "subtype" and "evaluate.model" not in run.data.params
    assert (
        run.data.metrics["model/probe_auc"] == 0.97
        and run.data.tags["neurofm.promotion"] == summary["promotion"]
    )
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")] == [
        "evaluation/report.md"
    ]
    settings.promote = True
    promoted = tracking.log_evaluation(evaluation, info, settings, TrackingConfig(**names), "toy")
    assert "→ 'champion'" in promoted["promotion"]
    directory = {"source": str(tmp_path), "model_uri": str(tmp_path), "model_version": None}
    unregistered = tracking.log_evaluation(evaluation, directory, settings, TrackingConfig(**names), "toy")
    assert unregistered["promotion"] == "not a registered model version; no alias moved"


def test_a_mapping_is_one_run_with_its_unknown_shares_and_scores(tmp_path, names):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "transfer.csv").write_text("method\nmodel\n")
    mapping = {
        "record": {"unknown_share": {"subtype": 0.25}, "n_cells": 80},
        "seconds": 2.0,
        "mapped_file": "q.h5ad",
    }
    scores = {"metrics": {"model/transfer_f1": 0.8}, "out_dir": str(tmp_path / "report"), "report": "r.md"}
    info = {"source": "dir", "model_uri": "dir", "model_version": None}
    summary = tracking.log_mapping(
        mapping, scores, info, MapConfig(model="dir", baselines=["pca_ref"]), TrackingConfig(**names), "q"
    )
    assert summary["record"] == mapping["record"] and summary["report"] == "r.md" and summary["model"] == info
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "map-q" and run.data.tags["neurofm.pipeline_step"] == "map"
    assert run.data.metrics == {"unknown_share/subtype": 0.25, "map_seconds": 2.0, "n_cells": 80.0,
                                "model/transfer_f1": 0.8}  # fmt: skip
    assert run.data.params["map.baselines"] == "['pca_ref']" and "map.model" not in run.data.params
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "map")] == ["map/transfer.csv"]
    unscored = tracking.log_mapping(
        mapping, {"metrics": {}, "out_dir": None}, info, MapConfig(), TrackingConfig(**names), "q"
    )
    assert not MlflowClient().list_artifacts(unscored["mlflow_run_id"]) and unscored["report"] is None
