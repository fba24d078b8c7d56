"""The label-transfer tools a user would pick instead of ``neurofm map``, each with its own classifier,
fit on the reference cells only (the map pipeline's label baselines; ``benchmarks/mapping_baselines.py``
scores the same recipes on the whole M1 donors).

- **CellTypist** (``celltypist``): ``celltypist.train`` with its defaults on log1p CP10k genes (its required
  input; :func:`neurofm.evaluate.baselines.celltypist_train`), ``celltypist.annotate`` in its default
  ``best match`` mode; majority voting off (``celltypist``) or on (``celltypist_majority``: CellTypist's
  own kNN graph and Leiden over-clustering of the query, no per-cell confidence).
- **scANVI** (scvi-tools): ``SCANVI.from_scvi_model`` on the scVI reference
  (:func:`neurofm.evaluate.baselines.scvi_reference`, shared with scVI and scArches) with the reference's
  labels; the query added by ``SCANVI.load_query_data`` (its counts, never its labels) and trained as
  scArches' query is; ``predict(soft=True)``.
- **Symphony** (``symphonypy``): its reference recipe and ``map_embedding``, labels by the 5-nearest-
  neighbour vote of ``transfer_labels_kNN`` (:func:`neurofm.evaluate.baselines.symphony_map`).

Each returns a :class:`ToolLabels`: the predicted label of every query cell and the tool's confidence (the
winning probability or vote share; a cell at or below :data:`THRESHOLD` — CellTypist's ``p_thres`` default,
used for scANVI and Symphony too — counts as the tool's ``unknown``). Fitted models live in memory only:
CellTypist and scvi-tools pickle when they save, so nothing of theirs is saved.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scanpy as sc

from neurofm.evaluate.baselines import (
    SCVI_QUIET,
    _counts,
    celltypist_train,
    scvi_query_counts,
    symphony_knn,
    symphony_map_query,
    symphony_reference,
)

THRESHOLD = 0.5  # CellTypist's p_thres default; the same for scANVI's probability and Symphony's vote share
LABEL_TOOLS = ("celltypist", "celltypist_majority", "scanvi", "symphony")


@dataclass
class ToolLabels:
    """One tool's labels of the query cells."""

    predicted: np.ndarray  # the tool's label of each query cell (str)
    confidence: np.ndarray | None  # its confidence in that label; None: the tool gives none
    classifier: str  # what predicted, in words
    query_embedding: np.ndarray | None = None  # the tool's own space, where it has one (query clustering)
    reference_embedding: np.ndarray | None = None

    @property
    def unknown(self) -> np.ndarray:
        """Cells the tool leaves unassigned at its default threshold."""
        if self.confidence is None:
            return np.zeros(len(self.predicted), dtype=bool)
        return np.asarray(self.confidence) <= THRESHOLD


def _log_normalised(view: ad.AnnData) -> ad.AnnData:
    out = ad.AnnData(X=_counts(view))
    out.var_names = np.asarray(view.var_names, dtype=str)
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def celltypist_labels(reference: ad.AnnData, query: ad.AnnData, column: str, majority_voting: bool = False) -> ToolLabels:
    """CellTypist trained on ``reference.obs[column]`` and run on the query (shared-gene views, raw counts)."""
    import celltypist

    logging.getLogger("celltypist").setLevel(logging.WARNING)
    ref, qry = _log_normalised(reference), _log_normalised(query)
    qry.var_names = ref.var_names  # the same genes in the same order (shared_gene_views)
    model = celltypist_train(ref, reference.obs[column].astype(str).to_numpy())
    result = celltypist.annotate(qry, model, majority_voting=majority_voting)
    name = f"CellTypist ({type(model.classifier).__name__}, C={model.classifier.C})"
    if majority_voting:
        predicted = result.predicted_labels["majority_voting"].astype(str).to_numpy()
        return ToolLabels(predicted, None, f"{name}, majority voting")
    predicted = result.predicted_labels["predicted_labels"].astype(str).to_numpy()
    return ToolLabels(predicted, result.probability_matrix.to_numpy().max(axis=1), name)


def symphony_labels(reference: ad.AnnData, query: ad.AnnData, column: str, seed: int = 0) -> ToolLabels:
    """Symphony's reference built from the reference's counts, the query mapped onto it, labels by its kNN vote."""
    counts = ad.AnnData(X=_counts(reference), obs=reference.obs[[column]].astype(str))
    counts.var_names = np.asarray(reference.var_names, dtype=str)
    query_counts = ad.AnnData(X=_counts(query))
    query_counts.var_names = counts.var_names
    built = symphony_reference(counts, seed=seed)
    mapped = symphony_map_query(built, query_counts)
    predicted, share = symphony_knn(built, mapped, column)
    return ToolLabels(np.asarray(predicted).astype(str), np.asarray(share), "Symphony (kNN k=5 vote)",
                      query_embedding=np.asarray(mapped.obsm["X_pca_harmony"], np.float32),
                      reference_embedding=np.asarray(built.obsm["X_pca_harmony"], np.float32))  # fmt: skip


def scanvi_labels(
    scvi_model, query: ad.AnnData, column: str, query_epochs: int, seed: int = 0, max_epochs: int | None = None,
    query_batches=None,
) -> ToolLabels:  # fmt: skip
    """scANVI from the scVI reference ``scvi_model`` (trained with ``column`` in its obs) and the query added
    by ``load_query_data``, trained ``query_epochs`` on its counts (``query_batches``: its batches; else one)."""
    import scvi

    scvi.settings.seed = seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labelled = scvi.model.SCANVI.from_scvi_model(scvi_model, unlabeled_category="Unknown", labels_key=column)
        labelled.train(max_epochs=max_epochs, **SCVI_QUIET)
        batches = ["query"] * query.n_obs if query_batches is None else [f"query {b}" for b in query_batches]
        mapped = scvi_query_counts(scvi_model, query, batches)
        mapped.obs[column] = "Unknown"
        scvi.model.SCANVI.prepare_query_anndata(mapped, labelled)
        query_model = scvi.model.SCANVI.load_query_data(mapped, labelled)
        query_model.train(max_epochs=query_epochs, plan_kwargs={"weight_decay": 0.0}, **SCVI_QUIET)
        soft = query_model.predict(soft=True)
        latent = query_model.get_latent_representation()
    predicted = soft.columns.to_numpy().astype(str)[soft.to_numpy().argmax(axis=1)]
    return ToolLabels(predicted, soft.to_numpy().max(axis=1), "scANVI (its classifier)",
                      query_embedding=np.asarray(latent, np.float32),
                      reference_embedding=np.asarray(labelled.get_latent_representation(), np.float32))  # fmt: skip
