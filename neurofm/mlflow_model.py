"""The MLflow pyfunc wrapper of a neurofm model, logged as a "model from code" (nothing pickled).

``mlflow.pyfunc.load_model(uri)`` gives an object whose ``predict`` takes a DataFrame of raw counts
(cells × genes, columns = the model's gene IDs, as the registered signature and input example show)
and returns the cell embeddings — the same numbers as ``neurofm embed`` / :func:`neurofm.embedding.embed`.
With ``params={"labels": True}`` and a model that carries a reference it returns a DataFrame instead:
per reference column ``neurofm_<column>`` (label or ``unknown``) and ``neurofm_<column>_score``, then the
embedding as ``X_neurofm_0…`` — what ``neurofm map`` writes.
``mlflow models serve -m models:/neurofm-encoder@champion --env-manager local`` serves it over REST.
neurofm itself
loads the model directory (``artifacts/neurofm_model``) directly with
:func:`neurofm.model.load_pretrained` via :func:`neurofm.tracking.resolve_model_dir`.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class NeurofmEncoder(PythonModel):
    """Raw counts (DataFrame, genes as columns) → cell embeddings (as ``neurofm.embed``)."""

    def load_context(self, context) -> None:
        from neurofm.model import load_pretrained

        self.model_dir = context.artifacts["neurofm_model"]
        self.model, self.tokenizer = load_pretrained(self.model_dir)
        self.reference = None

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from neurofm.embedding import embed_matrix, frame_to_anndata
        from neurofm.genes import DEFAULT_MIN_GENE_OVERLAP, match_adata

        cells = frame_to_anndata(model_input)
        params = params or {}
        match = match_adata(
            cells,
            self.tokenizer.gene_ids,
            self.tokenizer.gene_symbols,
            min_overlap=float(params.get("min_gene_overlap", DEFAULT_MIN_GENE_OVERLAP)),
        )
        pooling = params.get("pooling", "auto")
        if params.get("labels"):
            from neurofm.mapping import map_labels

            embedding, frames, _ = map_labels(
                cells, self.model, self.tokenizer, reference=self._reference(), progress=False, device="cpu",
                min_gene_overlap=float(params.get("min_gene_overlap", DEFAULT_MIN_GENE_OVERLAP)),
            )  # fmt: skip
            out = pd.DataFrame(index=model_input.index)
            for column, frame in frames.items():
                out[f"neurofm_{column}"] = frame["label"].to_numpy()
                out[f"neurofm_{column}_score"] = frame["score"].to_numpy()
            for i in range(embedding.shape[1]):
                out[f"X_neurofm_{i}"] = embedding[:, i]
            return out
        return embed_matrix(
            self.model, self.tokenizer, cells, pooling=pooling, device="cpu", progress=False, match=match
        )

    def _reference(self):
        from neurofm.mapping import load_reference

        if getattr(self, "reference", None) is None:
            self.reference = load_reference(self.model_dir)
        return self.reference


mlflow.models.set_model(NeurofmEncoder())
