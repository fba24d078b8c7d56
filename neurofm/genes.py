"""Match a model's gene vocabulary to the genes of a user's dataset.

A model knows its genes by the IDs it was trained on (``var_names`` at pre-training, e.g. Ensembl IDs)
and, when the training data had a ``var['gene_symbol']`` column, by their symbols too. A dataset names
its genes by ``var_names`` or by a var column (``gene_col``). Matching rules, applied to both sides:

- Ensembl version suffixes are stripped (``ENSG00000141510.17`` → ``ENSG00000141510``);
- names are compared case-insensitively (``Gad1`` matches ``GAD1``). Upper-casing a *mouse* symbol
  is only an approximation of its human ortholog: most one-to-one orthologs share the symbol, but
  some do not, and paralogue families may map wrongly. Match through an ortholog table first when
  that matters.

The model side is matched by its IDs and by its symbols; whichever finds more of the model's genes
is used (IDs win a tie). Model genes absent from the data are *unobserved*: they are left out of
tokenisation, library size and pooling (see :mod:`neurofm.embedding`), never filled in as zero counts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import anndata as ad
import numpy as np

from neurofm.errors import NeurofmError

log = logging.getLogger(__name__)

MIN_GENE_OVERLAP = 0.5  # share of the model's genes that must be found in the data (evaluate, map, embed)
DEFAULT_MIN_GENE_OVERLAP = MIN_GENE_OVERLAP  # the name the library's signatures use
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GT]\d+)\.\d+$", re.IGNORECASE)


def normalise_gene_name(name: str) -> str:
    """The matching key of a gene name: Ensembl version stripped, upper case, surrounding space gone."""
    name = str(name).strip()
    match = _ENSEMBL_VERSION.match(name)
    return (match.group(1) if match else name).upper()


@dataclass
class GeneMatch:
    """How a model's genes were found in a dataset.

    ``source[i]`` is the data column of model gene ``i`` (``-1``: unobserved). ``data_key`` is
    ``"var_names"`` or the var column used; ``model_key`` is ``"gene_ids"`` or ``"gene_symbols"``.
    """

    source: np.ndarray
    n_data_genes: int
    data_key: str
    model_key: str

    @property
    def n_model_genes(self) -> int:
        return int(len(self.source))

    @property
    def observed(self) -> np.ndarray:
        """Boolean per model gene: found in the data."""
        return self.source >= 0

    @property
    def n_found(self) -> int:
        return int(self.observed.sum())

    @property
    def overlap(self) -> float:
        """Share of the model's vocabulary found in the data."""
        return self.n_found / max(1, self.n_model_genes)

    @property
    def is_identity(self) -> bool:
        """The data's columns are exactly the model's genes, in order."""
        return self.n_data_genes == self.n_model_genes and np.array_equal(
            self.source, np.arange(self.n_model_genes)
        )

    def record(self) -> dict:
        """JSON/uns-ready summary (counts and keys, no per-gene arrays)."""
        return {
            "n_model_genes": self.n_model_genes,
            "n_found": self.n_found,
            "n_data_genes": int(self.n_data_genes),
            "overlap": float(self.overlap),
            "data_key": self.data_key,
            "model_key": self.model_key,
            "unobserved_genes": "left out of tokenisation, library size and pooling",
        }

    def describe(self) -> str:
        return (
            f"{self.n_found} of the model's {self.n_model_genes} genes found ({self.overlap:.1%}) among the "
            f"data's {self.n_data_genes} genes (data {self.data_key} vs model {self.model_key})"
        )


def data_gene_names(adata: ad.AnnData, gene_col: str | None = None) -> tuple[np.ndarray, str]:
    """The dataset's gene names (``var_names`` or ``var[gene_col]``) and what they are."""
    if gene_col is None:
        return np.asarray(adata.var_names, dtype=str), "var_names"
    if gene_col not in adata.var.columns:
        columns = ", ".join(map(str, adata.var.columns[:8])) or "none"
        raise NeurofmError(
            f"gene column {gene_col!r} is not in the data's var (columns: {columns}); "
            "pass --gene-col with one of them, or omit it to match by var_names"
        )
    return adata.var[gene_col].astype(str).to_numpy(), f"var['{gene_col}']"


def _positions(model_names: np.ndarray, data_names: np.ndarray) -> np.ndarray:
    """Data column of each model name (first occurrence of its key), -1 when absent."""
    position: dict[str, int] = {}
    for column, name in enumerate(data_names):
        position.setdefault(normalise_gene_name(name), column)
    return np.array([position.get(normalise_gene_name(name), -1) for name in model_names], dtype=np.int64)


def match_genes(
    model_gene_ids: np.ndarray,
    data_names: np.ndarray,
    *,
    model_gene_symbols: np.ndarray | None = None,
    data_key: str = "var_names",
    min_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
) -> GeneMatch:
    """Find the model's genes among ``data_names``; a :class:`GeneMatch`.

    Raises NeurofmError when fewer than ``min_overlap`` of the model's genes are found.
    """
    if not 0.0 <= min_overlap <= 1.0:
        raise NeurofmError(f"min_gene_overlap={min_overlap!r} must lie in [0, 1]; e.g. 0.5")
    data_names = np.asarray(data_names, dtype=str)
    best = GeneMatch(
        _positions(np.asarray(model_gene_ids, dtype=str), data_names), len(data_names), data_key, "gene_ids"
    )
    if model_gene_symbols is not None:
        by_symbol = GeneMatch(
            _positions(np.asarray(model_gene_symbols, dtype=str), data_names),
            len(data_names),
            data_key,
            "gene_symbols",
        )
        if by_symbol.n_found > best.n_found:
            best = by_symbol
    if best.n_found == 0 or best.overlap < min_overlap:
        hint = (
            ""
            if data_key != "var_names"
            else "pass --gene-col naming the var column with gene IDs or symbols, or "
        )
        raise NeurofmError(
            f"only {best.n_found} of the model's {best.n_model_genes} genes ({best.overlap:.1%}) are in the data "
            f"(matched by {data_key}); {hint}lower --min-gene-overlap (now {min_overlap})"
        )
    return best


def match_adata(
    adata: ad.AnnData,
    model_gene_ids: np.ndarray,
    model_gene_symbols: np.ndarray | None = None,
    *,
    gene_col: str | None = None,
    min_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
) -> GeneMatch:
    """:func:`match_genes` on ``adata``'s ``var_names`` or ``var[gene_col]``; logs the match in one line."""
    names, key = data_gene_names(adata, gene_col)
    match = match_genes(
        model_gene_ids, names, model_gene_symbols=model_gene_symbols, data_key=key, min_overlap=min_overlap
    )
    if not match.is_identity:
        log.info("gene match: %s", match.describe())
    return match
