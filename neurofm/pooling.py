"""A frozen model's cell vectors without a transformer pass: every (gene, bin) token's cell features in one
table (:func:`feature_table`), a cell's vector a pooled lookup of its genes' rows (:func:`cell_inputs`).
Used wherever whole cells are read by the count head — embedding, its training phase and validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from neurofm.errors import NeurofmError

POOLINGS = ("auto", "mean", "mean_nonzero", "max")  # "auto": what the model pooled in pre-training
UNOBSERVED_MODES = ("exclude", "zero")  # model genes the data lacks: left out of pooling, or zero counts
DEFAULT_POOLING, DEFAULT_UNOBSERVED = POOLINGS[0], UNOBSERVED_MODES[0]  # every signature's and config's default

if TYPE_CHECKING:
    from neurofm.model import GeneEncoder

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


def resolve_pooling(model: GeneEncoder, pooling: str) -> str:
    """``"auto"`` → the pooling the model's cell vector was trained with (``"mean_nonzero"`` for
    ``cell_pooling="nonzero"``, else ``"mean"``); any other value is returned as is."""
    if pooling != "auto":
        return pooling
    return "mean_nonzero" if model.config.cell_pooling == "nonzero" else "mean"


def cell_inputs(
    model: GeneEncoder,
    bins: torch.Tensor,
    pooling: str = DEFAULT_POOLING,
    table: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`embed_bins` feeds ``model.embedding_from_cell``: the pooled cell vectors (cells,
    d_model), looked up in ``table`` (no gradient flows into the token features), and the count head's
    ``expression_features`` (``None`` unless the model's latent reads the expression). ``observed``
    (bool): the genes measured — per gene (n_genes,), or per cell (cells, n_genes) for the cells of a
    multi-file store (``neurofm.batch_format.observed_mask``); only those are pooled and read. Memory is
    O(cells × genes) ids, never cells × genes × d_model."""
    n_bin_ids = model.config.n_bins + 1
    pooling = resolve_pooling(model, pooling)
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
    keep = None if observed is None or observed.ndim == 2 else observed[None, :].expand(bins.shape[0], -1)
    expression = model.expression_features(bins, keep=observed if keep is None else keep)
    if observed is not None and observed.ndim == 2:  # per cell: one bag of its measured genes each
        return _pooled_per_cell(rows, bins, table, pooling, observed), expression
    if observed is not None:
        rows, bins = rows[:, observed], bins[:, observed]
    if pooling == "mean_nonzero":
        keep = bins > 0
        keep[~keep.any(1)] = True  # cells with every bin 0: plain mean
        n_kept = keep.sum(1)
        offsets = torch.cumsum(n_kept, 0) - n_kept
        pooled = F.embedding_bag(rows[keep], table, offsets, mode="mean")  # one bag per cell
    else:  # "mean": the cell vector the cell head was trained on; "max": element-wise
        pooled = F.embedding_bag(rows, table, mode="max" if pooling == "max" else "mean")
    return pooled, expression


def _pooled_per_cell(
    rows: torch.Tensor, bins: torch.Tensor, table: torch.Tensor, pooling: str, observed: torch.Tensor
) -> torch.Tensor:
    """:func:`cell_inputs`' pooling over each cell's own ``observed`` genes (cells × genes bool)."""
    keep = observed.clone()
    if pooling == "mean_nonzero":
        keep &= bins > 0
        empty = ~keep.any(1)
        keep[empty] = observed[empty]  # cells with every measured bin 0: the plain mean of those
    keep[~keep.any(1)] = True  # a cell that measured nothing: every gene (no such cell in a store)
    n_kept = keep.sum(1)
    offsets = torch.cumsum(n_kept, 0) - n_kept
    return F.embedding_bag(rows[keep], table, offsets, mode="max" if pooling == "max" else "mean")
