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

The **count head** (``latent_dim > 0``, the default 16), after scVI: the cell vector of all the cell's
genes is encoded (Linear, BatchNorm, ReLU) into a variational latent; a decoder (Linear, BatchNorm, ReLU,
Linear) gives every gene's negative-binomial mean as ``softmax × library size`` (the cell's total count,
an offset, so the latent need not carry depth) with a learned per-gene dispersion. The **cell embedding**
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from neurofm.errors import NeurofmError
from neurofm.io import atomic_path, write_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_FORMAT_VERSION = 1
# fields whose default changed after models were saved without them (CHANGELOG.md): the value such a model
# was built with
LEGACY_DEFAULTS = {"latent_dim": 0, "latent_reads_expression": False, "count_genes": 0}


@dataclass
class ModelConfig:
    """Shape of the encoder; everything needed to rebuild it from ``config.json``."""

    n_genes: int = 2000  # gene vocabulary (the tokenizer's genes, in its order)
    n_bins: int = 20  # expression bins predicted by the head; id n_bins is the mask token
    d_model: int = 64  # width of every token vector
    n_heads: int = 4  # attention heads (d_model must divide evenly)
    n_layers: int = 2  # transformer blocks
    ffn_dim: int = 128  # hidden width of each block's feed-forward network
    gene_bin_bias: bool = True  # add a learned per-(gene, bin) bias to the logits (pretrain starts it at the
    #                             training log-frequencies, so the transformer only learns what context adds)
    gene_bin_interaction: bool = True  # add gene_embedding ⊙ bin_scale to each token, so that a token
    #                                   carries which gene has which bin even before any attention
    dropout: float = 0.0  # dropout on attention weights and residual branches during training
    cell_pooling: str = "all"  # tokens the cell vector pools in pre-training: "all" visible tokens, or
    #                            "nonzero" (visible tokens with bin > 0: the count of zeros, i.e. depth, stays out)
    max_tokens: int = 256  # context length of the transformer: tokens per sequence (pretrain sets it to the
    #                        per-cell token cap; embedding pools every gene and is not bound by it)
    latent_dim: int = 16  # > 0: an scVI-like count head — the pooled cell vector is encoded into a
    #                      variational latent of this size, from which a decoder gives every gene's
    #                      negative-binomial mean (softmax × the cell's library size, an offset) — and the
    #                      cell embedding is the latent mean; 0: no count head, the embedding is the cell vector
    decoder_dim: int = 128  # hidden width of the count head's encoder and decoder (latent_dim > 0)
    latent_reads_expression: bool = True  # latent_dim > 0: the count head's encoder reads, beside the pooled
    #                                       cell vector, the cell's expression directly — a learned vector
    #                                       per gene weighted by a learned value of the gene's bin (0 for
    #                                       bin 0), averaged over the cell's genes: a linear layer on the
    #                                       binned expression, as scVI's encoder reads log counts
    count_genes: int = 2000  # latent_dim > 0: the count head reads and reconstructs at most this many genes,
    #                          the most variable of the training cells (Seurat v3 on raw counts, scVI's
    #                          recipe; chosen by pretrain, saved with the weights); every gene when the
    #                          vocabulary has no more; 0: every gene. The tokens keep every gene.

    @property
    def mask_token(self) -> int:
        return self.n_bins

    @property
    def n_count_genes(self) -> int:
        """Genes the count head reads and reconstructs."""
        return self.n_genes if self.count_genes == 0 else min(self.count_genes, self.n_genes)

    def validate(self) -> ModelConfig:
        checks = [
            (self.n_genes >= 1, "n_genes must be >= 1"),
            (2 <= self.n_bins <= 1000, "n_bins must be in [2, 1000]"),
            (self.d_model >= 4, "d_model must be >= 4"),
            (self.n_heads >= 1 and self.d_model % self.n_heads == 0, "d_model must be a multiple of n_heads"),
            (1 <= self.n_layers <= 64, "n_layers must be in [1, 64]"),
            (self.ffn_dim >= 1, "ffn_dim must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.cell_pooling in ("all", "nonzero"), "cell_pooling must be 'all' or 'nonzero'"),
            (isinstance(self.latent_dim, int) and self.latent_dim >= 0, "latent_dim must be an integer >= 0"),
            (
                isinstance(self.decoder_dim, int) and self.decoder_dim >= 1,
                "decoder_dim must be an integer >= 1",
            ),
            (isinstance(self.latent_reads_expression, bool), "latent_reads_expression must be true or false"),
            (
                isinstance(self.count_genes, int) and self.count_genes >= 0,
                "count_genes must be an integer >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise NeurofmError(
                    f"invalid model config: {message} (got {asdict(self)}); fix the model settings"
                )
        return self


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


class CellBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the cells of a batch; a one-cell training batch uses the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


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
        self.latent_encoder = self.count_decoder = self.count_log_theta = None
        self.expression_weight = self.bin_value = None
        n_count = config.n_count_genes
        # which genes the count head reads and reconstructs (their indices in the vocabulary, sorted): set
        # by pretrain (neurofm.stream.variable_genes), saved with the weights; None: every gene
        subset = config.latent_dim > 0 and n_count < config.n_genes
        self.register_buffer("count_gene_index", torch.arange(n_count) if subset else None)
        if config.latent_dim > 0:
            # batch norm, as in scVI's encoder and decoder: every hidden unit varies across cells on the
            # same scale, so the latent is not held to the one or two directions of largest variance
            self.latent_encoder = nn.Sequential(
                nn.Linear(config.d_model, config.decoder_dim),
                CellBatchNorm(config.decoder_dim),
                nn.ReLU(),
                nn.Linear(config.decoder_dim, 2 * config.latent_dim),  # mean and log-variance
            )
            self.count_decoder = nn.Sequential(
                nn.Linear(config.latent_dim, config.decoder_dim),
                CellBatchNorm(config.decoder_dim),
                nn.ReLU(),
                nn.Linear(config.decoder_dim, n_count),
            )
            self.count_log_theta = nn.Parameter(torch.zeros(n_count))  # per-gene log dispersion
            if config.latent_reads_expression:
                # the encoder's first layer on the expression itself: a vector per gene (n_genes × hidden)
                # times a learned value of the gene's bin; bin 0 (and the mask token) add nothing
                self.expression_weight = nn.Parameter(torch.empty(n_count, config.decoder_dim))
                self.bin_value = nn.Parameter(torch.arange(config.n_bins + 1, dtype=torch.float32))
        self.apply(self._init_weights)
        if self.gene_bin_bias is not None:
            nn.init.zeros_(self.gene_bin_bias.weight)
        if self.expression_weight is not None:  # as nn.Linear(n_count, decoder_dim) initialises its weight
            bound = 1.0 / math.sqrt(n_count)
            nn.init.uniform_(self.expression_weight, -bound, bound)
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`pretrain_logits` plus, with a count head and the cells' raw ``counts`` (batch, n_genes),
        the count head's per-cell negative-binomial NLL and KL divergence, each divided by the count genes
        (``None, None`` otherwise). The count head reads the cell vector of ``full_bins`` (batch,
        n_genes: every gene's bin, as at embedding time) when given, else that of the visible tokens.
        ``observed`` (batch, n_genes bool; None: all) marks the genes each cell's file measured: the
        count head reads and scores only those. The latent is sampled (reparameterised) in training mode."""
        hidden = self.encode(gene_ids, bin_ids, padding_mask)
        keep = self.visible(bin_ids, padding_mask)
        cell = self.pool(self.cell_features(gene_ids, bin_ids), keep)
        histogram = self.pool(self.bin_embedding(bin_ids), keep)  # the cell's bin mix: depth, sparsity
        logits = self._with_bias(self.head(hidden), gene_ids)
        cell_logits = self.cell_logits(cell, gene_ids, histogram)
        if self.latent_encoder is None or counts is None:
            return logits, cell_logits, None, None
        if full_bins is None:  # "sampled": the visible tokens
            expression = self.expression_features(bin_ids, gene_ids, keep)
        else:
            cell = self.pooled_cell(full_bins, observed)
            expression = self.expression_features(full_bins, keep=observed)
        nll, kl = self.count_loss(cell, counts, expression, observed)
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
        """(batch, decoder_dim) the count head's direct read of the expression (``latent_reads_expression``;
        ``None`` without it): the mean over the cell's count genes of ``bin_value[bin] ×
        expression_weight[gene]``, bin 0 and the mask token adding nothing. ``bins`` (batch, n_genes)
        holds every gene's bin, or, with ``gene_ids`` (batch, tokens), the bins of those tokens (tokens
        of genes outside the count genes add nothing); ``keep`` (same shape, bool) limits the mean to
        those genes (unobserved genes and padding are left out)."""
        if self.expression_weight is None:
            return None
        bins = bins.long()
        index = self.count_gene_index
        if gene_ids is None:
            if index is not None:
                bins = bins[:, index]
                keep = None if keep is None else keep[:, index]
            weight = self.expression_weight
        else:
            if index is not None:  # a token's place among the count genes, -1 outside them
                position = torch.full((self.config.n_genes,), -1, dtype=torch.long, device=bins.device)
                position[index] = torch.arange(index.numel(), device=bins.device)
                position = position[gene_ids]
                keep = (position >= 0) if keep is None else keep & (position >= 0)
                gene_ids = position.clamp(min=0)
            weight = self.expression_weight[gene_ids]
        present = (bins > 0) & (bins != self.config.mask_token)
        if keep is not None:
            present = present & keep
        values = self.bin_value[bins] * present
        n_genes = bins.shape[1] if keep is None else keep.sum(1, keepdim=True).clamp(min=1)
        if gene_ids is None:
            summed = values @ weight.to(values.dtype)
        else:
            summed = torch.einsum("bt,btd->bd", values, weight)
        return summed / n_genes

    def count_loss(
        self,
        cell: torch.Tensor,
        counts: torch.Tensor,
        expression: torch.Tensor | None = None,
        observed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL, KL), each (batch,) and divided by the count genes: the count head's negative-binomial NLL
        of the raw ``counts`` (batch, n_genes: every gene's, of which the count genes are scored; or
        batch, n_count_genes: those already) from the latent of the cell vectors ``cell`` (and, with
        ``latent_reads_expression``, of :meth:`expression_features` ``expression``; sampled in
        training mode, its mean otherwise) and the latent's KL divergence from N(0, I). ``observed``
        (bool, the shape of ``counts``; None: all) limits the NLL to each cell's measured count genes and
        divides both terms by their number instead (a 141-gene file weighs like a 2,000-gene one)."""
        mean, log_var = self.latent(cell, expression)
        latent = mean
        if self.training:
            latent = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        if self.count_gene_index is not None and counts.shape[1] == self.config.n_genes:
            counts = counts[:, self.count_gene_index]
            observed = None if observed is None else observed[:, self.count_gene_index]
        nll = self.count_nll(latent, counts, observed)
        kl = 0.5 * (mean.float().pow(2) + log_var.float().exp() - 1.0 - log_var.float()).sum(1)
        if observed is not None:
            n_measured = observed.sum(1).clamp(min=1).float()
            return nll / n_measured, kl / n_measured
        n_count = self.config.n_count_genes
        return nll / n_count, kl / n_count

    def set_count_genes(self, index) -> None:
        """Choose the genes the count head reads and reconstructs: ``index`` holds n_count_genes distinct
        vocabulary indices (kept sorted). Only a model built with fewer count genes than genes has them."""
        if self.count_gene_index is None:
            raise NeurofmError("this model's count head reads every gene; it has no count genes to set")
        index = torch.as_tensor(index, dtype=torch.long).sort().values
        n_count = self.count_gene_index.numel()
        if (
            index.ndim != 1
            or index.numel() != n_count
            or (index.numel() > 1 and bool((index[1:] == index[:-1]).any()))
            or int(index.min()) < 0
            or int(index.max()) >= self.config.n_genes
        ):
            raise NeurofmError(
                f"count genes must be {n_count} distinct indices in [0, {self.config.n_genes}); got "
                f"{index.numel()} — pass the model's own selection"
            )
        self.count_gene_index.copy_(index.to(self.count_gene_index.device))

    def latent(
        self, cell: torch.Tensor, expression: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance), each (batch, latent_dim), of the count head's latent for cell vectors
        (plus, with ``latent_reads_expression``, their :meth:`expression_features`, which it needs)."""
        if self.latent_encoder is None:
            raise NeurofmError("this model has no count head; build it with ModelConfig(latent_dim=16)")
        hidden = self.latent_encoder[0](cell)
        if self.expression_weight is not None:
            if expression is None:
                raise NeurofmError(
                    "this model's latent reads the expression; pass expression_features(bins) as well"
                )
            hidden = hidden + expression.to(hidden.dtype)
        mean, log_var = self.latent_encoder[1:](hidden).float().chunk(2, dim=-1)
        return mean, log_var.clamp(-10.0, 10.0)

    def count_nll(
        self, latent: torch.Tensor, counts: torch.Tensor, observed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch,) negative-binomial NLL of each cell's raw ``counts`` (batch, n_genes), summed over genes:
        gene g's mean is ``softmax(count_decoder(latent))_g × library`` (library = the cell's total count
        over the count genes, an offset, so the latent need not carry depth), its dispersion theta_g
        learned per gene. ``counts`` (batch, n_count_genes) are the count genes' counts. ``observed``
        (same shape, bool): only those genes are decoded (the softmax runs over them), counted in the
        library and scored; the others' counts are placeholders and never read."""
        counts = counts.float()
        decoded = self.count_decoder(latent).float()
        if observed is not None:
            counts = counts * observed
            decoded = decoded.masked_fill(~observed, -1e9)  # no share of the library
        library = counts.sum(1, keepdim=True).clamp(min=1.0)
        log_mu = F.log_softmax(decoded, dim=-1) + library.log()
        log_theta = self.count_log_theta.float()
        log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(theta + mu)
        theta = log_theta.exp()
        log_likelihood = (
            torch.lgamma(counts + theta)
            - torch.lgamma(theta)
            - torch.lgamma(counts + 1.0)
            + theta * (log_theta - log_theta_mu)
            + counts * (log_mu - log_theta_mu)
        )
        if observed is not None:
            log_likelihood = torch.where(observed, log_likelihood, torch.zeros_like(log_likelihood))
        return -log_likelihood.sum(1)

    @property
    def embedding_dim(self) -> int:
        """Width of the cell embedding: ``latent_dim`` with a count head, else ``d_model``."""
        return self.config.latent_dim or self.config.d_model

    def embedding_from_cell(self, cell: torch.Tensor, expression: torch.Tensor | None = None) -> torch.Tensor:
        """The cell embedding of pooled cell vectors (and their :meth:`expression_features` when the
        latent reads them): the count head's latent mean, or the vector itself."""
        return cell if self.latent_encoder is None else self.latent(cell, expression)[0]

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

# ---------------------------------------------------------------------------------------------- pooling
_TABLE_TOKENS = 1 << 16  # (gene, bin) tokens per block when building the feature table (bounds memory)


@torch.no_grad()
def feature_table(model: GeneEncoder) -> torch.Tensor:
    """(n_genes × (n_bins + 1), d_model) float32 cell features of every token the model accepts, on its
    device: row ``gene * (n_bins + 1) + bin`` for bin ids ``0 … n_bins`` (the last is the mask token)."""
    n_genes, n_bin_ids = model.config.n_genes, model.config.n_bins + 1
    device = model.gene_embedding.weight.device
    bin_ids = torch.arange(n_bin_ids, device=device)[None, :]
    genes_per_block = max(1, _TABLE_TOKENS // n_bin_ids)
    blocks = []
    for start in range(0, n_genes, genes_per_block):
        gene_ids = torch.arange(start, min(start + genes_per_block, n_genes), device=device)[:, None]
        blocks.append(model.cell_features(gene_ids, bin_ids).float().flatten(0, 1))  # (genes, bins) broadcast
    return torch.cat(blocks)


def resolve_pooling(model: GeneEncoder, pooling: str) -> str:
    """``"auto"`` → the pooling the model's cell vector was trained with (``"mean_nonzero"`` for
    ``cell_pooling="nonzero"``, else ``"mean"``); any other value is returned as is."""
    if pooling != "auto":
        return pooling
    return "mean_nonzero" if model.config.cell_pooling == "nonzero" else "mean"


def cell_inputs(
    model: GeneEncoder,
    bins: torch.Tensor,
    pooling: str = "auto",
    table: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`embed_bins` feeds ``model.embedding_from_cell``: the pooled cell vectors (cells,
    d_model), looked up in ``table`` (no gradient flows into the token features), and the count head's
    ``expression_features`` (``None`` unless the model's latent reads the expression). ``observed``
    (bool): the genes measured — per gene (n_genes,), or per cell (cells, n_genes) for the cells of a
    multi-file store (``neurofm.stream.observed_mask``); only those are pooled and read. Memory is
    O(cells × genes) ids, never cells × genes × d_model."""
    n_bin_ids = model.config.n_bins + 1
    pooling = resolve_pooling(model, pooling)
    if bins.shape[1] != model.config.n_genes:
        raise NeurofmError(
            f"bins have {bins.shape[1]} genes but the model {model.config.n_genes}; tokenize with the "
            "model's tokenizer"
        )
    lowest, highest = torch.aminmax(bins) if bins.numel() else (0, 0)
    if lowest < 0 or highest >= n_bin_ids:
        raise NeurofmError(f"bin ids must lie in [0, {n_bin_ids - 1}]; tokenize with the model's tokenizer")
    if table is None:
        table = feature_table(model)
    gene_offsets = torch.arange(bins.shape[1], device=bins.device) * n_bin_ids
    rows = bins.long() + gene_offsets  # (cells, genes) rows of the table
    keep = None if observed is None or observed.ndim == 2 else observed[None, :].expand(bins.shape[0], -1)
    expression = model.expression_features(bins, keep=observed if keep is None else keep)
    if observed is not None and observed.ndim == 2:  # per cell: one bag of its measured genes each
        return _pooled_per_cell(rows, bins, table, pooling, observed), expression
    if observed is not None:
        rows, bins = rows[:, observed], bins[:, observed]
    if pooling == "mean_nonzero":
        keep = bins > 0
        keep[~keep.any(1)] = True  # cells with every bin 0: plain mean
        n_kept = keep.sum(1)
        offsets = torch.cumsum(n_kept, 0) - n_kept
        pooled = F.embedding_bag(rows[keep], table, offsets, mode="mean")  # one bag per cell
    else:  # "mean": the cell vector the cell head was trained on; "max": element-wise
        pooled = F.embedding_bag(rows, table, mode="max" if pooling == "max" else "mean")
    return pooled, expression


def _pooled_per_cell(
    rows: torch.Tensor, bins: torch.Tensor, table: torch.Tensor, pooling: str, observed: torch.Tensor
) -> torch.Tensor:
    """:func:`cell_inputs`' pooling over each cell's own ``observed`` genes (cells × genes bool)."""
    keep = observed.clone()
    if pooling == "mean_nonzero":
        keep &= bins > 0
        empty = ~keep.any(1)
        keep[empty] = observed[empty]  # cells with every measured bin 0: the plain mean of those
    keep[~keep.any(1)] = True  # a cell that measured nothing: every gene (no such cell in a store)
    n_kept = keep.sum(1)
    offsets = torch.cumsum(n_kept, 0) - n_kept
    return F.embedding_bag(rows[keep], table, offsets, mode="max" if pooling == "max" else "mean")
