"""Run configurations: YAML files → validated nested dicts.

A configuration is a YAML mapping of sections (``data``, ``subset``, ``region``, ``dedupe``, ``crop``,
``tokenizer``, ``model``, ``train``, ``evaluate``, ``tracking``, ``tune``, ``resources`` …). A file
may start with ``extends: other.yaml`` (relative to itself) to inherit and override another one.
Unknown sections or keys are refused with a one-line error naming the known ones, so a typo never
silently falls back to a default. Sections backed by a dataclass (``model`` → ``ModelConfig``…)
are validated by building that dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from neurofm.errors import NeurofmError

MIN_GENE_OVERLAP = 0.5  # share of the model's genes that must be found in the data (evaluate, map, embed)
SCARCHES_QUERY_EPOCHS = 200  # scArches' query training (scvi-tools' reference-mapping tutorial)
MAP_BASELINES = ("pca_ref", "logcounts", "scarches")  # the map pipeline's baselines (neurofm.evaluate.transfer)

# Sections whose keys are checked against a dataclass: section → "module:Class".
DATACLASS_SECTIONS = {
    "tokenizer": "neurofm.tokenizer:TokenizerConfig",
    "model": "neurofm.model:ModelConfig",
    "train": "neurofm.train:TrainConfig",
    "reference": "neurofm.mapping:ReferenceConfig",
}

# Sections with free-form but known keys (the defaults; YAML may override each key).
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "path": None,  # .h5ad of raw counts; None → the built-in synthetic atlas (see default_data)
        # several .h5ad files pre-trained as one cell store (instead of path; `neurofm convert A B … OUT`):
        # a list of paths or {path, batch_column, gene_column, name} mappings; None → path
        "files": None,
        "metadata_csv": None,  # Allen-style cell_metadata.csv for the cluster join (None → no subset)
        "cluster_csv": None,  # cluster.csv, for the atlas plot
        "annotation_csv": None,  # cluster_annotation_term.csv, for the atlas plot
        "layer": None,  # counts layer; None → layers['counts'] if present, else X
        "out_dir": "outputs",  # where .h5ad, reports, checkpoints and evaluation land
    },
    "default_data": {  # the built-in synthetic atlas, used only when data.path is None
        "n_cells": 12000,
        "n_genes": 1200,
        "seed": 0,
        "cluster_ids": [2523, 210],  # the generator's layer-5 excitatory + MGE inhibitory pair
        "region": "Cerebral cortex",
        "crop": {"n_cells": 1200, "n_genes": 800},
        "label_mapping": None,  # None → evaluate.label_mapping (2523 excitatory, 210 inhibitory)
        # train settings for the built-in data only, beneath the user's own train keys: the demo pre-trains
        # 10 epochs (your data: train.epochs, 30) so the first run ends in a few minutes; its report says so
        "train": {"epochs": 10},
        # the reference the demo's model carries for `neurofm map` (your data: reference.label_columns)
        "reference": {"label_columns": ["subtype"]},
    },
    "subset": {
        "cluster_ids": [],  # empty → keep every cell (no metadata join)
        "obs_name_column": "cell_label",
        "cluster_column": "cluster_alias",
        "label_prefix": "cluster_",
        "chunk_size": 20000,
    },
    "region": {"column": "anatomical_division_label", "value": None},  # value None → keep all
    "dedupe": {"genes": "make_unique", "cells": "make_unique", "gene_column": None, "cell_column": None},
    "crop": {  # n_cells / n_genes None → keep all
        "n_cells": None,
        "n_genes": None,
        "min_detection": 0.05,
        "detection_backoff": 0.5,
        "min_detection_floor": 0.001,
        "alpha": 1.0,
        "beta": 0.5,
        "n_strata": 4,
        "drop_all_zero": True,
        "seed": 42,
        "report_csv": True,
    },
    "reports": {"value_counts_column": "subtype", "atlas_top_k": 8},
    "evaluate": {
        "model": None,  # None → newest registered version; or models:/name@alias, runs:/…, a directory
        "label_column": "subtype",
        "label_mapping": {"cluster_2523": "excitatory", "cluster_210": "inhibitory"},
        "group_column": None,  # e.g. c1_chip: the probe split keeps these groups apart
        "gene_column": None,  # var column naming the data's genes (e.g. gene_symbol); None → var_names
        "min_gene_overlap": MIN_GENE_OVERLAP,  # share of the model's genes that must be found in the data
        "unobserved": "exclude",  # model genes the data lacks: "exclude" (left out of pooling) or "zero"
        "pooling": "auto",  # auto: as the model pooled in pre-training
        "batch_size": 256,
        "pca_components": 50,
        "baselines": ["pca", "scvi", "random"],  # scVI trains on the evaluation cells (minutes on a CPU)
        "scvi_latent": 10,  # scvi-tools' default latent size
        "scvi_max_epochs": None,  # None → scvi-tools' rule min(round(20000 / n_cells * 400), 400), early stop
        "max_cells_cluster": 20000,  # kNN-Leiden on a seeded sample above this many cells (null: all)
        "max_cells_visualize": 10000,  # t-SNE/UMAP on a seeded sample above this many cells (null: all)
        "probe": {},  # ProbeConfig overrides
        "cluster": {},  # clustering overrides (n_neighbors, metric, resolution…)
        "label_efficiency_shots": [5, 10, 25, 50, "all"],
        "label_efficiency_draws": 10,
        "promote": True,  # move the `champion` alias when the rule in evaluate.compare allows it
    },
    "map": {  # the map pipeline: a query mapped onto a model's reference (neurofm.mapping)
        "model": None,  # None → newest registered version; models:/name@alias, runs:/…, a directory
        "label_columns": None,  # reference columns to transfer; None → all the reference has
        "query_label_column": None,  # the query's true labels (scores the transfer); None → no scores
        "batch_column": None,  # the query's batches (donor, chip…): scArches' batch key
        "gene_column": None,  # var column naming the query's genes (e.g. gene_symbol); None → var_names
        "min_gene_overlap": MIN_GENE_OVERLAP,  # share of the model's genes that must be found in the query
        "reference_data": None,  # the reference cells' .h5ad for the baselines; None → the one recorded
        "baselines": list(MAP_BASELINES),  # fit on the reference only, same protocol
        "scarches_query_epochs": SCARCHES_QUERY_EPOCHS,  # scvi-tools' reference-mapping tutorial
        "max_cells_score": 20000,  # scored/clustered on a seeded query sample above this many cells
    },
    "tracking": {
        "tracking_uri": None,  # None → $MLFLOW_TRACKING_URI or sqlite under $NEUROFM_HOME
        "experiment": "neurofm",
        "registered_model_name": "neurofm-encoder",
        "register": True,
    },
    "tune": {
        "n_trials": 20,
        # perplexity_ratio: validation perplexity / the per-gene frequency table's on the same bins and masks
        # (comparable across tokenizer.n_bins, unlike val_loss); probe_auc, fewshot5_f1 and ari_optimised
        # score the embedding of the validation cells by the evaluation's protocol (neurofm.tune)
        "objective": "perplexity_ratio",
        "storage": None,  # None → <out_dir>/study.journal (Optuna journal file); or an Optuna storage URL
        "study_name": "neurofm-pretrain",
        "seed": 42,
        "pruner": {"n_startup_trials": 3, "n_warmup_steps": 1},  # median pruning on the per-epoch curve
        "epochs": 3,  # per trial (None → train.epochs; the best config keeps the pretrain one)
        "best_config_out": "configs/pretrain.best.yaml",
        "space": {},
    },
    "resources": {  # ZenML step settings for pretrain/embed; ignored by the local orchestrator
        "gpu_count": 0,
        "cpu_count": None,
        "memory": None,
        "parent_image": None,
        "requirements": None,
        "steps": ["pretrain_model", "embed_cells"],
    },
}

KNOWN_SECTIONS = set(DEFAULTS) | set(DATACLASS_SECTIONS) | {"extends"}


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``2E5`` as floats (YAML 1.2), not as strings (PyYAML's 1.1)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise NeurofmError(f"config {path} extends itself in a cycle; remove the circular 'extends'")
    if not path.is_file():
        raise NeurofmError(f"config file {path} does not exist; pass an existing YAML file with --config")
    try:
        loaded = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise NeurofmError(
            f"config {path} is not valid YAML ({str(error).splitlines()[0]}); fix the syntax"
        ) from None
    if not isinstance(loaded, dict):
        raise NeurofmError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
    base = loaded.pop("extends", None)
    if base is None:
        return loaded
    return deep_merge(_read_yaml(path.parent / base, (*seen, path)), loaded)


# Mappings that are data, not settings: an override replaces them whole instead of merging into them
# (a label mapping {a: x} must not inherit the keys of the default mapping).
REPLACED_WHOLE = {"label_mapping", "space"}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` onto ``base`` (dicts merge, everything else replaces; the
    mappings named in ``REPLACED_WHOLE`` are replaced whole)."""
    merged = dict(base)
    for key, value in override.items():
        if key not in REPLACED_WHOLE and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dataclass_from_dict(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """Build dataclass ``cls`` from ``values`` and run its ``validate()`` (if it has one), refusing
    unknown keys and out-of-range or wrongly typed values with a clear error."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise NeurofmError(
            f"unknown key(s) {', '.join(unknown)} in config section '{section}'{_nearest(unknown, names)}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    try:
        instance = cls(**dict(values))
        if callable(getattr(instance, "validate", None)):
            instance.validate()
    except (TypeError, ValueError) as error:
        raise NeurofmError(f"bad value in config section '{section}': {error}") from None
    return instance


def _nearest(unknown: list[str], known) -> str:
    """`` (did you mean …?)`` naming the nearest known key of each unknown one that has one."""
    import difflib

    hints = [f"{key} → {match[0]}" for key in unknown if (match := difflib.get_close_matches(key, list(known), 1))]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


# nested sections of `evaluate` checked against their dataclasses before anything runs: key → "module:Class"
NESTED_DATACLASSES = {
    "probe": "neurofm.classify:ProbeConfig",
    "cluster": "neurofm.evaluate.cluster:ClusterConfig",
}


def _dataclass_for(section: str) -> type:
    module, _, name = DATACLASS_SECTIONS[section].partition(":")
    return getattr(importlib.import_module(module), name)


def validate(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults, refuse unknown sections/keys, and build dataclass sections to check ranges."""
    unknown = sorted(set(config) - KNOWN_SECTIONS)
    if unknown:
        raise NeurofmError(
            f"unknown config section(s) {', '.join(unknown)}{_nearest(unknown, KNOWN_SECTIONS)}; "
            f"known sections: {', '.join(sorted(KNOWN_SECTIONS - {'extends'}))}"
        )
    full: dict[str, Any] = {}
    for section, defaults in DEFAULTS.items():
        values = config.get(section) or {}
        if not isinstance(values, Mapping):
            raise NeurofmError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
        extra = sorted(set(values) - set(defaults))
        if extra:
            raise NeurofmError(
                f"unknown key(s) {', '.join(extra)} in config section '{section}'{_nearest(extra, defaults)}; "
                f"known keys: {', '.join(defaults)}"
            )
        full[section] = deep_merge(defaults, values)
    builtin_data = full["data"]["path"] is None and full["data"]["files"] is None  # the synthetic atlas
    for section in DATACLASS_SECTIONS:
        values = config.get(section) or {}
        if not isinstance(values, Mapping):
            raise NeurofmError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
        if section == "train" and builtin_data:  # the built-in data's own budget
            demo = full["default_data"]["train"] or {}
            if not isinstance(demo, Mapping):
                raise NeurofmError(
                    "default_data.train must be a mapping of train settings, e.g. {epochs: 10}"
                )
            budget_keys = {"epochs", "max_steps"}
            values = {**demo, **values} if not budget_keys & set(values) else dict(values)
        if section == "reference" and builtin_data and "label_columns" not in values:
            values = {**(full["default_data"]["reference"] or {}), **values}
        instance = dataclass_from_dict(_dataclass_for(section), values, section)
        full[section] = dataclasses.asdict(instance)
    _check_evaluate(full["evaluate"])
    _check_map(full["map"])
    _check_data_files(full["data"])
    return full


def _check_data_files(data: Mapping[str, Any]) -> None:
    """``data.files``: None, or a non-empty list of paths / {path, batch_column, gene_column, name}
    mappings, not together with ``data.path``."""
    files = data["files"]
    if files is None:
        return
    if not isinstance(files, list) or not files:
        raise NeurofmError(
            f"data.files must be a list of .h5ad paths or {{path, batch_column, gene_column}} mappings, got {files!r}"
        )
    if data["path"] is not None:
        raise NeurofmError("data.path and data.files are both set; use data.files alone for several files")
    for entry in files:
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - {"path", "batch_column", "gene_column", "name"})
            if unknown or not isinstance(entry.get("path"), str):
                raise NeurofmError(
                    f"data.files entry {dict(entry)} has unknown keys {unknown} or no path; use "
                    "{path: FILE.h5ad, batch_column: COL, gene_column: COL}"
                )
        elif not isinstance(entry, str):
            raise NeurofmError(f"data.files entry {entry!r} is neither a path nor a mapping with a path")


