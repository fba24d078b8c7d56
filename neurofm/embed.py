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

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neurofm import keys
from neurofm.errors import NeurofmError
from neurofm.model import GeneEncoder, ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from neurofm.train import resolve_device

log = logging.getLogger(__name__)

POOLINGS = ("mean", "mean_nonzero", "max")
_TOKENIZE_BLOCK = 4096  # cells tokenized at a time (bounds the dense float matrix in memory)
_TABLE_TOKENS = 1 << 16  # (gene, bin) tokens per block when building the feature table (bounds memory)


@torch.no_grad()
def feature_table(model: GeneEncoder) -> torch.Tensor:
    """(n_genes × (n_bins + 1), d_model) float32 cell features of every token the model accepts, on its
    device: row ``gene * (n_bins + 1) + bin`` for bin ids ``0 … n_bins`` (the last is the mask token)."""
    n_genes, n_bin_ids = model.config.n_genes, model.config.n_bins + 1
    device = model.gene_embedding.weight.device
    bin_ids = torch.arange(n_bin_ids, device=device)[None, :]
    genes_per_block = max(1, _TABLE_TOKENS // n_bin_ids)
    blocks = []
    for start in range(0, n_genes, genes_per_block):
        gene_ids = torch.arange(start, min(start + genes_per_block, n_genes), device=device)[:, None]
        blocks.append(model.cell_features(gene_ids, bin_ids).float().flatten(0, 1))  # (genes, bins) broadcast
    return torch.cat(blocks)


@torch.no_grad()
def embed_bins(
    model: GeneEncoder, bins: torch.Tensor, pooling: str = "mean", table: torch.Tensor | None = None
) -> torch.Tensor:
    """(cells, d_model) embeddings of already-tokenized cells (``bins``: cells × all genes, bin ids in
    ``[0, n_bins]``) on the device of ``bins``. ``table`` is :func:`feature_table` of ``model``, computed
    here when not given (pass it when embedding many batches)."""
    n_bin_ids = model.config.n_bins + 1
    if bins.shape[1] != model.config.n_genes:
        raise NeurofmError(
            f"bins have {bins.shape[1]} genes but the model {model.config.n_genes}; tokenize with the "
            "model's tokenizer"
        )
    lowest, highest = torch.aminmax(bins) if bins.numel() else (0, 0)
    if lowest < 0 or highest >= n_bin_ids:
        raise NeurofmError(f"bin ids must lie in [0, {n_bin_ids - 1}]; tokenize with the model's tokenizer")
    if table is None:
        table = feature_table(model)
    gene_offsets = torch.arange(bins.shape[1], device=bins.device) * n_bin_ids
    rows = bins.long() + gene_offsets  # (cells, genes) rows of the table
    if pooling == "mean_nonzero":
        keep = bins > 0
        keep[~keep.any(1)] = True  # cells with every bin 0: plain mean
        n_kept = keep.sum(1)
        offsets = torch.cumsum(n_kept, 0) - n_kept
        return F.embedding_bag(rows[keep], table, offsets, mode="mean")  # one bag per cell
    # "mean": the cell vector the cell head was trained on; "max": element-wise
    return F.embedding_bag(rows, table, mode="max" if pooling == "max" else "mean")


def embed(
    model: GeneEncoder,
    tokenizer: ExpressionTokenizer,
    adata: ad.AnnData,
    batch_size: int = 256,
    pooling: str = "mean",
    device: str = "auto",
    key_added: str = keys.EMBEDDING,
    missing_genes: str = "error",
    progress: bool = True,
) -> np.ndarray:
    """Embed every cell of ``adata`` with the frozen ``model``; returns (n_cells, d_model) float32.

    Raw counts are tokenized with ``tokenizer`` (genes matched by ``var_names``; see
    ``ExpressionTokenizer.transform`` for ``missing_genes``) and the cell features of every gene are
    pooled (see module docstring): ``"mean"`` over all genes (default), ``"mean_nonzero"`` over genes
    with a non-zero bin, ``"max"`` element-wise. ``batch_size`` cells are pooled at a time (it bounds
    memory, not the result). Writes ``adata.obsm[key_added]``.
    """
    if pooling not in POOLINGS:
        raise NeurofmError(f"pooling={pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
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
    embeddings = np.empty((adata.n_obs, model.config.d_model), dtype=np.float32)
    bar = tqdm(total=adata.n_obs, desc="embed", unit="cell", disable=not progress)
    table = feature_table(model)
    for block_start in range(0, adata.n_obs, _TOKENIZE_BLOCK):
        block = adata[block_start : block_start + _TOKENIZE_BLOCK]
        bins = torch.from_numpy(tokenizer.transform(block, missing_genes=missing_genes)).to(torch_device)
        for start in range(0, bins.shape[0], batch_size):
            pooled = embed_bins(model, bins[start : start + batch_size], pooling, table)
            embeddings[block_start + start : block_start + start + len(pooled)] = pooled.cpu().numpy()
            bar.update(len(pooled))
    bar.close()
    model.train(was_training)
    adata.obsm[key_added] = embeddings
    return embeddings


def random_encoder_like(model_config: ModelConfig, seed: int = 0) -> GeneEncoder:
    """The same architecture with freshly initialised (untrained) weights, in eval mode — the baseline
    that shows what pre-training adds. Seeded without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GeneEncoder(model_config).eval()
