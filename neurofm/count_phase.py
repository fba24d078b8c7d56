"""The count head's own training phase: after pre-training, the count head (``neurofm.model.CountHead``,
the network) alone is fit to the training cells.

Pre-training shares its steps between three heads, and a transformer step is dear, so the count head
(latent encoder, decoder, dispersions — the part that makes the embedding) sees few updates: tens of
epochs where scVI, the baseline it is measured against, takes up to 400. This phase gives the count
head that budget cheaply. The token features are frozen (each cell's vector is a lookup in the feature
table, :func:`neurofm.embedding.feature_table`, as at embedding time, so no transformer runs and memory
does not hold cells × genes × d_model), and only the count head's parameters are updated: the cells'
negative-binomial NLL + the latent's KL summed over genes, at the full KL weight from the first step (the
head ended pre-training there; ``count_head_kl_warmup`` > 0 warms it up again over that share of the
phase, as scVI warms it over its 400 epochs from scratch — which made the validation ELBO, scored at the
full weight, only rise, and early stopping end the phase at epoch 1), Adam as in scVI (lr 1e-3, eps
0.01, weight decay 1e-6), batches of ``count_head_batch_size`` training cells from the same streaming
loader.

Epochs: ``count_head_epochs``, or (None) scVI's rule ``min(round(20000 / n_train × 400), 400)`` — the
budget of the scVI baseline on the same cells — so the phase is long on small data and a few passes on an
atlas. That budget is a ceiling: after every epoch the head is scored on the validation cells (the
negative ELBO per gene, :func:`neurofm.scoring.validation_count_loss`), the best epoch's head is kept, and
the phase stops once ``count_head_patience`` epochs in a row have not improved on it (scVI's early
stopping, on by default here: 400 epochs over a thousand cells overfit them). Each step's latent sample
is seeded by (seed, step, rank); the phase's result is saved (``count_head.pt``) before the best model
is rewritten with it, so a run killed at any point resumes to the same weights. The steps go through
the same phase runner as pre-training (:func:`neurofm.loop.run_phase`: DDP, progress, early stopping)
with the same KL schedule (:func:`neurofm.loop.kl_weight_at`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from neurofm import runtime
from neurofm.batch_format import batch_observed, densify, densify_counts
from neurofm.checkpoints import BEST_DIR, MODEL_DIR
from neurofm.data.store import CellStore
from neurofm.io import atomic_path
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
from neurofm.model import GeneEncoder, load_pretrained
from neurofm.pooling import cell_inputs, feature_table
from neurofm.scoring import validation_count_loss
from neurofm.stream import CellStream, StreamConfig, StreamLoader, partly_observed_genes
from neurofm.tokenizer import ExpressionTokenizer
from neurofm.train_config import TrainConfig

log = logging.getLogger(__name__)

HEAD_FILE = "count_head.pt"  # the phase's result: the count head's weights + a summary
HEAD_PARAMETERS = ("count_head.",)  # the count head module's weights (neurofm.model.CountHead)
SCVI_EPOCH_RULE = (20_000, 400)  # scvi-tools' default: min(round(20000 / n_cells * 400), 400) epochs


def head_epochs(n_train_cells: int, setting: int | None) -> int:
    """Passes over the training cells: ``setting``, or scVI's rule when it is None."""
    if setting is not None:
        return int(setting)
    cells, cap = SCVI_EPOCH_RULE
    return int(min(round(cells / max(1, n_train_cells) * cap), cap))


def phase_steps(steps_per_epoch: list[int], max_steps: int | None) -> list[int]:
    """The phase's steps per epoch, cut so that they add up to at most ``max_steps`` (None: uncut)."""
    if max_steps is None:
        return list(steps_per_epoch)
    kept, left = [], max_steps
    for steps in steps_per_epoch:
        if left <= 0:
            break
        kept.append(min(steps, left))
        left -= kept[-1]
    return kept


def is_head_parameter(name: str) -> bool:
    return name.startswith(HEAD_PARAMETERS)


def head_state(model: GeneEncoder) -> dict[str, torch.Tensor]:
    """The count head's parameters and buffers (batch-norm statistics), on the CPU."""
    return {
        name: tensor.detach().cpu().clone()
        for name, tensor in model.state_dict().items()
        if is_head_parameter(name)
    }


