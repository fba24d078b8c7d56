"""Run configurations: YAML files → one typed :class:`RunConfig`, every default defined once, here.

A configuration is a YAML mapping of sections (``data``, ``subset``, ``region``, ``dedupe``, ``crop``,
``tokenizer``, ``model``, ``train``, ``evaluate``, ``map``, ``tracking``, ``tune``, ``resources`` …), each
one section class of :class:`RunConfig`: pydantic models for the stages' own settings, and the library's
settings dataclasses (``model`` → :class:`~neurofm.model_config.ModelConfig`, ``train`` →
:class:`~neurofm.train_config.TrainConfig`, ``evaluate.probe`` → :class:`~neurofm.classify.ProbeConfig`…)
as they are, so a model directory saved with them loads as before. A file holds only what it changes and
may start with ``extends: other.yaml`` (relative to itself) to inherit and override another one.

An unknown section or key, or a value of the wrong type, anywhere (``evaluate.probe.*`` included), is
refused when the configuration is loaded — before anything runs — in one line naming the section, the
key and the nearest valid key; the dataclasses' own range checks (``validate()``) run then too.
The built-in demo's settings (``default_data``) are laid over the configuration in one place,
:func:`apply_demo_data`, when no data are given.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from neurofm.classify import ProbeConfig
from neurofm.cluster_config import ClusterConfig
from neurofm.config_files import parse_override, read_yaml, set_path
from neurofm.embedding import EMBED_BATCH_SIZE
from neurofm.errors import NeurofmError
from neurofm.genes import MIN_GENE_OVERLAP
from neurofm.model_config import ModelConfig
from neurofm.pooling import DEFAULT_POOLING, DEFAULT_UNOBSERVED, POOLINGS, UNOBSERVED_MODES
from neurofm.reference import ReferenceConfig
from neurofm.tokenizer import TokenizerConfig
from neurofm.train_config import TrainConfig

SCARCHES_QUERY_EPOCHS = 200  # scArches' query training (scvi-tools' reference-mapping tutorial)
# the map pipeline's baselines (neurofm.evaluate.transfer, neurofm.evaluate.label_baselines): map.baselines is
# checked against them and defaults to all but scANVI (its labelled and query training take minutes to an hour on
# a CPU) and CellTypist's majority voting (its own over-clustering of the query; no per-cell confidence)
MAP_BASELINES = ("pca_ref", "logcounts", "scvi", "scarches", "scanvi", "celltypist", "celltypist_majority", "symphony")
MAP_DEFAULT_BASELINES = ("pca_ref", "logcounts", "scvi", "scarches", "celltypist", "symphony")
EVALUATE_BASELINES = ("pca", "scvi", "random")  # the evaluation's baselines (neurofm.evaluate.methods)
Pooling = Literal[POOLINGS]  # neurofm.pooling.POOLINGS
Unobserved = Literal[UNOBSERVED_MODES]  # neurofm.pooling.UNOBSERVED_MODES
__all__ = ["MIN_GENE_OVERLAP", "RunConfig", "load_config"]  # MIN_GENE_OVERLAP: defined in neurofm.genes


def _text(value: Any) -> Any:
    """Paths given as ``Path`` objects (tests, the command line) are kept as text."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PathText = Annotated[str, BeforeValidator(_text)]


