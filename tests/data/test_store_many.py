"""A cell store from several files: union vocabulary, dataset/batch per cell, unobserved genes, balanced draws."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from neurofm.cli import main
from neurofm.data.store import CellStore, InputFile, convert, convert_many
from neurofm.errors import NeurofmError
from neurofm.masking import IGNORE_INDEX, make_batch
from neurofm.stream import (
    CellStream,
    StreamConfig,
    StreamLoader,
    densify,
    densify_counts,
    fit_tokenizer,
    observed_mask,
)
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _counts(n_cells: int, n_genes: int, seed: int, scale: float = 3.0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.gamma(0.6, scale, size=(n_cells, n_genes))).astype(np.float32)
    return sp.csr_matrix(dense)


def _write(path: Path, X, var_names, obs: dict | None = None, symbols=None) -> Path:
    var = pd.DataFrame(index=pd.Index(var_names, dtype=str))
    if symbols is not None:
        var["gene_symbol"] = symbols
    frame = pd.DataFrame(obs or {}, index=[f"{path.stem}-cell{i}" for i in range(X.shape[0])])
    ad.AnnData(X=X, obs=frame, var=var).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """human: 8 Ensembl IDs (versioned) + symbols; mouse: 6 symbols, 4 shared with human by upper-cased
    symbol and 2 of its own; ids: 3 of human's genes by unversioned ID + 1 new gene."""
    root = tmp_path_factory.mktemp("many")
    human_ids = [f"ENSG0000000000{i}.{i + 1}" for i in range(8)]
    human_symbols = ["GAD1", "SLC17A7", "SST", "PVALB", "SNAP25", "MBP", "GFAP", "AQP4"]
    human = _write(root / "human.h5ad", _counts(120, 8, 1), human_ids, {"donor": ["d1", "d2"] * 60},
                   symbols=human_symbols)  # fmt: skip
    mouse = _write(
        root / "mouse.h5ad", _counts(40, 6, 2, scale=30.0), ["Gad1", "Sst", "Mbp", "Gfap", "Xist1", "Zz9"]
    )
    ids = _write(
        root / "ids.h5ad",
        _counts(30, 4, 3),
        ["ENSG00000000001", "ENSG00000000003", "ENSG00000000007", "ENSG00000000099"],
    )
    return {"human": human, "mouse": mouse, "ids": ids}


@pytest.fixture(scope="module")
def store(files, tmp_path_factory) -> CellStore:
    out = tmp_path_factory.mktemp("many-store") / "store"
    convert_many(
        [f"{files['human']}:batch=donor", files["mouse"], {"path": str(files["ids"]), "name": "by_id"}],
        out, shard_size=70, seed=3,
    )  # fmt: skip
    return CellStore(out, verify=True)


def test_union_vocabulary_matches_symbols_and_unversioned_ids(store, files):
    manifest = store.manifest
    assert store.n_genes == 8 + 2 + 1
    assert store.gene_ids.tolist()[8:] == ["Xist1", "Zz9", "ENSG00000000099"]
    human, mouse, ids = manifest["datasets"]
    assert (mouse["genes"]["n_matched"], mouse["genes"]["n_added"]) == (4, 2)
    assert mouse["genes"]["matched_by"] == "var_names ~ gene_symbols"
    assert (ids["genes"]["n_matched"], ids["genes"]["n_added"]) == (3, 1)
    assert ids["genes"]["matched_by"] == "var_names ~ gene_ids"
    assert mouse["measured_genes"] == [0, 2, 5, 6, 8, 9] and ids["measured_genes"] == [1, 3, 7, 10]
    assert manifest["n_cells"] == 190 and [d["name"] for d in manifest["datasets"]] == [
        "human",
        "mouse",
        "by_id",
    ]
    # every count lands at its store gene
    obs = store.read_obs()
    for name, path in files.items():
        dataset = "by_id" if name == "ids" else name
        rows = np.flatnonzero(obs["dataset"].to_numpy() == dataset)
        source = ad.read_h5ad(path)
        measured = store.datasets[store.dataset_names.index(dataset)]["measured_genes"]
        stored = store.rows(rows).toarray()
        np.testing.assert_array_equal(
            stored[:, measured], source.X.toarray()[obs["source_row"].to_numpy()[rows]]
        )
        assert stored[:, np.setdiff1d(np.arange(store.n_genes), measured)].sum() == 0


