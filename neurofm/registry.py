"""Where models are found: the MLflow tracking/registry store and model references.

Resolving a model reference — a model directory, ``models:/name@alias``, ``models:/name/3`` or
``runs:/id/model`` — into a local neurofm model directory is needed wherever a model is *used*
(embedding, evaluation, serving), so it lives below them; logging runs and registering versions is
:mod:`neurofm.tracking`'s. Both use the same store: ``$MLFLOW_TRACKING_URI``, a configured URI, or an
embedded SQLite store under ``$NEUROFM_HOME`` (default ``./.neurofm``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neurofm.errors import NeurofmError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

NEWEST_ALIAS = "newest"  # set on every freshly registered version
CHAMPION_ALIAS = "champion"  # set by evaluation when a version beats the current champion


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model version."""

    name: str
    version: str
    run_id: str
    uri: str  # models:/name/version


def neurofm_home() -> Path:
    """The project's data dir: ``$NEUROFM_HOME`` or ``./.neurofm`` (stores, default data)."""
    return Path(os.environ.get("NEUROFM_HOME", Path.cwd() / ".neurofm")).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{neurofm_home() / 'mlflow.db'}"


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (or ``$MLFLOW_TRACKING_URI``, or the embedded SQLite store).

    Returns the URI in use. The registry uses the same store.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def resolve_model_dir(
    spec: str | os.PathLike | None, registered_name: str, tracking_uri: str | None = None
) -> Path:
    """Turn ``spec`` into a local neurofm model directory.

    ``spec`` may be a model directory, an MLflow URI (``models:/name@alias``, ``models:/name/3``,
    ``runs:/id/model``) or ``None`` for the newest registered version of ``registered_name``.
    """
    if spec is not None and Path(spec).exists():
        return Path(spec)
    configure(tracking_uri)
    uri = str(spec) if spec is not None else f"models:/{registered_name}@{NEWEST_ALIAS}"
    if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/", "file:", "s3:", "gs:")):
        raise NeurofmError(
            f"model {uri!r} is neither an existing directory nor an MLflow model URI; "
            "pass a checkpoint directory or e.g. models:/neurofm-encoder@champion"
        )
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as error:
        message = str(error).splitlines()[0][:200]
        raise NeurofmError(
            f"cannot fetch model {uri} from {mlflow.get_tracking_uri()} ({message}); "
            "run the pretrain pipeline first or pass --model"
        ) from None
    for config_file in sorted(local.rglob("config.json")):  # the pyfunc keeps it under artifacts/<name>/
        if (config_file.parent / "model.safetensors").exists():
            return config_file.parent
    raise NeurofmError(f"{uri} holds no neurofm model directory; register it with the pretrain pipeline")


def model_version_for(spec: str | None, registered_name: str) -> RegisteredModel | None:
    """The registered version ``spec`` names (``None`` → newest), or ``None`` for a plain directory."""
    client = MlflowClient()
    try:
        if spec is None:
            version = client.get_model_version_by_alias(registered_name, NEWEST_ALIAS)
        elif spec.startswith("models:/"):
            name, _, ref = spec.removeprefix("models:/").partition("/")
            if "@" in name:
                name, alias = name.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                version = client.get_model_version(name, ref)
        else:
            return None
    except MlflowException:
        return None
    return RegisteredModel(
        version.name, str(version.version), version.run_id or "", f"models:/{version.name}/{version.version}"
    )
