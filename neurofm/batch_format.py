"""The batch a :class:`~neurofm.stream.CellStream` yields, and the dense tensors training reads off it.

Batch format (a dict, what the training loop's ``make_batch`` consumes as its ``bins``):

- ``"bins"``: ``torch.int16`` (cells × n_genes) — every gene's bin in the tokenizer's gene order (zeros
  included, as the model samples ``max_tokens_per_cell`` genes among all genes of a cell);
- ``"rows"``: ``torch.int64`` (cells,) — the cells' store rows (obs in ``store.read_obs()``);
- ``"dataset"``: ``torch.int64`` (cells,) — each cell's dataset (its source file) in a multi-file store
  (``store.dataset_names``; all 0 in a single-file store). ``CellStream.observed_genes`` (bool, datasets ×
  genes) says which genes a dataset measures and :func:`observed_mask` gives a batch's (cells × genes)
  mask: where it is False the gene was *not measured* (not a zero) — its dense bin is the zero-bin
  placeholder, its count 0; it is not in the cell's library size and must get no token and no loss;
- ``"worker"``: ``torch.int64`` scalar — the logical worker that made it (the loader's position bookkeeping).

With ``StreamConfig(output="sparse")`` a batch carries the non-zeros only — ``"indptr"`` int64 (cells + 1),
``"genes"`` int32 and ``"nonzero_bins"`` int16 (one per non-zero) — about 30× less to move between worker
processes or to the GPU for 20,000 genes; :func:`densify` turns either format into the dense bins.
"""

from __future__ import annotations

import torch

from neurofm.errors import NeurofmError


def densify(batch: dict, zero_bins: torch.Tensor) -> torch.Tensor:
    """(cells × genes) int16 bins of a batch in either format, on the device of ``batch``'s tensors.

    A sparse batch (``indptr``, ``genes``, ``nonzero_bins``) is expanded here — after a cheap transfer
    of the non-zeros only, this can run on the GPU — with ``zero_bins`` (``CellStream.zero_bins``)
    for the genes a cell did not express.
    """
    if "bins" in batch:
        return batch["bins"]
    indptr = batch["indptr"]
    device = indptr.device
    n_cells = indptr.numel() - 1
    dense = zero_bins.to(device).expand(n_cells, -1).clone()
    rows = torch.repeat_interleave(torch.arange(n_cells, device=device), indptr.diff())
    dense[rows, batch["genes"].long()] = batch["nonzero_bins"]
    return dense


def observed_mask(batch: dict, observed_genes: torch.Tensor) -> torch.Tensor:
    """bool (cells × genes): True where the cell's dataset measured the gene (``observed_genes`` is
    ``CellStream.observed_genes``), on the device of ``batch``'s tensors. False marks an unobserved gene:
    its bin in ``densify`` and its count in ``densify_counts`` are placeholders (the zero bin, 0), not
    measurements — give it no token and do not decode or score it."""
    dataset = batch["dataset"]
    return observed_genes.to(dataset.device)[dataset.long()]


def batch_observed(batch: dict, observed_genes: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`observed_mask` of ``batch``, or None when ``observed_genes`` is (see :func:`partly_observed_genes`)."""
    return None if observed_genes is None else observed_mask(batch, observed_genes)


def densify_counts(batch: dict, n_genes: int) -> torch.Tensor:
    """(cells × genes) float32 raw counts of a batch streamed with ``StreamConfig.counts``, in either
    format, on the device of ``batch``'s tensors."""
    if "counts" in batch:
        return batch["counts"]
    if "nonzero_counts" not in batch:
        raise NeurofmError("this batch carries no counts; stream with StreamConfig(counts=True)")
    indptr = batch["indptr"]
    n_cells = indptr.numel() - 1
    dense = torch.zeros(n_cells, n_genes, dtype=torch.float32, device=indptr.device)
    rows = torch.repeat_interleave(torch.arange(n_cells, device=indptr.device), indptr.diff())
    dense[rows, batch["genes"].long()] = batch["nonzero_counts"]
    return dense
