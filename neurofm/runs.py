"""Run inputs and early checks, ZenML-free: what ``run.py``, ``pipelines/`` and tests share.

:func:`resolve_inputs` decides what a pipeline reads (the user's .h5ad or the built-in atlas, written
once) and checks it; :func:`check_labels_early` / :func:`check_model_early` stop label-column and
``--model`` mistakes before any pipeline starts; :func:`summarize_run` prints what a run produced.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurofm.errors import NeurofmError

if TYPE_CHECKING:
    from neurofm.config import RunConfig

log = logging.getLogger("neurofm")


def resolve_inputs(config: RunConfig) -> dict[str, Any]:
    """Decide what the pipeline reads: the user's .h5ad, or the built-in atlas (written once).

    Returns plain values (paths, fingerprints, cluster IDs, region) for the pipeline. The built-in
    atlas's own selection (its clusters, region and crop, ``default_data``) is already in ``config``
    (:func:`neurofm.config.apply_demo_data`).
    """
    from neurofm import io

    data = config.data
    if data.files is not None:
        return _several_files(config)
    if data.builtin:
        demo = config.default_data
        files = default_atlas(demo.n_cells, demo.n_genes, demo.seed)
        return {
            "path": str(files.counts_h5ad),
            "fingerprint": io.file_fingerprint(files.counts_h5ad),
            "metadata_csv": str(files.cell_metadata_csv),
            "cluster_csv": str(files.cluster_csv),
            "annotation_csv": str(files.cluster_annotation_term_csv),
            "cluster_ids": list(config.subset.cluster_ids),
            "region": config.region.value,
            "default_data": True,
            "name": f"synthetic-atlas-seed{demo.seed}",
        }
    path = io.check_h5ad_path(data.path)
    for key in ("metadata_csv", "cluster_csv", "annotation_csv"):
        if getattr(data, key) is not None and not Path(getattr(data, key)).is_file():
            raise NeurofmError(
                f"data.{key} file {getattr(data, key)} does not exist; fix the path or set it to null"
            )
    if config.subset.cluster_ids and data.metadata_csv is None:
        raise NeurofmError(
            "subset.cluster_ids is set but data.metadata_csv is not; pass --metadata cell_metadata.csv "
            "or clear subset.cluster_ids"
        )
    check_inputs_early(path, config)
    return {
        "path": str(path.resolve()),
        "fingerprint": io.file_fingerprint(path),
        "metadata_csv": data.metadata_csv,
        "cluster_csv": data.cluster_csv,
        "annotation_csv": data.annotation_csv,
        "cluster_ids": list(config.subset.cluster_ids),
        "region": config.region.value,
        "default_data": False,
        "name": path.stem,
    }


def _several_files(config: RunConfig) -> dict[str, Any]:
    """:func:`resolve_inputs` for ``data.files``: each file's spec (a path or a mapping, as
    ``neurofm.data.store.InputFile.parse`` takes it) with its path checked and made absolute, and its
    fingerprint. Cluster subsets, region filters and crops are single-file selections: refused here."""
    from neurofm import io
    from neurofm.data.store import InputFile

    if config.subset.cluster_ids or config.region.value is not None:
        raise NeurofmError(
            "subset.cluster_ids / region.value select cells of one file; with several data files "
            "(data.files) select them per file first, or clear those settings"
        )
    if config.crop.n_cells is not None or config.crop.n_genes is not None:
        raise NeurofmError("crop.n_cells / crop.n_genes crop one file; clear them for several data files")
    specs, fingerprints = [], []
    for entry in config.data.files:
        spec = InputFile.parse(entry)
        path = io.check_h5ad_path(spec.path)
        specs.append({"path": str(path.resolve()), "batch_column": spec.batch_column,
                      "gene_column": spec.gene_column, "name": spec.name})  # fmt: skip
        fingerprints.append(io.file_fingerprint(path))
    return {
        "files": specs,
        "fingerprints": fingerprints,
        "path": None,
        "fingerprint": None,
        "metadata_csv": None,
        "cluster_csv": None,
        "annotation_csv": None,
        "cluster_ids": [],
        "region": None,
        "default_data": False,
        "name": "+".join(Path(spec["path"]).stem for spec in specs),
    }


def check_inputs_early(path: Path, config: RunConfig) -> None:
    """Cheap checks of the user's files before ZenML starts, so mistakes end in one line, not a failed
    step: the .h5ad opens as HDF5 (not truncated), the metadata CSV has the columns the config names,
    and the region column exists in the .h5ad's obs or (with a cluster subset) in the metadata."""
    import h5py

    from neurofm.data.atlas import metadata_header

    try:
        with h5py.File(path, "r") as handle:
            obs = handle.get("obs")
            obs_columns = list(obs.attrs.get("column-order", [])) if isinstance(obs, h5py.Group) else None
    except OSError as error:
        reason = str(error).splitlines()[0][:160]
        raise NeurofmError(
            f"cannot open {path} as HDF5 ({reason}); the file is truncated or not an .h5ad — re-export it"
        ) from None
    subset, metadata_csv = config.subset, config.data.metadata_csv
    header: list[str] = []
    if metadata_csv is not None:
        header = metadata_header(metadata_csv)
        needed = [subset.obs_name_column] + ([subset.cluster_column] if subset.cluster_ids else [])
        if missing := [column for column in needed if column not in header]:
            raise NeurofmError(
                f"metadata {Path(metadata_csv).name} lacks column(s) {missing} (columns: {header[:20]}); "
                "name the right columns with --set subset.obs_name_column=… / subset.cluster_column=…"
            )
    region = config.region
    if region.value is not None and obs_columns is not None:
        available = obs_columns + (header if subset.cluster_ids else [])
        if region.column not in available:
            where = " nor in the metadata" if subset.cluster_ids else ""
            raise NeurofmError(
                f"region column '{region.column}' is neither in the obs of {path.name} (obs columns: "
                f"{obs_columns}){where}; name one of them with --set region.column=…, or keep every "
                "region with --set region.value=null"
            )


