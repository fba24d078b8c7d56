"""MLflow calls, in one place.

Everything neurofm logs goes through here: the tracking store set-up (an embedded SQLite store under
the project's home by default, or any tracking server URI from config), runs, parameters, metrics,
artifacts, and the model registry (log + register a model directory, aliases, champion metrics).

A model is logged as an MLflow *pyfunc* "model from code" (``neurofm/mlflow_model.py``) whose only
artifact is the neurofm model directory (safetensors weights + config JSON + tokenizer), so nothing
in the registry is pickled and neurofm reloads the exact directory with :func:`resolve_model_dir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurofm.registry import (  # noqa: F401  (the registry's names, reached through tracking by steps)
    CHAMPION_ALIAS,
    NEWEST_ALIAS,
    RegisteredModel,
    configure,
    default_tracking_uri,
    model_version_for,
    neurofm_home,
    resolve_model_dir,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

if TYPE_CHECKING:
    from neurofm.config import EvaluateConfig, MapConfig, TrackingConfig

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"  # where the pyfunc model lives inside a run
MODEL_DIR_ARTIFACT = "neurofm_model"  # the pyfunc artifact key holding the neurofm directory


def _artifact_root() -> str | None:
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def ensure_experiment(name: str) -> str:
    """Return the id of experiment ``name``, creating it (with a project-local artifact root)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root())
    except MlflowException:  # created concurrently by another run
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    nested: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or join) an MLflow run.

    When a run is already active and ``nested`` is false — ZenML's MLflow experiment tracker opens
    one around a step when the active stack has it — that run is used and left open; otherwise a
    new run is started in ``experiment`` and ended on exit (status FAILED on an exception).
    """
    active = mlflow.active_run()
    if active is not None and not nested:
        if tags:
            mlflow.set_tags(dict(tags))
        yield active
        return
    if active is None:
        configure(tracking_uri)
    experiment_id = ensure_experiment(experiment)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {}), nested=nested
    ) as run:
        yield run


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into ``section.key`` names (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    flat = {k: (str(v)[:6000] if v is not None else "None") for k, v in flatten(params).items()}
    existing = mlflow.active_run().data.params if mlflow.active_run() else {}
    mlflow.log_params({k: v for k, v in flat.items() if k not in existing})


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of ``metrics`` (others are skipped)."""
    numeric = {
        k.replace("@", "_at_"): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    }
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_artifacts(paths: Mapping[str, str | os.PathLike] | list, artifact_path: str | None = None) -> None:
    """Log files or directories; a mapping puts each under its own artifact sub-path."""
    items = paths.items() if isinstance(paths, Mapping) else [(artifact_path, p) for p in paths]
    for sub_path, path in items:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=sub_path)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=sub_path)


