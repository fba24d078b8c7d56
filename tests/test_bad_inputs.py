"""Bad input through the real entry points: one error line, exit status 2, nothing written, nothing logged.

Four tables, one per entry point, map a case id to (argv builder, words the error line must hold):
``run.py --pipeline prepare``, ``--pipeline pretrain`` and ``--pipeline evaluate`` (through ``run.main``)
and the ``neurofm`` console command (through ``neurofm.cli.main``); one more case runs ``python run.py``
as a real process. Every case asserts exit status 2, exactly one stderr line ``neurofm: error: …``
holding the words, no traceback, inputs byte-identical, no file written (an empty --out directory may be
created), and for pretrain/evaluate no new MLflow run or registered model version.

Most mistakes are refused before ZenML starts, and the test checks that no pipeline run was created.
The cases marked ``in_step`` need the data read, so a ZenML step refuses them (slow: a pipeline run
each): the run is recorded as failed, and only the complete outputs of steps that do not depend on the
refused one may exist (the barcode report; for evaluate, the prepared data).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("zenml")

import run  # noqa: E402
from neurofm import cli, keys, runs, tracking  # noqa: E402
from neurofm.data.synthetic import make_synthetic_counts  # noqa: E402
from neurofm.model import WEIGHTS_FILE, ModelConfig  # noqa: E402
from neurofm.train import TrainConfig, pretrain  # noqa: E402

ROOT = Path(run.__file__).resolve().parent
ERROR_PREFIX = "neurofm: error: "
# what the prepare half of an evaluate run writes when a later (evaluation) step refuses the input
PREPARE_OUTPUTS = frozenset({"prepared.h5ad", "sparsity_report.csv", "dataset_summary.json"})
# written by check_barcodes, which reads the metadata and obs_names only, beside the step that refuses
BARCODE_REPORT = frozenset({"barcode_check.json"})


@dataclass(frozen=True)
class Case:
    """``build(tmp, given) -> argv``; ``words`` must appear in the error line; ``in_step``: refused by a
    ZenML step, which may leave the complete outputs named in ``may_write`` (file names under --out)."""

    build: Callable[[Path, Any], list[str]]
    words: tuple[str, ...]
    in_step: bool = False
    may_write: frozenset[str] = frozenset()


# --- input builders --------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _tiny_counts(
    path: Path,
    change: Callable[[np.ndarray], None] | None = None,
    shape: tuple[int, int] = (30, 12),
    duplicate_cell: bool = False,
) -> Path:
    """A raw-count .h5ad (30 cells × 12 genes by default); ``change`` edits the dense matrix first (NaN,
    negatives, …); ``duplicate_cell`` gives the second cell the first one's obs name."""
    counts = np.random.default_rng(0).poisson(2.0, size=shape).astype(np.float32)
    if change is not None:
        change(counts)
    cells = [f"cell{i}" for i in range(shape[0])]
    if duplicate_cell:
        cells[1] = cells[0]
    obs = pd.DataFrame(index=cells)
    var = pd.DataFrame(index=[f"gene{j}" for j in range(shape[1])])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "obs_names are not unique", UserWarning)
        ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(path)
    return path


def _set_nan(counts: np.ndarray) -> None:
    counts[3, 4] = np.nan


def _set_inf(counts: np.ndarray) -> None:
    counts[2, 7] = np.inf


def _set_negative(counts: np.ndarray) -> None:
    counts[5, 1] = -3


def _log_normalise(counts: np.ndarray) -> None:
    counts[:] = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


