"""The tokenizer's bins of sparse counts: :class:`SparseBinner` bins a CSR batch's stored non-zeros exactly
as :meth:`ExpressionTokenizer.transform <neurofm.tokenizer.ExpressionTokenizer.transform>` bins dense cells
(per-cell ``target_sum`` normalisation, ``log1p``, per-gene edges; zeros take their gene's precomputed zero
bin). The streaming loader (:mod:`neurofm.stream`) bins each batch with it, and :mod:`neurofm.masking` too.
"""

from __future__ import annotations

import numpy as np

from neurofm.tokenizer import ExpressionTokenizer, _round_up


class SparseBinner:
    """Bins of sparse counts, equal to ``tokenizer.transform`` on the same cells (store gene order =
    tokenizer gene order is required)."""

    def __init__(self, tokenizer: ExpressionTokenizer):
        tokenizer._require_fitted()
        config = tokenizer.config
        self.n_bins = config.n_bins
        self.target_sum = np.float32(config.target_sum)
        self.log1p = config.log1p
        # (genes, edges) float32 edges rounded up, as _apply_edges compares them
        self.edges = np.ascontiguousarray(_round_up(tokenizer.bin_edges, np.dtype(np.float32)))
        zero_count = (self.edges <= 0).sum(axis=1) - 1
        self.zero_bins = np.clip(zero_count, 0, self.n_bins - 1).astype(np.int16)
        # one contiguous row per edge position, trailing all-+inf positions dropped (they never count)
        width = int(np.isfinite(self.edges).sum(axis=1).max()) if self.edges.size else 0
        self.edge_columns = np.ascontiguousarray(self.edges[:, :width].T)
        self.n_genes = self.edges.shape[0]

    def values(self, indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
        """float32 normalised (and log1p'd) values of the stored non-zeros."""
        counts = data.astype(np.float32)
        lengths = np.diff(indptr)
        # library sizes are sums of integers: exact in float64, then exactly the float32 the dense
        # tokenizer path gets (below 2**24 UMIs per cell)
        library = np.zeros(lengths.size, dtype=np.float64)
        filled = lengths > 0
        if counts.size:
            library[filled] = np.add.reduceat(counts, indptr[:-1][filled], dtype=np.float64)
        library = library.astype(np.float32)
        scale = np.divide(self.target_sum, library, out=np.zeros_like(library), where=library > 0)
        values = counts * np.repeat(scale, lengths)
        if self.log1p:
            np.log1p(values, out=values)
        return values

    def nonzero_bins(self, indices: np.ndarray, values: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
        """int16 bin of each stored non-zero (gene ``indices``, normalised ``values``): the number of
        the gene's edges <= the value, minus one, clipped to ``[0, n_bins)`` — as ``_apply_edges``."""
        count = np.full(values.size, -1, dtype=np.int16)
        for start in range(0, values.size, chunk):  # cache-sized pieces: the gathers stay in L2
            part_indices, part_values = indices[start : start + chunk], values[start : start + chunk]
            part_count = count[start : start + chunk]
            for edge_column in self.edge_columns:  # one gather + compare per edge position
                part_count += part_values >= edge_column.take(part_indices)
        return np.clip(count, 0, self.n_bins - 1, out=count)

    def binned(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> np.ndarray:
        """int16 bins of a CSR matrix's stored non-zeros (same layout as ``data``)."""
        return self.nonzero_bins(indices, self.values(indptr, data))

    def dense(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> np.ndarray:
        """(cells × genes) int16 bins of a CSR batch of counts."""
        return self.densify(indptr, indices, self.binned(indptr, indices, data))

    def densify(self, indptr: np.ndarray, indices: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """(cells × genes) int16 bins from the non-zeros' ``bins`` (zeros get their gene's zero bin)."""
        n_cells = indptr.size - 1
        out = np.empty((n_cells, self.n_genes), dtype=np.int16)
        out[:] = self.zero_bins
        if bins.size:
            out[np.repeat(np.arange(n_cells), np.diff(indptr)), indices] = bins
        return out
