"""The count head's own phase: after pre-training, the count head alone is fit to the training cells.

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
negative ELBO per gene, :func:`neurofm.train.validation_count_loss`), the best epoch's head is kept, and
the phase stops once ``count_head_patience`` epochs in a row have not improved on it (scVI's early
stopping, on by default here: 400 epochs over a thousand cells overfit them). Each step's latent sample
is seeded by (seed, step, rank); the phase's result is saved (``count_head.pt``) before the best model
is rewritten with it, so a run killed at any point resumes to the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from neurofm import runtime
from neurofm.data.store import CellStore
from neurofm.io import atomic_path
from neurofm.model import GeneEncoder, cell_inputs, feature_table
from neurofm.stream import CellStream, StreamConfig, StreamLoader, densify, densify_counts
from neurofm.tokenizer import ExpressionTokenizer

log = logging.getLogger(__name__)

HEAD_FILE = "count_head.pt"  # the phase's result: the count head's weights + a summary
HEAD_PARAMETERS = ("latent_encoder.", "count_decoder.", "count_log_theta", "expression_weight", "bin_value")
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


def phase_kl_weight(step: int, total_steps: int, config) -> float:
    """The KL weight of the phase's ``step`` (from 0) of ``total_steps``: it reaches ``config.kl_weight``
    after the share ``config.count_head_kl_warmup`` of the steps, rising linearly (0: at once)."""
    ramp = config.count_head_kl_warmup * total_steps
    return config.kl_weight * min(1.0, (step + 1) / max(1.0, ramp))


def is_head_parameter(name: str) -> bool:
    return name.startswith(HEAD_PARAMETERS)


def head_state(model: GeneEncoder) -> dict[str, torch.Tensor]:
    """The count head's parameters and buffers (batch-norm statistics), on the CPU."""
    return {
        name: tensor.detach().cpu().clone()
        for name, tensor in model.state_dict().items()
        if is_head_parameter(name)
    }


def fit_count_head(
    model: GeneEncoder,
    store: CellStore,
    tokenizer: ExpressionTokenizer,
    stream_config: StreamConfig,
    config,  # neurofm.train.TrainConfig
    device: torch.device,
    context: runtime.DistContext,
    step_seed,  # (seed, step, rank) -> int, the main loop's per-step seed
    validate: Callable[[], float] | None = None,  # the validation count loss of the model as it is
) -> dict:
    """Fit ``model``'s count head in place on the store's training cells (see module docstring); returns
    a summary: epochs (the ceiling), epochs_run, best_epoch, steps, seconds and the validation count loss
    after each epoch (``val_count_loss_by_epoch``, when ``validate`` is given and
    ``config.count_head_patience`` > 0; the model ends with the best epoch's head). Under DDP each rank
    reads its share, the gradients are averaged over the ranks and ``validate`` must return the same
    value on every rank (it all-reduces), so every rank stops at the same epoch."""
    started = time.perf_counter()
    stream = CellStream(
        store,
        tokenizer,
        replace(stream_config, batch_size=config.count_head_batch_size, counts=True).validate(),
        rank=context.rank,
        world_size=context.world_size,
        num_workers=config.num_workers,
    )
    loader = StreamLoader(
        stream, num_workers=config.num_workers, pin_memory=config.pin_memory and device.type == "cuda"
    )
    epochs = head_epochs(stream.n_train_cells, config.count_head_epochs)
    steps_per_epoch = phase_steps([stream.common_batches(epoch) for epoch in range(epochs)], config.max_steps)
    total = sum(steps_per_epoch)
    log.info(
        "count head phase: at most %d epochs, %d steps of %d cells%s%s (train.count_head_epochs)",
        len(steps_per_epoch), total, config.count_head_batch_size,
        f", capped by train.max_steps={config.max_steps}" if config.max_steps is not None else "",
        f"; stops after {config.count_head_patience} epochs without a better validation loss"
        if validate is not None and config.count_head_patience > 0 else "",
    )  # fmt: skip
    summary = {"epochs": epochs, "steps": total, "batch_size": config.count_head_batch_size}
    if total == 0:
        return {**summary, "epochs_run": 0, "best_epoch": 0, "seconds": 0.0}
    early = validate is not None and config.count_head_patience > 0
    curve: list[float] = []
    best_loss, best_epoch, best_head = float("inf"), 0, None
    parameters = [p for name, p in model.named_parameters() if is_head_parameter(name)]
    frozen = [p for name, p in model.named_parameters() if not is_head_parameter(name)]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(parameters, lr=config.count_head_lr, eps=0.01, weight_decay=1e-6)
    table = feature_table(model)  # frozen token features: the cell vector is a lookup
    zero_bins = stream.zero_bins.to(device)
    progress = tqdm(
        total=total, desc="count head", unit="step", disable=not (config.progress and context.is_main)
    )
    step = epochs_run = 0
    model.train()
    try:
        for epoch, n_steps in enumerate(steps_per_epoch):
            loader.epoch, loader.batches_consumed = epoch, 0
            batches = iter(loader)
            try:
                for taken, raw in enumerate(batches):
                    if taken >= n_steps:  # every rank takes as many steps (a rank-uneven tail is skipped)
                        break
                    torch.manual_seed(step_seed(config.seed + 7, step, context.rank))  # latent samples
                    raw = {
                        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                        for k, v in raw.items()
                    }
                    bins = densify(raw, zero_bins)
                    counts = densify_counts(raw, bins.shape[1])
                    cell, expression = cell_inputs(model, bins, "auto", table)
                    nll, kl = model.count_loss(cell, counts, expression)
                    kl_weight = phase_kl_weight(step, total, config)
                    # scVI's scale: summed over genes (count_loss divides by n_genes), mean over cells —
                    # Adam's eps=0.01 assumes gradients of that size
                    loss = (nll + kl_weight * kl).mean() * model.config.n_count_genes
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if context.enabled:
                        for p in parameters:
                            if p.grad is not None:
                                dist.all_reduce(p.grad)
                                p.grad /= context.world_size
                    optimizer.step()
                    step += 1
                    progress.update(1)
                    progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            finally:
                batches.close()
            epochs_run = epoch + 1
            if epochs_run == 1 and len(steps_per_epoch) > 1:
                pace = (time.perf_counter() - started) / max(1, step)
                log.info(
                    "count head phase: %.0f ms a step, at most %.0f s for the remaining %d steps",
                    1000 * pace, pace * (total - step), total - step,
                )  # fmt: skip
            if early:
                loss_now = float(validate())
                model.train()
                curve.append(loss_now)
                if loss_now < best_loss:
                    best_loss, best_epoch, best_head = loss_now, epochs_run, head_state(model)
                elif epochs_run - best_epoch >= config.count_head_patience:
                    log.info(
                        "count head: no better validation loss for %d epochs, stopped",
                        epochs_run - best_epoch,
                    )
                    progress.total = step  # the bar ends where the phase did, not at the ceiling
                    progress.refresh()
                    break
    finally:
        progress.close()
        for p, flag in zip(frozen, was, strict=True):
            p.requires_grad_(flag)
    if best_head is not None:  # the best epoch's head (every rank holds the same parameters)
        model.load_state_dict(best_head, strict=False)
    if context.enabled:  # one set of batch-norm statistics: rank 0's
        for name, buffer in model.named_buffers():
            if is_head_parameter(name):
                dist.broadcast(buffer, 0)
    model.eval()
    result = {
        **summary,
        "steps": step,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch if early else epochs_run,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if early:
        result["val_count_loss_by_epoch"] = curve
    return result


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
