"""Masked-bin pre-training: the training loop (the task is ``neurofm.masking``, the run directory
``neurofm.checkpoints``).

``pretrain`` takes raw counts in a cell store (``neurofm.data.store``; an AnnData is converted to a
temporary one first, so small data and an atlas take the same path), streams the training cells with
``neurofm.stream`` (``CellStream``/``StreamLoader``: blocks, shuffle buffers, bins made on the fly) and
writes, under ``out_dir``:

- ``model/`` — the model the run produces (registered, evaluated, loaded by
  ``load_pretrained("…/pretrain")``): the best pre-training checkpoint with its count head fit afterwards
  (``neurofm.count_head``; the checkpoint itself when there is no such phase);
- ``best/`` and ``last/`` — the pre-training checkpoints (model directories: ``model.safetensors`` +
  ``config.json`` + tokenizer), the best by validation objective (``val_total_loss`` = masked-token loss
  + ``cell_loss_weight`` × cell loss) and the newest validation, from which a run resumes;
- ``resume_state.pt`` — weights, optimizer, step, the loader's position (epoch, batches consumed) and
  metrics so far (tensors and plain containers only, read back with ``torch.load(weights_only=True)``);
  gene samples, masks and dropout are seeded per (seed, step, rank), so no RNG state is needed;
- ``metrics.csv``, ``curves.png`` (loss / perplexity / masked accuracy per validation) and ``demo.txt``
  (top-k predicted bins against the truth for one validation cell).

Training runs ``epochs`` epochs or ``max_steps`` steps and validates at each epoch end or every
``val_every_steps`` steps (and at the last step); checkpoints and the resume state are written at each
validation, so a resumed run continues mid-epoch exactly.

Each step samples ``max_tokens_per_cell`` genes per cell (all of them when the cap is larger than the gene
count) and masks ``mask_ratio`` of those tokens, ``nonzero_mask_share`` of the masked ones on non-zero bins
(bin > 0), as the original did — all with tensor ops on the batch. The loss is the masked-token
cross-entropy plus ``cell_loss_weight`` × the cell head's cross-entropy (bins predicted from the pooled
cell vector alone, see ``neurofm.model``; at the masked or at all tokens, ``cell_loss_tokens``).
Validation is the store's fixed validation rows (never trained on) with gene samples and masks drawn
once, so the per-gene frequency-table baseline is scored on exactly the same positions every time; that
table counts the training rows' bins streamed once (all of them, or a seeded sample of
``BASELINE_MAX_CELLS`` = 200,000 when there are more), sparsely with ``np.bincount``.

The same loop runs data-parallel under ``torchrun`` (see ``neurofm.distributed``): each rank streams its
own blocks of the store (``CellStream`` splits them by rank) and every rank steps
``CellStream.common_batches`` times per epoch; DDP averages the gradients; validation sums are
all-reduced; rank 0 alone writes outputs and calls ``on_epoch_end``. ``nproc_per_node > 1`` makes the
pretrain step launch it.

Run on the shared data::

    python -c "from neurofm.io import read_h5ad; from neurofm.train import *; \\
        pretrain(read_h5ad('../shared/data/subset_2523_210_Cerebral-cortex.screened.h5ad'), \\
        TokenizerConfig(), ModelConfig(), TrainConfig(), 'runs/pretrain')"

or on a store made by ``neurofm convert IN.h5ad STORE``: ``pretrain(CellStore('STORE'), ...)``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neurofm import runtime
from neurofm.checkpoints import (  # noqa: F401  (names of the run directory, re-exported)
    BEST_DIR,
    LAST_DIR,
    METRIC_COLUMNS,
    MODEL_DIR,
    RESUME_FILE,
    load_resume_state,
    read_metrics_csv,
    write_checkpoint,
    write_final_outputs,
)
from neurofm.count_head import HEAD_FILE, fit_count_head, head_epochs, load_head, save_head
from neurofm.data.store import SOURCE_ROW, CellStore, convert_anndata
from neurofm.errors import NeurofmError
from neurofm.io import ensure_writable_dir
from neurofm.masking import (  # noqa: F401  (the masked-bin task, re-exported for callers of train)
    IGNORE_INDEX,
    MaskedBatch,
    baseline_scores,
    frequency_table,
    make_batch,
    mask_tokens,
    sample_genes,
    split_cells,
    stream_frequency_table,
)
from neurofm.model import GeneEncoder, ModelConfig, cell_inputs, feature_table, load_pretrained
from neurofm.runtime import resolve_device  # noqa: F401  (re-exported: callers import it from train)
from neurofm.stream import (
    CellStream,
    StreamConfig,
    StreamLoader,
    densify,
    densify_counts,
    fit_tokenizer,
    validation_rows,
    variable_genes,
)
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """How to train; every field is a plain value so it can live in YAML and be logged."""

    epochs: int = 30  # passes over the training cells (when max_steps is None)
    max_steps: int | None = None  # optimisation steps to run (None: epochs × steps per epoch); it also caps
    #                               the count head's phase at as many of its (far cheaper) steps
    val_every_steps: int | None = None  # validate + checkpoint + resume state every this many steps
    #                                     (None: at each epoch end); always at the last step too
    batch_size: int = 32  # cells per optimisation step
    lr: float = 4e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW weight decay (matrices only, not norms/biases/embeddings)
    warmup_steps: int = 100  # linear warm-up steps before the cosine decay
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    mask_ratio: float = 0.15  # share of each cell's tokens that are masked and scored
    cell_loss_weight: float = 1.0  # weight of the cell-embedding loss (bins predicted from the pooled cell
    #                                vector alone) beside the masked-token loss; 0 trains tokens only
    cell_loss_tokens: str = "all"  # which tokens the cell head predicts: "masked" or "all" real tokens
    count_loss_weight: float = 1.0  # weight of the count head's loss (model.latent_dim > 0): its negative-
    #                                 binomial NLL of every gene's raw count + the latent's KL, per gene
    kl_weight: float = 1.0  # weight of the latent's KL term once warmed up (1: the evidence lower bound)
    kl_warmup: float = 0.5  # share of the steps over which the KL weight rises linearly from 0 to kl_weight
    count_input: str = "all_genes"  # the count head's cell vector: of "all_genes" of the cell (as embedded)
    #                                 or of the "sampled" visible tokens only
    count_head_epochs: int | None = None  # after pre-training, the count head alone is fit to the training
    #                                       cells with the token features frozen (neurofm.count_head) for
    #                                       this many epochs; None: scVI's rule min(round(20000 / n × 400),
    #                                       400), the budget of the scVI baseline; 0: no such phase
    count_head_batch_size: int = 128  # cells per step of that phase (scVI's default)
    count_head_lr: float = 1e-3  # Adam learning rate of that phase (scVI's default)
    count_head_patience: int = 45  # that phase keeps its best epoch by the validation count loss and stops
    #                                after this many epochs without a better one (scVI's patience); 0: it
    #                                runs every epoch and keeps the last
    count_head_kl_warmup: float = 0.0  # share of that phase's steps (its epoch ceiling) over which the KL
    #                                    weight rises from 0 to kl_weight again; 0: the full weight from the
    #                                    first step, as the head ended pre-training (the default since
    #                                    2026-11-29: a second warm-up let early stopping end the phase at
    #                                    epoch 1 on M1); 1: scVI's warm-up over the whole budget
    nonzero_mask_share: float = 0.5  # share of the masked tokens forced onto non-zero bins (when available)
    max_tokens_per_cell: int = 256  # genes sampled per cell per step (padding + key-padding mask if fewer)
    val_fraction: float = 0.2  # share of cells held out for validation…
    max_val_cells: int = 10_000  # …but at most this many (atlas scale)
    val_draws: int = 2  # independent gene samples + masks per validation cell (fixed for the whole run)
    seed: int = 42  # seeds the split, sampling, masking and initial weights
    device: str = "auto"  # "auto" (cuda > mps > cpu), "cpu", "cuda", "cuda:1", "mps"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU/MPS, which stay float32 and deterministic)
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    nproc_per_node: int = 1  # data-parallel processes (>1: the pretrain step launches them with torchrun)
    dist_backend: str = "auto"  # process-group backend: "auto" (nccl on CUDA, else gloo), "gloo", "nccl"
    demo_top_k: int = 3  # predicted bins shown per masked gene in demo.txt
    # the streaming loader (neurofm.stream): the store is read in blocks, shuffled in buffers
    block_size: int = 64  # consecutive store rows read as one piece (the unit of shuffling / rank split)
    buffer_blocks: int = 64  # blocks shuffled together (buffer = block_size × buffer_blocks cells)
    num_workers: int = 0  # DataLoader worker processes reading + binning (0: in the training process)
    pin_memory: bool = False  # pinned host memory for faster copies to CUDA (ignored elsewhere)
    stream_output: str = (
        "dense"  # "dense" bins from the workers, or "sparse" (non-zeros; densified on the device)
    )
    progress: bool = True  # tqdm progress bar

    def validate(self) -> TrainConfig:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (
                self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
                "max_steps must be an integer >= 1 or None",
            ),
            (
                self.val_every_steps is None
                or (isinstance(self.val_every_steps, int) and self.val_every_steps >= 1),
                "val_every_steps must be an integer >= 1 or None",
            ),
            (
                isinstance(self.max_val_cells, int) and self.max_val_cells >= 1,
                "max_val_cells must be an integer >= 1",
            ),
            (isinstance(self.block_size, int) and self.block_size >= 1, "block_size must be an integer >= 1"),
            (
                isinstance(self.buffer_blocks, int) and self.buffer_blocks >= 1,
                "buffer_blocks must be an integer >= 1",
            ),
            (
                isinstance(self.num_workers, int) and self.num_workers >= 0,
                "num_workers must be an integer >= 0",
            ),
            (self.stream_output in ("dense", "sparse"), "stream_output must be 'dense' or 'sparse'"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1"),
            (0 < self.lr <= 1, "lr must be in (0, 1]"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (0 < self.mask_ratio < 1, "mask_ratio must be in (0, 1)"),
            (self.cell_loss_weight >= 0, "cell_loss_weight must be >= 0"),
            (self.count_loss_weight >= 0, "count_loss_weight must be >= 0"),
            (0 <= self.kl_warmup <= 1, "kl_warmup must be in [0, 1]"),
            (self.kl_weight >= 0, "kl_weight must be >= 0"),
            (self.count_input in ("all_genes", "sampled"), "count_input must be 'all_genes' or 'sampled'"),
            (
                self.count_head_epochs is None
                or (isinstance(self.count_head_epochs, int) and self.count_head_epochs >= 0),
                "count_head_epochs must be an integer >= 0 or null (scVI's rule)",
            ),
            (
                isinstance(self.count_head_batch_size, int) and self.count_head_batch_size >= 2,
                "count_head_batch_size must be an integer >= 2",
            ),
            (0 < self.count_head_lr <= 1, "count_head_lr must be in (0, 1]"),
            (
                isinstance(self.count_head_patience, int) and self.count_head_patience >= 0,
                "count_head_patience must be an integer >= 0 (0: no early stopping)",
            ),
            (0 <= self.count_head_kl_warmup <= 1, "count_head_kl_warmup must be in [0, 1]"),
            (self.cell_loss_tokens in ("masked", "all"), "cell_loss_tokens must be 'masked' or 'all'"),
            (0 <= self.nonzero_mask_share <= 1, "nonzero_mask_share must be in [0, 1]"),
            (self.max_tokens_per_cell >= 2, "max_tokens_per_cell must be >= 2"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.val_draws >= 1, "val_draws must be >= 1"),
            (self.num_threads is None or self.num_threads >= 1, "num_threads must be >= 1 or None"),
            (
                isinstance(self.nproc_per_node, int) and self.nproc_per_node >= 1,
                "nproc_per_node must be >= 1",
            ),
            (self.dist_backend in ("auto", "gloo", "nccl"), "dist_backend must be auto, gloo or nccl"),
            (self.demo_top_k >= 1, "demo_top_k must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise NeurofmError(f"invalid train config: {message}; fix the training settings")
        resolve_device(self.device)
        return self


@dataclass
class TrainResult:
    """What ``pretrain`` produced: per-epoch metrics and where the artifacts are."""

    metrics: list[dict]  # one dict per validation (see METRIC_COLUMNS)
    model_dir: Path  # the model the run produces (model/): the pre-training checkpoint with the lowest
    #                  validation objective (val_total_loss) with its count head fit afterwards (count_head)
    best_dir: Path  # that pre-training checkpoint (best/), before the count head's phase
    last_dir: Path  # the pre-training checkpoint of the last validation (last/)
    baseline_perplexity: float  # per-gene frequency table on the fixed validation masks
    baseline_masked_accuracy: float
    artifacts: dict[str, Path] = field(
        default_factory=dict
    )  # metrics_csv, curves_png, demo_txt, resume_state
    demo: str = ""  # the demo text (also in demo.txt)
    wall_time_s: float = 0.0  # time spent training + validating in this call
    count_head: dict | None = None  # the count head's own phase (epochs, steps, seconds, validation count
    #                                 loss before/after); None when there was none

    @property
    def best(self) -> dict:
        return min(self.metrics, key=lambda row: row["val_total_loss"])


# ---------------------------------------------------------------------------------------------- loop
def _lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio`` (nanoGPT's get_lr)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def _make_optimizer(model: GeneEncoder, config: TrainConfig) -> torch.optim.Optimizer:
    # lookup tables are not decayed
    tables = ("gene_embedding", "bin_embedding", "bin_scale", "gene_bin_bias")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith(tables)]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith(tables))]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def _autocast(device: torch.device, config: TrainConfig):
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda"
    )


class _PretrainForward(torch.nn.Module):
    """``GeneEncoder.pretrain_outputs`` as a module's ``forward``, which DistributedDataParallel wraps."""

    def __init__(self, model: GeneEncoder):
        super().__init__()
        self.model = model

    def forward(self, gene_ids, bin_ids, padding_mask=None, counts=None, full_bins=None):
        return self.model.pretrain_outputs(gene_ids, bin_ids, padding_mask, counts, full_bins)


