"""The masked-bin task: the cell split, gene sampling, masking, the batches a step trains on, and the
per-gene frequency-table baseline the model's perplexity is compared with.

Each step samples ``max_tokens_per_cell`` genes per cell (all of them when the cap is larger than the gene
count) and masks ``mask_ratio`` of those tokens, ``nonzero_mask_share`` of the masked ones on non-zero bins
(bin > 0), as the original did — all with tensor ops on the batch. The frequency table counts the training
rows' bins streamed once (all of them, or a seeded sample of ``BASELINE_MAX_CELLS`` when there are more),
sparsely with ``np.bincount``; it is scored on exactly the validation positions the model is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from neurofm.data.store import CellStore
from neurofm.errors import NeurofmError
from neurofm.sparse_binning import SparseBinner
from neurofm.store_fit import sample_rows
from neurofm.tokenizer import MIN_CELLS, ExpressionTokenizer


class MaskingSettings(Protocol):
    """The settings :func:`make_batch` reads (``neurofm.train.TrainConfig`` has them)."""

    mask_ratio: float
    nonzero_mask_share: float
    cell_loss_tokens: str
    count_input: str


IGNORE_INDEX = -100  # label of tokens that are not scored
BASELINE_SMOOTHING = 0.5  # add-½ counts in the per-gene frequency table (never a zero probability)
BASELINE_MAX_CELLS = 200_000  # the frequency table counts at most this many training cells (a seeded sample)


# ---------------------------------------------------------------------------------------------- data
def split_cells(n_cells: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's in-memory split (``pretrain`` now uses the store's rows, ``split_store``): shuffle
    ``arange(n_cells)`` with ``RandomState(seed)``; the last
    ``int(n_cells * val_fraction)`` cells are validation. Raises NeurofmError when either side is too
    small."""
    n_val = int(n_cells * val_fraction)
    if n_val < 1 or n_cells - n_val < MIN_CELLS:
        raise NeurofmError(
            f"{n_cells} cells are too few for a {val_fraction:.0%} validation split (need >= 1 "
            "validation and "
            f">= {MIN_CELLS} training cells); pass more cells or change val_fraction"
        )
    order = np.arange(n_cells)
    np.random.RandomState(seed).shuffle(order)
    return order[: n_cells - n_val], order[n_cells - n_val :]


