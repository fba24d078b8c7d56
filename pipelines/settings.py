"""ZenML step settings from the ``resources`` section of a run configuration.

``configs/gpu.yaml`` asks for a GPU, CPUs, memory and a CUDA PyTorch parent image for the heavy steps
(``resources.steps``: ``pretrain_model`` and ``embed_cells``); the pipelines apply them with::

    settings = step_settings(config)
    pretrain_model.with_options(settings=settings.get("pretrain_model", {}))(...)

A remote orchestrator (Kubernetes, SkyPilot, Vertex…) builds the image and schedules the step on a GPU
node; the local orchestrator has nothing to schedule and only logs that it ignores resource settings.
With the default (CPU) configuration no settings are produced at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neurofm.config import RunConfig
from neurofm.errors import NeurofmError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _requirements(requirements: list[str] | str | None) -> list[str] | str | None:
    """A requirements file path resolved against the project root (it must exist); lists unchanged."""
    if not isinstance(requirements, str):
        return requirements
    path = Path(requirements)
    path = path if path.is_absolute() else PROJECT_ROOT / path
    if not path.is_file():
        raise NeurofmError(
            f"resources.requirements file {requirements} does not exist; give a lock file such as "
            "requirements/gpu.lock or a list of pip specifiers"
        )
    return str(path)


def step_settings(config: RunConfig) -> dict[str, dict[str, Any]]:
    """``{step name: {"resources": ResourceSettings, "docker": DockerSettings}}`` for each step in
    ``resources.steps``.

    ``resources`` settings appear when a GPU, a CPU count or memory is asked for; ``docker`` settings
    when a parent image or requirements are given. Returns ``{}`` when neither (the default CPU config).
    Raises NeurofmError for malformed values (ZenML's own validation errors, e.g. memory ``"32 gigs"``,
    are turned into one line too).
    """
    from pydantic import ValidationError
    from zenml.config import DockerSettings, ResourceSettings

    resources = config.resources  # its types and ranges are checked when the configuration is loaded
    settings: dict[str, Any] = {}
    try:
        if resources.gpu_count or resources.cpu_count is not None or resources.memory is not None:
            settings["resources"] = ResourceSettings(
                gpu_count=resources.gpu_count or None,
                cpu_count=resources.cpu_count,
                memory=resources.memory,
            )
        if resources.parent_image is not None or resources.requirements is not None:
            settings["docker"] = DockerSettings(
                parent_image=resources.parent_image,
                requirements=_requirements(resources.requirements),
            )
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        raise NeurofmError(
            f"resources.{field}: {problem['msg']}; fix the resources section (e.g. memory: 32GB)"
        ) from None
    if not settings:
        return {}
    return {name: dict(settings) for name in resources.steps}
