"""evaluate_embeddings, write_report and should_promote: the baseline table, files, report, promotion rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from neurofm.errors import NeurofmError
from neurofm.evaluate.cluster import ClusterConfig
from neurofm.evaluate.compare import BASELINE_COLUMNS, evaluate_embeddings, should_promote, write_report
from neurofm.evaluate.probe import ProbeConfig, load_probe

FAST_PROBE = ProbeConfig(n_splits=3, n_repeats=1)


def three_methods(n_cells: int = 240, seed: int = 0):
    """'model' separates the two classes well, 'pca' somewhat, 'random' not at all."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, n_cells)
    labels = np.array(["excitatory", "inhibitory"])[codes]
    model = rng.normal(size=(n_cells, 16))
    model[:, 0] += 6.0 * codes
    pca = rng.normal(size=(n_cells, 10))
    pca[:, 0] += 1.5 * codes
    random = rng.normal(size=(n_cells, 16))
    return {"model": model, "pca": pca, "random": random}, labels


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    embeddings, labels = three_methods()
    out_dir = tmp_path_factory.mktemp("evaluation")
    result = evaluate_embeddings(
        embeddings,
        labels,
        out_dir,
        probe_config=FAST_PROBE,
        cluster_config=ClusterConfig(n_neighbors=10),
        label_efficiency_shots=(5, 20, "all"),
        label_efficiency_draws=3,
        views=("umap",),  # t-SNE is pinned in tests/evaluate/test_visualize.py; here it would only cost time
    )
    return result, embeddings, labels


def test_baselines_table_has_one_row_per_method(evaluation):
    result, _, _ = evaluation
    table = pd.read_csv(result.out_dir / "baselines.csv")
    assert list(table.columns) == BASELINE_COLUMNS + [
        "fewshot5_f1",
        "fewshot5_f1_sd",
        "fewshot20_f1",
        "fewshot20_f1_sd",
        "fewshotall_f1",
        "fewshotall_f1_sd",
    ]
    assert table["probe_classifier"].str.match(r"^(logistic C=|knn k=)").all()
    assert table["method"].tolist() == ["model", "pca", "random"]
    by_method = table.set_index("method")
    assert by_method.loc["model", "probe_accuracy"] > 0.95
    assert (
        by_method.loc["model", "probe_auc"]
        > by_method.loc["pca", "probe_auc"]
        > by_method.loc["random", "probe_auc"]
    )
    assert abs(by_method.loc["random", "probe_auc"] - 0.5) < 0.2
    assert by_method.loc["model", "ari_optimised"] > 0.9


def test_every_method_uses_the_same_split(evaluation):
    result, _, _ = evaluation
    tests = [method.probe.split.test_indices for method in result.methods.values()]
    for other in tests[1:]:
        np.testing.assert_array_equal(tests[0], other)
    predictions = [pd.read_csv(result.out_dir / name / "predictions.csv") for name in result.methods]
    for other in predictions[1:]:
        assert other["cell_index"].tolist() == predictions[0]["cell_index"].tolist()


def test_files_are_written_per_method(evaluation):
    result, _, _ = evaluation
    for name in ("model", "pca", "random"):
        directory = result.out_dir / name
        for file in (
            "probe.json",
            "predictions.csv",
            "confusion_matrix.csv",
            "confusion_matrix.png",
            "roc_curve.png",
            "pca_2d.png",
            "umap.png",
        ):
            assert (directory / file).is_file(), f"{name}/{file}"
        for file in (
            "umap_by_cluster.png",
            "umap_by_label.png",
            "cluster_sizes_purity.png",
            "cluster_confusion.csv",
            "cluster_table.csv",
        ):
            assert (directory / "clusters" / file).is_file(), f"{name}/clusters/{file}"
    for file in ("label_efficiency.csv", "label_efficiency.png", "summary.json", "run_meta.json"):
        assert (result.out_dir / file).is_file()
    assert not list(result.out_dir.rglob("*.tmp")) and not list(result.out_dir.rglob("tsne.png"))


def test_saved_probe_reproduces_test_predictions(evaluation):
    result, embeddings, _ = evaluation
    probe = load_probe(result.out_dir / "model" / "probe.json")
    predictions = pd.read_csv(result.out_dir / "model" / "predictions.csv")
    predicted = probe.predict(embeddings["model"][predictions["cell_index"].to_numpy()])
    assert predicted.tolist() == predictions["predicted_label"].tolist()


def test_summary_uses_mlflow_metric_names(evaluation):
    result, _, _ = evaluation
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary == pytest.approx(result.summary)
    for method in ("model", "pca", "random"):
        for metric in (
            "probe_accuracy",
            "probe_f1",
            "probe_auc",
            "probe_cv_accuracy_mean",
            "ari",
            "nmi",
            "homogeneity",
            "completeness",
            "label_eff_accuracy_5",
            "label_eff_auc_all",
        ):
            assert f"{method}/{metric}" in summary
    assert all(isinstance(value, float) and np.isfinite(value) for value in summary.values())


def test_run_meta_records_settings_and_metrics(evaluation):
    result, _, _ = evaluation
    meta = json.loads((result.out_dir / "run_meta.json").read_text())
    assert meta["settings"]["probe"]["test_size"] == 0.2 and meta["settings"]["probe"]["seed"] == 42
    assert meta["settings"]["cluster"]["n_neighbors"] == 10
    assert meta["settings"]["split"]["n_test"] == len(result.split.test_indices)
    assert meta["data"]["n_cells"] == 240
    assert set(meta["methods"]) == {"model", "pca", "random"}
    assert meta["metrics"]["model/probe_accuracy"] == pytest.approx(result.summary["model/probe_accuracy"])


