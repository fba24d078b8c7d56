"""A tuning study's objectives and one trial (:mod:`neurofm.tune`): the objective directions, the
embedding objectives scored by the evaluation's protocol (:func:`score_embedding_objective`), the
per-epoch value the pruner compares, and :class:`TrialRunner`, which trains one sampled configuration in a
nested MLflow run and returns its objective value."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import optuna

from neurofm import tracking
from neurofm.config import TUNE_OBJECTIVES, RunConfig
from neurofm.distributed import launch_pretrain
from neurofm.errors import NeurofmError
from neurofm.train import TrainResult
from neurofm.training_data import validation_source_rows
from neurofm.tune_space import ParamSpec, apply_params, build_configs

log = logging.getLogger(__name__)

OBJECTIVES = TUNE_OBJECTIVES  # objective → Optuna's direction, defined once in neurofm.config
EMBEDDING_OBJECTIVES = ("probe_auc", "fewshot5_f1", "ari_optimised")  # scored on embedded validation cells


def score_embedding_objective(
    objective: str, model_dir: str | os.PathLike, adata: ad.AnnData, config: RunConfig
) -> float:
    """An embedding objective of the model in ``model_dir``, scored on the cells ``pretrain`` held out.

    The validation cells are those ``pretrain`` held out (``validation_source_rows``: the cell store's
    validation rows for ``train.seed``/``train.val_fraction``/``train.max_val_cells``), embedded with the
    model (``evaluate.pooling``/``batch_size``); labels are ``evaluate.label_column`` mapped through
    ``evaluate.label_mapping``. The scoring is the evaluation's own fair protocol (the classifier menu
    picked on labelled cells only, ``evaluate.probe`` settings, ``evaluate.cluster`` settings):

    - ``probe_auc``: the mean cross-validated probe ROC-AUC (the hold-out AUC when CV is off or undefined);
    - ``fewshot5_f1``: macro-F1 of probes fit on 5 labelled cells per class, mean over
      ``evaluate.label_efficiency_draws`` draws, scored on the held-out part of the validation cells;
    - ``ari_optimised``: the cluster-optimised Leiden ARI (best over the resolution sweep).
    """
    from neurofm.embedding import embed_matrix
    from neurofm.evaluate.cluster import cluster_embedding
    from neurofm.evaluate.label_efficiency import label_efficiency
    from neurofm.evaluate.labels import resolve_labels
    from neurofm.evaluate.probe import run_probe
    from neurofm.model import load_pretrained

    if objective not in EMBEDDING_OBJECTIVES:
        raise NeurofmError(f"{objective!r} is not an embedding objective; use one of {EMBEDDING_OBJECTIVES}")
    evaluate = config.evaluate
    val_idx = validation_source_rows(adata, config.train)
    cells = adata[val_idx].copy()
    labels = resolve_labels(cells, evaluate.label_column, evaluate.label_mapping)
    model, tokenizer = load_pretrained(model_dir)
    embedding = embed_matrix(
        model,
        tokenizer,
        cells,
        batch_size=evaluate.batch_size,
        pooling=evaluate.pooling,
        device=config.train.device,
        progress=False,
    )
    probe_config = evaluate.probe
    if objective == "probe_auc":
        result = run_probe(embedding, labels, probe_config)
        cv_auc = result.metrics()["probe_cv_auc_mean"]
        return float(cv_auc) if math.isfinite(cv_auc) else float(result.roc_auc)
    if objective == "fewshot5_f1":
        table = label_efficiency(
            {"model": embedding}, labels, shots=[5], n_draws=evaluate.label_efficiency_draws,
            probe_config=probe_config,
        )  # fmt: skip
        return float(table["f1_mean"].iloc[0])
    clusters = cluster_embedding(embedding, labels, **dataclasses.asdict(evaluate.cluster))
    return float(clusters.metrics()["ari_optimised"])


def _intermediate(metrics: Mapping[str, float], objective: str) -> float:
    """The per-epoch value the pruner compares (same direction as the objective)."""
    if objective == "val_loss":
        return float(metrics["val_loss"])
    ratio = float(metrics["val_perplexity"]) / float(metrics["baseline_perplexity"])
    return -ratio if OBJECTIVES[objective] == "maximize" else ratio


def _trial_summary(result: TrainResult) -> dict[str, float]:
    best = result.best
    return {
        "best_val_loss": best["val_loss"],
        "best_val_perplexity": best["val_perplexity"],
        "best_val_masked_accuracy": best["val_masked_accuracy"],
        "baseline_perplexity": result.baseline_perplexity,
        "perplexity_ratio": best["val_perplexity"] / result.baseline_perplexity,
        "best_epoch": best["epoch"],
        "wall_time_s": result.wall_time_s,
    }


@dataclass
class TrialRunner:
    """What every trial of one study shares."""

    adata: ad.AnnData
    base_config: RunConfig
    specs: list[ParamSpec]
    objective: str
    epochs: int | None
    out_dir: Path
    evaluate_fn: Callable[[Path, ad.AnnData, RunConfig], float] | None

    def run_trial(self, trial: optuna.Trial) -> float:
        """Train one sampled configuration inside a nested MLflow run; returns the objective value."""
        params = {spec.name: spec.suggest(trial) for spec in self.specs}
        budget = {"train.epochs": self.epochs} if self.epochs is not None else {}
        config = apply_params(self.base_config, {**params, **budget, "train.progress": False})
        tracking_config = config.tracking
        pruned: optuna.TrialPruned | None = None
        with tracking.start_run(
            tracking_config.experiment,
            run_name=f"trial-{trial.number}",
            tags={"neurofm.pipeline_step": "tune-trial", "optuna.trial_number": str(trial.number)},
            nested=True,
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_params(
                {section: config.section_dict(section) for section in ("tokenizer", "model", "train")}
            )
            try:
                value = self._train_and_score(trial, config, params)
                tracking.set_tags({"optuna.state": "COMPLETE"})
            except optuna.TrialPruned as error:
                pruned = error
                trial.set_user_attr("pruned_reason", str(error))
                tracking.set_tags({"optuna.state": "PRUNED", "optuna.pruned_reason": str(error)})
        if pruned is not None:
            log.info("trial %d pruned: %s", trial.number, pruned)
            raise pruned
        return value

    def _train_and_score(self, trial: optuna.Trial, config: RunConfig, params: dict) -> float:
        try:
            tokenizer_config, model_config, train_config = build_configs(config)
        except NeurofmError as error:
            raise optuna.TrialPruned(
                f"invalid combination {params}: {str(error).split(' (got')[0]}"
            ) from None

        def on_validation(step: int, metrics: dict) -> None:  # once per validation
            tracking.log_metrics(metrics, step=step)
            trial.report(_intermediate(metrics, self.objective), step)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"step {step}: val_loss {metrics['val_loss']:.4f} (ratio "
                    f"{metrics['val_perplexity'] / metrics['baseline_perplexity']:.4f}) worse than the "
                    "median of earlier trials"
                )

        result = launch_pretrain(  # torchrun when train.nproc_per_node > 1
            self.adata,
            None,
            model_config,
            train_config,
            self.out_dir / "trials" / f"trial_{trial.number:04d}",
            on_validation=on_validation,
            tokenizer_config=tokenizer_config,
        )
        summary = _trial_summary(result)
        if self.objective == "val_loss":
            value = summary["best_val_loss"]
        elif self.objective == "perplexity_ratio":
            value = summary["perplexity_ratio"]
        elif self.evaluate_fn is not None:
            value = float(self.evaluate_fn(result.model_dir, self.adata, config))
            summary[self.objective] = value
        else:
            value = score_embedding_objective(self.objective, result.model_dir, self.adata, config)
            summary[self.objective] = value
        for key, number in summary.items():
            trial.set_user_attr(key, number)
        trial.set_user_attr("model_dir", str(result.model_dir))
        tracking.log_metrics({**summary, "objective": value})
        return value
