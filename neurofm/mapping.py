"""Reference mapping: a reference stored with the model, label transfer to new cells, ``unknown``.

A model pre-trained once is reused on cells it never saw (another donor, study or technology): the
query is embedded with the frozen model and each cell gets the label of the reference cells it lands
among, or ``unknown`` where it matches none of them.

**The reference** (:class:`Reference`, built by :func:`build_reference`, attached to a model directory
by :func:`add_reference` or by ``pretrain`` with ``reference.label_columns``) lives in the model
directory beside the weights, so a registered MLflow model carries it:

- ``reference.safetensors`` — the reference cells' embedding (``embedding``, cells × dims, float32);
  per label column ``C``: ``C/codes`` (int32 per cell), the label head (``C/head/mean``, ``/scale``,
  ``/w0``, ``/b0``, …) and the calibration (``C/calibration``: per label, sorted quantiles of the
  reference cells' own neighbour distances);
- ``reference.json`` — format, label columns, classes, the head of each column (the features it reads,
  its held-out macro-F1), the unknown rule, counts per label, the cells' source and how they were sampled.

No pickle. **The classifier** of a column is a label head (:class:`neurofm.classify.LabelHead`, settings
``reference.head``): a softmax network trained on the reference cells' labels, reading the
log-normalised expression of the model's genes, the model's embedding, or both — by default whichever of
the three scores best on a held-out share of the reference cells (the query is never seen). It trains in
seconds even at a hundred labels. A version-1 reference (a classifier of the probe menu on the
embedding) still loads and maps.

**Unknown.** A query cell predicted as label ``L`` is checked twice. (1) Its *distance to L*: the mean
Euclidean distance in the embedding to its ``calibration_neighbors`` nearest reference cells of ``L``;
the same distance of ``L``'s own reference cells (each leaving itself out) is the calibration, and the
cell's *distance score* is the share of them at least as far from ``L`` (1 = as close as a typical
reference cell, 0 = farther than all of them); labels with fewer than ``min_calibration_cells`` reference
cells share the pooled calibration. (2) The head's *probability* of ``L``: its *probability score* is the
share of the held-out reference cells (the head never trained on them) whose label the head gave a
probability at most as high. The cell's **score** is the lower of the two — it fails if either check
fails — and it is ``unknown`` below the column's ``unknown_threshold``: the score below which
``1 - unknown_quantile`` of the held-out reference cells fall (default 5 %), so about that share of the
cells of known types is called unknown, whatever the two checks' mix. A reference built before the
probability check (no ``probability_calibration``) uses the distance score alone, unknown below
``1 - unknown_quantile``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline

from neurofm.cell_features import BLOCK, cell_batches, expression_matrix, reference_features
from neurofm.classify import HeadConfig, LabelHead, fit_head, head_features, held_out_share, probe_from_json
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, write_json

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.safetensors"
REFERENCE_META = "reference.json"
REFERENCE_FORMAT = "neurofm-reference"
REFERENCE_FORMAT_VERSION = 2  # 2: label heads; 1: a probe-menu classifier on the embedding (still loads)
UNKNOWN = "unknown"
N_QUANTILES = 201  # stored calibration quantiles per label (0 %, 0.5 %, …, 100 %)


@dataclass(frozen=True)
class ReferenceConfig:
    """How a reference is built from labelled cells and how ``unknown`` is decided."""

    label_columns: tuple[str, ...] = ()  # obs columns whose labels are transferred (empty: no reference)
    max_cells: int = (
        200_000  # a seeded sample above this many cells (every label keeps ≥ min_cells_per_label)
    )
    min_cells_per_label: int = 50  # cells of each label kept by the sample (all, when it has fewer)
    calibration_neighbors: int = 15  # k of the distance to a label
    calibration_max_cells: int = 2000  # reference cells per label whose own distances calibrate it
    min_calibration_cells: int = 10  # fewer cells than this: the label uses the pooled calibration
    unknown_quantile: float = 0.95  # the share of held-out reference cells (known types) the unknown rule
    #                                 keeps: 1 - it are called unknown, and query cells scoring as low too
    #                                 (1.0: never unknown; before 2026-12-07: 0.99, the distance alone)
    seed: int = 0  # the sample and the calibration cells
    head: HeadConfig = field(default_factory=HeadConfig)  # the label head of every column

    def __post_init__(self) -> None:
        if isinstance(self.head, dict):  # from a configuration file or reference.json
            object.__setattr__(self, "head", HeadConfig(**self.head))

    def validate(self) -> ReferenceConfig:
        self.head.validate()
        if not 0.5 <= self.unknown_quantile <= 1.0:
            raise NeurofmError(
                f"reference.unknown_quantile={self.unknown_quantile} must be in [0.5, 1]; e.g. 0.95"
            )
        for name in ("max_cells", "calibration_neighbors", "calibration_max_cells", "min_calibration_cells"):
            if getattr(self, name) < 1:
                raise NeurofmError(
                    f"reference.{name}={getattr(self, name)} must be >= 1; pass a positive number"
                )
        if len(set(self.label_columns)) != len(self.label_columns):
            raise NeurofmError(
                f"reference.label_columns {list(self.label_columns)} repeats a column; name each once"
            )
        return self


@dataclass
class ColumnReference:
    """One label column of a reference: its classes, cell codes, fitted classifier and calibration."""

    column: str
    classes: list[str]
    codes: np.ndarray  # (n_cells,) int32 index into classes
    classifier: (
        LabelHead | Pipeline
    )  # a label head; a version-1 reference: a menu classifier on the embedding
    classifier_name: str
    calibration: np.ndarray  # (n_classes, N_QUANTILES) sorted distance quantiles; NaN row = pooled
    pooled_calibration: np.ndarray  # (N_QUANTILES,)
    # (N_QUANTILES,) sorted quantiles of the head's probability of the label it gave each held-out reference
    # cell, and the score below which a cell is unknown; None: a reference without the probability check
    probability_calibration: np.ndarray | None = None
    unknown_threshold: float | None = None

    def counts(self) -> dict[str, int]:
        values = np.bincount(self.codes, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, values, strict=True)}


@dataclass
class Reference:
    """Labelled reference cells in a model's embedding space (see the module docstring)."""

    embedding: np.ndarray  # (n_cells, dims) float32
    columns: dict[str, ColumnReference]
    config: ReferenceConfig
    meta: dict[str, Any] = field(default_factory=dict)  # source, store, sampling, pooling, …
    rows: np.ndarray | None = None  # the cells' rows in their source (store or AnnData), when known

    def labels(self, column: str) -> np.ndarray:
        """The reference cells' labels of ``column`` (strings)."""
        ref = self.columns[column]
        return np.asarray(ref.classes, dtype=object)[ref.codes]

    @property
    def n_cells(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def label_columns(self) -> list[str]:
        return list(self.columns)

    def describe(self) -> dict[str, Any]:
        """What ``reference.json`` and a map's ``uns`` record say about the reference."""
        return {
            "n_cells": self.n_cells,
            "embedding_dim": int(self.embedding.shape[1]),
            "label_columns": self.label_columns,
            "classifiers": {c: ref.classifier_name for c, ref in self.columns.items()},
            "unknown_quantile": self.config.unknown_quantile,
            "calibration_neighbors": self.config.calibration_neighbors,
            **self.meta,
        }


# ------------------------------------------------------------------------------------------ build


def sample_reference_cells(obs: pd.DataFrame, config: ReferenceConfig) -> np.ndarray:
    """Sorted row indices of the cells a reference keeps: all of them up to ``max_cells``; above, a seeded
    uniform sample plus up to ``min_cells_per_label`` cells of every label of every column."""
    n_cells = len(obs)
    if n_cells <= config.max_cells:
        return np.arange(n_cells)
    rng = np.random.default_rng(config.seed)
    keep = np.zeros(n_cells, dtype=bool)
    keep[rng.choice(n_cells, size=config.max_cells, replace=False)] = True
    for column in config.label_columns:
        codes = pd.Categorical(obs[column].astype(str)).codes
        for code in np.unique(codes):
            rows = np.flatnonzero(codes == code)
            if keep[rows].sum() < config.min_cells_per_label:
                keep[rng.permutation(rows)[: config.min_cells_per_label]] = True
    return np.flatnonzero(keep)


def _label_distances(index: NearestNeighbors, points: np.ndarray, k: int, leave_self_out: bool) -> np.ndarray:
    """Mean distance of each point to its ``k`` nearest cells of ``index`` (itself excluded if asked)."""
    n_index = index.n_samples_fit_
    if leave_self_out:
        k_used = min(k + 1, n_index)
        distances = index.kneighbors(points, n_neighbors=k_used)[0][:, 1:]
    else:
        distances = index.kneighbors(points, n_neighbors=min(k, n_index))[0]
    if distances.shape[1] == 0:
        return np.zeros(len(points))
    return distances.mean(axis=1)


def _quantiles(values: np.ndarray) -> np.ndarray:
    return (
        np.quantile(values, np.linspace(0.0, 1.0, N_QUANTILES))
        if len(values)
        else np.full(N_QUANTILES, np.nan)
    )


def _column_reference(
    embedding: np.ndarray,
    labels: np.ndarray,
    column: str,
    config: ReferenceConfig,
    expression: np.ndarray | None,
) -> ColumnReference:
    classes, codes = np.unique(labels.astype(str), return_inverse=True)
    classifier = fit_head(classes[codes], embedding, expression, config.head)
    name = classifier.name
    rng = np.random.default_rng(config.seed)
    calibration = np.full((len(classes), N_QUANTILES), np.nan)
    pooled: list[np.ndarray] = []
    for code in range(len(classes)):
        rows = np.flatnonzero(codes == code)
        if len(rows) < max(2, config.min_calibration_cells):
            continue
        index = NearestNeighbors().fit(embedding[rows])
        probe_rows = (
            rows
            if len(rows) <= config.calibration_max_cells
            else rng.choice(rows, config.calibration_max_cells, replace=False)
        )
        own = _label_distances(
            index, embedding[probe_rows], config.calibration_neighbors, leave_self_out=True
        )
        calibration[code] = _quantiles(own)
        pooled.append(own)
    pooled_values = np.concatenate(pooled) if pooled else np.zeros(1)
    ref = ColumnReference(
        column=column,
        classes=[str(c) for c in classes],
        codes=codes.astype(np.int32),
        classifier=classifier,
        classifier_name=name,
        calibration=calibration,
        pooled_calibration=_quantiles(pooled_values),
    )
    # the probability check and the threshold, on the reference cells the head never trained on
    held = np.flatnonzero(held_out_share(codes, config.head.validation_share, config.head.seed))
    if len(held) >= max(2, config.min_calibration_cells):
        features = head_features(classifier.features, None if expression is None else expression[held],
                                 embedding[held])  # fmt: skip
        probabilities = classifier.predict_proba(features)
        given = probabilities.argmax(axis=1)
        ref.probability_calibration = _quantiles(probabilities[np.arange(len(held)), given])
        distance = _distances_to_labels(embedding, ref.codes, embedding[held], given, config, self_rows=held)
        scores = np.minimum(
            _distance_scores(ref, given, distance),
            _score_below(probabilities[np.arange(len(held)), given], ref.probability_calibration),
        )
        ref.unknown_threshold = float(np.quantile(scores, 1.0 - config.unknown_quantile))
    return ref


def _distances_to_labels(
    embedding: np.ndarray,
    label_codes: np.ndarray,
    points: np.ndarray,
    codes: np.ndarray,
    config: ReferenceConfig,
    self_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Each point's mean distance to its ``calibration_neighbors`` nearest reference cells (``embedding``,
    labelled ``label_codes``) of its label ``codes``; ``self_rows``: the points' own rows in ``embedding``
    (each then leaves itself out)."""
    distance = np.zeros(len(points))
    k = config.calibration_neighbors
    for code in np.unique(codes):
        cells = np.flatnonzero(codes == code)
        rows = np.flatnonzero(label_codes == code)
        if len(rows) == 0:
            continue
        index = NearestNeighbors().fit(embedding[rows])
        if self_rows is None:
            distance[cells] = _label_distances(index, points[cells], k, leave_self_out=False)
            continue
        found, neighbours = index.kneighbors(points[cells], n_neighbors=min(k + 1, len(rows)))
        keep = rows[neighbours] != self_rows[cells][:, None]  # a point's own row is not its neighbour
        keep &= np.cumsum(keep, axis=1) <= k  # the k nearest others
        distance[cells] = (found * keep).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)
    return distance


def _distance_scores(ref: ColumnReference, codes: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """The distance score of each cell (its label ``codes``) from the labels' calibrations."""
    score = np.ones(len(distance))
    for code in np.unique(codes):
        cells = np.flatnonzero(codes == code)
        quantiles = ref.calibration[code]
        if np.isnan(quantiles).any():
            quantiles = ref.pooled_calibration
        score[cells] = _score_from_quantiles(distance[cells], quantiles)
    return score


def _score_below(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Share of calibration values at most each value (from their stored quantiles): the probability
    score — 0 for a probability below every held-out reference cell's."""
    levels = np.linspace(0.0, 1.0, N_QUANTILES)
    return np.interp(values, quantiles, levels, left=0.0, right=1.0)


def build_reference(
    embedding: np.ndarray,
    obs: pd.DataFrame,
    config: ReferenceConfig,
    expression: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
) -> Reference:
    """A :class:`Reference` of the cells ``embedding`` (rows of ``obs``) for ``config.label_columns``.

    ``expression`` (cells × the model's genes, log-normalised, NaN = unobserved; see
    :func:`expression_matrix`) lets the label heads read the genes too; without it they read the
    embedding only. Raises :class:`NeurofmError` when a column is absent, has fewer than two labels or
    cells without a label.
    """
    config = config.validate()
    if not config.label_columns:
        raise NeurofmError(
            "no label columns for the reference; pass --labels COL[,COL…] (run.py pretrain: --reference-labels)"
        )
    absent = [c for c in config.label_columns if c not in obs.columns]
    if absent:
        raise NeurofmError(
            f"the reference cells have no obs column(s) {absent} (columns: {list(obs.columns)[:20]}); "
            "name existing columns in --labels (run.py pretrain: --reference-labels)"
        )
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.shape[0] != len(obs):
        raise NeurofmError(f"{embedding.shape[0]} embeddings for {len(obs)} cells; pass one row per cell")
    if expression is not None and len(expression) != len(obs):
        raise NeurofmError(f"{len(expression)} expression rows for {len(obs)} cells; pass one row per cell")
    columns: dict[str, ColumnReference] = {}
    for column in config.label_columns:
        values = obs[column]
        labelled = values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy()
        labels = values.astype(str).to_numpy()
        if len(np.unique(labels[labelled])) < 2:
            raise NeurofmError(
                f"obs[{column!r}] of the reference cells has fewer than two labels; a reference needs two "
                "or more — name another column in --labels (run.py pretrain: --reference-labels)"
            )
        if not labelled.all():
            raise NeurofmError(
                f"obs[{column!r}] has {int((~labelled).sum())} cells without a label; fill them or drop "
                "those cells before building the reference"
            )
        columns[column] = _column_reference(embedding, labels, column, config, expression)
        log.info(
            "reference %s: %d labels, classifier %s", column, len(columns[column].classes),
            columns[column].classifier_name,
        )  # fmt: skip
    return Reference(embedding=embedding, columns=columns, config=config, meta=dict(meta or {}))


# ----------------------------------------------------------------------------------------- transfer


def _score_from_quantiles(distances: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Share of calibration cells at least as far as each distance (from their stored quantiles)."""
    levels = np.linspace(0.0, 1.0, N_QUANTILES)
    return 1.0 - np.interp(distances, quantiles, levels, left=0.0, right=1.0)


def _check_column(reference: Reference, column: str, flag: str = "--labels") -> ColumnReference:
    if column not in reference.columns:
        raise NeurofmError(
            f"the model's reference has no label column {column!r} (it has {reference.label_columns}); "
            f"pass one of those with {flag}, or rebuild the reference with that column"
        )
    return reference.columns[column]


def _check_query(reference: Reference, query_embedding: np.ndarray) -> np.ndarray:
    query = np.asarray(query_embedding, dtype=np.float32)
    if query.ndim != 2 or query.shape[1] != reference.embedding.shape[1]:
        raise NeurofmError(
            f"query embedding has shape {query.shape}, the reference {reference.embedding.shape[1]} dimensions; "
            "embed the query with the reference's model"
        )
    return query


def needs_expression(reference: Reference, columns: list[str] | None = None) -> bool:
    """Whether a label head of these columns (default: all) reads the cells' gene expression."""
    heads = [reference.columns[c].classifier for c in (columns or reference.label_columns)]
    return any(isinstance(h, LabelHead) and h.features != "embedding" for h in heads)


def predict_labels(
    reference: Reference, column: str, embedding: np.ndarray, expression: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, probability)``: each cell's predicted label (an index into the column's classes) and the
    classifier's probability of it. Call it on blocks of cells to bound memory."""
    ref = _check_column(reference, column)
    if isinstance(ref.classifier, LabelHead):
        probabilities = ref.classifier.predict_proba(
            head_features(ref.classifier.features, expression, embedding)
        )
    else:  # a version-1 reference: a menu classifier on the embedding
        probabilities = ref.classifier.predict_proba(np.asarray(embedding, dtype=np.float64))
    best = probabilities.argmax(axis=1)
    code_of = {name: code for code, name in enumerate(ref.classes)}
    to_code = np.array([code_of[str(name)] for name in ref.classifier.classes_], dtype=np.int64)
    return to_code[best], probabilities[np.arange(len(best)), best]


def label_frame(
    reference: Reference, column: str, query_embedding: np.ndarray, codes: np.ndarray, probability: np.ndarray
) -> pd.DataFrame:
    """The transfer frame of :func:`transfer_labels` from predicted ``codes`` (see :func:`predict_labels`):
    the unknown rule scores each cell by its distance to its predicted label's reference cells."""
    ref = _check_column(reference, column)
    query = _check_query(reference, query_embedding)
    distance = _distances_to_labels(reference.embedding, ref.codes, query, codes, reference.config)
    distance_score = _distance_scores(ref, codes, distance)
    score = distance_score
    if ref.probability_calibration is not None:
        score = np.minimum(distance_score, _score_below(np.asarray(probability), ref.probability_calibration))
    predicted = np.asarray(ref.classes, dtype=object)[codes]
    label = np.where(score < unknown_threshold(reference, column), UNKNOWN, predicted).astype(object)
    return pd.DataFrame(
        {
            "label": label,
            "predicted": predicted,
            "probability": probability,
            "score": score,
            "distance_score": distance_score,
            "distance": distance,
        }
    )


def unknown_threshold(reference: Reference, column: str) -> float:
    """The score below which a cell of ``column`` is ``unknown`` (see the module docstring)."""
    ref = reference.columns[column]
    if ref.unknown_threshold is not None:
        return ref.unknown_threshold
    return 1.0 - reference.config.unknown_quantile


def transfer_labels(
    reference: Reference, query_embedding: np.ndarray, column: str, expression: np.ndarray | None = None
) -> pd.DataFrame:
    """Predicted labels of query cells for one reference column.

    ``expression`` (the query cells' :func:`expression_matrix`) is needed when the column's head reads
    genes (:func:`needs_expression`). Returns a frame (one row per query cell): ``label`` (a reference
    label, or ``unknown``), ``predicted`` (the head's label before the unknown rule), ``probability`` (the
    head's probability of it), ``score`` (the calibrated match score in [0, 1], see the module
    docstring), ``distance`` (mean distance to the predicted label's nearest reference cells).
    """
    _check_column(reference, column)
    query = _check_query(reference, query_embedding)
    if expression is not None and len(expression) != len(query):
        raise NeurofmError(
            f"{len(expression)} expression rows for {len(query)} query cells; pass one row per cell"
        )
    codes, probability = predict_labels(reference, column, query, expression)
    return label_frame(reference, column, query, codes, probability)


# --------------------------------------------------------------------------------------- save / load


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


# --------------------------------------------------------------------------------- model directories


def add_reference(
    model_dir: str | os.PathLike,
    cells,
    config: ReferenceConfig,
    source: str | None = None,
    progress: bool = True,
    batch_key: str | None = None,
) -> Reference:
    """Embed ``cells`` (AnnData or ``CellStore``, with the label columns in obs) with the model in
    ``model_dir``, build their reference (:func:`build_reference`, heads reading genes and embedding)
    and store it in ``model_dir``. For a model whose count head has a batch covariate each cell is
    embedded with its batch: the obs column ``batch_key`` (default: the model's own, when the cells
    have it; else the no-batch vector)."""
    from neurofm.data.store import CellStore
    from neurofm.model import load_pretrained

    config = config.validate()
    directory = Path(model_dir)
    model, tokenizer = load_pretrained(directory)
    obs = cells.read_obs() if isinstance(cells, CellStore) else cells.obs
    absent = [c for c in config.label_columns if c not in obs.columns]
    if absent:
        raise NeurofmError(
            f"the reference cells have no obs column(s) {absent} (columns: {list(obs.columns)[:20]}); "
            "name existing columns in --labels (run.py pretrain: --reference-labels)"
        )
    rows = sample_reference_cells(obs, config)
    batches = cell_batches(model, cells, batch_key)
    embedding, expression = reference_features(
        model, tokenizer, cells, rows, progress=progress, batches=batches
    )
    meta = {
        "source": source,
        "store": str(cells.path) if isinstance(cells, CellStore) else None,
        "n_source_cells": int(len(obs)),
        "sampled": bool(len(rows) < len(obs)),
        "pooling": "auto",
        **({} if batches is None else {"batch_key": batch_key or model.config.batch_key}),
    }
    reference = build_reference(embedding, obs.iloc[rows], config, expression, meta=meta)
    reference.rows = rows
    save_reference(reference, directory)
    log.info(
        "reference of %d cells (%s) stored in %s",
        reference.n_cells,
        ", ".join(config.label_columns),
        directory,
    )
    return reference


def _resolve(model, tokenizer, reference, tracking_uri):
    from neurofm.embedding import resolve_model

    loaded, loaded_tokenizer, record = resolve_model(model, tokenizer, tracking_uri)
    if reference is None:
        if "model_dir" not in record:
            raise NeurofmError("a loaded model needs its reference: pass reference=, or a model directory")
        reference = load_reference(record["model_dir"])
    return loaded, loaded_tokenizer, record, reference


def _transfer_in_blocks(adata, tokenizer, reference: Reference, columns: list[str], embedding: np.ndarray,
                       gene_col: str | None) -> dict[str, pd.DataFrame]:  # fmt: skip
    """:func:`transfer_labels` of every column, the heads fed 4,096 query cells at a time (the expression
    of a million cells is never held at once)."""
    from neurofm.genes import match_adata

    match = None
    if needs_expression(reference, columns):
        match = match_adata(
            adata, tokenizer.gene_ids, tokenizer.gene_symbols, gene_col=gene_col, min_overlap=0.0
        )
    codes = {c: np.empty(len(embedding), dtype=np.int64) for c in columns}
    probability = {c: np.empty(len(embedding)) for c in columns}
    for start in range(0, len(embedding), BLOCK):
        stop = min(start + BLOCK, len(embedding))
        expression = None if match is None else expression_matrix(adata, match, start, stop)
        for column in columns:
            codes[column][start:stop], probability[column][start:stop] = predict_labels(
                reference, column, embedding[start:stop], expression
            )
    return {c: label_frame(reference, c, embedding, codes[c], probability[c]) for c in columns}


def map_labels(
    adata,
    model=None,
    tokenizer=None,
    *,
    reference: Reference | None = None,
    label_columns: list[str] | tuple[str, ...] | None = None,
    key_added: str | None = None,
    gene_col: str | None = None,
    min_gene_overlap: float | None = None,
    unobserved: str = "exclude",
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
    tracking_uri: str | None = None,
    batch_key: str | None = None,
) -> tuple[np.ndarray, dict[str, pd.DataFrame], dict[str, Any]]:
    """``(embedding, {column: transfer frame}, record)`` for the cells of ``adata`` — what
    :func:`map_query` writes (see there for the arguments). ``batch_key``: the obs column of each query
    cell's batch, for a model whose count head has a batch covariate and knows those batches (one adapted
    to them, :func:`neurofm.adapt.adapt_model`); without it every cell gets the no-batch vector."""
    import time

    from neurofm import keys
    from neurofm.embedding import _embed_with_record
    from neurofm.genes import DEFAULT_MIN_GENE_OVERLAP

    if adata.n_obs == 0:
        raise NeurofmError("the query has no cells; pass an .h5ad with at least one cell to map")
    model, tokenizer, record, reference = _resolve(model, tokenizer, reference, tracking_uri)
    columns = list(label_columns) if label_columns else reference.label_columns
    for column in columns:
        if column not in reference.columns:
            raise NeurofmError(
                f"the model's reference has no label column {column!r} (it has {reference.label_columns}); "
                "pass one of those with --labels"
            )
    started = time.perf_counter()
    embedding, embed_record = _embed_with_record(
        adata,
        model,
        tokenizer,
        key_added=key_added or keys.EMBEDDING,
        gene_col=gene_col,
        min_gene_overlap=DEFAULT_MIN_GENE_OVERLAP if min_gene_overlap is None else min_gene_overlap,
        unobserved=unobserved,
        pooling=reference.meta.get("pooling", "auto"),
        batch_size=batch_size,
        device=device,
        progress=progress,
        tracking_uri=tracking_uri,
        batch_key=batch_key,
    )
    frames = _transfer_in_blocks(adata, tokenizer, reference, columns, embedding, gene_col)
    seconds = time.perf_counter() - started
    threshold = {c: unknown_threshold(reference, c) for c in columns}
    map_record = {
        **{k: v for k, v in record.items() if k in ("model", "model_dir", "model_name", "model_version")},
        "gene_match": embed_record["gene_match"],
        "reference": reference.describe(),
        "label_columns": columns,
        "score_threshold": threshold,
        "counts": {
            c: {str(k): int(v) for k, v in f["label"].value_counts().items()} for c, f in frames.items()
        },
        "unknown_share": {
            c: float((f["label"] == UNKNOWN).mean()) if len(f) else 0.0 for c, f in frames.items()
        },
        "n_cells": int(adata.n_obs),
        "seconds": seconds,
        "embedding": embed_record,
    }
    return embedding, frames, map_record


def _h5ad_ready(value: Any) -> Any:
    """``value`` with ``None`` dropped from dicts (an .h5ad cannot store it), recursively."""
    if isinstance(value, dict):
        return {str(k): _h5ad_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_h5ad_ready(v) for v in value]
    return value


def _obs_columns(frames: dict[str, pd.DataFrame], index) -> dict[str, Any]:
    from neurofm import keys

    out: dict[str, Any] = {}
    for column, frame in frames.items():
        name = f"{keys.MAPPED_LABEL_PREFIX}{column}"
        out[name] = pd.Categorical(frame["label"].astype(str).to_numpy())
        out[f"{name}_score"] = frame["score"].to_numpy(dtype=np.float32)
    return out


def map_query(
    adata,
    model=None,
    tokenizer=None,
    *,
    reference: Reference | None = None,
    label_columns: list[str] | tuple[str, ...] | None = None,
    key_added: str | None = None,
    copy: bool = False,
    gene_col: str | None = None,
    min_gene_overlap: float | None = None,
    unobserved: str = "exclude",
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
    tracking_uri: str | None = None,
    batch_key: str | None = None,
):
    """Map the cells of ``adata`` (raw counts) onto a model's reference and transfer its labels, scanpy style.

    ``model`` is a model directory, an MLflow URI (``None``: ``models:/neurofm-encoder@champion``) or a
    loaded ``GeneEncoder`` (then pass ``tokenizer`` and ``reference``). Genes are matched as
    :func:`neurofm.embed` matches them (``gene_col``, ``min_gene_overlap``, ``unobserved``).
    ``label_columns`` defaults to every column of the reference. ``batch_key``: see :func:`map_labels`.

    Writes (into ``adata``, or a copy returned when ``copy=True``):

    - ``obsm[key_added]`` (default ``'X_neurofm'``) — the cell embeddings;
    - ``obs['neurofm_<column>']`` — the transferred label, ``'unknown'`` where the cell matches no
      reference label (categorical); ``obs['neurofm_<column>_score']`` — the match score in [0, 1]
      (cells below ``uns['neurofm_map']['score_threshold']`` are unknown);
    - ``uns['neurofm_map']`` — model URI/directory and version, gene match, the reference (cells,
      classifiers, unknown rule), threshold, counts per predicted label, unknown share, seconds;
    - ``uns['neurofm']`` — the embedding record, as :func:`neurofm.embed` writes it.
    """
    from neurofm import keys

    key_added = key_added or keys.EMBEDDING
    embedding, frames, record = map_labels(
        adata, model, tokenizer, reference=reference, label_columns=label_columns, key_added=key_added,
        gene_col=gene_col, min_gene_overlap=min_gene_overlap, unobserved=unobserved, batch_size=batch_size,
        device=device, progress=progress, tracking_uri=tracking_uri, batch_key=batch_key,
    )  # fmt: skip
    embed_record = record.pop("embedding")
    record = _h5ad_ready(record)
    target = adata.copy() if copy else adata
    target.obsm[key_added] = embedding
    for name, values in _obs_columns(frames, target.obs_names).items():
        target.obs[name] = values
    target.uns[keys.EMBEDDING_PARAMS] = embed_record
    target.uns[keys.MAP_PARAMS] = record
    return target if copy else None


def map_file(
    in_path: str | os.PathLike, out_path: str | os.PathLike, model=None, adapt: bool = False,
    **options: Any,
) -> dict[str, Any]:  # fmt: skip
    """Map the cells of the .h5ad ``in_path`` into a new file ``out_path`` (the input is never touched).

    The input is read backed, 4,096 cells at a time; the output is a copy of the input plus what
    :func:`map_query` writes (its keyword ``options``), written to a temporary name and renamed when
    complete. Returns the ``uns['neurofm_map']`` record.

    ``adapt=True`` (a model whose count head has a batch covariate) first fits the query's batches
    (``options['batch_key']``; without it the whole query is one batch) on the query's counts, no labels
    (:func:`neurofm.adapt.adapt_model`), writes the adapted model and its reference to
    ``<out>.adapted/`` — never into the model it started from — and maps with it.
    """
    import shutil

    import h5py
    from anndata.io import read_elem, write_elem

    from neurofm import keys
    from neurofm.io import check_h5ad_path, read_h5ad

    in_path, out_path = check_h5ad_path(in_path), Path(out_path)
    if out_path.suffix != ".h5ad":
        raise NeurofmError(f"output {out_path} must end in .h5ad; pass e.g. --out cells.mapped.h5ad")
    if out_path.resolve() == in_path.resolve():
        raise NeurofmError(
            f"output {out_path} is the input file; map writes a new file — choose another --out"
        )
    key_added = options.pop("key_added", None) or keys.EMBEDDING
    adata = read_h5ad(in_path, backed=True)
    try:
        adapted = None
        if adapt:
            from neurofm.adapt import adapt_model_dir

            adapted = out_path.with_suffix(".adapted")
            batch_key = options.get("batch_key") or "neurofm_query_batch"
            if options.get("batch_key") is None:
                adata.obs[batch_key] = in_path.stem  # the whole query: one new batch
            model = adapt_model_dir(model, adata, batch_key, adapted, (REFERENCE_FILE, REFERENCE_META),
                                    gene_col=options.get("gene_col"), tracking_uri=options.get("tracking_uri"))  # fmt: skip
            options["batch_key"] = batch_key
        embedding, frames, record = map_labels(adata, model, key_added=key_added, **options)
    finally:
        adata.file.close()
    if adapted is not None:
        record["adapted_model"] = str(adapted)
    embed_record = record.pop("embedding")
    record = _h5ad_ready({**record, "input": str(in_path)})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        shutil.copyfile(in_path, tmp)  # counts are copied as bytes, never loaded
        with h5py.File(tmp, "r+") as handle:
            obs = read_elem(handle["obs"])
            for name, values in _obs_columns(frames, obs.index).items():
                obs[name] = values
            del handle["obs"]
            write_elem(handle, "obs", obs)
            for group, key, value in (("obsm", key_added, embedding), ("uns", keys.EMBEDDING_PARAMS, embed_record),
                                      ("uns", keys.MAP_PARAMS, record)):  # fmt: skip
                parent = handle.require_group(group)
                if key in parent:
                    del parent[key]
                write_elem(parent, key, value)
    log.info("wrote %s: %d cells mapped (%s)", out_path, len(embedding), ", ".join(frames))
    return record