def check_labels_early(config: RunConfig, inputs: dict[str, Any]) -> None:
    """Before ZenML starts (so before preparing, or training): the evaluation's label column exists in the
    input files and can hold two classes. Only what the inputs settle is refused — a label the mapping does
    not cover may still be filtered out by the region or crop, so the evaluation step judges that."""
    import anndata as ad
    import h5py
    import pandas as pd

    from neurofm import keys
    from neurofm.data.atlas import metadata_header

    column, mapping = config.evaluate.label_column, config.evaluate.label_mapping
    if mapping is not None and not isinstance(mapping, dict):
        raise NeurofmError(
            f"evaluate.label_mapping must map labels to classes, got {mapping!r}; "
            "e.g. --set 'evaluate.label_mapping={cluster_2523: excitatory, cluster_210: inhibitory}'"
        )
    path, cluster_ids = Path(inputs["path"]), inputs["cluster_ids"]
    with h5py.File(path, "r") as handle:
        obs = handle.get("obs")
        if not isinstance(obs, h5py.Group):  # an old AnnData layout: leave it to the evaluation step
            return
        obs_columns = [str(name) for name in obs.attrs.get("column-order", [])]
        values: set[str] | None = None
        if cluster_ids and column == keys.SUBTYPE:  # written by the subset step: prefix + cluster ID
            values = {f"{config.subset.label_prefix}{cluster_id}" for cluster_id in cluster_ids}
        elif column in obs_columns:
            try:
                values = set(pd.Series(ad.io.read_elem(obs[column])).dropna().astype(str))
            except (OSError, KeyError, TypeError, ValueError):  # unreadable here: the step will say why
                values = None
    available = obs_columns + (
        [keys.SUBTYPE, *metadata_header(inputs["metadata_csv"])] if cluster_ids else []
    )
    if column not in available:
        raise NeurofmError(
            f"label column {column!r} is not in the obs of {path.name}{' nor in the metadata' if cluster_ids else ''}; "
            f"pick one of: {', '.join(dict.fromkeys(available)) or '(none)'} (set --label-col)"
        )
    if values is None or (mapping is not None and not values <= {str(key) for key in mapping}):
        return
    classes = {str(mapping[value]) for value in values} if mapping is not None else values
    if len(classes) < 2:
        raise NeurofmError(
            f"label column {column!r} has a single class ({', '.join(sorted(classes)) or 'none'}) in "
            f"{path.name}{' after the label mapping' if mapping is not None else ''}; the probe needs two or "
            "more classes — choose another --label-col or a label mapping that keeps classes apart"
        )


def check_model_early(config: RunConfig, inputs: dict[str, Any]) -> None:
    """Before ZenML starts: an ``evaluate.model`` directory is a complete, readable checkpoint whose genes
    are found in the input .h5ad by the rules ``neurofm embed`` uses (:mod:`neurofm.genes`: IDs or
    symbols, version suffixes, ``--gene-col``, ``--min-gene-overlap``); the match is logged. Registry and
    MLflow URIs are fetched, and matched, by the pipeline."""
    import anndata as ad

    from neurofm import tracking
    from neurofm.data.dedupe import unique_names
    from neurofm.genes import match_adata
    from neurofm.model import load_pretrained

    spec = config.evaluate.model
    if spec is None or ":/" in str(spec):
        return
    tracking_config = config.tracking
    model_dir = tracking.resolve_model_dir(
        spec, tracking_config.registered_model_name, tracking_config.tracking_uri
    )
    _, tokenizer = load_pretrained(model_dir)
    path = Path(inputs["path"])
    try:
        backed = ad.read_h5ad(path, backed="r")  # obs and var only; the counts stay on disk
    except (OSError, KeyError, TypeError, ValueError):  # unreadable here: the prepare steps say why
        return
    try:
        var = backed.var.copy()
    finally:
        backed.file.close()
    dedupe = config.dedupe
    if dedupe.genes == "make_unique" and dedupe.gene_column is None:  # as the dedupe step renames
        var.index = unique_names(var.index.astype(str))
    evaluate = config.evaluate
    match = match_adata(
        ad.AnnData(var=var),
        tokenizer.gene_ids,
        tokenizer.gene_symbols,
        gene_col=evaluate.gene_column,
        min_overlap=evaluate.min_gene_overlap,
    )
    log.info("genes of %s for the model in %s: %s", path.name, model_dir, match.describe())


