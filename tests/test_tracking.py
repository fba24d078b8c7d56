"""neurofm.tracking against a real (temporary SQLite) MLflow store: runs, params, metrics, artifacts,
registration and aliases, and model references resolved back to the directory that was logged."""

from __future__ import annotations

import math

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from neurofm import registry, tracking
from neurofm.embedding import random_encoder_like
from neurofm.errors import NeurofmError
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from tests.test_tokenizer import synthetic_counts


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_a_run_logs_flattened_params_finite_metrics_and_artifacts(store, tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    with tracking.start_run("tracking-test", run_name="r1", tags={"neurofm.data": "toy"}) as run:
        tracking.log_params({"train": {"epochs": 3, "lr": 0.004}, "data": {"name": "toy"}})
        tracking.log_metrics({"model/probe_f1": 0.9, "pca/probe_f1": 1.0, "bad": math.nan}, step=2)
        tracking.log_artifacts([report], artifact_path="evaluation")
    stored = MlflowClient(store).get_run(run.info.run_id)
    assert stored.data.params["train.epochs"] == "3" and stored.data.params["data.name"] == "toy"
    assert stored.data.metrics["model/probe_f1"] == 0.9 and "bad" not in stored.data.metrics
    assert stored.data.tags["neurofm.data"] == "toy" and stored.info.status == "FINISHED"
    assert tracking.run_metrics(run.info.run_id)["pca/probe_f1"] == 1.0
    names = [item.path for item in MlflowClient(store).list_artifacts(run.info.run_id, "evaluation")]
    assert names == ["evaluation/report.md"]


def test_a_failed_block_marks_the_run_failed(store):
    with pytest.raises(RuntimeError), tracking.start_run("tracking-test", run_name="boom") as run:
        raise RuntimeError("boom")
    assert MlflowClient(store).get_run(run.info.run_id).info.status == "FAILED"


def test_registered_versions_are_found_by_alias_and_number(store, tmp_path):
    adata = synthetic_counts(n_cells=40, n_genes=12)
    tokenizer = ExpressionTokenizer().fit(adata)
    config = ModelConfig(n_genes=12, n_bins=20, d_model=8, n_heads=2, n_layers=1, ffn_dim=16, max_tokens=4)
    model_dir = random_encoder_like(config).save_pretrained(tmp_path / "best", tokenizer)
    with tracking.start_run("tracking-test", run_name="register"):
        first = tracking.log_and_register_model(model_dir, "tracking-test-model")
    with tracking.start_run("tracking-test", run_name="register-2"):
        second = tracking.log_and_register_model(model_dir, "tracking-test-model")
    assert (first.version, second.version) == ("1", "2")
    newest = registry.model_version_for(None, "tracking-test-model")
    assert newest.version == "2" and newest.uri == "models:/tracking-test-model/2"
    tracking.set_alias("tracking-test-model", registry.CHAMPION_ALIAS, "1")
    assert registry.model_version_for("models:/tracking-test-model@champion", "x").version == "1"
    assert tracking.alias_version_tags("tracking-test-model", "champion")[0] == "1"
    resolved = registry.resolve_model_dir("models:/tracking-test-model/1", "tracking-test-model")
    assert (resolved / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    with pytest.raises(NeurofmError, match="cannot fetch model"):
        registry.resolve_model_dir("models:/tracking-test-model@nope", "tracking-test-model")
    with pytest.raises(NeurofmError, match="neither an existing directory"):
        registry.resolve_model_dir(str(tmp_path / "missing"), "tracking-test-model")


def test_the_champion_alias_moves_only_when_the_rule_allows_and_says_why(store, tmp_path):
    adata = synthetic_counts(n_cells=40, n_genes=12)
    tokenizer = ExpressionTokenizer().fit(adata)
    config = ModelConfig(n_genes=12, n_bins=20, d_model=8, n_heads=2, n_layers=1, ffn_dim=16, max_tokens=4)
    model_dir = random_encoder_like(config).save_pretrained(tmp_path / "best", tokenizer)
    versions = []
    for index in range(3):
        with tracking.start_run("tracking-test", run_name=f"register-{index}"):
            versions.append(tracking.log_and_register_model(model_dir, "promo-model").version)
    baselines = {
        "pca/probe_auc": 0.95,
        "pca/probe_accuracy": 0.90,
        "scvi/probe_auc": 0.96,
        "scvi/probe_accuracy": 0.91,
    }
    behind_scvi = {"model/probe_auc": 0.955, "model/probe_accuracy": 0.95, **baselines}
    message = tracking.promote_if_better("promo-model", versions[0], behind_scvi, "toy", "run-0")
    assert "not promoted" in message and "scVI" in message
    assert tracking.alias_version_tags("promo-model", registry.CHAMPION_ALIAS) is None
    ahead = {"model/probe_auc": 0.97, "model/probe_accuracy": 0.92, **baselines}
    message = tracking.promote_if_better("promo-model", versions[1], ahead, "toy", "run-1")
    champion, tags = tracking.alias_version_tags("promo-model", registry.CHAMPION_ALIAS)
    assert champion == versions[1] and tags["eval_data"] == "toy" and "→" in message
    # a later version evaluated on other data is not compared with it: the alias stays
    message = tracking.promote_if_better("promo-model", versions[2], ahead, "other", "run-2")
    assert "not comparable" in message
    assert tracking.alias_version_tags("promo-model", registry.CHAMPION_ALIAS)[0] == versions[1]
