"""What a training run writes and reads back: checkpoints (``best/``, ``last/``), the resume state,
``metrics.csv`` and the final outputs (``curves.png``, ``demo.txt``, ``summary.json``).

``resume_state.pt`` holds the weights, optimizer, step, the loader's position (epoch, batches consumed),
the metrics so far and the training settings — tensors and plain containers only, read back with
``torch.load(weights_only=True)``. Every file is written atomically.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, write_json, write_text
from neurofm.model import RUN_MODEL_DIRS, GeneEncoder, ModelConfig
from neurofm.tokenizer import ExpressionTokenizer

log = logging.getLogger(__name__)

# the pre-training checkpoints: the lowest validation loss so far, and the latest validation
BEST_DIR, LAST_DIR = "best", "last"
# the model the run produces — registered, evaluated, promoted: the best checkpoint with its count head fit
# afterwards (neurofm.count_phase), or the best checkpoint itself when there is no such phase
MODEL_DIR = RUN_MODEL_DIRS[0]  # "model" ("final" in older runs; load_pretrained finds both)
RESUME_FILE = "resume_state.pt"
METRICS_FILE, CURVES_FILE, DEMO_FILE = "metrics.csv", "curves.png", "demo.txt"


METRIC_COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_cell_loss",
    "val_loss",
    "val_cell_loss",
    "val_count_loss",
    "val_total_loss",
    "val_perplexity",
    "val_masked_accuracy",
    "baseline_perplexity",
    "perplexity_ratio",
    "lr",
    "epoch_time_s",
    "data_wait_s",  # the part of epoch_time_s spent waiting for the loader
)


# ---------------------------------------------------------------------------------------------- outputs
def write_checkpoint(
    out_dir: Path,
    model: GeneEncoder,
    tokenizer: ExpressionTokenizer,
    optimizer: torch.optim.Optimizer,
    state: dict,
    is_best: bool,
    config: Any,  # the run's neurofm.train.TrainConfig
) -> None:
    """Checkpoints, resume state and the metrics CSV after one validation. DDP: call on rank 0 only."""
    model.save_pretrained(out_dir / LAST_DIR, tokenizer)
    if is_best:
        model.save_pretrained(out_dir / BEST_DIR, tokenizer)
    resume_state = {
        "step": state["step"],
        "best_val_loss": state["best_val_loss"],
        "metrics": [dict(row) for row in state["metrics"]],
        "optimizer": optimizer.state_dict(),
        # the weights too, so the resume state is one self-consistent file: a crash between writing
        # last/ and this file can never pair step-k weights with a step-(k-1) optimizer
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        # the loader's position (rank 0's; every rank has consumed as many batches of the epoch)
        "loader": dict(state["loader"]),
        "train_config": asdict(config),
    }
    with atomic_path(out_dir / RESUME_FILE) as tmp:
        torch.save(resume_state, tmp)
    write_metrics_csv(out_dir / METRICS_FILE, state["metrics"])


# settings a resumed run may change: they do not change which batches or updates it makes
RESUMABLE_CHANGES = ("epochs", "max_steps", "progress", "num_threads", "device", "nproc_per_node",
                     "dist_backend", "pin_memory")  # fmt: skip


def load_resume_state(
    out_dir: Path,
    model: GeneEncoder,
    optimizer: torch.optim.Optimizer,
    model_config: ModelConfig,
    tokenizer: ExpressionTokenizer,
    config: Any,  # the run's neurofm.train.TrainConfig
) -> dict:
    from neurofm.model import load_pretrained

    path = out_dir / RESUME_FILE
    if not path.is_file() or not (out_dir / LAST_DIR).is_dir():
        raise NeurofmError(
            f"nothing to resume in {out_dir} (no {RESUME_FILE} or {LAST_DIR}/); run without resume"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt/unsafe files
        raise NeurofmError(
            f"{path} is not a readable resume state ({type(error).__name__}); start a fresh run"
        ) from None
    if "loader" not in saved:
        raise NeurofmError(
            f"{path} was written by an older neurofm (no loader position); start a fresh out_dir"
        )
    changed = {
        k
        for k, v in saved["train_config"].items()
        if k not in RESUMABLE_CHANGES and asdict(config).get(k) != v
    }
    if changed:
        raise NeurofmError(
            f"resume settings differ from the interrupted run ({sorted(changed)}); "
            "resume with the same settings or start a fresh out_dir"
        )
    last_model, last_tokenizer = load_pretrained(out_dir / LAST_DIR)
    if last_model.config != model_config or not np.array_equal(last_tokenizer.bin_edges, tokenizer.bin_edges):
        raise NeurofmError(
            f"the checkpoint in {out_dir / LAST_DIR} was trained with another model config or "
            "data; resume with the same settings and data or start a fresh out_dir"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    log.info("resuming after step %d (epoch %d)", saved["step"], saved["loader"]["epoch"])
    return {
        "step": saved["step"],
        "best_val_loss": saved["best_val_loss"],
        "metrics": list(saved["metrics"]),
        "loader": dict(saved["loader"]),
    }


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(METRIC_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of a ``metrics.csv`` as numbers (``[]`` when there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {key: int(value) if key in ("epoch", "step") else float(value) for key, value in row.items()}
        for row in rows
    ]


def write_final_outputs(out_dir: Path, rows: list[dict], demo: str) -> dict[str, Path]:
    from neurofm.plots import plot_pretrain_curves

    write_metrics_csv(out_dir / METRICS_FILE, rows)
    write_text(demo, out_dir / DEMO_FILE)
    curves = plot_pretrain_curves(rows, out_dir / CURVES_FILE)
    summary = {"best": min(rows, key=lambda row: row["val_total_loss"]), "last": rows[-1]}
    write_json(summary, out_dir / "summary.json")
    return {
        "metrics_csv": out_dir / METRICS_FILE,
        "curves_png": curves,
        "demo_txt": out_dir / DEMO_FILE,
        "summary_json": out_dir / "summary.json",
    }
