"""Evaluation pipelines: ``evaluate`` (a registered or given model) and ``full`` (pretrain then evaluate)."""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from neurofm.config import RunConfig
from pipelines.prepare import prepare_steps
from pipelines.pretrain import pretrain_steps
from pipelines.settings import step_settings
from steps.evaluate import embed_cells, probe_cells, resolve_model, track_evaluation, visualize_cells


def evaluation_steps(
    cells, model_dir, model_info, config: RunConfig, inputs: dict[str, Any], pretrained: bool
):
    """embed → t-SNE views → probe/cluster/label-efficiency/report → MLflow + champion alias.
    ``pretrained``: the model was pre-trained by this pipeline run (its notes say how)."""
    from neurofm.runs import run_notes

    out_dir, evaluate = config.data.out_dir, config.evaluate
    settings = step_settings(config).get("embed_cells", {})
    embedded = embed_cells.with_options(settings=settings)(
        cells, model_dir, evaluate=evaluate, out_dir=out_dir
    )
    views = visualize_cells(embedded, evaluate=evaluate, out_dir=out_dir)
    evaluation = probe_cells(
        embedded,
        views,
        model_info,
        evaluate=evaluate,
        out_dir=out_dir,
        data_name=inputs["name"],
        notes=run_notes(config, inputs, pretrained),
    )
    return track_evaluation(
        evaluation,
        model_info,
        evaluate=evaluate,
        tracking_config=config.tracking,
        data_name=inputs["name"],
    )


@pipeline(enable_cache=True)
def evaluate(config: RunConfig, inputs: dict[str, Any], resume: bool = False) -> None:
    """Evaluate a model (newest registered version by default) against PCA, scVI and random-weights baselines."""
    cells = prepare_steps(config, inputs)
    model_dir, model_info = resolve_model(model=config.evaluate.model, tracking_config=config.tracking)
    evaluation_steps(cells, model_dir, model_info, config, inputs, pretrained=False)


@pipeline(enable_cache=True)
def full(config: RunConfig, inputs: dict[str, Any], resume: bool = False) -> None:
    """Pretrain then evaluate the fresh model; cached steps are reused, so re-evaluating never retrains."""
    cells, model_dir, summary = pretrain_steps(config, inputs, resume)
    evaluation_steps(cells, model_dir, summary, config, inputs, pretrained=True)
