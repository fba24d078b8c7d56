"""ZenML pipelines: wiring only. Each connects steps; parameters come from the run configuration."""

from __future__ import annotations

from typing import Any


def get_pipeline(name: str) -> Any:
    """The ZenML pipeline called ``name`` (imported lazily: importing zenml is slow)."""
    import importlib

    module = {"prepare": "prepare", "pretrain": "pretrain", "evaluate": "evaluate", "full": "evaluate", "map": "map"}[name]
    return getattr(importlib.import_module(f"pipelines.{module}"), name)


def step_outputs(run: Any) -> dict[str, dict[str, Any]]:
    """``{step name: {output name: loaded value}}`` for the small (dict/str/Path) outputs of a run."""
    from zenml.client import Client

    run = Client().get_pipeline_run(run.id)
    outputs: dict[str, dict[str, Any]] = {}
    for step_name, step_run in run.steps.items():
        for output_name, artifacts in step_run.outputs.items():
            artifact = artifacts[0] if isinstance(artifacts, list) else artifacts
            if artifact.data_type and artifact.data_type.attribute in {"dict", "str", "PosixPath", "Path"}:
                outputs.setdefault(step_name, {})[output_name] = artifact.load()
    return outputs


def cached_steps(run: Any) -> list[str]:
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    run = Client().get_pipeline_run(run.id)
    return [name for name, step_run in run.steps.items() if step_run.status == ExecutionStatus.CACHED]