EVALUATE_BASELINES = ("pca", "scvi", "random")
POOLINGS = ("auto", "mean", "mean_nonzero", "max")  # neurofm.embedding.POOLINGS (config stays torch-free)
UNOBSERVED_MODES = ("exclude", "zero")  # neurofm.embedding.UNOBSERVED_MODES


def _check_evaluate(evaluate: Mapping[str, Any]) -> None:
    for key, target in NESTED_DATACLASSES.items():  # evaluate.probe.*, evaluate.cluster.*: refused now
        values = evaluate[key]
        if not isinstance(values, Mapping):
            raise NeurofmError(f"evaluate.{key} must be a mapping of settings, got {values!r}")
        module, _, name = target.partition(":")
        dataclass_from_dict(getattr(importlib.import_module(module), name), values, f"evaluate.{key}")
    baselines = evaluate["baselines"]
    if (
        not isinstance(baselines, list)
        or not set(baselines) <= set(EVALUATE_BASELINES)
        or "pca" not in baselines
    ):
        raise NeurofmError(
            f"evaluate.baselines={baselines!r} must be a list drawn from {list(EVALUATE_BASELINES)} that holds "
            "pca (the champion rule needs it); e.g. [pca, scvi, random]"
        )
    for key in ("max_cells_cluster", "max_cells_visualize"):
        value = evaluate[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 100):
            raise NeurofmError(f"evaluate.{key}={value!r} must be an integer >= 100 or null (all cells)")
    for key, allowed in (("pooling", POOLINGS), ("unobserved", UNOBSERVED_MODES)):
        if evaluate[key] not in allowed:
            raise NeurofmError(f"evaluate.{key}={evaluate[key]!r} must be one of {', '.join(allowed)}")
    epochs, latent = evaluate["scvi_max_epochs"], evaluate["scvi_latent"]
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise NeurofmError(f"evaluate.scvi_max_epochs={epochs!r} must be a positive integer or null")
    if not isinstance(latent, int) or latent < 2:
        raise NeurofmError(f"evaluate.scvi_latent={latent!r} must be an integer >= 2, e.g. 10")


