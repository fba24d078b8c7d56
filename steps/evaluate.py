"""Evaluation steps: resolve the model, embed, visualize, probe + cluster + report, track + promote.

Every number is computed for the model's embeddings and, in the same run and on the same split,
for two baselines: PCA of log-normalised counts and the same architecture with random weights.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

import anndata as ad
from zenml import step
from zenml.types import HTMLString

from neurofm import tracking
from neurofm.config import EvaluateConfig, TrackingConfig
from neurofm.evaluate.methods import draw_tsne, embed_methods, score_methods
from steps._cache import depends_on

EVALUATION_DIR = "evaluation"


@step(enable_cache=False)
def resolve_model(
    model: str | None, tracking_config: TrackingConfig
) -> tuple[Annotated[Path, "model_dir"], Annotated[dict, "model_info"]]:
    """Find the model to evaluate: a directory, an MLflow URI, or (None) the newest registered version.

    Never cached: the registry's ``newest`` alias moves with every pre-training.
    """
    model_dir, info = tracking.resolve_model_info(
        model, tracking_config.registered_model_name, tracking_config.tracking_uri
    )
    return model_dir, info


@step(
    cache_policy=depends_on(
        "model",
        "model_config",
        "count_head",
        "pooling",
        "tokenizer",
        "genes",
        "registry",
        "embedding",
        "evaluate",
    )
)
def embed_cells(
    adata: ad.AnnData, model_dir: Path, evaluate: EvaluateConfig, out_dir: str
) -> Annotated[ad.AnnData, "embedded_cells"]:
    """Embed every cell with the frozen model and compute the baselines ``evaluate.baselines`` names.

    Writes ``obsm['X_neurofm']`` (model), ``obsm['X_pca_baseline']`` (PCA on scanpy's recipe),
    ``obsm['X_scvi_baseline']`` (scVI trained on these cells), ``obsm['X_random_encoder']`` (same
    architecture, random weights), ``uns['neurofm']`` (model source, gene match, pooling, cells/s) and,
    under ``<out_dir>/evaluation``, ``embeddings.npy``, ``labels.npy``, ``cells.tsv``.
    """
    return embed_methods(
        adata, model_dir, Path(out_dir) / EVALUATION_DIR, label_column=evaluate.label_column,
        label_mapping=evaluate.label_mapping, gene_col=evaluate.gene_column,
        min_gene_overlap=evaluate.min_gene_overlap, batch_size=evaluate.batch_size, pooling=evaluate.pooling,
        unobserved=evaluate.unobserved, baselines=evaluate.baselines, pca_components=evaluate.pca_components,
        scvi_latent=evaluate.scvi_latent, scvi_max_epochs=evaluate.scvi_max_epochs,
    )  # fmt: skip


def _figure(png: Path, caption: str) -> str:
    """One PNG inlined in the step's HTML visualization (the ZenML dashboard)."""
    encoded = base64.b64encode(Path(png).read_bytes()).decode()
    return (
        f"<figure style='display:inline-block;width:32%'><img src='data:image/png;base64,{encoded}' "
        f"style='width:100%'><figcaption>{caption}</figcaption></figure>"
    )


@step(cache_policy=depends_on("evaluate", "plots"))
def visualize_cells(
    adata: ad.AnnData, evaluate: EvaluateConfig, out_dir: str
) -> Annotated[HTMLString, "tsne_views"]:
    """t-SNE of every embedding (model and baselines) coloured by label, seeded; ``<method>/tsne.png``.

    Above ``evaluate.max_cells_visualize`` cells, on a seeded sample of that many (the same for every
    method). (UMAPs are drawn by ``probe_cells``, which reuses each method's kNN graph for them.)
    """
    paths = draw_tsne(
        adata, Path(out_dir) / EVALUATION_DIR, label_column=evaluate.label_column,
        label_mapping=evaluate.label_mapping, max_cells=evaluate.max_cells_visualize,
        scvi_max_epochs=evaluate.scvi_max_epochs,
    )  # fmt: skip
    return HTMLString(
        "<h3>t-SNE of the embeddings</h3>" + "".join(_figure(png, name) for name, png in paths.items())
    )


@step(cache_policy=depends_on("evaluate", "plots"))
def probe_cells(
    adata: ad.AnnData,
    tsne_views: HTMLString,
    model_info: dict,
    evaluate: EvaluateConfig,
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
    return score_methods(
        adata, Path(out_dir) / EVALUATION_DIR, model_info, data_name, label_column=evaluate.label_column,
        label_mapping=evaluate.label_mapping, group_column=evaluate.group_column,
        probe_config=evaluate.probe, cluster_config=evaluate.cluster,
        label_efficiency_shots=evaluate.label_efficiency_shots,
        label_efficiency_draws=evaluate.label_efficiency_draws, max_cells_cluster=evaluate.max_cells_cluster,
        max_cells_visualize=evaluate.max_cells_visualize, scvi_max_epochs=evaluate.scvi_max_epochs,
        notes=notes,
    )  # fmt: skip


@step(enable_cache=False)
def track_evaluation(
    evaluation: dict,
    model_info: dict,
    evaluate: EvaluateConfig,
    tracking_config: TrackingConfig,
    data_name: str,
) -> Annotated[dict, "evaluation_summary"]:
    """Log the evaluation to MLflow (metrics ``model/…``, ``pca/…``, ``random/…``; figures, tables,
    report) in a run linked to the model version, and move the ``champion`` alias when
    :func:`neurofm.tracking.promote_if_better` allows it. Never cached."""
    return tracking.log_evaluation(evaluation, model_info, evaluate, tracking_config, data_name)
