"""``run.py --pipeline prepare`` end to end: outputs, ZenML cache, the real file, and bad input.

Every run goes through ``run.main`` in this process (ZenML and MLflow stores are the test session's own,
see the root conftest.py). A pipeline run costs ~5 s of ZenML overhead, so the default-data run is made
once per session and the bad-input cases are rejected before ZenML starts wherever a cheap check can
tell.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("zenml")

import run  # noqa: E402
from neurofm import keys  # noqa: E402

REAL_FILE = (
    Path(run.__file__).parent.parent / "shared" / "data" / "subset_2523_210_Cerebral-cortex.screened.h5ad"
)
PREPARE_STEPS = {
    "check_barcodes",
    "atlas_plot",
    "subset_clusters",
    "filter_region",
    "dedupe_ids",
    "crop_data",
    "dataset_summary",
    "save_prepared",
}
UNCACHED_STEPS = {"save_prepared", "dataset_summary", "check_barcodes", "atlas_plot"}
OUTPUT_FILES = (
    "prepared.h5ad",
    "sparsity_report.csv",
    "dataset_summary.json",
    "barcode_check.json",
    "atlas_plot.png",
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _latest_run():
    from zenml.client import Client

    return Client().list_pipeline_runs(sort_by="desc:created", size=1, hydrate=True)[0]


def _step_statuses(pipeline_run) -> dict[str, str]:
    return {name: step.status.value for name, step in pipeline_run.steps.items()}


def _main(argv: list[str]) -> tuple[int, str]:
    """``run.main(argv)`` with what it prints to stdout (the closing summary)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run.main(argv)
    return code, stdout.getvalue()


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """``run.py --pipeline prepare --out OUT`` on the built-in data, once per session."""
    out = tmp_path_factory.mktemp("prepare_default") / "out"
    argv = ["--pipeline", "prepare", "--out", str(out)]
    code, summary = _main(argv)
    assert code == 0, summary
    return {"argv": argv, "out": out, "summary": summary, "run": _latest_run()}


# --- the built-in data ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_writes_every_output(default_run):
    out = default_run["out"]
    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    statuses = _step_statuses(default_run["run"])
    assert set(statuses) == PREPARE_STEPS  # every step ran (earlier tests in the session may have cached some)
    assert set(statuses.values()) <= {"completed", "cached"}
    assert "prepared data:" in default_run["summary"] and "1200 × 800" in default_run["summary"]


@pytest.mark.slow
def test_default_run_prepares_the_two_clusters_of_one_region(default_run):
    from neurofm.config import load_config

    defaults = load_config(Path(run.__file__).parent / "configs" / "prepare.yaml")["default_data"]
    prepared = ad.read_h5ad(default_run["out"] / "prepared.h5ad")
    assert prepared.shape == (defaults["crop"]["n_cells"], defaults["crop"]["n_genes"])
    assert set(prepared.obs[keys.SUBTYPE]) == {f"cluster_{i}" for i in defaults["cluster_ids"]}
    assert prepared.obs[keys.REGION].astype(str).unique().tolist() == [defaults["region"]]
    assert prepared.obs_names.is_unique and prepared.var_names.is_unique
    assert sp.issparse(prepared.X) and np.all(prepared.X.data == np.round(prepared.X.data))
    assert {keys.CROP_PARAMS, keys.SPARSITY_SUMMARY} <= set(prepared.uns)


