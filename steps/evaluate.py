"""Evaluation steps: resolve the model, embed, visualize, probe + cluster + report, track + promote.

Every number is computed for the model's embeddings and, in the same run and on the same split,
for two baselines: PCA of log-normalised counts and the same architecture with random weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import anndata as ad
import numpy as np
import pandas as pd
from zenml import step
from zenml.types import HTMLString

from neurofm import io, keys, tracking
from neurofm.config import dataclass_from_dict
from neurofm.embedding import embed, embed_matrix, random_encoder_like
from neurofm.evaluate import compare
from neurofm.evaluate.baselines import pca_baseline, scvi_baseline
from neurofm.evaluate.cluster import ClusterConfig
from neurofm.evaluate.labels import resolve_labels
from neurofm.evaluate.probe import ProbeConfig
from neurofm.evaluate.visualize import visualize
from neurofm.genes import match_adata
from neurofm.model import load_pretrained
from steps._cache import depends_on

log = logging.getLogger(__name__)

METHOD_KEYS = {
    "model": keys.EMBEDDING,
    "pca": keys.PCA_BASELINE,
    "scvi": keys.SCVI_BASELINE,
    "random": keys.RANDOM_BASELINE,
}
EVALUATION_DIR = "evaluation"


@step(enable_cache=False)
def resolve_model(
    model: str | None, tracking_config: dict[str, Any]
) -> tuple[Annotated[Path, "model_dir"], Annotated[dict, "model_info"]]:
    """Find the model to evaluate: a directory, an MLflow URI, or (None) the newest registered version.

    Never cached: the registry's ``newest`` alias moves with every pre-training.
    """
    name = tracking_config["registered_model_name"]
    model_dir = tracking.resolve_model_dir(model, name, tracking_config["tracking_uri"])
    version = tracking.model_version_for(model, name)
    info = {
        "source": str(model) if model is not None else f"models:/{name}@{tracking.NEWEST_ALIAS}",
        "model_name": version.name if version else None,
        "model_version": version.version if version else None,
        "model_uri": version.uri if version else str(model_dir),
        "mlflow_run_id": version.run_id if version else None,
    }
    if version is not None and version.run_id:  # the pre-training figures, for the report
        metrics = tracking.run_metrics(version.run_id)
        wanted = ("best_val_perplexity", "baseline_perplexity", "perplexity_ratio")
        wanted += ("best_val_masked_accuracy", "baseline_masked_accuracy")
        if all(key in metrics for key in wanted):
            info.update({key: metrics[key] for key in wanted})
    return model_dir, info


@step(cache_policy=depends_on("model", "tokenizer", "genes", "registry", "embedding", "evaluate"))
def embed_cells(
    adata: ad.AnnData, model_dir: Path, evaluate: dict[str, Any], out_dir: str
) -> Annotated[ad.AnnData, "embedded_cells"]:
    """Embed every cell with the frozen model and compute the baselines ``evaluate.baselines`` names.

    Writes ``obsm['X_neurofm']`` (model), ``obsm['X_pca_baseline']`` (PCA on scanpy's recipe),
    ``obsm['X_scvi_baseline']`` (scVI trained on these cells), ``obsm['X_random_encoder']`` (same
    architecture, random weights), ``uns['neurofm']`` (model source, gene match, pooling, cells/s) and,
    under ``<out_dir>/evaluation``, ``embeddings.npy``, ``labels.npy``, ``cells.tsv``.
    """
    labels = resolve_labels(adata, evaluate["label_column"], evaluate["label_mapping"])
    model, tokenizer = load_pretrained(model_dir)
    genes = {"gene_col": evaluate["gene_column"], "min_gene_overlap": evaluate["min_gene_overlap"]}
    options = {"batch_size": evaluate["batch_size"], "pooling": evaluate["pooling"]}
    embed(  # writes uns['neurofm']
        adata,
        model,
        tokenizer,
        key_added=keys.EMBEDDING,
        unobserved=evaluate["unobserved"],
        **genes,
        **options,
    )
    adata.uns[keys.EMBEDDING_PARAMS]["model_dir"] = str(model_dir)
    match = match_adata(
        adata,
        tokenizer.gene_ids,
        tokenizer.gene_symbols,
        gene_col=genes["gene_col"],
        min_overlap=genes["min_gene_overlap"],
    )
    baselines = evaluate["baselines"]
    if "random" in baselines:
        adata.obsm[keys.RANDOM_BASELINE] = embed_matrix(
            random_encoder_like(model.config, seed=0),
            tokenizer,
            adata,
            match=match,
            unobserved=evaluate["unobserved"],
            progress=False,
            **options,
        )
    if "pca" in baselines:
        adata.obsm[keys.PCA_BASELINE] = pca_baseline(adata, n_components=evaluate["pca_components"])
    if "scvi" in baselines:
        started = time.perf_counter()
        adata.obsm[keys.SCVI_BASELINE] = scvi_baseline(
            adata, n_latent=evaluate["scvi_latent"], max_epochs=evaluate["scvi_max_epochs"]
        )
        log.info("scVI baseline trained in %.0f s", time.perf_counter() - started)
    seconds = adata.n_obs / adata.uns[keys.EMBEDDING_PARAMS]["cells_per_second"]
    out = io.ensure_writable_dir(Path(out_dir) / EVALUATION_DIR)
    with io.atomic_path(out / "embeddings.npy") as tmp:
        np.save(tmp, adata.obsm[keys.EMBEDDING], allow_pickle=False)
    with io.atomic_path(out / "labels.npy") as tmp:
        np.save(tmp, np.asarray(labels, dtype=str), allow_pickle=False)
    cells = pd.DataFrame({"cell": adata.obs_names, "label": labels})
    with io.atomic_path(out / "cells.tsv") as tmp:
        cells.to_csv(tmp, sep="\t", index=False)
    log.info("embedded %d cells at %.0f cells/s", adata.n_obs, adata.n_obs / max(seconds, 1e-9))
    return adata


def _report_model_table(
    model_info: dict, data_name: str, adata: ad.AnnData, notes: list[str]
) -> dict[str, Any]:
    """The report's "Model" table: which model, and how its pre-training compared with its baseline."""
    embedding = adata.uns[keys.EMBEDDING_PARAMS]
    table: dict[str, Any] = {
        "model": model_info.get("model_uri") or model_info.get("source"),
        "MLflow run of the model": model_info.get("mlflow_run_id"),
        "data": f"{data_name} ({adata.n_obs} cells × {adata.n_vars} genes)",
        "embedding": f"{embedding['pooling']} pooling over the observed genes, "
        f"{embedding['cells_per_second']:.0f} cells/s",
        "genes": (
            f"{embedding['gene_match']['n_found']} of the model's {embedding['gene_match']['n_model_genes']} "
            f"genes found among the data's {embedding['gene_match']['n_data_genes']} "
            f"(by {embedding['gene_match']['data_key']})"
        ),
    }
    if "best_val_perplexity" in model_info:
        table["pre-training validation perplexity"] = (
            f"{model_info['best_val_perplexity']:.3f} vs per-gene frequency table "
            f"{model_info['baseline_perplexity']:.3f} (ratio {model_info['perplexity_ratio']:.3f})"
        )
        table["pre-training masked accuracy"] = (
            f"{model_info['best_val_masked_accuracy']:.3f} vs {model_info['baseline_masked_accuracy']:.3f}"
        )
    if "steps" in model_info:  # a pre-training of this pipeline run
        table["pre-training"] = f"{model_info['epochs']} epochs, {model_info['steps']} steps"
    for number, note in enumerate(notes, start=1):
        table[f"note {number}"] = note
    return {key: value for key, value in table.items() if value is not None}


def method_name(method: str, evaluate: dict[str, Any]) -> str:
    """A method's name in metrics and reports: a capped scVI is ``scvi_capped``, never plain ``scvi``."""
    return "scvi_capped" if method == "scvi" and evaluate["scvi_max_epochs"] is not None else method


def _embeddings(adata: ad.AnnData, evaluate: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        method_name(method, evaluate): np.asarray(adata.obsm[key])
        for method, key in METHOD_KEYS.items()
        if key in adata.obsm
    }


@step(cache_policy=depends_on("evaluate", "plots"))
def visualize_cells(
    adata: ad.AnnData, evaluate: dict[str, Any], out_dir: str
) -> Annotated[HTMLString, "tsne_views"]:
    """t-SNE of every embedding (model and baselines) coloured by label, seeded; ``<method>/tsne.png``.

    Above ``evaluate.max_cells_visualize`` cells, on a seeded sample of that many (the same for every
    method). (UMAPs are drawn by ``probe_cells``, which reuses each method's kNN graph for them.)
    """
    import base64

    labels = resolve_labels(adata, evaluate["label_column"], evaluate["label_mapping"])
    out = Path(out_dir) / EVALUATION_DIR
    cells = compare.subsample_cells(len(labels), evaluate["max_cells_visualize"], seed=0)
    rows = slice(None) if cells is None else cells
    images = []
    for method, embedding in _embeddings(adata, evaluate).items():
        figure = visualize(
            embedding[rows], labels[rows], out / method, seed=0, name=method, methods=("tsne",)
        )
        encoded = base64.b64encode(figure.paths["tsne"].read_bytes()).decode()
        images.append(
            f"<figure style='display:inline-block;width:32%'><img src='data:image/png;base64,{encoded}' "
            f"style='width:100%'><figcaption>{method}</figcaption></figure>"
        )
    return HTMLString("<h3>t-SNE of the embeddings</h3>" + "".join(images))


@step(cache_policy=depends_on("evaluate", "plots"))
def probe_cells(
    adata: ad.AnnData,
    tsne_views: HTMLString,
    model_info: dict,
    evaluate: dict[str, Any],
    out_dir: str,
    data_name: str,
    notes: list[str] | None = None,
) -> Annotated[dict, "evaluation"]:
    """Probe, cluster and label-efficiency for the model and both baselines on one shared split.

    Writes under ``<out_dir>/evaluation``: ``baselines.csv``, ``summary.json`` (``model/…``, ``pca/…``,
    ``random/…`` metrics), ``run_meta.json``, per-method probe/cluster tables and figures, the
    label-efficiency table and plot, and ``report.md`` + ``report.html``. Returns the flat metrics,
    the report path and the class counts.
    """
    labels = resolve_labels(adata, evaluate["label_column"], evaluate["label_mapping"])
    groups = None
    if evaluate["group_column"] is not None:
        if evaluate["group_column"] not in adata.obs:
            from neurofm.errors import NeurofmError

            raise NeurofmError(
                f"group column {evaluate['group_column']!r} is not in obs (columns: {', '.join(map(str, adata.obs.columns))}); "
                "pass an existing --group-col"
            )
        groups = adata.obs[evaluate["group_column"]].astype(str).to_numpy()
    out = Path(out_dir) / EVALUATION_DIR
    result = compare.evaluate_embeddings(
        _embeddings(adata, evaluate),
        labels,
        out,
        probe_config=dataclass_from_dict(ProbeConfig, evaluate["probe"], "evaluate.probe"),
        cluster_config=dataclass_from_dict(ClusterConfig, evaluate["cluster"], "evaluate.cluster"),
        groups=groups,
        label_efficiency_shots=evaluate["label_efficiency_shots"],
        label_efficiency_draws=evaluate["label_efficiency_draws"],
        views=("umap",),
        max_cells_cluster=evaluate["max_cells_cluster"],
        max_cells_visualize=evaluate["max_cells_visualize"],
    )
    for method, method_result in result.methods.items():
        tsne = out / method / "tsne.png"
        if tsne.exists():
            method_result.paths["tsne"] = tsne
    report = compare.write_report(
        result, out, extra=_report_model_table(model_info, data_name, adata, notes or [])
    )
    return {
        "metrics": dict(result.summary),
        "strongest": result.settings["strongest_baselines"],  # per headline metric: baseline, values, margin
        "report": str(report),
        "report_html": str(report.with_suffix(".html")),
        "classes": result.class_counts,
        "out_dir": str(out),
        "notes": list(notes or []),
    }


@step(enable_cache=False)
def track_evaluation(
    evaluation: dict,
    model_info: dict,
    evaluate: dict[str, Any],
    tracking_config: dict[str, Any],
    data_name: str,
) -> Annotated[dict, "evaluation_summary"]:
    """Log the evaluation to MLflow (metrics ``model/…``, ``pca/…``, ``random/…``; figures, tables,
    report) in a run linked to the model version, and move the ``champion`` alias when
    :func:`neurofm.tracking.promote_if_better` allows it. Never cached."""
    metrics = evaluation["metrics"]
    name, version = model_info.get("model_name"), model_info.get("model_version")
    tags = {
        "neurofm.pipeline_step": "evaluate",
        "neurofm.data": data_name,
        "neurofm.model_uri": str(model_info.get("model_uri")),
    }
    if version is not None:
        tags.update({"neurofm.model_name": name, "neurofm.model_version": str(version)})
    with tracking.start_run(
        tracking_config["experiment"],
        run_name=f"evaluate-{data_name}",
        tags=tags,
        tracking_uri=tracking_config["tracking_uri"],
    ) as run:
        tracking.log_params(
            {
                "evaluate": {k: v for k, v in evaluate.items() if k != "model"},
                "model_source": model_info.get("source", model_info.get("model_uri")),
            }
        )
        tracking.log_metrics(metrics)
        tracking.log_artifacts([evaluation["out_dir"]], artifact_path="evaluation")
        promotion = "not a registered model version; no alias moved"
        if version is not None and evaluate["promote"]:
            promotion = tracking.promote_if_better(name, str(version), metrics, data_name, run.info.run_id)
        elif version is not None:
            promotion = "evaluate.promote is false; no alias moved"
        tracking.set_tags({"neurofm.promotion": promotion})
    log.info("promotion: %s", promotion)
    return {**evaluation, "promotion": promotion, "mlflow_run_id": run.info.run_id, "model": model_info}