def _truncated_copy(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _metadata_without(tmp: Path, atlas, column: str) -> Path:
    table = pd.read_csv(atlas.cell_metadata_csv)
    table.drop(columns=[column]).to_csv(tmp / "metadata.csv", index=False)
    return tmp / "metadata.csv"


def _metadata_with_text_cluster_ids(tmp: Path, atlas) -> Path:
    table = pd.read_csv(atlas.cell_metadata_csv)
    table[keys.CLUSTER_ALIAS] = "c" + table[keys.CLUSTER_ALIAS].astype(str)
    table.to_csv(tmp / "metadata.csv", index=False)
    return tmp / "metadata.csv"


def _with_metadata(atlas, *extra: str) -> list[str]:
    return ["--data", str(atlas.counts_h5ad), "--metadata", str(atlas.cell_metadata_csv), *extra]


def _under_a_file(tmp: Path) -> Path:
    """A path below a regular file: no one, root included, can create it."""
    return _write_text(tmp / "a_file", "not a directory") / "out"


def _read_only_out(tmp: Path) -> list[str]:
    locked = tmp / "read_only"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anyway: "output dir under a regular file" covers root
        pytest.skip("running as root: a read-only directory is still writable")
    return ["--out", str(locked / "out")]


def _config_file(tmp: Path, text: str) -> list[str]:
    return ["--config", str(_write_text(tmp / "run.yaml", text))]


# --- run.py --pipeline prepare -----------------------------------------------------------------------------

PREPARE: dict[str, Case] = {
    "missing file": Case(
        lambda tmp, atlas: ["--data", str(tmp / "missing.h5ad")], ("missing.h5ad", "does not exist")
    ),
    "non-HDF5 file named .h5ad": Case(
        lambda tmp, atlas: ["--data", str(_write_text(tmp / "table.h5ad", "a,b\n1,2\n"))],
        ("table.h5ad", "not an HDF5"),
    ),
    "truncated .h5ad": Case(
        lambda tmp, atlas: ["--data", str(_truncated_copy(atlas.counts_h5ad, tmp / "cut.h5ad"))],
        ("cut.h5ad", "truncated"),
    ),
    "log-normalised values": Case(
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "lognorm.h5ad", _log_normalise))],
        ("non-integer", "raw"),
        in_step=True,
    ),
    "negative counts": Case(
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "negative.h5ad", _set_negative))],
        ("negative",),
        in_step=True,
    ),
    "NaN counts": Case(
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "nan.h5ad", _set_nan))],
        ("NaN",),
        in_step=True,
    ),
    "infinite counts": Case(
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "inf.h5ad", _set_inf))],
        ("infinite",),
        in_step=True,
    ),
    "empty matrix (no cells)": Case(
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "empty.h5ad", shape=(0, 12)))],
        ("empty.h5ad", "empty matrix", "0 cells"),
        in_step=True,
    ),
    "duplicate cell IDs with dedupe.cells=error": Case(
        lambda tmp, atlas: [
            "--data",
            str(_tiny_counts(tmp / "duplicates.h5ad", duplicate_cell=True)),
            "--set",
            "dedupe.cells=error",
        ],
        ("duplicate cell IDs", "cell0"),
        in_step=True,
    ),
    "metadata missing the cluster column": Case(
        lambda tmp, atlas: [
            "--data",
            str(atlas.counts_h5ad),
            "--metadata",
            str(_metadata_without(tmp, atlas, keys.CLUSTER_ALIAS)),
            "--set",
            "subset.cluster_ids=[2523]",
        ],
        ("metadata.csv", keys.CLUSTER_ALIAS),
    ),
    "metadata missing the cell label column": Case(
        lambda tmp, atlas: [
            "--data",
            str(atlas.counts_h5ad),
            "--metadata",
            str(_metadata_without(tmp, atlas, keys.CELL_LABEL)),
            "--set",
            "subset.cluster_ids=[2523]",
        ],
        ("metadata.csv", keys.CELL_LABEL),
    ),
    "metadata cluster IDs of the wrong type": Case(
        lambda tmp, atlas: [
            "--data",
            str(atlas.counts_h5ad),
            "--metadata",
            str(_metadata_with_text_cluster_ids(tmp, atlas)),
            "--set",
            "subset.cluster_ids=[2523]",
        ],
        (keys.CLUSTER_ALIAS, "must hold integer"),
        in_step=True,
        may_write=BARCODE_REPORT,
    ),
    "metadata file missing": Case(
        lambda tmp, atlas: ["--data", str(atlas.counts_h5ad), "--metadata", str(tmp / "nope.csv")],
        ("nope.csv", "does not exist"),
    ),
    "cluster IDs without metadata": Case(
        lambda tmp, atlas: ["--data", str(atlas.counts_h5ad), "--set", "subset.cluster_ids=[2523]"],
        ("metadata_csv", "--metadata"),
    ),
    "cluster IDs of the wrong type": Case(
        lambda tmp, atlas: _with_metadata(atlas, "--set", "subset.cluster_ids=[cluster_2523]"),
        ("cluster_2523", "not an integer cluster alias"),
        in_step=True,
        may_write=BARCODE_REPORT,
    ),
    "cluster IDs matching no cell": Case(
        lambda tmp, atlas: _with_metadata(atlas, "--set", "subset.cluster_ids=[999999]"),
        ("999999", "match no cell"),
        in_step=True,
        may_write=BARCODE_REPORT,
    ),
    "region value absent": Case(
        lambda tmp, atlas: _with_metadata(
            atlas, "--set", "subset.cluster_ids=[2523]", "--set", "region.value=Nowhere"
        ),
        ("Nowhere", "values present"),
        in_step=True,
        may_write=BARCODE_REPORT,
    ),
    "region column missing": Case(
        lambda tmp, atlas: ["--data", str(atlas.counts_h5ad), "--set", "region.value=Cerebral cortex"],
        ("anatomical_division_label", "region"),
    ),
    "region column missing from the metadata too": Case(
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
    "unknown config key": Case(lambda tmp, atlas: ["--set", "crop.n_cell=100"], ("n_cell", "known keys")),
    "unknown config section": Case(
        lambda tmp, atlas: ["--set", "croop.n_cells=100"], ("croop", "known sections")
    ),
    "unknown key in a config file": Case(
        lambda tmp, atlas: _config_file(tmp, "crop:\n  n_cells: 100\n  min_detect: 0.1\n"),
        ("min_detect", "known keys"),
    ),
    "out-of-range config value": Case(
        lambda tmp, atlas: ["--set", "train.mask_ratio=1.5"], ("mask_ratio", "(0, 1)")
    ),
    "missing config file": Case(
        lambda tmp, atlas: ["--config", str(tmp / "nope.yaml")], ("nope.yaml", "does not exist")
    ),
    "output dir under a regular file": Case(
        lambda tmp, atlas: ["--out", str(_under_a_file(tmp))], ("a_file", "output directory")
    ),
    "read-only output dir": Case(lambda tmp, atlas: _read_only_out(tmp), ("read_only", "output directory")),
}

