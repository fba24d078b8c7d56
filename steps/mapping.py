"""Reference-mapping steps: map a query file onto a model's reference; score and track the transfer.

Neither step holds more than a seeded sample of the query in memory: ``map_query_cells`` maps the
file in chunks into a new .h5ad (``neurofm.mapping.map_file``) and returns a small record;
``score_mapping`` (only with the query's true labels; report in ``<out_dir>/map/report/``) scores a seeded sample of at most
``map.max_cells_score`` query cells beside the baselines, fit on the reference's own cells (the store
the reference was built from, or ``map.reference_data``), and writes the report.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from zenml import step

from neurofm import tracking
from steps._cache import depends_on

log = logging.getLogger(__name__)

MAP_DIR = "map"


@step(cache_policy=depends_on("mapping", "embedding", "model", "genes", "tokenizer", "registry"))
def map_query_cells(
    model_dir: Path, query_path: str, fingerprint: str, settings: dict[str, Any], out_dir: str, data_name: str
) -> Annotated[dict, "mapping"]:
    """Map every cell of the query .h5ad onto the model's reference into ``<out_dir>/map/<name>.mapped.h5ad``
    (the query plus ``obsm['X_neurofm']``, ``obs['neurofm_<column>']`` and ``_score``, ``uns['neurofm_map']``;
    the input is never touched). Returns ``{"mapped_file", "record", "seconds"}``. ``fingerprint`` keys
    the cache on the query's content."""
    from neurofm.mapping import map_file

    started = time.perf_counter()
    mapped = Path(out_dir) / MAP_DIR / f"{data_name}.mapped.h5ad"
    record = map_file(
        query_path, mapped, model=model_dir, label_columns=settings["label_columns"],
        gene_col=settings["gene_column"], min_gene_overlap=settings["min_gene_overlap"],
    )  # fmt: skip
    return {
        "mapped_file": str(mapped),
        "record": json.loads(json.dumps(record, default=str)),
        "seconds": time.perf_counter() - started,
        "fingerprint": fingerprint,
    }


def _reference_cells(reference, settings: dict[str, Any]):
    """The reference's own cells (raw counts + obs) for the baselines, or None (with the reason)."""
    from neurofm.data.store import CellStore
    from neurofm.io import read_h5ad

    store = reference.meta.get("store")
    if settings["reference_data"] is None and store and Path(store).is_dir() and reference.rows is not None:
        return CellStore(store).to_anndata(reference.rows), f"the cell store {store}"
    source = settings["reference_data"] or reference.meta.get("source")
    if source and str(source).endswith(".h5ad") and Path(source).is_file():
        cells = read_h5ad(source)
        if (
            reference.rows is not None
            and len(reference.rows) < cells.n_obs
            and settings["reference_data"] is None
        ):
            cells = cells[reference.rows].copy()
        return cells, str(source)
    return None, (
        "the reference's cells were not found (no store or .h5ad recorded); pass --reference-data REF.h5ad "
        "to score the baselines"
    )


