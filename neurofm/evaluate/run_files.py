"""What an evaluation run writes: the run's tables, ``summary.json`` and ``run_meta.json``, and each method's
tables and figures (the layout is listed in :mod:`neurofm.evaluate.compare`, which calls these)."""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm import plots
from neurofm.evaluate import cluster as cluster_module
from neurofm.evaluate import probe as probe_module
from neurofm.evaluate.probe import save_probe
from neurofm.evaluate.results import EvaluationProtocol, EvaluationResult, MethodResult
from neurofm.evaluate.visualize import TSNE_ANGLE, TSNE_MAX_ITER, pca_2d_coordinates
from neurofm.io import atomic_path, ensure_writable_dir, write_json


def write_run_tables(
    baselines: pd.DataFrame,
    efficiency: pd.DataFrame,
    summary: Mapping[str, float],
    out_dir: Path,
    protocol: EvaluationProtocol,
) -> dict[str, Path]:
    """Write baselines.csv, label_efficiency.csv (and its figure, when on) and summary.json; their paths."""
    paths: dict[str, Path] = {}
    paths["baselines"] = _write_csv(baselines, out_dir / "baselines.csv", index=False)
    paths["label_efficiency"] = _write_csv(efficiency, out_dir / "label_efficiency.csv", index=False)
    if protocol.figures:
        paths["label_efficiency_plot"] = plots.plot_label_efficiency(
            efficiency,
            out_dir / "label_efficiency.png",
            title=f"Label efficiency ({protocol.label_efficiency_draws} draws per shot count, shared test set)",
        )
    paths["summary"] = write_json(summary, out_dir / "summary.json")
    return paths


def run_settings(
    protocol: EvaluationProtocol, n_cells: int, strongest: dict[str, dict[str, Any]], method_names: list[str]
) -> dict[str, Any]:
    """Every setting of the run, as recorded in run_meta.json and shown in the report."""
    return {
        "probe": probe_module.config_dict(protocol.probe_config),
        "cluster": cluster_module.config_dict(protocol.cluster_config),
        "label_efficiency": {
            "shots": [str(s) for s in protocol.label_efficiency_shots],
            "n_draws": protocol.label_efficiency_draws,
            "seed": protocol.seed,
        },
        "visualize": {
            "seed": protocol.seed,
            "tsne_max_iter": TSNE_MAX_ITER,
            "tsne_angle": TSNE_ANGLE,
            "figures": protocol.figures,
            "views": list(protocol.views),
            "max_cells_visualize": protocol.max_cells_visualize,
            "n_cells_visualized": n_cells if protocol.view_cells is None else len(protocol.view_cells),
        },
        "max_cells_cluster": protocol.max_cells_cluster,
        "n_cells_clustered": n_cells if protocol.cluster_cells is None else len(protocol.cluster_cells),
        "strongest_baselines": strongest,
        "split": protocol.split.describe(),
        "methods": method_names,
        "pca_baseline_note": "PCA is unsupervised and, unless fit_indices was used, fit on all cells",
    }


def write_run_meta(
    result: EvaluationResult, labels: np.ndarray, groups: np.ndarray | None, summary_all: Mapping[str, float]
) -> Path:
    """Write run_meta.json (settings, data, every metric with the undefined ones named, per-method
    details, timings, package versions; non-finite values as null) into the run's folder; its path."""
    split = result.split
    run_meta = {
        "settings": result.settings,
        "data": {
            "n_cells": int(len(labels)),
            "classes": result.classes,
            "class_counts": result.class_counts,
            "test_class_counts": label_counts(labels[split.test_indices]),
            "train_class_counts": label_counts(labels[split.train_indices]),
            "n_groups": None if groups is None else int(len(np.unique(np.asarray(groups)))),
        },
        "metrics": summary_all,
        "undefined_metrics": sorted(set(summary_all) - set(result.summary)),
        "methods": {name: _method_meta(method, result.out_dir) for name, method in result.methods.items()},
        "timings_s": result.timings,
        "versions": _versions(),
    }
    return write_json(_finite_or_none(run_meta), result.out_dir / "run_meta.json")


