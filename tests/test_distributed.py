"""Data-parallel pre-training: two gloo CPU processes under torchrun, launched by the pretrain step.

The integration test runs ``python run.py --pipeline pretrain --set train.nproc_per_node=2`` on the
shared real data and checks that it trains, that one checkpoint pair, one MLflow run (with every
validation's metrics, by step) and one registered version appear. Each rank streams its own cells (the
store's blocks are split between the ranks), so two processes no longer reproduce one process
numerically (they take half the steps per epoch, each over twice the cells); instead both must beat the
frequency baseline and reach the same validation loss within ``TOLERANCE`` (measured: see the test).
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

import run
from neurofm import tracking
from neurofm.data.store import CellStore
from neurofm.model import ModelConfig
from neurofm.runtime import DistContext, all_reduce_sums, shard
from neurofm.tokenizer import ExpressionTokenizer
from neurofm.train import TrainConfig, pretrain
from tests.conftest import REAL_SUBSET

# relative, on the final validation loss; measured on the cortex data: 1 process 1.7125, 2 processes 1.7129
TOLERANCE = 0.01
TINY = {
    "train.epochs": 2,
    "train.count_head_epochs": 3,  # the count head's own phase runs under DDP too (gradients averaged)
    "train.batch_size": 30,
    "train.max_tokens_per_cell": 64,
    "train.val_draws": 1,
    "train.warmup_steps": 5,
    "model.d_model": 32,
    "model.n_heads": 2,
    "model.n_layers": 1,
    "model.ffn_dim": 64,
    "evaluate.label_efficiency_draws": 2,
}


@pytest.mark.parametrize("n_rows", [0, 1, 2, 7, 30, 31])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_row_once_with_sizes_within_one(n_rows, world_size):
    parts = [shard(n_rows, DistContext(rank, world_size)) for rank in range(world_size)]
    rows = [row for part in parts for row in range(n_rows)[part]]
    assert rows == list(range(n_rows))
    sizes = [len(range(n_rows)[part]) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_one_process_reduces_to_its_own_values():
    assert all_reduce_sums([1.5, 2.0], DistContext()) == [1.5, 2.0]


def test_nproc_and_backend_are_validated():
    from neurofm.errors import NeurofmError

    with pytest.raises(NeurofmError, match="nproc_per_node"):
        TrainConfig(nproc_per_node=0).validate()
    with pytest.raises(NeurofmError, match="dist_backend"):
        TrainConfig(dist_backend="mpi").validate()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not REAL_SUBSET.exists(), reason=f"{REAL_SUBSET} is not present")
def test_two_gloo_processes_learn_as_well_as_one_process(tmp_path):
    tracking.configure()
    client = MlflowClient()
    model_name = "neurofm-encoder"

    def n_runs() -> int:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return len(client.search_runs(experiments, max_results=10_000)) if experiments else 0

    def n_versions() -> int:
        return len(client.search_model_versions(f"name='{model_name}'"))

    runs_before, versions_before = n_runs(), n_versions()
    out = tmp_path / "out"
    settings = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    argv = ["--pipeline", "pretrain", "--data", str(REAL_SUBSET), "--out", str(out), "--no-cache"]
    assert run.main([*argv, *settings, "--set", "train.nproc_per_node=2"]) == 0

    # one checkpoint pair, one MLflow run with every epoch, one registered version
    weights = sorted(p.relative_to(out).as_posix() for p in out.rglob("model.safetensors"))
    expected = [
        "pretrain/best/model.safetensors",
        "pretrain/last/model.safetensors",
        "pretrain/model/model.safetensors",
    ]
    assert weights == expected, weights  # model/: the best checkpoint with its count head fit after
    assert n_runs() == runs_before + 1
    assert n_versions() == versions_before + 1
    newest = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"], max_results=1
    )[0]
    history = sorted(client.get_metric_history(newest.info.run_id, "val_loss"), key=lambda m: m.step)
    assert len(history) == 2 and 0 < history[0].step < history[1].step  # one per epoch, by step
    assert newest.data.params["train.nproc_per_node"] == "2"
    baseline = client.get_metric_history(newest.info.run_id, "perplexity_ratio")
    assert max(baseline, key=lambda m: m.step).value < 1.0  # two processes beat the frequency table
    # the count head's own phase ran in both processes, gradients averaged, and lowered its loss
    metrics = newest.data.metrics
    assert metrics["count_head_epochs"] == 3 and metrics["count_head_steps"] > 0
    assert metrics["count_head_val_count_loss_after"] < metrics["count_head_val_count_loss_before"]

    # one process on the same store (the .h5ad was converted once, no prepared AnnData on this path)
    (store_dir,) = (out / "stores").iterdir()
    single = pretrain(
        CellStore(store_dir),
        tokenizer=ExpressionTokenizer.load(out / "tokenizer"),
        model_config=ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64),
        train_config=TrainConfig(
            epochs=2,
            batch_size=30,
            max_tokens_per_cell=64,
            val_draws=1,
            warmup_steps=5,
            progress=False,
            count_head_epochs=3,
        ),
        out_dir=tmp_path / "single",
    )
    # one process: twice the steps per epoch (half the batch): the same cells, the same validation rows
    assert single.metrics[-1]["step"] > history[-1].step
    difference = abs(single.metrics[-1]["val_loss"] - history[-1].value) / single.metrics[-1]["val_loss"]
    print(f"final val loss: 1 process {single.metrics[-1]['val_loss']:.4f}, 2 processes "
          f"{history[-1].value:.4f}; relative difference {difference:.4f}")  # fmt: skip
    assert difference < TOLERANCE
    assert single.metrics[-1]["perplexity_ratio"] < 1.0


def test_launcher_reports_a_failed_worker_in_one_line(tmp_path, synthetic_adata):
    from neurofm.distributed import LOG_FILE, WORK_DIR, launch_pretrain
    from neurofm.errors import NeurofmError
    from neurofm.tokenizer import TokenizerConfig

    config = TrainConfig(
        epochs=1, batch_size=30, max_tokens_per_cell=32, progress=False, nproc_per_node=2, count_head_epochs=2
    )
    tokenizer = ExpressionTokenizer(TokenizerConfig()).fit(synthetic_adata)
    # resume with nothing to resume: the workers fail with a neurofm error, the launcher names it
    with pytest.raises(NeurofmError, match="distributed training failed .*nothing to resume") as error:
        launch_pretrain(
            synthetic_adata,
            tokenizer,
            ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_dim=32),
            config,
            tmp_path / "run",
            resume=True,
        )
    assert "\n" not in str(error.value)
    assert (tmp_path / "run" / WORK_DIR / LOG_FILE).is_file()
    assert not (tmp_path / "run" / WORK_DIR / "cells").exists()  # the input's store copy is removed
    assert not list((tmp_path / "run").glob("*/model.safetensors"))
