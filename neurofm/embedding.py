"""Frozen-model cell embeddings into ``adata.obsm``.

Every gene of the tokenizer takes part. A cell's embedding pools the cell features
(``GeneEncoder.cell_features``, the vectors the cell head was trained on) of all its (gene, bin) tokens;
the default ``"mean"`` is exactly ``GeneEncoder.cell_embedding`` over every gene. A token's features
depend on its own gene and bin only, so they are computed once for every (gene, bin) pair — the feature
table, n_genes × (n_bins + 1) rows — and a cell's embedding is a pooled lookup of its genes' rows
(``torch.nn.functional.embedding_bag``): no per-token network work, no sequence, no context length.
Each cell is pooled on its own, so an embedding does not depend on the batch size or on which other
cells are embedded with it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch
from tqdm.auto import tqdm

from neurofm import keys
from neurofm.errors import NeurofmError
from neurofm.genes import DEFAULT_MIN_GENE_OVERLAP, GeneMatch, match_adata
from neurofm.model import GeneEncoder, ModelConfig, batch_codes, load_pretrained
from neurofm.pooling import (  # noqa: F401  (feature_table, resolve_pooling, POOLINGS, UNOBSERVED_MODES: re-exported)
    DEFAULT_POOLING,
    DEFAULT_UNOBSERVED,
    POOLINGS,
    UNOBSERVED_MODES,
    cell_inputs,
    feature_table,
    resolve_pooling,
)
from neurofm.runtime import resolve_device
from neurofm.tokenizer import ExpressionTokenizer

log = logging.getLogger(__name__)

EMBED_BATCH_SIZE = 256  # cells per forward pass when embedding (the evaluate section's batch_size)

REGISTERED_MODEL_NAME = "neurofm-encoder"  # configs: tracking.registered_model_name
DEFAULT_MODEL_URI = f"models:/{REGISTERED_MODEL_NAME}@champion"
_TOKENIZE_BLOCK = 4096  # cells tokenized at a time (bounds the dense float matrix in memory)


@torch.no_grad()
def embed_bins(
    model: GeneEncoder,
    bins: torch.Tensor,
    pooling: str = DEFAULT_POOLING,
    table: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
    batch_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """(cells, embedding_dim) embeddings of already-tokenized cells (``bins``: cells × all genes, bin ids in
    ``[0, n_bins]``) on the device of ``bins``. ``table`` is :func:`feature_table` of ``model``, computed
    here when not given (pass it when embedding many batches). ``observed`` (bool per gene) pools only
    those genes (the others are unobserved in the data). ``batch_index`` (cells,): each cell's batch code
    for a model whose count head has a batch covariate (``neurofm.model.batch_codes``; -1: none)."""
    cell, expression = cell_inputs(model, bins, pooling, table, observed)
    return model.embedding_from_cell(cell, expression, batch_index).float()


def embed_matrix(
    model: GeneEncoder,
    tokenizer: ExpressionTokenizer,
    adata: ad.AnnData,
    batch_size: int = EMBED_BATCH_SIZE,
    pooling: str = DEFAULT_POOLING,
    device: str = "auto",
    missing_genes: str = "error",
    progress: bool = True,
    match: GeneMatch | None = None,
    unobserved: str = DEFAULT_UNOBSERVED,
    batches=None,
    unseen_batch: str = "error",
) -> np.ndarray:
    """(n_cells, embedding_dim) float32 embeddings of every cell of ``adata`` with the frozen ``model``.

    Raw counts are tokenized with ``tokenizer`` — genes matched by ``var_names`` (see
    ``ExpressionTokenizer.transform`` for ``missing_genes``) or by ``match`` (a
    :class:`neurofm.genes.GeneMatch`) — and the cell features of the genes are pooled (see module
    docstring): ``"mean"`` (default), ``"mean_nonzero"`` over genes with a non-zero bin, ``"max"``
    element-wise. Model genes the ``match`` did not find are left out of the library size and, with
    ``unobserved="exclude"`` (default), of the pooling too; ``"zero"`` pools them as zero-count genes.
    Works on backed AnnData (cells are read ``4,096`` at a time); ``batch_size`` bounds memory, not the
    result. Writes nothing into ``adata``.

    A model whose count head has a batch covariate (``model.config.batch_names``) reads each cell's batch
    from ``batches`` (one name per cell); a batch it never saw is refused unless ``unseen_batch="none"``
    (those cells get the no-batch vector). Without ``batches`` every cell gets the no-batch vector (said
    once in the log). ``batches`` for a model without the covariate is refused.
    """
    if pooling not in POOLINGS:
        raise NeurofmError(f"pooling={pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    if unobserved not in UNOBSERVED_MODES:
        raise NeurofmError(f"unobserved={unobserved!r} is unknown; use one of {', '.join(UNOBSERVED_MODES)}")
    if batch_size < 1:
        raise NeurofmError(f"batch_size={batch_size} must be >= 1; pass a positive batch size")
    if tokenizer.n_genes != model.config.n_genes or tokenizer.config.n_bins != model.config.n_bins:
        raise NeurofmError(
            f"tokenizer has {tokenizer.n_genes} genes and {tokenizer.config.n_bins} bins but the model "
            f"{model.config.n_genes} and {model.config.n_bins}; use the tokenizer saved with the model "
            "(load_pretrained)"
        )
    torch_device = resolve_device(device)
    was_training = model.training
    model = model.to(torch_device).eval()
    source = None if match is None else match.source
    observed = None
    if source is not None and unobserved == "exclude" and not match.observed.all():
        observed = torch.from_numpy(match.observed).to(torch_device)
    codes = cell_batch_codes(model.config, adata.n_obs, batches, unseen_batch)
    embeddings = np.empty((adata.n_obs, model.embedding_dim), dtype=np.float32)
    bar = None  # started after the first block is read, so bad counts fail before any progress output
    table = feature_table(model)
    for block_start in range(0, adata.n_obs, _TOKENIZE_BLOCK):
        block = adata[block_start : block_start + _TOKENIZE_BLOCK]
        bins = tokenizer.transform(block, missing_genes=missing_genes, source=source)
        if bar is None:
            bar = tqdm(total=adata.n_obs, desc="embed", unit="cell", disable=not progress)
        bins = torch.from_numpy(bins).to(torch_device)
        for start in range(0, bins.shape[0], batch_size):
            rows = slice(block_start + start, block_start + start + batch_size)
            index = None if codes is None else codes[rows].to(torch_device)
            pooled = embed_bins(model, bins[start : start + batch_size], pooling, table, observed, index)
            embeddings[block_start + start : block_start + start + len(pooled)] = pooled.cpu().numpy()
            bar.update(len(pooled))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return embeddings


def cell_batch_codes(config: ModelConfig, n_cells: int, batches, unseen_batch: str = "error"):
    """(n_cells,) int64 batch codes for :func:`embed_matrix` (None for a model without a batch
    covariate): ``batches`` coded by ``neurofm.model.batch_codes``, or every cell -1 (the no-batch
    vector) when ``batches`` is None."""
    if unseen_batch not in ("error", "none"):
        raise NeurofmError(f"unseen_batch={unseen_batch!r} is unknown; use 'error' or 'none'")
    if not config.n_batches:
        if batches is not None:
            raise NeurofmError(
                "batches were given but this model's count head has no batch covariate; leave them out "
                "(or pre-train with train.batch_key)"
            )
        return None
    if batches is None:
        log.info(
            "the model's count head has %d batches and no cell was given one: every cell gets the "
            "no-batch vector", config.n_batches,
        )  # fmt: skip
        return torch.full((n_cells,), -1, dtype=torch.long)
    if len(batches) != n_cells:
        raise NeurofmError(f"{len(batches)} batch names for {n_cells} cells; give one batch per cell")
    return batch_codes(config, batches, unseen_batch)


def resolve_model(
    model: GeneEncoder | str | os.PathLike | None,
    tokenizer: ExpressionTokenizer | None = None,
    tracking_uri: str | None = None,
) -> tuple[GeneEncoder, ExpressionTokenizer, dict[str, Any]]:
    """``(model, tokenizer, source record)`` from a loaded model, a model directory or an MLflow URI.

    ``None`` means ``models:/neurofm-encoder@champion``. A loaded ``model`` needs its ``tokenizer``.
    """
    if isinstance(model, GeneEncoder):
        if tokenizer is None:
            raise NeurofmError("a loaded model needs its tokenizer: pass tokenizer=, or a model directory")
        return model, tokenizer, {"model": "in-memory GeneEncoder"}
    from neurofm.registry import model_version_for, resolve_model_dir

    spec = DEFAULT_MODEL_URI if model is None else str(model)
    directory = resolve_model_dir(spec, REGISTERED_MODEL_NAME, tracking_uri)
    loaded, loaded_tokenizer = load_pretrained(directory)
    record: dict[str, Any] = {"model": spec, "model_dir": str(directory)}
    registered = None if Path(spec).exists() else model_version_for(spec, REGISTERED_MODEL_NAME)
    if registered is not None:
        record.update(
            model_name=registered.name, model_version=registered.version, model_run_id=registered.run_id
        )
    return loaded, tokenizer or loaded_tokenizer, record


def embed(
    adata: ad.AnnData,
    model: GeneEncoder | str | os.PathLike | None = None,
    tokenizer: ExpressionTokenizer | None = None,
    *,
    key_added: str = keys.EMBEDDING,
    copy: bool = False,
    gene_col: str | None = None,
    min_gene_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
    unobserved: str = DEFAULT_UNOBSERVED,
    pooling: str = DEFAULT_POOLING,
    batch_size: int = EMBED_BATCH_SIZE,
    device: str = "auto",
    progress: bool = True,
    tracking_uri: str | None = None,
    batch_key: str | None = None,
    unseen_batch: str = "error",
) -> ad.AnnData | None:
    """Embed the cells of ``adata`` (raw counts) with a pre-trained neurofm model, scanpy style.

    ``model`` is a loaded :class:`GeneEncoder` (with its ``tokenizer``), a model directory, or an MLflow
    URI (``models:/neurofm-encoder@champion`` — the default when ``None`` —, ``models:/neurofm-encoder/3``,
    ``runs:/<id>/model``). The model's genes are matched to ``var_names`` or ``var[gene_col]`` (Ensembl
    versions stripped, case-insensitive, by the model's IDs or symbols — see :mod:`neurofm.genes`);
    fewer than ``min_gene_overlap`` of them found is an error. Genes the data lacks are unobserved
    (``unobserved="exclude"``: left out of library size and pooling; ``"zero"``: pooled as zero counts).
    For a model whose count head has a batch covariate, ``batch_key`` names the obs column of each cell's
    batch (see :func:`embed_matrix` for ``unseen_batch`` and for cells without one).

    Writes (into ``adata``, or into a copy returned when ``copy=True``):

    - ``obsm[key_added]`` — (n_cells, embedding_dim) float32 cell embeddings (``latent_dim`` with a count head, else ``d_model``);
    - ``uns['neurofm']`` — ``model`` (URI or directory), ``model_version`` / ``model_name`` when
      registered, ``gene_match`` (model genes found, vocabulary, data genes, overlap, keys),
      ``pooling``, ``unobserved``, ``key_added``, ``n_cells``, ``cells_per_second``,
      ``neurofm_version``.

    Returns ``None`` (or the copy). Backed AnnData are read in chunks of cells.
    """
    embeddings, record = _embed_with_record(
        adata,
        model,
        tokenizer,
        key_added=key_added,
        gene_col=gene_col,
        min_gene_overlap=min_gene_overlap,
        unobserved=unobserved,
        pooling=pooling,
        batch_size=batch_size,
        device=device,
        progress=progress,
        tracking_uri=tracking_uri,
        batch_key=batch_key,
        unseen_batch=unseen_batch,
    )
    target = adata.copy() if copy else adata
    target.obsm[key_added] = embeddings
    target.uns[keys.EMBEDDING_PARAMS] = record
    return target if copy else None


def _embed_with_record(
    adata: ad.AnnData,
    model: GeneEncoder | str | os.PathLike | None,
    tokenizer: ExpressionTokenizer | None,
    *,
    key_added: str,
    gene_col: str | None,
    min_gene_overlap: float,
    unobserved: str,
    pooling: str,
    batch_size: int,
    device: str,
    progress: bool,
    tracking_uri: str | None,
    batch_key: str | None = None,
    unseen_batch: str = "error",
) -> tuple[np.ndarray, dict[str, Any]]:
    """The embeddings of :func:`embed` and the ``uns['neurofm']`` record it writes."""
    from neurofm import __version__

    model, tokenizer, record = resolve_model(model, tokenizer, tracking_uri)
    match = match_adata(
        adata, tokenizer.gene_ids, tokenizer.gene_symbols, gene_col=gene_col, min_overlap=min_gene_overlap
    )
    if batch_key is not None and batch_key not in adata.obs:
        raise NeurofmError(
            f"batch column {batch_key!r} is not in obs (columns: {', '.join(map(str, adata.obs.columns[:8]))}); "
            "name the column of each cell's batch"
        )
    started = time.perf_counter()
    embeddings = embed_matrix(
        model,
        tokenizer,
        adata,
        batch_size=batch_size,
        pooling=pooling,
        device=device,
        progress=progress,
        match=match,
        unobserved=unobserved,
        batches=None if batch_key is None else adata.obs[batch_key].astype(str).to_numpy(),
        unseen_batch=unseen_batch,
    )
    seconds = time.perf_counter() - started
    record.update(
        gene_match=match.record(),
        pooling=resolve_pooling(model, pooling),
        unobserved=unobserved,
        key_added=key_added,
        n_cells=int(adata.n_obs),
        **({} if batch_key is None else {"batch_key": batch_key}),
        cells_per_second=float(adata.n_obs / max(seconds, 1e-9)),
        neurofm_version=__version__,
    )
    return embeddings, record


def embed_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model: GeneEncoder | str | os.PathLike | None = None,
    tokenizer: ExpressionTokenizer | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Embed the cells of the .h5ad ``in_path`` into a new file ``out_path``; the input is never touched.

    The input is read backed, 4,096 cells at a time, so memory does not grow with the number of cells;
    the output is a copy of the input plus ``obsm[key_added]`` and ``uns['neurofm']`` (see
    :func:`embed`, whose keyword ``options`` this takes), written to a temporary name and renamed when
    complete. Returns the ``uns['neurofm']`` record.
    """
    import shutil

    import h5py
    from anndata.io import write_elem

    from neurofm.io import atomic_path, check_h5ad_path, read_h5ad

    in_path, out_path = check_h5ad_path(in_path), Path(out_path)
    if out_path.suffix != ".h5ad":
        raise NeurofmError(f"output {out_path} must end in .h5ad; pass e.g. --out cells.embedded.h5ad")
    if out_path.resolve() == in_path.resolve():
        raise NeurofmError(
            f"output {out_path} is the input file; embed writes a new file — choose another --out"
        )
    key_added = options.pop("key_added", keys.EMBEDDING)
    adata = read_h5ad(in_path, backed=True)
    try:
        embeddings, record = _embed_with_record(
            adata,
            model,
            tokenizer,
            key_added=key_added,
            gene_col=options.pop("gene_col", None),
            min_gene_overlap=options.pop("min_gene_overlap", DEFAULT_MIN_GENE_OVERLAP),
            unobserved=options.pop("unobserved", "exclude"),
            pooling=options.pop("pooling", "auto"),
            batch_size=options.pop("batch_size", 256),
            device=options.pop("device", "auto"),
            progress=options.pop("progress", True),
            tracking_uri=options.pop("tracking_uri", None),
        )
    finally:
        adata.file.close()
    if options:
        raise NeurofmError(f"unknown embed option(s) {sorted(options)}; see neurofm.embedding.embed")
    record["input"] = str(in_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        shutil.copyfile(in_path, tmp)  # counts are copied as bytes, never loaded
        with h5py.File(tmp, "r+") as handle:
            obsm = handle.require_group("obsm")
            if key_added in obsm:
                del obsm[key_added]
            write_elem(obsm, key_added, embeddings)
            uns = handle.require_group("uns")
            if keys.EMBEDDING_PARAMS in uns:
                del uns[keys.EMBEDDING_PARAMS]
            write_elem(uns, keys.EMBEDDING_PARAMS, record)
    log.info("wrote %s: obsm[%r] (%d × %d)", out_path, key_added, *embeddings.shape)
    return record


def frame_to_anndata(frame) -> ad.AnnData:
    """A pandas DataFrame of raw counts (cells × genes; gene names as columns) as an AnnData."""
    cells = ad.AnnData(X=frame.to_numpy(dtype=np.float32))
    cells.obs_names = frame.index.astype(str)
    cells.var_names = frame.columns.astype(str)
    return cells


def random_encoder_like(model_config: ModelConfig, seed: int = 0) -> GeneEncoder:
    """The same architecture with freshly initialised (untrained) weights, in eval mode — the baseline
    that shows what pre-training adds. Seeded without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GeneEncoder(model_config).eval()
