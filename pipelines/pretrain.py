"""The pre-training pipeline: data → cell store (cached) → tokenize → pretrain (MLflow run + registered model).

The tokenize and pretrain steps get the store's reference (uri + manifest hash), never an AnnData:

- ``--data X.h5ad`` (no crop): ``convert_cells`` converts the file once into a store, the cluster subset
  and region filter applied on the way — cached on the file's fingerprint and the selection, so no
  step ever holds the atlas in memory;
- ``--data A.h5ad --data B.h5ad`` (``data.files``): ``convert_files`` converts them once into one store
  of the union of their genes (``neurofm.data.store.convert_many``), cached on the files' fingerprints;
  pre-training skips the genes each file did not measure;
- the built-in data, or a crop: the prepare steps (synthetic atlas, subset, crop) make the small
  AnnData as before and ``store_cells`` writes it as a store.
"""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from neurofm.config import RunConfig
from pipelines.prepare import prepare_steps
from pipelines.settings import step_settings
from steps.data import convert_cells, convert_files, store_cells
from steps.train import pretrain_model, tokenize


def uses_direct_conversion(config: RunConfig, inputs: dict[str, Any]) -> bool:
    """Whether the store is converted straight from the user's .h5ad (no prepared AnnData): a user file
    and no crop (a crop samples cells and genes from the whole matrix, a small-data step)."""
    crop = config.crop
    return not inputs["default_data"] and crop.n_cells is None and crop.n_genes is None


def store_steps(config: RunConfig, inputs: dict[str, Any], need_cells: bool = True):
    """(prepared AnnData or None, cell store reference). ``need_cells=False`` lets a user .h5ad skip the
    prepare steps (see the module docstring)."""
    out_dir = config.data.out_dir
    if inputs.get("files"):  # several files (data.files): one store of the union of their genes
        reference = convert_files(
            files=inputs["files"],
            fingerprints=inputs["fingerprints"],
            out_dir=out_dir,
            layer=config.data.layer,
        )
        return None, reference
    if not need_cells and uses_direct_conversion(config, inputs):
        subset = config.subset
        selection = {
            "metadata_csv": inputs["metadata_csv"] if inputs["cluster_ids"] else None,
            "cluster_ids": list(inputs["cluster_ids"]) or None,
            "obs_name_column": subset.obs_name_column,
            "cluster_column": subset.cluster_column,
            "label_prefix": subset.label_prefix,
            "region": inputs["region"],
            "region_column": config.region.column,
        }
        reference = convert_cells(
            path=inputs["path"],
            fingerprint=inputs["fingerprint"],
            selection=selection,
            out_dir=out_dir,
            layer=config.data.layer,
        )
        return None, reference
    cells = prepare_steps(config, inputs)
    return cells, store_cells(cells, out_dir=out_dir)


def pretrain_steps(config: RunConfig, inputs: dict[str, Any], resume: bool = False, need_cells: bool = True):
    """Wire data → store → tokenize → pretrain; returns (prepared cells or None, model dir, pretrain
    summary). ``need_cells`` (the full pipeline evaluates on the prepared cells) keeps the prepare steps."""
    cells, reference = store_steps(config, inputs, need_cells)
    tokenizer_dir = tokenize(
        reference, tokenizer=config.tokenizer, train=config.train, out_dir=config.data.out_dir
    )
    settings = step_settings(config).get("pretrain_model", {})
    model_dir, summary = pretrain_model.with_options(settings=settings)(
        reference,
        tokenizer_dir,
        model=config.model,
        train=config.train,
        tracking_config=config.tracking,
        out_dir=config.data.out_dir,
        data_name=inputs["name"],
        resume=resume,
        reference=config.reference,
    )
    return cells, model_dir, summary


@pipeline(enable_cache=True)
def pretrain(config: RunConfig, inputs: dict[str, Any], resume: bool = False) -> None:
    """Convert (or prepare) the data into a cell store, fit the tokenizer, pre-train and register the encoder."""
    pretrain_steps(config, inputs, resume, need_cells=False)
