"""evaluate_mapping, summary_metrics and write_mapping_report on small cells: the fast test of the mapping's
scoring (the map pipeline runs it end to end in test_pipeline_full.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurofm.data.synthetic import make_synthetic_counts
from neurofm.evaluate.transfer import evaluate_mapping, summary_metrics, write_mapping_report
from neurofm.mapping import ReferenceConfig, build_reference

CLUSTER = {"seeds": (0,), "optimise_resolutions": (0.5, 1.0)}  # the query's clustering, short


def _embedding(labels: np.ndarray, seed: int) -> np.ndarray:
    """A stand-in for the model's embedding: the two classes 4 sd apart on the first axis."""
    rng = np.random.default_rng(seed)
    embedding = rng.normal(size=(len(labels), 8)).astype(np.float32)
    embedding[:, 0] += 4.0 * (labels == "inhibitory")
    return embedding


def _mapped(n_cells: int, n_reference: int, seed: int, baselines: tuple[str, ...], **options):
    """Synthetic cells split into reference and query, the model's stand-in reference, every method scored."""
    cells = make_synthetic_counts(n_cells=n_cells, n_genes=80, seed=seed)
    cells.obs["label"] = cells.obs["class"].astype(str)
    reference_cells, query_cells = cells[:n_reference].copy(), cells[n_reference:].copy()
    ref_labels, truth = reference_cells.obs["label"].to_numpy(), query_cells.obs["label"].to_numpy()
    reference = build_reference(
        _embedding(ref_labels, 0), reference_cells.obs[["label"]], ReferenceConfig(label_columns=("label",))
    )
    results = evaluate_mapping(
        reference, _embedding(truth, 1), truth, "label", reference_cells=reference_cells,
        query_cells=query_cells, baselines=baselines, cluster=CLUSTER, **options,
    )  # fmt: skip
    return results, ref_labels


@pytest.fixture(scope="module")
def mapped():
    return _mapped(400, 240, 5, ("pca_ref", "logcounts"))


def test_every_method_is_scored_on_the_same_query_cells(mapped):
    results, _ = mapped
    assert list(results) == ["model", "pca_ref", "logcounts"]
    assert {len(result.truth) for result in results.values()} == {160}
    assert results["model"].metrics["transfer_f1"] >= 0.9  # two well-separated classes
    for result in results.values():
        assert 0.0 <= result.metrics["transfer_f1"] <= 1.0 and 0.0 <= result.metrics["unknown_share"] <= 1.0
        assert set(result.per_class["label"]) == {"excitatory", "inhibitory"}


def test_summary_puts_the_model_beside_the_strongest_baseline(mapped):
    results, _ = mapped
    summary = summary_metrics(results)
    best = max(results[m].metrics["transfer_f1"] for m in ("pca_ref", "logcounts"))
    assert summary["strongest/transfer_f1"] == pytest.approx(best)
    assert summary["margin/transfer_f1"] == pytest.approx(summary["model/transfer_f1"] - best)


def test_the_report_writes_its_tables_and_figures(mapped, tmp_path):
    results, ref_labels = mapped
    report = write_mapping_report(results, tmp_path, {"query": "synthetic"}, reference_labels=ref_labels)
    assert "strongest baseline" in report.read_text()
    table = pd.read_csv(tmp_path / "transfer.csv")
    assert list(table["method"]) == ["model", "pca_ref", "logcounts"]
    for name in ("per_class_f1.csv", "confusion_model.csv", "coembedding_by_dataset.png", "report.html"):
        assert (tmp_path / name).is_file(), name


def test_the_label_tools_are_scored_by_the_same_protocol():
    """CellTypist, Symphony and scANVI label the query with their own classifiers (fit on the reference
    only); scVI shares its reference model with scANVI; each is scored on the same query cells."""
    results, _ = _mapped(300, 200, 7, ("celltypist", "symphony", "scvi", "scanvi"), scarches_query_epochs=2,
                         scvi_max_epochs=3)  # fmt: skip
    assert list(results) == ["model", "celltypist", "symphony", "scvi", "scanvi"]
    assert {len(result.truth) for result in results.values()} == {100}
    assert results["celltypist"].metrics["transfer_f1"] >= 0.8  # the classes differ in their genes
    assert np.isnan(results["celltypist"].metrics["query_ari_optimised"])  # CellTypist has no space of its own
    for method in ("symphony", "scvi", "scanvi"):
        assert np.isfinite(results[method].metrics["query_ari_optimised"]), method
    for method in ("celltypist", "symphony", "scanvi"):  # unknown: at or below the tool's own 0.5
        result = results[method]
        low = result.frame["probability"].to_numpy() <= 0.5
        assert result.metrics["unknown_share"] == pytest.approx(low.mean()), method
        assert set(result.per_class["label"]) <= {"excitatory", "inhibitory"}
    assert results["scanvi"].classifier.startswith("scANVI")