class Section(BaseModel):
    """One section of a run configuration: known keys only, each value checked against its type."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data
class DataConfig(Section):
    path: PathText | None = (
        None  # .h5ad of raw counts; None → the built-in synthetic atlas (see default_data)
    )
    # several .h5ad files pre-trained as one cell store (instead of path; `neurofm convert A B … OUT`):
    # a list of paths or {path, batch_column, gene_column, name} mappings; None → path
    files: list[PathText | dict[str, Any]] | None = None
    metadata_csv: PathText | None = (
        None  # Allen-style cell_metadata.csv for the cluster join (None → no subset)
    )
    cluster_csv: PathText | None = None  # cluster.csv, for the atlas plot
    annotation_csv: PathText | None = None  # cluster_annotation_term.csv, for the atlas plot
    layer: str | None = None  # counts layer; None → layers['counts'] if present, else X
    out_dir: PathText = "outputs"  # where .h5ad, reports, checkpoints and evaluation land

    @field_validator("files", mode="before")
    @classmethod
    def _check_files(cls, files: Any) -> Any:
        """None, or a non-empty list of paths / {path, batch_column, gene_column, name} mappings."""
        if files is None:
            return None
        if not isinstance(files, list) or not files:
            raise NeurofmError(
                f"data.files must be a list of .h5ad paths or {{path, batch_column, gene_column}} mappings, got {files!r}"
            )
        for entry in files:
            if isinstance(entry, Mapping):
                unknown = sorted(set(entry) - {"path", "batch_column", "gene_column", "name"})
                if unknown or not isinstance(entry.get("path"), str):
                    raise NeurofmError(
                        f"data.files entry {dict(entry)} has unknown keys {unknown} or no path; use "
                        "{path: FILE.h5ad, batch_column: COL, gene_column: COL}"
                    )
            elif not isinstance(entry, (str, os.PathLike)):
                raise NeurofmError(f"data.files entry {entry!r} is neither a path nor a mapping with a path")
        return files

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.files is not None and self.path is not None:
            raise NeurofmError(
                "data.path and data.files are both set; use data.files alone for several files"
            )
        return self

    @property
    def builtin(self) -> bool:
        """No data given: the run uses the built-in synthetic atlas (and :func:`apply_demo_data`)."""
        return self.path is None and self.files is None


class DemoDataConfig(Section):
    """``default_data``: the built-in synthetic atlas, used only when data.path and data.files are None."""

    n_cells: int = 12000
    n_genes: int = 1200
    seed: int = 0
    cluster_ids: list[int | str] = [2523, 210]  # the generator's layer-5 excitatory + MGE inhibitory pair
    region: str | None = "Cerebral cortex"
    crop: dict[str, Any] = {"n_cells": 1200, "n_genes": 800}  # laid over the crop section
    label_mapping: dict[str, Any] | None = (
        None  # None → evaluate.label_mapping (2523 excitatory, 210 inhibitory)
    )
    # train settings for the built-in data only, beneath the user's own train keys: the demo pre-trains
    # 10 epochs (your data: train.epochs, 30) so the first run ends in a few minutes; its report says so
    train: dict[str, Any] = {"epochs": 10}
    # the reference the demo's model carries for `neurofm map` (your data: reference.label_columns)
    reference: dict[str, Any] = {"label_columns": ["subtype"]}


class SubsetConfig(Section):
    cluster_ids: list[int | str] = []  # empty → keep every cell (no metadata join)
    obs_name_column: str = "cell_label"
    cluster_column: str = "cluster_alias"
    label_prefix: str = "cluster_"
    chunk_size: int = 20000


class RegionConfig(Section):
    column: str = "anatomical_division_label"
    value: str | None = None  # None → keep all


class DedupeConfig(Section):
    genes: Literal["make_unique", "collapse", "none"] = "make_unique"  # or collapse (sum duplicate columns)
    cells: Literal["make_unique", "drop", "error", "none"] = "make_unique"  # drop: keep the first
    gene_column: str | None = None  # judge gene duplicates on this var column instead of var_names
    cell_column: str | None = None  # judge cell duplicates on this obs column instead of obs_names


class CropConfig(Section):
    n_cells: int | None = None  # None → keep every cell
    n_genes: int | None = None  # None → keep every gene
    min_detection: float = 0.05  # genes detected in fewer cells are not sampled …
    detection_backoff: float = 0.5  # … unless too few pass: the threshold is multiplied by this (a warning)
    min_detection_floor: float = 0.001  # … down to this floor
    alpha: float = 1.0  # gene weight ∝ detection^alpha · std^beta (std of log1p CP10k)
    beta: float = 0.5
    n_strata: int = 4  # depth strata (quantiles of per-cell non-zeros)
    drop_all_zero: bool = True
    seed: int = 42
    report_csv: bool = True


class ReportsConfig(Section):
    value_counts_column: str | None = "subtype"
    atlas_top_k: int = 8


# ------------------------------------------------------------------------------------- evaluate, map
class EvaluateConfig(Section):
    model: PathText | None = (
        None  # None → newest registered version; or models:/name@alias, runs:/…, a directory
    )
    label_column: str | None = "subtype"
    label_mapping: dict[Any, Any] | None = {"cluster_2523": "excitatory", "cluster_210": "inhibitory"}
    group_column: str | None = None  # e.g. c1_chip: the probe split keeps these groups apart
    gene_column: str | None = None  # var column naming the data's genes (e.g. gene_symbol); None → var_names
    min_gene_overlap: float = MIN_GENE_OVERLAP  # share of the model's genes that must be found in the data
    unobserved: Unobserved = (
        DEFAULT_UNOBSERVED  # model genes the data lacks: "exclude" (left out of pooling) or "zero"
    )
    pooling: Pooling = DEFAULT_POOLING  # auto: as the model pooled in pre-training
    batch_size: int = EMBED_BATCH_SIZE
    pca_components: int = 50
    baselines: list[str] = list(EVALUATE_BASELINES)  # scVI trains on the evaluation cells (minutes on a CPU)
    scvi_latent: int = 10  # scvi-tools' default latent size
    scvi_max_epochs: int | None = (
        None  # None → scvi-tools' rule min(round(20000 / n_cells * 400), 400), early stop
    )
    max_cells_cluster: int | None = 20000  # kNN-Leiden on a seeded sample above this many cells (null: all)
    max_cells_visualize: int | None = 10000  # t-SNE/UMAP on a seeded sample above this many cells (null: all)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)  # the probe menu and its splits
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig
    )  # the kNN graph and Leiden (n_neighbors, metric, resolution…)
    label_efficiency_shots: list[int | Literal["all"]] = [5, 10, 25, 50, "all"]
    label_efficiency_draws: int = 10
    promote: bool = True  # move the `champion` alias when the rule in evaluate.compare allows it

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not set(self.baselines) <= set(EVALUATE_BASELINES) or "pca" not in self.baselines:
            raise NeurofmError(
                f"evaluate.baselines={self.baselines!r} must be a list drawn from {list(EVALUATE_BASELINES)} that "
                "holds pca (the champion rule needs it); e.g. [pca, scvi, random]"
            )
        for key in ("max_cells_cluster", "max_cells_visualize"):
            value = getattr(self, key)
            if value is not None and value < 100:
                raise NeurofmError(f"evaluate.{key}={value!r} must be an integer >= 100 or null (all cells)")
        if self.scvi_max_epochs is not None and self.scvi_max_epochs < 1:
            raise NeurofmError(
                f"evaluate.scvi_max_epochs={self.scvi_max_epochs!r} must be a positive integer or null"
            )
        if self.scvi_latent < 2:
            raise NeurofmError(f"evaluate.scvi_latent={self.scvi_latent!r} must be an integer >= 2, e.g. 10")
        _run_validate(self.probe, "evaluate.probe")
        return self


class MapConfig(Section):
    """``map``: the map pipeline, a query mapped onto a model's reference (neurofm.mapping)."""

    model: PathText | None = (
        None  # None → newest registered version; models:/name@alias, runs:/…, a directory
    )
    label_columns: list[str] | None = None  # reference columns to transfer; None → all the reference has
    query_label_column: str | None = None  # the query's true labels (scores the transfer); None → no scores
    batch_column: str | None = None  # the query's batches (donor, chip…): scArches' and scANVI's batch key
    gene_column: str | None = None  # var column naming the query's genes (e.g. gene_symbol); None → var_names
    min_gene_overlap: float = MIN_GENE_OVERLAP  # share of the model's genes that must be found in the query
    reference_data: PathText | None = (
        None  # the reference cells' .h5ad for the baselines; None → the one recorded
    )
    baselines: list[str] = Field(default_factory=lambda: list(MAP_DEFAULT_BASELINES))  # fit on the reference
    #   only; any of pca_ref, logcounts, scvi, scarches, scanvi, celltypist, celltypist_majority, symphony
    scarches_query_epochs: int = SCARCHES_QUERY_EPOCHS  # scvi-tools' reference-mapping tutorial
    max_cells_score: int = 20000  # scored/clustered on a seeded query sample above this many cells

    @model_validator(mode="after")
    def _check(self) -> MapConfig:
        if not set(self.baselines) <= set(MAP_BASELINES):
            raise NeurofmError(
                f"map.baselines={self.baselines!r} must be a list drawn from {list(MAP_BASELINES)}; "
                "e.g. [pca_ref, logcounts]"
            )
        if self.scarches_query_epochs < 1:
            raise NeurofmError(
                f"map.scarches_query_epochs={self.scarches_query_epochs!r} must be a positive integer, e.g. 200"
            )
        return self


