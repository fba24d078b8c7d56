"""The MLflow pyfunc wrapper of a neurofm model, logged as a "model from code" (nothing pickled).

``mlflow.pyfunc.load_model(uri)`` gives an object whose ``predict`` takes a DataFrame of raw counts
(cells × genes, columns = the tokenizer's gene IDs) and returns the cell embeddings. neurofm itself
loads the model directory (``artifacts/neurofm_model``) directly with
:func:`neurofm.model.load_pretrained` via :func:`neurofm.tracking.resolve_model_dir`.
"""

from __future__ import annotations

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class NeurofmEncoder(PythonModel):
    """Raw counts (DataFrame, genes as columns) → cell embeddings (mean pooling)."""

    def load_context(self, context) -> None:
        from neurofm.model import load_pretrained

        self.model, self.tokenizer = load_pretrained(context.artifacts["neurofm_model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from neurofm.embed import embed

        cells = ad.AnnData(X=model_input.to_numpy(dtype=np.float32))
        cells.obs_names = model_input.index.astype(str)
        cells.var_names = model_input.columns.astype(str)
        pooling = (params or {}).get("pooling", "mean")
        return embed(self.model, self.tokenizer, cells, pooling=pooling, progress=False)


mlflow.models.set_model(NeurofmEncoder())
