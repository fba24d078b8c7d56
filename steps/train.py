"""Pre-training steps: tokenize, then pretrain + track + register.

Both take the cell store's reference (``{"uri", "manifest_sha256", "n_cells", "n_genes"}``, from
``steps.data.convert_cells`` or ``store_cells``), never a whole AnnData: the cells stream from the store.

``pretrain_model`` logs one MLflow run per training (parameters, metrics per validation step, curves, CSV,
demo) and registers the best checkpoint as a new version of the registered model. When ZenML serves
it from the cache no new run is logged; its output then names the run and version it came from and
``run.py`` says so.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from zenml import step

from neurofm import tracking
from neurofm.config import dataclass_from_dict
from neurofm.data.store import open_reference
from neurofm.distributed import launch_pretrain
from neurofm.mapping import ReferenceConfig, add_reference
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from neurofm.train import TrainConfig, fit_training_tokenizer
from steps._cache import depends_on

log = logging.getLogger(__name__)


@step(cache_policy=depends_on("tokenizer", "train", "stream", "data.store"))
def tokenize(
    cells: dict[str, Any], tokenizer: dict[str, Any], train: dict[str, Any], out_dir: str
) -> Annotated[Path, "tokenizer"]:
    """Fit the tokenizer (normalise, log1p, per-gene quantile bin edges) on the training rows only.

    ``cells`` is a cell store reference. The split is the one ``pretrain`` uses (the store's validation
    rows, seeded by ``train.seed``/``train.val_fraction``/``train.max_val_cells``); edges are fit on a
    seeded sample of at most 200,000 training cells (``neurofm.train.fit_training_tokenizer``); the
    tokenizer directory (JSON + npz, no pickle) is the step's artifact and is re-applied exactly by
    training, embedding and evaluation.
    """
    config = dataclass_from_dict(TokenizerConfig, tokenizer, "tokenizer").validate()
    train_config = dataclass_from_dict(TrainConfig, train, "train").validate()
    fitted = fit_training_tokenizer(open_reference(cells), config, train_config)
    return fitted.save(Path(out_dir) / "tokenizer")


@step(
    cache_policy=depends_on(
        "tokenizer",
        "model",
        "masking",
        "checkpoints",
        "train",
        "count_head",
        "stream",
        "runtime",
        "data.store",
        "tracking",
        "plots",
        "mapping",
        "embedding",
    )
)
def pretrain_model(
    cells: dict[str, Any],
    tokenizer_dir: Path,
    model: dict[str, Any],
    train: dict[str, Any],
    tracking_config: dict[str, Any],
    out_dir: str,
    data_name: str,
    resume: bool = False,
    reference: dict[str, Any] | None = None,
) -> tuple[Annotated[Path, "model_dir"], Annotated[dict, "pretrain_summary"]]:
    """Train the masked-bin encoder on the cell store ``cells`` (a reference); log the run to MLflow
    (metrics by step, one point per validation) and register the run's model (``pretrain/model/``).

    With ``reference.label_columns`` the store's cells are embedded by the new model and their labels
    stored in the model directory as its reference (``neurofm.mapping``), before it is registered.

    Returns the run's model directory (``pretrain/model/``: weights + config + tokenizer) and a summary with the final
    metrics, the frequency-baseline perplexity, the MLflow run id and the registered version.
    """
    model_config = dataclass_from_dict(ModelConfig, model, "model")
    train_config = dataclass_from_dict(TrainConfig, train, "train")
    reference_config = dataclass_from_dict(ReferenceConfig, reference or {}, "reference")
    reference_config = replace(reference_config, label_columns=tuple(reference_config.label_columns))
    tokenizer = ExpressionTokenizer.load(tokenizer_dir)
    store = open_reference(cells)
    run_dir = Path(out_dir) / "pretrain"
    with tracking.start_run(
        tracking_config["experiment"],
        run_name=f"pretrain-{data_name}",
        tags={"neurofm.pipeline_step": "pretrain", "neurofm.data": data_name},
        tracking_uri=tracking_config["tracking_uri"],
    ) as run:
        tracking.log_params(
            {
                "tokenizer": tokenizer.config.__dict__,
                "model": model,
                "train": train,
                "data": {
                    "name": data_name,
                    "n_cells": store.n_cells,
                    "n_genes": store.n_genes,
                    "store": cells["uri"],
                    "store_manifest_sha256": cells["manifest_sha256"],
                },
            }
        )
        result = launch_pretrain(  # torchrun when train.nproc_per_node > 1, else in this process
            store,
            tokenizer,
            model_config,
            train_config,
            run_dir,
            on_validation=lambda step, metrics: tracking.log_metrics(metrics, step=step),
            resume=resume,
        )
        final = {
            "best_val_loss": result.best["val_loss"],
            "best_val_perplexity": result.best["val_perplexity"],
            "best_val_masked_accuracy": result.best["val_masked_accuracy"],
            "baseline_perplexity": result.baseline_perplexity,
            "baseline_masked_accuracy": result.baseline_masked_accuracy,
            "perplexity_ratio": result.best["val_perplexity"] / result.baseline_perplexity,
            "wall_time_s": result.wall_time_s,
        }
        if result.count_head is not None:  # the count head's own phase (neurofm.count_phase)
            final.update(
                {
                    f"count_head_{key}": float(result.count_head[key])
                    for key in (
                        "epochs",
                        "epochs_run",
                        "best_epoch",
                        "steps",
                        "seconds",
                        "val_count_loss_before",
                        "val_count_loss_after",
                    )
                }
            )
            for epoch, loss in enumerate(result.count_head.get("val_count_loss_by_epoch", []), start=1):
                tracking.log_metrics({"count_head_val_count_loss": loss}, step=epoch)  # the phase's curve
        reference_info = None
        if reference_config.label_columns:
            built = add_reference(result.model_dir, store, reference_config, source=data_name, progress=False)
            reference_info = built.describe()
            tracking.log_params({"reference": {"label_columns": list(reference_config.label_columns),
                                               "n_cells": built.n_cells}})  # fmt: skip
        tracking.log_metrics(final)
        tracking.log_artifacts(
            [p for k, p in result.artifacts.items() if k != "resume_state"], artifact_path="training"
        )
        registered = None
        if tracking_config["register"]:
            registered = tracking.log_and_register_model(
                result.model_dir,
                tracking_config["registered_model_name"],
                tags={"data": data_name, "val_perplexity": f"{final['best_val_perplexity']:.4f}"},
            )
    summary: dict[str, Any] = {
        **final,
        "epochs": result.metrics[-1]["epoch"],
        "steps": result.metrics[-1]["step"],
        "mlflow_run_id": run.info.run_id,
        "model_name": registered.name if registered else None,
        "model_version": registered.version if registered else None,
        "model_uri": registered.uri if registered else None,
        "model_dir": str(result.model_dir),
        "best_checkpoint": str(result.best_dir),
        "last_checkpoint": str(result.last_dir),
        "demo": result.demo,
        "reference": reference_info,
    }
    log.info(
        "pretrained: val perplexity %.3f vs frequency baseline %.3f (ratio %.3f); registered %s",
        final["best_val_perplexity"],
        final["baseline_perplexity"],
        final["perplexity_ratio"],
        summary["model_uri"],
    )
    return Path(result.model_dir), summary