def label_counts(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values, return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _method_meta(method: MethodResult, out_dir: Path) -> dict[str, Any]:
    probe, clusters = method.probe, method.clusters
    return {
        "embedding_dim": method.embedding_dim,
        "metrics": method.metrics,
        "probe": {
            "classes": probe.classes,
            "confusion": probe.confusion.tolist(),
            "cv_accuracy": probe.cv_accuracy.tolist(),
            "cv_f1": probe.cv_f1_macro.tolist(),
            "cv_auc": probe.cv_roc_auc.tolist(),
            "n_convergence_warnings": probe.n_convergence_warnings,
            "classifier": probe.classifier,
        },
        "clusters": {
            "resolution": clusters.resolution,
            "n_clusters": clusters.n_clusters,
            "sizes": clusters.cluster_table["size"].astype(int).tolist(),
            "purities": clusters.cluster_table["purity"].astype(float).tolist(),
            "majority_labels": clusters.cluster_table["majority_label"].astype(str).tolist(),
            "resolution_sweep": clusters.sweep.to_dict(orient="records"),
            "matched": clusters.matched,
            "seed_scores": clusters.seed_scores.to_dict(orient="records"),
            "optimised_sweep": clusters.optimised.to_dict(orient="records"),
        },
        "files": {key: path.relative_to(out_dir).as_posix() for key, path in method.paths.items()},
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in (
        "numpy",
        "pandas",
        "scikit-learn",
        "scanpy",
        "anndata",
        "umap-learn",
        "igraph",
        "leidenalg",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _finite_or_none(value: Any) -> Any:
    """Replace NaN/inf floats by None so the JSON stays strict."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = True) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index, float_format="%.6g")
    return path


def write_method_tables(method: MethodResult, directory: Path) -> dict[str, Path]:
    """probe.json, predictions.csv, confusion_matrix.csv and the cluster tables of one method."""
    probe, clusters = method.probe, method.clusters
    directory = ensure_writable_dir(directory)
    paths = {
        "probe": save_probe(
            probe.probe,
            directory / "probe.json",
            extra={"method": method.name, "metrics": probe.metrics(), "split": probe.split.describe()},
        )
    }
    predictions = pd.DataFrame(
        {
            "cell_index": probe.split.test_indices,
            "true_label": probe.test_labels,
            "predicted_label": probe.test_predictions,
        }
    )
    for column, name in enumerate(probe.classes):
        predictions[f"probability_{name}"] = probe.test_probabilities[:, column]
    paths["predictions"] = _write_csv(predictions, directory / "predictions.csv", index=False)
    confusion = pd.DataFrame(probe.confusion, index=probe.classes, columns=probe.classes)
    confusion.index.name = "true_label \\ predicted_label"
    paths["confusion_matrix"] = _write_csv(confusion, directory / "confusion_matrix.csv")
    paths["cluster_confusion"] = _write_csv(
        clusters.majority_confusion, directory / "clusters" / "cluster_confusion.csv"
    )
    paths["cluster_table"] = _write_csv(clusters.cluster_table, directory / "clusters" / "cluster_table.csv")
    return paths


def write_method_figures(
    method: MethodResult,
    embedding: np.ndarray,
    labels: np.ndarray,
    directory: Path,
    cluster_rows: np.ndarray | slice | None = slice(None),
) -> dict[str, Path]:
    """Confusion matrix, ROC, PCA-2D and cluster figures of one method (t-SNE/UMAP: visualize)."""
    probe, clusters, name = method.probe, method.clusters, method.name
    split_kind = "group-aware" if probe.split.grouped else "stratified"
    n_test = len(probe.split.test_indices)
    paths = {
        "confusion_matrix_plot": plots.plot_confusion_matrix(
            probe.confusion,
            probe.classes,
            directory / "confusion_matrix.png",
            title=f"{name}: linear probe on {n_test} test cells ({split_kind} split)\n"
            f"accuracy {probe.accuracy:.3f}, macro-F1 {probe.f1_macro:.3f}",
        ),
        "roc_curve": plots.plot_roc_curves(
            probe.test_labels,
            probe.test_probabilities,
            probe.classes,
            directory / "roc_curve.png",
            title=f"{name}: probe ROC on {n_test} test cells",
        ),
    }
    coordinates, variance = pca_2d_coordinates(embedding)
    paths["pca_2d"] = plots.plot_embedding_2d(
        coordinates,
        labels,
        directory / "pca_2d.png",
        title=f"{name} embedding: first two principal components",
        xlabel=f"PC 1 ({variance[0]:.1%} of variance)",
        ylabel=f"PC 2 ({variance[1]:.1%} of variance)",
    )
    umap = method.visualization.umap if method.visualization is not None else None
    if cluster_rows is None:  # the UMAP was drawn on other cells than the clusters: no cluster UMAPs
        umap = None
    cluster_labels = labels[cluster_rows] if cluster_rows is not None else labels
    cluster_dir = directory / "clusters"
    config = clusters.config
    if umap is not None:
        resolution, n_clusters = clusters.resolution, clusters.n_clusters
        subtitle = f"Leiden resolution {resolution:g}, {n_clusters} clusters, ARI {clusters.ari:.3f}"
        paths["umap_by_cluster"] = plots.plot_embedding_2d(
            umap,
            clusters.clusters.astype(str),
            cluster_dir / "umap_by_cluster.png",
            title=f"{name}: UMAP coloured by Leiden cluster\n{subtitle}",
            xlabel="UMAP 1",
            ylabel="UMAP 2",
            legend_title="cluster",
            annotate=True,
        )
        paths["umap_by_label"] = plots.plot_embedding_2d(
            umap,
            cluster_labels,
            cluster_dir / "umap_by_label.png",
            title=f"{name}: UMAP coloured by label\n({config.n_neighbors} neighbours, {config.metric})",
            xlabel="UMAP 1",
            ylabel="UMAP 2",
        )
    paths["cluster_sizes_purity"] = plots.plot_cluster_sizes_purity(
        clusters.cluster_table,
        cluster_dir / "cluster_sizes_purity.png",
        title=f"{name}: Leiden cluster sizes and purity\n"
        f"(majority-vote accuracy {clusters.majority_accuracy:.3f})",
    )
    paths["cluster_confusion_plot"] = plots.plot_confusion_matrix(
        clusters.majority_confusion.to_numpy(),
        list(clusters.majority_confusion.index),
        cluster_dir / "cluster_confusion.png",
        title=f"{name}: label vs cluster majority label",
        column_labels=list(clusters.majority_confusion.columns),
        xlabel="majority label of the cell's cluster",
    )
    return paths