@pytest.mark.slow
def test_default_run_reports(default_run):
    out = default_run["out"]
    summary = json.loads((out / "dataset_summary.json").read_text())
    assert (summary["n_cells"], summary["n_genes"]) == (1200, 800)
    assert set(summary["value_counts"]) == {"cluster_2523", "cluster_210"}
    assert sum(summary["value_counts"].values()) == 1200
    barcodes = json.loads((out / "barcode_check.json").read_text())
    assert barcodes  # a non-empty overlap report
    sparsity = pd.read_csv(out / "sparsity_report.csv")
    assert len(sparsity) > 0
    assert (out / "atlas_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_prepared_artifact_is_stored_by_the_anndata_materializer(default_run):
    [artifact] = default_run["run"].steps["crop_data"].outputs["prepared_cells"]
    assert artifact.materializer.attribute == "AnnDataMaterializer"
    assert artifact.run_metadata["n_obs"] == 1200 and artifact.run_metadata["n_vars"] == 800
    from_store = artifact.load()
    from_file = ad.read_h5ad(default_run["out"] / "prepared.h5ad")
    assert (from_store.X != from_file.X).nnz == 0
    assert from_store.obs_names.equals(from_file.obs_names)


@pytest.mark.slow
def test_second_identical_run_is_served_from_the_cache(default_run):
    before = ad.read_h5ad(default_run["out"] / "prepared.h5ad")
    code, summary = _main(default_run["argv"])
    assert code == 0
    statuses = _step_statuses(_latest_run())
    for step_name in UNCACHED_STEPS:  # they write the output files: never cached
        assert statuses.pop(step_name) == "completed"
    assert statuses == dict.fromkeys(PREPARE_STEPS - UNCACHED_STEPS, "cached")
    assert "served from cache" in summary
    after = ad.read_h5ad(default_run["out"] / "prepared.h5ad")
    assert (after.X != before.X).nnz == 0 and after.obs_names.equals(before.obs_names)


@pytest.mark.slow
def test_cached_rerun_into_an_emptied_out_dir_writes_every_output(default_run):
    out = default_run["out"]
    kept = out.with_name("out.kept")
    out.rename(kept)
    try:
        code, _ = _main(default_run["argv"])
        assert code == 0
        missing = [name for name in OUTPUT_FILES if not (out / name).is_file()]
        assert not missing, missing
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        kept.rename(out)


@pytest.mark.slow
def test_no_cache_runs_every_step_again(default_run):
    code, summary = _main([*default_run["argv"], "--no-cache"])
    assert code == 0
    assert _step_statuses(_latest_run()) == dict.fromkeys(PREPARE_STEPS, "completed")
    assert "served from cache" not in summary


# --- the real file ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_real_file_is_prepared_and_left_untouched(tmp_path):
    if not REAL_FILE.is_file():
        pytest.skip(f"real test data not found at {REAL_FILE}")
    digest = _sha256(REAL_FILE)
    out = tmp_path / "out"
    argv = ["--pipeline", "prepare", "--data", str(REAL_FILE), "--out", str(out)]
    argv += [
        "--set",
        "region.value=Cerebral cortex",
        "--set",
        "crop.n_cells=500",
        "--set",
        "crop.n_genes=300",
    ]
    code, _ = _main(argv)
    assert code == 0
    assert _sha256(REAL_FILE) == digest
    prepared = ad.read_h5ad(out / "prepared.h5ad")
    assert prepared.shape == (500, 300)
    assert set(prepared.obs[keys.SUBTYPE]) == {"cluster_2523", "cluster_210"}
    summary = json.loads((out / "dataset_summary.json").read_text())
    assert summary["n_cells"] == 500
    assert (out / "sparsity_report.csv").is_file()
    assert not (out / "barcode_check.json").exists()  # no metadata given: no barcode check


# --- bad input --------------------------------------------------------------------------------------------


def _tiny_counts(path: Path, change: Callable[[np.ndarray], None] | None = None) -> Path:
    """A 30 × 12 raw-count .h5ad; ``change`` edits the dense matrix first (NaN, negatives, …)."""
    counts = np.random.default_rng(0).poisson(2.0, size=(30, 12)).astype(np.float32)
    if change is not None:
        change(counts)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(30)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(12)])
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(path)
    return path


def _set_nan(counts: np.ndarray) -> None:
    counts[3, 4] = np.nan


def _set_negative(counts: np.ndarray) -> None:
    counts[5, 1] = -3


def _log_normalise(counts: np.ndarray) -> None:
    counts[:] = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