def log_and_register_model(
    model_dir: str | os.PathLike,
    registered_name: str,
    aliases: tuple[str, ...] = (NEWEST_ALIAS,),
    tags: Mapping[str, str] | None = None,
) -> RegisteredModel:
    """Log ``model_dir`` to the active run as a pyfunc model and register a new version of it.

    The new version gets ``aliases`` (``newest`` by default) and ``tags``.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register_model needs an active MLflow run")
    code = Path(__file__).with_name("mlflow_model.py")
    import neurofm

    example, signature = pyfunc_signature(model_dir)
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT_PATH,
        python_model=str(code),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        pip_requirements=[f"neurofm=={neurofm.__version__}", "torch==2.13.0", "safetensors", "anndata"],
        signature=signature,
        input_example=example,
    )
    client = MlflowClient()
    try:
        client.create_registered_model(registered_name)
    except MlflowException:
        pass  # already exists
    version = _create_version(client, registered_name, info.model_uri, run.info.run_id)
    for alias in aliases:
        client.set_registered_model_alias(registered_name, alias, version.version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version.version, key, str(value))
    return RegisteredModel(
        registered_name, str(version.version), run.info.run_id, f"models:/{registered_name}/{version.version}"
    )


def pyfunc_signature(model_dir: str | os.PathLike, n_cells: int = 3, seed: int = 0):
    """``(input example, signature)`` of the registered pyfunc: a few cells of raw counts (a DataFrame,
    one float column per model gene, in the model's gene order) → their cell embeddings (float32)."""
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature

    from neurofm.embedding import embed_matrix, frame_to_anndata
    from neurofm.model import load_pretrained

    model, tokenizer = load_pretrained(model_dir)
    counts = np.random.default_rng(seed).poisson(1.0, size=(n_cells, tokenizer.n_genes)).astype(np.float64)
    example = pd.DataFrame(
        counts, columns=list(tokenizer.gene_ids), index=[f"cell_{i}" for i in range(n_cells)]
    )
    output = embed_matrix(model, tokenizer, frame_to_anndata(example), device="cpu", progress=False)
    return example, infer_signature(example, output, params={"pooling": "mean", "labels": False})


def _create_version(client: MlflowClient, name: str, source: str, run_id: str):
    version = client.create_model_version(name=name, source=source, run_id=run_id)
    for _ in range(50):  # the SQLite store is synchronous; remote registries may not be
        if client.get_model_version(name, version.version).status == "READY":
            break
        time.sleep(0.2)
    return version


def alias_version_tags(registered_name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """(version, tags) of the version holding ``alias``, or None when no version has it."""
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(registered_name, alias)
    except MlflowException:
        return None
    return str(version.version), dict(version.tags or {})


def set_alias(registered_name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(registered_name, alias, version)


def set_version_tags(registered_name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value))


def promote_if_better(name: str, version: str, metrics: dict[str, float], data_name: str, run_id: str) -> str:
    """Move the ``champion`` alias of ``name`` to ``version`` when the champion rule
    (:func:`neurofm.evaluate.compare.should_promote`) allows it, judged against the current champion's
    metrics recorded on the same data (``data_name``); tags the version with its probe metrics, the data
    and the evaluation run. Returns one sentence saying what happened and why."""
    from neurofm.evaluate.compare import should_promote

    set_version_tags(
        name,
        version,
        {
            **{
                key: f"{metrics[key]:.6f}"
                for key in ("model/probe_auc", "model/probe_accuracy")
                if key in metrics
            },
            "eval_data": data_name,
            "eval_run_id": run_id,
        },
    )
    current = alias_version_tags(name, CHAMPION_ALIAS)
    champion = None
    if current is not None:
        champion_version, champion_tags = current
        if champion_version == version:
            return f"version {version} already holds '{CHAMPION_ALIAS}'"
        if champion_tags.get("eval_data") != data_name:
            return (
                f"champion v{champion_version} was evaluated on {champion_tags.get('eval_data')!r}, not {data_name!r}; "
                "metrics are not comparable, alias left in place (evaluate it on this data first)"
            )
        champion = {key: float(value) for key, value in champion_tags.items() if key.startswith("model/")}
    promote, reason = should_promote(metrics, champion)
    if promote:
        set_alias(name, CHAMPION_ALIAS, version)
        return f"v{version} → '{CHAMPION_ALIAS}': {reason}"
    return f"v{version} not promoted: {reason}"


# ------------------------------------------------------------------------------------------------
# Studies (neurofm.tune): a study run that survives restarts, nested trial runs, mutable tags.


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set (or overwrite) tags on the active run; values are stringified."""
    mlflow.set_tags({key: str(value) for key, value in tags.items()})


def run_exists(run_id: str) -> bool:
    """Whether ``run_id`` is a run in the current tracking store."""
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


@contextlib.contextmanager
def start_or_resume_run(
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Re-open run ``run_id`` when it exists in the store (a resumed study), else start a new run in
    ``experiment``. Ended on exit (status FAILED on an exception); nested runs started inside become
    its children."""
    if mlflow.active_run() is None:
        configure(tracking_uri)
    if run_id is not None and run_exists(run_id):
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
            if tags:
                mlflow.set_tags(dict(tags))
            yield run
        return
    experiment_id = ensure_experiment(experiment)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags=dict(tags or {}),
        nested=mlflow.active_run() is not None,
    ) as run:
        yield run


def terminate_run(run_id: str, status: str = "KILLED") -> None:
    """Mark a run left RUNNING by a killed process as ended with ``status`` (no-op if it is gone)."""
    if run_exists(run_id):
        MlflowClient().set_terminated(run_id, status=status)


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every metric of run ``run_id`` ({} when the run is gone)."""
    try:
        return dict(MlflowClient().get_run(run_id).data.metrics)
    except MlflowException:
        return {}


# ------------------------------------------------------------------------------------------------
# Pipeline runs: the model an evaluation or a mapping uses, and their own MLflow runs.

PRETRAIN_FIGURES = (
    "best_val_perplexity",
    "baseline_perplexity",
    "perplexity_ratio",
    "best_val_masked_accuracy",
    "baseline_masked_accuracy",
)  # a pre-training run's metrics the evaluation report shows beside the model


def resolve_model_info(
    model: str | os.PathLike | None, registered_name: str, tracking_uri: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The model directory of ``model`` (a directory, an MLflow URI, or None: the newest registered version
    of ``registered_name``) and what is known of it: ``source``, ``model_name``/``model_version``/``model_uri``/
    ``mlflow_run_id`` of the registered version (None, and the directory as ``model_uri``, for a plain
    directory) and, when that version's run logged them, the pre-training figures :data:`PRETRAIN_FIGURES`."""
    model_dir = resolve_model_dir(model, registered_name, tracking_uri)
    version = model_version_for(model, registered_name)
    info = {
        "source": str(model) if model is not None else f"models:/{registered_name}@{NEWEST_ALIAS}",
        "model_name": version.name if version else None,
        "model_version": version.version if version else None,
        "model_uri": version.uri if version else str(model_dir),
        "mlflow_run_id": version.run_id if version else None,
    }
    if version is not None and version.run_id:  # the pre-training figures, for the report
        metrics = run_metrics(version.run_id)
        if all(key in metrics for key in PRETRAIN_FIGURES):
            info.update({key: metrics[key] for key in PRETRAIN_FIGURES})
    return model_dir, info


def _model_tags(step: str, data_name: str, model_info: Mapping[str, Any]) -> dict[str, str]:
    tags = {"neurofm.pipeline_step": step, "neurofm.data": data_name,
            "neurofm.model_uri": str(model_info.get("model_uri"))}  # fmt: skip
    if model_info.get("model_version") is not None:
        tags.update(
            {
                "neurofm.model_name": model_info["model_name"],
                "neurofm.model_version": str(model_info["model_version"]),
            }
        )
    return tags


def log_evaluation(
    evaluation: Mapping[str, Any],
    model_info: Mapping[str, Any],
    settings: EvaluateConfig,
    tracking_config: TrackingConfig,
    data_name: str,
) -> dict[str, Any]:
    """Log an evaluation (``evaluation``: its ``metrics`` and ``out_dir``) as one MLflow run
    ``evaluate-<data_name>`` linked to the model version by tags: params ``evaluate.*`` (``settings``, less
    ``model``) and ``model_source``, the metrics, ``out_dir`` as artifacts ``evaluation/``; then move the
    ``champion`` alias when ``settings.promote`` and :func:`promote_if_better` allow it (tag
    ``neurofm.promotion``: what happened). Returns ``evaluation`` plus ``promotion``, ``mlflow_run_id``, ``model``."""
    metrics = evaluation["metrics"]
    name, version = model_info.get("model_name"), model_info.get("model_version")
    with start_run(
        tracking_config.experiment,
        run_name=f"evaluate-{data_name}",
        tags=_model_tags("evaluate", data_name, model_info),
        tracking_uri=tracking_config.tracking_uri,
    ) as run:
        log_params(
            {
                "evaluate": settings.model_dump(exclude={"model"}),
                "model_source": model_info.get("source", model_info.get("model_uri")),
            }
        )
        log_metrics(metrics)
        log_artifacts([evaluation["out_dir"]], artifact_path="evaluation")
        promotion = "not a registered model version; no alias moved"
        if version is not None and settings.promote:
            promotion = promote_if_better(name, str(version), metrics, data_name, run.info.run_id)
        elif version is not None:
            promotion = "evaluate.promote is false; no alias moved"
        set_tags({"neurofm.promotion": promotion})
    log.info("promotion: %s", promotion)
    return {**evaluation, "promotion": promotion, "mlflow_run_id": run.info.run_id, "model": model_info}


def log_mapping(
    mapping: Mapping[str, Any],
    scores: Mapping[str, Any],
    model_info: Mapping[str, Any],
    settings: MapConfig,
    tracking_config: TrackingConfig,
    data_name: str,
) -> dict[str, Any]:
    """Log a mapping as one MLflow run ``map-<data_name>`` linked to the model version by tags: params
    ``map.*`` (``settings``, less ``model``), metrics ``unknown_share/<column>``, ``map_seconds``, ``n_cells``
    and the transfer ``scores['metrics']``, the report directory (``scores['out_dir']``) as artifacts
    ``map/``. Returns the mapping's record, metrics, mapped file, report, run id and model."""
    record = mapping["record"]
    with start_run(tracking_config.experiment, run_name=f"map-{data_name}",
                   tags=_model_tags("map", data_name, model_info),
                   tracking_uri=tracking_config.tracking_uri) as run:  # fmt: skip
        log_params({"map": settings.model_dump(exclude={"model"})})
        metrics = {f"unknown_share/{c}": v for c, v in record["unknown_share"].items()}
        metrics.update({"map_seconds": mapping["seconds"], "n_cells": record["n_cells"], **scores["metrics"]})
        log_metrics(metrics)
        if scores.get("out_dir"):
            log_artifacts([scores["out_dir"]], artifact_path="map")
    return {"record": record, "metrics": scores["metrics"], "mapped_file": mapping["mapped_file"],
            "report": scores.get("report"), "mlflow_run_id": run.info.run_id, "model": model_info}  # fmt: skip