def test_every_cell_records_its_dataset_and_batch_and_the_shuffle_mixes_files(store):
    obs = store.read_obs()
    assert obs["dataset"].value_counts().to_dict() == {"human": 120, "mouse": 40, "by_id": 30}
    human = obs[obs["dataset"] == "human"]
    assert set(human["batch"]) == {"d1", "d2"} and (human["batch"] == human["donor"]).all()
    assert set(obs.loc[obs["dataset"] == "mouse", "batch"]) == {"mouse"}
    np.testing.assert_array_equal(
        np.asarray(store.dataset_names)[store.cell_datasets()], obs["dataset"].to_numpy()
    )
    first_shard = obs["dataset"].to_numpy()[:70]
    assert set(first_shard) == {"human", "mouse", "by_id"}  # files permuted together, not one after another
    assert obs.index.is_unique


def test_unobserved_genes_get_no_token_no_library_share_and_are_flagged(store, files):
    tokenizer = fit_tokenizer(store, TokenizerConfig(constant_genes="keep"))
    config = StreamConfig(batch_size=32, block_size=8, buffer_blocks=4, val_fraction=0.1, seed=1, counts=True)
    stream = CellStream(store, tokenizer, config)
    mouse = store.dataset_names.index("mouse")
    measured = np.asarray(store.datasets[mouse]["measured_genes"])
    # the mouse cells' bins, computed from the mouse file alone: library size over its own genes only
    source = ad.read_h5ad(files["mouse"])
    column = np.full(store.n_genes, -1)
    column[measured] = np.arange(measured.size)
    expected = tokenizer.transform(source, source=column)
    obs, seen = store.read_obs(), 0
    for batch in stream:
        mask = observed_mask(batch, stream.observed_genes)
        np.testing.assert_array_equal(mask.numpy(), store.observed_genes[batch["dataset"].numpy()])
        is_mouse = batch["dataset"].numpy() == mouse
        rows = obs["source_row"].to_numpy()[batch["rows"].numpy()[is_mouse]]
        bins = densify(batch, stream.zero_bins).numpy()[is_mouse]
        np.testing.assert_array_equal(bins[:, measured], expected[rows][:, measured])
        assert densify_counts(batch, store.n_genes)[~mask].sum() == 0
        made = make_batch(densify(batch, stream.zero_bins), 5, 99, _Masking(), torch.Generator().manual_seed(0),
                          observed=mask)  # fmt: skip
        on_unobserved = ~torch.gather(mask, 1, made.gene_ids)
        assert torch.equal(made.padding_mask, on_unobserved)
        assert (made.labels[on_unobserved] == IGNORE_INDEX).all() and (
            made.cell_labels[on_unobserved] == IGNORE_INDEX
        ).all()
        counts_per_cell = mask.sum(1)
        assert (
            (~made.padding_mask).sum(1) == torch.clamp(counts_per_cell, max=5)
        ).all()  # observed drawn first
        seen += int(is_mouse.sum())
    assert seen > 0


class _Masking:
    mask_ratio, nonzero_mask_share, cell_loss_tokens, count_input = 0.4, 0.5, "all", "tokens"