@step(cache_policy=depends_on("mapping", "evaluate", "plots"))
def score_mapping(
    mapping: dict, model_dir: Path, settings: dict[str, Any], out_dir: str
) -> Annotated[dict, "map_scores"]:
    """With ``map.query_label_column``: the transfer scored beside the baselines (``map.baselines``, fit
    on the reference's cells) on a seeded sample of the query, and ``<out_dir>/map/report/report.md`` /
    ``report.html``, ``transfer.csv``, ``per_class_f1.csv``, confusion tables and figures. Without it:
    ``{"scored": False}``."""
    import anndata as ad

    from neurofm.cell_features import cells_expression
    from neurofm.evaluate.transfer import evaluate_mapping, summary_metrics, write_mapping_report
    from neurofm.mapping import ReferenceConfig, build_reference, load_reference
    from neurofm.model import load_pretrained

    label_column = settings["query_label_column"]
    if label_column is None:
        return {"scored": False, "metrics": {}, "out_dir": None}
    reference = load_reference(model_dir)
    column = label_column if label_column in reference.columns else mapping["record"]["label_columns"][0]
    query = ad.read_h5ad(mapping["mapped_file"], backed="r")
    try:
        n_query = query.n_obs
        rows = np.arange(n_query)
        limit = settings["max_cells_score"]
        if limit is not None and n_query > limit:
            rows = np.sort(np.random.default_rng(0).choice(n_query, limit, replace=False))
        query_cells = query[rows].to_memory()
    finally:
        query.file.close()
    from neurofm import keys

    truth = query_cells.obs[label_column].astype(str).to_numpy()
    batches = (
        None
        if settings["batch_column"] is None
        else query_cells.obs[settings["batch_column"]].astype(str).to_numpy()
    )
    reference_cells, where = _reference_cells(reference, settings)
    notes = [] if reference_cells is not None else [where]
    scored_reference = reference
    tokenizer = load_pretrained(model_dir)[1]
    query_expression = cells_expression(query_cells, tokenizer, settings["gene_column"])
    if (
        reference_cells is not None and limit is not None and reference_cells.n_obs > limit
    ):  # the same cells for all
        keep = np.sort(np.random.default_rng(1).choice(reference_cells.n_obs, limit, replace=False))
        reference_cells = reference_cells[keep].copy()
        config = ReferenceConfig(**{**vars(reference.config), "label_columns": (column,)})
        scored_reference = build_reference(
            reference.embedding[keep],
            reference_cells.obs[[column]],
            config,
            cells_expression(reference_cells, tokenizer),
        )
        notes.append(
            f"every method's reference: a seeded sample of {limit} of the reference's {reference.n_cells} cells"
        )
    if reference_cells is not None and column not in reference_cells.obs:
        reference_cells = None
        notes.append(f"the reference cells lack obs[{column!r}]; baselines not scored")
    results = evaluate_mapping(
        scored_reference, query_cells.obsm[keys.EMBEDDING], truth, column,
        reference_cells=reference_cells, query_cells=query_cells, baselines=list(settings["baselines"]),
        gene_col=settings["gene_column"], query_batches=batches,
        scarches_query_epochs=settings["scarches_query_epochs"],
        model_seconds=mapping["seconds"], query_expression=query_expression,
    )  # fmt: skip
    record = mapping["record"]
    header = {
        "model": settings["model"] or "the newest registered version",
        "query": record.get("input"),
        "query cells scored": f"{len(rows)} of {n_query}",
        "genes": f"{record['gene_match']['n_found']} of the model's {record['gene_match']['n_model_genes']}",
        "reference": f"{scored_reference.n_cells} cells; baselines fit on {where if reference_cells is not None else '—'}",
        "unknown rule": f"score < {record['score_threshold']:.3f} (unknown_quantile {reference.config.unknown_quantile})",
        "batch covariate": "none: the model has no batch covariate; map.batch_column is scArches' batch key only",
        **{f"note {i + 1}": note for i, note in enumerate(notes)},
    }
    out = Path(out_dir) / MAP_DIR / "report"  # beside, not around, the mapped .h5ad (logged to MLflow)
    report = write_mapping_report(results, out, header, reference_labels=scored_reference.labels(column))
    metrics = summary_metrics(results)
    return {"scored": True, "metrics": metrics, "out_dir": str(out), "report": str(report), "column": column,
            "notes": notes}  # fmt: skip


@step(enable_cache=False)
def track_mapping(
    mapping: dict, scores: dict, model_info: dict, settings: dict[str, Any], tracking_config: dict[str, Any],
    data_name: str,
) -> Annotated[dict, "map_summary"]:  # fmt: skip
    """Log the mapping to MLflow: one run (tags: pipeline step ``map``, model version), the transfer
    metrics, the unknown share per column and the report and tables as artifacts. Never cached."""
    record = mapping["record"]
    tags = {"neurofm.pipeline_step": "map", "neurofm.data": data_name,
            "neurofm.model_uri": str(model_info.get("model_uri"))}  # fmt: skip
    if model_info.get("model_version") is not None:
        tags.update(
            {
                "neurofm.model_name": model_info["model_name"],
                "neurofm.model_version": str(model_info["model_version"]),
            }
        )
    with tracking.start_run(tracking_config["experiment"], run_name=f"map-{data_name}", tags=tags,
                            tracking_uri=tracking_config["tracking_uri"]) as run:  # fmt: skip
        tracking.log_params({"map": {k: v for k, v in settings.items() if k != "model"}})
        metrics = {f"unknown_share/{c}": v for c, v in record["unknown_share"].items()}
        metrics.update({"map_seconds": mapping["seconds"], "n_cells": record["n_cells"], **scores["metrics"]})
        tracking.log_metrics(metrics)
        if scores.get("out_dir"):
            tracking.log_artifacts([scores["out_dir"]], artifact_path="map")
    return {"record": record, "metrics": scores["metrics"], "mapped_file": mapping["mapped_file"],
            "report": scores.get("report"), "mlflow_run_id": run.info.run_id, "model": model_info}  # fmt: skip