def _losses(model, batch: MaskedBatch, device: torch.device, config: TrainConfig, reduction="mean"):
    """(masked-token loss, cell loss, count NLL, count KL, token logits): cross-entropy of the token head
    at the masked tokens and of the cell head (bins from the pooled cell vector alone) at
    ``batch.cell_labels``; with a count head and ``batch.counts``, its negative-binomial NLL and KL per
    gene (mean or sum over the cells; zeros otherwise). ``model`` is a GeneEncoder or its DDP-wrapped
    ``_PretrainForward``."""
    forward = model.pretrain_outputs if isinstance(model, GeneEncoder) else model
    with _autocast(device, config):
        logits, cell_logits, count_nll, count_kl = forward(
            batch.gene_ids, batch.input_bins, batch.padding_mask, batch.counts, batch.full_bins
        )
    token_loss = F.cross_entropy(
        logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )
    cell_loss = F.cross_entropy(
        cell_logits.float().flatten(0, 1),
        batch.cell_labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    if count_nll is None:
        count_nll = count_kl = torch.zeros((), device=token_loss.device)
    elif reduction == "mean":
        count_nll, count_kl = count_nll.mean(), count_kl.mean()
    else:
        count_nll, count_kl = count_nll.sum(), count_kl.sum()
    return token_loss, cell_loss, count_nll, count_kl, logits


def kl_weight_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The count head's KL weight at ``step``: linear from 0 to ``kl_weight`` over the first ``kl_warmup``
    share of the steps (scVI's warm-up, so the latent learns the profile before it is pulled to the
    prior)."""
    ramp = config.kl_warmup * total_steps
    return config.kl_weight * (1.0 if ramp <= 0 else min(1.0, step / ramp))


@torch.no_grad()
def validation_count_loss(
    model: GeneEncoder, stream: CellStream, device: torch.device, config: TrainConfig, batch_size: int = 256
) -> float:
    """The count head's loss per cell and gene on the validation cells (negative-binomial NLL of every
    gene's raw count from the latent mean + the latent's KL: the negative ELBO per gene), read from the
    store batch by batch (nothing is kept, so memory does not grow with the validation cells). Under
    DDP each rank scores every world_size-th batch and the sums are all-reduced."""
    context = runtime.current()
    model.eval()
    zero_bins = stream.zero_bins.to(device)
    total, n_cells, table = 0.0, 0, None
    for index, part in enumerate(stream.validation_batches(batch_size)):
        if index % context.world_size != context.rank:
            continue
        part = _to_device(part, device)
        bins = densify(part, zero_bins)
        counts = densify_counts(part, bins.shape[1])
        if config.count_input == "all_genes":  # a lookup in the feature table, as at embedding time
            if table is None:
                table = feature_table(model)
            cell, expression = cell_inputs(model, bins, "auto", table)
        else:  # "sampled": the visible tokens of a fixed draw, as in training
            generator = torch.Generator(device=device).manual_seed(config.seed + 2 + index)
            batch = make_batch(bins, config.max_tokens_per_cell, model.config.mask_token, config, generator)
            keep = model.visible(batch.input_bins, batch.padding_mask)
            cell = model.pool(model.cell_features(batch.gene_ids, batch.input_bins), keep)
            expression = model.expression_features(batch.input_bins, batch.gene_ids, keep)
        with _autocast(device, config):
            nll, kl = model.count_loss(cell, counts, expression)
        total += float((nll + kl).sum())
        n_cells += bins.shape[0]
    total, n_cells = runtime.all_reduce_sums([total, n_cells], context)
    return total / max(1, n_cells)


@torch.no_grad()
def score_validation(
    model: GeneEncoder, batches: list[MaskedBatch], device: torch.device, config: TrainConfig
) -> dict:
    """Masked loss (token-weighted mean NLL), perplexity and top-1 accuracy over fixed batches, and the
    cell head's loss (``cell_loss``, token-weighted mean NLL); ``count_loss`` is 0 here (see
    :func:`validation_count_loss`). Under DDP each rank scores its share of the batches and the sums
    are all-reduced, so every rank returns the same metrics."""
    context = runtime.current()
    model.eval()
    total_nll, total_cell_nll, total_correct, total_masked, total_cell = 0.0, 0.0, 0, 0, 0
    for batch in batches[context.rank :: context.world_size]:
        nll, cell_nll, _, _, logits = _losses(model, batch, device, config, reduction="sum")
        scored = batch.labels != IGNORE_INDEX
        total_nll += nll.item()
        total_cell_nll += cell_nll.item()
        total_correct += (logits[scored].float().argmax(-1) == batch.labels[scored]).sum().item()
        total_masked += int(scored.sum())
        total_cell += int((batch.cell_labels != IGNORE_INDEX).sum())
    total_nll, total_cell_nll, total_correct, total_masked, total_cell = runtime.all_reduce_sums(
        [total_nll, total_cell_nll, total_correct, total_masked, total_cell], context
    )
    loss = total_nll / max(1, total_masked)
    return {
        "loss": loss,
        "cell_loss": total_cell_nll / max(1, total_cell),
        "count_loss": 0.0,
        "perplexity": math.exp(loss),
        "masked_accuracy": total_correct / max(1, total_masked),
    }


def stream_config_for(config: TrainConfig, counts: bool = False) -> StreamConfig:
    """The :class:`~neurofm.stream.StreamConfig` a training run reads its store with (``counts``: the
    raw counts too, for a model with a count head)."""
    return StreamConfig(
        batch_size=config.batch_size,
        block_size=config.block_size,
        buffer_blocks=config.buffer_blocks,
        val_fraction=config.val_fraction,
        max_val_cells=config.max_val_cells,
        seed=config.seed,
        output=config.stream_output,
        counts=counts,
    ).validate()


def split_store(store: CellStore, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of ``store``: the stream's fixed seeded validation rows
    (:func:`neurofm.stream.validation_rows`, ``val_fraction`` capped at ``max_val_cells``) and the rest.
    Raises NeurofmError when either side is too small."""
    n_val = min(int(store.n_cells * config.val_fraction), config.max_val_cells)
    if n_val < 1:
        raise NeurofmError(
            f"{store.n_cells} cells are too few for a {config.val_fraction:.0%} validation split (need >= 1 "
            "validation cell); pass more cells or raise val_fraction"
        )
    val_rows = validation_rows(store.n_cells, config.val_fraction, config.seed, config.max_val_cells)
    return np.setdiff1d(np.arange(store.n_cells), val_rows, assume_unique=True), val_rows


