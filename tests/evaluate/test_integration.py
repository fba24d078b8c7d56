"""The evaluation on the shared real data: the PCA baseline's probe and clustering quality.

Skipped when ../shared/data is absent. These pin the baseline every model number is reported beside.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from neurofm.evaluate.baselines import pca_baseline
from neurofm.evaluate.cluster import cluster_embedding
from neurofm.evaluate.labels import resolve_labels
from neurofm.evaluate.probe import ProbeConfig, make_split, run_probe

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CORTEX = SHARED_DATA / "subset_2523_210_Cerebral-cortex.screened.h5ad"
ZEISEL = SHARED_DATA / "zeisel2015_1464cells_1000genes.h5ad"
CORTEX_MAPPING = {"cluster_2523": "excitatory", "cluster_210": "inhibitory"}

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.integration


def _read(path: Path) -> ad.AnnData:
    if not path.is_file():
        pytest.skip(f"{path.name} not found under {SHARED_DATA}")
    return ad.read_h5ad(path)


def test_cortex_pca_baseline_probe_is_near_perfect():
    adata = _read(CORTEX)
    labels = resolve_labels(adata, "subtype", CORTEX_MAPPING)
    embedding = pca_baseline(adata, n_components=50)
    result = run_probe(embedding, labels, ProbeConfig(test_size=0.2, seed=42))
    clusters = cluster_embedding(embedding, labels)
    logger.info("cortex PCA: %s | %s", result.metrics(), clusters.metrics())
    assert result.accuracy >= 0.99 and result.roc_auc >= 0.995
    assert result.cv_accuracy.mean() >= 0.99
    assert clusters.majority_accuracy >= 0.99 and clusters.metrics()["ari_optimised"] >= 0.95


def test_cortex_pca_fit_on_training_cells_only_is_as_good():
    adata = _read(CORTEX)
    labels = resolve_labels(adata, "subtype", CORTEX_MAPPING)
    split = make_split(labels, ProbeConfig())
    embedding = pca_baseline(adata, fit_indices=split.train_indices)
    assert run_probe(embedding, labels, ProbeConfig(n_splits=0), split=split).accuracy >= 0.99


def test_zeisel_group_aware_probe_and_clustering():
    adata = _read(ZEISEL)
    labels = resolve_labels(adata, "label")
    chips = adata.obs["c1_chip"].astype(str).to_numpy()
    assert len(np.unique(labels)) == 3
    embedding = pca_baseline(adata, n_components=50)
    split = make_split(labels, ProbeConfig(), groups=chips)
    assert split.grouped and not set(chips[split.train_indices]) & set(chips[split.test_indices])
    result = run_probe(embedding, labels, ProbeConfig(), split=split)
    clusters = cluster_embedding(embedding, labels)
    print(
        f"\nzeisel PCA baseline (chip-aware split): accuracy {result.accuracy:.3f}, "
        f"macro-F1 {result.f1_macro:.3f}, AUC {result.roc_auc:.3f}, ARI {clusters.ari:.3f} "
        f"(optimised: {clusters.metrics()['ari_optimised']:.3f}), NMI {clusters.nmi:.3f}"
    )
    assert result.f1_macro >= 0.93 and result.roc_auc >= 0.98
    assert clusters.metrics()["ari_optimised"] >= 0.85 and clusters.majority_accuracy >= 0.95