def test_report_has_the_baselines_table_and_figure_links(evaluation):
    result, _, _ = evaluation
    report = write_report(result, result.out_dir, extra={"model_uri": "models:/neurofm/3", "perplexity": 6.2})
    text = report.read_text()
    assert "| method | dims | probe picked | macro-F1 | accuracy | ROC-AUC |" in text
    assert "The model against the strongest baseline" in text and "| 5-shot macro-F1 |" in text
    for name in ("model", "pca", "random"):
        assert f"| {name} |" in text
    assert "models:/neurofm/3" in text
    assert "](model/confusion_matrix.png)" in text and "](label_efficiency.png)" in text
    for link in [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert (result.out_dir / link).is_file(), link
    html = (result.out_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "src='model/" not in html


def test_mismatched_embeddings_and_bad_names_are_refused(tmp_path):
    embeddings, labels = three_methods()
    with pytest.raises(NeurofmError, match="different numbers of cells"):
        evaluate_embeddings({"model": embeddings["model"], "pca": embeddings["pca"][:-1]}, labels, tmp_path)
    with pytest.raises(NeurofmError, match="output folder"):
        evaluate_embeddings({"../model": embeddings["model"]}, labels, tmp_path)
    with pytest.raises(NeurofmError, match="single class"):
        evaluate_embeddings({"model": embeddings["model"]}, np.full(len(labels), "a"), tmp_path)


def test_group_aware_evaluation_without_figures(tmp_path):
    embeddings, labels = three_methods()
    groups = np.arange(len(labels)) % 24
    result = evaluate_embeddings(
        embeddings,
        labels,
        tmp_path,
        probe_config=FAST_PROBE,
        groups=groups,
        figures=False,
        label_efficiency_shots=(5,),
        label_efficiency_draws=2,
    )
    assert result.split.grouped
    assert not set(groups[result.split.train_indices]) & set(groups[result.split.test_indices])
    assert not list(tmp_path.rglob("*.png"))


# ---------------------------------------------------------------------------------------- promotion


def run(auc: float, accuracy: float, pca_auc: float = 0.9, pca_accuracy: float = 0.9) -> dict[str, float]:
    return {
        "model/probe_auc": auc,
        "model/probe_accuracy": accuracy,
        "pca/probe_auc": pca_auc,
        "pca/probe_accuracy": pca_accuracy,
    }


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted", "reason"),
    [
        (run(0.95, 0.92), None, 0.0, True, "no current champion"),
        (run(0.85, 0.92), None, 0.0, False, "falls behind the PCA baseline"),
        (run(0.95, 0.85), None, 0.0, False, "accuracy 0.8500 falls behind"),
        (run(0.96, 0.92), run(0.95, 0.93), 0.0, True, "beats the champion"),
        (run(0.94, 0.99), run(0.95, 0.90), 0.0, False, "below the champion"),
        (run(0.95, 0.93), run(0.95, 0.92), 0.0, True, "ties the champion"),
        (run(0.95, 0.92), run(0.95, 0.92), 0.0, False, "do not beat"),
        (run(0.955, 0.92), run(0.95, 0.92), 0.01, False, "do not beat"),
        (run(0.97, 0.92), run(0.95, 0.92), 0.01, True, "beats the champion"),
        (run(0.96, 0.95, pca_auc=0.99), run(0.90, 0.90), 0.0, False, "PCA"),
        ({"model/probe_auc": 0.99, "model/probe_accuracy": 0.99}, None, 0.0, False, "no same-run PCA"),
        ({"pca/probe_auc": 0.9, "pca/probe_accuracy": 0.9}, None, 0.0, False, "no finite model"),
        (run(0.96, 0.92), {"probe_auc": 0.95, "probe_accuracy": 0.99}, 0.0, True, "beats the champion"),
    ],
)
def test_should_promote_rule(candidate, champion, margin, promoted, reason):
    decision, why = should_promote(candidate, champion, margin=margin)
    assert decision is promoted
    assert reason in why


def test_should_promote_pca_tolerance():
    candidate = run(0.995, 0.99, pca_auc=1.0, pca_accuracy=1.0)
    assert should_promote(candidate, None)[0] is False
    assert should_promote(candidate, None, pca_tolerance=0.01)[0] is True


def test_the_run_summary_prints_each_headline_metric_beside_the_strongest_baseline():
    import run

    evaluation = {
        "metrics": {"random/probe_f1": 0.5},
        "strongest": {
            "probe_f1": {
                "title": "probe macro-F1",
                "baseline": "scvi",
                "baseline_value": 0.9,
                "model_value": 0.85,
                "margin": -0.05,
            },
            "fewshot5_f1": {
                "title": "5-shot macro-F1",
                "baseline": "pca",
                "baseline_value": 0.7,
                "model_value": 0.75,
                "margin": 0.05,
            },
        },
    }
    lines = run.evaluation_lines(evaluation)
    assert "strongest baseline" in lines[0] and len(lines) == 3
    assert "probe macro-F1" in lines[1] and "scvi 0.900" in lines[1] and "margin -0.050" in lines[1]
    assert "random weights 0.500" in lines[1]
    assert "pca 0.700" in lines[2] and "margin +0.050" in lines[2] and "random" not in lines[2]
