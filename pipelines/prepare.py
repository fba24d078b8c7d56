"""The data-preparation pipeline: atlas files (or one .h5ad) → a clean, small training set."""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from neurofm.config import RunConfig
from steps.data import crop_data, dedupe_ids, filter_region, load_data, save_prepared, subset_clusters
from steps.reports import atlas_plot, check_barcodes, dataset_summary


def prepare_steps(config: RunConfig, inputs: dict[str, Any]):
    """Wire the preparation steps; returns the prepared AnnData artifact.

    ``inputs`` comes from :func:`neurofm.runs.resolve_inputs`: the data path, its fingerprint, the metadata
    files, the cluster IDs to keep and the region (for the built-in atlas, those ``default_data`` laid
    over the configuration).
    """
    data, subset, out_dir = config.data, config.subset, config.data.out_dir
    path, metadata = inputs["path"], inputs["metadata_csv"]
    cluster_csv, annotation_csv = inputs["cluster_csv"], inputs["annotation_csv"]
    if metadata is not None:
        check_barcodes(
            path=path,
            metadata_csv=metadata,
            obs_name_column=subset.obs_name_column,
            fingerprint=inputs["fingerprint"],
            out_dir=out_dir,
        )
    if cluster_csv is not None and annotation_csv is not None and metadata is not None:
        atlas_plot(
            metadata_csv=metadata,
            cluster_csv=cluster_csv,
            annotation_csv=annotation_csv,
            highlight_clusters=list(inputs["cluster_ids"]),
            top_k=config.reports.atlas_top_k,
            out_dir=out_dir,
        )
    if inputs["cluster_ids"]:
        cells = subset_clusters(
            path=path,
            metadata_csv=metadata,
            fingerprint=inputs["fingerprint"],
            subset=subset,
            layer=data.layer,
        )
    else:
        cells = load_data(path=path, fingerprint=inputs["fingerprint"], layer=data.layer)
    cells = filter_region(cells, column=config.region.column, value=inputs["region"])
    cells = dedupe_ids(cells, dedupe=config.dedupe)
    cells, sparsity = crop_data(cells, crop=config.crop)
    dataset_summary(cells, out_dir=out_dir, value_counts_column=config.reports.value_counts_column)
    save_prepared(cells, sparsity, out_dir=out_dir, write_report_csv=config.crop.report_csv)
    return cells


@pipeline(enable_cache=True)
def prepare(config: RunConfig, inputs: dict[str, Any], resume: bool = False) -> None:
    """Load → subset → region filter → dedupe → crop → save, with the inspection reports."""
    prepare_steps(config, inputs)
