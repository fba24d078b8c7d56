"""Reference mapping: a reference stored with the model, label transfer to new cells, ``unknown``.

A model pre-trained once is reused on cells it never saw (another donor, study or technology): the
query is embedded with the frozen model and each cell gets the label of the reference cells it lands
among, or ``unknown`` where it matches none of them.

**The reference** (:class:`Reference`, built by :func:`build_reference`, attached to a model directory
by :func:`add_reference` or by ``pretrain`` with ``reference.label_columns``) lives in the model
directory beside the weights, so a registered MLflow model carries it:

- ``reference.safetensors`` — the reference cells' embedding (``embedding``, cells × dims, float32);
  per label column ``C``: ``C/codes`` (int32 per cell), the fitted classifier (``C/coef``,
  ``C/intercept``, ``C/scaler_mean``, ``C/scaler_scale`` for a logistic one; a kNN one is the
  embedding and codes) and the calibration (``C/calibration``: per label, sorted quantiles of the
  reference cells' own neighbour distances);
- ``reference.json`` — format, label columns, classes, the classifier chosen per column, the unknown
  rule, counts per label, the cells' source and how they were sampled.

No pickle. **The classifier** of a column is picked from the evaluation's probe menu
(:func:`neurofm.classify.select_probe`: logistic regression raw and z-scored over ``C``, kNN over
``k``) by 3-fold inner cross-validation on ≤ 3,000 reference cells (:data:`REFERENCE_PROBE`; labels with
fewer than 3 cells take no part in the choice), then fit on all of them — the very protocol the
baselines get in the ``map`` pipeline.

**Unknown.** A query cell predicted as label ``L`` is scored by its *distance to L*: the mean Euclidean
distance to its ``calibration_neighbors`` nearest reference cells of ``L``. The same distance of
``L``'s own reference cells (each leaving itself out) is the calibration; the cell's score is the share
of them at least as far from ``L`` (1 = as close as a typical reference cell, 0 = farther than all of
them). A cell whose score is below ``1 - unknown_quantile`` (default: farther than 99 % of ``L``'s
reference cells) is ``unknown``. Labels with fewer than ``min_calibration_cells`` reference cells share the
pooled calibration of all labels.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline

from neurofm.classify import ProbeConfig, probe_from_json, probe_to_json, select_probe
from neurofm.cpu import free_cores
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, write_json

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.safetensors"
REFERENCE_META = "reference.json"
REFERENCE_FORMAT = "neurofm-reference"
REFERENCE_FORMAT_VERSION = 1
UNKNOWN = "unknown"
N_QUANTILES = 201  # stored calibration quantiles per label (0 %, 0.5 %, …, 100 %)
# the evaluation's classifier menu, picked by 3-fold inner CV on a seeded sample of ≤ 3,000 reference cells
# (the evaluation's 5 folds on 5,000 took 4 minutes for 127 labels: unscaled logistic fits at C = 100 need
# ~1,300 lbfgs iterations); the same for the model and every baseline
REFERENCE_PROBE = ProbeConfig(select_max_cells=3000, inner_folds=3)


@dataclass(frozen=True)
class ReferenceConfig:
    """How a reference is built from labelled cells and how ``unknown`` is decided."""

    label_columns: tuple[str, ...] = ()  # obs columns whose labels are transferred (empty: no reference)
    max_cells: int = 200_000  # a seeded sample above this many cells (every label keeps ≥ min_cells_per_label)
    min_cells_per_label: int = 50  # cells of each label kept by the sample (all, when it has fewer)
    calibration_neighbors: int = 15  # k of the distance to a label
    calibration_max_cells: int = 2000  # reference cells per label whose own distances calibrate it
    min_calibration_cells: int = 10  # fewer cells than this: the label uses the pooled calibration
    unknown_quantile: float = 0.99  # a query cell farther from its label than this share of the
    #                                 label's reference cells is called unknown (1.0: never unknown)
    seed: int = 0  # the sample and the calibration cells

    def validate(self) -> ReferenceConfig:
        if not 0.5 <= self.unknown_quantile <= 1.0:
            raise NeurofmError(
                f"reference.unknown_quantile={self.unknown_quantile} must be in [0.5, 1]; e.g. 0.99"
            )
        for name in ("max_cells", "calibration_neighbors", "calibration_max_cells", "min_calibration_cells"):
            if getattr(self, name) < 1:
                raise NeurofmError(f"reference.{name}={getattr(self, name)} must be >= 1; pass a positive number")
        if len(set(self.label_columns)) != len(self.label_columns):
            raise NeurofmError(f"reference.label_columns {list(self.label_columns)} repeats a column; name each once")
        return self


@dataclass
class ColumnReference:
    """One label column of a reference: its classes, cell codes, fitted classifier and calibration."""

    column: str
    classes: list[str]
    codes: np.ndarray  # (n_cells,) int32 index into classes
    classifier: Pipeline  # fitted on the reference embedding (classes as strings)
    classifier_name: str
    calibration: np.ndarray  # (n_classes, N_QUANTILES) sorted distance quantiles; NaN row = pooled
    pooled_calibration: np.ndarray  # (N_QUANTILES,)

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
    return np.quantile(values, np.linspace(0.0, 1.0, N_QUANTILES)) if len(values) else np.full(N_QUANTILES, np.nan)


def _column_reference(
    embedding: np.ndarray, labels: np.ndarray, column: str, config: ReferenceConfig, probe: ProbeConfig
) -> ColumnReference:
    classes, codes = np.unique(labels.astype(str), return_inverse=True)
    labels = classes[codes]
    selectable = np.isin(codes, np.flatnonzero(np.bincount(codes) >= max(2, probe.inner_folds)))
    if len(np.unique(codes[selectable])) >= 2:  # rare labels take no part in choosing the classifier
        name, candidate = select_probe(embedding[selectable], labels[selectable], probe, n_jobs=free_cores())
    else:
        name, candidate = select_probe(embedding, labels, probe, n_jobs=free_cores())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier = candidate.fit(embedding.astype(np.float64), labels)  # float64, as a loaded one
    if "logistic" in classifier.named_steps:  # the layout a JSON-loaded probe has: same predictions
        logistic = classifier.named_steps["logistic"]
        logistic.coef_ = np.ascontiguousarray(logistic.coef_)
    classifier.classifier_name = name
    rng = np.random.default_rng(config.seed)
    calibration = np.full((len(classes), N_QUANTILES), np.nan)
    pooled: list[np.ndarray] = []
    for code in range(len(classes)):
        rows = np.flatnonzero(codes == code)
        if len(rows) < max(2, config.min_calibration_cells):
            continue
        index = NearestNeighbors().fit(embedding[rows])
        probe_rows = rows if len(rows) <= config.calibration_max_cells else rng.choice(
            rows, config.calibration_max_cells, replace=False
        )
        own = _label_distances(index, embedding[probe_rows], config.calibration_neighbors, leave_self_out=True)
        calibration[code] = _quantiles(own)
        pooled.append(own)
    pooled_values = np.concatenate(pooled) if pooled else np.zeros(1)
    return ColumnReference(
        column=column,
        classes=[str(c) for c in classes],
        codes=codes.astype(np.int32),
        classifier=classifier,
        classifier_name=name,
        calibration=calibration,
        pooled_calibration=_quantiles(pooled_values),
    )


def build_reference(
    embedding: np.ndarray,
    obs: pd.DataFrame,
    config: ReferenceConfig,
    probe: ProbeConfig | None = None,
    meta: dict[str, Any] | None = None,
) -> Reference:
    """A :class:`Reference` of the cells ``embedding`` (rows of ``obs``) for ``config.label_columns``.

    Cells whose label is missing (NaN/None/empty) take no part in that column. Raises
    :class:`NeurofmError` when a column is absent or has fewer than two labels.
    """
    config = config.validate()
    probe = probe or REFERENCE_PROBE
    if not config.label_columns:
        raise NeurofmError("no label columns for the reference; pass --reference-labels COL[,COL…]")
    absent = [c for c in config.label_columns if c not in obs.columns]
    if absent:
        raise NeurofmError(
            f"the reference cells have no obs column(s) {absent} (columns: {list(obs.columns)[:20]}); "
            "name existing columns in --reference-labels"
        )
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.shape[0] != len(obs):
        raise NeurofmError(f"{embedding.shape[0]} embeddings for {len(obs)} cells; pass one row per cell")
    columns: dict[str, ColumnReference] = {}
    for column in config.label_columns:
        values = obs[column]
        labelled = values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy()
        labels = values.astype(str).to_numpy()
        if len(np.unique(labels[labelled])) < 2:
            raise NeurofmError(
                f"obs[{column!r}] of the reference cells has fewer than two labels; a reference needs two "
                "or more — name another column in --reference-labels"
            )
        if not labelled.all():
            raise NeurofmError(
                f"obs[{column!r}] has {int((~labelled).sum())} cells without a label; fill them or drop "
                "those cells before building the reference"
            )
        columns[column] = _column_reference(embedding, labels, column, config, probe)
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


def transfer_labels(reference: Reference, query_embedding: np.ndarray, column: str) -> pd.DataFrame:
    """Predicted labels of query cells for one reference column.

    Returns a frame (one row per query cell): ``label`` (a reference label, or ``unknown``),
    ``predicted`` (the classifier's label before the unknown rule), ``probability`` (the classifier's
    probability of it), ``score`` (the calibrated match score in [0, 1], see the module docstring),
    ``distance`` (mean distance to the predicted label's nearest reference cells).
    """
    if column not in reference.columns:
        raise NeurofmError(
            f"the model's reference has no label column {column!r} (it has {reference.label_columns}); "
            "pass one of those, or rebuild the reference with that column"
        )
    ref = reference.columns[column]
    query = np.asarray(query_embedding, dtype=np.float32)
    if query.ndim != 2 or query.shape[1] != reference.embedding.shape[1]:
        raise NeurofmError(
            f"query embedding has shape {query.shape}, the reference {reference.embedding.shape[1]} dimensions; "
            "embed the query with the reference's model"
        )
    probabilities = ref.classifier.predict_proba(query.astype(np.float64))
    classes = np.asarray(ref.classifier.classes_).astype(str)
    best = probabilities.argmax(axis=1)
    predicted = classes[best]
    code_of = {name: code for code, name in enumerate(ref.classes)}
    predicted_codes = np.array([code_of[name] for name in predicted], dtype=np.int64)
    distance = np.zeros(len(query))
    score = np.ones(len(query))
    k = reference.config.calibration_neighbors
    for code in np.unique(predicted_codes):
        cells = np.flatnonzero(predicted_codes == code)
        rows = np.flatnonzero(ref.codes == code)
        index = NearestNeighbors().fit(reference.embedding[rows])
        distance[cells] = _label_distances(index, query[cells], k, leave_self_out=False)
        quantiles = ref.calibration[code]
        if np.isnan(quantiles).any():
            quantiles = ref.pooled_calibration
        score[cells] = _score_from_quantiles(distance[cells], quantiles)
    threshold = 1.0 - reference.config.unknown_quantile
    label = np.where(score < threshold, UNKNOWN, predicted).astype(object)
    return pd.DataFrame(
        {
            "label": label,
            "predicted": predicted,
            "probability": probabilities[np.arange(len(query)), best],
            "score": score,
            "distance": distance,
        }
    )


# --------------------------------------------------------------------------------------- save / load


def has_reference(model_dir: str | os.PathLike) -> bool:
    """Whether the model directory holds a reference."""
    directory = Path(model_dir)
    return (directory / REFERENCE_FILE).is_file() and (directory / REFERENCE_META).is_file()


def save_reference(reference: Reference, model_dir: str | os.PathLike) -> Path:
    """Write ``reference.safetensors`` + ``reference.json`` into ``model_dir`` (atomically, each)."""
    from safetensors.numpy import save_file


    directory = Path(model_dir)
    tensors: dict[str, np.ndarray] = {"embedding": np.ascontiguousarray(reference.embedding, dtype=np.float32)}
    if reference.rows is not None:
        tensors["rows"] = np.asarray(reference.rows, dtype=np.int64)
    columns: dict[str, Any] = {}
    for column, ref in reference.columns.items():
        exported = probe_to_json(ref.classifier)
        tensors[f"{column}/codes"] = ref.codes.astype(np.int32)
        tensors[f"{column}/calibration"] = ref.calibration.astype(np.float64)
        tensors[f"{column}/pooled_calibration"] = ref.pooled_calibration.astype(np.float64)
        for name in ("scaler_mean", "scaler_scale"):
            if exported[name] is not None:
                tensors[f"{column}/{name}"] = np.asarray(exported[name], dtype=np.float64)
        if exported["kind"] == "logistic":
            tensors[f"{column}/coef"] = np.asarray(exported["coef"], dtype=np.float64)
            tensors[f"{column}/intercept"] = np.asarray(exported["intercept"], dtype=np.float64)
        columns[column] = {
            "classes": ref.classes,
            "classifier": ref.classifier_name,
            "kind": exported["kind"],
            "classifier_classes": exported["classes"],
            "params": exported["params"],
            "counts": ref.counts(),
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
    if meta.get("format") != REFERENCE_FORMAT or meta.get("format_version") != REFERENCE_FORMAT_VERSION:
        raise NeurofmError(
            f"{directory / REFERENCE_META} is not a version-{REFERENCE_FORMAT_VERSION} neurofm reference; "
            "rebuild it with neurofm reference"
        )
    settings = dict(meta["config"])
    settings["label_columns"] = tuple(settings["label_columns"])
    config = ReferenceConfig(**settings)
    embedding = tensors["embedding"]
    columns: dict[str, ColumnReference] = {}
    for column, info in meta["columns"].items():
        codes = tensors[f"{column}/codes"].astype(np.int64)
        classifier = _classifier(column, info, tensors, codes, embedding, info["classes"])
        columns[column] = ColumnReference(
            column=column,
            classes=list(info["classes"]),
            codes=codes.astype(np.int32),
            classifier=classifier,
            classifier_name=info["classifier"],
            calibration=tensors[f"{column}/calibration"],
            pooled_calibration=tensors[f"{column}/pooled_calibration"],
        )
    rows = tensors.get("rows")
    return Reference(embedding=embedding, columns=columns, config=config, meta=meta.get("meta", {}), rows=rows)


# --------------------------------------------------------------------------------- model directories


def embed_reference_cells(model, tokenizer, cells, progress: bool = True, batch_size: int = 256) -> np.ndarray:
    """Embeddings of every cell of ``cells`` (an AnnData of raw counts, or a ``CellStore``), read 4,096
    cells at a time, with the model's own genes. In a multi-file store each cell is embedded with only
    the genes its file measured (the others are unobserved: out of the library size and the pooling,
    as for query data that lacks genes)."""
    from neurofm.data.store import CellStore
    from neurofm.embedding import embed_matrix
    from neurofm.genes import match_adata

    if not isinstance(cells, CellStore):
        match = match_adata(cells, tokenizer.gene_ids, tokenizer.gene_symbols)
        return embed_matrix(model, tokenizer, cells, batch_size=batch_size, progress=progress, match=match)
    import anndata as ad

    var, observed, datasets = cells.var(), cells.observed_genes, cells.cell_datasets()
    parts = []
    for start in range(0, cells.n_cells, 4096):
        rows = np.arange(start, min(start + 4096, cells.n_cells))
        counts, part = cells.rows(rows), np.empty((rows.size, model.embedding_dim), dtype=np.float32)
        for dataset in np.unique(datasets[rows]):  # one file's cells with the genes it measured
            mine, genes = np.flatnonzero(datasets[rows] == dataset), np.flatnonzero(observed[dataset])
            block = ad.AnnData(X=counts[mine][:, genes], var=var.iloc[genes])
            match = match_adata(block, tokenizer.gene_ids, tokenizer.gene_symbols, min_overlap=0.0)
            part[mine] = embed_matrix(model, tokenizer, block, batch_size, progress=False, match=match)
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros((0, model.embedding_dim), dtype=np.float32)


def add_reference(
    model_dir: str | os.PathLike,
    cells,
    config: ReferenceConfig,
    probe: ProbeConfig | None = None,
    source: str | None = None,
    progress: bool = True,
) -> Reference:
    """Embed ``cells`` (AnnData or ``CellStore``, with the label columns in obs) with the model in
    ``model_dir``, build their reference (:func:`build_reference`) and store it in ``model_dir``."""
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
            "name existing columns in --reference-labels"
        )
    rows = sample_reference_cells(obs, config)
    if isinstance(cells, CellStore):
        embedding = embed_reference_cells(model, tokenizer, cells, progress=progress)[rows]
    else:
        subset = cells if len(rows) == cells.n_obs else cells[rows]
        embedding = embed_reference_cells(model, tokenizer, subset, progress=progress)
    meta = {
        "source": source,
        "store": str(cells.path) if isinstance(cells, CellStore) else None,
        "n_source_cells": int(len(obs)),
        "sampled": bool(len(rows) < len(obs)),
        "pooling": "auto",
    }
    reference = build_reference(embedding, obs.iloc[rows], config, probe, meta=meta)
    reference.rows = rows
    save_reference(reference, directory)
    log.info("reference of %d cells (%s) stored in %s", reference.n_cells, ", ".join(config.label_columns), directory)
    return reference


def _resolve(model, tokenizer, reference, tracking_uri):
    from neurofm.embedding import resolve_model

    loaded, loaded_tokenizer, record = resolve_model(model, tokenizer, tracking_uri)
    if reference is None:
        if "model_dir" not in record:
            raise NeurofmError("a loaded model needs its reference: pass reference=, or a model directory")
        reference = load_reference(record["model_dir"])
    return loaded, loaded_tokenizer, record, reference


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
) -> tuple[np.ndarray, dict[str, pd.DataFrame], dict[str, Any]]:
    """``(embedding, {column: transfer frame}, record)`` for the cells of ``adata`` — what
    :func:`map_query` writes (see there for the arguments)."""
    import time

    from neurofm import keys
    from neurofm.embedding import _embed_with_record
    from neurofm.genes import DEFAULT_MIN_GENE_OVERLAP

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
    )
    frames = {column: transfer_labels(reference, embedding, column) for column in columns}
    seconds = time.perf_counter() - started
    threshold = 1.0 - reference.config.unknown_quantile
    map_record = {
        **{k: v for k, v in record.items() if k in ("model", "model_dir", "model_name", "model_version")},
        "gene_match": embed_record["gene_match"],
        "reference": reference.describe(),
        "label_columns": columns,
        "score_threshold": threshold,
        "counts": {c: {str(k): int(v) for k, v in f["label"].value_counts().items()} for c, f in frames.items()},
        "unknown_share": {c: float((f["label"] == UNKNOWN).mean()) if len(f) else 0.0 for c, f in frames.items()},
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
):
    """Map the cells of ``adata`` (raw counts) onto a model's reference and transfer its labels, scanpy style.

    ``model`` is a model directory, an MLflow URI (``None``: ``models:/neurofm-encoder@champion``) or a
    loaded ``GeneEncoder`` (then pass ``tokenizer`` and ``reference``). Genes are matched as
    :func:`neurofm.embed` matches them (``gene_col``, ``min_gene_overlap``, ``unobserved``).
    ``label_columns`` defaults to every column of the reference.

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
        device=device, progress=progress, tracking_uri=tracking_uri,
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
    in_path: str | os.PathLike, out_path: str | os.PathLike, model=None, **options: Any
) -> dict[str, Any]:
    """Map the cells of the .h5ad ``in_path`` into a new file ``out_path`` (the input is never touched).

    The input is read backed, 4,096 cells at a time; the output is a copy of the input plus what
    :func:`map_query` writes (its keyword ``options``), written to a temporary name and renamed when
    complete. Returns the ``uns['neurofm_map']`` record.
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
        raise NeurofmError(f"output {out_path} is the input file; map writes a new file — choose another --out")
    key_added = options.pop("key_added", None) or keys.EMBEDDING
    adata = read_h5ad(in_path, backed=True)
    try:
        embedding, frames, record = map_labels(adata, model, key_added=key_added, **options)
    finally:
        adata.file.close()
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