def count_head_phase(
    model: GeneEncoder,
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    stream: CellStream,
    config: TrainConfig,
    device: torch.device,
    out_dir: Path,
    pretrained: PhaseState,
) -> dict:
    """The count head's phase of a run in ``out_dir`` on its best checkpoint (after the pre-training that
    ended in ``pretrained``); the result is written to ``model/`` (``best/`` is left as it was, so a run
    continued later starts from it again). Returns the phase's summary (+ the validation count loss
    before and after). A head saved by an earlier, killed call after the same pre-training is loaded
    instead of refit."""
    context = runtime.current()
    if context.enabled:
        torch.distributed.barrier()  # rank 0 has written the best checkpoint
    best, _ = load_pretrained(out_dir / BEST_DIR)
    model.load_state_dict(best.state_dict())
    expect = {  # the pre-training the head is fit after, and the phase's settings
        "pretrain_steps": pretrained.step,
        "best_val_loss": float(pretrained.best_val_loss),
        "epochs": head_epochs(stream.n_train_cells, config.count_head_epochs),
        "batch_size": config.count_head_batch_size,
        "lr": config.count_head_lr,
        "patience": config.count_head_patience,
        "kl_warmup": config.count_head_kl_warmup,
        "max_steps": config.max_steps,
    }
    summary = load_head(out_dir / HEAD_FILE, model, expect)
    if summary is None:
        score = lambda: validation_count_loss(model, stream, device, config)  # noqa: E731
        before = score()
        summary = fit_count_head(model, store, tokenizer, stream.config, config, device, validate=score)
        summary = {**expect, **summary, "val_count_loss_before": before, "val_count_loss_after": score()}
        if context.is_main:
            save_head(out_dir / HEAD_FILE, model, summary)
    log.info(
        "count head fit for %d of %d epochs (best: epoch %d; %d steps, %.0f s): validation count loss "
        "%.4f -> %.4f",
        *(summary[key] for key in ("epochs_run", "epochs", "best_epoch", "steps", "seconds")),
        summary["val_count_loss_before"],
        summary["val_count_loss_after"],
    )
    if context.is_main:
        model.save_pretrained(out_dir / MODEL_DIR, tokenizer)
    return summary


