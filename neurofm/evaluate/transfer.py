"""Scoring a reference mapping: the model's label transfer beside baselines fit on the reference only.

One protocol for every method (:func:`evaluate_mapping`): its reference embedding and the reference
labels make a :class:`neurofm.mapping.Reference` (the same label head, trained on reference cells only, the
same ``unknown`` rule); the query's cells are labelled by :func:`neurofm.mapping.transfer_labels`; the
transfer is scored against the query's true labels — macro-F1 and accuracy of the classifier's label
(``unknown`` aside, so every method is scored on every cell), per-class F1, the share called
``unknown`` — and the query's own structure by the evaluation's clustering (kNN graph, Leiden sweep:
ARI optimised and at resolution 1). The model's reference is the one stored with it; the baselines'
(:data:`MAP_BASELINES`, :mod:`neurofm.evaluate.baselines`) are fit on the reference cells given.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from neurofm.config import MAP_BASELINES as CONFIG_MAP_BASELINES
from neurofm.config import SCARCHES_QUERY_EPOCHS
from neurofm.errors import NeurofmError
from neurofm.evaluate.label_baselines import LABEL_TOOLS, ToolLabels
from neurofm.mapping import UNKNOWN, Reference, ReferenceConfig, build_reference, transfer_labels

log = logging.getLogger(__name__)

MAP_BASELINES = CONFIG_MAP_BASELINES  # defined once, in neurofm.config
HEADLINE = ("transfer_f1", "query_ari_optimised")


@dataclass
class TransferResult:
    """One method's transfer to the query, scored."""

    method: str
    column: str
    frame: pd.DataFrame  # transfer_labels' frame for the scored query cells
    truth: np.ndarray
    metrics: dict[str, float]
    per_class: pd.DataFrame  # label, n_query, n_reference, f1
    confusion: pd.DataFrame  # true × predicted (classifier labels)
    query_embedding: np.ndarray
    reference_embedding: np.ndarray
    classifier: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def score_transfer(
    method: str, reference: Reference, column: str, query_embedding: np.ndarray, truth: np.ndarray,
    cluster: dict[str, Any] | None = None, seconds: float = 0.0, expression: np.ndarray | None = None,
) -> TransferResult:  # fmt: skip
    """Transfer ``column`` of ``reference`` to the query and score it against ``truth`` (``expression``: the
    query cells' genes, for a head that reads them)."""
    frame = transfer_labels(reference, query_embedding, column, expression)
    ref = reference.columns[column]
    return _scored(method, column, frame, truth, ref.counts(), query_embedding, reference.embedding,
                   ref.classifier_name, cluster, seconds)  # fmt: skip


def score_tool(
    method: str, tool: ToolLabels, column: str, truth: np.ndarray, reference_labels: np.ndarray,
    cluster: dict[str, Any] | None = None, seconds: float = 0.0,
) -> TransferResult:  # fmt: skip
    """Score a label tool's own labels (:mod:`neurofm.evaluate.label_baselines`) as :func:`score_transfer`
    scores a reference head's: its label of every cell, ``unknown`` where its confidence is at or below its
    default threshold; the query's clustering in the tool's own space where it has one (else NaN)."""
    predicted = np.asarray(tool.predicted).astype(str)
    confidence = np.full(len(predicted), np.nan) if tool.confidence is None else np.asarray(tool.confidence, float)
    frame = pd.DataFrame({"label": np.where(tool.unknown, UNKNOWN, predicted), "predicted": predicted,
                          "probability": confidence, "score": confidence})  # fmt: skip
    labels, counts = np.unique(np.asarray(reference_labels).astype(str), return_counts=True)
    empty = np.zeros((len(predicted), 0), np.float32)
    return _scored(method, column, frame, truth, dict(zip(labels.tolist(), counts.tolist(), strict=True)),
                   empty if tool.query_embedding is None else tool.query_embedding,
                   empty[:0] if tool.reference_embedding is None else tool.reference_embedding,
                   tool.classifier, cluster, seconds)  # fmt: skip


