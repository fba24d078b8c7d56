"""Masked-bin pre-training: the training loop (the task is ``neurofm.masking``, the run directory
``neurofm.checkpoints``).

``pretrain`` takes raw counts in a cell store (``neurofm.data.store``; an AnnData is converted to a
temporary one first, so small data and an atlas take the same path), streams the training cells with
``neurofm.stream`` (``CellStream``/``StreamLoader``: blocks, shuffle buffers, bins made on the fly) and
writes, under ``out_dir``:

- ``model/`` — the model the run produces (registered, evaluated, loaded by
  ``load_pretrained("…/pretrain")``): the best pre-training checkpoint with its count head fit afterwards
  (``neurofm.count_phase``; the checkpoint itself when there is no such phase);
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
validation, so a resumed run continues mid-epoch exactly. The loop itself is the phase runner of
``neurofm.loop`` (the count head's phase runs through it too); the settings are
``neurofm.train_config.TrainConfig``; the losses and validation scores are ``neurofm.scoring``.

Each step samples ``max_tokens_per_cell`` genes per cell (all of them when the cap is larger than the gene
count) and masks ``mask_ratio`` of those tokens, ``nonzero_mask_share`` of the masked ones on non-zero bins
(bin > 0), as the original did — all with tensor ops on the batch. The loss is the masked-token
cross-entropy plus ``cell_loss_weight`` × the cell head's cross-entropy (bins predicted from the pooled
cell vector alone, see ``neurofm.model``; at the masked or at all tokens, ``cell_loss_tokens``).
Validation is the store's fixed validation rows (never trained on) with gene samples and masks drawn
once (``neurofm.scoring``), so the per-gene frequency-table baseline is scored on exactly the same
positions every time; that table counts the training rows' bins streamed once (all of them, or a seeded sample of
``BASELINE_MAX_CELLS`` = 200,000 when there are more), sparsely with ``np.bincount``.

The same loop runs data-parallel under ``torchrun`` (see ``neurofm.distributed``): each rank streams its
own blocks of the store (``CellStream`` splits them by rank) and every rank steps
``CellStream.common_batches`` times per epoch; DDP averages the gradients (``neurofm.loop``); validation
sums are all-reduced; rank 0 alone writes outputs and calls ``on_validation``. ``nproc_per_node > 1`` makes the
pretrain step launch it.

Run on the shared data::

    python -c "from neurofm.io import read_h5ad; from neurofm.train import *; \\
        pretrain(read_h5ad('../shared/data/subset_2523_210_Cerebral-cortex.screened.h5ad'), \\
        TokenizerConfig(), ModelConfig(), TrainConfig(), 'runs/pretrain')"

or on a store made by ``neurofm convert IN.h5ad STORE``: ``pretrain(CellStore('STORE'), ...)``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from neurofm import runtime
from neurofm.batch_format import batch_observed, densify, densify_counts
from neurofm.checkpoints import (  # noqa: F401  (names of the run directory, re-exported)
    BEST_DIR,
    LAST_DIR,
    METRIC_COLUMNS,
    MODEL_DIR,
    RESUME_FILE,
    load_resume_state,
    write_checkpoint,
    write_final_outputs,
)
from neurofm.count_phase import count_head_phase, head_epochs
from neurofm.data.store import CellStore
from neurofm.errors import NeurofmError
from neurofm.io import ensure_writable_dir
from neurofm.loop import (
    Phase,
    PhaseState,
    Schedule,
    StepAt,
    Window,
    kl_weight_at,
    run_phase,
    stream_and_loader,
)
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
from neurofm.model import GeneEncoder, ModelConfig, load_pretrained
from neurofm.runtime import resolve_device  # noqa: F401  (re-exported: callers import it from train)
from neurofm.scoring import ValidationSet, demo_prediction, log_row, losses, metrics_row, validation_batches
from neurofm.store_fit import variable_genes
from neurofm.stream import CellStream, StreamLoader, partly_observed_genes, store_batches
from neurofm.tokenizer import ExpressionTokenizer, TokenizerConfig
from neurofm.train_config import TrainConfig  # re-exported: callers import it from train
from neurofm.training_data import (  # noqa: F401  (re-exported for the steps, tests and benchmarks)
    fit_training_tokenizer,
    open_data,
    split_store,
    store_from_anndata,
    stream_config_for,
)

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------- optimisation
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


class _PretrainForward(torch.nn.Module):
    """``GeneEncoder.pretrain_outputs`` as a module's ``forward``, which DistributedDataParallel wraps."""

    def __init__(self, model: GeneEncoder):
        super().__init__()
        self.model = model

    def forward(
        self,
        gene_ids,
        bin_ids,
        padding_mask=None,
        counts=None,
        full_bins=None,
        observed=None,
        batch_index=None,
    ):
        return self.model.pretrain_outputs(
            gene_ids, bin_ids, padding_mask, counts, full_bins, observed, batch_index
        )


