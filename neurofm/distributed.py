"""Data-parallel pre-training with PyTorch DistributedDataParallel, launched by ``torchrun``.

``neurofm.train.pretrain`` is the one training loop. Under ``torchrun`` it finds the process group
(``current()``) and becomes data-parallel without other changes:

- each rank streams its own cells: the cell store's blocks are split between the ranks
  (``neurofm.stream.CellStream``: rank ``r`` of ``W`` reads blocks ``r::W`` of each epoch's block
  order), each rank draws ``batch_size`` cells per step (the global batch is ``W × batch_size``) with gene
  samples and masks seeded by (seed, step, rank), and every rank steps ``CellStream.common_batches``
  times per epoch (the fewest any rank gets; the few extra batches a rank may have are skipped). This
  replaced the older "every rank draws the same global batch" scheme, which needed every cell on every
  rank: a W-process run is therefore no longer numerically the single-process run (it sees each cell
  once per epoch in different batches, with W× the batch) — the tests check that it learns as well;
- each rank's loss is the mean over its own batch; DDP averages the gradients over the ranks;
- validation batches are split between ranks and the sums are all-reduced;
- rank 0 alone writes checkpoints, the resume state, the metrics and the final outputs, and calls
  ``on_validation`` (MLflow logging, Optuna pruning) with each validation's step.

Two ways to run it:

- ``launch_pretrain(...)`` (what the pretrain step calls when ``train.nproc_per_node > 1``) converts an
  AnnData to a cell store in a work directory (a store is used in place) and writes the tokenizer there, starts ``python -m torch.distributed.run --standalone
  --nproc_per_node N -m neurofm.distributed JOB.json``, forwards each validation's metrics to
  ``on_validation`` as rank 0 writes them, and returns the same :class:`~neurofm.train.TrainResult`
  as ``pretrain`` — one MLflow run and one registered version, made by the calling process;
- by hand on a multi-GPU or multi-node machine::

      torchrun --nproc_per_node 4 -m neurofm.distributed job.json

  where ``job.json`` is written by ``write_job`` (data path, tokenizer dir, configs, out dir).

The backend is NCCL on CUDA and gloo on CPU (``train.dist_backend: auto``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from neurofm.errors import NeurofmError
from neurofm.runtime import backend_for, current

log = logging.getLogger(__name__)

JOB_FILE, RESULT_FILE, LOG_FILE = "job.json", "result.json", "torchrun.log"
WORK_DIR = ".distributed"  # under the training out_dir; holds the job, data copy and launcher log


# ---------------------------------------------------------------------------------------------- launcher
def write_job(
    work_dir: Path,
    data_path: Path,
    tokenizer_dir: Path,
    model_config: dict,
    train_config: dict,
    out_dir: Path,
    resume: bool,
) -> Path:
    """The JSON a worker reads: where the data, tokenizer and outputs are, and the settings."""
    from neurofm.io import write_json

    job = {
        "data": str(data_path),
        "tokenizer": str(tokenizer_dir),
        "model": model_config,
        "train": train_config,
        "out_dir": str(out_dir),
        "resume": resume,
    }
    return write_json(job, work_dir / JOB_FILE)


def launch_pretrain(
    data,
    tokenizer,
    model_config,
    train_config,
    out_dir: str | os.PathLike,
    on_validation: Callable[[int, dict], None] | None = None,
    resume: bool = False,
    *,
    tokenizer_config=None,
):
    """``neurofm.train.pretrain`` in ``train_config.nproc_per_node`` processes under torchrun (called
    directly, in this process, when that is 1).

    ``data``: an AnnData, a :class:`~neurofm.data.store.CellStore` or a store directory (see ``pretrain``).
    Returns the rank-0 :class:`~neurofm.train.TrainResult`. ``on_validation`` runs here, in the calling
    process, as ``on_validation(step, metrics)`` once per validation as rank 0 writes it.
    ``tokenizer=None`` fits one from ``tokenizer_config`` on the training rows, as ``pretrain`` does.
    An exception the callback raises (e.g. an Optuna prune) stops
    the workers and propagates. A failed worker raises NeurofmError naming the launcher log.
    """
    from neurofm.checkpoints import METRICS_FILE, read_metrics_csv
    from neurofm.io import ensure_writable_dir
    from neurofm.train import pretrain
    from neurofm.training_data import fit_training_tokenizer

    train_config = train_config.validate()
    if train_config.nproc_per_node == 1:
        return pretrain(
            data,
            tokenizer_config,
            tokenizer=tokenizer,
            model_config=model_config,
            train_config=train_config,
            out_dir=out_dir,
            on_validation=on_validation,
            resume=resume,
        )
    out_dir = ensure_writable_dir(out_dir)
    work_dir = _fresh_work_dir(out_dir)
    store, converted = _job_store(data, work_dir)
    if tokenizer is None:
        tokenizer = fit_training_tokenizer(store, tokenizer_config, train_config)
    tokenizer_dir = tokenizer.save(work_dir / "tokenizer")
    job = write_job(
        work_dir, store.path, tokenizer_dir, asdict(model_config), asdict(train_config), out_dir, resume
    )
    nproc = train_config.nproc_per_node
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "neurofm.distributed", str(job),
    ]  # fmt: skip
    env = _worker_env(train_config.num_threads, nproc)
    log.info("launching %d training processes: %s", nproc, " ".join(command))
    seen = len(read_metrics_csv(out_dir / METRICS_FILE)) if resume else 0
    try:
        returncode = _run_workers(
            command, env, work_dir / LOG_FILE, out_dir / METRICS_FILE, seen, on_validation
        )
    finally:
        if converted is not None:  # a copy of the input; the job and log stay for the record
            shutil.rmtree(converted, ignore_errors=True)
    return _read_result(work_dir, out_dir, returncode)


def _fresh_work_dir(out_dir: Path) -> Path:
    """``out_dir/.distributed``, created, without the result and launcher log of an earlier launch."""
    work_dir = out_dir / WORK_DIR
    work_dir.mkdir(exist_ok=True)
    for stale in (work_dir / RESULT_FILE, work_dir / LOG_FILE):
        stale.unlink(missing_ok=True)
    return work_dir


def _job_store(data, work_dir: Path):
    """``(cell store, converted copy or None)``: a store or store directory is used in place; an AnnData
    is converted once into ``work_dir/cells`` (the copy the caller removes), read by every rank."""
    from neurofm.data.store import CellStore
    from neurofm.training_data import store_from_anndata

    if isinstance(data, CellStore):
        return data, None
    if isinstance(data, (str, os.PathLike)):
        return CellStore(data), None
    converted = work_dir / "cells"
    shutil.rmtree(converted, ignore_errors=True)
    return store_from_anndata(data, converted), converted


def _worker_env(num_threads: int | None, nproc: int) -> dict[str, str]:
    """The workers' environment: this one, with the cores shared out between the ``nproc`` processes
    (``OMP_NUM_THREADS``: ``num_threads``, else cores // nproc) and this very neurofm on the path."""
    env = dict(os.environ)
    threads = num_threads or max(1, (os.cpu_count() or 1) // nproc)
    env["OMP_NUM_THREADS"] = str(threads)  # the cores shared out, not oversubscribed
    root = str(Path(__file__).resolve().parent.parent)  # the workers import this very neurofm
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _run_workers(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    metrics_path: Path,
    seen: int,
    on_validation: Callable[[int, dict], None] | None,
) -> int:
    """Run ``command`` (output to ``log_path``) until it exits and return its exit code; meanwhile call
    ``on_validation(step, row)`` for each row rank 0 adds to ``metrics_path`` after the first ``seen``.
    Any exception (the callback's included) terminates the workers (killed after 30 s) and propagates."""
    from neurofm.checkpoints import read_metrics_csv

    with open(log_path, "w") as log_handle:
        process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                finished = process.poll() is not None
                rows = read_metrics_csv(metrics_path)
                for row in rows[seen:]:
                    if on_validation is not None:
                        on_validation(int(row["step"]), row)
                seen = max(seen, len(rows))
                if finished:
                    return process.returncode
                time.sleep(0.5)
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise


def _read_result(work_dir: Path, out_dir: Path, returncode: int):
    """The rank-0 :class:`~neurofm.train.TrainResult` from ``result.json`` and the metrics file; raises
    NeurofmError naming the launcher log's telling line when the workers failed."""
    from neurofm.checkpoints import METRICS_FILE, read_metrics_csv
    from neurofm.train import TrainResult

    result_path = work_dir / RESULT_FILE
    if returncode != 0 or not result_path.is_file():
        raise NeurofmError(
            f"distributed training failed (exit {returncode}): {_last_error(work_dir / LOG_FILE)}; "
            f"see {work_dir / LOG_FILE}"
        )
    saved = json.loads(result_path.read_text())
    return TrainResult(
        metrics=read_metrics_csv(out_dir / METRICS_FILE),
        model_dir=Path(saved["model_dir"]),
        best_dir=Path(saved["best_dir"]),
        last_dir=Path(saved["last_dir"]),
        baseline_perplexity=saved["baseline_perplexity"],
        baseline_masked_accuracy=saved["baseline_masked_accuracy"],
        artifacts={name: Path(path) for name, path in saved["artifacts"].items()},
        demo=saved["demo"],
        wall_time_s=saved["wall_time_s"],
        count_head=saved.get("count_head"),
    )


def _last_error(log_path: Path) -> str:
    """The most telling line of a worker log: a neurofm error if there is one, else the last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "NeurofmError:" in line:
            return line.split("NeurofmError:", 1)[1].strip()
    return lines[-1][:200] if lines else "no output"


# ---------------------------------------------------------------------------------------------- worker
def _worker(job_path: str) -> None:
    from neurofm.data.store import CellStore
    from neurofm.io import write_json
    from neurofm.model import ModelConfig
    from neurofm.tokenizer import ExpressionTokenizer
    from neurofm.train import pretrain
    from neurofm.train_config import TrainConfig

    job = json.loads(Path(job_path).read_text())
    train_config = TrainConfig(**job["train"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = backend_for(train_config.dist_backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    try:
        context = current()
        logging.basicConfig(
            level=logging.INFO if context.is_main else logging.WARNING,
            format=f"[rank {context.rank}] %(levelname)s %(name)s: %(message)s",
        )
        result = pretrain(
            CellStore(job["data"]),
            tokenizer=ExpressionTokenizer.load(job["tokenizer"]),
            model_config=ModelConfig(**job["model"]),
            train_config=TrainConfig(**{**job["train"], "progress": False}),
            out_dir=job["out_dir"],
            resume=job["resume"],
        )
        if context.is_main:
            saved = {
                "model_dir": str(result.model_dir),
                "best_dir": str(result.best_dir),
                "last_dir": str(result.last_dir),
                "baseline_perplexity": result.baseline_perplexity,
                "baseline_masked_accuracy": result.baseline_masked_accuracy,
                "artifacts": {name: str(path) for name, path in result.artifacts.items()},
                "demo": result.demo,
                "wall_time_s": result.wall_time_s,
                "count_head": result.count_head,
                "world_size": context.world_size,
            }
            write_json(saved, Path(job_path).parent / RESULT_FILE)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="torchrun ... -m neurofm.distributed", description="one data-parallel pre-training worker"
    )
    parser.add_argument("job", help="job JSON written by neurofm.distributed.write_job")
    _worker(parser.parse_args(argv).job)


if __name__ == "__main__":
    main()
