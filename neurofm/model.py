"""The one model definition: a masked-bin transformer encoder over gene tokens.

A cell is a set of gene tokens. Each token is the sum of a gene-identity embedding (which gene) and a
bin embedding (its expression bin, or the mask token). Pre-LayerNorm transformer blocks with fused
attention (``torch.nn.functional.scaled_dot_product_attention``) mix the tokens; a key-padding mask
lets cells with different numbers of tokens share a batch. A linear head predicts each token's bin.

Each token also carries a gene × bin term (``gene_embedding ⊙ bin_scale``), so a token says which gene
has which bin on its own. The **cell vector** is the mean of the layer-normalised token embeddings over a
cell's tokens (no transformer layer). A second head (after scGPT's "MVC" objective) predicts the bins of
the cell's genes from the cell vector and each gene's query vector only: ``logits = cell_head(LayerNorm((cell
+ histogram_proj(histogram)) ⊙ gene_query(gene_embedding)))`` plus the per-gene bias, where ``histogram``
is the cell's mean bin embedding, a nuisance covariate for depth and sparsity.

The **count head** (:class:`CountHead`, ``latent_dim > 0``, the default 16), after scVI: the cell vector of
all the cell's genes is encoded (Linear, BatchNorm, ReLU) into a variational latent; a decoder (Linear,
BatchNorm, ReLU, Linear) gives every gene's negative-binomial mean as ``softmax × library size`` (the
cell's total count, an offset, so the latent need not carry depth) with a learned per-gene dispersion.
An optional per-cell batch covariate (``batch_names``) enters the first layer of both, as in scVI. The **cell embedding**
(:meth:`GeneEncoder.cell_embedding`, what ``neurofm.embed()`` writes) is the latent mean; with
``latent_dim=0`` it is the cell vector itself. Measurements behind these choices are in BENCHMARKS.md.

There is no positional embedding: gene order carries no meaning, the gene embedding is the position.

A model directory (``save_pretrained`` / ``load_pretrained``) holds ``model.safetensors`` (weights),
``config.json`` (the :class:`ModelConfig`) and the tokenizer files — no pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from neurofm.count_head import CountHead, batch_codes  # noqa: F401  (batch_codes: re-exported)
from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, write_json
from neurofm.model_config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_FORMAT_VERSION = 1
# fields whose default changed after models were saved without them (CHANGELOG.md): the value such a model
# was built with
LEGACY_DEFAULTS = {"latent_dim": 0, "latent_reads_expression": False, "count_genes": 0}


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (batch, heads, length, head_dim)
        q, k, v = (
            t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2) for t in (q, k, v)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.ffn_dim)
        self.down = nn.Linear(config.ffn_dim, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_attention = nn.LayerNorm(config.d_model)
        self.attention = SelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.ln_attention(x), attend))
        return x + self.dropout(self.ffn(self.ln_ffn(x)))


class GeneEncoder(nn.Module):
    """Gene tokens in, per-token hidden states (``encode``), bin logits (``forward``), cell vectors
    (``cell_embedding``) or bin logits predicted from the cell vector alone (``cell_logits``) out.

    Inputs, all (batch, tokens): ``gene_ids`` in [0, n_genes), ``bin_ids`` in [0, n_bins] (n_bins =
    mask token), ``padding_mask`` True where a token is padding (ignored as a key; its output is junk).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.gene_embedding = nn.Embedding(config.n_genes, config.d_model)
        self.bin_embedding = nn.Embedding(config.n_bins + 1, config.d_model)  # + mask token
        # per-bin scale of the gene embedding: the gene × bin term of a token; None when turned off
        self.bin_scale = (
            nn.Embedding(config.n_bins + 1, config.d_model) if config.gene_bin_interaction else None
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.ln_input = nn.LayerNorm(config.d_model)  # token embeddings as they enter the cell vector
        self.head = nn.Linear(config.d_model, config.n_bins)
        # cell head: a gene's bin from the pooled cell vector and the gene's query vector
        self.gene_query = nn.Linear(config.d_model, config.d_model)
        self.histogram_proj = nn.Sequential(
            nn.Linear(config.d_model, config.d_model), nn.GELU(), nn.Linear(config.d_model, config.d_model)
        )
        self.ln_cell = nn.LayerNorm(config.d_model)
        self.cell_head = nn.Linear(config.d_model, config.n_bins)
        # per-gene prior over bins, added to the logits; None when the config turns it off
        self.gene_bin_bias = nn.Embedding(config.n_genes, config.n_bins) if config.gene_bin_bias else None
        # count head (latent_dim > 0): cell vector -> variational latent -> NB means of every gene
        self.count_head = CountHead(config) if config.latent_dim > 0 else None
        self.apply(self._init_weights)
        if self.gene_bin_bias is not None:
            nn.init.zeros_(self.gene_bin_bias.weight)
        if self.count_head is not None:
            self.count_head.reset_expression_weight()
        if self.bin_scale is not None:  # order one, so the product is as large as the embeddings
            nn.init.normal_(self.bin_scale.weight, mean=0.0, std=1.0)
        for name, parameter in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed_tokens(self, gene_ids: torch.Tensor, bin_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (batch, tokens, d_model): gene + bin + gene ⊙ bin scale."""
        genes = self.gene_embedding(gene_ids)
        x = genes + self.bin_embedding(bin_ids)
        return x if self.bin_scale is None else x + genes * self.bin_scale(bin_ids)

    def encode(
        self, gene_ids: torch.Tensor, bin_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-layer hidden states (batch, tokens, d_model), after the last LayerNorm."""
        if gene_ids.shape[1] > self.config.max_tokens:
            raise NeurofmError(
                f"{gene_ids.shape[1]} tokens exceed max_tokens={self.config.max_tokens}; chunk the genes"
            )
        x = self.embed_tokens(gene_ids, bin_ids)
        # SDPA boolean mask: True = may attend; broadcast over heads and queries
        attend = None if padding_mask is None else (~padding_mask)[:, None, None, :]
        for block in self.blocks:
            x = block(x, attend)
        return self.ln_final(x)

    def cell_features(self, gene_ids: torch.Tensor, bin_ids: torch.Tensor) -> torch.Tensor:
        """Per-token vectors (batch, tokens, d_model) whose mean over a cell's tokens is its cell vector:
        the layer-normalised token embeddings (each depends on its own token only)."""
        return self.ln_input(self.embed_tokens(gene_ids, bin_ids))

    def forward(
        self, gene_ids: torch.Tensor, bin_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bin logits (batch, tokens, n_bins)."""
        return self._with_bias(self.head(self.encode(gene_ids, bin_ids, padding_mask)), gene_ids)

    @staticmethod
    def pool(hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, d_model) mean of ``hidden`` (batch, tokens, d_model) over the tokens where ``keep``
        (batch, tokens) is True; over all tokens when ``keep`` is None."""
        if keep is None:
            return hidden.mean(1)
        weights = keep.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def cell_embedding(
        self, gene_ids: torch.Tensor, bin_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, embedding_dim) cell embeddings: the cell features of the tokens (:meth:`cell_features`:
        the layer-normalised gene × bin token embeddings, no transformer layer) mean-pooled over the
        non-padding tokens, then, with a count head, the latent mean (:meth:`embedding_from_cell`) —
        what ``neurofm.embed`` computes for every gene of a cell."""
        keep = None if padding_mask is None else ~padding_mask
        cell = self.pool(self.cell_features(gene_ids, bin_ids), keep)
        if keep is None:
            keep = torch.ones_like(gene_ids, dtype=torch.bool)
        return self.embedding_from_cell(cell, self.expression_features(bin_ids, gene_ids, keep))

    def cell_logits(
        self, cell: torch.Tensor, gene_ids: torch.Tensor, histogram: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, tokens, n_bins) bin logits of the genes ``gene_ids`` (batch, tokens) predicted from the
        cell vectors ``cell`` (batch, d_model) — no token of the cell is seen here. ``histogram`` (batch,
        d_model), the mean bin embedding of the cell's visible tokens, is a nuisance covariate (like a
        library size): it explains depth and sparsity so that ``cell`` is free to carry the profile."""
        if histogram is not None:
            cell = cell + self.histogram_proj(histogram)
        query = self.gene_query(self.gene_embedding(gene_ids))
        return self._with_bias(self.cell_head(self.ln_cell(cell[:, None, :] * query)), gene_ids)

    def pretrain_logits(
        self, gene_ids: torch.Tensor, bin_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads in one pass: (token logits, cell logits), each (batch, tokens, n_bins). The cell
        vector pools the real tokens whose bin is visible (not the mask token), as at embedding time."""
        return self.pretrain_outputs(gene_ids, bin_ids, padding_mask)[:2]

    def pretrain_outputs(
        self,
        gene_ids: torch.Tensor,
        bin_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        full_bins: torch.Tensor | None = None,
        observed: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`pretrain_logits` plus, with a count head and the cells' raw ``counts`` (batch, n_genes),
        the count head's per-cell negative-binomial NLL and KL divergence, each divided by the count genes
        (``None, None`` otherwise). The count head reads the cell vector of ``full_bins`` (batch,
        n_genes: every gene's bin, as at embedding time) when given, else that of the visible tokens.
        ``observed`` (batch, n_genes bool; None: all) marks the genes each cell's file measured: the
        count head reads and scores only those; ``batch_index`` (batch,) each cell's batch, for a count head
        with a batch covariate. The latent is sampled (reparameterised) in training mode."""
        hidden = self.encode(gene_ids, bin_ids, padding_mask)
        keep = self.visible(bin_ids, padding_mask)
        cell = self.pool(self.cell_features(gene_ids, bin_ids), keep)
        histogram = self.pool(self.bin_embedding(bin_ids), keep)  # the cell's bin mix: depth, sparsity
        logits = self._with_bias(self.head(hidden), gene_ids)
        cell_logits = self.cell_logits(cell, gene_ids, histogram)
        if self.count_head is None or counts is None:
            return logits, cell_logits, None, None
        if full_bins is None:  # "sampled": the visible tokens
            expression = self.expression_features(bin_ids, gene_ids, keep)
        else:
            cell = self.pooled_cell(full_bins, observed)
            expression = self.expression_features(full_bins, keep=observed)
        nll, kl = self.count_head.loss(cell, counts, expression, observed, batch_index)
        return logits, cell_logits, nll, kl

    def visible(self, bin_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, tokens) bool: the tokens the cell vector pools in pre-training — real, not masked, and
        with bin > 0 for ``cell_pooling="nonzero"``."""
        keep = bin_ids != self.config.mask_token
        if padding_mask is not None:
            keep = keep & ~padding_mask
        if self.config.cell_pooling == "nonzero":
            keep = keep & (bin_ids > 0)
        return keep

    def pooled_cell(self, bins: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, d_model) cell vectors of whole cells: ``bins`` (batch, n_genes) holds every gene's bin;
        pooled over every gene, or over the genes with bin > 0 for ``cell_pooling="nonzero"`` — the
        cell vector ``neurofm.embed`` pools (pooling ``"auto"``); with ``observed`` (batch, n_genes bool)
        over each cell's measured genes only.

        Computed over the cells' non-zero genes, so memory and time grow with those, not with cells ×
        genes × d_model (1.3 GB for 32 cells of a 20,000-gene atlas, with autograd): a token's features
        depend on its own (gene, bin) only, so with ``r`` each gene's lowest bin in the batch (its zero
        bin, almost always), sum_g f(g, b) = sum_g f(g, r_g) + sum over the genes with b != r_g of
        f(g, b) - f(g, r_g). Those genes are gathered into a padded (cells, most such genes) block and
        summed densely — deterministic, unlike scatter-adds on threads."""
        bins = bins.long()
        n_cells, n_genes = bins.shape
        all_genes = torch.arange(n_genes, device=bins.device)
        nonzero = self.config.cell_pooling == "nonzero"  # the mean over the genes with bin > 0
        reference = torch.zeros_like(all_genes) if nonzero else bins.min(0).values
        changed = bins != reference if not nonzero else bins > 0
        if observed is not None:
            changed = changed & observed
        n_changed = changed.sum(1)
        width = max(1, int(n_changed.max()) if n_cells else 1)
        # each cell's changed genes first, in gene order (a stable sort of "unchanged"), then padding
        genes = torch.argsort((~changed).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=bins.device)[None, :] < n_changed[:, None]
        features = self.cell_features(genes, torch.gather(bins, 1, genes))
        if nonzero:
            summed = (features * valid[..., None].to(features.dtype)).sum(1)
            return summed / n_changed.clamp(min=1)[:, None].to(summed.dtype)
        delta = features - self.cell_features(genes, reference[genes])
        if observed is not None:  # each cell's measured genes at their reference bin
            base = observed.to(features.dtype) @ self.cell_features(all_genes[None], reference[None])[0]
            summed = base + (delta * valid[..., None].to(delta.dtype)).sum(1)
            return summed / observed.sum(1, keepdim=True).clamp(min=1).to(summed.dtype)
        base = self.cell_features(all_genes[None], reference[None])[0].sum(0)  # (d_model,)
        return (base[None, :] + (delta * valid[..., None].to(delta.dtype)).sum(1)) / n_genes

    def expression_features(
        self,
        bins: torch.Tensor,
        gene_ids: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The count head's direct read of the expression (:meth:`CountHead.expression_features`);
        ``None`` without a count head or without ``latent_reads_expression``."""
        return None if self.count_head is None else self.count_head.expression_features(bins, gene_ids, keep)

    def count_loss(
        self,
        cell: torch.Tensor,
        counts: torch.Tensor,
        expression: torch.Tensor | None = None,
        observed: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The count head's (NLL, KL) per cell and count gene: :meth:`CountHead.loss`."""
        return self._count_head().loss(cell, counts, expression, observed, batch_index)

    @property
    def embedding_dim(self) -> int:
        """Width of the cell embedding: ``latent_dim`` with a count head, else ``d_model``."""
        return self.config.latent_dim or self.config.d_model

    def embedding_from_cell(
        self,
        cell: torch.Tensor,
        expression: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cell embedding of pooled cell vectors (and their :meth:`expression_features` when the
        latent reads them; and each cell's batch when the count head has a batch covariate): the count
        head's latent mean, or the vector itself."""
        if self.count_head is None:
            return cell
        return self.count_head.latent(cell, expression, batch_index)[0]

    def _count_head(self) -> CountHead:
        if self.count_head is None:
            raise NeurofmError("this model has no count head; build it with ModelConfig(latent_dim=16)")
        return self.count_head

    def _with_bias(self, logits: torch.Tensor, gene_ids: torch.Tensor) -> torch.Tensor:
        return logits if self.gene_bin_bias is None else logits + self.gene_bin_bias(gene_ids)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ model directory
    def save_pretrained(self, directory: str | os.PathLike, tokenizer) -> Path:
        """Write ``model.safetensors`` + ``config.json`` + the tokenizer files into ``directory``,
        atomically (a directory replaced whole)."""
        from safetensors.torch import save_file

        if tokenizer.n_genes != self.config.n_genes or tokenizer.config.n_bins != self.config.n_bins:
            raise NeurofmError(
                f"tokenizer ({tokenizer.n_genes} genes, {tokenizer.config.n_bins} bins) does not "
                "match the model "
                f"({self.config.n_genes} genes, {self.config.n_bins} bins); save the tokenizer the "
                "model was trained on"
            )
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            write_json({"format_version": _FORMAT_VERSION, "model": asdict(self.config)}, tmp / CONFIG_FILE)
            tokenizer.save(tmp)
        return directory


RUN_MODEL_DIRS = ("model", "final")  # a pre-training output directory's model (neurofm.checkpoints), old name


def run_model_dir(directory: Path) -> Path:
    """``directory`` itself when it holds a model, else the model of the pre-training run it is the output
    of (``pretrain/model/``, or ``final/`` as older runs named it)."""
    if (directory / CONFIG_FILE).is_file() or not directory.is_dir():
        return directory
    for name in RUN_MODEL_DIRS:
        if (directory / name / CONFIG_FILE).is_file():
            return directory / name
    return directory


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild ``(model, tokenizer)`` from a directory written by ``save_pretrained``; model in eval mode.

    ``directory`` may also be a pre-training run's output directory (e.g. ``outputs/pretrain``): its
    model, ``model/`` (``final/`` in runs before that name), is loaded.

    Refuses (NeurofmError) a missing/incomplete directory, unreadable or corrupt weights, a pickle file
    in place of the weights, and weights whose names/shapes do not match ``config.json``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from neurofm.tokenizer import ExpressionTokenizer

    directory = run_model_dir(Path(directory))
    if not directory.is_dir():
        raise NeurofmError(
            f"model directory {directory} does not exist; pass a directory from save_pretrained"
        )
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise NeurofmError(
                f"model directory {directory} lacks {name}; it is incomplete — re-save or re-train"
            )
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        known = {field.name for field in fields(ModelConfig)}
        # a field a model directory lacks was written before it existed: the architecture it had then
        settings = {**LEGACY_DEFAULTS, **{k: v for k, v in meta["model"].items() if k in known}}
        config = ModelConfig(**settings)
    except (ValueError, KeyError, TypeError) as error:
        raise NeurofmError(
            f"{directory / CONFIG_FILE} is not a valid model config ({error}); re-save the model"
        ) from None
    tokenizer = ExpressionTokenizer.load(directory)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise NeurofmError(
            f"{directory / WEIGHTS_FILE} is not a readable safetensors file ({str(error)[:80]}); "
            "the file is corrupt or not safetensors — re-save the model"
        ) from None
    state = _current_names(state)
    model = GeneEncoder(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise NeurofmError(
            f"weights in {directory} do not match config.json (e.g. {differing}); the directory "
            "mixes two models"
        )
    if tokenizer.n_genes != config.n_genes or tokenizer.config.n_bins != config.n_bins:
        raise NeurofmError(
            f"tokenizer in {directory} ({tokenizer.n_genes} genes, {tokenizer.config.n_bins} bins) "
            "does not match "
            f"config.json ({config.n_genes} genes, {config.n_bins} bins); re-save the model"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer


GeneEncoder.load_pretrained = staticmethod(load_pretrained)

# the count head's weights as models saved before it was a module of its own named them (CHANGELOG.md)
_COUNT_HEAD_NAMES = ("latent_encoder", "count_decoder", "count_log_theta", "expression_weight", "bin_value",
                     "count_gene_index")  # fmt: skip


def _current_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the count head's weights under ``count_head.`` (an older directory's names moved)."""
    return {
        (f"count_head.{name}" if name.split(".")[0] in _COUNT_HEAD_NAMES else name): tensor
        for name, tensor in state.items()
    }