# --------------------------------------------------------------------------- tracking, tune, resources
with warnings.catch_warnings():  # `register` is also ABCMeta.register, which a section never calls
    warnings.filterwarnings("ignore", message='Field name "register"')

    class TrackingConfig(Section):
        tracking_uri: str | None = None  # None → $MLFLOW_TRACKING_URI or sqlite under $NEUROFM_HOME
        experiment: str = "neurofm"
        registered_model_name: str = "neurofm-encoder"
        register: bool = True


class PrunerConfig(Section):
    n_startup_trials: int = 3  # trials before any is pruned
    n_warmup_steps: int = 1  # validations of a trial before it may be pruned


# tune.objective → Optuna's direction (neurofm.tune_objective scores each)
TUNE_OBJECTIVES = {
    "val_loss": "minimize",
    "perplexity_ratio": "minimize",
    "probe_auc": "maximize",
    "fewshot5_f1": "maximize",
    "ari_optimised": "maximize",
}


class TuneConfig(Section):
    n_trials: int = 20
    # perplexity_ratio: validation perplexity / the per-gene frequency table's on the same bins and masks
    # (comparable across tokenizer.n_bins, unlike val_loss); probe_auc, fewshot5_f1 and ari_optimised
    # score the embedding of the validation cells by the evaluation's protocol (neurofm.tune)
    objective: Literal[tuple(TUNE_OBJECTIVES)] = "perplexity_ratio"
    storage: str | None = (
        None  # None → <out_dir>/study.journal (Optuna journal file); or an Optuna storage URL
    )
    study_name: str = "neurofm-pretrain"
    seed: int = 42
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)  # median pruning on the per-epoch curve
    epochs: int | None = 3  # per trial (None → train.epochs; the best config keeps the pretrain one)
    best_config_out: PathText | None = "configs/pretrain.best.yaml"
    space: dict[str, dict[str, Any]] = {}  # section.key → {type, low, high, log, step, choices}


