"""Reference-mapping steps: map a query file onto a model's reference; score and track the transfer.

Neither step holds more than a seeded sample of the query in memory: ``map_query_cells`` maps the
file in chunks into a new .h5ad (``neurofm.mapping.map_file``) and returns a small record;
``score_mapping`` (only with the query's true labels; report in ``<out_dir>/map/report/``) scores a seeded sample of at most
``map.max_cells_score`` query cells beside the baselines, fit on the reference's own cells (the store
the reference was built from, or ``map.reference_data``), and writes the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

from zenml import step

from neurofm import tracking
from neurofm.config import MapConfig, TrackingConfig
from steps._cache import depends_on

MAP_DIR = "map"


@step(
    cache_policy=depends_on(
        "mapping",
        "cell_features",
        "classify",
        "embedding",
        "model",
        "model_config",
        "count_head",
        "pooling",
        "genes",
        "tokenizer",
        "registry",
    )
)
def map_query_cells(
    model_dir: Path, query_path: str, fingerprint: str, settings: MapConfig, out_dir: str, data_name: str
) -> Annotated[dict, "mapping"]:
    """Map every cell of the query .h5ad onto the model's reference into ``<out_dir>/map/<name>.mapped.h5ad``
    (the query plus ``obsm['X_neurofm']``, ``obs['neurofm_<column>']`` and ``_score``, ``uns['neurofm_map']``;
    the input is never touched). Returns ``{"mapped_file", "record", "seconds"}``. ``fingerprint`` keys
    the cache on the query's content."""
    from neurofm.mapping import map_file

    started = time.perf_counter()
    mapped = Path(out_dir) / MAP_DIR / f"{data_name}.mapped.h5ad"
    record = map_file(
        query_path, mapped, model=model_dir, label_columns=settings.label_columns,
        gene_col=settings.gene_column, min_gene_overlap=settings.min_gene_overlap,
    )  # fmt: skip
    return {
        "mapped_file": str(mapped),
        "record": json.loads(json.dumps(record, default=str)),
        "seconds": time.perf_counter() - started,
        "fingerprint": fingerprint,
    }


@step(cache_policy=depends_on("mapping", "classify", "evaluate", "plots", "cell_features", "model", "data"))
def score_mapping(
    mapping: dict, model_dir: Path, settings: MapConfig, out_dir: str
) -> Annotated[dict, "map_scores"]:
    """With ``map.query_label_column``: the transfer scored beside the baselines (``map.baselines``, fit
    on the reference's cells) on a seeded sample of the query, and ``<out_dir>/map/report/report.md`` /
    ``report.html``, ``transfer.csv``, ``per_class_f1.csv``, confusion tables and figures
    (``neurofm.evaluate.transfer.score_mapped_file``). Without it: ``{"scored": False}``."""
    from neurofm.evaluate.transfer import score_mapped_file

    return score_mapped_file(
        mapping["mapped_file"], mapping["record"], model_dir, settings.query_label_column,
        Path(out_dir) / MAP_DIR / "report",  # beside, not around, the mapped .h5ad (logged to MLflow)
        max_cells=settings.max_cells_score, baselines=settings.baselines, gene_col=settings.gene_column,
        batch_column=settings.batch_column, reference_data=settings.reference_data,
        scarches_query_epochs=settings.scarches_query_epochs, model_seconds=mapping["seconds"],
        model=settings.model,
    )  # fmt: skip


@step(enable_cache=False)
def track_mapping(
    mapping: dict, scores: dict, model_info: dict, settings: MapConfig, tracking_config: TrackingConfig,
    data_name: str,
) -> Annotated[dict, "map_summary"]:  # fmt: skip
    """Log the mapping to MLflow: one run (tags: pipeline step ``map``, model version), the transfer
    metrics, the unknown share per column and the report and tables as artifacts. Never cached."""
    return tracking.log_mapping(mapping, scores, model_info, settings, tracking_config, data_name)