def _scored(method, column, frame, truth, reference_counts, query_embedding, reference_embedding, classifier,
            cluster, seconds) -> TransferResult:  # fmt: skip
    from neurofm.evaluate.cluster import cluster_embedding

    truth = np.asarray(truth).astype(str)
    predicted = frame["predicted"].astype(str).to_numpy()
    labels = sorted(set(truth) | set(predicted))
    scores = f1_score(truth, predicted, labels=labels, average=None, zero_division=0)
    per_class = pd.DataFrame(
        {
            "label": labels,
            "n_query": [int((truth == label).sum()) for label in labels],
            "n_reference": [reference_counts.get(label, 0) for label in labels],
            "f1": scores,
            "unknown_share": [
                float((frame["label"][truth == label] == UNKNOWN).mean())
                if (truth == label).any()
                else np.nan
                for label in labels
            ],
        }
    )
    in_query = per_class["n_query"] > 0
    query_embedding = np.asarray(query_embedding)
    clusters = cluster_embedding(query_embedding, truth, **(cluster or {})).metrics() if query_embedding.shape[1] else {}
    metrics = {
        "transfer_f1": float(per_class.loc[in_query, "f1"].mean()),
        "transfer_accuracy": float(accuracy_score(truth, predicted)),
        "transfer_f1_all_labels": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "unknown_share": float((frame["label"] == UNKNOWN).mean()),
        "query_ari_optimised": float(clusters.get("ari_optimised", np.nan)),
        "query_nmi_optimised": float(clusters.get("nmi_optimised", np.nan)),
        "query_ari_res1": float(clusters.get("ari_res1_mean", np.nan)),
        "query_ari_res1_sd": float(clusters.get("ari_res1_sd", np.nan)),
        "seconds": float(seconds),
    }
    confusion = pd.DataFrame(
        confusion_matrix(truth, predicted, labels=labels), index=pd.Index(labels, name="true"), columns=labels
    )
    return TransferResult(
        method=method, column=column, frame=frame, truth=truth, metrics=metrics, per_class=per_class,
        confusion=confusion, query_embedding=query_embedding, reference_embedding=np.asarray(reference_embedding),
        classifier=classifier, seconds=seconds,
    )  # fmt: skip


