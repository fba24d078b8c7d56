"""GPU stack: configs/gpu.yaml → ZenML step settings; the default config → none; a local run ignores them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("zenml")

from zenml import pipeline, step  # noqa: E402
from zenml.config import DockerSettings, ResourceSettings  # noqa: E402

from neurofm.config import load_config  # noqa: E402
from neurofm.errors import NeurofmError  # noqa: E402
from pipelines.settings import step_settings  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _torch_pin() -> str:
    import re

    return re.search(r'"(torch==[^"]+)"', (CONFIGS.parent / "pyproject.toml").read_text()).group(1)


TORCH_PIN = _torch_pin()


def test_gpu_config_resolves_into_resource_and_docker_settings_for_the_listed_steps():
    config = load_config(CONFIGS / "gpu.yaml")
    settings = step_settings(config)
    assert set(settings) == {"pretrain_model", "embed_cells"}
    for step_name in ("pretrain_model", "embed_cells"):
        resources, docker = settings[step_name]["resources"], settings[step_name]["docker"]
        assert isinstance(resources, ResourceSettings) and isinstance(docker, DockerSettings)
        assert (resources.gpu_count, resources.cpu_count, resources.memory) == (1, 8, "32GB")
        assert docker.parent_image.startswith("pytorch/pytorch:") and "cuda" in docker.parent_image
        # every package, torch included, comes from the hashed GPU lock resolved from pyproject.toml
        lock = Path(docker.requirements)
        assert lock.is_absolute() and lock.name == "gpu.lock" and lock.is_file()
        pins = {line.split(" ")[0] for line in lock.read_text().splitlines() if "==" in line}
        assert "mlflow==3.17.2" in pins
        # the image's own torch is replaced by the version the project pins (the CUDA wheel on Linux)
        assert TORCH_PIN in pins, (TORCH_PIN, sorted(pins)[:5])
    assert config.train.device == "auto" and config.train.bf16 is True


@pytest.mark.parametrize("name", ["pretrain.yaml", "full.yaml", "evaluate.yaml", "tune.yaml"])
def test_cpu_configs_yield_no_step_settings(name):
    assert step_settings(load_config(CONFIGS / name)) == {}


def test_only_the_listed_steps_get_settings():
    config = load_config(
        CONFIGS / "gpu.yaml",
        ["resources.steps=[pretrain_model]", "resources.parent_image=null", "resources.requirements=null"],
    )
    settings = step_settings(config)
    assert list(settings) == ["pretrain_model"]
    assert set(settings["pretrain_model"]) == {"resources"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resources.gpu_count=-1", "gpu_count"),
        ("resources.memory=lots", "resources.memory"),
        ("resources.steps=pretrain_model", "steps='pretrain_model' is not a list"),
        ("resources.requirements=requirements/none.lock", "does not exist"),
    ],
)
def test_bad_resources_are_one_line_errors(override, message):
    with pytest.raises(NeurofmError, match=message) as caught:  # when loaded, or when ZenML reads them
        step_settings(load_config(CONFIGS / "gpu.yaml", [override]))
    assert "\n" not in str(caught.value)


@step(enable_cache=False)
def add_one(value: int) -> int:
    return value + 1


@pipeline(enable_cache=False)
def tiny_gpu_pipeline() -> None:
    settings = step_settings(load_config(CONFIGS / "gpu.yaml"))["pretrain_model"]
    add_one.with_options(settings=settings)(1)


def test_local_orchestrator_runs_a_step_with_gpu_settings(caplog):
    with caplog.at_level(logging.WARNING):
        run = tiny_gpu_pipeline()
    assert run.status.value == "completed"
    step_run = run.steps["add_one"]
    assert step_run.outputs["output"][0].load() == 2
    assert step_run.config.settings["resources"].gpu_count == 1  # recorded, not acted upon