# --- run.py --pipeline pretrain ----------------------------------------------------------------------------

PRETRAIN: dict[str, Case] = {
    "unknown train key": Case(lambda tmp, atlas: ["--set", "train.epoch=2"], ("epoch", "known keys")),
    "out-of-range model value": Case(
        lambda tmp, atlas: ["--set", "model.n_heads=3"], ("invalid model config", "n_heads")
    ),
    "wrongly typed value in a config file": Case(
        lambda tmp, atlas: _config_file(
            tmp, f"extends: {ROOT / 'configs' / 'pretrain.yaml'}\ntrain:\n  epochs: many\n"
        ),
        ("epochs", "integer"),
    ),
    "empty matrix (no genes)": Case(
        lambda tmp, atlas: ["--data", str(_tiny_counts(tmp / "no_genes.h5ad", shape=(30, 0)))],
        ("no_genes.h5ad", "empty matrix", "0 genes"),
        in_step=True,
    ),
}

# --- run.py --pipeline evaluate ----------------------------------------------------------------------------


def _model_copy(tmp: Path, given: SimpleNamespace, change: Callable[[Path], None]) -> list[str]:
    broken = tmp / "checkpoint"
    shutil.copytree(given.model, broken)
    change(broken / WEIGHTS_FILE)
    return ["--model", str(broken)]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


