"""The steps' ZenML interface: a step declaring several outputs returns a tuple literal (ZenML reads the
number of outputs from the ``return`` statement, so ``return library_call(...)`` would be one artifact)."""

from __future__ import annotations

import importlib
import typing

import pytest
from zenml.steps import BaseStep
from zenml.steps.utils import has_tuple_return

MODULES = ("steps.data", "steps.train", "steps.evaluate", "steps.mapping", "steps.reports")


def _steps() -> list[tuple[str, BaseStep]]:
    found = []
    for module in MODULES:
        for name, value in vars(importlib.import_module(module)).items():
            if isinstance(value, BaseStep):
                found.append((f"{module}.{name}", value))
    return found


@pytest.mark.parametrize("name, step", _steps(), ids=lambda value: value if isinstance(value, str) else "")
def test_a_step_with_several_outputs_returns_a_tuple_literal(name, step):
    returned = typing.get_type_hints(step.entrypoint, include_extras=True).get("return")
    several = typing.get_origin(returned) is tuple
    assert has_tuple_return(step.entrypoint) == several, name


def test_the_pipelines_multi_output_steps_are_seen():
    names = {name for name, step in _steps()}
    assert {"steps.train.pretrain_model", "steps.evaluate.resolve_model", "steps.data.crop_data"} <= names