def baseline_embeddings(
    name: str, reference_view, query_view, *, query_batches=None,
    scarches_query_epochs: int = SCARCHES_QUERY_EPOCHS, seed: int = 0, fitted: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(reference, query)`` embeddings of embedding baseline ``name`` (``pca_ref``, ``logcounts``, ``scvi``,
    ``scarches``), fit on the reference (shared-gene views, :func:`neurofm.evaluate.baselines.shared_gene_views`).
    ``fitted`` keeps the one scVI reference that scVI, scArches and scANVI share."""
    from neurofm.evaluate import baselines

    if name == "pca_ref":
        return baselines.pca_reference_projection(reference_view, query_view, seed=seed)
    if name == "logcounts":
        return baselines.log_count_features(reference_view, query_view)
    model = _scvi_model(reference_view, seed, {} if fitted is None else fitted)
    if name == "scvi":
        return baselines.scvi_baseline_latent(model, query_view)
    if name == "scarches":
        return baselines.scarches_baseline(
            reference_view, query_view, query_batches=query_batches, query_epochs=scarches_query_epochs, seed=seed,
            model=model,
        )  # fmt: skip
    raise NeurofmError(f"unknown map baseline {name!r}; use one of {', '.join(MAP_BASELINES)}")


def _scvi_model(reference_view, seed: int, fitted: dict):
    from neurofm.evaluate import baselines

    if "scvi" not in fitted:
        fitted["scvi"] = baselines.scvi_reference(reference_view, seed=seed, max_epochs=fitted.get("scvi_max_epochs"))
    return fitted["scvi"]


def tool_labels(
    name: str, reference_view, query_view, column: str, *, query_batches=None,
    scarches_query_epochs: int = SCARCHES_QUERY_EPOCHS, seed: int = 0, fitted: dict | None = None,
) -> ToolLabels:  # fmt: skip
    """Label tool ``name`` (:data:`~neurofm.evaluate.label_baselines.LABEL_TOOLS`) fit on the reference
    view's ``obs[column]``, run on the query view; scANVI's query trains ``scarches_query_epochs`` as scArches'."""
    from neurofm.evaluate import label_baselines

    if name in ("celltypist", "celltypist_majority"):
        return label_baselines.celltypist_labels(reference_view, query_view, column, name == "celltypist_majority")
    if name == "symphony":
        return label_baselines.symphony_labels(reference_view, query_view, column, seed=seed)
    if name == "scanvi":
        fitted = {} if fitted is None else fitted
        model = _scvi_model(reference_view, seed, fitted)
        return label_baselines.scanvi_labels(model, query_view, column, scarches_query_epochs, seed=seed,
                                             max_epochs=fitted.get("scvi_max_epochs"), query_batches=query_batches)  # fmt: skip
    raise NeurofmError(f"unknown map baseline {name!r}; use one of {', '.join(MAP_BASELINES)}")


def evaluate_mapping(
    reference: Reference,
    query_embedding: np.ndarray,
    truth: np.ndarray,
    column: str,
    *,
    reference_cells=None,
    query_cells=None,
    baselines: tuple[str, ...] | list[str] = MAP_BASELINES,
    gene_col: str | None = None,
    query_batches=None,
    scarches_query_epochs: int = SCARCHES_QUERY_EPOCHS,
    cluster: dict[str, Any] | None = None,
    model_seconds: float = 0.0,
    query_expression: np.ndarray | None = None,
    scvi_max_epochs: int | None = None,
) -> dict[str, TransferResult]:
    """``{method: TransferResult}``: the model (its stored ``reference``, its label head fed the query's
    ``query_expression`` when it reads genes) and each baseline, fit on ``reference_cells`` (an AnnData of
    the reference's raw counts with ``column`` in obs) and scored on the same query cells by one protocol:
    an embedding baseline through the same label head and unknown rule as the model, a label tool
    (CellTypist, scANVI, Symphony) by its own classifier and threshold. Without ``reference_cells`` only
    the model is scored. ``scvi_max_epochs`` caps scVI's epoch rule (None: the rule; for tests)."""
    from neurofm.evaluate.baselines import shared_gene_views

    results = {
        "model": score_transfer(
            "model", reference, column, query_embedding, truth, cluster, model_seconds, query_expression
        )
    }
    if reference_cells is None or not baselines:
        return results
    if column not in reference_cells.obs:
        raise NeurofmError(
            f"the reference cells have no obs column {column!r}; pass the reference data the model's reference was built from"
        )
    ref_config = ReferenceConfig(
        label_columns=(column,),
        **{k: v for k, v in vars(reference.config).items() if k not in ("label_columns",)},
    )
    reference_view, query_view = shared_gene_views(reference_cells, query_cells, gene_col)
    fitted: dict[str, Any] = {"scvi_max_epochs": scvi_max_epochs}
    options = {"query_batches": query_batches, "scarches_query_epochs": scarches_query_epochs, "fitted": fitted}
    for name in baselines:
        started = time.perf_counter()
        if name in LABEL_TOOLS:
            tool = tool_labels(name, reference_view, query_view, column, **options)
            seconds = time.perf_counter() - started
            results[name] = score_tool(name, tool, column, truth, reference_cells.obs[column], cluster, seconds)
        else:
            ref_x, query_x = baseline_embeddings(name, reference_view, query_view, **options)
            seconds = time.perf_counter() - started
            baseline_reference = build_reference(ref_x, reference_cells.obs[[column]], ref_config)
            results[name] = score_transfer(name, baseline_reference, column, query_x, truth, cluster, seconds)
        log.info("map baseline %s: transfer macro-F1 %.3f (%.0f s)", name, results[name].metrics["transfer_f1"], seconds)
    return results


def strongest(results: dict[str, TransferResult]) -> dict[str, tuple[str, float]]:
    """The best baseline per headline metric: ``{metric: (method, value)}``."""
    out = {}
    for metric in HEADLINE:
        values = {
            m: r.metrics[metric]
            for m, r in results.items()
            if m != "model" and np.isfinite(r.metrics[metric])
        }
        if values:
            best = max(values, key=values.get)
            out[metric] = (best, values[best])
    return out


def summary_metrics(results: dict[str, TransferResult]) -> dict[str, float]:
    """Flat ``method/metric`` numbers plus ``strongest/…`` and ``margin/…`` (model − strongest)."""
    flat = {f"{m}/{k}": v for m, r in results.items() for k, v in r.metrics.items()}
    for metric, (_, value) in strongest(results).items():
        flat[f"strongest/{metric}"] = value
        flat[f"margin/{metric}"] = results["model"].metrics[metric] - value
    return flat


def write_mapping_report(
    results: dict[str, TransferResult],
    out_dir: str | Path,
    header: dict[str, Any],
    reference_labels: np.ndarray | None = None,
    query_source: str = "query",
) -> Path:
    """``report.md`` + ``report.html`` (figures embedded), ``transfer.csv``, ``per_class_f1.csv``,
    ``confusion_<method>.csv`` and figures in ``out_dir``: the methods side by side, the strongest baseline
    named, per-class F1, the model's confusion matrix, and reference and query co-embedded in one UMAP
    coloured by dataset and by label. Returns the path of ``report.md``."""
    from neurofm import plots
    from neurofm.evaluate.report import render_html, render_markdown
    from neurofm.evaluate.visualize import umap_coordinates
    from neurofm.io import atomic_path, ensure_writable_dir, write_text

    out = ensure_writable_dir(out_dir)
    model = results["model"]
    table = pd.DataFrame([{"method": m, "classifier": r.classifier, **r.metrics} for m, r in results.items()])
    with atomic_path(out / "transfer.csv") as tmp:
        table.to_csv(tmp, index=False)
    per_class = model.per_class.rename(columns={"f1": "model_f1"})
    for method, result in results.items():
        if method != "model":
            per_class[f"{method}_f1"] = (
                result.per_class.set_index("label")["f1"].reindex(per_class["label"]).to_numpy()
            )
    with atomic_path(out / "per_class_f1.csv") as tmp:
        per_class.to_csv(tmp, index=False)
    for method, result in results.items():
        with atomic_path(out / f"confusion_{method}.csv") as tmp:
            result.confusion.to_csv(tmp)
    figures = []
    if len(model.confusion) <= 30:
        figures.append((plots.plot_confusion_matrix(
            model.confusion.to_numpy(), list(model.confusion.index), out / "confusion_model.png",
            title=f"model: {model.column} transferred to the query", column_labels=list(model.confusion.columns),
        ), "the model's transfer: true query label (rows) against the transferred label"))  # fmt: skip
    rng = np.random.default_rng(0)
    ref_rows = np.sort(
        rng.choice(len(model.reference_embedding), min(5000, len(model.reference_embedding)), replace=False)
    )
    query_rows = np.sort(
        rng.choice(len(model.query_embedding), min(5000, len(model.query_embedding)), replace=False)
    )
    joint = np.concatenate([model.reference_embedding[ref_rows], model.query_embedding[query_rows]])
    coordinates = umap_coordinates(joint, seed=0)
    dataset = np.array(["reference"] * len(ref_rows) + [query_source] * len(query_rows))
    figures.append((plots.plot_embedding_2d(coordinates, dataset, out / "coembedding_by_dataset.png",
                                            "reference and query in the model's embedding (UMAP)", legend_title="dataset"),
                    "reference and query co-embedded, coloured by dataset"))  # fmt: skip
    if reference_labels is not None:
        labels = np.concatenate([np.asarray(reference_labels).astype(str)[ref_rows], model.truth[query_rows]])
        figures.append((plots.plot_embedding_2d(coordinates, labels, out / "coembedding_by_label.png",
                                                "reference and query labels (UMAP)", annotate=len(set(labels)) > 15),
                        "coloured by label (reference: its labels; query: its true labels)"))  # fmt: skip
    figures = [(Path(path).name, caption) for path, caption in figures]  # beside the report
    blocks = _report_blocks(results, table, per_class, header, figures)
    path = write_text(render_markdown(blocks), out / "report.md")
    write_text(render_html(blocks, out), out / "report.html")
    return path


def _report_blocks(results, table, per_class, header, figures) -> list[tuple]:
    model = results["model"]
    best = strongest(results)
    blocks: list[tuple] = [("heading", 1, f"Reference mapping: {model.column}")]
    blocks.append(("table", ["", "value"], [[k, str(v)] for k, v in header.items()]))
    columns = [
        "transfer_f1",
        "transfer_accuracy",
        "unknown_share",
        "query_ari_optimised",
        "query_ari_res1",
        "seconds",
    ]

    def cell(value: float, column: str) -> str:  # NaN: the method has no space of its own to cluster
        return "—" if pd.isna(value) else (f"{value:.0f}" if column == "seconds" else f"{value:.3f}")

    rows = [[r["method"], r["classifier"], *(cell(r[c], c) for c in columns)]
            for r in table.to_dict("records")]  # fmt: skip
    blocks.append(("heading", 2, "The model against the baselines (fit on the reference only)"))
    blocks.append(("table", ["method", "classifier", "transfer macro-F1", "accuracy", "unknown", "query ARI (optimised)",
                             "query ARI (res 1)", "seconds"], rows))  # fmt: skip
    sentences = []
    for metric, (method, value) in best.items():
        margin = model.metrics[metric] - value
        verdict = "ahead of" if margin > 0.005 else ("level with" if margin >= -0.005 else "behind")
        sentences.append(f"{metric}: the model {model.metrics[metric]:.3f} is {verdict} the strongest baseline, "
                         f"{method} {value:.3f} ({margin:+.3f}).")  # fmt: skip
    if not best:
        sentences.append(
            "No baseline was scored (no reference cells given); the model's figures stand alone."
        )
    blocks.append(("bullets", sentences))
    methods = [c for c in per_class.columns if c.endswith("_f1")]
    blocks.append(("heading", 2, "Per-class F1 (query cells)"))
    blocks.append(("table", ["label", "query cells", "reference cells", *methods, "model: unknown"],
                   [[r["label"], str(r["n_query"]), str(r["n_reference"]), *(f"{r[m]:.3f}" for m in methods),
                     "" if pd.isna(r["unknown_share"]) else f"{r['unknown_share']:.1%}"]
                    for r in per_class.to_dict("records")]))  # fmt: skip
    blocks.append(("heading", 2, "Figures"))
    blocks.append(("images", figures))
    return blocks


# ------------------------------------------------------------------ a mapped file scored (the map pipeline)
def sample_rows(n_cells: int, max_cells: int | None, seed: int) -> np.ndarray:
    """Every row (``arange``), or above ``max_cells`` a seeded, sorted sample of that many."""
    if max_cells is not None and n_cells > max_cells:
        return np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))
    return np.arange(n_cells)