def test_bin_edges_of_a_gene_are_fit_on_the_cells_that_measure_it(store):
    config = TokenizerConfig(constant_genes="keep")
    fitted = fit_tokenizer(store, config)  # every cell sampled: the store is small
    datasets = store.cell_datasets()
    human = np.flatnonzero(datasets == store.dataset_names.index("human"))
    mouse = np.flatnonzero(datasets == store.dataset_names.index("mouse"))
    only_human = ExpressionTokenizer(config).fit(store.to_anndata(human))
    human_and_mouse = ExpressionTokenizer(config).fit(
        store.to_anndata(np.sort(np.concatenate([human, mouse])))
    )
    everyone = ExpressionTokenizer(config).fit(store.to_anndata())
    gene = 4  # SNAP25: measured by the human file only
    np.testing.assert_array_equal(fitted.bin_edges[gene], only_human.bin_edges[gene])
    assert not np.array_equal(fitted.bin_edges[gene], everyone.bin_edges[gene])  # others' non-zeros left out
    gene = 0  # GAD1 / Gad1: measured by the human and the mouse file
    np.testing.assert_array_equal(fitted.bin_edges[gene], human_and_mouse.bin_edges[gene])
    assert not np.array_equal(fitted.bin_edges[gene], everyone.bin_edges[gene])


def test_balanced_draws_give_each_file_an_equal_share_and_proportional_keeps_sizes(store):
    tokenizer = fit_tokenizer(store, TokenizerConfig(constant_genes="keep"))
    shares = {}
    for draw in ("proportional", "balanced"):
        config = StreamConfig(
            batch_size=16, block_size=8, buffer_blocks=2, val_fraction=0.1, seed=2, draw=draw
        )
        stream = CellStream(store, tokenizer, config)
        datasets = np.concatenate([batch["dataset"].numpy() for batch in stream])
        shares[draw] = np.bincount(datasets, minlength=3) / datasets.size
        assert datasets.size == stream.worker_plan(0, 0).n_rows
        assert abs(datasets.size - stream.n_train_cells) <= 0.15 * stream.n_train_cells
    train = ~np.isin(
        np.arange(store.n_cells),
        CellStream(store, tokenizer, StreamConfig(val_fraction=0.1, seed=2)).val_rows,
    )
    sizes = np.bincount(store.cell_datasets()[train], minlength=3)
    np.testing.assert_allclose(shares["proportional"], sizes / sizes.sum())
    np.testing.assert_allclose(shares["balanced"], [1 / 3] * 3, atol=0.08)


