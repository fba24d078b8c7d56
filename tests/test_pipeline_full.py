"""The pretrain + evaluate pipelines end to end through ``run.main``, on small built-in data.

One module-scoped ``full`` run (2 epochs on a small synthetic atlas) feeds most tests: outputs,
the MLflow run and registered version, cache reuse, the ``evaluate`` pipeline on the newest
registered version and on a directory, the champion rule against a real registry, and the MLflow UI in a
headless browser over a copy of the store the run logged to (tests/mlflow_ui.py). Bad input to the
evaluate pipeline is tested in test_bad_inputs.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anndata as ad
import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import run
from neurofm import tracking
from tests import mlflow_ui

SMALL = [
    "--set", "default_data.n_cells=3000",
    "--set", "default_data.n_genes=300",
    "--set", "default_data.crop={n_cells: 400, n_genes: 200}",
    "--set", "train.epochs=2",
    "--set", "train.count_head_epochs=5",  # the count head's own phase: scVI's rule would run 400 epochs
    "--set", "evaluate.label_efficiency_draws=2",
    "--set", "evaluate.label_efficiency_shots=[5,all]",  # 10-50 shots: leave-one-out fits cost minutes
    "--set", "evaluate.scvi_max_epochs=20",
]  # fmt: skip
MODEL_NAME = "neurofm-encoder"


# the evaluate-only tests check which model is evaluated; the full run above already scores every baseline
PCA_ONLY = ["--set", "evaluate.baselines=[pca]"]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full") / "out"
    argv = ["--pipeline", "full", "--out", str(out), *SMALL]
    started_ms = int(time.time() * 1000)
    code = run.main(argv)
    assert code == 0
    return {"out": out, "argv": argv, "window_ms": (started_ms, int(time.time() * 1000))}


def _versions() -> list:
    tracking.configure()
    return MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")


@pytest.mark.slow
def test_full_run_writes_checkpoints_report_and_baselines(full_run):
    out = full_run["out"]
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / "pretrain" / "best" / name).is_file()
    metrics = pd.read_csv(out / "pretrain" / "metrics.csv")
    assert len(metrics) == 2 and {"val_perplexity", "baseline_perplexity", "val_masked_accuracy"} <= set(
        metrics
    )
    evaluation = out / "evaluation"
    baselines = pd.read_csv(evaluation / "baselines.csv")
    assert list(baselines["method"]) == ["model", "pca", "scvi_capped", "random"]
    summary = json.loads((evaluation / "summary.json").read_text())
    for method in ("model", "pca", "scvi_capped", "random"):
        assert 0.0 <= summary[f"{method}/probe_auc"] <= 1.0
        for metric in ("ari_optimised", "ari_res1_mean", "ari_res1_sd", "fewshot5_f1", "silhouette"):
            assert f"{method}/{metric}" in summary
    for metric in ("probe_f1", "fewshot5_f1", "ari_optimised", "ari_res1_mean"):
        assert f"strongest/{metric}" in summary
        assert summary[f"margin/{metric}"] == pytest.approx(
            summary[f"model/{metric}"] - summary[f"strongest/{metric}"]
        )
    report = (evaluation / "report.md").read_text()
    assert "pre-training validation perplexity" in report and "| pca |" in report and "| scvi_capped |" in report
    assert "The model against the strongest baseline" in report
    assert (evaluation / "report.html").stat().st_size > 10_000  # figures embedded
    for name in ("embeddings.npy", "labels.npy", "cells.tsv"):
        assert (evaluation / name).is_file()


@pytest.mark.slow
def test_full_run_logs_mlflow_runs_and_registers_a_version(full_run):
    tracking.configure()
    client = MlflowClient()
    experiment = client.get_experiment_by_name("neurofm")
    first, last = full_run["window_ms"]
    # only this fixture's runs: other modules' runs share the session's tracking store
    runs = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if first <= r.info.start_time <= last
    ]
    pretrain_runs = [r for r in runs if r.data.tags.get("neurofm.pipeline_step") == "pretrain"]
    evaluate_runs = [r for r in runs if r.data.tags.get("neurofm.pipeline_step") == "evaluate"]
    assert pretrain_runs and evaluate_runs
    history = client.get_metric_history(pretrain_runs[-1].info.run_id, "val_perplexity")
    assert len(history) == 2  # one point per epoch
    assert "baseline_perplexity" in pretrain_runs[-1].data.metrics
    logged = set(evaluate_runs[-1].data.metrics)
    assert {"model/probe_auc", "pca/probe_auc", "scvi_capped/probe_auc", "random/probe_auc"} <= logged
    assert {"model/ari_optimised", "model/ari_res1_mean", "model/probe_f1", "model/fewshot5_f1"} <= logged
    versions = _versions()
    assert versions
    newest = client.get_model_version_by_alias(MODEL_NAME, tracking.NEWEST_ALIAS)
    assert newest.run_id in {r.info.run_id for r in pretrain_runs}
    assert evaluate_runs[-1].data.tags["neurofm.model_version"] == str(newest.version)


@pytest.mark.slow
def test_second_full_run_reuses_the_cached_model_and_says_so(full_run, capsys):
    before = len(_versions())
    code, out, _ = _main(full_run["argv"], capsys)
    assert code == 0
    assert len(_versions()) == before  # no retraining, no new version
    assert "pretrain_model came from ZenML's cache" in out
    # the closing summary gives the headline metrics beside the strongest baseline, as the report does
    headline = {
        line.split("  model")[0].strip(): line
        for line in out.splitlines()
        if "margin" in line and "  model " in line
    }
    assert {"probe macro-F1", "5-shot macro-F1", "cluster-optimised ARI", "ARI at resolution 1"} <= set(
        headline
    )
    assert all("random weights" in line for line in headline.values())


@pytest.mark.slow
def test_evaluate_pipeline_uses_the_newest_registered_version(full_run, tmp_path, capsys):
    argv = ["--pipeline", "evaluate", "--out", str(tmp_path / "eval"), *SMALL, *PCA_ONLY]
    code, out, _ = _main(argv, capsys)
    assert code == 0
    report = (tmp_path / "eval" / "evaluation" / "report.md").read_text()
    newest = MlflowClient().get_model_version_by_alias(MODEL_NAME, tracking.NEWEST_ALIAS)
    assert f"models:/{MODEL_NAME}/{newest.version}" in report
    assert "pre-training validation perplexity" in report  # fetched from the model's MLflow run


@pytest.mark.slow
def test_evaluate_pipeline_accepts_a_checkpoint_directory(full_run, tmp_path, capsys):
    model_dir = full_run["out"] / "pretrain" / "last"
    argv = [
        "--pipeline",
        "evaluate",
        "--out",
        str(tmp_path / "eval"),
        "--model",
        str(model_dir),
        *SMALL,
        *PCA_ONLY,
    ]
    code, out, _ = _main(argv, capsys)
    assert code == 0
    assert "not a registered model version" in out


@pytest.mark.slow
def test_champion_alias_moves_only_for_a_better_model_that_keeps_up_with_pca(full_run):
    _promote = tracking.promote_if_better  # the registry policy, as track_evaluation applies it

    name = "neurofm-promotion-test"
    tracking.configure()
    versions = []
    for _ in range(2):
        with tracking.start_run("neurofm-tests", run_name="promotion"):
            versions.append(
                tracking.log_and_register_model(full_run["out"] / "pretrain" / "best", name).version
            )
    first, second = versions
    good = {
        "model/probe_auc": 0.99,
        "model/probe_accuracy": 0.97,
        "pca/probe_auc": 0.99,
        "pca/probe_accuracy": 0.97,
    }
    behind_pca = {**good, "pca/probe_auc": 1.0}
    better = {**good, "model/probe_auc": 0.999, "pca/probe_auc": 0.99}
    client = MlflowClient()

    assert "not promoted" in _promote(name, first, behind_pca, "data-a", "run")
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, tracking.CHAMPION_ALIAS)
    assert "→ 'champion'" in _promote(name, first, good, "data-a", "run")
    assert str(client.get_model_version_by_alias(name, tracking.CHAMPION_ALIAS).version) == first
    assert "not promoted" in _promote(name, second, good, "data-a", "run")  # a tie does not promote
    assert "not comparable" in _promote(name, second, better, "data-b", "run")
    assert str(client.get_model_version_by_alias(name, tracking.CHAMPION_ALIAS).version) == first
    assert "→ 'champion'" in _promote(name, second, better, "data-a", "run")
    assert str(client.get_model_version_by_alias(name, tracking.CHAMPION_ALIAS).version) == second


def test_registered_model_reloads_to_the_same_directory_contents(tmp_path):
    """resolve_model_dir fetches a registered pyfunc model back as the exact neurofm directory."""
    from neurofm.data.synthetic import make_synthetic_counts
    from neurofm.model import GeneEncoder, ModelConfig, load_pretrained
    from neurofm.tokenizer import ExpressionTokenizer

    adata = make_synthetic_counts(n_cells=120, n_genes=80, seed=1)
    tokenizer = ExpressionTokenizer().fit(adata)
    model = GeneEncoder(ModelConfig(n_genes=80, n_bins=20, d_model=16, n_heads=2, n_layers=1, ffn_dim=32))
    model_dir = model.save_pretrained(tmp_path / "model", tokenizer)
    tracking.configure()
    with tracking.start_run("neurofm-tests", run_name="reload"):
        registered = tracking.log_and_register_model(model_dir, "neurofm-reload-test")
    fetched = tracking.resolve_model_dir(f"models:/neurofm-reload-test@{tracking.NEWEST_ALIAS}", "unused")
    assert (fetched / "model.safetensors").read_bytes() == (
        Path(model_dir) / "model.safetensors"
    ).read_bytes()
    reloaded, _ = load_pretrained(fetched)
    assert all(
        (a == b).all()
        for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )
    assert registered.version == "1"


@pytest.mark.slow
def test_the_pretrained_model_carries_its_reference_into_the_registry(full_run):
    from neurofm.mapping import has_reference, load_reference

    model_dir = full_run["out"] / "pretrain" / "model"
    assert has_reference(model_dir)  # the built-in demo's default_data.reference: subtype
    reference = load_reference(model_dir)
    prepared = ad.read_h5ad(full_run["out"] / "prepared.h5ad", backed="r")
    assert reference.label_columns == ["subtype"] and reference.n_cells == prepared.n_obs  # every cell
    newest = MlflowClient().get_model_version_by_alias(MODEL_NAME, tracking.NEWEST_ALIAS)
    registered = tracking.resolve_model_dir(f"models:/{MODEL_NAME}/{newest.version}", MODEL_NAME)
    assert has_reference(registered)  # logged with the model, so a registered version maps too


@pytest.mark.slow
def test_map_pipeline_maps_scores_beside_the_baselines_and_logs_a_run(full_run, tmp_path, capsys):
    query = full_run["out"] / "prepared.h5ad"
    out = tmp_path / "map"
    argv = ["--pipeline", "map", "--model", str(full_run["out"] / "pretrain" / "model"), "--data", str(query),
            "--label-col", "subtype", "--out", str(out), "--set", "map.baselines=[pca_ref,logcounts]"]  # fmt: skip
    code, printed, _ = _main(argv, capsys)
    assert code == 0
    mapped = ad.read_h5ad(out / "map" / "prepared.mapped.h5ad")
    assert {"neurofm_subtype", "neurofm_subtype_score"} <= set(mapped.obs) and "X_neurofm" in mapped.obsm
    transfer = pd.read_csv(out / "map" / "report" / "transfer.csv").set_index("method")
    assert list(transfer.index) == ["model", "pca_ref", "logcounts"]
    assert transfer.loc["model", "transfer_f1"] >= 0.9  # excitatory vs inhibitory, in distribution
    report = (out / "map" / "report" / "report.md").read_text()
    assert "strongest baseline" in report and "Per-class F1" in report and "coembedding_by_dataset.png" in report
    assert "transfer macro-F1" in printed and "obs['neurofm_subtype']" in printed
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("neurofm").experiment_id],
        filter_string="tags.`neurofm.pipeline_step` = 'map'",
    )
    assert runs and {"model/transfer_f1", "pca_ref/transfer_f1", "margin/transfer_f1"} <= set(runs[0].data.metrics)


@pytest.mark.slow
def test_map_pipeline_refuses_bad_input_in_one_line(full_run, tmp_path, capsys):
    model = str(full_run["out"] / "pretrain" / "model")
    query = str(full_run["out"] / "prepared.h5ad")
    cases = {
        "no query": (["--pipeline", "map", "--model", model], "pass --data"),
        "a label column the query lacks": (["--pipeline", "map", "--model", model, "--data", query,
                                             "--label-col", "nope"], "no obs column 'nope'"),
        "a batch column the query lacks": (["--pipeline", "map", "--model", model, "--data", query,
                                             "--batch-col", "donor"], "no obs column 'donor'"),
        "a model without a reference": (["--pipeline", "map", "--model", str(full_run["out"] / "pretrain" / "best"),
                                         "--data", query], "no reference"),
    }  # fmt: skip
    for case, (argv, expected) in cases.items():
        out = tmp_path / case.replace(" ", "_")
        code, _, err = _main([*argv, "--out", str(out)], capsys)
        assert code != 0, case
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], (case, err)
        assert not (out / "map").exists(), case


@pytest.mark.ui
@pytest.mark.slow
@mlflow_ui.needs_chromium
def test_mlflow_ui_shows_experiment_metrics_figure_and_champion_model(full_run, tmp_path):
    """The full run's experiment, metrics, figure and registered model, as the MLflow UI renders them."""
    store = mlflow_ui.copy_of_full_run_store(tracking.configure(), full_run["window_ms"], tmp_path / "store")
    mlflow_ui.walk_the_pages(store, tmp_path)