class _CountForward(torch.nn.Module):
    """The count head's (NLL, KL) per cell and gene with the token features frozen (each cell's vector a
    lookup in ``table``), as a module's ``forward``, which DistributedDataParallel wraps."""

    def __init__(self, model: GeneEncoder, table: torch.Tensor):
        super().__init__()
        self.model = model
        self.table = table

    def forward(
        self,
        bins: torch.Tensor,
        counts: torch.Tensor,
        observed: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cell, expression = cell_inputs(self.model, bins, "auto", self.table, observed)
        return self.model.count_loss(cell, counts, expression, observed, batch_index)


@contextmanager
def _only_the_head_trains(model: GeneEncoder) -> Iterator[list[torch.nn.Parameter]]:
    """For the block, every parameter outside the count head frozen; yields the head's parameters."""
    frozen = [p for name, p in model.named_parameters() if not is_head_parameter(name)]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield [p for name, p in model.named_parameters() if is_head_parameter(name)]
    finally:
        for p, flag in zip(frozen, was, strict=True):
            p.requires_grad_(flag)


def fit_count_head(
    model: GeneEncoder,
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    stream_config: StreamConfig,
    config: TrainConfig,
    device: torch.device,
    validate: Callable[[], float] | None = None,  # the validation count loss of the model as it is
) -> dict:
    """Fit ``model``'s count head in place on the store's training cells (see module docstring); returns
    a summary: epochs (the ceiling), epochs_run, best_epoch, steps, seconds and the validation count loss
    after each epoch (``val_count_loss_by_epoch``, when ``validate`` is given and
    ``config.count_head_patience`` > 0; the model ends with the best epoch's head). Under DDP each rank
    reads its share, the gradients are averaged over the ranks and ``validate`` must return the same
    value on every rank (it all-reduces), so every rank stops at the same epoch."""
    started = time.perf_counter()
    head_config = replace(stream_config, batch_size=config.count_head_batch_size, counts=True).validate()
    stream, loader = stream_and_loader(
        store,
        tokenizer,
        head_config,
        num_workers=config.num_workers,
        pin_memory=config.pin_memory,
        device=device,
    )
    epochs = head_epochs(stream.n_train_cells, config.count_head_epochs)
    steps_per_epoch = phase_steps([stream.common_batches(epoch) for epoch in range(epochs)], config.max_steps)
    total = sum(steps_per_epoch)
    early = validate is not None and config.count_head_patience > 0
    capped = f", capped by train.max_steps={config.max_steps}" if config.max_steps is not None else ""
    stops = f"; stops after {config.count_head_patience} epochs without a better validation loss"
    log.info(
        "count head phase: at most %d epochs, %d steps of %d cells%s%s (train.count_head_epochs)",
        len(steps_per_epoch),
        total,
        config.count_head_batch_size,
        capped,
        stops if early else "",
    )
    summary = {"epochs": epochs, "steps": total, "batch_size": config.count_head_batch_size}
    if total == 0:
        return {**summary, "epochs_run": 0, "best_epoch": 0, "seconds": 0.0}
    best_head: dict[str, torch.Tensor] = {}  # the head of the best validation so far

    def keep(state: PhaseState, row: dict, is_best: bool) -> None:
        if is_best:
            best_head.update(head_state(model))

    with _only_the_head_trains(model) as parameters:
        optimizer = torch.optim.Adam(parameters, lr=config.count_head_lr, eps=0.01, weight_decay=1e-6)
        schedule = Schedule(
            total_steps=total,
            epoch_steps=lambda epoch: steps_per_epoch[epoch] if epoch < len(steps_per_epoch) else 0,
            patience=config.count_head_patience,
        )
        phase = _head_phase(model, optimizer, loader, schedule, stream, config, device)
        if early:
            phase = replace(phase, validate=lambda window: _scored(validate, window), after_validation=keep)
        state = run_phase(phase)
    if best_head:  # the best epoch's head (every rank holds the same parameters)
        model.load_state_dict(best_head, strict=False)
    if runtime.current().enabled:  # one set of batch-norm statistics: rank 0's
        for name, buffer in model.named_buffers():
            if is_head_parameter(name):
                dist.broadcast(buffer, 0)
    model.eval()
    seconds = round(time.perf_counter() - started, 1)
    result = {
        **summary,
        "steps": state.step,
        "epochs_run": state.epoch,
        "best_epoch": state.epoch,
        "seconds": seconds,
    }
    if early:
        result["best_epoch"] = state.metrics[state.best_index]["epoch"] if state.best_index >= 0 else 0
        result["val_count_loss_by_epoch"] = [row["val_count_loss"] for row in state.metrics]
    return result


def _scored(validate: Callable[[], float], window: Window) -> tuple[float, dict]:
    loss = float(validate())
    return loss, {"epoch": window.epoch, "val_count_loss": loss}


def _head_phase(
    model: GeneEncoder,
    optimizer: torch.optim.Optimizer,
    loader: StreamLoader,
    schedule: Schedule,
    stream: CellStream,
    config: TrainConfig,
    device: torch.device,
) -> Phase:
    """The phase :func:`fit_count_head` runs (without validation): its step is the cells' NLL + KL summed
    over genes, at the shared KL schedule."""
    zero_bins = stream.zero_bins.to(device)
    observed_genes = partly_observed_genes(stream)  # None for a single-file store

    def step(module: torch.nn.Module, raw: dict, at: StepAt) -> tuple[torch.Tensor, dict]:
        bins = densify(raw, zero_bins)
        observed = batch_observed(raw, observed_genes)  # only measured genes are read and scored
        nll, kl = module(bins, densify_counts(raw, bins.shape[1]), observed, raw.get("batch_index"))
        kl_weight = kl_weight_at(
            at.index, schedule.total_steps, config.kl_weight, config.count_head_kl_warmup
        )
        # scVI's scale: summed over genes (count_loss divides by n_genes; with unmeasured genes by each
        # cell's measured count genes), mean over cells — Adam's eps=0.01 assumes gradients of that size
        loss = (nll + kl_weight * kl).mean() * model.config.n_count_genes
        return loss, {"loss": loss}

    return Phase(
        name="count head",
        module=_CountForward(model, feature_table(model)),  # frozen token features: a lookup
        optimizer=optimizer,
        loader=loader,
        schedule=schedule,
        step=step,
        seed=config.seed + 7,
        device=device,
        progress=config.progress,
    )


def save_head(path: Path, model: GeneEncoder, summary: dict) -> None:
    """Write the fitted head and its summary atomically (``summary`` names the run it belongs to)."""
    with atomic_path(path) as tmp:
        torch.save({"head": head_state(model), "summary": dict(summary)}, tmp)


def load_head(path: Path, model: GeneEncoder, expect: dict) -> dict | None:
    """Load a saved head into ``model`` when ``path`` exists and its summary matches ``expect`` (the
    pre-training it was fit after); returns its summary, or None (nothing loaded)."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    summary = saved.get("summary", {})
    if any(summary.get(key) != value for key, value in expect.items()):
        return None
    if set(saved.get("head", {})) != set(head_state(model)):  # another architecture: refit, load nothing
        return None
    model.load_state_dict(saved["head"], strict=False)
    return summary
