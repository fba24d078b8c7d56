"""One tracked pre-training, as the ``pretrain`` pipeline runs it: an MLflow run around
:func:`neurofm.distributed.launch_pretrain`, the model's reference, the registered version.

:func:`pretrain_and_register` is the body of the ``steps.train.pretrain_model`` step, callable without
ZenML: it logs the run's parameters, one metrics point per validation (and the count head's phase curve),
the final metrics and the training artifacts, stores the reference when ``reference.label_columns``
names columns, registers ``pretrain/model/`` and returns its summary (:func:`pretrain_summary`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurofm import tracking
from neurofm.data.store import CellStore
from neurofm.distributed import launch_pretrain
from neurofm.mapping import ReferenceConfig, add_reference
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from neurofm.train import TrainConfig, TrainResult

if TYPE_CHECKING:
    from neurofm.config import TrackingConfig

log = logging.getLogger(__name__)

RUN_DIR = "pretrain"  # <out_dir>/pretrain: the run's checkpoints and its model (pretrain/model/)
COUNT_HEAD_METRICS = (
    "epochs",
    "epochs_run",
    "best_epoch",
    "steps",
    "seconds",
    "val_count_loss_before",
    "val_count_loss_after",
)  # the count head's phase (neurofm.count_phase), logged as count_head_<key>


def final_metrics(result: TrainResult) -> dict[str, float]:
    """The run's final metrics: the best validation against the per-gene frequency table, the wall time
    and, when the count head had its own phase, ``count_head_<key>`` for each of :data:`COUNT_HEAD_METRICS`."""
    best = result.best
    final = {
        "best_val_loss": best["val_loss"],
        "best_val_perplexity": best["val_perplexity"],
        "best_val_masked_accuracy": best["val_masked_accuracy"],
        "baseline_perplexity": result.baseline_perplexity,
        "baseline_masked_accuracy": result.baseline_masked_accuracy,
        "perplexity_ratio": best["val_perplexity"] / result.baseline_perplexity,
        "wall_time_s": result.wall_time_s,
    }
    if result.count_head is not None:
        final.update({f"count_head_{key}": float(result.count_head[key]) for key in COUNT_HEAD_METRICS})
    return final


def pretrain_summary(
    result: TrainResult,
    final: Mapping[str, float],
    run_id: str,
    registered: Any = None,
    reference: dict | None = None,
) -> dict[str, Any]:
    """What a pre-training returns: ``final`` plus the epochs and steps run, the MLflow run id, the registered
    version (``model_name``/``model_version``/``model_uri``, None when not registered), the model and
    checkpoint directories, the demo text and the reference's description (None without one)."""
    return {
        **final,
        "epochs": result.metrics[-1]["epoch"],
        "steps": result.metrics[-1]["step"],
        "mlflow_run_id": run_id,
        "model_name": registered.name if registered else None,
        "model_version": registered.version if registered else None,
        "model_uri": registered.uri if registered else None,
        "model_dir": str(result.model_dir),
        "best_checkpoint": str(result.best_dir),
        "last_checkpoint": str(result.last_dir),
        "demo": result.demo,
        "reference": reference,
    }


def _run_params(tokenizer, logged_config: Mapping[str, Any], data_name: str, store: CellStore,
                store_record: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The pre-training run's parameters: the tokenizer, model and train sections, and the data."""
    return {
        "tokenizer": tokenizer.config.__dict__,
        "model": logged_config["model"],
        "train": logged_config["train"],
        "data": {
            "name": data_name,
            "n_cells": store.n_cells,
            "n_genes": store.n_genes,
            "store": store_record["uri"],
            "store_manifest_sha256": store_record["manifest_sha256"],
        },
    }


def _attach_reference(model_dir, store: CellStore, config: ReferenceConfig, data_name: str) -> dict | None:
    """With ``config.label_columns``: the store's cells stored as the new model's reference, its params
    logged to the active run; returns the reference's description (None without label columns)."""
    if not config.label_columns:
        return None
    built = add_reference(model_dir, store, config, source=data_name, progress=False)
    tracking.log_params(
        {"reference": {"label_columns": list(config.label_columns), "n_cells": built.n_cells}}
    )
    return built.describe()


def pretrain_and_register(
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    data_name: str,
    tracking_config: TrackingConfig,
    *,
    reference_config: ReferenceConfig | None = None,
    resume: bool = False,
    logged_config: Mapping[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Pre-train on ``store`` into ``<out_dir>/pretrain`` inside one MLflow run and register its model.

    ``tracking_config``: ``experiment``, ``tracking_uri``, ``register`` and ``registered_model_name`` (the
    ``tracking`` section). The run (named ``pretrain-<data_name>``) gets the parameters ``tokenizer.*``,
    ``model.*`` and ``train.*`` (from ``logged_config``, the sections as the configuration gave them;
    default: every field of the two dataclasses) and ``data.*`` (name, size, the store's URI and manifest
    SHA-256); one metrics point per validation; ``count_head_val_count_loss`` per epoch of the count
    head's phase; :func:`final_metrics`; the training artifacts (``training/``, not the resume state).
    With ``reference_config.label_columns`` the store's cells are embedded by the new model and stored as
    its reference (``neurofm.mapping.add_reference``; params ``reference.*``) before it is registered
    (when ``tracking_config.register``; tags ``data`` and ``val_perplexity``).

    Returns the model directory (``pretrain/model/``) and :func:`pretrain_summary`.
    """
    reference_config = reference_config or ReferenceConfig()
    reference_config = replace(reference_config, label_columns=tuple(reference_config.label_columns))
    if logged_config is None:
        logged_config = {"model": asdict(model_config), "train": asdict(train_config)}
    store_record = store.reference()
    run_dir = Path(out_dir) / RUN_DIR
    with tracking.start_run(
        tracking_config.experiment,
        run_name=f"pretrain-{data_name}",
        tags={"neurofm.pipeline_step": "pretrain", "neurofm.data": data_name},
        tracking_uri=tracking_config.tracking_uri,
    ) as run:
        tracking.log_params(_run_params(tokenizer, logged_config, data_name, store, store_record))
        result = launch_pretrain(  # torchrun when train.nproc_per_node > 1, else in this process
            store,
            tokenizer,
            model_config,
            train_config,
            run_dir,
            on_validation=lambda step, metrics: tracking.log_metrics(metrics, step=step),
            resume=resume,
        )
        final = final_metrics(result)
        if result.count_head is not None:  # the count head's phase curve
            for epoch, loss in enumerate(result.count_head.get("val_count_loss_by_epoch", []), start=1):
                tracking.log_metrics({"count_head_val_count_loss": loss}, step=epoch)
        reference_info = _attach_reference(result.model_dir, store, reference_config, data_name)
        tracking.log_metrics(final)
        tracking.log_artifacts(
            [p for k, p in result.artifacts.items() if k != "resume_state"], artifact_path="training"
        )
        registered = None
        if tracking_config.register:
            registered = tracking.log_and_register_model(
                result.model_dir,
                tracking_config.registered_model_name,
                tags={"data": data_name, "val_perplexity": f"{final['best_val_perplexity']:.4f}"},
            )
    summary = pretrain_summary(result, final, run.info.run_id, registered, reference_info)
    log.info(
        "pretrained: val perplexity %.3f vs frequency baseline %.3f (ratio %.3f); registered %s",
        final["best_val_perplexity"],
        final["baseline_perplexity"],
        final["perplexity_ratio"],
        summary["model_uri"],
    )
    return Path(result.model_dir), summary
