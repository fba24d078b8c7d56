"""AnnDataMaterializer: .h5ad round trip through the artifact store, metadata and dashboard card."""

from __future__ import annotations

import io
import uuid

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("zenml")

from zenml.client import Client  # noqa: E402
from zenml.enums import VisualizationType  # noqa: E402

from materializers.anndata_materializer import FILENAME, AnnDataMaterializer  # noqa: E402


@pytest.fixture
def small_adata() -> ad.AnnData:
    """40 cells × 25 genes of sparse counts with obs/var columns, uns (nested) and obsm."""
    rng = np.random.default_rng(0)
    counts = sp.random(40, 25, density=0.2, format="csr", random_state=1, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10).astype(np.float32)
    obs = pd.DataFrame(
        {
            "subtype": pd.Categorical(["cluster_2523"] * 25 + ["cluster_210"] * 15),
            "n_counts": np.asarray(counts.sum(axis=1)).ravel(),
        },
        index=[f"cell-{i}" for i in range(40)],
    )
    var = pd.DataFrame(
        {"gene_symbol": [f"G{i}" for i in range(25)]}, index=[f"ENSG{i:05d}" for i in range(25)]
    )
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.uns["crop_params"] = {"n_cells": 40, "seed": 42, "alpha": 1.0}
    adata.uns["crop_indices"] = {"cells": np.arange(40), "genes": np.arange(25)}
    adata.obsm["X_pca"] = rng.normal(size=(40, 3)).astype(np.float32)
    return adata


@pytest.fixture
def store_uri():
    """A fresh directory in the active (local, per-test-session) ZenML artifact store, and the store."""
    store = Client().active_stack.artifact_store
    uri = f"{store.path}/materializer-test-{uuid.uuid4().hex}"
    store.makedirs(uri)
    return store, uri


