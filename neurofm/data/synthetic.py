"""A synthetic, atlas-shaped dataset: the built-in default input and the tests' fixture.

It mimics the Allen Brain Cell Atlas whole-human-brain (WHB) 10x release:

- a raw-counts ``.h5ad`` whose obs_names are ``cell_label`` s (``<library_label>:<barcode>``), obs holding
  only ``cell_barcode`` and ``library_label``, var index = Ensembl-like IDs named ``gene_identifier`` and a
  ``gene_symbol`` column;
- ``cell_metadata.csv`` (cell_label, cell_barcode, library_label, cluster_alias, x, y,
  anatomical_division_label, …), ``cluster.csv`` (cluster_alias, label, number_of_cells) and
  ``cluster_annotation_term.csv`` (label, name, description such as "MGE interneuron (subcluster 5)",
  term_set_label, …).

The biology is simple but realistic in shape: excitatory and inhibitory neuron clusters with marker
programs (SLC17A7/SATB2/… vs GAD1/GAD2/LHX6/…), cluster-specific programs over generic genes,
log-normal sequencing depth and negative-binomial counts. Clusters 2523 (deep-layer excitatory) and 210
(MGE interneuron) always exist, so the default configuration runs on it. Everything is deterministic for
a seed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from neurofm import keys
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)

# Superclusters (base names, as in the WHB taxonomy) and their marker genes. Cluster aliases are built
# from ``_EXCITATORY_ALIAS_START`` / ``_INHIBITORY_ALIAS_START`` so 2523 and 210 are always present.
_EXCITATORY_SUPERCLUSTERS = {
    "Deep-layer intratelencephalic": ["FEZF2", "RORB", "THEMIS"],
    "Upper-layer intratelencephalic": ["CUX2", "RASGRF2", "LINC00507"],
    "Deep-layer corticothalamic and 6b": ["FOXP2", "SYT6", "TLE4"],
    "Deep-layer near-projecting": ["TSHZ2", "SEMA3E", "NPSR1"],
    "Hippocampal CA1-3": ["NTS", "PROX1", "ZBTB20"],
}
_INHIBITORY_SUPERCLUSTERS = {
    "MGE interneuron": ["LHX6", "SST", "PVALB"],
    "CGE interneuron": ["VIP", "ADARB2", "CALB2"],
    "LAMP5-LHX6 and Chandelier": ["LAMP5", "UNC5B", "NOS1"],
    "Medium spiny neuron": ["PPP1R1B", "DRD1", "PENK"],
}
_EXCITATORY_MARKERS = ["SLC17A7", "SATB2", "NEUROD6", "TBR1", "NRGN", "CAMK2A"]
_INHIBITORY_MARKERS = ["GAD1", "GAD2", "SLC32A1", "DLX1", "SOX6", "ERBB4"]
_PAN_NEURONAL = ["SNAP25", "SYT1", "RBFOX3", "STMN2", "MALAT1", "ACTB", "GAPDH"]
_EXCITATORY_ALIAS_START = 2523
_INHIBITORY_ALIAS_START = 210
_REGIONS = ["Cerebral cortex", "Hippocampus", "Cerebral nuclei", "Amygdala", "Thalamus", "Hypothalamus"]
_REGION_WEIGHTS = np.array([0.5, 0.2, 0.12, 0.1, 0.05, 0.03])
_CELLS_PER_LIBRARY = 60


def _marker_symbols() -> list[str]:
    symbols = list(_EXCITATORY_MARKERS) + list(_INHIBITORY_MARKERS) + list(_PAN_NEURONAL)
    for group in (_EXCITATORY_SUPERCLUSTERS, _INHIBITORY_SUPERCLUSTERS):
        for markers in group.values():
            symbols += [m for m in markers if m not in symbols]
    return symbols


def cluster_classes(
    n_excitatory_clusters: int = 5, n_inhibitory_clusters: int = 4, label_prefix: str = "cluster_"
) -> dict[str, str]:
    """The synthetic atlas' subtype → class mapping, e.g. ``{"cluster_2523": "excitatory", "cluster_210":
    "inhibitory", …}`` (subtype labels as :func:`neurofm.data.backed.subset_by_clusters` writes them)."""
    excitatory = {
        f"{label_prefix}{_EXCITATORY_ALIAS_START + 4 * k}": "excitatory" for k in range(n_excitatory_clusters)
    }
    inhibitory = {
        f"{label_prefix}{_INHIBITORY_ALIAS_START + 3 * k}": "inhibitory" for k in range(n_inhibitory_clusters)
    }
    return {**excitatory, **inhibitory}


@dataclass(frozen=True)
class AtlasFiles:
    """Paths of one synthetic atlas written by :func:`write_synthetic_atlas`."""

    counts_h5ad: Path
    cell_metadata_csv: Path
    cluster_csv: Path
    cluster_annotation_term_csv: Path

    def as_dict(self) -> dict[str, Path]:
        return asdict(self)


@dataclass
class _Design:
    """Everything except the count matrix: genes, clusters, cells and per-cluster expression profiles."""

    var: pd.DataFrame  # index gene_identifier, column gene_symbol
    obs: pd.DataFrame  # all cell-level columns (Allen metadata + subtype + class)
    clusters: pd.DataFrame  # cluster_alias, label, number_of_cells, supercluster, class
    annotation: pd.DataFrame  # cluster_annotation_term rows
    profiles: np.ndarray  # (n_clusters, n_genes) relative expression, rows sum to 1
    cluster_index: np.ndarray  # (n_cells,) row of ``profiles`` for each cell
    library_size: np.ndarray  # (n_cells,) expected total UMIs per cell
    dispersion: np.ndarray  # (n_genes,) negative-binomial shape (theta); smaller = more overdispersed


def _random_barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    codes = rng.integers(0, 4, size=(n, 16), dtype=np.uint8)
    letters = np.frombuffer(b"ACGT", dtype="S1")[codes]
    return np.ascontiguousarray(letters).view("S16").ravel().astype(str)


def _design(
    n_cells: int,
    n_genes: int,
    seed: int,
    n_excitatory_clusters: int,
    n_inhibitory_clusters: int,
    n_regions: int,
    n_duplicate_symbols: int,
    n_duplicate_barcodes: int,
    median_library_size: float,
) -> _Design:
    """The atlas design for ``seed``: genes, clusters, their expression profiles, cells and annotation.

    Every random draw comes from one generator seeded by ``seed``, in this order: genes, profiles, the
    cells' clusters, libraries, barcodes, regions, layout. Raises NeurofmError for sizes too small for
    the markers or clusters, or cluster/region numbers out of range.
    """
    markers = _marker_symbols()
    _check_design_sizes(n_cells, n_genes, n_excitatory_clusters, n_inhibitory_clusters, n_regions, markers)
    rng = np.random.default_rng(seed)
    var, symbol_position, generic_positions = _genes(rng, n_genes, markers, n_duplicate_symbols)
    clusters = _clusters(n_excitatory_clusters, n_inhibitory_clusters)
    profiles, dispersion = _profiles(rng, clusters, symbol_position, generic_positions, n_genes)
    cluster_index = _cell_clusters(rng, n_cells, len(clusters))
    library_size, library_index, library_labels = _libraries(rng, n_cells, median_library_size)
    barcodes, cell_labels = _cell_labels(rng, library_labels, n_duplicate_barcodes)
    regions = _regions(rng, n_cells, n_regions)
    xy = _layout(rng, clusters, cluster_index)
    obs = _cell_obs(
        clusters, cluster_index, library_index, library_labels, barcodes, cell_labels, regions, xy
    )
    clusters[keys.CLUSTER_N_CELLS] = np.bincount(cluster_index, minlength=len(clusters))
    annotation = _annotation(clusters)
    return _Design(var, obs, clusters, annotation, profiles, cluster_index, library_size, dispersion)


def _check_design_sizes(
    n_cells: int,
    n_genes: int,
    n_excitatory_clusters: int,
    n_inhibitory_clusters: int,
    n_regions: int,
    markers: list[str],
) -> None:
    """Refuse fewer genes than the markers + 20, fewer than 10 cells per cluster, no cluster of a class,
    or a number of regions outside 1..6."""
    if n_genes < len(markers) + 20:
        raise NeurofmError(
            f"n_genes={n_genes} is too small for the synthetic atlas; use n_genes >= {len(markers) + 20}"
        )
    if n_cells < 10 * (n_excitatory_clusters + n_inhibitory_clusters):
        raise NeurofmError(
            f"n_cells={n_cells} is too small for {n_excitatory_clusters + n_inhibitory_clusters} clusters; "
            "use at least 10 cells per cluster"
        )
    if not (n_excitatory_clusters >= 1 and n_inhibitory_clusters >= 1 and 1 <= n_regions <= len(_REGIONS)):
        raise NeurofmError(
            f"need >= 1 excitatory and >= 1 inhibitory cluster and 1..{len(_REGIONS)} regions; "
            f"got {n_excitatory_clusters}, {n_inhibitory_clusters}, {n_regions}"
        )


def _genes(
    rng: np.random.Generator, n_genes: int, markers: list[str], n_duplicate_symbols: int
) -> tuple[pd.DataFrame, dict[str, int], np.ndarray]:
    """``(var, marker symbol → position in var, positions of generic genes before shuffling)``.

    var: Ensembl-like sorted IDs, ``gene_symbol`` the markers then ``GENE#####`` (``n_duplicate_symbols``
    generic symbols used twice), the symbols shuffled over the IDs as in real files.
    """
    n_generic = n_genes - len(markers)
    symbols = np.array(markers + [f"GENE{i:05d}" for i in range(1, n_generic + 1)], dtype=object)
    is_generic = np.arange(n_genes) >= len(markers)
    generic_positions = np.flatnonzero(is_generic)
    if n_duplicate_symbols:
        picks = rng.choice(generic_positions, size=2 * n_duplicate_symbols, replace=False)
        symbols[picks[n_duplicate_symbols:]] = symbols[picks[:n_duplicate_symbols]]
    ensembl_numbers = np.sort(rng.choice(np.arange(1000, 300000), size=n_genes, replace=False))
    gene_ids = np.char.add("ENSG", np.char.zfill((ensembl_numbers * 7).astype(str), 11))
    order = rng.permutation(n_genes)  # markers are scattered through the ID-sorted var, as in real files
    var = pd.DataFrame({keys.GENE_SYMBOL: symbols[order]}, index=pd.Index(gene_ids, name=keys.GENE_ID_INDEX))
    symbol_position = {s: i for i, s in enumerate(var[keys.GENE_SYMBOL]) if not s.startswith("GENE")}
    return var, symbol_position, generic_positions


def _clusters(n_excitatory_clusters: int, n_inhibitory_clusters: int) -> pd.DataFrame:
    """One row per cluster: cluster_alias, class, supercluster, subcluster, label (no cell counts yet).

    About two clusters per supercluster, so base names (superclusters) group several clusters.
    """
    exc_names = list(_EXCITATORY_SUPERCLUSTERS)
    inh_names = list(_INHIBITORY_SUPERCLUSTERS)
    rows = []
    n_exc_super = min(len(exc_names), max(1, -(-n_excitatory_clusters // 2)))
    n_inh_super = min(len(inh_names), max(1, -(-n_inhibitory_clusters // 2)))
    for k in range(n_excitatory_clusters):
        rows.append((_EXCITATORY_ALIAS_START + 4 * k, "excitatory", exc_names[k % n_exc_super]))
    for k in range(n_inhibitory_clusters):
        rows.append((_INHIBITORY_ALIAS_START + 3 * k, "inhibitory", inh_names[k % n_inh_super]))
    clusters = pd.DataFrame(rows, columns=[keys.CLUSTER_ALIAS, keys.CELL_CLASS, "supercluster"])
    clusters["subcluster"] = clusters.groupby("supercluster").cumcount() + 1
    clusters[keys.CLUSTER_LABEL] = [f"CS202210140_{alias + 1}" for alias in clusters[keys.CLUSTER_ALIAS]]
    return clusters


def _profiles(
    rng: np.random.Generator,
    clusters: pd.DataFrame,
    symbol_position: dict[str, int],
    generic_positions: np.ndarray,
    n_genes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(profiles, dispersion)``: per-cluster relative expression (rows sum to 1) — pan-neuronal genes
    high, class markers and class programs, supercluster markers, a program of its own per cluster —
    and the per-gene negative-binomial shape."""
    n_generic, n_clusters = len(generic_positions), len(clusters)
    base = rng.lognormal(mean=0.0, sigma=1.3, size=n_genes)
    base[[symbol_position[s] for s in _PAN_NEURONAL]] *= 8.0
    log_fold = rng.normal(0.0, 0.15, size=(n_clusters, n_genes))  # cluster-level noise on every gene
    is_excitatory = (clusters[keys.CELL_CLASS] == "excitatory").to_numpy()
    class_markers = {True: _EXCITATORY_MARKERS, False: _INHIBITORY_MARKERS}
    for excitatory, marker_list in class_markers.items():
        columns = [symbol_position[s] for s in marker_list]
        log_fold[np.ix_(is_excitatory == excitatory, columns)] += np.log(15.0)
        log_fold[np.ix_(is_excitatory != excitatory, columns)] += np.log(0.03)
    # class programs over generic genes (many weak markers, as in real neuron classes)
    class_program = rng.choice(generic_positions, size=max(4, n_generic // 25), replace=False)
    class_effect = rng.normal(0.0, 1.0, size=class_program.size)
    log_fold[np.ix_(is_excitatory, class_program)] += class_effect
    log_fold[np.ix_(~is_excitatory, class_program)] -= class_effect
    supercluster_markers = {**_EXCITATORY_SUPERCLUSTERS, **_INHIBITORY_SUPERCLUSTERS}
    for row, name in enumerate(clusters["supercluster"]):
        columns = [symbol_position[s] for s in supercluster_markers[name] if s in symbol_position]
        log_fold[row, columns] += np.log(8.0)
    # cluster programs: each cluster up-regulates its own ~2% of generic genes
    program_size = max(3, n_generic // 50)
    programs = np.stack(
        [rng.choice(generic_positions, size=program_size, replace=False) for _ in range(n_clusters)]
    )
    log_fold[np.arange(n_clusters)[:, None], programs] += rng.lognormal(0.6, 0.4, size=programs.shape)
    profiles = base[None, :] * np.exp(log_fold)
    profiles /= profiles.sum(axis=1, keepdims=True)
    dispersion = rng.lognormal(np.log(2.0), 0.5, size=n_genes)
    return profiles, dispersion


def _cell_clusters(rng: np.random.Generator, n_cells: int, n_clusters: int) -> np.ndarray:
    """Each cell's cluster row: Dirichlet cluster sizes, every cluster given at least two cells."""
    cluster_weights = rng.dirichlet(np.full(n_clusters, 6.0))
    cluster_index = rng.choice(n_clusters, size=n_cells, p=cluster_weights)
    cluster_index[: 2 * n_clusters] = np.tile(np.arange(n_clusters), 2)  # every cluster has cells
    rng.shuffle(cluster_index)
    return cluster_index


def _libraries(
    rng: np.random.Generator, n_cells: int, median_library_size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(library_size, library_index, library_labels)`` per cell: log-normal depth around
    ``median_library_size`` times a per-library (batch) factor, libraries ``10X<run>_<n>`` in order."""
    library_size = rng.lognormal(np.log(median_library_size), 0.45, size=n_cells)
    # depth also varies by library (batch), as in real runs
    n_libraries = max(4, int(np.ceil(n_cells / _CELLS_PER_LIBRARY)))
    library_index = np.sort(rng.integers(0, n_libraries, size=n_cells))
    library_size *= rng.lognormal(0.0, 0.2, size=n_libraries)[library_index]
    library_labels = np.char.add(
        np.char.add("10X", (100 + library_index // 8).astype(str)),
        np.char.add("_", (1 + library_index % 8).astype(str)),
    )
    return library_size, library_index, library_labels


def _cell_labels(
    rng: np.random.Generator, library_labels: np.ndarray, n_duplicate_barcodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(barcodes, cell_labels)``: random 16-mers (``n_duplicate_barcodes`` of them repeated in another
    library) and the unique ``<library_label>:<barcode>`` labels."""
    n_cells = len(library_labels)
    barcodes = _random_barcodes(rng, n_cells)
    if n_duplicate_barcodes:
        # the same barcode in two different libraries: harmless for cell_label, a trap for barcode joins
        source = rng.choice(n_cells, size=n_duplicate_barcodes, replace=False)
        target = (source + n_cells // 2) % n_cells
        differ = library_labels[source] != library_labels[target]
        barcodes[target[differ]] = barcodes[source[differ]]
    cell_labels = np.char.add(np.char.add(library_labels, ":"), barcodes)
    if len(set(cell_labels)) != n_cells:  # astronomically rare with random 16-mers; keep labels unique
        cell_labels = pd.Index(cell_labels)
        cell_labels = np.where(
            cell_labels.duplicated(), np.char.add(cell_labels.to_numpy(str), "-1"), cell_labels
        )
    return barcodes, cell_labels


def _regions(rng: np.random.Generator, n_cells: int, n_regions: int) -> pd.Categorical:
    """Each cell's anatomical division, drawn from the first ``n_regions`` regions by their weights."""
    region_weights = _REGION_WEIGHTS[:n_regions] / _REGION_WEIGHTS[:n_regions].sum()
    regions = np.array(_REGIONS[:n_regions])[rng.choice(n_regions, size=n_cells, p=region_weights)]
    return pd.Categorical(regions, categories=_REGIONS[:n_regions])


def _layout(rng: np.random.Generator, clusters: pd.DataFrame, cluster_index: np.ndarray) -> np.ndarray:
    """A 2-D layout like the atlas' UMAP: superclusters on a ring (excitatory left, inhibitory right),
    clusters around their supercluster, cells around their cluster; ``(n_cells, 2)``."""
    exc_names = list(_EXCITATORY_SUPERCLUSTERS)
    inh_names = list(_INHIBITORY_SUPERCLUSTERS)
    supercluster_names = list(dict.fromkeys(clusters["supercluster"]))
    angle = np.linspace(0.6 * np.pi, 1.4 * np.pi, max(2, sum(n in exc_names for n in supercluster_names)))
    angle_inh = np.linspace(
        -0.4 * np.pi, 0.4 * np.pi, max(2, sum(n in inh_names for n in supercluster_names))
    )
    centres = {}
    for name, a in zip([n for n in supercluster_names if n in exc_names], angle, strict=False):
        centres[name] = 10.0 * np.array([np.cos(a), np.sin(a)])
    for name, a in zip([n for n in supercluster_names if n in inh_names], angle_inh, strict=False):
        centres[name] = 10.0 * np.array([np.cos(a), np.sin(a)])
    cluster_centre = np.stack([centres[n] for n in clusters["supercluster"]]) + rng.normal(
        0, 1.6, (len(clusters), 2)
    )
    return cluster_centre[cluster_index] + rng.normal(0, 0.55, size=(len(cluster_index), 2))


def _cell_obs(
    clusters: pd.DataFrame,
    cluster_index: np.ndarray,
    library_index: np.ndarray,
    library_labels: np.ndarray,
    barcodes: np.ndarray,
    cell_labels: np.ndarray,
    regions: pd.Categorical,
    xy: np.ndarray,
) -> pd.DataFrame:
    """The cells' obs (index ``cell_label``): the Allen metadata columns plus ``subtype`` and ``class``."""
    aliases = clusters[keys.CLUSTER_ALIAS].to_numpy()[cluster_index]
    return pd.DataFrame(
        {
            keys.CELL_BARCODE: barcodes,
            keys.LIBRARY_LABEL: pd.Categorical(library_labels),
            "barcoded_cell_sample_label": library_labels,
            "donor_label": np.array(["H18.30.001", "H18.30.002", "H19.30.001"])[library_index % 3],
            "dataset_label": "WHB-10Xv3",
            keys.CLUSTER_ALIAS: aliases,
            keys.X_COORD: xy[:, 0].round(4),
            keys.Y_COORD: xy[:, 1].round(4),
            keys.REGION: regions,
            keys.SUBTYPE: np.char.add("cluster_", aliases.astype(str)),
            keys.CELL_CLASS: clusters[keys.CELL_CLASS].to_numpy()[cluster_index],
        },
        index=pd.Index(cell_labels, name=keys.CELL_LABEL),
    )


def _annotation(clusters: pd.DataFrame) -> pd.DataFrame:
    """cluster_annotation_term rows: one per supercluster, then one per cluster (with its cell count)."""
    supercluster_names = list(dict.fromkeys(clusters["supercluster"]))
    cluster_terms = pd.DataFrame(
        {
            keys.CLUSTER_LABEL: clusters[keys.CLUSTER_LABEL],
            keys.TERM_NAME: [f"Cluster {a}" for a in clusters[keys.CLUSTER_ALIAS]],
            keys.TERM_DESCRIPTION: [
                f"{name} (subcluster {k})"
                for name, k in zip(clusters["supercluster"], clusters["subcluster"], strict=True)
            ],
            keys.TERM_SET_LABEL: "CCN202210140_CLUS",
            "parent_term_label": [
                f"CS202210140_SUPC_{supercluster_names.index(n)}" for n in clusters["supercluster"]
            ],
            keys.CLUSTER_N_CELLS: clusters[keys.CLUSTER_N_CELLS],
        }
    )
    supercluster_terms = pd.DataFrame(
        {
            keys.CLUSTER_LABEL: [f"CS202210140_SUPC_{i}" for i in range(len(supercluster_names))],
            keys.TERM_NAME: supercluster_names,
            keys.TERM_DESCRIPTION: supercluster_names,
            keys.TERM_SET_LABEL: "CCN202210140_SUPC",
            "parent_term_label": "",
            keys.CLUSTER_N_CELLS: [
                int(clusters.loc[clusters["supercluster"] == n, keys.CLUSTER_N_CELLS].sum())
                for n in supercluster_names
            ],
        }
    )
    return pd.concat([supercluster_terms, cluster_terms], ignore_index=True)


def _negative_binomial_counts(rng: np.random.Generator, design: _Design, rows: slice) -> sp.csr_matrix:
    """Exact gamma–Poisson (negative-binomial) counts for cells ``rows``, dense in memory for the block."""
    mean = design.library_size[rows, None] * design.profiles[design.cluster_index[rows]]
    rate = rng.gamma(design.dispersion, mean / design.dispersion)
    return sp.csr_matrix(rng.poisson(rate).astype(np.float32))


def _burst_counts(
    rng: np.random.Generator, design: _Design, rows: slice, mean_burst: float = 1.6
) -> sp.csr_matrix:
    """Overdispersed counts without a dense block: Poisson numbers of transcriptional bursts per cell,
    each landing on a gene drawn from the cell's cluster profile with a geometric burst size
    (compound Poisson, negative-binomial-like). Used for atlases too large for dense sampling."""
    cluster_index = design.cluster_index[rows]
    n_cells_block = cluster_index.size
    n_clusters, n_genes = design.profiles.shape
    n_bursts = rng.poisson(design.library_size[rows] / mean_burst)
    cell_of_burst = np.repeat(np.arange(n_cells_block, dtype=np.int64), n_bursts)
    # one searchsorted over all clusters' cumulative profiles laid end to end (cluster c occupies [c, c+1))
    cumulative = (np.cumsum(design.profiles, axis=1) + np.arange(n_clusters)[:, None]).ravel()
    draws = rng.random(cell_of_burst.size) + cluster_index[cell_of_burst]
    gene_of_burst = (
        np.minimum(np.searchsorted(cumulative, draws, side="right"), cumulative.size - 1) % n_genes
    )
    sizes = rng.geometric(1.0 / mean_burst, size=cell_of_burst.size).astype(np.float32)
    matrix = sp.coo_matrix((sizes, (cell_of_burst, gene_of_burst)), shape=(n_cells_block, n_genes)).tocsr()
    matrix.sum_duplicates()
    return matrix


_DESIGN_DEFAULTS = {
    "n_excitatory_clusters": 5,
    "n_inhibitory_clusters": 4,
    "n_regions": 4,
    "n_duplicate_symbols": 3,
    "n_duplicate_barcodes": 3,
    "median_library_size": 2500.0,
}


def _design_for(n_cells: int, n_genes: int, seed: int, options: dict) -> _Design:
    unknown = set(options) - set(_DESIGN_DEFAULTS)
    if unknown:
        raise NeurofmError(
            f"unknown synthetic atlas options {sorted(unknown)}; use any of {sorted(_DESIGN_DEFAULTS)}"
        )
    return _design(n_cells, n_genes, seed, **{**_DESIGN_DEFAULTS, **options})


def _counts_in_memory(design: _Design, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng([seed, 1])
    n_cells = len(design.obs)
    blocks = [
        _negative_binomial_counts(rng, design, slice(start, min(start + 20000, n_cells)))
        for start in range(0, n_cells, 20000)
    ]
    return sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]


def make_synthetic_counts(
    n_cells: int = 1200,
    n_genes: int = 600,
    seed: int = 0,
    *,
    n_excitatory_clusters: int = 5,
    n_inhibitory_clusters: int = 4,
    n_regions: int = 4,
    n_duplicate_symbols: int = 3,
    n_duplicate_barcodes: int = 3,
    median_library_size: float = 2500.0,
) -> ad.AnnData:
    """Build an in-memory raw-count AnnData with atlas-like structure, deterministic for ``seed``.

    Returns an AnnData with ``X`` = CSR float32 integer UMI counts (negative binomial), obs_names =
    ``cell_label`` s (``10X<run>_<n>:<16-mer barcode>``), var index = Ensembl-like IDs (``ENSG…``, index
    name ``gene_identifier``) and:

    - ``var['gene_symbol']``: marker symbols (SLC17A7, SATB2, GAD1, GAD2, LHX6, SST, PVALB, VIP, …) and
      generic ``GENE#####``; ``n_duplicate_symbols`` generic symbols appear twice;
    - ``obs``: ``cell_barcode`` (``n_duplicate_barcodes`` barcodes repeat across libraries),
      ``library_label``, ``cluster_alias`` (excitatory 2523, 2527, …; inhibitory 210, 213, …),
      ``anatomical_division_label`` (first ``n_regions`` of Cerebral cortex, Hippocampus, …), ``x``/``y``
      (UMAP-like layout), ``subtype`` (``cluster_<alias>``), ``class`` (excitatory/inhibitory), plus the
      other Allen metadata columns (barcoded_cell_sample_label, donor_label, dataset_label).

    Library sizes are log-normal around ``median_library_size`` with a per-library batch factor.
    """
    options = {
        "n_excitatory_clusters": n_excitatory_clusters,
        "n_inhibitory_clusters": n_inhibitory_clusters,
        "n_regions": n_regions,
        "n_duplicate_symbols": n_duplicate_symbols,
        "n_duplicate_barcodes": n_duplicate_barcodes,
        "median_library_size": median_library_size,
    }
    design = _design_for(n_cells, n_genes, seed, options)
    return ad.AnnData(X=_counts_in_memory(design, seed), obs=design.obs, var=design.var)


def _atlas_tables(obs: pd.DataFrame, design: _Design) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    metadata = obs.drop(columns=[keys.SUBTYPE, keys.CELL_CLASS]).reset_index()
    metadata[keys.LIBRARY_LABEL] = metadata[keys.LIBRARY_LABEL].astype(str)
    metadata[keys.REGION] = metadata[keys.REGION].astype(str)
    cluster_table = design.clusters[[keys.CLUSTER_ALIAS, keys.CLUSTER_LABEL, keys.CLUSTER_N_CELLS]]
    return metadata, cluster_table, design.annotation


def _h5ad_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """What the raw Allen .h5ad keeps in obs: only barcode and library (clusters come via metadata)."""
    return obs[[keys.CELL_BARCODE, keys.LIBRARY_LABEL]].copy()


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def write_synthetic_atlas(
    out_dir: str | os.PathLike,
    n_cells: int = 1200,
    n_genes: int = 600,
    seed: int = 0,
    *,
    chunk_size: int | None = None,
    progress: bool = False,
    **design_options,
) -> AtlasFiles:
    """Write an Allen-WHB-shaped synthetic atlas into ``out_dir`` (each file atomically).

    Files: ``counts.h5ad`` (obs: only ``cell_barcode``, ``library_label``; obs_names = cell_label; var:
    ``gene_symbol``), ``cell_metadata.csv``, ``cluster.csv``, ``cluster_annotation_term.csv``.

    Small atlases (up to 5·10⁷ matrix entries, and ``chunk_size`` None) hold exactly the counts of
    :func:`make_synthetic_counts` with the same arguments. Larger ones, or any ``chunk_size``, are written
    ``chunk_size`` cells at a time (default 5000) without building the matrix in memory; their counts come
    from a sparse compound-Poisson burst sampler (negative-binomial-like) over the same design.
    ``design_options`` are passed to :func:`make_synthetic_counts` (cluster numbers, duplicates, depth).
    """
    out_dir = ensure_writable_dir(out_dir)
    files = AtlasFiles(
        counts_h5ad=out_dir / "counts.h5ad",
        cell_metadata_csv=out_dir / "cell_metadata.csv",
        cluster_csv=out_dir / "cluster.csv",
        cluster_annotation_term_csv=out_dir / "cluster_annotation_term.csv",
    )
    design = _design_for(n_cells, n_genes, seed, design_options)
    if chunk_size is None and n_cells * n_genes <= 50_000_000:
        counts = _counts_in_memory(design, seed)
        with atomic_path(files.counts_h5ad) as tmp:
            ad.AnnData(X=counts, obs=_h5ad_obs(design.obs), var=design.var).write_h5ad(
                tmp, convert_strings_to_categoricals=False
            )
    else:
        _write_counts_chunked(files.counts_h5ad, design, seed, chunk_size or 5000, progress)
    metadata, cluster_table, annotation = _atlas_tables(design.obs, design)
    _write_csv(metadata, files.cell_metadata_csv)
    _write_csv(cluster_table, files.cluster_csv)
    _write_csv(annotation, files.cluster_annotation_term_csv)
    log.info("wrote synthetic atlas (%d cells × %d genes, seed %d) to %s", n_cells, n_genes, seed, out_dir)
    return files


def _write_counts_chunked(path: Path, design: _Design, seed: int, chunk_size: int, progress: bool) -> None:
    """Write obs/var with anndata, then append CSR row blocks of X to the file one chunk at a time."""
    n_cells = len(design.obs)
    rng = np.random.default_rng([seed, 2])
    with atomic_path(path) as tmp:
        ad.AnnData(obs=_h5ad_obs(design.obs), var=design.var).write_h5ad(
            tmp, convert_strings_to_categoricals=False
        )
        with h5py.File(tmp, "a") as handle:
            starts = range(0, n_cells, chunk_size)
            if progress:
                from tqdm import tqdm

                starts = tqdm(starts, desc="writing counts", unit="chunk")
            matrix = None
            for start in starts:
                block = _burst_counts(rng, design, slice(start, min(start + chunk_size, n_cells)))
                if matrix is None:
                    # 32k-element HDF5 chunks keep single-row reads cheap for the backed subset
                    ad.io.write_elem(handle, "X", block, dataset_kwargs={"chunks": (1 << 15,)})
                    matrix = ad.io.sparse_dataset(handle["X"])
                else:
                    matrix.append(block)
