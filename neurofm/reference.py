"""A reference: labelled cells in a model's embedding space, their label heads and the ``unknown`` rule.

**The reference** (:class:`Reference`, built by :func:`build_reference`; attached to a model directory by
:func:`neurofm.mapping.add_reference` or by ``pretrain`` with ``reference.label_columns``; saved and loaded by
:mod:`neurofm.reference_io`) holds per label column the reference cells' labels, the column's classifier
and its calibration.

**The classifier** of a column is a label head (:class:`neurofm.classify.LabelHead`, settings
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

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline

from neurofm.classify import HeadConfig, LabelHead, fit_head, head_features, held_out_share
from neurofm.errors import NeurofmError

log = logging.getLogger(__name__)

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


def _score_from_quantiles(distances: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Share of calibration cells at least as far as each distance (from their stored quantiles)."""
    levels = np.linspace(0.0, 1.0, N_QUANTILES)
    return 1.0 - np.interp(distances, quantiles, levels, left=0.0, right=1.0)


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
    :func:`neurofm.cell_features.expression_matrix`) lets the label heads read the genes too; without it they read the
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


def unknown_threshold(reference: Reference, column: str) -> float:
    """The score below which a cell of ``column`` is ``unknown`` (see the module docstring)."""
    ref = reference.columns[column]
    if ref.unknown_threshold is not None:
        return ref.unknown_threshold
    return 1.0 - reference.config.unknown_quantile
