"""Normalisation + per-gene expression binning: fit / transform / save / load.

Raw UMI counts become integer bins in ``[0, n_bins)``, one per (cell, gene):

1. library-size normalisation to ``target_sum`` counts per cell (CP10k by default), then ``log1p``;
2. per-gene binning with edges fit on the *training* cells only.

Binning schemes (``TokenizerConfig.binning``):

- ``"quantile"`` — the original project's scheme, used for the headline numbers: edges are the distinct
  values of the ``n_bins + 1`` evenly spaced quantiles of the gene's training values; a value gets
  ``searchsorted(edges, value, side="right") - 1`` clipped to ``[0, n_bins - 1]``. Because most genes
  have many zeros, the low quantiles collapse onto 0 and zeros land in bin 0 (values below the first
  non-zero edge share it, exactly as in the original).
- ``"quantile_nonzero"`` — zero counts are their own bin 0; non-zero values are split into
  ``n_bins - 1`` per-gene quantile bins of the training cells' non-zero values.

The fitted tokenizer is a JSON file (settings + gene IDs) and an ``.npz`` of edges (no pickle).
Genes are identified by ``var_names`` (stable IDs such as Ensembl); data whose genes differ from the
tokenizer's are refused unless ``transform(..., missing_genes="zero")`` is asked for, which fills
genes absent from the data with zero counts and drops extra ones (and reports both through logging).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, write_json
from neurofm.keys import GENE_SYMBOL

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_EDGES = "tokenizer_edges.npz"
BINNING_SCHEMES = ("quantile", "quantile_nonzero")
CONSTANT_GENE_MODES = ("drop", "keep", "error")
MIN_CELLS = 10  # fewer cells than this cannot give meaningful per-gene quantiles or a split
_FORMAT_VERSION = 1


@dataclass
class TokenizerConfig:
    """How counts become bins."""

    n_bins: int = 20  # number of expression bins (the model's vocabulary, plus one mask token)
    target_sum: float = 1e4  # library size every cell is scaled to before log1p (CP10k)
    log1p: bool = True  # apply log(1 + x) after normalisation
    binning: str = "quantile"  # "quantile" (original) or "quantile_nonzero" (zeros alone in bin 0)
    counts_layer: str | None = None  # read counts from adata.layers[...] instead of X (None: X)
    check_integer_counts: bool = True  # refuse non-integer values (log-normalised data passed by mistake)
    constant_genes: str = "drop"  # genes with one value in every cell (all-zero genes of real 10x data):
    #                               "drop" (left out of the vocabulary, logged), "keep" (logged), "error"

    def validate(self) -> TokenizerConfig:
        if not isinstance(self.n_bins, int) or not 2 <= self.n_bins <= 1000:
            raise NeurofmError(
                f"tokenizer n_bins={self.n_bins!r} is out of range; use an integer in [2, 1000]"
            )
        if not np.isfinite(self.target_sum) or self.target_sum <= 0:
            raise NeurofmError(
                f"tokenizer target_sum={self.target_sum!r} must be a positive number; use e.g. 1e4"
            )
        if self.binning not in BINNING_SCHEMES:
            raise NeurofmError(
                f"tokenizer binning={self.binning!r} is unknown; use one of {', '.join(BINNING_SCHEMES)}"
            )
        if self.constant_genes not in CONSTANT_GENE_MODES:
            raise NeurofmError(
                f"tokenizer constant_genes={self.constant_genes!r} is unknown; use one of "
                f"{', '.join(CONSTANT_GENE_MODES)}"
            )
        return self


def _counts_matrix(adata: ad.AnnData, counts_layer: str | None) -> sp.csr_matrix | np.ndarray:
    if counts_layer is None:
        return adata.X
    if counts_layer not in adata.layers:
        raise NeurofmError(
            f"layer {counts_layer!r} not found in the AnnData (layers: {list(adata.layers)}); "
            "set counts_layer to an existing layer or None to use X"
        )
    return adata.layers[counts_layer]


def _check_counts(values: np.ndarray, check_integer: bool) -> None:
    """Raise NeurofmError for NaN/inf, negative or (optionally) non-integer counts."""
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise NeurofmError(
            "counts contain NaN or infinite values; clean the matrix or re-export raw UMI counts"
        )
    if values.min() < 0:
        raise NeurofmError("counts contain negative values; pass raw UMI counts, not scaled/centred data")
    if check_integer and not np.all(values == np.round(values)):
        raise NeurofmError(
            "counts are not integers (log-normalised data?); pass raw UMI counts or set "
            "counts_layer to the raw layer"
        )


def normalise_counts(
    counts, target_sum: float = 1e4, log1p: bool = True, check_integer: bool = True
) -> np.ndarray:
    """Dense float32 ``log1p(counts / library_size * target_sum)`` (cells × genes) after validating counts.

    Cells with zero total counts stay all-zero.
    """
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts)
        _check_counts(counts.data, check_integer)
        dense = counts.toarray().astype(np.float32, copy=False)
    else:
        dense = np.asarray(counts, dtype=np.float32)
        _check_counts(dense, check_integer)
        dense = dense.copy()
    library_size = dense.sum(axis=1, keepdims=True)
    scale = np.divide(
        np.float32(target_sum), library_size, out=np.zeros_like(library_size), where=library_size > 0
    )
    dense *= scale
    if log1p:
        np.log1p(dense, out=dense)
    return dense


def _apply_edges(values: np.ndarray, edges: np.ndarray, n_bins: int, chunk_cells: int = 256) -> np.ndarray:
    """``clip(searchsorted(edges[g], x, 'right') - 1, 0, n_bins - 1)`` for every gene at once.

    ``edges`` is (n_genes, n_edges) sorted per gene, padded with +inf (padding never counts); ``values``
    are finite. Each value's count of edges <= it is summed one edge column at a time over blocks of
    cells small enough to stay in cache.
    """
    edge_columns = _round_up(edges, values.dtype).T.copy()  # (n_edges, n_genes)
    out = np.empty(values.shape, dtype=np.int16 if n_bins < 32000 else np.int32)
    hits = np.empty((min(chunk_cells, values.shape[0]), values.shape[1]), dtype=bool)
    for start in range(0, values.shape[0], chunk_cells):
        block, count = values[start : start + chunk_cells], out[start : start + chunk_cells]
        hit = hits[: len(block)]
        count.fill(-1)
        for edge in edge_columns:
            np.greater_equal(block, edge, out=hit)
            count += hit
        np.clip(count, 0, n_bins - 1, out=count)
    return out


def _round_up(edges: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Each edge as the smallest ``dtype`` number >= it: for any ``dtype`` value ``x``, ``x >= edge``
    is unchanged, and comparing at ``dtype`` width (float32) halves the memory traffic."""
    with np.errstate(over="ignore"):  # edges beyond the float32 range become inf, still exact
        rounded = edges.astype(dtype)
    below = rounded < edges
    rounded[below] = np.nextafter(rounded[below], np.array(np.inf, dtype=dtype))
    return rounded