def fit_training_tokenizer(
    store: CellStore, tokenizer_config: TokenizerConfig | None, config: TrainConfig
) -> ExpressionTokenizer:
    """The tokenizer ``pretrain`` fits: bin edges on the training rows only (the validation rows of
    :func:`split_store` excluded), a seeded sample of at most 200,000 of them (``fit_tokenizer``)."""
    _, val_rows = split_store(store, config)
    return fit_tokenizer(store, tokenizer_config, exclude_rows=val_rows, seed=config.seed)


def store_from_anndata(adata: ad.AnnData, out_dir: str | os.PathLike) -> CellStore:
    """Small data takes the atlas path: ``adata`` written as a cell store in ``out_dir`` (seed 0, one
    shard), deterministic for the same cells — a resumed run re-creates the same store rows."""
    convert_anndata(adata, out_dir, seed=0)
    return CellStore(out_dir)


def validation_source_rows(adata: ad.AnnData, config: TrainConfig) -> np.ndarray:
    """Positions in ``adata`` of the cells ``pretrain(adata, ...)`` validates on (never trains on), in
    store order (for probes that score held-out cells)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".neurofm-cells-") as scratch:
        store = store_from_anndata(adata, Path(scratch) / "cells")
        _, val_rows = split_store(store, config)
        source = store.read_obs([SOURCE_ROW])[SOURCE_ROW].to_numpy()
        store.close()
    return source[val_rows].astype(np.int64)


def _open_data(data, scratch_parent: Path) -> tuple[CellStore, Callable[[], None]]:
    """A CellStore for ``data`` (AnnData → a temporary store under ``scratch_parent``) and its cleanup."""
    if isinstance(data, CellStore):
        return data, lambda: None
    if isinstance(data, ad.AnnData):
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix=".cells-", dir=scratch_parent))
        store = store_from_anndata(data, scratch / "cells")

        def cleanup() -> None:
            store.close()
            shutil.rmtree(scratch, ignore_errors=True)

        return store, cleanup
    if isinstance(data, (str, os.PathLike)):
        return CellStore(data), lambda: None
    raise NeurofmError(
        f"pretrain takes an AnnData, a CellStore or a store directory, not {type(data).__name__}; "
        "convert the data first (neurofm convert)"
    )


def pretrain(
    data: ad.AnnData | CellStore | str | os.PathLike,
    tokenizer_config: TokenizerConfig | None = None,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike = "pretrain",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    resume: bool = False,
    *,
    tokenizer: ExpressionTokenizer | None = None,
) -> TrainResult:
    """Pre-train a :class:`GeneEncoder` on raw counts to predict masked expression bins.

    ``data`` is a :class:`~neurofm.data.store.CellStore` (or its directory), or an AnnData — small data,
    converted to a temporary store under ``out_dir`` first, so both take the same streaming path.
    The split is the store's fixed validation rows (``split_store``); the tokenizer is fit on the
    training rows only (``fit_training_tokenizer``) — or pass an already fitted ``tokenizer`` (fit the
    same way; its config then wins over ``tokenizer_config``). The model's
    ``n_genes``/``n_bins``/``max_tokens`` are taken from the tokenizer and ``max_tokens_per_cell``.

    Training runs ``max_steps`` steps (None: ``epochs`` epochs) and validates every ``val_every_steps``
    steps (None: at each epoch end) and at the last step; after each validation, once checkpoints and
    the resume state are written, the metrics dict (keys ``METRIC_COLUMNS``) goes to
    ``on_epoch_end(step, metrics)``; an exception raised there (e.g. an Optuna prune) stops training and
    propagates. ``resume=True`` continues from ``out_dir/resume_state.pt`` — mid-epoch, with the loader
    position — bit-identical to an uninterrupted run on CPU. Returns a :class:`TrainResult`.
    """
    train_config = (train_config or TrainConfig()).validate()
    out_dir = ensure_writable_dir(out_dir)
    store, cleanup = _open_data(data, out_dir)
    try:
        train_rows, val_rows = split_store(store, train_config)
        if tokenizer is None:
            tokenizer = fit_training_tokenizer(store, tokenizer_config, train_config)
        elif not tokenizer.is_fitted:
            raise NeurofmError(
                "the tokenizer passed to pretrain is not fitted; fit it or pass tokenizer_config"
            )
        n_bins = tokenizer.config.n_bins
        n_tokens = min(train_config.max_tokens_per_cell, tokenizer.n_genes)
        model_config = replace(
            model_config or ModelConfig(), n_genes=tokenizer.n_genes, n_bins=n_bins, max_tokens=n_tokens
        ).validate()
        context = runtime.current()
        device = resolve_device(train_config.device)
        if context.enabled and device.type == "cuda":
            device = torch.device("cuda", context.local_rank)
        with _torch_threads(train_config.num_threads):
            return _pretrain(
                store,
                tokenizer,
                model_config,
                train_config,
                out_dir,
                on_epoch_end,
                resume,
                context,
                device,
                n_tokens,
                (train_rows, val_rows),
            )
    finally:
        cleanup()


@contextmanager
def _torch_threads(n_threads: int | None):
    """For the block only (both settings are process-global): ``torch.set_num_threads(n_threads)`` (None:
    torch's default) and torch's deterministic algorithms. The latter matter on a CPU too: the backward
    of indexing a small table (``bin_value[bins]``) accumulates with atomic adds whose order follows the
    threads' timing, so two runs beside other processes gave different count heads; the deterministic
    kernel sorts instead (and is faster here). Ops without one only warn."""
    before = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(before)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's gene samples, masks and dropout: a function of (seed, step, rank) only, so a
    resumed run needs no generator state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
    }


def _validation_batches(
    stream: CellStream, n_tokens: int, mask_token: int, config: TrainConfig, device: torch.device,
    eval_batch_size: int = 256,
) -> list[MaskedBatch]:  # fmt: skip
    """The fixed validation batches: the stream's validation rows, ``val_draws`` gene samples + masks
    each, drawn once from a generator seeded ``seed + 1``."""
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    zero_bins = stream.zero_bins.to(device)
    # Every batch's token tensors are views into one block per field, filled in place: each part's
    # (cells × genes) temporaries then reuse the same memory, whereas small tensors kept alive between
    # them fragment the heap (RSS grew to 1.7 GB while holding 156 MB on a 20,000-gene store).
    n_rows = stream.val_rows.size * config.val_draws
    blocks: dict[str, torch.Tensor] = {}
    batches, offset = [], 0

    def kept(name: str, value: torch.Tensor) -> torch.Tensor:
        if name not in blocks:
            blocks[name] = torch.empty((n_rows, *value.shape[1:]), dtype=value.dtype, device=device)
        return blocks[name][offset : offset + value.shape[0]].copy_(value)

    for part in stream.validation_batches(eval_batch_size):
        bins = densify(_to_device(part, device), zero_bins)
        for _ in range(config.val_draws):
            made = make_batch(bins, n_tokens, mask_token, config, generator)
            labels = kept("labels", made.labels)
            batches.append(
                replace(
                    made,
                    gene_ids=kept("gene_ids", made.gene_ids),
                    input_bins=kept("input_bins", made.input_bins),
                    labels=labels,
                    cell_labels=labels
                    if made.cell_labels is made.labels
                    else kept("cells", made.cell_labels),
                )
            )
            offset += made.labels.shape[0]
    return batches


def _pretrain(
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    on_epoch_end: Callable[[int, dict], None] | None,
    resume: bool,
    context: runtime.DistContext,
    device: torch.device,
    n_tokens: int,
    split: tuple[np.ndarray, np.ndarray],
) -> TrainResult:
    started = time.perf_counter()
    train_rows, val_rows = split
    mask_token = model_config.mask_token
    with_counts = model_config.latent_dim > 0  # the count head needs every gene's raw count
    if with_counts and train_config.count_loss_weight <= 0:
        raise NeurofmError(
            "the model has a count head (latent_dim > 0) but train.count_loss_weight is 0, so its latent "
            "would never be trained; set count_loss_weight > 0 or model.latent_dim: 0"
        )

    stream = CellStream(
        store,
        tokenizer,
        stream_config_for(train_config, counts=with_counts),
        rank=context.rank,
        world_size=context.world_size,
        num_workers=train_config.num_workers,
    )
    loader = StreamLoader(
        stream,
        num_workers=train_config.num_workers,
        pin_memory=train_config.pin_memory and device.type == "cuda",
    )
    zero_bins = stream.zero_bins.to(device)
    val_batches = _validation_batches(stream, n_tokens, mask_token, train_config, device)
    table, n_baseline = stream_frequency_table(store, tokenizer, val_rows, seed=train_config.seed)
    baseline_ppl, baseline_acc = baseline_scores(table, val_batches)
    log.info(
        "%d train / %d validation cells, %d genes, %d tokens per cell; frequency baseline (%d cells) "
        "perplexity %.3f",
        len(train_rows),
        len(val_rows),
        tokenizer.n_genes,
        n_tokens,
        n_baseline,
        baseline_ppl,
    )

    torch.manual_seed(train_config.seed)
    model = GeneEncoder(model_config)
    if model.count_gene_index is not None:  # the count head reads and reconstructs the most variable genes
        model.set_count_genes(
            variable_genes(store, model_config.n_count_genes, exclude_rows=val_rows, seed=train_config.seed)
        )
    if model.gene_bin_bias is not None:  # start from the frequency table: context is what is left to learn
        log_table = np.log(table)
        model.gene_bin_bias.weight.data.copy_(torch.from_numpy(log_table - log_table.mean(1, keepdims=True)))
    model = model.to(device)
    trainable = model
    if context.enabled:
        trainable = torch.nn.parallel.DistributedDataParallel(
            _PretrainForward(model), device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _make_optimizer(model, train_config)
    generator = torch.Generator(device=device)
    # every rank steps the same number of times per epoch: the fewest batches any rank gets
    epoch_steps: dict[int, int] = {}

    def steps_in(epoch: int) -> int:
        if epoch not in epoch_steps:
            epoch_steps[epoch] = stream.common_batches(epoch)
        return epoch_steps[epoch]

    if steps_in(0) == 0:
        raise NeurofmError(
            f"{len(train_rows)} training cells give no batch to one of {context.world_size} processes; "
            "use fewer processes (train.nproc_per_node) or smaller train.block_size"
        )
    if train_config.max_steps is not None:
        total_steps = train_config.max_steps
    else:
        total_steps = sum(steps_in(epoch) for epoch in range(train_config.epochs))
    state = {"step": 0, "best_val_loss": math.inf, "metrics": []}  # best: val_total_loss
    if resume:
        state = load_resume_state(out_dir, model, optimizer, model_config, tokenizer, train_config)
        loader.load_state_dict({**state["loader"], "rank": context.rank})

    metrics_rows: list[dict] = state["metrics"]
    progress = tqdm(
        total=total_steps,
        initial=state["step"],
        desc="pretrain",
        unit="step",
        disable=not (train_config.progress and context.is_main),
    )
    running, running_cell, n_steps = 0.0, 0.0, 0
    since = time.perf_counter()
    data_wait = 0.0  # seconds the loop waited for the loader since the last validation
    lr = _lr_at(state["step"], total_steps, train_config)
    while state["step"] < total_steps:
        epoch = loader.epoch
        n_epoch = steps_in(epoch)
        if loader.batches_consumed >= n_epoch:  # this epoch is done (a rank-uneven tail is skipped)
            loader.epoch, loader.batches_consumed = epoch + 1, 0
            continue
        model.train()
        batches = iter(loader)
        try:
            waiting = time.perf_counter()
            for raw in batches:
                data_wait += time.perf_counter() - waiting
                step = state["step"]
                lr = _lr_at(step, total_steps, train_config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_seed = _step_seed(train_config.seed, step, context.rank)
                generator.manual_seed(step_seed)
                torch.manual_seed(step_seed)  # dropout
                raw = _to_device(raw, device)
                bins = densify(raw, zero_bins)
                counts = densify_counts(raw, bins.shape[1]) if with_counts else None
                batch = make_batch(bins, n_tokens, mask_token, train_config, generator, counts)
                # each rank's mean over its own cells; DDP averages the gradients over the ranks
                token_loss, cell_loss, count_nll, count_kl, _ = _losses(
                    trainable, batch, device, train_config
                )
                loss = token_loss + train_config.cell_loss_weight * cell_loss
                if with_counts:
                    kl_weight = kl_weight_at(step, total_steps, train_config)
                    loss = loss + train_config.count_loss_weight * (count_nll + kl_weight * count_kl)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train_config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
                optimizer.step()
                running += token_loss.item()
                running_cell += cell_loss.item()
                n_steps += 1
                state["step"] = step + 1
                progress.update(1)
                progress.set_postfix(
                    epoch=epoch + 1, loss=f"{token_loss.item():.3f}", cell=f"{cell_loss.item():.3f}"
                )
                epoch_done = loader.batches_consumed >= n_epoch
                last = state["step"] >= total_steps
                every = train_config.val_every_steps
                if last or (epoch_done if every is None else state["step"] % every == 0):
                    position = loader.state_dict()
                    if epoch_done:
                        position.update(epoch=epoch + 1, batches_consumed=0)
                    row = _validate(
                        model, val_batches, device, train_config, context, epoch + 1, state["step"],
                        (running, running_cell, n_steps), baseline_ppl, lr, time.perf_counter() - since,
                        stream if with_counts else None, data_wait,
                    )  # fmt: skip
                    running, running_cell, n_steps = 0.0, 0.0, 0
                    metrics_rows.append(row)
                    is_best = row["val_total_loss"] < state["best_val_loss"]
                    state["best_val_loss"] = min(state["best_val_loss"], row["val_total_loss"])
                    state["loader"] = position
                    if context.is_main:
                        write_checkpoint(out_dir, model, tokenizer, optimizer, state, is_best, train_config)
                        _log_row(row)
                        if on_epoch_end is not None:
                            on_epoch_end(state["step"], dict(row))
                    since, data_wait = time.perf_counter(), 0.0
                if epoch_done or last:
                    break
                waiting = time.perf_counter()
        finally:
            batches.close()
        if loader.batches_consumed >= n_epoch:
            loader.epoch, loader.batches_consumed = epoch + 1, 0
    progress.close()

    count_head = None
    if with_counts and head_epochs(stream.n_train_cells, train_config.count_head_epochs) > 0:
        count_head = _count_head_phase(
            model, store, tokenizer, stream, train_config, device, context, out_dir, state
        )
    elif context.is_main:  # no phase: the run's model is the best checkpoint itself
        load_pretrained(out_dir / BEST_DIR)[0].save_pretrained(out_dir / MODEL_DIR, tokenizer)

    demo, artifacts = "", {}
    if context.is_main:
        demo = demo_prediction(model, val_batches[0], train_config.demo_top_k, device, train_config)
        artifacts = write_final_outputs(out_dir, metrics_rows, demo)
        artifacts["resume_state"] = out_dir / RESUME_FILE
    if context.enabled:
        torch.distributed.barrier()  # the other ranks return once rank 0's outputs are complete
    return TrainResult(
        metrics=metrics_rows,
        model_dir=out_dir / MODEL_DIR,
        best_dir=out_dir / BEST_DIR,
        last_dir=out_dir / LAST_DIR,
        baseline_perplexity=baseline_ppl,
        baseline_masked_accuracy=baseline_acc,
        artifacts=artifacts,
        demo=demo,
        wall_time_s=time.perf_counter() - started,
        count_head=count_head,
    )


def _count_head_phase(
    model: GeneEncoder,
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    stream: CellStream,
    config: TrainConfig,
    device: torch.device,
    context: runtime.DistContext,
    out_dir: Path,
    state: dict,
) -> dict:
    """The count head's own phase (:mod:`neurofm.count_head`) on the best checkpoint; the result is
    written to ``model/`` (``best/`` is left as it was, so a run continued later starts from it again).
    Returns the phase's summary (+ the validation count loss before and after). A head saved by an
    earlier, killed call after the same pre-training is loaded instead of refit."""
    if context.enabled:
        torch.distributed.barrier()  # rank 0 has written the best checkpoint
    best, _ = load_pretrained(out_dir / BEST_DIR)
    model.load_state_dict(best.state_dict())
    expect = {  # the pre-training the head is fit after, and the phase's settings
        "pretrain_steps": state["step"],
        "best_val_loss": float(state["best_val_loss"]),
        "epochs": head_epochs(stream.n_train_cells, config.count_head_epochs),
        "batch_size": config.count_head_batch_size,
        "lr": config.count_head_lr,
        "patience": config.count_head_patience,
        "kl_warmup": config.count_head_kl_warmup,
        "max_steps": config.max_steps,
    }
    summary = load_head(out_dir / HEAD_FILE, model, expect)
    if summary is None:
        before = validation_count_loss(model, stream, device, config)
        summary = fit_count_head(
            model, store, tokenizer, stream.config, config, device, context, _step_seed,
            validate=lambda: validation_count_loss(model, stream, device, config),
        )  # fmt: skip
        after = validation_count_loss(model, stream, device, config)
        summary = {**expect, **summary, "val_count_loss_before": before, "val_count_loss_after": after}
        if context.is_main:
            save_head(out_dir / HEAD_FILE, model, summary)
    before, after = summary["val_count_loss_before"], summary["val_count_loss_after"]
    log.info(
        "count head fit for %d of %d epochs (best: epoch %d; %d steps, %.0f s): validation count loss "
        "%.4f -> %.4f",
        summary["epochs_run"], summary["epochs"], summary["best_epoch"], summary["steps"],
        summary["seconds"], before, after,
    )  # fmt: skip
    if context.is_main:
        model.save_pretrained(out_dir / MODEL_DIR, tokenizer)
    return summary


def _validate(
    model, val_batches, device, config, context, epoch, step, running, baseline_ppl, lr, elapsed,
    count_stream=None, data_wait=0.0,
) -> dict:  # fmt: skip
    """One metrics row: the fixed validation batches scored (and, with ``count_stream``, the count head's
    loss on the stream's validation cells), the training losses since the last one (averaged over the
    steps and the ranks), the training time since then (``epoch_time_s``) and the part of it spent
    waiting for the loader (``data_wait_s``: a fed accelerator keeps it near 0)."""
    total, total_cell, n_steps = running
    total, total_cell = runtime.all_reduce_sums([total, total_cell], context)
    denominator = max(1, n_steps) * context.world_size
    val = score_validation(model, val_batches, device, config)
    if count_stream is not None:
        val["count_loss"] = validation_count_loss(model, count_stream, device, config)
    model.train()
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": total / denominator,
        "train_cell_loss": total_cell / denominator,
        "val_loss": val["loss"],
        "val_cell_loss": val["cell_loss"],
        "val_count_loss": val["count_loss"],
        "val_total_loss": val["loss"]
        + config.cell_loss_weight * val["cell_loss"]
        + (config.count_loss_weight * val["count_loss"] if model.latent_encoder is not None else 0.0),
        "val_perplexity": val["perplexity"],
        "val_masked_accuracy": val["masked_accuracy"],
        "baseline_perplexity": baseline_ppl,
        "perplexity_ratio": val["perplexity"] / baseline_ppl,
        "lr": lr,
        "epoch_time_s": elapsed,
        "data_wait_s": data_wait,
    }


def _log_row(row: dict) -> None:
    log.info(
        "step %d (epoch %d): train %.4f  val %.4f  cell %.4f  count %.4f  ppl %.3f (baseline %.3f, ratio %.3f)  "
        "acc %.3f",
        row["step"],
        row["epoch"],
        row["train_loss"],
        row["val_loss"],
        row["val_cell_loss"],
        row["val_count_loss"],
        row["val_perplexity"],
        row["baseline_perplexity"],
        row["perplexity_ratio"],
        row["val_masked_accuracy"],
    )


@torch.no_grad()
def demo_prediction(
    model: GeneEncoder, batch: MaskedBatch, top_k: int, device: torch.device, config: TrainConfig
) -> str:
    """Text table of the top-k predicted bins against the truth at the masked genes of the batch's
    first cell."""
    model.eval()
    with _autocast(device, config):
        logits = model(batch.gene_ids[:1], batch.input_bins[:1], None)[0].float()
    probabilities = logits.softmax(-1)
    scored = (batch.labels[0] != IGNORE_INDEX).nonzero().flatten()
    lines = [
        f"validation cell 0: {len(scored)} masked genes (gene index, true bin, top-{top_k} predicted bins "
        "with probabilities)"
    ]
    hits = 0
    for position in scored.tolist():
        top = probabilities[position].topk(min(top_k, probabilities.shape[-1]))
        truth = int(batch.labels[0, position])
        hits += truth in top.indices.tolist()
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        guesses = ", ".join(f"{int(b)} ({p:.2f})" for p, b in pairs)
        lines.append(f"gene {int(batch.gene_ids[0, position]):5d}  true {truth:2d}  top{top_k}: {guesses}")
    lines.append(f"truth within top-{top_k}: {hits}/{len(scored)}")
    return "\n".join(lines) + "\n"
