"""Masked-bin pre-training: the split, masking, the training loop, checkpoints and resume.

``pretrain`` takes raw counts in an AnnData and writes, under ``out_dir``:

- ``best/`` and ``last/`` — model directories (``model.safetensors`` + ``config.json`` + tokenizer), the
  best by validation objective (``val_total_loss`` = masked-token loss + ``cell_loss_weight`` × cell
  loss) and the newest epoch;
- ``resume_state.pt`` — optimizer, learning-rate step, epoch, RNG states and metrics so far (tensors and
  plain containers only, read back with ``torch.load(weights_only=True)``);
- ``metrics.csv``, ``curves.png`` (loss / perplexity / masked accuracy per epoch) and ``demo.txt`` (top-k
  predicted bins against the truth for one validation cell).

Each step samples ``max_tokens_per_cell`` genes per cell (all of them when the cap is larger than the gene
count) and masks ``mask_ratio`` of those tokens, ``nonzero_mask_share`` of the masked ones on non-zero bins
(bin > 0), as the original did — all with tensor ops on the batch. The loss is the masked-token
cross-entropy plus ``cell_loss_weight`` × the cell head's cross-entropy (bins predicted from the pooled
cell vector alone, see ``neurofm.model``; at the masked or at all tokens, ``cell_loss_tokens``). Validation uses gene samples and masks
drawn once, so the per-gene frequency-table baseline is scored on exactly the same positions every epoch.

The same loop runs data-parallel under ``torchrun`` (see ``neurofm.distributed``): every rank draws the
same global batch and masks and trains on its share of the rows with the loss scaled so that DDP's
gradient average equals the single-process gradient; validation sums are all-reduced; rank 0 alone
writes outputs and calls ``on_epoch_end``. ``nproc_per_node > 1`` makes the pretrain step launch it.

Run on the shared data::

    python -c "from neurofm.io import read_h5ad; from neurofm.train import *; \\
        pretrain(read_h5ad('../shared/data/subset_2523_210_Cerebral-cortex.screened.h5ad'), \\
        TokenizerConfig(), ModelConfig(), TrainConfig(), 'runs/pretrain')"
"""

from __future__ import annotations

import csv
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from neurofm import runtime
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, ensure_writable_dir, write_json, write_text
from neurofm.model import GeneEncoder, ModelConfig
from neurofm.tokenizer import MIN_CELLS, ExpressionTokenizer, TokenizerConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that are not scored
BEST_DIR, LAST_DIR = "best", "last"
RESUME_FILE = "resume_state.pt"
METRICS_FILE, CURVES_FILE, DEMO_FILE = "metrics.csv", "curves.png", "demo.txt"
BASELINE_SMOOTHING = 0.5  # add-½ counts in the per-gene frequency table (never a zero probability)


