"""The cell store: round trip, selection, resume after a kill, corrupt shards, bad inputs, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from neurofm.cli import main
from neurofm.data.store import MANIFEST, CellStore, Selection, convert
from neurofm.errors import NeurofmError


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.todense())


def test_round_trip_counts_equal_the_h5ad_and_order_is_a_permutation(tmp_path, chunked_atlas_files):
    manifest = convert(chunked_atlas_files.counts_h5ad, tmp_path / "store", shard_size=700, seed=3)
    source = ad.read_h5ad(chunked_atlas_files.counts_h5ad)
    store = CellStore(tmp_path / "store", verify=True)
    obs = store.read_obs()
    order = obs["source_row"].to_numpy()
    assert sorted(order) == list(range(source.n_obs)) and not np.array_equal(order, np.arange(source.n_obs))
    assert [s["rows"] for s in manifest["shards"]] == [700, 700, 600]
    np.testing.assert_array_equal(_dense(store.rows(np.arange(store.n_cells))), _dense(source.X[order]))
    np.testing.assert_array_equal(obs.index, source.obs_names[order])
    assert store.gene_ids.tolist() == source.var_names.tolist()
    assert manifest["gene_symbols"] == source.var["gene_symbol"].tolist()
    assert manifest["format"] == "neurofm-cell-store" and manifest["source"]["n_cells"] == source.n_obs
    picked = np.array([1999, 3, 700, 699, 3])  # any order, across shards, repeats
    np.testing.assert_array_equal(_dense(store.rows(picked)), _dense(source.X[order[picked]]))
    shard = np.load(tmp_path / "store" / "shard-00000" / "data.npy", mmap_mode="r")
    assert shard.dtype == np.uint16
    # the same seed gives the same store, another seed another order
    again = convert(chunked_atlas_files.counts_h5ad, tmp_path / "again", shard_size=700, seed=3)
    assert [s["files"] for s in again["shards"]] == [s["files"] for s in manifest["shards"]]
    other = convert(chunked_atlas_files.counts_h5ad, tmp_path / "other", shard_size=700, seed=4)
    assert other["shards"][0]["files"] != manifest["shards"][0]["files"]


def test_selection_cluster_join_region_genes(tmp_path, atlas_files):
    source = ad.read_h5ad(atlas_files.counts_h5ad)
    genes = list(source.var_names[::-7][:40])  # reordered gene subset
    selection = Selection(
        metadata_csv=str(atlas_files.cell_metadata_csv),
        cluster_ids=[2523, 210],
        region="Cerebral cortex",
        genes=genes,
        rows=np.arange(0, 1200, 2),
    )
    convert(atlas_files.counts_h5ad, tmp_path / "store", selection=selection, shard_size=64)
    store = CellStore(tmp_path / "store")
    obs = store.read_obs()
    metadata = __import__("pandas").read_csv(atlas_files.cell_metadata_csv).set_index("cell_label")
    expected = metadata.loc[source.obs_names[::2]]
    expected = expected[
        expected.cluster_alias.isin([2523, 210]) & (expected.anatomical_division_label == "Cerebral cortex")
    ]
    assert sorted(obs.index) == sorted(expected.index)
    assert set(obs["subtype"]) == {"cluster_2523", "cluster_210"}
    assert store.gene_ids.tolist() == genes
    reference = source[obs["source_row"].to_numpy()][:, genes].X
    np.testing.assert_array_equal(_dense(store.rows(np.arange(store.n_cells))), _dense(reference))


def test_killed_convert_leaves_no_store_and_a_rerun_resumes(tmp_path, chunked_atlas_files):
    out = tmp_path / "store"
    written = []

    def crash_after_two(index):
        written.append(index)
        if len(written) == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        convert(
            chunked_atlas_files.counts_h5ad, out, shard_size=500, seed=1, on_shard_written=crash_after_two
        )
    assert not (out / MANIFEST).exists()
    with pytest.raises(NeurofmError, match="not a finished cell store"):
        CellStore(out)
    kept = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("shard-*/data.npy")}
    assert len(kept) == 2
    resumed = []
    convert(chunked_atlas_files.counts_h5ad, out, shard_size=500, seed=1, on_shard_written=resumed.append)
    assert resumed == [2, 3]  # the two finished shards were kept
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[01]/data.npy")} == kept
    clean = convert(chunked_atlas_files.counts_h5ad, tmp_path / "clean", shard_size=500, seed=1)
    assert json.loads((out / MANIFEST).read_text())["shards"] == clean["shards"]
    assert not (out / ".convert-progress").exists()
    CellStore(out, verify=True)
    again = []  # a finished store with the same inputs is kept as is
    convert(chunked_atlas_files.counts_h5ad, out, shard_size=500, seed=1, on_shard_written=again.append)
    assert again == []


def test_sigkilled_convert_subprocess_then_rerun(tmp_path, chunked_atlas_files):
    out = tmp_path / "store"
    script = (
        "import os, signal, sys\n"
        "from neurofm.data.store import convert\n"
        "convert(sys.argv[1], sys.argv[2], shard_size=500, seed=1,\n"
        "        on_shard_written=lambda i: os.kill(os.getpid(), signal.SIGKILL) if i == 1 else None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(chunked_atlas_files.counts_h5ad), str(out)], env=env
    )
    assert completed.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists()
    convert(chunked_atlas_files.counts_h5ad, out, shard_size=500, seed=1)
    clean = convert(chunked_atlas_files.counts_h5ad, tmp_path / "clean", shard_size=500, seed=1)
    assert json.loads((out / MANIFEST).read_text())["shards"] == clean["shards"]


def test_changed_or_corrupt_shard_is_one_line_error(tmp_path, atlas_files):
    out = tmp_path / "store"
    convert(atlas_files.counts_h5ad, out, shard_size=500)
    data = out / "shard-00001" / "data.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes: only the SHA-256 check sees it
    data.write_bytes(bytes(raw))
    CellStore(out, verify=False)  # the cheap size check passes
    with pytest.raises(NeurofmError, match="SHA-256") as caught:
        CellStore(out, verify=True)
    assert len(str(caught.value).splitlines()) == 1
    data.write_bytes(bytes(raw[:-8]))  # truncated: caught on open
    with pytest.raises(NeurofmError, match="bytes, the manifest says"):
        CellStore(out)


def test_convert_refuses_non_h5ad_and_foreign_directories(tmp_path, atlas_files, capsys):
    with pytest.raises(NeurofmError, match="not an HDF5"):
        convert(atlas_files.cell_metadata_csv, tmp_path / "store")
    assert main(["convert", str(atlas_files.cell_metadata_csv), str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurofm: error: ") and len(err.splitlines()) == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(NeurofmError, match="not a cell store"):
        convert(atlas_files.counts_h5ad, foreign)
    with pytest.raises(NeurofmError, match="not var_names"):
        convert(atlas_files.counts_h5ad, tmp_path / "g", selection=Selection(genes=["NOPE"]))


def test_non_integer_counts_are_refused(tmp_path, synthetic_adata):
    synthetic_adata.X = synthetic_adata.X * 0.5
    path = tmp_path / "lognorm.h5ad"
    synthetic_adata.write_h5ad(path)
    with pytest.raises(NeurofmError, match="non-integer"):
        convert(path, tmp_path / "store")


def test_cli_convert_with_gene_list(tmp_path, atlas_files, capsys):
    source = ad.read_h5ad(atlas_files.counts_h5ad, backed="r")
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(source.var_names[:30]) + "\n")
    out = tmp_path / "store"
    assert (
        main(
            [
                "convert",
                str(atlas_files.counts_h5ad),
                str(out),
                "--genes",
                str(genes),
                "--shard-size",
                "400",
                "--verify",
            ]
        )
        == 0
    )
    assert "1200 cells × 30 genes in 3 shards" in capsys.readouterr().out
    assert CellStore(out).gene_ids.tolist() == list(source.var_names[:30])


def test_dense_matrix_and_wide_counts_and_in_memory_anndata(tmp_path, synthetic_adata):
    from neurofm.data.store import convert_anndata

    counts = synthetic_adata.X.toarray()
    counts[5, 7] = 70_000  # above uint16: the store switches to uint32 counts
    dense = ad.AnnData(X=counts, obs=synthetic_adata.obs, var=synthetic_adata.var)
    manifest = convert_anndata(dense, tmp_path / "store", shard_size=500, seed=9)
    assert {s["data_dtype"] for s in manifest["shards"]} == {"uint32"}
    store = CellStore(tmp_path / "store", verify=True)
    order = store.read_obs()["source_row"].to_numpy()
    np.testing.assert_array_equal(_dense(store.rows(np.arange(store.n_cells))), counts[order])
    assert not list(tmp_path.glob(".store.*"))  # the temporary h5ad is gone


def test_a_store_with_64_overwritten_bytes_is_refused_before_any_training(tmp_path, atlas_files):
    """Issue 24: a bad copy leaves the size intact; the checksum (verified once per file change) sees it."""
    from neurofm.model import ModelConfig
    from neurofm.tokenizer import TokenizerConfig
    from neurofm.train import TrainConfig, pretrain

    out = tmp_path / "store"
    convert(atlas_files.counts_h5ad, out, shard_size=500)
    CellStore(out)  # first open: every file hashed, the good state recorded
    assert (out / ".verified.json").is_file()
    data = out / "shard-00000" / "data.npy"
    raw = bytearray(data.read_bytes())
    raw[200:264] = b"\x7f" * 64
    data.write_bytes(bytes(raw))
    with pytest.raises(NeurofmError, match="shard-00000.*SHA-256.*convert the store again") as caught:
        CellStore(out)
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(NeurofmError, match="SHA-256"):
        pretrain(out, TokenizerConfig(), ModelConfig(), TrainConfig(max_steps=5,
                 device="cpu", progress=False), tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "run" / "model").exists()


def test_reads_refuse_negative_or_non_finite_counts_and_pointers_out_of_range(tmp_path, atlas_files):
    out = tmp_path / "store"
    convert(atlas_files.counts_h5ad, out, shard_size=500)
    indices_file = out / "shard-00001" / "indices.npy"
    indices = np.load(indices_file)
    indices[:3] = np.iinfo(indices.dtype).max  # genes that do not exist
    np.save(indices_file, indices)
    store = CellStore(out, verify=False)  # sizes agree: only the values tell
    with pytest.raises(NeurofmError, match="gene indices outside"):
        store.rows(np.arange(500, 510))
    data_file = out / "shard-00001" / "data.npy"
    if np.load(data_file).dtype.kind == "f":  # integer counts cannot be negative or non-finite
        values = np.load(data_file)
        values[:3] = [-1.0, np.nan, np.inf]
        np.save(data_file, values)
        with pytest.raises(NeurofmError, match="non-finite or negative counts"):
            CellStore(out, verify=False).rows(np.arange(500, 510))
    pointers_file = out / "shard-00000" / "indptr.npy"
    pointers = np.load(pointers_file)
    pointers[5] = pointers[-1] + 10**6
    np.save(pointers_file, pointers)
    with pytest.raises(NeurofmError, match="row pointers out of order or out of range"):
        CellStore(out, verify=False).read_range(0, 10)


def test_a_second_open_hashes_nothing(tmp_path, atlas_files, monkeypatch):
    from neurofm.data import cell_store as store_module  # CellStore's module: where it hashes

    out = tmp_path / "store"
    convert(atlas_files.counts_h5ad, out, shard_size=500)
    CellStore(out)
    calls, real = [], store_module.file_sha256
    monkeypatch.setattr(store_module, "file_sha256", lambda path, *a, **k: calls.append(path) or real(path))
    CellStore(out)  # nothing changed since the recorded check: no file is hashed
    assert [c for c in calls if "shard-" in str(c)] == []
