"""A reference in a model directory: ``reference.safetensors`` + ``reference.json``, saved and loaded.

The reference (:class:`neurofm.reference.Reference`) lives in the model directory beside the weights, so a
registered MLflow model carries it:

- ``reference.safetensors`` — the reference cells' embedding (``embedding``, cells × dims, float32);
  per label column ``C``: ``C/codes`` (int32 per cell), the label head (``C/head/mean``, ``/scale``,
  ``/w0``, ``/b0``, …) and the calibration (``C/calibration``: per label, sorted quantiles of the
  reference cells' own neighbour distances);
- ``reference.json`` — format, label columns, classes, the head of each column (the features it reads,
  its held-out macro-F1), the unknown rule, counts per label, the cells' source and how they were sampled.

No pickle. A version-1 reference (a classifier of the probe menu on the embedding) still loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from neurofm.classify import LabelHead, probe_from_json
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, write_json
from neurofm.reference import ColumnReference, Reference, ReferenceConfig

REFERENCE_FILE = "reference.safetensors"
REFERENCE_META = "reference.json"
REFERENCE_FORMAT = "neurofm-reference"
REFERENCE_FORMAT_VERSION = 2  # 2: label heads; 1: a probe-menu classifier on the embedding (still loads)


def has_reference(model_dir: str | os.PathLike) -> bool:
    """Whether the model directory holds a reference."""
    directory = Path(model_dir)
    return (directory / REFERENCE_FILE).is_file() and (directory / REFERENCE_META).is_file()


def save_reference(reference: Reference, model_dir: str | os.PathLike) -> Path:
    """Write ``reference.safetensors`` + ``reference.json`` into ``model_dir`` (atomically, each)."""
    from safetensors.numpy import save_file

    directory = Path(model_dir)
    tensors: dict[str, np.ndarray] = {
        "embedding": np.ascontiguousarray(reference.embedding, dtype=np.float32)
    }
    if reference.rows is not None:
        tensors["rows"] = np.asarray(reference.rows, dtype=np.int64)
    columns: dict[str, Any] = {}
    for column, ref in reference.columns.items():
        if not isinstance(ref.classifier, LabelHead):
            raise NeurofmError(
                f"column {column!r} has a version-1 classifier; rebuild the reference to save it"
            )
        tensors[f"{column}/codes"] = ref.codes.astype(np.int32)
        tensors[f"{column}/calibration"] = ref.calibration.astype(np.float64)
        tensors[f"{column}/pooled_calibration"] = ref.pooled_calibration.astype(np.float64)
        if ref.probability_calibration is not None:
            tensors[f"{column}/probability_calibration"] = ref.probability_calibration.astype(np.float64)
        tensors.update(ref.classifier.tensors(f"{column}/head"))
        columns[column] = {
            "classes": ref.classes,
            "classifier": ref.classifier_name,
            "head": ref.classifier.describe(),
            "counts": ref.counts(),
            **({} if ref.unknown_threshold is None else {"unknown_threshold": ref.unknown_threshold}),
        }
    with atomic_path(directory / REFERENCE_FILE) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": REFERENCE_FORMAT,
        "format_version": REFERENCE_FORMAT_VERSION,
        "config": {**asdict(reference.config), "label_columns": list(reference.config.label_columns)},
        "columns": columns,
        "n_cells": reference.n_cells,
        "meta": reference.meta,
    }
    write_json(meta, directory / REFERENCE_META)
    return directory


def _classifier(column: str, info: dict[str, Any], tensors: dict[str, np.ndarray], codes: np.ndarray,
                embedding: np.ndarray, classes: list[str]) -> Pipeline:  # fmt: skip
    def vector(name: str):
        key = f"{column}/{name}"
        return tensors[key].tolist() if key in tensors else None

    data: dict[str, Any] = {
        "format": "neurofm-linear-probe",
        "classifier": info["classifier"],
        "kind": info["kind"],
        "classes": info["classifier_classes"],
        "n_features": int(embedding.shape[1]),
        "params": info["params"],
        "scaler_mean": vector("scaler_mean"),
        "scaler_scale": vector("scaler_scale"),
    }
    if info["kind"] == "knn":
        data["train_embedding"] = embedding
        data["train_labels"] = np.asarray(classes, dtype=object)[codes]
    else:
        data["coef"], data["intercept"] = tensors[f"{column}/coef"], tensors[f"{column}/intercept"]
    return probe_from_json(data)


def load_reference(model_dir: str | os.PathLike) -> Reference:
    """The reference stored in ``model_dir``; a model without one is a :class:`NeurofmError` naming the fix."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(model_dir)
    if not has_reference(directory):
        raise NeurofmError(
            f"the model in {directory} has no reference to map onto; pre-train with --reference-labels COL, "
            f"or attach one: neurofm reference {directory} CELLS.h5ad --labels COL"
        )
    try:
        meta = json.loads((directory / REFERENCE_META).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / REFERENCE_FILE))
    except (ValueError, OSError, SafetensorError) as error:
        raise NeurofmError(
            f"the reference in {directory} is unreadable ({str(error)[:80]}); rebuild it with neurofm reference"
        ) from None
    if meta.get("format") != REFERENCE_FORMAT or meta.get("format_version") not in (
        1,
        REFERENCE_FORMAT_VERSION,
    ):
        raise NeurofmError(
            f"{directory / REFERENCE_META} is not a version-{REFERENCE_FORMAT_VERSION} neurofm reference; "
            "rebuild it with neurofm reference"
        )
    settings = dict(meta["config"])
    settings["label_columns"] = tuple(settings["label_columns"])
    try:
        config = ReferenceConfig(**settings)
    except TypeError as error:
        raise NeurofmError(
            f"{directory / REFERENCE_META} has bad settings ({error}); rebuild it with neurofm reference"
        ) from None
    embedding = tensors["embedding"]
    columns: dict[str, ColumnReference] = {}
    for column, info in meta["columns"].items():
        codes = tensors[f"{column}/codes"].astype(np.int64)
        if "head" in info:
            classifier = LabelHead.from_tensors(tensors, f"{column}/head", info["classes"], info["head"])
        else:  # version 1
            classifier = _classifier(column, info, tensors, codes, embedding, info["classes"])
        columns[column] = ColumnReference(
            column=column,
            classes=list(info["classes"]),
            codes=codes.astype(np.int32),
            classifier=classifier,
            classifier_name=info["classifier"],
            calibration=tensors[f"{column}/calibration"],
            pooled_calibration=tensors[f"{column}/pooled_calibration"],
            probability_calibration=tensors.get(f"{column}/probability_calibration"),
            unknown_threshold=info.get("unknown_threshold"),
        )
    rows = tensors.get("rows")
    return Reference(
        embedding=embedding, columns=columns, config=config, meta=meta.get("meta", {}), rows=rows
    )