def find_reference_cells(reference: Reference, reference_data: str | None = None) -> tuple[Any, str]:
    """The reference's own cells (raw counts + obs, an AnnData) for the baselines and where they came
    from: ``reference_data`` (an .h5ad, read whole) when given, else the cell store the reference was built
    from (its rows), else the .h5ad it records as its source (its rows). ``(None, why)`` when none is found."""
    from neurofm.data.store import CellStore
    from neurofm.io import read_h5ad

    store = reference.meta.get("store")
    if reference_data is None and store and Path(store).is_dir() and reference.rows is not None:
        return CellStore(store).to_anndata(reference.rows), f"the cell store {store}"
    source = reference_data or reference.meta.get("source")
    if source and str(source).endswith(".h5ad") and Path(source).is_file():
        cells = read_h5ad(source)
        if reference.rows is not None and len(reference.rows) < cells.n_obs and reference_data is None:
            cells = cells[reference.rows].copy()
        return cells, str(source)
    return None, (
        "the reference's cells were not found (no store or .h5ad recorded); pass --reference-data REF.h5ad "
        "to score the baselines"
    )


def _sampled_query(mapped_file: str | Path, max_cells: int | None):
    """(the mapped query's cells in memory — a seeded sample of ``max_cells`` above that —, its cell count)."""
    import anndata as ad

    query = ad.read_h5ad(mapped_file, backed="r")
    try:
        return query[sample_rows(query.n_obs, max_cells, seed=0)].to_memory(), query.n_obs
    finally:
        query.file.close()