EVALUATE: dict[str, Case] = {
    "label column missing": Case(
        lambda tmp, given: ["--label-col", "no_such_column"], ("no_such_column", "label column")
    ),
    "label column with one class": Case(
        lambda tmp, given: ["--label-col", "tissue"], ("tissue", "single class")
    ),
    "label mapping with one class": Case(
        lambda tmp, given: ["--set", "evaluate.label_mapping={cluster_2523: neuron, cluster_210: neuron}"],
        ("single class", "neuron", "label mapping"),
    ),
    "labels not covered by the mapping": Case(
        lambda tmp, given: ["--set", "evaluate.label_mapping={cluster_2523: excitatory}"],
        ("cluster_210", "not covered"),
        in_step=True,
        may_write=PREPARE_OUTPUTS,
    ),
    "model directory missing": Case(
        lambda tmp, given: ["--model", str(tmp / "no_model")], ("no_model", "neither an existing directory")
    ),
    "checkpoint directory missing its weights": Case(
        lambda tmp, given: _model_copy(tmp, given, Path.unlink), (WEIGHTS_FILE, "lacks", "incomplete")
    ),
    "truncated safetensors file": Case(
        lambda tmp, given: _model_copy(tmp, given, _truncate), (WEIGHTS_FILE, "not a readable safetensors")
    ),
    "garbage safetensors file": Case(
        lambda tmp, given: _model_copy(tmp, given, _garble), (WEIGHTS_FILE, "not a readable safetensors")
    ),
    "model trained on other genes": Case(
        lambda tmp, given: ["--model", str(given.other_genes_model)],
        ("of the model's", "are in the data", "--gene-col"),
    ),
    "model URI not registered": Case(
        lambda tmp, given: ["--model", "models:/neurofm-never-registered@newest"],
        ("cannot fetch model", "neurofm-never-registered"),
        in_step=True,
        may_write=PREPARE_OUTPUTS,
    ),
}

# --- the neurofm console command ---------------------------------------------------------------------------

CONSOLE: dict[str, Case] = {
    "inspect a missing file": Case(
        lambda tmp, atlas: ["inspect", str(tmp / "missing.h5ad")], ("missing.h5ad", "does not exist")
    ),
    "inspect a non-HDF5 file named .h5ad": Case(
        lambda tmp, atlas: ["inspect", str(_write_text(tmp / "table.h5ad", "a,b\n1,2\n"))],
        ("table.h5ad", "not an HDF5"),
    ),
    "inspect a truncated .h5ad": Case(
        lambda tmp, atlas: ["inspect", str(_truncated_copy(atlas.counts_h5ad, tmp / "cut.h5ad"))],
        ("cut.h5ad", "truncated"),
    ),
    "check-ids on a truncated .h5ad": Case(
        lambda tmp, atlas: [
            "check-ids",
            str(_truncated_copy(atlas.counts_h5ad, tmp / "cut.h5ad")),
            str(atlas.cell_metadata_csv),
        ],
        ("cut.h5ad", "truncated"),
    ),
    "check-ids on a non-HDF5 file": Case(
        lambda tmp, atlas: [
            "check-ids",
            str(_write_text(tmp / "table.h5ad", "a,b\n1,2\n")),
            str(atlas.cell_metadata_csv),
        ],
        ("table.h5ad", "not an HDF5"),
    ),
    "check-ids with a missing metadata file": Case(
        lambda tmp, atlas: ["check-ids", str(atlas.counts_h5ad), str(tmp / "nope.csv")],
        ("nope.csv", "does not exist"),
    ),
    "atlas-plot with metadata missing columns": Case(
        lambda tmp, atlas: [
            "atlas-plot",
            str(_metadata_without(tmp, atlas, "x")),
            str(atlas.cluster_csv),
            str(atlas.cluster_annotation_term_csv),
            "--out",
            str(tmp / "out" / "atlas.png"),
        ],
        ("metadata.csv", "'x'"),
    ),
    "make-synthetic into a path under a regular file": Case(
        lambda tmp, atlas: ["make-synthetic", str(_under_a_file(tmp)), "--cells", "50", "--genes", "20"],
        ("a_file", "output directory"),
    ),
}