@dataclass
class TrainConfig:
    """How to train; every field is a plain value so it can live in YAML and be logged."""

    epochs: int = 30  # passes over the training cells
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
    nonzero_mask_share: float = 0.5  # share of the masked tokens forced onto non-zero bins (when available)
    max_tokens_per_cell: int = 256  # genes sampled per cell per step (padding + key-padding mask if fewer)
    val_fraction: float = 0.2  # share of cells held out for validation
    val_draws: int = 2  # independent gene samples + masks per validation cell (fixed for the whole run)
    seed: int = 42  # seeds the split, sampling, masking and initial weights
    device: str = "auto"  # "auto" (cuda > mps > cpu), "cpu", "cuda", "cuda:1", "mps"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU/MPS, which stay float32 and deterministic)
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    nproc_per_node: int = 1  # data-parallel processes (>1: the pretrain step launches them with torchrun)
    dist_backend: str = "auto"  # process-group backend: "auto" (nccl on CUDA, else gloo), "gloo", "nccl"
    demo_top_k: int = 3  # predicted bins shown per masked gene in demo.txt
    progress: bool = True  # tqdm progress bar

    def validate(self) -> TrainConfig:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1"),
            (0 < self.lr <= 1, "lr must be in (0, 1]"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (0 < self.mask_ratio < 1, "mask_ratio must be in (0, 1)"),
            (self.cell_loss_weight >= 0, "cell_loss_weight must be >= 0"),
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

    metrics: list[dict]  # one dict per epoch (see METRIC_COLUMNS)
    best_dir: Path  # model directory with the lowest validation objective (val_total_loss)
    last_dir: Path  # model directory of the final epoch
    baseline_perplexity: float  # per-gene frequency table on the fixed validation masks
    baseline_masked_accuracy: float
    artifacts: dict[str, Path] = field(
        default_factory=dict
    )  # metrics_csv, curves_png, demo_txt, resume_state
    demo: str = ""  # the demo text (also in demo.txt)
    wall_time_s: float = 0.0  # time spent training + validating in this call

    @property
    def best(self) -> dict:
        return min(self.metrics, key=lambda row: row["val_total_loss"])


METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_cell_loss",
    "val_loss",
    "val_cell_loss",
    "val_total_loss",
    "val_perplexity",
    "val_masked_accuracy",
    "baseline_perplexity",
    "perplexity_ratio",
    "lr",
    "epoch_time_s",
)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → cuda if available, else mps, else cpu; other names are checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise NeurofmError(f"device {name!r} is not a torch device; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NeurofmError(f"device {name!r} asked for but CUDA is not available; use device='auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NeurofmError(f"device {name!r} asked for but MPS is not available; use device='auto' or 'cpu'")
    return device


# ---------------------------------------------------------------------------------------------- data
def split_cells(n_cells: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's split: shuffle ``arange(n_cells)`` with ``RandomState(seed)``; the last
    ``int(n_cells * val_fraction)`` cells are validation. Raises NeurofmError when either side is too
    small."""
    n_val = int(n_cells * val_fraction)
    if n_val < 1 or n_cells - n_val < MIN_CELLS:
        raise NeurofmError(
            f"{n_cells} cells are too few for a {val_fraction:.0%} validation split (need >= 1 "
            "validation and "
            f">= {MIN_CELLS} training cells); pass more cells or change val_fraction"
        )
    order = np.arange(n_cells)
    np.random.RandomState(seed).shuffle(order)
    return order[: n_cells - n_val], order[n_cells - n_val :]


def sample_genes(
    n_cells: int, n_genes: int, n_tokens: int, generator: torch.Generator, device: torch.device | None = None
) -> torch.Tensor:
    """(n_cells, n_tokens) gene indices, a uniform sample without replacement per cell, sorted."""
    if n_tokens >= n_genes:
        return torch.arange(n_genes, device=device).expand(n_cells, n_genes).clone()
    keys = torch.rand(n_cells, n_genes, generator=generator, device=generator.device)
    return keys.topk(n_tokens, dim=1).indices.sort(dim=1).values.to(device)


def mask_tokens(
    bins: torch.Tensor,
    mask_ratio: float,
    nonzero_share: float,
    generator: torch.Generator,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (cells, tokens) mask: ``max(1, int(mask_ratio * n_real))`` tokens per cell, of which
    ``round(nonzero_share * k)`` sit on non-zero bins (fewer if the cell lacks them, the rest on zeros,
    and vice versa) — the original's rule, vectorised over the batch."""
    if padding_mask is None:
        padding_mask = torch.zeros_like(bins, dtype=torch.bool)
    real = ~padding_mask
    nonzero = (bins > 0) & real
    zero = (bins == 0) & real
    n_real = real.sum(1)
    n_nonzero, n_zero = nonzero.sum(1), zero.sum(1)
    k_total = torch.clamp((n_real.double() * mask_ratio).floor().long(), min=1)
    k_nonzero = torch.minimum(torch.round(k_total.double() * nonzero_share).long(), n_nonzero)
    k_zero = torch.minimum(k_total - k_nonzero, n_zero)
    k_nonzero = torch.minimum(k_total - k_zero, n_nonzero)  # zeros ran short: take more non-zeros

    keys = torch.rand(bins.shape, generator=generator, device=generator.device).to(bins.device)

    def first_k(candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ranked = torch.where(candidates, keys, torch.full_like(keys, 2.0)).argsort(dim=1)
        rank = torch.empty_like(ranked).scatter_(
            1, ranked, torch.arange(bins.shape[1], device=bins.device).expand_as(ranked).contiguous()
        )
        return candidates & (rank < k[:, None])

    return first_k(nonzero, k_nonzero) | first_k(zero, k_zero)


@dataclass
class _Batch:
    gene_ids: torch.Tensor  # (cells, tokens)
    input_bins: torch.Tensor  # bins with masked tokens replaced by the mask token
    labels: torch.Tensor  # true bin at masked tokens, IGNORE_INDEX elsewhere
    cell_labels: torch.Tensor  # what the cell head is scored on: labels, or the true bin of every token
    padding_mask: torch.Tensor | None

    def rows(self, part: slice) -> _Batch:
        """The cells ``part`` of the batch (a rank's share under DDP)."""
        return _Batch(
            self.gene_ids[part],
            self.input_bins[part],
            self.labels[part],
            self.cell_labels[part],
            None if self.padding_mask is None else self.padding_mask[part],
        )

    @property
    def n_scored(self) -> tuple[int, int]:
        """(masked tokens, tokens the cell head is scored on)."""
        return int((self.labels != IGNORE_INDEX).sum()), int((self.cell_labels != IGNORE_INDEX).sum())


def make_batch(
    bins: torch.Tensor, n_tokens: int, mask_token: int, config: TrainConfig, generator: torch.Generator
) -> _Batch:
    """Sample genes and masks for the cells in ``bins`` (cells × all genes)."""
    gene_ids = sample_genes(bins.shape[0], bins.shape[1], n_tokens, generator, bins.device)
    token_bins = torch.gather(bins, 1, gene_ids).long()
    masked = mask_tokens(token_bins, config.mask_ratio, config.nonzero_mask_share, generator)
    labels = torch.where(masked, token_bins, torch.full_like(token_bins, IGNORE_INDEX))
    return _Batch(
        gene_ids=gene_ids,
        input_bins=torch.where(masked, torch.full_like(token_bins, mask_token), token_bins),
        labels=labels,
        cell_labels=labels if config.cell_loss_tokens == "masked" else token_bins,
        padding_mask=None,
    )


def _epoch_batches(n_train: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled positions into the training cells, cut into global batches (the last may be smaller).

    Under DDP every rank draws the same order from its identically seeded generator and takes its
    share of each batch's rows (``neurofm.runtime.shard``), so the global batches are exactly the
    single-process ones."""
    order = torch.randperm(n_train, generator=generator)
    return list(order.split(batch_size))


# ---------------------------------------------------------------------------------------------- baseline
def frequency_table(train_bins: np.ndarray, n_bins: int, smoothing: float = BASELINE_SMOOTHING) -> np.ndarray:
    """(genes, n_bins) probability of each bin per gene over the training cells, add-``smoothing``."""
    n_cells, n_genes = train_bins.shape
    flat = (np.arange(n_genes)[None, :] * n_bins + train_bins.astype(np.int64)).ravel()
    counts = np.bincount(flat, minlength=n_genes * n_bins).reshape(n_genes, n_bins) + smoothing
    return counts / counts.sum(axis=1, keepdims=True)


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
    """``GeneEncoder.pretrain_logits`` as a module's ``forward``, which DistributedDataParallel wraps."""

    def __init__(self, model: GeneEncoder):
        super().__init__()
        self.model = model

    def forward(self, gene_ids, bin_ids, padding_mask=None):
        return self.model.pretrain_logits(gene_ids, bin_ids, padding_mask)


def _losses(model, batch: _Batch, device: torch.device, config: TrainConfig, reduction="mean"):
    """(masked-token loss, cell loss, token logits): cross-entropy of the token head at the masked tokens
    and of the cell head (bins from the pooled cell vector alone) at ``batch.cell_labels``. ``model`` is a
    GeneEncoder or its DDP-wrapped ``_PretrainForward``."""
    forward = model.pretrain_logits if isinstance(model, GeneEncoder) else model
    with _autocast(device, config):
        logits, cell_logits = forward(batch.gene_ids, batch.input_bins, batch.padding_mask)
    token_loss = F.cross_entropy(
        logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )
    cell_loss = F.cross_entropy(
        cell_logits.float().flatten(0, 1),
        batch.cell_labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return token_loss, cell_loss, logits


@torch.no_grad()
def evaluate(model: GeneEncoder, batches: list[_Batch], device: torch.device, config: TrainConfig) -> dict:
    """Masked loss (token-weighted mean NLL), perplexity and top-1 accuracy over fixed batches, and the
    cell head's loss (``cell_loss``, token-weighted mean NLL). Under DDP each rank scores its share of
    the batches and the sums are all-reduced, so every rank returns the same metrics."""
    context = runtime.current()
    model.eval()
    total_nll, total_cell_nll, total_correct, total_masked, total_cell = 0.0, 0.0, 0, 0, 0
    for batch in batches[context.rank :: context.world_size]:
        nll, cell_nll, logits = _losses(model, batch, device, config, reduction="sum")
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
        "perplexity": math.exp(loss),
        "masked_accuracy": total_correct / max(1, total_masked),
    }


def _fixed_val_batches(
    val_bins: torch.Tensor, n_tokens: int, mask_token: int, config: TrainConfig, eval_batch_size: int = 256
) -> list[_Batch]:
    generator = torch.Generator(device=val_bins.device).manual_seed(config.seed + 1)
    repeated = val_bins.repeat(config.val_draws, 1)
    return [
        make_batch(chunk, n_tokens, mask_token, config, generator)
        for chunk in repeated.split(eval_batch_size)
    ]


def _baseline_scores(table: np.ndarray, batches: list[_Batch]) -> tuple[float, float]:
    table = torch.from_numpy(table)
    log_table = table.log()
    nll, correct, masked = 0.0, 0, 0
    for batch in batches:
        scored = batch.labels != IGNORE_INDEX
        genes, labels = batch.gene_ids[scored].cpu(), batch.labels[scored].cpu()
        nll -= log_table[genes, labels].sum().item()
        correct += (table[genes].argmax(1) == labels).sum().item()
        masked += len(labels)
    return math.exp(nll / masked), correct / masked


def pretrain(
    adata: ad.AnnData,
    tokenizer_config: TokenizerConfig | None = None,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike = "pretrain",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    resume: bool = False,
    *,
    tokenizer: ExpressionTokenizer | None = None,
) -> TrainResult:
    """Pre-train a :class:`GeneEncoder` on the raw counts in ``adata`` to predict masked expression bins.

    The split is seeded (``split_cells``); the tokenizer is fit on the training cells only — or pass an
    already fitted ``tokenizer`` (fit on the same ``split_cells`` training cells; its config then wins
    over ``tokenizer_config``). The model's ``n_genes``/``n_bins``/``max_tokens`` are taken from the
    tokenizer and ``max_tokens_per_cell``. After every epoch the metrics dict (keys ``METRIC_COLUMNS``)
    goes to ``on_epoch_end(epoch, metrics)`` once checkpoints are written; an exception raised there
    (e.g. an Optuna prune) stops training and propagates. ``resume=True`` continues from
    ``out_dir/resume_state.pt`` (bit-identical to an uninterrupted run on CPU). Returns a
    :class:`TrainResult`.
    """
    train_config = (train_config or TrainConfig()).validate()
    train_idx, val_idx = split_cells(adata.n_obs, train_config.val_fraction, train_config.seed)
    if tokenizer is None:
        tokenizer = ExpressionTokenizer((tokenizer_config or TokenizerConfig()).validate())
        tokenizer.fit(adata, train_idx)
    elif not tokenizer.is_fitted:
        raise NeurofmError("the tokenizer passed to pretrain is not fitted; fit it or pass tokenizer_config")
    n_bins = tokenizer.config.n_bins
    n_tokens = min(train_config.max_tokens_per_cell, tokenizer.n_genes)
    model_config = replace(
        model_config or ModelConfig(), n_genes=tokenizer.n_genes, n_bins=n_bins, max_tokens=n_tokens
    ).validate()
    out_dir = ensure_writable_dir(out_dir)
    context = runtime.current()
    device = resolve_device(train_config.device)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    with _torch_threads(train_config.num_threads):
        return _pretrain(
            adata,
            tokenizer,
            model_config,
            train_config,
            out_dir,
            on_epoch_end,
            resume,
            context,
            device,
            n_tokens,
            (train_idx, val_idx),
        )


@contextmanager
def _torch_threads(n_threads: int | None):
    """``torch.set_num_threads(n_threads)`` for the block only (the setting is process-global)."""
    if n_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrain(
    adata: ad.AnnData,
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
    train_idx, val_idx = split
    n_bins = tokenizer.config.n_bins

    # data: all bins (tokenizer gene order) on the device once
    bins = tokenizer.transform(adata)
    train_bins = torch.from_numpy(bins[train_idx]).to(device)
    val_bins = torch.from_numpy(bins[val_idx]).to(device)
    mask_token = model_config.mask_token

    val_batches = _fixed_val_batches(val_bins, n_tokens, mask_token, train_config)
    table = frequency_table(bins[train_idx], n_bins)
    baseline_ppl, baseline_acc = _baseline_scores(table, val_batches)
    log.info(
        "%d train / %d validation cells, %d genes, %d tokens per cell; frequency baseline perplexity %.3f",
        len(train_idx),
        len(val_idx),
        tokenizer.n_genes,
        n_tokens,
        baseline_ppl,
    )

    torch.manual_seed(train_config.seed)
    model = GeneEncoder(model_config)
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
    generator = torch.Generator(device=device).manual_seed(train_config.seed)
    steps_per_epoch = math.ceil(len(train_idx) / train_config.batch_size)
    total_steps = steps_per_epoch * train_config.epochs
    state = {"epoch": 0, "step": 0, "best_val_loss": math.inf, "metrics": []}  # best: val_total_loss
    if resume:
        state = _load_resume_state(
            out_dir, model, optimizer, generator, model_config, tokenizer, train_config
        )

    metrics_rows: list[dict] = state["metrics"]
    progress = tqdm(
        total=total_steps,
        initial=state["step"],
        desc="pretrain",
        unit="step",
        disable=not (train_config.progress and context.is_main),
    )
    for epoch in range(state["epoch"] + 1, train_config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        running, running_cell, n_steps = 0.0, 0.0, 0
        for positions in _epoch_batches(len(train_idx), train_config.batch_size, generator):
            lr = _lr_at(state["step"], total_steps, train_config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = make_batch(
                train_bins[positions.to(device)], n_tokens, mask_token, train_config, generator
            )
            n_masked, n_cell_scored = batch.n_scored  # over the global batch
            if context.enabled:
                batch = batch.rows(runtime.shard(len(positions), context))
            token_sum, cell_sum, _ = _losses(trainable, batch, device, train_config, reduction="sum")
            # this rank's share of the global-batch means; DDP averages gradients over the ranks, so
            # the world-size factor makes the applied gradient the single-process one
            token_loss, cell_loss = token_sum / max(1, n_masked), cell_sum / max(1, n_cell_scored)
            loss = (token_loss + train_config.cell_loss_weight * cell_loss) * context.world_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            running += token_loss.item()
            running_cell += cell_loss.item()
            n_steps += 1
            state["step"] += 1
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{token_loss.item():.3f}", cell=f"{cell_loss.item():.3f}")
        running, running_cell = runtime.all_reduce_sums([running, running_cell], context)
        val = evaluate(model, val_batches, device, train_config)
        row = {
            "epoch": epoch,
            "train_loss": running / max(1, n_steps),
            "train_cell_loss": running_cell / max(1, n_steps),
            "val_loss": val["loss"],
            "val_cell_loss": val["cell_loss"],
            "val_total_loss": val["loss"] + train_config.cell_loss_weight * val["cell_loss"],
            "val_perplexity": val["perplexity"],
            "val_masked_accuracy": val["masked_accuracy"],
            "baseline_perplexity": baseline_ppl,
            "perplexity_ratio": val["perplexity"] / baseline_ppl,
            "lr": lr,
            "epoch_time_s": time.perf_counter() - epoch_started,
        }
        metrics_rows.append(row)
        state["epoch"] = epoch
        is_best = row["val_total_loss"] < state["best_val_loss"]
        state["best_val_loss"] = min(state["best_val_loss"], row["val_total_loss"])
        if not context.is_main:
            continue
        _write_epoch_outputs(out_dir, model, tokenizer, optimizer, generator, state, is_best, train_config)
        log.info(
            "epoch %d: train %.4f  val %.4f  cell %.4f  ppl %.3f (baseline %.3f, ratio %.3f)  acc %.3f",
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["val_cell_loss"],
            row["val_perplexity"],
            baseline_ppl,
            row["perplexity_ratio"],
            row["val_masked_accuracy"],
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, dict(row))
    progress.close()

    demo, artifacts = "", {}
    if context.is_main:
        demo = demo_prediction(model, val_batches[0], train_config.demo_top_k, device, train_config)
        artifacts = _write_final_outputs(out_dir, metrics_rows, demo)
        artifacts["resume_state"] = out_dir / RESUME_FILE
    if context.enabled:
        torch.distributed.barrier()  # the other ranks return once rank 0's outputs are complete
    return TrainResult(
        metrics=metrics_rows,
        best_dir=out_dir / BEST_DIR,
        last_dir=out_dir / LAST_DIR,
        baseline_perplexity=baseline_ppl,
        baseline_masked_accuracy=baseline_acc,
        artifacts=artifacts,
        demo=demo,
        wall_time_s=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------- outputs
def _write_epoch_outputs(
    out_dir: Path,
    model: GeneEncoder,
    tokenizer: ExpressionTokenizer,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict,
    is_best: bool,
    config: TrainConfig,
) -> None:
    """Checkpoints, resume state and the metrics CSV after one epoch. DDP: call on rank 0 only."""
    model.save_pretrained(out_dir / LAST_DIR, tokenizer)
    if is_best:
        model.save_pretrained(out_dir / BEST_DIR, tokenizer)
    resume_state = {
        "epoch": state["epoch"],
        "step": state["step"],
        "best_val_loss": state["best_val_loss"],
        "metrics": [dict(row) for row in state["metrics"]],
        "optimizer": optimizer.state_dict(),
        # the weights too, so the resume state is one self-consistent file: a crash between writing
        # last/ and this file can never pair epoch-k weights with an epoch-(k-1) optimizer
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "train_config": asdict(config),
    }
    with atomic_path(out_dir / RESUME_FILE) as tmp:
        torch.save(resume_state, tmp)
    _write_metrics_csv(out_dir / METRICS_FILE, state["metrics"])


def _load_resume_state(
    out_dir: Path,
    model: GeneEncoder,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    model_config: ModelConfig,
    tokenizer: ExpressionTokenizer,
    config: TrainConfig,
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
    changed = {
        k
        for k, v in saved["train_config"].items()
        if k not in ("epochs", "progress", "num_threads", "device", "nproc_per_node", "dist_backend")
        and asdict(config).get(k) != v
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
    model.load_state_dict(saved["model"] if "model" in saved else last_model.state_dict())
    optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    log.info("resuming after epoch %d (step %d)", saved["epoch"], saved["step"])
    return {
        "epoch": saved["epoch"],
        "step": saved["step"],
        "best_val_loss": saved["best_val_loss"],
        "metrics": list(saved["metrics"]),
    }


def _write_metrics_csv(path: Path, rows: list[dict]) -> None:
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
        {key: int(value) if key == "epoch" else float(value) for key, value in row.items()} for row in rows
    ]


def _write_final_outputs(out_dir: Path, rows: list[dict], demo: str) -> dict[str, Path]:
    from neurofm.plots import plot_pretrain_curves

    _write_metrics_csv(out_dir / METRICS_FILE, rows)
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


@torch.no_grad()
def demo_prediction(
    model: GeneEncoder, batch: _Batch, top_k: int, device: torch.device, config: TrainConfig
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
