"""What a newcomer meets first: the evaluate pipeline on data named by gene symbols, the same figures on
a re-run of the same model, and the run's model under one name.

One tiny model is pre-trained per module on synthetic cells named by Ensembl IDs with ``var['gene_symbol']``
(as the shared cortex file is); every test evaluates it through ``run.main`` on small synthetic files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run
from neurofm import keys
from neurofm.data.synthetic import make_synthetic_counts
from neurofm.model import ModelConfig, load_pretrained
from neurofm.train import TrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
CHEAP = [  # every baseline, scVI capped so that the test stays short (named scvi_capped in the figures)
    "--set", "evaluate.baselines=[pca,scvi,random]",
    "--set", "evaluate.scvi_max_epochs=5",
    "--set", "evaluate.label_efficiency_draws=3",
    "--set", "evaluate.label_efficiency_shots=[5,all]",
]  # fmt: skip


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """``ids.h5ad`` (Ensembl IDs, ``var['gene_symbol']``), ``symbols.h5ad`` (the same cells named by
    mouse-style symbols, no ID column) and a tiny model pre-trained on the first."""
    root = tmp_path_factory.mktemp("first_run")
    cells = make_synthetic_counts(n_cells=360, n_genes=120, seed=11)
    cells.obs["label"] = cells.obs["class"].astype(str)
    cells.write_h5ad(root / "ids.h5ad")
    symbols = cells.copy()
    symbols.var_names = [name.capitalize() for name in cells.var[keys.GENE_SYMBOL]]
    symbols.var = symbols.var.drop(columns=[keys.GENE_SYMBOL])
    symbols.write_h5ad(root / "symbols.h5ad")
    model = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_dim=32)
    train = TrainConfig(epochs=1, batch_size=64, warmup_steps=0, progress=False, count_head_epochs=3)
    result = pretrain(cells, model_config=model, train_config=train, out_dir=root / "pretrain")
    return {"root": root, "run_dir": root / "pretrain", "model": result.model_dir}


def _evaluate(given, data: str, out: Path, *extra: str) -> list[str]:
    return [
        "--pipeline", "evaluate", "--data", str(given["root"] / data), "--model", str(given["model"]),
        "--label-col", "label", "--out", str(out), "--no-cache", *CHEAP, *extra,
    ]  # fmt: skip


def test_the_run_model_is_model_dir_and_loads_from_the_run_directory(given):
    assert given["model"] == given["run_dir"] / "model"
    by_run, _ = load_pretrained(given["run_dir"])  # the run's output directory finds its model
    by_dir, _ = load_pretrained(given["model"])
    for name, tensor in by_dir.state_dict().items():
        assert tensor.equal(by_run.state_dict()[name]), name
    assert (given["run_dir"] / "best").is_dir() and (given["run_dir"] / "last").is_dir()


@pytest.mark.slow
def test_zero_shot_evaluation_matches_a_symbol_named_file_by_symbol(given, tmp_path, capsys):
    out = tmp_path / "symbols"
    assert run.main(_evaluate(given, "symbols.h5ad", out, "--set", "evaluate.baselines=[pca]")) == 0
    captured = capsys.readouterr()
    assert "neurofm: error" not in captured.err
    report = (out / "evaluation" / "report.md").read_text()
    assert "120 of the model's 120 genes found" in report  # matched case-insensitively by gene_symbol
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["model/probe_f1"] > 0.5


@pytest.mark.slow
def test_two_evaluations_of_one_model_write_the_same_summary(given, tmp_path):
    """One in this process, one in a fresh interpreter with another hash seed: every float equal."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run.main(_evaluate(given, "ids.h5ad", first)) == 0
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    process = subprocess.run(
        [sys.executable, "run.py", *_evaluate(given, "ids.h5ad", second)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-2000:]
    one = json.loads((first / "evaluation" / "summary.json").read_text())
    two = json.loads((second / "evaluation" / "summary.json").read_text())
    assert one.keys() == two.keys()
    assert "scvi_capped/probe_f1" in one and "scvi/probe_f1" not in one  # a capped scVI says so
    assert "capped at 5 epochs" in (first / "evaluation" / "report.md").read_text()
    differing = {key: (one[key], two[key]) for key in one if one[key] != two[key]}
    assert not differing, differing
    embeddings = [np.load(out / "evaluation" / "embeddings.npy") for out in (first, second)]
    np.testing.assert_array_equal(*embeddings)
