"""Shared fixtures: small synthetic data built by neurofm itself, and the real test file when present."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import pytest

from neurofm.data.synthetic import AtlasFiles, make_synthetic_counts, write_synthetic_atlas

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SUBSET = SHARED_DATA / "subset_2523_210_Cerebral-cortex.screened.h5ad"


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def file_sha256():
    """SHA-256 of a file's bytes, to prove inputs are never modified: ``file_sha256(path) -> str``."""
    return _file_sha256


@pytest.fixture(scope="session")
def _synthetic_counts_cached() -> ad.AnnData:
    return make_synthetic_counts(n_cells=1200, n_genes=600, seed=0)


@pytest.fixture
def synthetic_adata(_synthetic_counts_cached: ad.AnnData) -> ad.AnnData:
    """In-memory synthetic raw counts (1200 cells × 600 genes, seed 0); a fresh copy per test."""
    return _synthetic_counts_cached.copy()


@pytest.fixture(scope="session")
def atlas_files(tmp_path_factory: pytest.TempPathFactory) -> AtlasFiles:
    """The synthetic atlas files (counts.h5ad + the three CSVs), written once per session. Read-only!"""
    return write_synthetic_atlas(tmp_path_factory.mktemp("atlas"), n_cells=1200, n_genes=600, seed=0)


@pytest.fixture(scope="session")
def chunked_atlas_files(tmp_path_factory: pytest.TempPathFactory) -> AtlasFiles:
    """A synthetic atlas written by the chunked (scale) writer, 2000 cells in chunks of 300."""
    return write_synthetic_atlas(
        tmp_path_factory.mktemp("atlas_chunked"), n_cells=2000, n_genes=500, seed=3, chunk_size=300
    )


@pytest.fixture
def real_subset_path() -> Path:
    """The real 1,152-cell Allen subset in ../shared/data; the test is skipped when it is absent."""
    if not REAL_SUBSET.is_file():
        pytest.skip(f"real test data not found at {REAL_SUBSET}")
    return REAL_SUBSET
