"""The evaluation entry: every embedding (model, PCA, random weights…) through the same probe,
clustering and label-efficiency runs on the same split, written side by side.

Output layout under ``out_dir`` (all files written atomically)::

    baselines.csv            one row per method: probe (hold-out + CV mean/sd), clustering metrics
    label_efficiency.csv     method × shots: accuracy / AUC / macro-F1 mean and sd over draws
    label_efficiency.png
    summary.json             flat metrics, "<method>/<metric>" (the MLflow names), finite values only
    run_meta.json            every setting, the split, class counts, per-method details, timings
    <method>/probe.json      the fitted probe (coefficients, intercepts, scaler, classes; no pickle)
    <method>/predictions.csv test cells: index, true label, predicted label, class probabilities
    <method>/confusion_matrix.csv, confusion_matrix.png, roc_curve.png, pca_2d.png, tsne.png, umap.png
    <method>/clusters/cluster_confusion.csv   true label × cluster-majority label
    <method>/clusters/cluster_table.csv       per cluster: size, purity, majority label, label counts
    <method>/clusters/umap_by_cluster.png, umap_by_label.png, cluster_sizes_purity.png
    report.md, report.html   from :func:`write_report`

The tables, JSON files and figures are written by :mod:`neurofm.evaluate.run_files` (the report by
:mod:`neurofm.evaluate.report`); this module runs the protocol.

Promotion of a model version is decided by :func:`should_promote`, a pure function over two
``summary.json`` dicts (:mod:`neurofm.evaluate.promotion`; re-exported here).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm.errors import NeurofmError
from neurofm.evaluate import probe as probe_module
from neurofm.evaluate.cluster import ClusterConfig, cluster_embedding
from neurofm.evaluate.label_efficiency import DEFAULT_SHOTS, Shot, label_efficiency
from neurofm.evaluate.labels import check_labels
from neurofm.evaluate.probe import ProbeConfig, ProbeSplit, make_split, run_probe
from neurofm.evaluate.promotion import should_promote
from neurofm.evaluate.report import write_report
from neurofm.evaluate.results import EvaluationProtocol, EvaluationResult, MethodResult
from neurofm.evaluate.run_files import (
    label_counts,
    run_settings,
    write_method_figures,
    write_method_tables,
    write_run_meta,
    write_run_tables,
)
from neurofm.evaluate.visualize import visualize
from neurofm.io import ensure_writable_dir

logger = logging.getLogger(__name__)

__all__ = ["EvaluationResult", "MethodResult", "evaluate_embeddings", "should_promote", "write_report"]

# baselines.csv columns, in order (all but "method" and "embedding_dim" are summary metric names)
BASELINE_COLUMNS = [
    "method",
    "embedding_dim",
    "probe_accuracy",
    "probe_f1",
    "probe_auc",
    "probe_cv_accuracy_mean",
    "probe_cv_accuracy_sd",
    "probe_cv_f1_mean",
    "probe_cv_f1_sd",
    "probe_cv_auc_mean",
    "probe_cv_auc_sd",
    "ari",
    "nmi",
    "homogeneity",
    "completeness",
    "n_clusters",
    "cluster_majority_accuracy",
    "ari_res1_mean",
    "ari_res1_sd",
    "nmi_res1_mean",
    "nmi_res1_sd",
    "n_clusters_res1_mean",
    "ari_optimised",
    "nmi_optimised",
    "silhouette",
    "probe_classifier",
]

# The headline metrics: (summary name, title). The model is compared with the strongest baseline on each.
HEADLINE_METRICS = (
    ("probe_f1", "probe macro-F1"),
    ("fewshot5_f1", "5-shot macro-F1"),
    ("ari_optimised", "cluster-optimised ARI"),
    ("nmi_optimised", "cluster-optimised NMI"),
    ("ari_res1_mean", "ARI at resolution 1"),
    ("silhouette", "label silhouette"),
)
MODEL = "model"
CONTROLS = ("random",)  # controls: shown, never the "strongest baseline"


def evaluate_embeddings(
    embeddings: Mapping[str, np.ndarray],
    labels: np.ndarray,
    out_dir: str | os.PathLike,
    probe_config: ProbeConfig | None = None,
    cluster_config: ClusterConfig | None = None,
    groups: np.ndarray | None = None,
    label_efficiency_shots: Sequence[Shot] = DEFAULT_SHOTS,
    label_efficiency_draws: int = 10,
    seed: int = 0,
    figures: bool = True,
    split: ProbeSplit | None = None,
    views: Sequence[str] = ("tsne", "umap"),
    max_cells_cluster: int | None = 20000,
    max_cells_visualize: int | None = 10000,
) -> EvaluationResult:
    """Probe, cluster, visualise and label-efficiency-test every embedding on one shared split.

    ``embeddings`` maps a method name (``"model"``, ``"pca"``, ``"random"`` …; the names prefix every
    metric) to a ``cells × dims`` matrix of the same cells, in the order of ``labels``. ``groups``
    (e.g. ``obs['c1_chip']``) makes every split group-aware. ``split`` reuses a split drawn earlier
    with :func:`neurofm.evaluate.probe.make_split`. ``seed`` seeds label-efficiency draws, t-SNE and
    UMAP (the probe and Leiden have their own seeds in their configs). ``figures=False`` skips every
    PNG and the t-SNE/UMAP computations; ``views`` picks the 2-D views drawn (t-SNE is the slowest
    part, ~2–5 s per method on 1.5k cells; UMAP is also needed for the cluster UMAPs).
    Above ``max_cells_cluster`` cells, kNN-Leiden runs on a seeded uniform sample of that many cells
    (the same cells for every method); above ``max_cells_visualize``, t-SNE/UMAP draw a seeded sample
    of that many (None: all cells). The report says so.

    Writes the files listed in this module's docstring (not the report: call :func:`write_report`)
    and returns an :class:`EvaluationResult`.
    """
    started = time.perf_counter()
    probe_config = probe_config or ProbeConfig()
    cluster_config = cluster_config or ClusterConfig()
    labels = _check_inputs(embeddings, labels)
    out_dir = ensure_writable_dir(out_dir)
    protocol = EvaluationProtocol(
        split=split or make_split(labels, probe_config, groups),
        probe_config=probe_config,
        cluster_config=cluster_config,
        seed=seed,
        figures=figures,
        views=tuple(views),
        label_efficiency_shots=label_efficiency_shots,
        label_efficiency_draws=label_efficiency_draws,
        max_cells_cluster=max_cells_cluster,
        max_cells_visualize=max_cells_visualize,
        cluster_cells=subsample_cells(len(labels), max_cells_cluster, seed),
        view_cells=subsample_cells(len(labels), max_cells_visualize, seed),
    )
    timings: dict[str, float] = {}
    methods = _evaluate_methods(embeddings, labels, protocol, out_dir, timings)
    efficiency_started = time.perf_counter()
    efficiency = _label_efficiency(embeddings, labels, protocol)
    timings["label_efficiency"] = time.perf_counter() - efficiency_started
    _add_fewshot_metrics(methods, efficiency)
    strongest = strongest_baselines(methods)
    summary_all = _summary(methods, efficiency, strongest)
    summary = {key: value for key, value in summary_all.items() if math.isfinite(value)}
    baselines = _baselines_table(methods)
    paths = write_run_tables(baselines, efficiency, summary, out_dir, protocol)
    timings["total"] = time.perf_counter() - started
    class_counts = label_counts(labels)
    result = EvaluationResult(
        out_dir=out_dir,
        methods=methods,
        baselines=baselines,
        label_efficiency=efficiency,
        summary=summary,
        split=protocol.split,
        classes=list(class_counts),
        class_counts=class_counts,
        settings=run_settings(protocol, len(labels), strongest, list(methods)),
        timings=timings,
        paths=paths,
    )
    paths["run_meta"] = write_run_meta(result, labels, groups, summary_all)
    return result


def _check_inputs(embeddings: Mapping[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
    """The checked labels; refuses no embeddings, method names unfit for a folder, and embeddings of
    different numbers of cells (or of another number than the labels)."""
    if not embeddings:
        raise NeurofmError("no embeddings to evaluate; pass e.g. {'model': X_model, 'pca': X_pca}")
    for name in embeddings:
        if not name or "/" in name or name.startswith("."):
            raise NeurofmError(f"method name {name!r} cannot name an output folder; use e.g. 'model', 'pca'")
    n_cells = {name: np.asarray(matrix).shape[0] for name, matrix in embeddings.items()}
    if len(set(n_cells.values())) != 1:
        raise NeurofmError(f"embeddings cover different numbers of cells {n_cells}; embed the same cells")
    return check_labels(labels, n_cells=next(iter(n_cells.values())))


def _evaluate_methods(
    embeddings: Mapping[str, np.ndarray],
    labels: np.ndarray,
    protocol: EvaluationProtocol,
    out_dir: Path,
    timings: dict[str, float],
) -> dict[str, MethodResult]:
    """Every method's result, its files under ``out_dir/<method>``; each one's seconds go into ``timings``.

    Clustering runs on ``protocol.cluster_cells`` when a sample was drawn (logged once here).
    """
    if protocol.cluster_cells is not None:
        logger.info("clustering a seeded sample of %d of %d cells", len(protocol.cluster_cells), len(labels))
    methods: dict[str, MethodResult] = {}
    for name, matrix in embeddings.items():
        method_started = time.perf_counter()
        methods[name] = _evaluate_method(name, matrix, labels, protocol, out_dir / name)
        timings[name] = time.perf_counter() - method_started
        logger.info("evaluated %s in %.1f s: %s", name, timings[name], _headline(methods[name].metrics))
    return methods


def _evaluate_method(
    name: str, matrix: np.ndarray, labels: np.ndarray, protocol: EvaluationProtocol, directory: Path
) -> MethodResult:
    """Probe and cluster one embedding; write its tables (and figures, when on) under ``directory``."""
    embedding = probe_module.check_embedding(matrix)
    probe_result = run_probe(embedding, labels, protocol.probe_config, split=protocol.split)
    cluster_rows = slice(None) if protocol.cluster_cells is None else protocol.cluster_cells
    cluster_result = cluster_embedding(
        embedding[cluster_rows], labels[cluster_rows], **asdict(protocol.cluster_config)
    )
    method = MethodResult(
        name=name,
        embedding_dim=int(embedding.shape[1]),
        probe=probe_result,
        clusters=cluster_result,
        visualization=None,
        metrics={**probe_result.metrics(), **cluster_result.metrics()},
    )
    method.paths.update(write_method_tables(method, directory))
    if protocol.figures:
        _draw_method(method, embedding, labels, protocol, directory)
    return method


def _draw_method(
    method: MethodResult,
    embedding: np.ndarray,
    labels: np.ndarray,
    protocol: EvaluationProtocol,
    directory: Path,
) -> None:
    """Compute the 2-D views of one method and draw all its figures; sets ``method.visualization`` and
    adds the figure paths to ``method.paths``."""
    same_cells = protocol.same_cells
    view_rows = slice(None) if protocol.view_cells is None else protocol.view_cells
    method.visualization = visualize(
        embedding[view_rows],
        labels[view_rows],
        directory,
        seed=protocol.seed,
        n_neighbors=protocol.cluster_config.n_neighbors,
        metric=protocol.cluster_config.metric,
        name=method.name,
        graph=method.clusters.graph if same_cells else None,
        methods=protocol.views,
    )
    method.paths.update(method.visualization.paths)
    method.paths.update(
        write_method_figures(method, embedding, labels, directory, view_rows if same_cells else None)
    )


def _label_efficiency(
    embeddings: Mapping[str, np.ndarray], labels: np.ndarray, protocol: EvaluationProtocol
) -> pd.DataFrame:
    """The label-efficiency table of every method (see :func:`label_efficiency`), on the shared split."""
    return label_efficiency(
        {name: np.asarray(matrix) for name, matrix in embeddings.items()},
        labels,
        shots=protocol.label_efficiency_shots,
        n_draws=protocol.label_efficiency_draws,
        seed=protocol.seed,
        split=protocol.split,
        probe_config=protocol.probe_config,
    )


def _add_fewshot_metrics(methods: Mapping[str, MethodResult], efficiency: pd.DataFrame) -> None:
    """Add ``fewshot<shots>_f1`` and ``fewshot<shots>_f1_sd`` to every method's metrics."""
    for row in efficiency.itertuples(index=False):
        methods[row.method].metrics[f"fewshot{row.shots}_f1"] = float(row.f1_mean)
        methods[row.method].metrics[f"fewshot{row.shots}_f1_sd"] = float(row.f1_sd)


