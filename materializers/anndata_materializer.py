"""Store :class:`anndata.AnnData` artifacts as .h5ad through the active artifact store.

The file is written to a local temporary directory and copied with the artifact store's own file
API, so the materializer works for remote stores (S3, GCS, Azure) as well as local ones. Metadata
shown in the dashboard: n_obs, n_vars, obs/var columns, obsm/layers/uns keys, sparsity, dtype.
A small HTML card (shape, sparsity, first obs columns' value counts) is the visualization.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import scipy.sparse as sp
from zenml.enums import ArtifactType, VisualizationType
from zenml.materializers.base_materializer import BaseMaterializer

FILENAME = "data.h5ad"
_CHUNK = 8 << 20  # copy in 8 MiB pieces (the artifact store may be remote: S3, GCS, Azure)


def _density(matrix: Any) -> float:
    if matrix is None:
        return float("nan")
    n_values = int(np.prod(matrix.shape)) or 1
    if sp.issparse(matrix):
        return float(matrix.count_nonzero()) / n_values
    return float(np.count_nonzero(np.asarray(matrix))) / n_values


class AnnDataMaterializer(BaseMaterializer):
    """Materialize AnnData objects as .h5ad files."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ad.AnnData,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def load(self, data_type: type[Any]) -> ad.AnnData:
        with tempfile.TemporaryDirectory(prefix="neurofm-h5ad-") as tmp:
            local = os.path.join(tmp, FILENAME)
            with (
                self.artifact_store.open(os.path.join(self.uri, FILENAME), "rb") as source,
                open(local, "wb") as target,
            ):
                shutil.copyfileobj(source, target, _CHUNK)
            return ad.read_h5ad(local)

    def save(self, data: ad.AnnData) -> None:
        with tempfile.TemporaryDirectory(prefix="neurofm-h5ad-") as tmp:
            local = os.path.join(tmp, FILENAME)
            data.write_h5ad(local)
            with (
                open(local, "rb") as source,
                self.artifact_store.open(os.path.join(self.uri, FILENAME), "wb") as target,
            ):
                shutil.copyfileobj(source, target, _CHUNK)

    def extract_metadata(self, data: ad.AnnData) -> dict[str, Any]:
        density = _density(data.X)
        return {
            "n_obs": int(data.n_obs),
            "n_vars": int(data.n_vars),
            "obs_columns": ", ".join(map(str, data.obs.columns)) or "-",
            "var_columns": ", ".join(map(str, data.var.columns)) or "-",
            "obsm_keys": ", ".join(data.obsm.keys()) or "-",
            "layers": ", ".join(data.layers.keys()) or "-",
            "uns_keys": ", ".join(data.uns.keys()) or "-",
            "x_dtype": str(getattr(data.X, "dtype", "none")),
            "x_sparse": bool(sp.issparse(data.X)),
            "sparsity": round(1.0 - density, 6) if density == density else -1.0,
        }

    def save_visualizations(self, data: ad.AnnData) -> dict[str, VisualizationType]:
        rows = [
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in self.extract_metadata(data).items()
        ]
        counts = []
        for column in list(data.obs.columns)[:6]:
            series = data.obs[column]
            if series.nunique() <= 30:
                top = ", ".join(
                    f"{html.escape(str(k))}: {v}" for k, v in series.value_counts().head(10).items()
                )
                counts.append(f"<tr><th>{html.escape(str(column))}</th><td>{top}</td></tr>")
        page = (
            "<html><body style='font-family:sans-serif'><h3>AnnData "
            f"{data.n_obs:,} cells × {data.n_vars:,} genes</h3><table border=1 cellpadding=4>"
            + "".join(rows)
            + "</table>"
            + (
                "<h4>obs value counts</h4><table border=1 cellpadding=4>" + "".join(counts) + "</table>"
                if counts
                else ""
            )
            + "</body></html>"
        )
        uri = os.path.join(self.uri, "summary.html")
        with self.artifact_store.open(uri, "w") as handle:
            handle.write(page)
        return {uri: VisualizationType.HTML}