def _scored_reference(reference: Reference, reference_cells, column: str, max_cells: int | None, tokenizer,
                      notes: list[str]):  # fmt: skip
    """``(the reference every method is scored against, the baselines' reference cells or None)``: above
    ``max_cells`` reference cells, the model's reference rebuilt on a seeded sample of them (the same cells
    the baselines fit on); ``notes`` gets a line for each such choice."""
    from neurofm.cell_features import cells_expression

    if reference_cells is not None and max_cells is not None and reference_cells.n_obs > max_cells:
        keep = sample_rows(reference_cells.n_obs, max_cells, seed=1)  # the same cells for all
        reference_cells = reference_cells[keep].copy()
        config = ReferenceConfig(**{**vars(reference.config), "label_columns": (column,)})
        notes.append(
            f"every method's reference: a seeded sample of {max_cells} of the reference's {reference.n_cells} cells"
        )
        reference = build_reference(
            reference.embedding[keep], reference_cells.obs[[column]], config, cells_expression(reference_cells, tokenizer)
        )
    if reference_cells is not None and column not in reference_cells.obs:
        reference_cells = None
        notes.append(f"the reference cells lack obs[{column!r}]; baselines not scored")
    return reference, reference_cells


def score_mapped_file(
    mapped_file: str | Path,
    record: dict[str, Any],
    model_dir: str | Path,
    label_column: str | None,
    out_dir: str | Path,
    *,
    max_cells: int | None = None,
    baselines: tuple[str, ...] | list[str] = MAP_BASELINES,
    gene_col: str | None = None,
    batch_column: str | None = None,
    reference_data: str | None = None,
    scarches_query_epochs: int = SCARCHES_QUERY_EPOCHS,
    model_seconds: float = 0.0,
    model: str | None = None,
) -> dict[str, Any]:
    """Score a query mapped by :func:`neurofm.mapping.map_file` (``mapped_file`` and its ``record``) against
    its true labels ``obs[label_column]``, beside ``baselines`` fit on the reference's own cells
    (:func:`find_reference_cells`; ``reference_data`` overrides), and write the report into ``out_dir``
    (``report.md``/``.html``, ``transfer.csv``, ``per_class_f1.csv``, confusion tables, figures).

    Above ``max_cells``, a seeded sample of that many query cells is scored, and every method's reference
    (the model's rebuilt on the same cells) is a seeded sample of that many reference cells. The model's
    label head reads the query's genes (by ``gene_col``); ``batch_column`` is scArches' query batch key;
    ``model`` names the model in the report's header (None: the newest registered version).

    Returns ``{"scored": True, "metrics", "out_dir", "report", "column", "notes"}``, or without
    ``label_column`` ``{"scored": False, "metrics": {}, "out_dir": None}`` (nothing is read or written).
    """

    from neurofm import keys
    from neurofm.cell_features import cells_expression
    from neurofm.mapping import load_reference
    from neurofm.model import load_pretrained

    if label_column is None:
        return {"scored": False, "metrics": {}, "out_dir": None}
    reference = load_reference(model_dir)
    column = label_column if label_column in reference.columns else record["label_columns"][0]
    query_cells, n_query = _sampled_query(mapped_file, max_cells)
    truth = query_cells.obs[label_column].astype(str).to_numpy()
    batches = None if batch_column is None else query_cells.obs[batch_column].astype(str).to_numpy()
    reference_cells, where = find_reference_cells(reference, reference_data)
    notes = [] if reference_cells is not None else [where]
    encoder, tokenizer = load_pretrained(model_dir)
    query_expression = cells_expression(query_cells, tokenizer, gene_col)
    scored_reference, reference_cells = _scored_reference(
        reference, reference_cells, column, max_cells, tokenizer, notes
    )
    results = evaluate_mapping(
        scored_reference, query_cells.obsm[keys.EMBEDDING], truth, column,
        reference_cells=reference_cells, query_cells=query_cells, baselines=list(baselines),
        gene_col=gene_col, query_batches=batches, scarches_query_epochs=scarches_query_epochs,
        model_seconds=model_seconds, query_expression=query_expression,
    )  # fmt: skip
    header = {
        "model": model or "the newest registered version",
        "query": record.get("input"),
        "query cells scored": f"{query_cells.n_obs} of {n_query}",
        "genes": f"{record['gene_match']['n_found']} of the model's {record['gene_match']['n_model_genes']}",
        "reference": f"{scored_reference.n_cells} cells; baselines fit on {where if reference_cells is not None else '—'}",
        "unknown rule": f"score < {record['score_threshold'][column]:.3f} (unknown_quantile {reference.config.unknown_quantile})",
        "batch covariate": (
            f"the count head's {encoder.config.n_batches} batches ({encoder.config.batch_key}); the query on the "
            "no-batch vector" if encoder.config.n_batches else "none: the model has no batch covariate"
        ) + "; map.batch_column is scArches' and scANVI's query batch key only",
        **{f"note {i + 1}": note for i, note in enumerate(notes)},
    }
    report = write_mapping_report(results, out_dir, header, reference_labels=scored_reference.labels(column))
    return {"scored": True, "metrics": summary_metrics(results), "out_dir": str(out_dir), "report": str(report),
            "column": column, "notes": notes}  # fmt: skip