def sample_genes(
    n_cells: int,
    n_genes: int,
    n_tokens: int,
    generator: torch.Generator,
    device: torch.device | None = None,
    observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n_cells, n_tokens) gene indices, a uniform sample without replacement per cell, sorted; with
    ``observed`` (cells × genes bool) drawn among each cell's observed genes first (a cell with fewer
    than ``n_tokens`` of them gets unobserved ones too: :func:`make_batch` pads those)."""
    if n_tokens >= n_genes:
        return torch.arange(n_genes, device=device).expand(n_cells, n_genes).clone()
    keys = torch.rand(n_cells, n_genes, generator=generator, device=generator.device)
    if observed is not None:
        keys = torch.where(observed.to(keys.device), keys, keys - 2.0)  # below every observed gene's key
    return keys.topk(n_tokens, dim=1).indices.sort(dim=1).values.to(device)


def mask_tokens(
    bins: torch.Tensor,
    mask_ratio: float,
    nonzero_share: float,
    generator: torch.Generator,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (cells, tokens) mask: ``max(1, int(mask_ratio * n_real))`` tokens per cell, of which
    ``round(nonzero_share * k)`` sit on non-zero bins (fewer if the cell lacks them, the rest on zeros,
    and vice versa) — the original's rule, vectorised over the batch."""
    if padding_mask is None:
        padding_mask = torch.zeros_like(bins, dtype=torch.bool)
    real = ~padding_mask
    nonzero = (bins > 0) & real
    zero = (bins == 0) & real
    n_real = real.sum(1)
    n_nonzero, n_zero = nonzero.sum(1), zero.sum(1)
    k_total = torch.clamp((n_real.double() * mask_ratio).floor().long(), min=1)
    k_nonzero = torch.minimum(torch.round(k_total.double() * nonzero_share).long(), n_nonzero)
    k_zero = torch.minimum(k_total - k_nonzero, n_zero)
    k_nonzero = torch.minimum(k_total - k_zero, n_nonzero)  # zeros ran short: take more non-zeros

    keys = torch.rand(bins.shape, generator=generator, device=generator.device).to(bins.device)

    def first_k(candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ranked = torch.where(candidates, keys, torch.full_like(keys, 2.0)).argsort(dim=1)
        rank = torch.empty_like(ranked).scatter_(
            1, ranked, torch.arange(bins.shape[1], device=bins.device).expand_as(ranked).contiguous()
        )
        return candidates & (rank < k[:, None])

    return first_k(nonzero, k_nonzero) | first_k(zero, k_zero)


@dataclass
class MaskedBatch:
    gene_ids: torch.Tensor  # (cells, tokens)
    input_bins: torch.Tensor  # bins with masked tokens replaced by the mask token
    labels: torch.Tensor  # true bin at masked tokens, IGNORE_INDEX elsewhere
    cell_labels: torch.Tensor  # what the cell head is scored on: labels, or the true bin of every token
    padding_mask: torch.Tensor | None
    counts: torch.Tensor | None = None  # (cells, all genes) raw counts, for the count head
    full_bins: torch.Tensor | None = None  # (cells, all genes) bins the count head reads ("all_genes")
    observed: torch.Tensor | None = None  # (cells, all genes) bool, the genes the count head reads and
    #                                       scores (a multi-file store's measured genes); None: all
    batch_index: torch.Tensor | None = None  # (cells,) each cell's batch, for a count head with a batch
    #                                          covariate (the stream batch's "batch_index"); None: none

    def rows(self, part: slice) -> MaskedBatch:
        """The cells ``part`` of the batch (a rank's share under DDP)."""
        return MaskedBatch(
            **{
                name.name: None if getattr(self, name.name) is None else getattr(self, name.name)[part]
                for name in fields(self)
            }
        )

    @property
    def n_scored(self) -> tuple[int, int]:
        """(masked tokens, tokens the cell head is scored on)."""
        return int((self.labels != IGNORE_INDEX).sum()), int((self.cell_labels != IGNORE_INDEX).sum())


def make_batch(
    bins: torch.Tensor,
    n_tokens: int,
    mask_token: int,
    config: MaskingSettings,
    generator: torch.Generator,
    counts: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
    *,
    batch_index: torch.Tensor | None = None,
) -> MaskedBatch:
    """Sample genes and masks for the cells in ``bins`` (cells × all genes); ``counts`` (the same cells'
    raw counts) ride along for the count head. ``observed`` (cells × genes bool, a multi-file store's
    :func:`neurofm.batch_format.observed_mask`): tokens are drawn among each cell's measured genes; a token
    that still falls on an unmeasured gene is padding (``padding_mask``), never masked nor scored; with
    ``counts`` the mask rides along too (``MaskedBatch.observed``) for the count head, as does each
    cell's ``batch_index`` (the stream batch's field of that name; None without batches)."""
    gene_ids = sample_genes(bins.shape[0], bins.shape[1], n_tokens, generator, bins.device, observed)
    token_bins = torch.gather(bins, 1, gene_ids).long()
    padding = None if observed is None else ~torch.gather(observed.to(bins.device), 1, gene_ids)
    masked = mask_tokens(token_bins, config.mask_ratio, config.nonzero_mask_share, generator, padding)
    labels = torch.where(masked, token_bins, torch.full_like(token_bins, IGNORE_INDEX))
    every = token_bins if padding is None else torch.where(padding, IGNORE_INDEX, token_bins)
    return MaskedBatch(
        gene_ids=gene_ids,
        input_bins=torch.where(masked, torch.full_like(token_bins, mask_token), token_bins),
        labels=labels,
        cell_labels=labels if config.cell_loss_tokens == "masked" else every,
        padding_mask=padding,
        counts=counts,
        full_bins=bins if counts is not None and config.count_input == "all_genes" else None,
        observed=observed if counts is not None else None,
        batch_index=batch_index if counts is not None else None,
    )


# ---------------------------------------------------------------------------------------------- baseline
def frequency_table(train_bins: np.ndarray, n_bins: int, smoothing: float = BASELINE_SMOOTHING) -> np.ndarray:
    """(genes, n_bins) probability of each bin per gene over the training cells, add-``smoothing``."""
    n_cells, n_genes = train_bins.shape
    flat = (np.arange(n_genes)[None, :] * n_bins + train_bins.astype(np.int64)).ravel()
    counts = np.bincount(flat, minlength=n_genes * n_bins).reshape(n_genes, n_bins) + smoothing
    return counts / counts.sum(axis=1, keepdims=True)


def baseline_scores(table: np.ndarray, batches: list[MaskedBatch]) -> tuple[float, float]:
    table = torch.from_numpy(table)
    log_table = table.log()
    nll, correct, masked = 0.0, 0, 0
    for batch in batches:
        scored = batch.labels != IGNORE_INDEX
        genes, labels = batch.gene_ids[scored].cpu(), batch.labels[scored].cpu()
        nll -= log_table[genes, labels].sum().item()
        correct += (table[genes].argmax(1) == labels).sum().item()
        masked += len(labels)
    return math.exp(nll / masked), correct / masked


def stream_frequency_table(
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    exclude_rows: np.ndarray,
    *,
    max_cells: int = BASELINE_MAX_CELLS,
    seed: int = 0,
    chunk_cells: int = 4096,
    smoothing: float = BASELINE_SMOOTHING,
) -> tuple[np.ndarray, int]:
    """``frequency_table`` of the training rows' bins, streamed: (table, cells counted).

    All training rows (those not in ``exclude_rows``) when there are at most ``max_cells``, else a
    seeded sample of ``max_cells`` of them (``default_rng([seed, 13])``). Each chunk of ``chunk_cells``
    rows is binned sparsely (only non-zeros; a gene's zeros all fall in its zero bin) and counted with
    ``np.bincount`` — never a dense (cells × genes) matrix. Equal to ``frequency_table`` of the dense
    bins of the same cells. In a multi-file store each gene counts only the cells whose file measured
    it (``store.observed_genes``); a gene no counted cell measured is uniform."""
    binner = SparseBinner(tokenizer)
    rows = sample_rows(store.n_cells, exclude_rows, max_cells, [seed, 13])
    n_genes, n_bins = binner.n_genes, binner.n_bins
    counts = np.zeros(n_genes * n_bins, dtype=np.int64)
    nonzero_per_gene = np.zeros(n_genes, dtype=np.int64)
    for start in range(0, rows.size, chunk_cells):
        part = store.rows(rows[start : start + chunk_cells])
        bins = binner.binned(part.indptr, part.indices, part.data).astype(np.int64)
        genes = part.indices.astype(np.int64)
        counts += np.bincount(genes * n_bins + bins, minlength=n_genes * n_bins)
        nonzero_per_gene += np.bincount(genes, minlength=n_genes)
    counts = counts.reshape(n_genes, n_bins)
    observed = store.observed_genes  # (datasets, genes)
    if observed.all():
        measuring = rows.size
    else:
        files = np.bincount(store.cell_datasets()[rows], minlength=observed.shape[0])
        measuring = files @ observed.astype(np.int64)  # per gene: the counted cells whose file measured it
    counts[np.arange(n_genes), binner.zero_bins.astype(np.int64)] += measuring - nonzero_per_gene
    table = counts + smoothing
    return table / table.sum(axis=1, keepdims=True), int(rows.size)
