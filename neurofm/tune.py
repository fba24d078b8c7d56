"""Optuna studies over the pre-training hyper-parameters.

The search space is YAML (``tune.space``), one entry per ``section.key`` of ``TokenizerConfig``,
``ModelConfig`` or ``TrainConfig``::

    tune:
      space:
        train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}
        model.d_model: {type: categorical, choices: [64, 96, 128]}
        model.n_layers: {type: int, low: 1, high: 4}

:func:`run_study` runs one study:

- each trial trains ``pretrain`` for ``tune.epochs`` epochs on the base configuration with the sampled
  values; a sample the configs refuse (e.g. ``d_model`` not a multiple of ``n_heads``) is pruned at once
  with the reason in the trial's ``pruned_reason`` attribute;
- a seeded TPE sampler; a median pruner on the per-epoch validation curve (see *Objectives*);
- durable storage: an Optuna journal file ``<out_dir>/study.journal`` by default (safe when a process is
  killed; one process at a time), or any Optuna storage URL (``sqlite:///…``, ``postgresql://…``);
- ``resume=True`` re-opens the study and runs only what is missing to reach ``n_trials`` finished
  (COMPLETE + PRUNED) trials; a trial left RUNNING by a killed process is marked FAIL and redone;
- the first trial of a new study is the base configuration itself (when it lies inside the space), so the
  study always holds the default to compare against;
- MLflow: one study run, one nested run per trial (tuned params, the trial's tokenizer/model/train
  settings, per-epoch metrics); the study run holds the best value/params (tags + ``best_params.json``),
  ``optimization_history.png``, ``param_importances.png`` and the best config.

Objectives (``tune.objective``):

- ``val_loss`` (minimise): the trial's lowest validation masked cross-entropy. Only comparable between
  trials that solve the same task — a space over ``tokenizer.*``, ``train.mask_ratio`` or
  ``train.max_tokens_per_cell`` changes the task (fewer bins are easier), so a warning is logged;
- ``perplexity_ratio`` (minimise): lowest validation perplexity / the per-gene frequency-table
  perplexity on the same bins and masks — comparable across bin counts;
- ``probe_auc``, ``fewshot5_f1``, ``ari_optimised`` (maximise): the embedding itself. After training,
  the validation cells are embedded with the trial's best checkpoint and scored on
  ``evaluate.label_column`` (mapped by ``evaluate.label_mapping``) by the evaluation's fair protocol:
  the probe's cross-validated ROC-AUC, the 5-shot macro-F1, or the cluster-optimised Leiden ARI (see
  :func:`neurofm.tune_objective.score_embedding_objective`). ``evaluate_fn(model_dir, adata, config)``
  replaces this scoring.

Pruning compares the per-epoch ``val_loss`` for ``val_loss`` and the per-epoch perplexity ratio
otherwise (negated for the embedding objectives, so that higher is better like the objective).

The best trial's settings are written (atomically) to ``tune.best_config_out``: a YAML that
``extends`` the pre-training config and overrides the tuned keys (and any other tokenizer/model/train
value of the base config that differs from the defaults); ``train.epochs`` stays the base's, not the
short ``tune.epochs``.

The search space (:class:`ParamSpec`, :func:`parse_space`, :func:`apply_params`) lives in
:mod:`neurofm.tune_space`, the objectives and one trial's run in :mod:`neurofm.tune_objective`; this
module runs the study and re-exports their public names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import optuna
import yaml

from neurofm import tracking
from neurofm.config import RunConfig, TuneConfig, validate, validate_section
from neurofm.errors import NeurofmError
from neurofm.io import ensure_writable_dir, write_json, write_text
from neurofm.tune_objective import EMBEDDING_OBJECTIVES, OBJECTIVES, TrialRunner, score_embedding_objective
from neurofm.tune_space import (
    FIXED_KEYS,
    TASK_KEYS,
    TUNABLE_SECTIONS,
    ParamSpec,
    apply_params,
    build_configs,
    parse_space,
)

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_OBJECTIVES",
    "FIXED_KEYS",
    "OBJECTIVES",
    "TASK_KEYS",
    "TUNABLE_SECTIONS",
    "ParamSpec",
    "StudyResult",
    "apply_params",
    "best_config_yaml",
    "build_configs",
    "count_finished",
    "fail_stale_trials",
    "open_storage",
    "parse_space",
    "run_study",
    "score_embedding_objective",
]

JOURNAL_FILE = "study.journal"
HISTORY_PNG, IMPORTANCE_PNG, BEST_PARAMS_JSON = (
    "optimization_history.png",
    "param_importances.png",
    "best_params.json",
)


# ---------------------------------------------------------------------------------------------- storage
def open_storage(storage: str | os.PathLike | None, out_dir: Path) -> tuple[optuna.storages.BaseStorage, str]:
    """``(optuna storage, description)``: a journal file for None or a path, else the storage URL."""
    if storage is not None and "://" in str(storage):
        return optuna.storages.get_storage(str(storage)), str(storage)
    path = Path(storage) if storage is not None else out_dir / JOURNAL_FILE
    ensure_writable_dir(path.parent)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path))), str(path)


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Mark trials left RUNNING by a killed process as FAIL and return their numbers; their nested
    MLflow runs become KILLED, and a stale base-configuration trial is queued again. Only safe when no
    other process is running the study (one process per study)."""
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_system_attr(trial._trial_id, "fail_reason", "process killed; redone on resume")
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            tracking.terminate_run(run_id, "KILLED")
        if trial.user_attrs.get("is_base_config"):
            study.enqueue_trial(
                trial.system_attrs.get("fixed_params") or trial.params, user_attrs={"is_base_config": True}
            )
        stale.append(trial.number)
    if stale:
        log.warning(
            "trial(s) %s were left running by a killed process: marked FAIL, they will be redone", stale
        )
    return stale


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: COMPLETE + PRUNED."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