def _check_map(settings: Mapping[str, Any]) -> None:
    baselines = settings["baselines"]
    if not isinstance(baselines, list) or not set(baselines) <= set(MAP_BASELINES):
        raise NeurofmError(
            f"map.baselines={baselines!r} must be a list drawn from {list(MAP_BASELINES)}; e.g. [pca_ref, logcounts]"
        )
    columns = settings["label_columns"]
    if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
        raise NeurofmError(f"map.label_columns={columns!r} must be a list of column names or null (all)")
    epochs = settings["scarches_query_epochs"]
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise NeurofmError(f"map.scarches_query_epochs={epochs!r} must be a positive integer, e.g. 200")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value as YAML) into (["section", "key"], value)."""
    if "=" not in text:
        raise NeurofmError(f"--set {text!r} is not of the form section.key=value; e.g. --set train.epochs=5")
    dotted, _, raw = text.partition("=")
    keys = [part for part in dotted.strip().split(".") if part]
    if len(keys) < 2:
        raise NeurofmError(f"--set {text!r} must name a section and a key, e.g. --set train.epochs=5")
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError:
        value = raw
    return keys, value


def set_path(config: dict[str, Any], keys: list[str], value: Any) -> None:
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise NeurofmError(f"cannot set {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def load_config(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    values: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read ``path`` (with ``extends``), apply ``section.key=value`` overrides, then ``values`` (dotted key →
    Python value, e.g. the command line's ``--data``), validate, fill defaults."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        set_path(raw, keys, value)
    for dotted, value in (values or {}).items():
        set_path(raw, dotted.split("."), value)
    return validate(raw)


# ------------------------------------------------------------------------------- the reference page


def _comments(source: str) -> dict[int, str]:
    """Line number → what the comments say of it: its trailing ``#`` comment continued by the deeper-indented
    comment-only lines below it (``#      …``), or else the comment-only lines right above it."""
    import io
    import tokenize

    raw: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            raw[token.start[0]] = token.string
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
            code_lines.add(token.start[0])

    def text(line: int) -> str:
        return raw[line].lstrip("#").strip()

    merged: dict[int, str] = {}
    for line in sorted(code_lines):
        if line in raw:
            parts, follow = [text(line)], line + 1
            while follow in raw and follow not in code_lines and raw[follow].startswith("#   "):
                parts.append(text(follow))
                follow += 1
            merged[line] = " ".join(parts)
        else:
            above, before = [], line - 1
            while before in raw and before not in code_lines and not raw[before].startswith("#   "):
                above.insert(0, text(before))
                before -= 1
            if above:
                merged[line] = " ".join(above)
    return merged


def _end_comment(node, comments: dict[int, str]) -> str:
    return next((comments[line] for line in range(node.lineno, node.end_lineno + 1) if line in comments), "")


def _defaults_comments() -> dict[str, dict[str, str]]:
    """``{section: {key: comment}}`` from this module's ``DEFAULTS`` literal."""
    import ast

    source = Path(__file__).read_text()
    comments = _comments(source)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "DEFAULTS":
            out: dict[str, dict[str, str]] = {}
            for section, body in zip(node.value.keys, node.value.values, strict=True):
                out[section.value] = {
                    key.value: _end_comment(value, comments) or comments.get(key.lineno, "")
                    for key, value in zip(body.keys, body.values, strict=True)
                }
            return out
    return {}


def _dataclass_comments(cls: type) -> dict[str, str]:
    import ast
    import inspect

    source = Path(inspect.getsourcefile(cls)).read_text()
    comments = _comments(source)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return {
                item.target.id: _end_comment(item, comments)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    return {}


def configuration_markdown() -> str:
    """``docs/configuration.md``: every section and key with its default and its comment, generated from
    ``DEFAULTS`` and the dataclasses (``python -m neurofm.config > docs/configuration.md``)."""

    def shown(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        text = text.removesuffix("...").strip()
        return f"`{text}`".replace("|", "\\|")

    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m neurofm.config > docs/configuration.md` from `neurofm/config.py` (`DEFAULTS`)",
        "and the settings dataclasses; `tests/test_config.py` fails when it is stale. YAML files under",
        "`configs/` override these defaults; `--set section.key=value` overrides one value.",
        "",
    ]
    comments = _defaults_comments()
    sections: list[tuple[str, dict[str, Any], dict[str, str], str]] = []
    for section, defaults in DEFAULTS.items():
        sections.append((section, defaults, comments.get(section, {}), "`neurofm/config.py`"))
    nested = {"evaluate.probe": "neurofm.evaluate.probe:ProbeConfig",
              "evaluate.cluster": "neurofm.evaluate.cluster:ClusterConfig",
              "reference.head": "neurofm.classify:HeadConfig"}  # fmt: skip
    for section, spec in {**DATACLASS_SECTIONS, **nested}.items():
        module, _, name = spec.partition(":")
        cls = getattr(importlib.import_module(module), name)
        values = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        sections.append((section, values, _dataclass_comments(cls), f"`{spec.replace(':', '.')}`"))
    for section, values, notes, where in sections:
        lines += [f"## `{section}`", "", f"Defaults from {where}.", "", "| key | default | meaning |", "|---|---|---|"]
        for key, value in values.items():
            note = notes.get(key, "").replace("|", "\\|")
            default = f"see `{section}.{key}`" if dataclasses.is_dataclass(value) else shown(value)
            lines.append(f"| `{key}` | {default} | {note} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(configuration_markdown(), end="")
