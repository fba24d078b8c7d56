"""The masked-bin task's losses and validation scores: the training losses of one batch, the fixed
validation batches and their scores, the count head's validation loss, one metrics row per validation
(``neurofm.checkpoints.METRIC_COLUMNS``) and the demo table.

Validation is the store's fixed validation rows (never trained on) with gene samples and masks drawn
once (``val_draws`` each, from a generator seeded ``seed + 1``), so the per-gene frequency-table
baseline is scored on exactly the same positions every time. Under DDP each rank scores its share and
the sums are all-reduced, so every rank returns the same numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from neurofm import runtime
from neurofm.batch_format import batch_observed, densify, densify_counts
from neurofm.loop import Window, to_device
from neurofm.masking import IGNORE_INDEX, MaskedBatch, make_batch
from neurofm.model import GeneEncoder
from neurofm.pooling import cell_inputs, feature_table
from neurofm.stream import CellStream, partly_observed_genes
from neurofm.train_config import TrainConfig

log = logging.getLogger(__name__)


def autocast(device: torch.device, config: TrainConfig):
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda"
    )


def losses(model, batch: MaskedBatch, device: torch.device, config: TrainConfig, reduction="mean"):
    """(masked-token loss, cell loss, count NLL, count KL, token logits): cross-entropy of the token head
    at the masked tokens and of the cell head (bins from the pooled cell vector alone) at
    ``batch.cell_labels``; with a count head and ``batch.counts``, its negative-binomial NLL and KL per
    gene (mean or sum over the cells; zeros otherwise). ``model`` is a GeneEncoder or a module whose
    forward is its ``pretrain_outputs`` (``neurofm.train``'s, wrapped in DDP under torchrun)."""
    forward = model.pretrain_outputs if isinstance(model, GeneEncoder) else model
    with autocast(device, config):
        logits, cell_logits, count_nll, count_kl = forward(
            *(batch.gene_ids, batch.input_bins, batch.padding_mask, batch.counts, batch.full_bins),
            *(batch.observed, batch.batch_index),
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
    observed_genes = partly_observed_genes(stream)
    total, n_cells, table = 0.0, 0, None
    for index, part in enumerate(stream.validation_batches(batch_size)):
        if index % context.world_size != context.rank:
            continue
        part = to_device(part, device)
        bins = densify(part, zero_bins)
        counts = densify_counts(part, bins.shape[1])
        observed = batch_observed(part, observed_genes)  # None: every gene measured
        if config.count_input == "all_genes":  # a lookup in the feature table, as at embedding time
            if table is None:
                table = feature_table(model)
            cell, expression = cell_inputs(model, bins, "auto", table, observed)
        else:  # "sampled": the visible tokens of a fixed draw, as in training
            generator = torch.Generator(device=device).manual_seed(config.seed + 2 + index)
            batch = make_batch(
                bins,
                config.max_tokens_per_cell,
                model.config.mask_token,
                config,
                generator,
                observed=observed,
            )
            keep = model.visible(batch.input_bins, batch.padding_mask)
            cell = model.pool(model.cell_features(batch.gene_ids, batch.input_bins), keep)
            expression = model.expression_features(batch.input_bins, batch.gene_ids, keep)
        with autocast(device, config):
            nll, kl = model.count_loss(cell, counts, expression, observed, part.get("batch_index"))
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
        nll, cell_nll, _, _, logits = losses(model, batch, device, config, reduction="sum")
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


def validation_batches(
    stream: CellStream,
    n_tokens: int,
    mask_token: int,
    config: TrainConfig,
    device: torch.device,
    eval_batch_size: int = 256,
) -> list[MaskedBatch]:
    """The fixed validation batches: the stream's validation rows, ``val_draws`` gene samples + masks
    each, drawn once from a generator seeded ``seed + 1``."""
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    zero_bins = stream.zero_bins.to(device)
    observed_genes = partly_observed_genes(stream)  # unmeasured genes get no token, as in training
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
        part = to_device(part, device)
        bins, observed = densify(part, zero_bins), batch_observed(part, observed_genes)
        for _ in range(config.val_draws):
            made = make_batch(bins, n_tokens, mask_token, config, generator, observed=observed)
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


@dataclass(frozen=True)
class ValidationSet:
    """What pre-training validates on."""

    batches: list[MaskedBatch]  # the fixed validation batches (validation_batches)
    baseline_perplexity: float  # the per-gene frequency table's perplexity on them
    baseline_masked_accuracy: float  # and its top-1 accuracy
    count_stream: CellStream | None = None  # with a count head: the stream whose validation cells it scores


def metrics_row(
    model: GeneEncoder, validation: ValidationSet, window: Window, device: torch.device, config: TrainConfig
) -> dict:
    """One metrics row: the fixed validation batches scored (and, with ``validation.count_stream``, the
    count head's loss on the stream's validation cells), the training losses of the ``window`` since the
    last one (``loss`` and ``cell`` averaged over the steps and the ranks), the training time since then
    (``epoch_time_s``) and the part of it spent waiting for the loader (``data_wait_s``: a fed
    accelerator keeps it near 0)."""
    context = runtime.current()
    total, total_cell = runtime.all_reduce_sums([window.sums["loss"], window.sums["cell"]], context)
    denominator = max(1, window.n_steps) * context.world_size
    val = score_validation(model, validation.batches, device, config)
    if validation.count_stream is not None:
        val["count_loss"] = validation_count_loss(model, validation.count_stream, device, config)
    baseline = validation.baseline_perplexity
    count_term = config.count_loss_weight * val["count_loss"] if model.count_head is not None else 0.0
    return {
        "epoch": window.epoch,
        "step": window.step,
        "train_loss": total / denominator,
        "train_cell_loss": total_cell / denominator,
        "val_loss": val["loss"],
        "val_cell_loss": val["cell_loss"],
        "val_count_loss": val["count_loss"],
        "val_total_loss": val["loss"] + config.cell_loss_weight * val["cell_loss"] + count_term,
        "val_perplexity": val["perplexity"],
        "val_masked_accuracy": val["masked_accuracy"],
        "baseline_perplexity": baseline,
        "perplexity_ratio": val["perplexity"] / baseline,
        "lr": window.lr,
        "epoch_time_s": window.seconds,
        "data_wait_s": window.data_wait,
    }


def log_row(row: dict) -> None:
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
    with autocast(device, config):
        padding = None if batch.padding_mask is None else batch.padding_mask[:1]
        logits = model(batch.gene_ids[:1], batch.input_bins[:1], padding)[0].float()
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
