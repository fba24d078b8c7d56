"""``run.py --pipeline prepare`` end to end: outputs, ZenML cache and the real file.

Every run goes through ``run.main`` in this process (ZenML and MLflow stores are the test session's own,
see the root conftest.py). A pipeline run costs ~5 s of ZenML overhead, so the default-data run is made
once per session. Bad input (one error line, exit 2, nothing written) is tested in test_bad_inputs.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
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
    assert (
        set(statuses) == PREPARE_STEPS
    )  # every step ran (earlier tests in the session may have cached some)
    assert set(statuses.values()) <= {"completed", "cached"}
    assert "prepared data:" in default_run["summary"] and "1200 × 800" in default_run["summary"]


@pytest.mark.slow
def test_default_run_prepares_the_two_clusters_of_one_region(default_run):
    from neurofm.config import load_config

    defaults = load_config(Path(run.__file__).parent / "configs" / "prepare.yaml").default_data
    prepared = ad.read_h5ad(default_run["out"] / "prepared.h5ad")
    assert prepared.shape == (defaults.crop["n_cells"], defaults.crop["n_genes"])
    assert set(prepared.obs[keys.SUBTYPE]) == {f"cluster_{i}" for i in defaults.cluster_ids}
    assert prepared.obs[keys.REGION].astype(str).unique().tolist() == [defaults.region]
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


# --- usage -------------------------------------------------------------------------------------------------


def test_help_lists_pipelines_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("prepare", "pretrain", "evaluate", "--config", "--no-cache", "--data", "--out", "--set"):
        assert word in text
