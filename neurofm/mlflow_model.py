"""The MLflow pyfunc wrapper of a neurofm model, logged as a "model from code" (nothing pickled).

``mlflow.pyfunc.load_model(uri)`` gives an object whose ``predict`` takes a DataFrame of raw counts
(cells × genes, columns = the model's gene IDs, as the registered signature and input example show)
and returns the cell embeddings — the same numbers as ``neurofm embed`` / :func:`neurofm.embedding.embed`.
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

        self.model, self.tokenizer = load_pretrained(context.artifacts["neurofm_model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from neurofm.embedding import embed_matrix, frame_to_anndata
        from neurofm.genes import match_adata

        cells = frame_to_anndata(model_input)
        params = params or {}
        match = match_adata(
            cells,
            self.tokenizer.gene_ids,
            self.tokenizer.gene_symbols,
            min_overlap=float(params.get("min_gene_overlap", 0.5)),
        )
        pooling = params.get("pooling", "auto")
        return embed_matrix(
            self.model, self.tokenizer, cells, pooling=pooling, device="cpu", progress=False, match=match
        )


mlflow.models.set_model(NeurofmEncoder())