def check_map_early(config: RunConfig) -> None:
    """Before ZenML starts, for the map pipeline: a query file is given; its obs has the label and batch
    columns named; a model directory holds a reference with the columns asked for, and its genes are found
    in the query by :mod:`neurofm.genes`' rules. Registry URIs are checked by the pipeline."""
    import anndata as ad

    from neurofm import io, tracking
    from neurofm.genes import match_adata
    from neurofm.mapping import load_reference
    from neurofm.model import load_pretrained

    settings = config.map
    if config.data.path is None:
        raise NeurofmError(
            "the map pipeline maps your cells: pass --data QUERY.h5ad (and --model, a model with a reference)"
        )
    path = io.check_h5ad_path(config.data.path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        obs_columns, var = list(backed.obs.columns), backed.var.copy()
    finally:
        backed.file.close()
    for flag, column in (
        ("--label-col", settings.query_label_column),
        ("--batch-col", settings.batch_column),
    ):
        if column is not None and column not in obs_columns:
            raise NeurofmError(
                f"{path.name} has no obs column {column!r} (columns: {obs_columns[:12]}); fix {flag}"
            )
    spec = settings.model
    if spec is None or ":/" in str(spec):
        return
    tracking_config = config.tracking
    model_dir = tracking.resolve_model_dir(
        spec, tracking_config.registered_model_name, tracking_config.tracking_uri
    )
    reference = load_reference(model_dir)
    for column in settings.label_columns or []:
        if column not in reference.columns:
            raise NeurofmError(
                f"the model's reference has no label column {column!r} (it has {reference.label_columns}); "
                "fix map.label_columns"
            )
    _, tokenizer = load_pretrained(model_dir)
    match = match_adata(
        ad.AnnData(var=var), tokenizer.gene_ids, tokenizer.gene_symbols,
        gene_col=settings.gene_column, min_overlap=settings.min_gene_overlap,
    )  # fmt: skip
    log.info("genes of %s for the model in %s: %s", path.name, model_dir, match.describe())


def run_notes(config: RunConfig, inputs: dict[str, Any], pretrained: bool = True) -> list[str]:
    """How this run differs from the pipeline's defaults on a user's data, in the words the report and
    the closing summary print: the built-in demo's shorter pre-training, a capped scVI baseline."""
    from neurofm.train_config import TrainConfig

    notes = []
    train = config.train
    if inputs["default_data"] and pretrained:
        budget = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs} epochs"
        notes.append(
            f"built-in demo data: pre-trained for {budget} (default_data.train); on your own data the "
            f"pipeline pre-trains train.epochs = {TrainConfig().epochs} epochs"
        )
    capped = config.evaluate.scvi_max_epochs
    if capped is not None and "scvi" in config.evaluate.baselines:
        notes.append(
            f"the scVI baseline is capped at {capped} epochs (evaluate.scvi_max_epochs; scvi-tools' own "
            "rule trains longer): a weaker baseline, shown as scvi_capped"
        )
    return notes


def default_atlas(n_cells: int, n_genes: int, seed: int):
    """The built-in synthetic atlas under $NEUROFM_HOME, written once per (size, seed)."""
    from neurofm.data.synthetic import AtlasFiles, write_synthetic_atlas
    from neurofm.tracking import neurofm_home

    name = f"default_atlas_{n_cells}x{n_genes}_seed{seed}"
    out_dir = neurofm_home() / name
    names = {
        "counts_h5ad": "counts.h5ad",
        "cell_metadata_csv": "cell_metadata.csv",
        "cluster_csv": "cluster.csv",
        "cluster_annotation_term_csv": "cluster_annotation_term.csv",
    }
    existing = AtlasFiles(**{key: out_dir / file for key, file in names.items()})
    if all(path.is_file() for path in existing.as_dict().values()):
        return existing
    log.info("writing the built-in synthetic atlas to %s", out_dir)
    return write_synthetic_atlas(out_dir, n_cells=n_cells, n_genes=n_genes, seed=seed)
