"""The evaluate pipeline's stages on one AnnData, callable without ZenML: embed the cells by every method
(the frozen model and the baselines), draw each method's t-SNE, then probe, cluster and report them all
by one protocol (:func:`neurofm.evaluate.compare.evaluate_embeddings`).

A method's embedding lives in ``adata.obsm`` under :data:`METHOD_KEYS`; its name in metrics and reports is
:func:`method_name`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from neurofm import io, keys
from neurofm.errors import NeurofmError

log = logging.getLogger(__name__)

METHOD_KEYS = {
    "model": keys.EMBEDDING,
    "pca": keys.PCA_BASELINE,
    "scvi": keys.SCVI_BASELINE,
    "random": keys.RANDOM_BASELINE,
}


def method_name(method: str, scvi_max_epochs: int | None) -> str:
    """A method's name in metrics and reports: a capped scVI is ``scvi_capped``, never plain ``scvi``."""
    return "scvi_capped" if method == "scvi" and scvi_max_epochs is not None else method


def method_embeddings(adata: ad.AnnData, scvi_max_epochs: int | None) -> dict[str, np.ndarray]:
    """``{method name: embedding}`` for every method of :data:`METHOD_KEYS` present in ``adata.obsm``."""
    return {
        method_name(method, scvi_max_epochs): np.asarray(adata.obsm[key])
        for method, key in METHOD_KEYS.items()
        if key in adata.obsm
    }


def embed_methods(
    adata: ad.AnnData,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    label_column: str,
    label_mapping: Mapping[str, str] | None,
    gene_col: str | None,
    min_gene_overlap: float,
    batch_size: int,
    pooling: str,
    unobserved: Any,
    baselines: Sequence[str],
    pca_components: int,
    scvi_latent: int,
    scvi_max_epochs: int | None,
) -> ad.AnnData:
    """Embed every cell of ``adata`` with the frozen model in ``model_dir`` and compute ``baselines``
    (``random``, ``pca``, ``scvi``); returns ``adata``, changed in place.

    Writes ``obsm['X_neurofm']`` (model), ``obsm['X_random_encoder']`` (the same architecture, random
    weights, seed 0), ``obsm['X_pca_baseline']`` (PCA on scanpy's recipe), ``obsm['X_scvi_baseline']``
    (scVI trained on these cells), ``uns['neurofm']`` (model source, gene match, pooling, cells/s) and, in
    ``out_dir``, ``embeddings.npy`` (the model's), ``labels.npy`` and ``cells.tsv`` (cell, label). The
    labels (``obs[label_column]`` through ``label_mapping``) are checked before anything is embedded.
    """
    from neurofm.embedding import embed, embed_matrix, random_encoder_like
    from neurofm.evaluate.baselines import pca_baseline, scvi_baseline
    from neurofm.evaluate.labels import resolve_labels
    from neurofm.genes import match_adata
    from neurofm.model import load_pretrained

    labels = resolve_labels(adata, label_column, label_mapping)
    model, tokenizer = load_pretrained(model_dir)
    options = {"batch_size": batch_size, "pooling": pooling}
    embed(  # writes uns['neurofm']
        adata,
        model,
        tokenizer,
        key_added=keys.EMBEDDING,
        unobserved=unobserved,
        gene_col=gene_col,
        min_gene_overlap=min_gene_overlap,
        **options,
    )
    adata.uns[keys.EMBEDDING_PARAMS]["model_dir"] = str(model_dir)
    match = match_adata(adata, tokenizer.gene_ids, tokenizer.gene_symbols, gene_col=gene_col,
                        min_overlap=min_gene_overlap)  # fmt: skip
    if "random" in baselines:
        adata.obsm[keys.RANDOM_BASELINE] = embed_matrix(
            random_encoder_like(model.config, seed=0),
            tokenizer,
            adata,
            match=match,
            unobserved=unobserved,
            progress=False,
            **options,
        )
    if "pca" in baselines:
        adata.obsm[keys.PCA_BASELINE] = pca_baseline(adata, n_components=pca_components)
    if "scvi" in baselines:
        started = time.perf_counter()
        adata.obsm[keys.SCVI_BASELINE] = scvi_baseline(
            adata, n_latent=scvi_latent, max_epochs=scvi_max_epochs
        )
        log.info("scVI baseline trained in %.0f s", time.perf_counter() - started)
    seconds = adata.n_obs / adata.uns[keys.EMBEDDING_PARAMS]["cells_per_second"]
    out = io.ensure_writable_dir(out_dir)
    with io.atomic_path(out / "embeddings.npy") as tmp:
        np.save(tmp, adata.obsm[keys.EMBEDDING], allow_pickle=False)
    with io.atomic_path(out / "labels.npy") as tmp:
        np.save(tmp, np.asarray(labels, dtype=str), allow_pickle=False)
    cells = pd.DataFrame({"cell": adata.obs_names, "label": labels})
    with io.atomic_path(out / "cells.tsv") as tmp:
        cells.to_csv(tmp, sep="\t", index=False)
    log.info("embedded %d cells at %.0f cells/s", adata.n_obs, adata.n_obs / max(seconds, 1e-9))
    return adata


