"""The pre-training pipeline: prepare (cached) → tokenize → pretrain (MLflow run + registered model)."""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from pipelines.prepare import prepare_steps
from pipelines.settings import step_settings
from steps.train import pretrain_model, tokenize


def pretrain_steps(config: dict[str, Any], inputs: dict[str, Any], resume: bool = False):
    """Wire prepare → tokenize → pretrain; returns (prepared cells, model dir, pretrain summary)."""
    cells = prepare_steps(config, inputs)
    tokenizer_dir = tokenize(
        cells, tokenizer=config["tokenizer"], train=config["train"], out_dir=config["data"]["out_dir"]
    )
    settings = step_settings(config).get("pretrain_model", {})
    model_dir, summary = pretrain_model.with_options(settings=settings)(
        cells,
        tokenizer_dir,
        model=config["model"],
        train=config["train"],
        tracking_config=config["tracking"],
        out_dir=config["data"]["out_dir"],
        data_name=inputs["name"],
        resume=resume,
    )
    return cells, model_dir, summary


@pipeline(enable_cache=True)
def pretrain(config: dict[str, Any], inputs: dict[str, Any], resume: bool = False) -> None:
    """Prepare the data, fit the tokenizer, pre-train and register the encoder."""
    pretrain_steps(config, inputs, resume)
