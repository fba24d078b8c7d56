"""The search space of a tuning study (``tune.space``): one dimension per ``section.key`` of
``TokenizerConfig``, ``ModelConfig`` or ``TrainConfig`` (:func:`parse_space`), the checks that refuse a
key or range the configs would refuse, and a sampled point applied to the base configuration
(:func:`apply_params`, :func:`build_configs`). The study itself is :mod:`neurofm.tune`."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from neurofm.config import RunConfig
from neurofm.errors import NeurofmError
from neurofm.model import ModelConfig
from neurofm.tokenizer import TokenizerConfig
from neurofm.train_config import TrainConfig

TUNABLE_SECTIONS: dict[str, type] = {"tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig}
# keys that are not free hyper-parameters, with what to do instead
FIXED_KEYS = {
    "model.n_genes": "it comes from the data's genes",
    "model.n_bins": "tune tokenizer.n_bins instead",
    "model.max_tokens": "tune train.max_tokens_per_cell instead",
    "train.epochs": "set tune.epochs instead",
    "train.progress": "it is not a hyper-parameter",
}
# keys that change what the validation loss measures (the task), not only how well it is learnt
TASK_KEYS = ("tokenizer.", "train.mask_ratio", "train.nonzero_mask_share", "train.max_tokens_per_cell")
PARAM_TYPES = ("float", "int", "categorical")
SPEC_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}


@dataclass(frozen=True)
class ParamSpec:
    """One dimension of the search space: ``name`` is ``section.key``."""

    name: str
    type: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def contains(self, value: Any) -> bool:
        """Whether ``value`` can be sampled from this dimension."""
        if self.type == "categorical":
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))


def _number(name: str, key: str, value: Any, integer: bool) -> float | int:
    """A YAML bound as a number (PyYAML reads ``1e-4`` as a string, so numeric strings are accepted)."""
    if isinstance(value, str) and not integer:
        try:
            value = float(value)
        except ValueError:
            pass
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        kind = "an integer" if integer else "a number"
        raise NeurofmError(f"tune.space.{name}: {key}={value!r} must be {kind}; fix the search space")
    return value


def _field_type(cls: type, key: str) -> Any:
    return typing.get_type_hints(cls)[key]


def _check_value(section: str, key: str, value: Any) -> None:
    """Refuse a value the section's dataclass rejects on its own (ranges), ignoring cross-key checks."""
    values: dict[str, Any] = {key: value}
    if section == "model" and key in ("d_model", "n_heads") and isinstance(value, int) and value >= 1:
        values = (
            {"d_model": value, "n_heads": 1} if key == "d_model" else {"d_model": 4 * value, "n_heads": value}
        )
    try:
        dataclasses.replace(TUNABLE_SECTIONS[section](), **values).validate()
    except (NeurofmError, TypeError, ValueError) as error:
        reason = str(error).split(";")[0]
        raise NeurofmError(
            f"tune.space.{section}.{key}: value {value!r} is refused ({reason}); narrow the range"
        ) from None


def parse_space(space: Mapping[str, Any]) -> list[ParamSpec]:
    """Parse and check ``tune.space`` into :class:`ParamSpec` s (in YAML order).

    Names must be ``section.key`` of ``tokenizer``/``model``/``train`` dataclass fields (not the derived
    ones in ``FIXED_KEYS``); ``type`` is ``float`` (``low``, ``high``, optional ``log``/``step``), ``int``
    (integer ``low``/``high``, optional ``log``/``step``) or ``categorical`` (``choices``). Integer fields
    refuse ``type: float``; every bound/choice must pass the field's own range check. Raises
    :class:`NeurofmError` with a one-line message otherwise.
    """
    if not isinstance(space, Mapping) or not space:
        raise NeurofmError(
            "tune.space is empty; add e.g. 'train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}'"
        )
    return [_parse_param(name, spec) for name, spec in space.items()]


def _parse_param(name: str, spec: Any) -> ParamSpec:
    """One checked dimension of ``tune.space`` (see :func:`parse_space`)."""
    section, key = _tunable_key(name)
    _check_spec_keys(name, spec)
    if spec["type"] == "categorical":
        return _categorical_param(name, section, key, spec)
    return _numeric_param(name, section, key, spec)