def draw_tsne(
    adata: ad.AnnData,
    out_dir: str | Path,
    *,
    label_column: str,
    label_mapping: Mapping[str, str] | None,
    max_cells: int | None,
    scvi_max_epochs: int | None,
) -> dict[str, Path]:
    """A seeded t-SNE of every method's embedding coloured by label, ``<out_dir>/<method>/tsne.png``;
    above ``max_cells`` cells on a seeded sample of that many (the same for every method). Returns
    ``{method name: png path}`` in :data:`METHOD_KEYS` order."""
    from neurofm.evaluate.compare import subsample_cells
    from neurofm.evaluate.labels import resolve_labels
    from neurofm.evaluate.visualize import visualize

    labels = resolve_labels(adata, label_column, label_mapping)
    cells = subsample_cells(len(labels), max_cells, seed=0)
    rows = slice(None) if cells is None else cells
    paths = {}
    for method, embedding in method_embeddings(adata, scvi_max_epochs).items():
        figure = visualize(
            embedding[rows], labels[rows], Path(out_dir) / method, seed=0, name=method, methods=("tsne",)
        )
        paths[method] = figure.paths["tsne"]
    return paths


def model_table(
    model_info: Mapping[str, Any], data_name: str, adata: ad.AnnData, notes: Sequence[str]
) -> dict:
    """The report's "Model" table: which model, the data, the embedding and gene match
    (``uns['neurofm']``), the pre-training against its frequency table when ``model_info`` has it, the
    ``notes``; entries that are None are left out."""
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


def score_methods(
    adata: ad.AnnData,
    out_dir: str | Path,
    model_info: Mapping[str, Any],
    data_name: str,
    *,
    label_column: str,
    label_mapping: Mapping[str, str] | None,
    group_column: str | None,
    probe_config: Any,
    cluster_config: Any,
    label_efficiency_shots: Sequence[Any],
    label_efficiency_draws: int,
    max_cells_cluster: int | None,
    max_cells_visualize: int | None,
    scvi_max_epochs: int | None,
    notes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Probe, cluster and label-efficiency for every method's embedding on one shared split (groups from
    ``obs[group_column]`` when given), UMAPs, and the report with :func:`model_table` — t-SNEs drawn
    before by :func:`draw_tsne` in ``out_dir`` are linked.

    Writes under ``out_dir``: ``baselines.csv``, ``summary.json``, ``run_meta.json``, per-method
    probe/cluster tables and figures, the label-efficiency table and plot, ``report.md`` + ``report.html``.
    Returns ``{"metrics", "strongest", "report", "report_html", "classes", "out_dir", "notes"}``.
    """
    from neurofm.evaluate import compare
    from neurofm.evaluate.labels import resolve_labels

    labels = resolve_labels(adata, label_column, label_mapping)
    groups = None
    if group_column is not None:
        if group_column not in adata.obs:
            raise NeurofmError(
                f"group column {group_column!r} is not in obs (columns: {', '.join(map(str, adata.obs.columns))}); "
                "pass an existing --group-col"
            )
        groups = adata.obs[group_column].astype(str).to_numpy()
    out = Path(out_dir)
    result = compare.evaluate_embeddings(
        method_embeddings(adata, scvi_max_epochs),
        labels,
        out,
        probe_config=probe_config,
        cluster_config=cluster_config,
        groups=groups,
        label_efficiency_shots=label_efficiency_shots,
        label_efficiency_draws=label_efficiency_draws,
        views=("umap",),
        max_cells_cluster=max_cells_cluster,
        max_cells_visualize=max_cells_visualize,
    )
    for method, method_result in result.methods.items():
        tsne = out / method / "tsne.png"
        if tsne.exists():
            method_result.paths["tsne"] = tsne
    report = compare.write_report(result, out, extra=model_table(model_info, data_name, adata, notes or []))
    return {
        "metrics": dict(result.summary),
        "strongest": result.settings["strongest_baselines"],  # per headline metric: baseline, values, margin
        "report": str(report),
        "report_html": str(report.with_suffix(".html")),
        "classes": result.class_counts,
        "out_dir": str(out),
        "notes": list(notes or []),
    }