# --- shared checks -----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def _assert_one_error_line(code: int, captured, words: tuple[str, ...]) -> None:
    assert code == 2, captured
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def _zenml_runs() -> int:
    from zenml.client import Client

    return Client().list_pipeline_runs(size=1).total


def _latest_zenml_status() -> str:
    from zenml.client import Client

    return Client().list_pipeline_runs(sort_by="desc:created", size=1)[0].status.value


def _mlflow_records() -> tuple[int, int]:
    """(runs in every experiment, versions of every registered model) in the session's MLflow store."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = tracking.configure()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = (
        client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=50_000) if experiments else []
    )
    return len(runs), len(client.search_model_versions(max_results=10_000))


def _refuse_through_run_py(
    case: Case, base_argv: list[str], given: Any, shared_inputs: list[Path], tmp: Path, capfd, tracked: bool
) -> None:
    """Run ``run.main`` on the case and assert the whole refusal contract (see the module docstring)."""
    out = tmp / "out"
    argv = [*base_argv, "--out", str(out), *case.build(tmp, given)]  # a later --out wins
    before_files = _files(tmp)
    inputs = {path: _sha256(path) for path in [*before_files, *shared_inputs]}
    zenml_runs = _zenml_runs()
    mlflow_records = _mlflow_records() if tracked else None
    capfd.readouterr()

    code = run.main(argv)

    _assert_one_error_line(code, capfd.readouterr(), case.words)
    assert {path: _sha256(path) for path in inputs} == inputs  # inputs are never modified
    written = {path.relative_to(tmp) for path in _files(tmp) - before_files}
    assert written <= {Path("out") / name for name in case.may_write}, written
    assert not [path for path in tmp.rglob(".*")], "temporary files left behind"
    if case.in_step:
        assert _zenml_runs() == zenml_runs + 1 and _latest_zenml_status() == "failed"
    else:
        assert _zenml_runs() == zenml_runs  # refused before ZenML created a run
    if tracked:
        assert _mlflow_records() == mlflow_records  # no MLflow run, no registered model version


def _params(table: dict[str, Case]) -> list:
    return [
        pytest.param(case, marks=pytest.mark.slow, id=case) if table[case].in_step else case for case in table
    ]


# --- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params(PREPARE))
def test_prepare_refuses_bad_input_in_one_line(case, tmp_path, atlas_files, capfd):
    atlas = [atlas_files.counts_h5ad, atlas_files.cell_metadata_csv]
    _refuse_through_run_py(
        PREPARE[case], ["--pipeline", "prepare"], atlas_files, atlas, tmp_path, capfd, tracked=False
    )


@pytest.mark.parametrize("case", _params(PRETRAIN))
def test_pretrain_refuses_bad_input_in_one_line(case, tmp_path, atlas_files, capfd):
    _refuse_through_run_py(
        PRETRAIN[case], ["--pipeline", "pretrain"], atlas_files, [], tmp_path, capfd, tracked=True
    )


def _tiny_model(cells: ad.AnnData, out_dir: Path) -> Path:
    """A one-epoch, one-layer encoder pre-trained on ``cells``: its best checkpoint directory."""
    model = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_dim=32)
    train = TrainConfig(
        epochs=1, batch_size=64, warmup_steps=0, device="cpu", progress=False, count_head_epochs=2
    )
    return pretrain(cells, model_config=model, train_config=train, out_dir=out_dir).model_dir


@pytest.fixture(scope="module")
def evaluation_inputs(tmp_path_factory) -> SimpleNamespace:
    """``cells.h5ad`` (240 synthetic cells × 80 genes; ``obs['subtype']`` cluster_2523/cluster_210 as the
    default label mapping expects, ``obs['tissue']`` one value), a tiny model pre-trained on it, and one
    pre-trained on the same cells under other gene names. Read-only!"""
    root = tmp_path_factory.mktemp("bad_evaluate_inputs")
    cells = make_synthetic_counts(n_cells=240, n_genes=80, seed=5)
    excitatory = (cells.obs["class"] == "excitatory").to_numpy()
    cells.obs[keys.SUBTYPE] = np.where(excitatory, "cluster_2523", "cluster_210")
    cells.obs["tissue"] = "cortex"
    cells.write_h5ad(root / "cells.h5ad")
    renamed = cells.copy()
    renamed.var_names = [f"other_{gene}" for gene in cells.var_names]
    return SimpleNamespace(
        data=root / "cells.h5ad",
        model=_tiny_model(cells, root / "pretrain"),
        other_genes_model=_tiny_model(renamed, root / "pretrain_other_genes"),
    )


def _evaluate_argv(given: SimpleNamespace) -> list[str]:
    return ["--pipeline", "evaluate", "--data", str(given.data), "--model", str(given.model)]


def _shared_evaluation_files(given: SimpleNamespace) -> list[Path]:
    return [given.data, *_files(given.model), *_files(given.other_genes_model)]


@pytest.mark.parametrize("case", _params(EVALUATE))
def test_evaluate_refuses_bad_input_in_one_line(case, tmp_path, evaluation_inputs, capfd):
    given = evaluation_inputs
    _refuse_through_run_py(
        EVALUATE[case],
        _evaluate_argv(given),
        given,
        _shared_evaluation_files(given),
        tmp_path,
        capfd,
        tracked=True,
    )


def test_the_evaluate_cases_start_from_valid_inputs(evaluation_inputs, tmp_path):
    """Without the case's change the inputs pass every check made before ZenML starts."""
    args = run.build_parser().parse_args([*_evaluate_argv(evaluation_inputs), "--out", str(tmp_path / "out")])
    config = run.load_run_config(args)
    inputs = runs.resolve_inputs(config)
    runs.check_labels_early(config, inputs)
    runs.check_model_early(config, inputs)


