"""neurofm.pretrain_run without ZenML: one tracked pre-training (MLflow run, reference, registered version)
on a tiny cell store, and the pure pieces of its summary."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from neurofm.config import TrackingConfig
from neurofm.data.store import CellStore, convert_anndata
from neurofm.mapping import ReferenceConfig, has_reference
from neurofm.model import ModelConfig
from neurofm.pretrain_run import COUNT_HEAD_METRICS, final_metrics, pretrain_and_register, pretrain_summary
from neurofm.tokenizer import TokenizerConfig
from neurofm.train import TrainConfig, fit_training_tokenizer
from tests.test_tokenizer import synthetic_counts

TINY_MODEL = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_dim=32)


def _result(count_head: dict | None = None) -> SimpleNamespace:
    """A stand-in for ``TrainResult``: two validations, the second the best."""
    metrics = [
        {"epoch": 1, "step": 4, "val_total_loss": 2.0, "val_loss": 2.0, "val_perplexity": 8.0,
         "val_masked_accuracy": 0.1},
        {"epoch": 2, "step": 8, "val_total_loss": 1.5, "val_loss": 1.4, "val_perplexity": 4.0,
         "val_masked_accuracy": 0.3},
    ]  # fmt: skip
    return SimpleNamespace(
        metrics=metrics, best=metrics[1], baseline_perplexity=10.0, baseline_masked_accuracy=0.2, wall_time_s=3.0,
        count_head=count_head, model_dir=Path("m/model"), best_dir=Path("m/best"), last_dir=Path("m/last"),
        demo="demo",
    )  # fmt: skip


def test_final_metrics_take_the_best_validation_and_the_count_heads_phase():
    final = final_metrics(_result())
    assert final == {
        "best_val_loss": 1.4, "best_val_perplexity": 4.0, "best_val_masked_accuracy": 0.3,
        "baseline_perplexity": 10.0, "baseline_masked_accuracy": 0.2, "perplexity_ratio": 0.4, "wall_time_s": 3.0,
    }  # fmt: skip
    phase = {key: i + 1 for i, key in enumerate(COUNT_HEAD_METRICS)} | {"val_count_loss_by_epoch": [3.0, 2.0]}
    with_phase = final_metrics(_result(phase))
    assert {k: v for k, v in with_phase.items() if k.startswith("count_head_")} == {
        f"count_head_{key}": float(i + 1) for i, key in enumerate(COUNT_HEAD_METRICS)
    }  # the per-epoch curve is logged, not a final metric


def test_the_summary_names_the_run_the_version_and_the_checkpoints():
    result = _result()
    registered = SimpleNamespace(name="enc", version="3", uri="models:/enc/3")
    summary = pretrain_summary(result, {"best_val_loss": 1.4}, "run-1", registered, {"n_cells": 5})
    assert summary["best_val_loss"] == 1.4 and (summary["epochs"], summary["steps"]) == (2, 8)
    assert (summary["model_name"], summary["model_version"], summary["model_uri"]) == (
        "enc",
        "3",
        "models:/enc/3",
    )
    assert summary["mlflow_run_id"] == "run-1" and summary["reference"] == {"n_cells": 5}
    assert summary["model_dir"] == str(Path("m/model")) and summary["last_checkpoint"] == str(Path("m/last"))
    unregistered = pretrain_summary(result, {}, "run-1")
    assert unregistered["model_uri"] is None and unregistered["reference"] is None


@pytest.fixture()
def tracking_config():
    """The session's MLflow store (conftest.py; migrated once per worker), under names of this test's own."""
    name = f"pretrain-run-test-{uuid.uuid4().hex[:8]}"
    return TrackingConfig(experiment=name, registered_model_name=f"{name}-model")


def test_a_tracked_pretraining_logs_one_run_stores_the_reference_and_registers_the_model(
    tmp_path, tracking_config
):
    convert_anndata(synthetic_counts(n_cells=120, n_genes=24, seed=1), tmp_path / "store")
    store = CellStore(tmp_path / "store")
    train = TrainConfig(epochs=1, batch_size=16, max_tokens_per_cell=16, progress=False, device="cpu",
                        num_threads=1, count_head_epochs=2)  # fmt: skip
    tokenizer = fit_training_tokenizer(store, TokenizerConfig(), train)
    model_dir, summary = pretrain_and_register(
        store, tokenizer, TINY_MODEL, train, tmp_path / "out", "toy", tracking_config,
        reference_config=ReferenceConfig(label_columns=["subtype"]), logged_config={"model": {}, "train": {"epochs": 1}},
    )  # fmt: skip
    assert model_dir == tmp_path / "out" / "pretrain" / "model" and has_reference(model_dir)
    assert (
        summary["model_uri"] == f"models:/{tracking_config.registered_model_name}/1"
        and summary["reference"] is not None
    )
    assert summary["perplexity_ratio"] == pytest.approx(
        summary["best_val_perplexity"] / summary["baseline_perplexity"]
    )
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "pretrain-toy" and run.data.tags["neurofm.pipeline_step"] == "pretrain"
    params = run.data.params
    assert params["train.epochs"] == "1" and not any(k.startswith("model.") for k in params)  # as configured
    assert params["data.n_cells"] == "120" and params["data.store"] == str(store.path.resolve())
    assert params["reference.label_columns"] == "['subtype']" and params["reference.n_cells"] == "120"
    phase_metrics = [key for key in summary if key.startswith("count_head_")]  # the count head's phase ran
    assert phase_metrics and all(math.isfinite(run.data.metrics[key]) for key in phase_metrics)
    curve = MlflowClient().get_metric_history(run.info.run_id, "count_head_val_count_loss")
    assert [point.step for point in curve] == list(range(1, len(curve) + 1)) and curve
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "training")}
    assert artifacts and not any("resume" in path for path in artifacts)