class ResourcesConfig(Section):
    """``resources``: ZenML step settings for pretrain/embed; ignored by the local orchestrator."""

    gpu_count: int = 0
    cpu_count: int | float | None = None
    memory: str | None = None
    parent_image: str | None = None
    requirements: list[str] | str | None = None
    steps: list[str] = ["pretrain_model", "embed_cells"]

    @model_validator(mode="after")
    def _check(self) -> ResourcesConfig:
        if self.gpu_count < 0:
            raise NeurofmError(f"resources.gpu_count={self.gpu_count!r} must be an integer >= 0; e.g. 1")
        if self.cpu_count is not None and self.cpu_count <= 0:
            raise NeurofmError(f"resources.cpu_count={self.cpu_count!r} must be a positive number or null")
        return self


# --------------------------------------------------------------------------------------- the tree
def _run_validate(settings: Any, section: str) -> None:
    """A settings dataclass's own range checks (``validate()``), refused in one line naming the section."""
    if callable(getattr(settings, "validate", None)):
        try:
            settings.validate()
        except (NeurofmError, TypeError, ValueError) as error:
            raise NeurofmError(f"bad value in config section '{section}': {error}") from None


class RunConfig(Section):
    """A whole run's configuration: one typed section per stage (``python -m neurofm.config`` lists them)."""

    data: DataConfig = Field(default_factory=DataConfig)
    default_data: DemoDataConfig = Field(default_factory=DemoDataConfig)
    subset: SubsetConfig = Field(default_factory=SubsetConfig)
    region: RegionConfig = Field(default_factory=RegionConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    crop: CropConfig = Field(default_factory=CropConfig)
    reports: ReportsConfig = Field(default_factory=ReportsConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    map: MapConfig = Field(default_factory=MapConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _check_ranges(self) -> RunConfig:
        for section in ("tokenizer", "model", "train", "reference"):
            _run_validate(getattr(self, section), section)
        return self

    def section_dict(self, section: str) -> dict[str, Any]:
        """One section as plain values (what MLflow logs and YAML writes)."""
        value = getattr(self, section)
        return value.model_dump() if isinstance(value, BaseModel) else dataclasses.asdict(value)


SECTIONS: dict[str, type] = {name: info.annotation for name, info in RunConfig.model_fields.items()}
KNOWN_SECTIONS = set(SECTIONS) | {"extends"}


def apply_demo_data(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The built-in demo's overlay, the one place it is applied: when ``raw`` (a configuration as read,
    before validation) names no data (``data.path`` and ``data.files`` None), the ``default_data`` section's
    settings are laid over it — its cluster subset, region and crop; its label mapping (when set); its
    ``train`` settings beneath the user's own (unless the user set a budget, ``epochs`` or ``max_steps``);
    its ``reference`` unless the user named ``reference.label_columns``. Otherwise ``raw`` unchanged."""
    data = raw.get("data") or {}
    if not isinstance(data, Mapping) or data.get("path") is not None or data.get("files") is not None:
        return dict(raw)
    demo = _validated(RunConfig, {"default_data": raw.get("default_data") or {}}).default_data
    out = {
        section: dict(values) if isinstance(values, Mapping) else values for section, values in raw.items()
    }

    def section(name: str) -> dict[str, Any]:
        values = out.get(name) or {}
        if not isinstance(values, Mapping):  # refused, in one line, by the validation that follows
            return values
        out[name] = dict(values)
        return out[name]

    if isinstance(section("subset"), dict):
        out["subset"]["cluster_ids"] = list(demo.cluster_ids)
    if isinstance(section("region"), dict):
        out["region"]["value"] = demo.region
    if isinstance(section("crop"), dict):
        out["crop"].update(demo.crop)
    if demo.label_mapping is not None and isinstance(section("evaluate"), dict):
        out["evaluate"]["label_mapping"] = demo.label_mapping
    train = section("train")
    if isinstance(train, dict) and not {"epochs", "max_steps"} & set(train):
        out["train"] = {**demo.train, **train}
    reference = section("reference")
    if isinstance(reference, dict) and "label_columns" not in reference:
        out["reference"] = {**demo.reference, **reference}
    return out


# ---------------------------------------------------------------------------- one-line errors
_TYPE_WORDS = {
    "int_type": "is not an integer", "int_parsing": "is not an integer", "int_from_float": "is not an integer",
    "float_type": "is not a number", "float_parsing": "is not a number", "bool_type": "is not true or false",
    "bool_parsing": "is not true or false", "string_type": "is not a string", "list_type": "is not a list",
    "tuple_type": "is not a list", "set_type": "is not a list", "dict_type": "is not a mapping",
    "model_type": "is not a mapping", "model_attributes_type": "is not a mapping",
    "dataclass_type": "is not a mapping", "none_required": "must be null",
}  # fmt: skip


def _known_keys(loc: tuple[str, ...]) -> list[str]:
    """The keys valid at ``loc`` (a section path, e.g. ("evaluate", "probe"))."""
    cls: Any = RunConfig
    for part in loc:
        cls = field_types(cls).get(part)
    return list(field_types(cls)) if cls is not None else []


def field_types(cls: Any) -> dict[str, Any]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {name: info.annotation for name, info in cls.model_fields.items()}
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {field.name: hints[field.name] for field in dataclasses.fields(cls)}
    return {}


def is_section(cls: Any) -> bool:
    return (isinstance(cls, type) and issubclass(cls, BaseModel)) or dataclasses.is_dataclass(cls)


def _split(loc: tuple) -> tuple[tuple[str, ...], str]:
    """(section path, key) of an error location: the longest prefix that names a section class."""
    cls: Any = RunConfig
    path: list[str] = []
    for index, part in enumerate(loc):
        types = field_types(cls)
        if not isinstance(part, str) or part not in types or not is_section(types[part]):
            rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[index:]).lstrip(".")
            return tuple(path), rest
        cls = types[part]
        path.append(part)
    return tuple(path[:-1]), path[-1] if path else ""


def _nearest(unknown: list[str], known) -> str:
    """`` (did you mean …?)`` naming the nearest known key of each unknown one that has one."""
    hints = [
        f"{key} → {match[0]}" for key in unknown if (match := difflib.get_close_matches(key, list(known), 1))
    ]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def config_error(error: ValidationError) -> NeurofmError:
    """One line for a refused configuration: the unknown keys of the first section that has some (with the
    nearest valid key), else the first bad value, named ``section.key``."""
    problems = error.errors()
    unknown: dict[tuple[str, ...], list[str]] = {}
    for problem in problems:
        if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            path, key = tuple(problem["loc"][:-1]), str(problem["loc"][-1])
            unknown.setdefault(path, []).append(key)
    if unknown:
        path, keys = next(iter(unknown.items()))
        known = _known_keys(path)
        if not path:
            return NeurofmError(
                f"unknown config section(s) {', '.join(keys)}{_nearest(keys, known)}; "
                f"known sections: {', '.join(sorted(known))}"
            )
        return NeurofmError(
            f"unknown key(s) {', '.join(keys)} in config section '{'.'.join(path)}'{_nearest(keys, known)}; "
            f"known keys: {', '.join(known)}"
        )
    problem = problems[0]
    path, key = _split(tuple(problem["loc"]))
    words = _TYPE_WORDS.get(problem["type"])
    if words is None and problem["type"] == "literal_error":
        words = f"is not one of {problem['ctx']['expected']}"
    if words is None:
        words = f"is refused ({problem['msg'].removeprefix('Value error, ')})"
    if words == "is not a mapping" and key and not path:
        return NeurofmError(
            f"config section '{key}' must be a mapping, got {type(problem['input']).__name__}"
        )
    if words == "is not a mapping" and is_section(field_types(_section_class(path)).get(key)):
        return NeurofmError(
            f"config section '{'.'.join((*path, key))}' must be a mapping, got {problem['input']!r}"
        )
    where = ".".join(path) or "(top level)"
    return NeurofmError(f"bad value in config section '{where}': {key}={problem['input']!r} {words}")


def _section_class(path: tuple[str, ...]) -> Any:
    cls: Any = RunConfig
    for part in path:
        cls = field_types(cls).get(part)
    return cls


def _validated(cls: type[BaseModel], raw: Mapping[str, Any]) -> Any:
    try:
        return cls.model_validate(raw)
    except ValidationError as error:
        raise config_error(error) from None


def validate(raw: Mapping[str, Any] | RunConfig) -> RunConfig:
    """The :class:`RunConfig` of ``raw`` (a configuration as read: sections of keys): the demo's overlay
    (:func:`apply_demo_data`) laid on, every key and value checked, defaults filled. Refuses an unknown
    section or key, a wrong type or an out-of-range value in one line (:func:`config_error`)."""
    if isinstance(raw, RunConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise NeurofmError(f"a configuration must be a mapping of sections, got {type(raw).__name__}")
    raw = {key: value for key, value in raw.items() if key != "extends"}
    return _validated(RunConfig, apply_demo_data(raw))


def validate_section(name: str, values: Mapping[str, Any]) -> Any:
    """One section of the tree from ``values``, checked as a file's would be (one-line errors)."""
    return getattr(_validated(RunConfig, {name: dict(values)}), name)


def with_values(config: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """A copy of ``config`` with each dotted ``section.key`` of ``values`` set, checked as a file's would be
    (the demo's overlay is already in ``config``)."""
    raw = config.model_dump()
    for dotted, value in values.items():
        set_path(raw, dotted.split("."), value)
    return _validated(RunConfig, raw)


def load_config(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    values: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read ``path`` (with ``extends``), apply ``section.key=value`` overrides, then ``values`` (dotted key →
    Python value, e.g. the command line's ``--data``), and :func:`validate` the result."""
    raw = read_yaml(Path(path)) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        set_path(raw, keys, value)
    for dotted, value in (values or {}).items():
        set_path(raw, dotted.split("."), value)
    return validate(raw)