def _truncated(tmp: Path, atlas) -> list[str]:
    data = atlas.counts_h5ad.read_bytes()
    (tmp / "truncated.h5ad").write_bytes(data[: len(data) // 3])
    return ["--data", str(tmp / "truncated.h5ad")]


def _metadata_without(tmp: Path, atlas, column: str) -> Path:
    table = pd.read_csv(atlas.cell_metadata_csv)
    table.drop(columns=[column]).to_csv(tmp / "metadata.csv", index=False)
    return tmp / "metadata.csv"


def _with_metadata(atlas, *extra: str) -> list[str]:
    return ["--data", str(atlas.counts_h5ad), "--metadata", str(atlas.cell_metadata_csv), *extra]


def _under_a_file(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("not a directory")
    return ["--out", str(tmp / "a_file" / "out")]


# id → (build the extra arguments from (tmp_path, atlas_files), words the error line must hold)
BAD_INPUTS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "missing file": (
        lambda tmp, atlas: ["--data", str(tmp / "missing.h5ad")],
        ("missing.h5ad", "does not exist"),
    ),
    "non-HDF5 file named .h5ad": (
        lambda tmp, atlas: ["--data", str(_write_text(tmp / "table.h5ad", "a,b\n1,2\n"))],
        ("table.h5ad", "not an HDF5"),
    ),
    "truncated .h5ad": (_truncated, ("truncated.h5ad", "truncated")),
    "metadata missing the cluster column": (
        lambda tmp, atlas: [
            "--data",
            str(atlas.counts_h5ad),
            "--metadata",
            str(_metadata_without(tmp, atlas, "cluster_alias")),
            "--set",
            "subset.cluster_ids=[2523]",
        ],
        ("metadata.csv", "cluster_alias"),
    ),
    "metadata missing the cell label column": (
        lambda tmp, atlas: [
            "--data",
            str(atlas.counts_h5ad),
            "--metadata",
            str(_metadata_without(tmp, atlas, "cell_label")),
            "--set",
            "subset.cluster_ids=[2523]",
        ],
        ("metadata.csv", "cell_label"),
    ),
    "metadata file missing": (
        lambda tmp, atlas: ["--data", str(atlas.counts_h5ad), "--metadata", str(tmp / "nope.csv")],
        ("nope.csv", "does not exist"),
    ),
    "cluster IDs without metadata": (
        lambda tmp, atlas: ["--data", str(atlas.counts_h5ad), "--set", "subset.cluster_ids=[2523]"],
        ("metadata_csv", "--metadata"),
    ),
    "cluster IDs matching no cell": (
        lambda tmp, atlas: _with_metadata(atlas, "--set", "subset.cluster_ids=[999999]"),
        ("999999", "match no cell"),
    ),
    "region value absent": (
        lambda tmp, atlas: _with_metadata(
            atlas, "--set", "subset.cluster_ids=[2523]", "--set", "region.value=Nowhere"
        ),
        ("Nowhere", "values present"),
    ),
    "region column missing": (
        lambda tmp, atlas: ["--data", str(atlas.counts_h5ad), "--set", "region.value=Cerebral cortex"],
        ("anatomical_division_label", "region"),
    ),
    "region column missing from the metadata too": (
        lambda tmp, atlas: _with_metadata(
            atlas,
            "--set",
            "subset.cluster_ids=[2523]",
            "--set",
            "region.column=area",
            "--set",
            "region.value=x",
        ),
        ("'area'", "region"),
    ),
    "unknown config key": (lambda tmp, atlas: ["--set", "crop.n_cell=100"], ("n_cell", "known keys")),
    "unknown config section": (
        lambda tmp, atlas: ["--set", "croop.n_cells=100"],
        ("croop", "known sections"),
    ),
    "out-of-range config value": (lambda tmp, atlas: ["--set", "train.mask_ratio=1.5"], ("mask_ratio",)),
    "missing config file": (
        lambda tmp, atlas: ["--config", str(tmp / "nope.yaml")],
        ("nope.yaml", "does not exist"),
    ),
    "unwritable output dir": (lambda tmp, atlas: _under_a_file(tmp), ("a_file", "output directory")),
    "log-normalised values": (
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "lognorm.h5ad", _log_normalise))],
        ("non-integer", "raw"),
    ),
    "negative counts": (
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "negative.h5ad", _set_negative))],
        ("negative",),
    ),
    "NaN counts": (lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "nan.h5ad", _set_nan))], ("NaN",)),
}
# rejected inside a ZenML step (they need the data read): the slow ones
IN_STEP = {
    "cluster IDs matching no cell",
    "region value absent",
    "log-normalised values",
    "negative counts",
    "NaN counts",
}


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=pytest.mark.slow) if case in IN_STEP else case for case in BAD_INPUTS],
)
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, atlas_files, capfd):
    build, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    extra = build(tmp_path, atlas_files)
    argv = ["--pipeline", "prepare", "--out", str(out), *extra]  # a later --out wins
    inputs = {p: _sha256(p) for p in tmp_path.iterdir() if p.is_file()} | {
        atlas_files.counts_h5ad: _sha256(atlas_files.counts_h5ad)
    }
    capfd.readouterr()

    code = run.main(argv)

    captured = capfd.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("neurofm: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in captured.out + captured.err
    written = [p for p in tmp_path.rglob("*prepared*")]
    assert not written, written
    assert {p: _sha256(p) for p in inputs} == inputs  # inputs are never modified


def test_early_errors_stop_before_zenml_starts_a_run(tmp_path, atlas_files, capfd):
    """Cheaply detectable mistakes are refused before a pipeline run is created."""
    from zenml.client import Client

    early = [case for case in BAD_INPUTS if case not in IN_STEP]
    before = len(Client().list_pipeline_runs(size=1000))
    for case in early:
        case_dir = tmp_path / str(early.index(case))
        case_dir.mkdir()
        build, _ = BAD_INPUTS[case]
        assert (
            run.main(["--pipeline", "prepare", "--out", str(case_dir / "out"), *build(case_dir, atlas_files)])
            == 2
        )
    assert len(Client().list_pipeline_runs(size=1000)) == before
    capfd.readouterr()


def test_debug_shows_the_traceback(tmp_path):
    from neurofm.errors import NeurofmError

    with pytest.raises(NeurofmError, match="does not exist"):
        run.main(["--pipeline", "prepare", "--debug", "--data", str(tmp_path / "missing.h5ad")])


def test_help_lists_pipelines_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("prepare", "pretrain", "evaluate", "--config", "--no-cache", "--data", "--out", "--set"):
        assert word in text