# ---------------------------------------------------------------------------------------------- study
@dataclass
class StudyResult:
    """What :func:`run_study` found; ``best_metrics`` are the best trial's training summary."""

    study_name: str
    storage: str
    objective: str
    direction: str
    n_trials: int  # finished (COMPLETE + PRUNED) trials in the study
    n_complete: int
    n_pruned: int
    n_failed: int
    n_run_now: int  # trials started by this call
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    best_metrics: dict[str, Any]
    base_trial: dict[str, Any] | None  # trial 0 (the base configuration) when it was enqueued and finished
    best_config_path: Path | None
    mlflow_run_id: str
    artifacts: dict[str, Path] = field(default_factory=dict)


def _signature(
    adata: ad.AnnData,
    base_config: RunConfig,
    objective: str,
    specs: list[ParamSpec],
    epochs: int | None,
) -> str:
    """A short hash of what must not change when a study is resumed."""
    machine_only = ("progress", "num_threads", "device")  # may change between runs of one study
    tuned = {
        "tokenizer": base_config.section_dict("tokenizer"),
        "model": base_config.section_dict("model"),
        "train": {k: v for k, v in base_config.section_dict("train").items() if k not in machine_only},
    }
    payload = {
        "data": [adata.n_obs, adata.n_vars, list(map(str, adata.var_names[:5]))],
        "config": tuned,
        "objective": objective,
        "space": [dataclasses.asdict(spec) for spec in specs],
        "epochs": epochs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _enqueue_base(study: optuna.Study, base_config: RunConfig, specs: list[ParamSpec]) -> bool:
    """Queue the base configuration's values as the study's first trial; False if outside the space."""
    values = {}
    for spec in specs:
        section, _, key = spec.name.partition(".")
        value = getattr(getattr(base_config, section), key)
        if not spec.contains(value):
            log.info(
                "base value %s=%r lies outside the search space: the base configuration is not trial 0",
                spec.name,
                value,
            )
            return False
        values[spec.name] = value
    study.enqueue_trial(values, user_attrs={"is_base_config": True})
    return True


def best_config_yaml(
    base_config: RunConfig, params: Mapping[str, Any], extends: str | None, header: str
) -> str:
    """YAML text of the best configuration: ``extends`` + every tuned key + base tokenizer/model/train
    values that differ from the dataclass defaults (derived model keys left out)."""
    sections: dict[str, dict[str, Any]] = {}
    for section, cls in TUNABLE_SECTIONS.items():
        defaults = dataclasses.asdict(cls())
        for key, value in base_config.section_dict(section).items():
            if f"{section}.{key}" in FIXED_KEYS and key != "epochs":
                continue
            if value != defaults.get(key):
                sections.setdefault(section, {})[key] = value
    for name, value in params.items():
        section, _, key = name.partition(".")
        sections.setdefault(section, {})[key] = value
    document: dict[str, Any] = {"extends": extends} if extends else {}
    document.update({section: sections[section] for section in TUNABLE_SECTIONS if section in sections})
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            rows.append({"number": trial.number, "state": "COMPLETE", "value": trial.value})
        elif trial.state == optuna.trial.TrialState.PRUNED:
            last = (
                trial.intermediate_values[max(trial.intermediate_values)]
                if trial.intermediate_values
                else None
            )
            rows.append({"number": trial.number, "state": "PRUNED", "value": last})
    return rows


def _write_study_outputs(study: optuna.Study, objective: str, seed: int, out_dir: Path) -> dict[str, Path]:
    """History and importance plots (the latter when two or more trials completed)."""
    from neurofm.plots import plot_optimization_history, plot_param_importances

    artifacts = {
        "history_png": plot_optimization_history(
            _trial_rows(study),
            out_dir / HISTORY_PNG,
            objective=objective,
            minimize=OBJECTIVES[objective] == "minimize",
            title=f"{study.study_name}: {objective}",
        )
    }
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except (RuntimeError, ValueError) as error:  # e.g. no parameter varied among completed trials
            log.warning("parameter importances not computed: %s", error)
        else:
            if importances:
                artifacts["importance_png"] = plot_param_importances(importances, out_dir / IMPORTANCE_PNG)
                write_json(importances, out_dir / "param_importances.json")
                artifacts["importance_json"] = out_dir / "param_importances.json"
    return artifacts


def run_study(
    adata: ad.AnnData,
    base_config: RunConfig | Mapping[str, Any],
    tune_config: TuneConfig | Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike = "tune",
    *,
    objective: str | None = None,
    n_trials: int | None = None,
    storage: str | os.PathLike | None = None,
    resume: bool = True,
    study_name: str | None = None,
    seed: int | None = None,
    evaluate_fn: Callable[[Path, ad.AnnData, RunConfig], float] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    best_config_out: str | os.PathLike | None = None,
    extends: str | None = "pretrain.yaml",
    enqueue_base: bool = True,
) -> StudyResult:
    """Run (or resume) an Optuna study of ``pretrain`` on ``adata``; see the module docstring.

    ``base_config`` is a run configuration (a :class:`~neurofm.config.RunConfig`, or sections validated
    here); ``tune_config`` replaces its ``tune`` section (:class:`~neurofm.config.TuneConfig`). Keyword arguments that are not None
    override the matching ``tune`` keys. ``pruner`` replaces the median pruner (tests). Writes under
    ``out_dir``: ``study.journal`` (default storage), ``trials/trial_NNNN/`` (each trial's ``pretrain``
    outputs), ``optimization_history.png``, ``param_importances.png/.json``, ``best_params.json``, and
    the best configuration at ``best_config_out`` (``tune.best_config_out``; None there → not written),
    extending ``extends`` (relative to that file). Returns a :class:`StudyResult`.
    """
    base_config = validate(base_config)
    overrides = {
        "objective": objective,
        "n_trials": n_trials,
        "storage": storage,
        "study_name": study_name,
        "seed": seed,
        "best_config_out": best_config_out,
    }
    settings = _study_settings(base_config, tune_config, overrides)
    objective, n_trials, epochs = settings.objective, settings.n_trials, settings.epochs
    specs = parse_space(settings.space)
    _check_objective(adata, base_config, objective, specs, evaluate_fn)
    out_dir = ensure_writable_dir(out_dir)
    study, storage_text = _open_study(adata, base_config, settings, specs, out_dir, resume, pruner)
    if not study.trials and enqueue_base:
        _enqueue_base(study, base_config, specs)

    remaining = n_trials - count_finished(study)
    runner = TrialRunner(adata, base_config, specs, objective, epochs, out_dir, evaluate_fn)
    log.info(
        "study %s (%s): %d of %d trials finished, %d to run; storage %s",
        study.study_name,
        objective,
        count_finished(study),
        n_trials,
        max(remaining, 0),
        storage_text,
    )
    tracking_config = base_config.tracking
    with tracking.start_or_resume_run(
        tracking_config.experiment,
        run_id=study.user_attrs.get("mlflow_run_id"),
        run_name=f"tune-{study.study_name}",
        tags={"neurofm.pipeline_step": "tune", "optuna.study_name": study.study_name},
        tracking_uri=tracking_config.tracking_uri,
    ) as run:
        study.set_user_attr("mlflow_run_id", run.info.run_id)
        _log_study_params(settings, specs, base_config, storage_text)
        n_before = _count_ended(study)
        if remaining > 0:
            study.optimize(runner.run_trial, n_trials=remaining, gc_after_trial=True)
        n_run_now = _count_ended(study) - n_before
        result = _summarise(
            study, settings, base_config, storage_text, n_run_now, run.info.run_id, extends, out_dir
        )
        _log_study_result(study, result)
    return result


def _study_settings(
    base_config: RunConfig, tune_config: TuneConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> TuneConfig:
    """The ``tune`` settings: ``tune_config`` (else the base configuration's ``tune``), then the
    ``overrides`` that are not None; refuses an unknown objective, ``n_trials`` below 1 and ``epochs``
    that is neither null nor at least 1."""
    if tune_config is None:
        tune_config = base_config.tune
    values = tune_config.model_dump() if isinstance(tune_config, TuneConfig) else dict(tune_config)
    values.update({key: value for key, value in overrides.items() if value is not None})
    settings = validate_section("tune", values)
    objective, n_trials, epochs = settings.objective, settings.n_trials, settings.epochs
    if objective not in OBJECTIVES:
        raise NeurofmError(f"tune.objective={objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise NeurofmError(f"tune.n_trials={n_trials!r} must be an integer >= 1; e.g. --trials 20")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise NeurofmError(f"tune.epochs={epochs!r} must be an integer >= 1 or null (train.epochs)")
    return settings


def _check_objective(
    adata: ad.AnnData,
    base_config: RunConfig,
    objective: str,
    specs: list[ParamSpec],
    evaluate_fn: Callable[[Path, ad.AnnData, RunConfig], float] | None,
) -> None:
    """Warn when ``val_loss`` is compared across trials that change the task itself; refuse an embedding
    objective (scored by neurofm) whose labels cannot be resolved from ``adata``, before any training."""
    task_keys = [spec.name for spec in specs if spec.name.startswith(TASK_KEYS)]
    if objective == "val_loss" and task_keys:
        log.warning(
            "objective val_loss with %s in the space: these change the task itself, so losses are not "
            "comparable across trials; consider objective perplexity_ratio or an embedding objective",
            task_keys,
        )
    if objective in EMBEDDING_OBJECTIVES and evaluate_fn is None:
        from neurofm.evaluate.labels import resolve_labels

        resolve_labels(adata, base_config.evaluate.label_column, base_config.evaluate.label_mapping)


def _open_study(
    adata: ad.AnnData,
    base_config: RunConfig,
    settings: TuneConfig,
    specs: list[ParamSpec],
    out_dir: Path,
    resume: bool,
    pruner: optuna.pruners.BasePruner | None,
) -> tuple[optuna.Study, str]:
    """``(study, storage description)``: the study created, or loaded to resume, ready to optimise.

    Refuses an existing study when ``resume`` is off, and one run with other data, base settings,
    objective, space or epochs (the signature stored in its user attributes). Sets a TPE sampler seeded
    by ``seed`` + the number of trials so far (a resumed study does not repeat earlier samples), the
    pruner (``pruner`` or a median pruner from ``settings``), and fails trials a killed process left
    running.
    """
    optuna_storage, storage_text = open_storage(settings.storage, out_dir)
    name = settings.study_name
    signature = _signature(adata, base_config, settings.objective, specs, settings.epochs)
    existing = {summary.study_name for summary in optuna.get_all_study_summaries(optuna_storage)}
    if name in existing and not resume:
        raise NeurofmError(
            f"study {name!r} already exists in {storage_text}; resume it, or pick another tune.study_name"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=optuna_storage,
        study_name=name,
        direction=OBJECTIVES[settings.objective],
        load_if_exists=True,
    )
    saved = study.user_attrs.get("neurofm_signature")
    if saved is not None and saved != signature:
        raise NeurofmError(
            f"study {name!r} in {storage_text} was run with other data, base settings, objective, space or "
            "epochs; resume with the same ones or pick another tune.study_name"
        )
    study.set_user_attr("neurofm_signature", signature)
    study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.trials))
    study.pruner = pruner or optuna.pruners.MedianPruner(**settings.pruner.model_dump())
    fail_stale_trials(study, optuna_storage)
    return study, storage_text


def _log_study_params(
    settings: TuneConfig, specs: list[ParamSpec], base_config: RunConfig, storage_text: str
) -> None:
    """Log the study's settings (``tune.*``) and the base configuration (``base.*``) to the active run."""
    tracking.log_params(
        {
            "tune": {
                "objective": settings.objective,
                "direction": OBJECTIVES[settings.objective],
                "seed": settings.seed,
                "epochs": settings.epochs,
                "storage": storage_text,
                "space": json.dumps({s.name: dataclasses.asdict(s) for s in specs}),
            },
            "base": {section: base_config.section_dict(section) for section in TUNABLE_SECTIONS},
        }
    )


def _log_study_result(study: optuna.Study, result: StudyResult) -> None:
    """Log the best trial (tags ``best.*``, metrics ``best_*``), every completed trial's value and the
    study's files to the active run."""
    tracking.set_tags(
        {
            "best.trial": result.best_trial,
            "best.value": result.best_value,
            **{f"best.{k}": v for k, v in result.best_params.items()},
        }
    )
    tracking.log_metrics(
        {
            "best_value": result.best_value,
            "n_complete": result.n_complete,
            "n_pruned": result.n_pruned,
            **{f"best_{k}": v for k, v in result.best_metrics.items()},
        },
        step=result.n_trials,
    )
    for row in _trial_rows(study):
        if row["state"] == "COMPLETE":
            tracking.log_metrics({"trial_value": row["value"]}, step=row["number"])
    tracking.log_artifacts(list(result.artifacts.values()), artifact_path="study")
    if result.best_config_path is not None:
        tracking.log_artifacts([result.best_config_path], artifact_path="study")


def _count_ended(study: optuna.Study) -> int:
    return sum(trial.state.is_finished() for trial in study.get_trials(deepcopy=False))


def _summarise(
    study: optuna.Study,
    settings: TuneConfig,
    base_config: RunConfig,
    storage_text: str,
    n_run_now: int,
    run_id: str,
    extends: str | None,
    out_dir: Path,
) -> StudyResult:
    """The :class:`StudyResult` of a study with at least one completed trial; writes its plots,
    ``best_params.json`` and (with ``settings.best_config_out``) the best configuration's YAML."""
    objective, seed = settings.objective, settings.seed
    states = [trial.state for trial in study.trials]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise NeurofmError(
            f"study {study.study_name!r} has no completed trial (all pruned or failed); widen the space, "
            "raise tune.epochs or tune.pruner.n_warmup_steps, and run again"
        )
    best = study.best_trial
    metrics = _numeric_attrs(best)
    base_trial = _base_trial(study)
    artifacts = _write_study_outputs(study, objective, seed, out_dir)
    best_record = {
        "study": study.study_name,
        "objective": objective,
        "trial": best.number,
        "value": best.value,
        "params": best.params,
        "metrics": metrics,
        "base_trial": base_trial,
    }
    artifacts["best_params_json"] = write_json(best_record, out_dir / BEST_PARAMS_JSON)
    config_path = None
    if settings.best_config_out:
        header = (
            f"# Written by neurofm tune: study {study.study_name!r}, best of {len(complete)} completed "
            f"trials = trial {best.number},\n# {objective} {best.value:.4f}"
            f" after {settings.epochs or base_config.train.epochs} epochs per trial.\n"
            "# python run.py --pipeline pretrain --config <this file>\n"
        )
        text = best_config_yaml(base_config, best.params, extends, header)
        config_path = write_text(text, settings.best_config_out)
    return StudyResult(
        study_name=study.study_name,
        storage=storage_text,
        objective=objective,
        direction=OBJECTIVES[objective],
        n_trials=count_finished(study),
        n_complete=len(complete),
        n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
        n_run_now=n_run_now,
        best_trial=best.number,
        best_value=float(best.value),
        best_params=dict(best.params),
        best_metrics=metrics,
        base_trial=base_trial,
        best_config_path=Path(config_path) if config_path else None,
        mlflow_run_id=run_id,
        artifacts=artifacts,
    )


def _numeric_attrs(trial: optuna.trial.FrozenTrial) -> dict[str, int | float]:
    """The trial's numeric user attributes (its training summary and objective), booleans left out."""
    return {
        k: v for k, v in trial.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _base_trial(study: optuna.Study) -> dict[str, Any] | None:
    """Number, state, value and numeric attributes of the finished base-configuration trial, or None."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    base = next(
        (t for t in study.get_trials(deepcopy=False, states=finished) if t.user_attrs.get("is_base_config")),
        None,
    )
    if base is None:
        return None
    return {"number": base.number, "state": base.state.name, "value": base.value, **_numeric_attrs(base)}
