"""visualize: seeded t-SNE and UMAP figures of an embedding, usable on its own."""

from __future__ import annotations

import numpy as np

from neurofm.evaluate.visualize import pca_2d_coordinates, visualize


def test_visualize_writes_seeded_tsne_and_umap(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, 120)
    embedding = rng.normal(size=(120, 8))
    embedding[:, 0] += 5 * codes
    labels = np.array(["excitatory", "inhibitory"])[codes]
    first = visualize(embedding, labels, tmp_path / "first", seed=1, n_neighbors=10)
    second = visualize(embedding, labels, tmp_path / "second", seed=1, n_neighbors=10)
    assert sorted(path.name for path in first.paths.values()) == ["tsne.png", "umap.png"]
    assert all(path.stat().st_size > 10_000 for path in first.paths.values())
    np.testing.assert_array_equal(first.tsne, second.tsne)
    np.testing.assert_allclose(first.umap, second.umap)
    assert first.tsne.shape == first.umap.shape == (120, 2)


def test_pca_2d_reports_explained_variance():
    embedding = np.random.default_rng(0).normal(size=(50, 5)) * np.array([5, 2, 1, 1, 1])
    coordinates, variance = pca_2d_coordinates(embedding)
    assert coordinates.shape == (50, 2) and variance[0] > variance[1] > 0