@pytest.mark.parametrize("case", list(CONSOLE))
def test_console_command_refuses_bad_input_in_one_line(case, tmp_path, atlas_files, capfd):
    shared = [atlas_files.counts_h5ad, atlas_files.cell_metadata_csv, atlas_files.cluster_csv]
    argv = CONSOLE[case].build(tmp_path, atlas_files)
    before_files = _files(tmp_path)
    inputs = {path: _sha256(path) for path in [*before_files, *shared]}
    capfd.readouterr()

    code = cli.main(argv)

    _assert_one_error_line(code, capfd.readouterr(), CONSOLE[case].words)
    assert {path: _sha256(path) for path in inputs} == inputs
    assert _files(tmp_path) == before_files  # nothing written


@pytest.mark.slow
def test_a_real_run_py_process_exits_2_with_one_line(tmp_path):
    """``python run.py`` itself: a step refuses negative counts; stderr is the one error line."""
    data = _tiny_counts(tmp_path / "negative.h5ad", _set_negative)
    argv = ["--pipeline", "prepare", "--data", str(data), "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "run.py", *argv], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(ERROR_PREFIX) and "negative" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out" / "prepared.h5ad").exists()


def test_debug_shows_the_traceback(tmp_path):
    from neurofm.errors import NeurofmError

    with pytest.raises(NeurofmError, match="does not exist"):
        run.main(["--pipeline", "prepare", "--debug", "--data", str(tmp_path / "missing.h5ad")])