def _tunable_key(name: str) -> tuple[str, str]:
    """``(section, key)`` of a space entry's name; refuses unknown sections or keys and derived keys."""
    section, _, key = str(name).partition(".")
    if section not in TUNABLE_SECTIONS or not key:
        raise NeurofmError(
            f"tune.space.{name}: name must be section.key with section one of "
            f"{', '.join(TUNABLE_SECTIONS)} (e.g. train.lr); fix the search space"
        )
    fields = [f.name for f in dataclasses.fields(TUNABLE_SECTIONS[section])]
    if key not in fields:
        raise NeurofmError(
            f"tune.space.{name}: {section} has no key {key!r}; known keys: {', '.join(fields)}"
        )
    if name in FIXED_KEYS:
        raise NeurofmError(f"tune.space.{name} cannot be tuned: {FIXED_KEYS[name]}")
    return section, key


def _check_spec_keys(name: str, spec: Any) -> None:
    """Refuse a spec that is not a mapping with a known ``type``, or that has keys its type does not take."""
    if not isinstance(spec, Mapping) or spec.get("type") not in PARAM_TYPES:
        raise NeurofmError(
            f"tune.space.{name}: needs 'type' one of {', '.join(PARAM_TYPES)}, got {spec!r}; "
            "e.g. {type: int, low: 1, high: 4}"
        )
    kind = spec["type"]
    extra = sorted(set(spec) - SPEC_KEYS[kind] - {"type"})
    if extra:
        raise NeurofmError(
            f"tune.space.{name}: unknown key(s) {', '.join(extra)} for type {kind}; "
            f"allowed: {', '.join(sorted(SPEC_KEYS[kind]))}"
        )


def _categorical_param(name: str, section: str, key: str, spec: Mapping[str, Any]) -> ParamSpec:
    """A ``categorical`` dimension: a non-empty list of plain values, each accepted by the field."""
    choices = spec.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise NeurofmError(f"tune.space.{name}: choices must be a non-empty list, e.g. [64, 128]")
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise NeurofmError(f"tune.space.{name}: choice {choice!r} must be a number, string, bool or null")
        _check_value(section, key, choice)
    return ParamSpec(name, "categorical", choices=tuple(choices))


def _numeric_param(name: str, section: str, key: str, spec: Mapping[str, Any]) -> ParamSpec:
    """A ``float`` or ``int`` dimension of a numeric field: ``low < high`` (both accepted by the field),
    ``log`` a bool needing ``low > 0``, ``step`` positive and not combined with a float log scale."""
    kind = spec["type"]
    field_type = _field_type(TUNABLE_SECTIONS[section], key)
    if field_type not in (int, float):
        raise NeurofmError(f"tune.space.{name}: {key} is not numeric; use type: categorical with choices")
    if kind == "float" and field_type is int:
        raise NeurofmError(f"tune.space.{name}: {key} is an integer setting; use type: int or categorical")
    integer = kind == "int"
    low = _number(name, "low", spec.get("low"), integer)
    high = _number(name, "high", spec.get("high"), integer)
    use_log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(use_log, bool):
        raise NeurofmError(f"tune.space.{name}: log must be true or false")
    if not low < high:
        raise NeurofmError(f"tune.space.{name}: low={low} must be below high={high}")
    if use_log and low <= 0:
        raise NeurofmError(f"tune.space.{name}: log scale needs low > 0 (got {low})")
    if step is not None:
        step = _number(name, "step", step, integer)
        if step <= 0 or (use_log and kind == "float"):
            raise NeurofmError(f"tune.space.{name}: step must be > 0 and cannot be combined with log")
    for value in (low, high):
        _check_value(section, key, float(value) if kind == "float" and field_type is float else value)
    return ParamSpec(name, kind, low=low, high=high, log=use_log, step=step)


def apply_params(base_config: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """A copy of ``base_config`` with each ``section.key`` of ``params`` (tokenizer, model, train) set;
    not yet range-checked: :func:`build_configs` refuses a combination the sections reject."""
    changes: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        section, _, key = name.partition(".")
        changes.setdefault(section, {})[key] = value
    update = {
        section: dataclasses.replace(getattr(base_config, section), **values)
        for section, values in changes.items()
    }
    return base_config.model_copy(update=update)


def build_configs(config: RunConfig) -> tuple[TokenizerConfig, ModelConfig, TrainConfig]:
    """The validated sections of a trial's configuration (NeurofmError names what is refused)."""
    return config.tokenizer.validate(), config.model.validate(), config.train.validate()