def _distinct_sorted(quantiles: np.ndarray) -> np.ndarray:
    """Per row, keep the first occurrence of each value of a sorted row and push repeats to +inf."""
    edges = quantiles.astype(np.float64, copy=True)
    repeat = np.zeros_like(edges, dtype=bool)
    repeat[:, 1:] = edges[:, 1:] == edges[:, :-1]
    edges[repeat] = np.inf
    return np.sort(edges, axis=1)


class ExpressionTokenizer:
    """Per-gene expression binning fit on training cells; see the module docstring for the schemes.

    Attributes after :meth:`fit`: ``gene_ids`` (var_names at fit time, the model's gene order),
    ``gene_symbols`` (``var['gene_symbol']`` at fit time, or None; used to match data named by symbol,
    see :mod:`neurofm.genes`), ``dropped_genes`` (constant genes left out with ``constant_genes="drop"``)
    and ``bin_edges`` (n_genes × n_edges, +inf padded).
    """

    def __init__(self, config: TokenizerConfig | None = None):
        self.config = (config or TokenizerConfig()).validate()
        self.gene_ids: np.ndarray | None = None
        self.gene_symbols: np.ndarray | None = None
        self.dropped_genes: np.ndarray = np.array([], dtype=str)
        self.bin_edges: np.ndarray | None = None

    # ------------------------------------------------------------------ fit / transform
    @property
    def is_fitted(self) -> bool:
        return self.gene_ids is not None and self.bin_edges is not None

    @property
    def n_genes(self) -> int:
        self._require_fitted()
        return len(self.gene_ids)

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NeurofmError(
                "the tokenizer is not fitted; call fit(adata, train_indices) or load(dir) first"
            )

    def normalise(self, adata: ad.AnnData) -> np.ndarray:
        """log1p(CP-``target_sum``) values of ``adata`` as dense float32, after input validation."""
        config = self.config
        return normalise_counts(
            _counts_matrix(adata, config.counts_layer),
            config.target_sum,
            config.log1p,
            config.check_integer_counts,
        )

    def fit(self, adata: ad.AnnData, train_indices: np.ndarray | None = None) -> ExpressionTokenizer:
        """Fit per-gene bin edges on the cells ``train_indices`` of ``adata`` (all cells if None)."""
        n_cells, n_genes = adata.shape
        if n_genes == 0:
            raise NeurofmError("the AnnData has no genes; pass a matrix with at least one gene")
        if n_cells < MIN_CELLS:
            raise NeurofmError(
                f"only {n_cells} cells; tokenizer fitting needs at least {MIN_CELLS} — pass more cells"
            )
        if len(set(adata.var_names)) != n_genes:
            raise NeurofmError(
                "var_names contain duplicate gene IDs; make them unique (adata.var_names_make_unique())"
            )
        values = self.normalise(adata)
        constant = np.ptp(values, axis=0) == 0
        if constant.any() and self.config.constant_genes == "error":
            examples = list(np.asarray(adata.var_names)[constant][:3])
            raise NeurofmError(
                f"{int(constant.sum())} genes have zero variance across all cells (e.g. "
                f"{examples}); drop them "
                "or set constant_genes='keep'"
            )
        if constant.all():
            raise NeurofmError("every gene has zero variance across cells; the matrix carries no signal")
        keep = np.ones(n_genes, dtype=bool)
        gene_names = np.asarray(adata.var_names, dtype=str)
        if constant.any() and self.config.constant_genes == "drop":
            keep = ~constant
            log.warning(
                "dropping %d of %d genes with one value in every cell (e.g. %s); set "
                "tokenizer.constant_genes=keep to keep them",
                int(constant.sum()),
                n_genes,
                list(gene_names[constant][:3]),
            )
            values = self.normalise(adata[:, keep])  # library sizes over the kept genes, as transform()
        elif constant.any():
            log.warning(
                "%d of %d genes have zero variance in every cell; they always fall in one bin",
                int(constant.sum()),
                n_genes,
            )
        train = values if train_indices is None else values[np.asarray(train_indices)]
        if train.shape[0] < MIN_CELLS:
            raise NeurofmError(
                f"only {train.shape[0]} training cells; fitting bin edges needs at least {MIN_CELLS} "
                "— pass more cells or lower val_fraction"
            )
        self.bin_edges = self._fit_edges(train)
        self.gene_ids = gene_names[keep]
        self.dropped_genes = gene_names[~keep]
        self.gene_symbols = (
            adata.var[GENE_SYMBOL].astype(str).to_numpy()[keep] if GENE_SYMBOL in adata.var.columns else None
        )
        return self

    def _fit_edges(self, train: np.ndarray) -> np.ndarray:
        n_bins = self.config.n_bins
        if self.config.binning == "quantile":
            levels = np.linspace(0.0, 1.0, n_bins + 1)
            quantiles = np.quantile(train, levels, axis=0).T  # (genes, n_bins + 1), sorted per gene
            edges = _distinct_sorted(quantiles)
            constant = ~np.isfinite(edges[:, 1])  # one distinct value: the original's [min, max + 1e-8]
            edges[constant, 1] = edges[constant, 0] + 1e-8
            return edges
        # quantile_nonzero: edge 0 at 0 (zeros alone in bin 0); then quantiles of the non-zero values.
        levels = np.linspace(0.0, 1.0, n_bins)  # n_bins - 1 non-zero bins need n_bins edges
        masked = np.where(train > 0, train, np.nan)
        with np.errstate(all="ignore"), _ignore_all_nan_warning():
            quantiles = np.nanquantile(masked, levels, axis=0).T  # (genes, n_bins), NaN for all-zero genes
        quantiles = np.where(np.isnan(quantiles), np.inf, quantiles)
        # the first non-zero edge is pushed to the smallest positive float so any non-zero value reaches bin 1
        quantiles[:, 0] = np.where(np.isfinite(quantiles[:, 0]), np.finfo(np.float32).tiny, np.inf)
        quantiles = _distinct_sorted(quantiles)
        zero_edge = np.zeros((quantiles.shape[0], 1))
        return np.concatenate([zero_edge, quantiles], axis=1)

    def transform(
        self, adata: ad.AnnData, missing_genes: str = "error", source: np.ndarray | None = None
    ) -> np.ndarray:
        """Bins (n_cells × n_genes of the tokenizer, int16) for ``adata``.

        Columns follow the tokenizer's gene order, matched by ``var_names``. ``missing_genes="error"``
        (default) refuses data whose genes differ from the tokenizer's (genes the tokenizer dropped as
        constant excepted); ``"zero"`` treats genes absent from the data as zero counts and ignores extra
        genes, logging how many of each. ``source`` (from :class:`neurofm.genes.GeneMatch`) gives the data
        column of each tokenizer gene (-1: unobserved, zero counts) instead of matching ``var_names``;
        the library size is then the sum over the observed tokenizer genes.
        """
        self._require_fitted()
        config = self.config
        counts = self.aligned_counts(adata, missing_genes, source)
        values = normalise_counts(counts, config.target_sum, config.log1p, config.check_integer_counts)
        return _apply_edges(values, self.bin_edges, config.n_bins)

    def aligned_counts(
        self, adata: ad.AnnData, missing_genes: str = "error", source: np.ndarray | None = None
    ):
        """The counts of ``adata`` with columns in the tokenizer's gene order (see :meth:`transform`).

        With ``missing_genes="zero"`` or a ``source`` mapping, tokenizer genes absent from the data are
        all-zero columns.
        """
        self._require_fitted()
        if missing_genes not in ("error", "zero"):
            raise NeurofmError(f"missing_genes={missing_genes!r} is unknown; use 'error' or 'zero'")
        counts = _counts_matrix(adata, self.config.counts_layer)
        if source is not None:
            source = np.asarray(source, dtype=np.int64)
            if source.shape != (self.n_genes,) or source.max(initial=-1) >= adata.n_vars:
                raise NeurofmError(
                    "the gene mapping does not fit this tokenizer and data; match the genes again"
                )
            if adata.n_vars == self.n_genes and np.array_equal(source, np.arange(self.n_genes)):
                return counts
            return _gather_columns(counts, source)
        data_genes = np.asarray(adata.var_names, dtype=str)
        if data_genes.shape == self.gene_ids.shape and np.array_equal(data_genes, self.gene_ids):
            return counts
        position = {gene: i for i, gene in enumerate(data_genes)}
        source = np.array([position.get(gene, -1) for gene in self.gene_ids])
        n_missing = int((source < 0).sum())
        extra = sorted(set(data_genes) - set(self.gene_ids) - set(self.dropped_genes))
        if missing_genes == "error" and (n_missing or extra):
            examples = [g for g in self.gene_ids if g not in position][:3] or extra[:3]
            raise NeurofmError(
                f"the data's genes do not match the tokenizer's ({n_missing} missing, {len(extra)} "
                "extra, e.g. "
                f"{examples}); use data with the tokenizer's var_names or pass missing_genes='zero'"
            )
        if n_missing or extra:
            log.warning(
                "%d of the tokenizer's %d genes are missing from the data (treated as zero counts); "
                "%d extra data genes are ignored",
                n_missing,
                len(self.gene_ids),
                len(extra),
            )
        return _gather_columns(counts, source)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (settings + gene IDs) and ``tokenizer_edges.npz`` into ``directory``."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(
            {
                "format_version": _FORMAT_VERSION,
                "config": asdict(self.config),
                "gene_ids": self.gene_ids.tolist(),
                "gene_symbols": None if self.gene_symbols is None else self.gene_symbols.tolist(),
                "dropped_genes": self.dropped_genes.tolist(),
            },
            directory / TOKENIZER_JSON,
        )
        with atomic_path(directory / TOKENIZER_EDGES) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, bin_edges=self.bin_edges)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ExpressionTokenizer:
        """Read a tokenizer written by :meth:`save`; incomplete or inconsistent files raise NeurofmError."""
        directory = Path(directory)
        json_path, edges_path = directory / TOKENIZER_JSON, directory / TOKENIZER_EDGES
        for path in (json_path, edges_path):
            if not path.is_file():
                raise NeurofmError(f"tokenizer file {path} is missing; point to a complete model directory")
        try:
            meta = json.loads(json_path.read_text())
            known = {field.name for field in fields(TokenizerConfig)}
            config = TokenizerConfig(**{k: v for k, v in meta["config"].items() if k in known})
            gene_ids = np.asarray(meta["gene_ids"], dtype=str)
            gene_symbols = meta.get("gene_symbols")  # absent from tokenizers saved before symbols were kept
            gene_symbols = None if gene_symbols is None else np.asarray(gene_symbols, dtype=str)
            dropped_genes = np.asarray(meta.get("dropped_genes", []), dtype=str)
            with np.load(edges_path, allow_pickle=False) as archive:
                bin_edges = np.asarray(archive["bin_edges"], dtype=np.float64)
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise NeurofmError(
                f"tokenizer files in {directory} are unreadable ({type(error).__name__}: {str(error)[:80]}); "
                "re-save the tokenizer"
            ) from None
        if bin_edges.ndim != 2 or bin_edges.shape[0] != len(gene_ids):
            raise NeurofmError(
                f"tokenizer in {directory} has {len(gene_ids)} genes but edges of shape "
                f"{bin_edges.shape}; re-save it"
            )
        tokenizer = cls(config)
        if gene_symbols is not None and gene_symbols.shape != gene_ids.shape:
            raise NeurofmError(
                f"tokenizer in {directory} has {len(gene_ids)} genes but {len(gene_symbols)} symbols; re-save it"
            )
        tokenizer.gene_ids, tokenizer.bin_edges = gene_ids, bin_edges
        tokenizer.gene_symbols, tokenizer.dropped_genes = gene_symbols, dropped_genes
        return tokenizer


def _gather_columns(counts, source: np.ndarray):
    """Columns ``source`` of ``counts`` (-1: an all-zero column), sparse in → CSR out."""
    # an all-zero column appended at the end stands in for every missing gene
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    zero_column = (
        sp.csr_matrix((counts.shape[0], 1), dtype=np.float32)
        if sp.issparse(counts)
        else np.zeros((counts.shape[0], 1), dtype=np.float32)
    )
    padded = (
        sp.hstack([counts, zero_column], format="csc")
        if sp.issparse(counts)
        else np.concatenate([counts, zero_column], axis=1)
    )
    source = np.where(source < 0, counts.shape[1], source)
    aligned = padded[:, source]
    return sp.csr_matrix(aligned) if sp.issparse(aligned) else aligned


class _ignore_all_nan_warning:
    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._catcher.__exit__(*exc)
