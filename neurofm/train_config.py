"""How a pre-training run trains: :class:`TrainConfig`, every setting of the loop (``neurofm.train``), the
count head's phase (``neurofm.count_phase``) and the streaming loader, as plain values for YAML and MLflow."""

from __future__ import annotations

from dataclasses import dataclass

from neurofm.errors import NeurofmError


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
    #                                       cells with the token features frozen (neurofm.count_phase) for
    #                                       this many epochs; None: scVI's rule min(round(20000 / n × 400),
    #                                       400), the budget of the scVI baseline; 0: no such phase
    count_head_batch_size: int = 128  # cells per step of that phase (scVI's default)
    count_head_lr: float = 1e-3  # Adam learning rate of that phase (scVI's default)
    count_head_patience: int = 45  # that phase keeps its best epoch by the validation count loss and stops
    #                                after this many epochs without a better one (scVI's patience); 0: it
    #                                runs every epoch and keeps the last
    count_head_kl_warmup: float = 0.0  # share of that phase's steps (its epoch ceiling) over which the KL
    #                                    weight rises from 0 to kl_weight again; 0: the full weight from the
    #                                    first step, as the head ended pre-training; 1: scVI's warm-up over
    #                                    the whole budget
    batch_key: str | None = None  # the count head's batch covariate (model.latent_dim > 0): the obs column
    #                               of each cell's batch (donor, chemistry, study…; "dataset": a multi-file
    #                               store's source file), as scVI's batch_key; its values become
    #                               model.batch_names. None: no covariate
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
        from neurofm.runtime import resolve_device  # torch: imported when a config is checked, not before

        resolve_device(self.device)
        return self
