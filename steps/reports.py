"""Report steps: dataset summary, barcode/metadata check, atlas plot — visible in the ZenML dashboard.

Each returns an HTML string (ZenML renders it as the artifact's visualization) and writes the same
content under the run's output directory. They are never served from the cache, so the files are
always there in the output directory of the run the user just made (they are cheap: the barcode
check reads only obs names, the atlas plot only the metadata CSV).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Annotated, Any

import anndata as ad
from zenml import step
from zenml.types import HTMLString

from neurofm import io
from neurofm.data import reports


def _table(values: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th align=left>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))}</td></tr>"
        for k, v in values.items()
    )
    return f"<table border=1 cellpadding=4 style='border-collapse:collapse'>{rows}</table>"


@step(enable_cache=False)
def dataset_summary(
    adata: ad.AnnData, out_dir: str, value_counts_column: str | None = None, source_path: str | None = None
) -> Annotated[HTMLString, "dataset_summary"]:
    """Summary of the prepared data (cells, genes, columns, uns keys, value counts, sparsity)."""
    summary = reports.write_summary(adata, out_dir, value_counts_column, source_path)
    return HTMLString(f"<h3>Dataset summary</h3>{_table(summary)}")


@step(enable_cache=False)
def check_barcodes(
    path: str, metadata_csv: str, obs_name_column: str, fingerprint: str, out_dir: str
) -> Annotated[HTMLString, "barcode_check"]:
    """Overlap of metadata cell labels/barcodes with the .h5ad's obs_names."""
    result = reports.write_id_check(path, metadata_csv, obs_name_column, out_dir)
    return HTMLString(f"<h3>Barcode / metadata check</h3>{_table(result)}")


@step(enable_cache=False)
def atlas_plot(
    metadata_csv: str,
    cluster_csv: str,
    annotation_csv: str,
    highlight_clusters: list,
    top_k: int,
    out_dir: str,
) -> Annotated[HTMLString, "atlas_plot"]:
    """Atlas cells at x/y coloured by the top-K base clusters, chosen subclusters circled."""
    png = reports.atlas_plot(
        metadata_csv,
        cluster_csv,
        annotation_csv,
        Path(io.ensure_writable_dir(out_dir)) / "atlas_plot.png",
        top_k=top_k,
        highlight_clusters=highlight_clusters,
    )
    encoded = base64.b64encode(Path(png).read_bytes()).decode()
    return HTMLString(
        f"<h3>Atlas plot</h3><img src='data:image/png;base64,{encoded}' style='max-width:100%'>"
    )
