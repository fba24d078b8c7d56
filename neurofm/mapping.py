"""Reference mapping: label transfer to new cells, ``unknown``, and the verbs that map a query.

A model pre-trained once is reused on cells it never saw (another donor, study or technology): the
query is embedded with the frozen model and each cell gets the label of the reference cells it lands
among, or ``unknown`` where it matches none of them.

The reference itself — :class:`~neurofm.reference.Reference`, its label heads, calibration and the unknown
rule — is built in :mod:`neurofm.reference` and stored in the model directory by :mod:`neurofm.reference_io`;
this module re-exports their public names. Here: :func:`transfer_labels` (one column, an embedding in hand),
:func:`add_reference` (embed labelled cells with a model and store their reference with it),
:func:`map_labels` / :func:`map_query` / :func:`map_file` (embed a query and transfer every column).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm.cell_features import BLOCK, cell_batches, expression_matrix, reference_features
from neurofm.classify import LabelHead, head_features
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path
from neurofm.pooling import DEFAULT_POOLING, DEFAULT_UNOBSERVED
from neurofm.reference import (
    N_QUANTILES,
    UNKNOWN,
    ColumnReference,
    Reference,
    ReferenceConfig,
    _distance_scores,
    _distances_to_labels,
    _score_below,
    build_reference,
    sample_reference_cells,
    unknown_threshold,
)
from neurofm.reference_io import (
    REFERENCE_FILE,
    REFERENCE_FORMAT,
    REFERENCE_FORMAT_VERSION,
    REFERENCE_META,
    has_reference,
    load_reference,
    save_reference,
)

__all__ = [  # the verbs here, and the reference's names re-exported (callers import them from here)
    "N_QUANTILES",
    "REFERENCE_FILE",
    "REFERENCE_FORMAT",
    "REFERENCE_FORMAT_VERSION",
    "REFERENCE_META",
    "UNKNOWN",
    "ColumnReference",
    "Reference",
    "ReferenceConfig",
    "add_reference",
    "build_reference",
    "has_reference",
    "label_frame",
    "load_reference",
    "map_file",
    "map_labels",
    "map_query",
    "needs_expression",
    "predict_labels",
    "sample_reference_cells",
    "save_reference",
    "transfer_labels",
    "unknown_threshold",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- transfer


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


def transfer_labels(
    reference: Reference, query_embedding: np.ndarray, column: str, expression: np.ndarray | None = None
) -> pd.DataFrame:
    """Predicted labels of query cells for one reference column.

    ``expression`` (the query cells' :func:`expression_matrix`) is needed when the column's head reads
    genes (:func:`needs_expression`). Returns a frame (one row per query cell): ``label`` (a reference
    label, or ``unknown``), ``predicted`` (the head's label before the unknown rule), ``probability`` (the
    head's probability of it), ``score`` (the calibrated match score in [0, 1], see
    :mod:`neurofm.reference`), ``distance`` (mean distance to the predicted label's nearest reference cells).
    """
    _check_column(reference, column)
    query = _check_query(reference, query_embedding)
    if expression is not None and len(expression) != len(query):
        raise NeurofmError(
            f"{len(expression)} expression rows for {len(query)} query cells; pass one row per cell"
        )
    codes, probability = predict_labels(reference, column, query, expression)
    return label_frame(reference, column, query, codes, probability)


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
        "pooling": DEFAULT_POOLING,
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
    unobserved: str = DEFAULT_UNOBSERVED,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    tracking_uri: str | None = None,
    batch_key: str | None = None,
) -> tuple[np.ndarray, dict[str, pd.DataFrame], dict[str, Any]]:
    """``(embedding, {column: transfer frame}, record)`` for the cells of ``adata`` (raw counts) — what
    :func:`map_query` and :func:`map_file` write, computed here.

    The one place the mapping options are defined (``map_query`` and ``map_file`` pass theirs on):

    - ``model`` — a model directory, an MLflow URI (``None``: ``models:/neurofm-encoder@champion``) or a
      loaded ``GeneEncoder`` (then pass ``tokenizer`` and ``reference``); ``tracking_uri``: the MLflow
      server of a URI;
    - ``reference`` — default: the one stored with the model; ``label_columns`` — default: every column of
      the reference;
    - ``key_added`` — the embedding's obsm key (default ``'X_neurofm'``);
    - ``gene_col``, ``min_gene_overlap``, ``unobserved`` — genes are matched as :func:`neurofm.embed`
      matches them (``None``: ``neurofm.genes.MIN_GENE_OVERLAP``); ``batch_size`` (``None``:
      ``neurofm.embedding.EMBED_BATCH_SIZE``), ``device``, ``progress`` — as there;
    - ``batch_key`` — the obs column of each query cell's batch, for a model whose count head has a batch
      covariate and knows those batches (one adapted to them, :func:`neurofm.adapt.adapt_model`); without
      it every cell gets the no-batch vector.
    """
    import time

    from neurofm import keys
    from neurofm.embedding import EMBED_BATCH_SIZE, _embed_with_record
    from neurofm.genes import DEFAULT_MIN_GENE_OVERLAP

    if adata.n_obs == 0:
        raise NeurofmError("the query has no cells; pass an .h5ad with at least one cell to map")
    model, tokenizer, record, reference = _resolve(model, tokenizer, reference, tracking_uri)
    columns = _label_columns(reference, label_columns)
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
        batch_size=EMBED_BATCH_SIZE if batch_size is None else batch_size,
        device=device,
        progress=progress,
        tracking_uri=tracking_uri,
        batch_key=batch_key,
    )
    frames = _transfer_in_blocks(adata, tokenizer, reference, columns, embedding, gene_col)
    seconds = time.perf_counter() - started
    return embedding, frames, _map_record(record, embed_record, reference, frames, int(adata.n_obs), seconds)


def _label_columns(reference: Reference, label_columns) -> list[str]:
    """The reference columns to transfer (default: all); a column the reference lacks is refused."""
    columns = list(label_columns) if label_columns else reference.label_columns
    for column in columns:
        if column not in reference.columns:
            raise NeurofmError(
                f"the model's reference has no label column {column!r} (it has {reference.label_columns}); "
                "pass one of those with --labels"
            )
    return columns


def _map_record(record: dict, embed_record: dict, reference: Reference, frames: dict[str, pd.DataFrame],
                n_cells: int, seconds: float) -> dict[str, Any]:  # fmt: skip
    """The ``uns['neurofm_map']`` record of a map: model, gene match, reference, unknown thresholds, counts."""
    return {
        **{k: v for k, v in record.items() if k in ("model", "model_dir", "model_name", "model_version")},
        "gene_match": embed_record["gene_match"],
        "reference": reference.describe(),
        "label_columns": list(frames),
        "score_threshold": {c: unknown_threshold(reference, c) for c in frames},
        "counts": {
            c: {str(k): int(v) for k, v in f["label"].value_counts().items()} for c, f in frames.items()
        },
        "unknown_share": {
            c: float((f["label"] == UNKNOWN).mean()) if len(f) else 0.0 for c, f in frames.items()
        },
        "n_cells": n_cells,
        "seconds": seconds,
        "embedding": embed_record,
    }


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


def map_query(adata, model=None, tokenizer=None, *, copy: bool = False, **options: Any):
    """Map the cells of ``adata`` (raw counts) onto a model's reference and transfer its labels, scanpy style.

    ``model``, ``tokenizer`` and the keyword ``options`` (``reference``, ``label_columns``, ``key_added``,
    ``gene_col``, ``min_gene_overlap``, ``unobserved``, ``batch_size``, ``device``, ``progress``,
    ``tracking_uri``, ``batch_key``) are :func:`map_labels`' — see there for each and its default.

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

    key_added = options.pop("key_added", None) or keys.EMBEDDING
    embedding, frames, record = map_labels(adata, model, tokenizer, key_added=key_added, **options)
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
    :func:`map_query` writes (``options``: :func:`map_labels`' keyword options), written to a temporary
    name and renamed when complete. Returns the ``uns['neurofm_map']`` record.

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