@pytest.mark.parametrize("draw", ["proportional", "balanced"])
def test_mid_epoch_resume_equals_an_uninterrupted_pass(store, draw):
    tokenizer = fit_tokenizer(store, TokenizerConfig(constant_genes="keep"))
    config = StreamConfig(batch_size=16, block_size=8, buffer_blocks=2, seed=4, draw=draw)
    full = [b["rows"].numpy() for b in StreamLoader(CellStream(store, tokenizer, config))]
    first = StreamLoader(CellStream(store, tokenizer, config))
    head = []
    for batch in first:
        head.append(batch["rows"].numpy())
        if len(head) == 3:
            break
    state = first.state_dict()
    assert state["draw"] == draw
    second = StreamLoader(CellStream(store, tokenizer, config))
    second.load_state_dict(state)
    rest = [b["rows"].numpy() for b in second]
    assert len(head) + len(rest) == len(full)
    for got, want in zip(head + rest, full, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_damaged_multi_file_store_is_refused(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    CellStore(copy, verify=True)
    data = copy / "shard-00001" / "data.npy"
    raw = bytearray(data.read_bytes())
    raw[-64:] = bytes(64 * [255])
    data.write_bytes(bytes(raw))
    with pytest.raises(NeurofmError, match="shard-00001.*SHA-256.*convert the store again"):
        CellStore(copy, verify=True)
    shutil.rmtree(copy)
    shutil.copytree(store.path, copy)
    datasets = copy / "datasets.npy"
    raw = bytearray(datasets.read_bytes())
    raw[-2:] = b"\x01\x00" if raw[-2:] != b"\x01\x00" else b"\x02\x00"
    datasets.write_bytes(bytes(raw))
    with pytest.raises(NeurofmError, match="datasets.npy.*SHA-256"):
        CellStore(copy, verify=True)


def test_an_interrupted_conversion_resumes_to_the_same_store(files, tmp_path):
    inputs = [f"{files['human']}:batch=donor", files["mouse"], files["ids"]]
    reference = convert_many(inputs, tmp_path / "reference", shard_size=50, seed=5)

    def stop(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_many(inputs, tmp_path / "store", shard_size=50, seed=5, on_shard_written=stop)
    with pytest.raises(NeurofmError, match="not a finished cell store"):
        CellStore(tmp_path / "store")
    written = []
    manifest = convert_many(
        inputs, tmp_path / "store", shard_size=50, seed=5, on_shard_written=written.append
    )
    assert written == [2, 3]  # the finished shards were kept
    assert (
        manifest["shards"] == reference["shards"] and manifest["cell_datasets"] == reference["cell_datasets"]
    )


def test_bad_inputs_fail_in_one_line_naming_the_fix(files, tmp_path):
    with pytest.raises(NeurofmError, match="no obs column 'nope'.*batch=COL"):
        convert_many([f"{files['human']}:batch=nope", files["mouse"]], tmp_path / "a")
    with pytest.raises(NeurofmError, match="no var column 'sym'"):
        convert_many([files["human"], {"path": str(files["mouse"]), "gene_column": "sym"}], tmp_path / "b")
    with pytest.raises(NeurofmError, match="is not batch=COL"):
        InputFile.parse("cells.h5ad:batchy=c1")
    with pytest.raises(NeurofmError, match="unknown keys"):
        InputFile.parse({"path": "a.h5ad", "batch": "x"})
    assert InputFile.parse(
        "dir/a.h5ad:batch=donor,genes=gene_symbol,name=A", gene_column="other"
    ) == InputFile("dir/a.h5ad", "donor", "gene_symbol", "A")
    assert InputFile.parse("a.h5ad", batch_column="chip") == InputFile("a.h5ad", "chip", None, None)


def test_cli_converts_several_files_and_reports_the_gene_match(files, tmp_path, capsys):
    out = tmp_path / "store"
    status = main(["convert", f"{files['human']}:batch=donor", str(files["mouse"]), str(out), "--seed", "1"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "mouse: 40 cells, 6 genes measured (4 matched by var_names ~ gene_symbols, 2 new" in printed
    assert "160 cells × 10 genes (union) from 2 files" in printed
    assert json.loads((out / "manifest.json").read_text())["datasets"][0]["batch_column"] == "donor"
    assert main(["convert", str(files["human"]), str(files["mouse"]), str(out), "--region", "x"]) == 2
    assert "select cells/genes of one input file" in capsys.readouterr().err


def test_the_single_file_store_is_one_dataset_measuring_every_gene(files, tmp_path):
    manifest = convert(files["human"], tmp_path / "single", shard_size=70, seed=3)
    assert "datasets" not in manifest and "cell_datasets" not in manifest
    store = CellStore(tmp_path / "single")
    assert store.dataset_names == ["human"] and store.observed_genes.all()
    assert not store.cell_datasets().any()


@pytest.mark.skipif(not (SHARED / "zeisel2015_550cells_gpsfish.h5ad").exists(), reason="shared data absent")
def test_real_files_human_ensembl_mouse_symbols_and_m1_markers_share_genes(tmp_path):
    manifest = convert_many(
        [SHARED / "subset_2523_210_Cerebral-cortex.screened.h5ad", SHARED / "zeisel2015_550cells_gpsfish.h5ad",
         f"{SHARED / 'allen_m1_10x_donor1_141markers.h5ad'}:batch=donor"],
        tmp_path / "store", shard_size=20000,
    )  # fmt: skip
    cortex, zeisel, m1 = manifest["datasets"]
    assert zeisel["genes"]["matched_by"] == "var_names ~ gene_symbols" and zeisel["genes"]["n_matched"] > 1000
    assert m1["genes"]["n_matched"] > 100 and m1["n_measured"] == 141
    assert manifest["n_genes"] == 2000 + zeisel["genes"]["n_added"] + m1["genes"]["n_added"]
