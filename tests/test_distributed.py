"""Data-parallel pre-training: two gloo CPU processes under torchrun, launched by the pretrain step.

The integration test runs ``python run.py --pipeline pretrain --set train.nproc_per_node=2`` on the
shared real data and checks that it trains, that one checkpoint pair, one MLflow run (with every
epoch's metrics) and one registered version appear, and that the validation loss equals a
single-process run of the same global batch: every rank draws the same batch, masks and gene samples,
so the two differ only by floating-point summation order (tolerance: 1e-5 relative).
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

import run
from neurofm import tracking
from neurofm.distributed import DistContext, all_reduce_sums, shard
from neurofm.io import read_h5ad
from neurofm.model import ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from neurofm.train import TrainConfig, pretrain
from tests.conftest import REAL_SUBSET

TOLERANCE = 1e-5  # relative, on each epoch's validation loss
TINY = {
    "train.epochs": 2,
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
def test_two_gloo_processes_train_like_one_process(tmp_path):
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
    assert weights == ["pretrain/best/model.safetensors", "pretrain/last/model.safetensors"], weights
    assert n_runs() == runs_before + 1
    assert n_versions() == versions_before + 1
    newest = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"], max_results=1
    )[0]
    history = client.get_metric_history(newest.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert newest.data.params["train.nproc_per_node"] == "2"

    # the same global batches in one process: the same validation loss
    single = pretrain(
        read_h5ad(out / "prepared.h5ad"),
        tokenizer=ExpressionTokenizer.load(out / "tokenizer"),
        model_config=ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64),
        train_config=TrainConfig(
            epochs=2, batch_size=30, max_tokens_per_cell=64, val_draws=1, warmup_steps=5, progress=False
        ),
        out_dir=tmp_path / "single",
    )
    distributed_rows = {int(m.step): m.value for m in history}
    for row in single.metrics:
        assert row["val_loss"] == pytest.approx(distributed_rows[row["epoch"]], rel=TOLERANCE)
    assert single.metrics[-1]["val_loss"] < single.metrics[0]["baseline_perplexity"]  # it trains
    assert single.metrics[-1]["perplexity_ratio"] < 1.0


def test_launcher_reports_a_failed_worker_in_one_line(tmp_path, synthetic_adata):
    from neurofm.distributed import LOG_FILE, WORK_DIR, launch_pretrain
    from neurofm.errors import NeurofmError
    from neurofm.tokenizer import TokenizerConfig
    from neurofm.train import split_cells

    config = TrainConfig(epochs=1, batch_size=30, max_tokens_per_cell=32, progress=False, nproc_per_node=2)
    train_idx, _ = split_cells(synthetic_adata.n_obs, config.val_fraction, config.seed)
    tokenizer = ExpressionTokenizer(TokenizerConfig()).fit(synthetic_adata, train_idx)
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
    assert not (tmp_path / "run" / WORK_DIR / "data.h5ad").exists()  # the input copy is removed
    assert not list((tmp_path / "run").glob("*/model.safetensors"))
