"""The reference-mapping pipeline: a query mapped onto a pre-trained model's reference (no retraining).

python run.py --pipeline map --model outputs/pretrain/model --data query.h5ad [--label-col L] [--batch-col B]
"""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from neurofm.config import RunConfig
from steps.evaluate import resolve_model
from steps.mapping import map_query_cells, score_mapping, track_mapping


@pipeline(enable_cache=True)
def map(config: RunConfig, inputs: dict[str, Any], resume: bool = False) -> None:  # noqa: A001
    """resolve the model → map the query (new .h5ad) → with true labels, score beside the baselines → MLflow."""
    settings, out_dir = config.map, config.data.out_dir
    model_dir, model_info = resolve_model(model=settings.model, tracking_config=config.tracking)
    mapping = map_query_cells(
        model_dir,
        query_path=inputs["path"],
        fingerprint=inputs["fingerprint"],
        settings=settings,
        out_dir=out_dir,
        data_name=inputs["name"],
    )
    scores = score_mapping(mapping, model_dir, settings=settings, out_dir=out_dir)
    track_mapping(
        mapping,
        scores,
        model_info,
        settings=settings,
        tracking_config=config.tracking,
        data_name=inputs["name"],
    )