def pretrain(
    data: ad.AnnData | CellStore | str | os.PathLike,
    tokenizer_config: TokenizerConfig | None = None,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike = "pretrain",
    on_validation: Callable[[int, dict], None] | None = None,
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
    ``on_validation(step, metrics)``; an exception raised there (e.g. an Optuna prune) stops training and
    propagates. ``resume=True`` continues from ``out_dir/resume_state.pt`` — mid-epoch, with the loader
    position — bit-identical to an uninterrupted run on CPU. Returns a :class:`TrainResult`.
    """
    train_config = (train_config or TrainConfig()).validate()
    out_dir = ensure_writable_dir(out_dir)
    store, cleanup = open_data(data, out_dir)
    try:
        _, val_rows = split_store(store, train_config)
        if tokenizer is None:
            tokenizer = fit_training_tokenizer(store, tokenizer_config, train_config)
        elif not tokenizer.is_fitted:
            raise NeurofmError(
                "the tokenizer passed to pretrain is not fitted; fit it or pass tokenizer_config"
            )
        n_bins = tokenizer.config.n_bins
        n_tokens = min(train_config.max_tokens_per_cell, tokenizer.n_genes)
        model_config = replace(
            model_config or ModelConfig(),
            n_genes=tokenizer.n_genes,
            n_bins=n_bins,
            max_tokens=n_tokens,
            batch_names=_batch_names(store, train_config, model_config or ModelConfig()),
            batch_key=train_config.batch_key,
        ).validate()
        context = runtime.current()
        device = resolve_device(train_config.device)
        if context.enabled and device.type == "cuda":
            device = torch.device("cuda", context.local_rank)
        run = _Run(
            store=store,
            tokenizer=tokenizer,
            model_config=model_config,
            config=train_config,
            out_dir=out_dir,
            device=device,
            n_tokens=n_tokens,
            val_rows=val_rows,
        )
        with _torch_threads(train_config.num_threads):
            return _pretrain(run, on_validation, resume)
    finally:
        cleanup()


def _batch_names(store: CellStore, config: TrainConfig, model_config: ModelConfig) -> list[str]:
    """The count head's batches: the values of ``train.batch_key`` in the store (none without it)."""
    if config.batch_key is None:
        return []
    if model_config.latent_dim == 0:
        raise NeurofmError(
            f"train.batch_key={config.batch_key!r} conditions the count head, but model.latent_dim is 0 "
            "(no count head); set model.latent_dim > 0 or leave batch_key out"
        )
    return store_batches(store, config.batch_key)[0]


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


@dataclass(frozen=True)
class _Run:
    """What one ``pretrain`` call trains with, resolved."""

    store: CellStore
    tokenizer: ExpressionTokenizer
    model_config: ModelConfig  # n_genes / n_bins / max_tokens from the tokenizer
    config: TrainConfig
    out_dir: Path
    device: torch.device  # this rank's
    n_tokens: int  # genes sampled per cell
    val_rows: np.ndarray  # the store's validation rows

    @property
    def with_counts(self) -> bool:
        return self.model_config.latent_dim > 0  # the count head needs every gene's raw count


def _pretrain(run: _Run, on_validation: Callable[[int, dict], None] | None, resume: bool) -> TrainResult:
    started = time.perf_counter()
    config = run.config
    if run.with_counts and config.count_loss_weight <= 0:
        raise NeurofmError(
            "the model has a count head (latent_dim > 0) but train.count_loss_weight is 0, so its latent "
            "would never be trained; set count_loss_weight > 0 or model.latent_dim: 0"
        )
    stream, loader = stream_and_loader(
        run.store,
        run.tokenizer,
        stream_config_for(config, counts=run.with_counts),
        num_workers=config.num_workers,
        pin_memory=config.pin_memory,
        device=run.device,
    )
    validation, table = _validation_set(run, stream)
    model = _initial_model(run, table)
    optimizer = _make_optimizer(model, config)
    schedule = _schedule(stream, config)
    start = None
    if resume:
        saved = load_resume_state(run.out_dir, model, optimizer, run.model_config, run.tokenizer, config)
        start = PhaseState(**saved)
    phase = _pretrain_phase(run, model, optimizer, loader, schedule, stream, validation, on_validation)
    state = run_phase(phase, start)
    return _finish(run, model, stream, validation, state, started)


def _validation_set(run: _Run, stream: CellStream) -> tuple[ValidationSet, np.ndarray]:
    """The fixed validation batches scored against the frequency table of the training rows (returned
    too: it initialises the model's per-gene bias)."""
    config = run.config
    batches = validation_batches(stream, run.n_tokens, run.model_config.mask_token, config, run.device)
    table, n_baseline = stream_frequency_table(run.store, run.tokenizer, run.val_rows, seed=config.seed)
    baseline_ppl, baseline_acc = baseline_scores(table, batches)
    log.info(
        "%d train / %d validation cells, %d genes, %d tokens per cell; frequency baseline (%d cells) "
        "perplexity %.3f",
        run.store.n_cells - len(run.val_rows),
        len(run.val_rows),
        run.tokenizer.n_genes,
        run.n_tokens,
        n_baseline,
        baseline_ppl,
    )
    count_stream = stream if run.with_counts else None
    return ValidationSet(batches, baseline_ppl, baseline_acc, count_stream), table


def _initial_model(run: _Run, table: np.ndarray) -> GeneEncoder:
    torch.manual_seed(run.config.seed)
    model = GeneEncoder(run.model_config)
    head = model.count_head
    if (
        head is not None and head.count_gene_index is not None
    ):  # it reads and rebuilds the most variable genes
        head.set_count_genes(
            variable_genes(
                run.store, run.model_config.n_count_genes, exclude_rows=run.val_rows, seed=run.config.seed
            )
        )
    if model.gene_bin_bias is not None:  # start from the frequency table: context is what is left to learn
        log_table = np.log(table)
        model.gene_bin_bias.weight.data.copy_(torch.from_numpy(log_table - log_table.mean(1, keepdims=True)))
    return model.to(run.device)


def _schedule(stream: CellStream, config: TrainConfig) -> Schedule:
    """Every rank steps the same number of times per epoch: the fewest batches any rank gets."""
    steps_in = functools.cache(stream.common_batches)
    if steps_in(0) == 0:
        raise NeurofmError(
            f"{stream.n_train_cells} training cells give no batch to one of {stream.world_size} processes; "
            "use fewer processes (train.nproc_per_node) or smaller train.block_size"
        )
    if config.max_steps is not None:
        total_steps = config.max_steps
    else:
        total_steps = sum(steps_in(epoch) for epoch in range(config.epochs))
    return Schedule(
        total_steps=total_steps,
        epoch_steps=steps_in,
        learning_rate=functools.partial(_lr_at, total_steps=total_steps, config=config),
        val_every_steps=config.val_every_steps,
    )


def _pretrain_phase(
    run: _Run,
    model: GeneEncoder,
    optimizer: torch.optim.Optimizer,
    loader: StreamLoader,
    schedule: Schedule,
    stream: CellStream,
    validation: ValidationSet,
    on_validation: Callable[[int, dict], None] | None,
) -> Phase:
    """Pre-training as a phase: the masked-bin step, the metrics row as its validation, and checkpoints,
    the resume state and ``on_validation`` after each (rank 0)."""
    config, device = run.config, run.device
    generator = torch.Generator(device=device)
    zero_bins = stream.zero_bins.to(device)
    observed_genes = partly_observed_genes(stream)  # None for a single-file store

    def step(module: torch.nn.Module, raw: dict, at: StepAt) -> tuple[torch.Tensor, dict]:
        generator.manual_seed(at.seed)  # gene samples and masks
        bins = densify(raw, zero_bins)
        counts = densify_counts(raw, bins.shape[1]) if run.with_counts else None
        observed = batch_observed(raw, observed_genes)  # unmeasured genes: no token, no count loss
        batch = make_batch(
            bins, run.n_tokens, run.model_config.mask_token, config, generator, counts, observed,
            batch_index=raw.get("batch_index"),
        )  # fmt: skip
        # each rank's mean over its own cells; DDP averages the gradients over the ranks
        token_loss, cell_loss, count_nll, count_kl, _ = losses(module, batch, device, config)
        loss = token_loss + config.cell_loss_weight * cell_loss
        if run.with_counts:
            kl_weight = kl_weight_at(at.index, schedule.total_steps, config.kl_weight, config.kl_warmup)
            loss = loss + config.count_loss_weight * (count_nll + kl_weight * count_kl)
        return loss, {"loss": token_loss, "cell": cell_loss}

    def validate(window: Window) -> tuple[float, dict]:
        row = metrics_row(model, validation, window, device, config)
        return row["val_total_loss"], row

    def checkpoint(state: PhaseState, row: dict, is_best: bool) -> None:
        if runtime.current().is_main:
            write_checkpoint(run.out_dir, model, run.tokenizer, optimizer, asdict(state), is_best, config)
            log_row(row)
            if on_validation is not None:
                on_validation(state.step, dict(row))

    return Phase(
        name="pretrain",
        module=_PretrainForward(model),
        optimizer=optimizer,
        loader=loader,
        schedule=schedule,
        step=step,
        validate=validate,
        after_validation=checkpoint,
        seed=config.seed,
        grad_clip=config.grad_clip,
        device=device,
        progress=config.progress,
    )


def _finish(
    run: _Run,
    model: GeneEncoder,
    stream: CellStream,
    validation: ValidationSet,
    state: PhaseState,
    started: float,
) -> TrainResult:
    """The count head's phase (or the best checkpoint as the run's model), then the final outputs."""
    context, out_dir, config = runtime.current(), run.out_dir, run.config
    count_head = None
    if run.with_counts and head_epochs(stream.n_train_cells, config.count_head_epochs) > 0:
        count_head = count_head_phase(
            model, run.store, run.tokenizer, stream, config, run.device, out_dir, state
        )
    elif context.is_main:  # no phase: the run's model is the best checkpoint itself
        load_pretrained(out_dir / BEST_DIR)[0].save_pretrained(out_dir / MODEL_DIR, run.tokenizer)
    demo, artifacts = "", {}
    if context.is_main:
        demo = demo_prediction(model, validation.batches[0], config.demo_top_k, run.device, config)
        artifacts = write_final_outputs(out_dir, state.metrics, demo)
        artifacts["resume_state"] = out_dir / RESUME_FILE
    if context.enabled:
        torch.distributed.barrier()  # the other ranks return once rank 0's outputs are complete
    return TrainResult(
        metrics=state.metrics,
        model_dir=out_dir / MODEL_DIR,
        best_dir=out_dir / BEST_DIR,
        last_dir=out_dir / LAST_DIR,
        baseline_perplexity=validation.baseline_perplexity,
        baseline_masked_accuracy=validation.baseline_masked_accuracy,
        artifacts=artifacts,
        demo=demo,
        wall_time_s=time.perf_counter() - started,
        count_head=count_head,
    )