class MemoryArtifactStore:
    """A stand-in for a remote artifact store: files live in a dict keyed by URI, never on local disk."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def open(self, path: str, mode: str = "r"):
        store = self

        class _Writer(io.BytesIO):
            def close(self) -> None:
                value = self.getvalue()
                store.files[path] = value
                super().close()

        class _TextWriter(io.StringIO):
            def close(self) -> None:
                store.files[path] = self.getvalue().encode()
                super().close()

        if mode == "wb":
            return _Writer()
        if mode == "w":
            return _TextWriter()
        if mode == "rb":
            return io.BytesIO(self.files[path])
        if mode == "r":
            return io.StringIO(self.files[path].decode())
        raise AssertionError(f"unexpected mode {mode!r}")


def _assert_same(loaded: ad.AnnData, original: ad.AnnData) -> None:
    assert sp.issparse(loaded.X)
    assert (loaded.X != original.X).nnz == 0
    assert loaded.X.dtype == original.X.dtype
    pd.testing.assert_frame_equal(loaded.obs, original.obs)
    pd.testing.assert_frame_equal(loaded.var, original.var)
    assert loaded.uns["crop_params"] == original.uns["crop_params"]
    np.testing.assert_array_equal(loaded.uns["crop_indices"]["genes"], original.uns["crop_indices"]["genes"])
    np.testing.assert_array_equal(loaded.obsm["X_pca"], original.obsm["X_pca"])


def test_round_trip_through_the_local_artifact_store(small_adata, store_uri):
    store, uri = store_uri
    AnnDataMaterializer(uri, artifact_store=store).save(small_adata)
    assert store.exists(f"{uri}/{FILENAME}")
    loaded = AnnDataMaterializer(uri, artifact_store=store).load(ad.AnnData)
    _assert_same(loaded, small_adata)


def test_round_trip_with_the_active_stack_store(small_adata, store_uri):
    _, uri = store_uri  # no artifact_store argument: the materializer uses the active stack's
    AnnDataMaterializer(uri).save(small_adata)
    _assert_same(AnnDataMaterializer(uri).load(ad.AnnData), small_adata)


def test_saves_and_loads_only_through_the_artifact_store_file_api(small_adata, tmp_path):
    """A remote-looking URI and an in-memory store: any local-path shortcut would fail or leave files."""
    store = MemoryArtifactStore()
    uri = "s3://neurofm-bucket/artifacts/prepared_cells/1"
    materializer = AnnDataMaterializer(uri, artifact_store=store)
    materializer.save(small_adata)
    assert list(store.files) == [f"{uri}/{FILENAME}"]
    assert store.files[f"{uri}/{FILENAME}"][:8] == b"\x89HDF\r\n\x1a\n"
    _assert_same(AnnDataMaterializer(uri, artifact_store=store).load(ad.AnnData), small_adata)

    visualizations = materializer.save_visualizations(small_adata)
    assert visualizations == {f"{uri}/summary.html": VisualizationType.HTML}
    assert b"<html" in store.files[f"{uri}/summary.html"]


def test_extract_metadata_describes_the_data(small_adata):
    metadata = AnnDataMaterializer("unused").extract_metadata(small_adata)
    assert metadata["n_obs"] == 40 and metadata["n_vars"] == 25
    assert metadata["obs_columns"] == "subtype, n_counts"
    assert metadata["var_columns"] == "gene_symbol"
    assert metadata["obsm_keys"] == "X_pca"
    assert set(metadata["uns_keys"].split(", ")) == {"crop_params", "crop_indices"}
    assert metadata["layers"] == "-"
    assert metadata["x_dtype"] == "float32" and metadata["x_sparse"] is True
    expected_sparsity = 1 - small_adata.X.count_nonzero() / (40 * 25)
    assert metadata["sparsity"] == pytest.approx(expected_sparsity, abs=1e-6)
    assert 0.7 < metadata["sparsity"] < 0.9


def test_extract_metadata_of_dense_and_empty_data():
    dense = ad.AnnData(X=np.array([[0, 1], [2, 0]], dtype=np.float32))
    metadata = AnnDataMaterializer("unused").extract_metadata(dense)
    assert metadata["x_sparse"] is False and metadata["sparsity"] == pytest.approx(0.5)
    assert metadata["obs_columns"] == "-" and metadata["uns_keys"] == "-"
    no_matrix = AnnDataMaterializer("unused").extract_metadata(ad.AnnData(obs=pd.DataFrame(index=["a"])))
    assert no_matrix["n_obs"] == 1 and no_matrix["sparsity"] == -1.0


def test_save_visualizations_writes_an_html_card(small_adata, store_uri):
    store, uri = store_uri
    visualizations = AnnDataMaterializer(uri, artifact_store=store).save_visualizations(small_adata)
    [(html_uri, kind)] = visualizations.items()
    assert kind == VisualizationType.HTML and html_uri.startswith(uri) and html_uri.endswith(".html")
    with store.open(html_uri, "r") as handle:
        page = handle.read()
    assert "40 cells × 25 genes" in page
    assert "cluster_2523: 25" in page and "cluster_210: 15" in page  # obs value counts


def test_zenml_picks_the_materializer_for_anndata_artifacts(small_adata):
    """save_artifact/load: the registered materializer, its metadata and visualization reach ZenML."""
    from zenml import save_artifact

    import materializers  # noqa: F401  (registers the materializer, as steps/__init__ does)

    name = f"anndata-test-{uuid.uuid4().hex[:8]}"
    saved = save_artifact(small_adata, name=name)
    version = Client().get_artifact_version(name, version=saved.version)
    assert version.materializer.attribute == "AnnDataMaterializer"
    metadata = version.run_metadata
    assert metadata["n_obs"] == 40 and metadata["n_vars"] == 25 and metadata["x_sparse"] is True
    assert [v.type for v in version.visualizations] == [VisualizationType.HTML]
    _assert_same(version.load(), small_adata)
