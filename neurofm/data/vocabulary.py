"""The union gene vocabulary of several datasets (what a multi-file cell store holds).

Each file names its genes by ``var_names`` or by a var column (``gene_column``) and may carry symbols
(``var['gene_symbol']``). Files are taken in order: the first file's genes start the vocabulary; each
later file is matched against the vocabulary with the rules of :mod:`neurofm.genes` (Ensembl version
suffixes stripped, case ignored) by whichever pairing finds the most vocabulary genes — the file's names
against the vocabulary's IDs, its names against the vocabulary's symbols, or its symbols against the
vocabulary's symbols (a tie goes to the earlier pairing) — and its unmatched genes are appended.

A mouse file matched against human genes goes through upper-cased symbols (``Gad1`` = ``GAD1``): an
*approximate* orthology — most one-to-one orthologs share the symbol, some do not, and paralogue families
can map wrongly. Map through an ortholog table first (a ``gene_column`` of human symbols) when that
matters.

Store gene IDs are the name of the file that brought the gene in (so a store of a human Ensembl file and
a mouse symbol file holds both Ensembl IDs and mouse symbols); each store gene's symbol is its file's
``gene_symbol`` when it had one, else its name. Within one file, a second gene with the same matching key
as an earlier one (e.g. two versions of one Ensembl ID) is dropped, and counted in the file's record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neurofm.genes import normalise_gene_name
from neurofm.keys import GENE_SYMBOL


@dataclass(frozen=True)
class FileGenes:
    """One file's genes: ``names`` (its gene naming, ``key`` says which) and its symbols if any."""

    names: np.ndarray
    key: str = "var_names"
    symbols: np.ndarray | None = None


@dataclass
class GeneUnion:
    """The union vocabulary and how each file maps onto it.

    ``columns[f][j]`` is the store gene of column ``j`` of file ``f`` (-1: a dropped duplicate);
    ``records[f]`` the file's manifest record (genes matched, added, dropped; by which key).
    """

    gene_ids: list[str]
    gene_symbols: list[str]
    columns: list[np.ndarray]
    records: list[dict]

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)

    def measured(self, file: int) -> np.ndarray:
        """Sorted store genes file ``file`` measures."""
        column = self.columns[file]
        return np.unique(column[column >= 0])


def _keys(names: Sequence[str]) -> list[str]:
    return [normalise_gene_name(name) for name in names]


_NO_NAME = {"", "NAN", "NONE", "NA"}  # missing symbols never match one another


def _lookup(keys: list[str]) -> dict[str, int]:
    """Matching key → first position holding it (missing names left out)."""
    position: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key not in _NO_NAME:
            position.setdefault(key, index)
    return position


def _best_pairing(file: FileGenes, store_ids: list[str], store_symbols: list[str]) -> tuple[np.ndarray, str]:
    """(store gene per file column or -1, "file key ~ store key") of the pairing that finds most genes."""
    pairings = [
        (file.names, file.key, store_ids, "gene_ids"),
        (file.names, file.key, store_symbols, "gene_symbols"),
    ]
    if file.symbols is not None and file.key != f"var['{GENE_SYMBOL}']":
        pairings.append((file.symbols, f"var['{GENE_SYMBOL}']", store_symbols, "gene_symbols"))
    best, best_found, best_name = None, -1, ""
    for file_names, file_key, store_names, store_key in pairings:
        lookup = _lookup(_keys(store_names))
        found = np.array([lookup.get(key, -1) for key in _keys(file_names)], dtype=np.int64)
        n_found = np.unique(found[found >= 0]).size
        if n_found > best_found:
            best, best_found, best_name = found, n_found, f"{file_key} ~ {store_key}"
    return best, best_name


def union_genes(files: Sequence[FileGenes]) -> GeneUnion:
    """The union vocabulary of ``files`` (see the module docstring for the matching rules)."""
    gene_ids: list[str] = []
    gene_symbols: list[str] = []
    columns, records = [], []
    for index, file in enumerate(files):
        names = np.asarray(file.names, dtype=str)
        symbols = None if file.symbols is None else np.asarray(file.symbols, dtype=str)
        if index == 0:
            found, matched_by = np.full(names.size, -1, dtype=np.int64), "first file"
        else:
            found, matched_by = _best_pairing(FileGenes(names, file.key, symbols), gene_ids, gene_symbols)
        column = np.full(names.size, -1, dtype=np.int64)
        claimed: set[int] = set()
        new_keys: dict[str, int] = {}
        n_matched = n_new = 0
        for j, (store_gene, key) in enumerate(zip(found.tolist(), _keys(names), strict=True)):
            if store_gene >= 0:
                if store_gene not in claimed:
                    claimed.add(store_gene)
                    column[j], n_matched = store_gene, n_matched + 1
            elif key not in new_keys:
                new_keys[key] = column[j] = len(gene_ids)
                gene_ids.append(str(names[j]))
                gene_symbols.append(str(names[j] if symbols is None else symbols[j]))
                n_new += 1
        columns.append(column)
        records.append({
            "n_file_genes": int(names.size),
            "n_matched": n_matched,
            "n_added": n_new,
            "n_duplicates_dropped": int((column < 0).sum()),
            "matched_by": matched_by,
        })  # fmt: skip
    return GeneUnion(gene_ids, gene_symbols, columns, records)