def _baselines_table(methods: Mapping[str, MethodResult]) -> pd.DataFrame:
    """One row per method in :data:`BASELINE_COLUMNS` order, the few-shot columns after them."""
    baselines = pd.DataFrame(
        [
            {
                "method": m.name,
                "embedding_dim": m.embedding_dim,
                **m.metrics,
                "probe_classifier": m.probe.classifier,
            }
            for m in methods.values()
        ]
    )
    return baselines.reindex(
        columns=BASELINE_COLUMNS + [c for c in baselines.columns if c.startswith("fewshot")]
    )


def _headline(metrics: Mapping[str, float]) -> str:
    keys = ("probe_accuracy", "probe_f1", "probe_auc", "ari", "nmi")
    return ", ".join(f"{key} {metrics[key]:.3f}" for key in keys if key in metrics)


def subsample_cells(n_cells: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted seeded sample of ``limit`` cells, or None when every cell is kept."""
    if limit is None or n_cells <= limit:
        return None
    return np.sort(np.random.default_rng([seed, n_cells, limit]).choice(n_cells, size=limit, replace=False))


def strongest_baselines(methods: Mapping[str, MethodResult]) -> dict[str, dict[str, Any]]:
    """Per headline metric: the strongest baseline (controls excluded), its value, the model's margin."""
    out: dict[str, dict[str, Any]] = {}
    for metric, title in HEADLINE_METRICS:
        candidates = {
            name: float(method.metrics.get(metric, float("nan")))
            for name, method in methods.items()
            if name != MODEL and name not in CONTROLS
        }
        candidates = {name: value for name, value in candidates.items() if math.isfinite(value)}
        if not candidates:
            continue
        best = max(candidates, key=lambda name: candidates[name])
        model_value = (
            float(methods[MODEL].metrics.get(metric, float("nan"))) if MODEL in methods else float("nan")
        )
        out[metric] = {
            "title": title,
            "baseline": best,
            "baseline_value": candidates[best],
            "model_value": model_value,
            "margin": model_value - candidates[best],
        }
    return out


def _summary(
    methods: Mapping[str, MethodResult], efficiency: pd.DataFrame, strongest: Mapping[str, Mapping[str, Any]]
) -> dict[str, float]:
    """``{"<method>/<metric>": value}`` for probe, cluster and label-efficiency metrics, plus
    ``strongest/<metric>`` (the strongest baseline's value) and ``margin/<metric>`` (model − it)."""
    summary: dict[str, float] = {}
    for name, method in methods.items():
        for key, value in method.metrics.items():
            summary[f"{name}/{key}"] = float(value)
    for row in efficiency.itertuples(index=False):
        summary[f"{row.method}/label_eff_accuracy_{row.shots}"] = float(row.accuracy_mean)
        summary[f"{row.method}/label_eff_auc_{row.shots}"] = float(row.auc_mean)
    for metric, entry in strongest.items():
        summary[f"strongest/{metric}"] = float(entry["baseline_value"])
        summary[f"margin/{metric}"] = float(entry["margin"])
    return summary
