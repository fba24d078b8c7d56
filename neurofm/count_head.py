"""The count head, after scVI: the network that turns a cell vector into the cell embedding (a variational
latent) and reconstructs the cell's raw counts from it — :class:`CountHead`, owned by the encoder
(``neurofm.model.GeneEncoder.count_head``, ``ModelConfig.latent_dim > 0``). Its training *phase* after
pre-training is ``neurofm.count_phase``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neurofm.errors import NeurofmError
from neurofm.model_config import ModelConfig


class CellBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the cells of a batch; a one-cell training batch uses the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


class CountHead(nn.Module):
    """The count head, after scVI: the pooled cell vector (plus, with ``latent_reads_expression``, a
    direct read of the expression) is encoded into a variational latent; a decoder gives each count gene's
    negative-binomial mean (``softmax × library``, the library an offset) with a learned per-gene
    dispersion. Its latent mean is the cell embedding. It reads and reconstructs the ``count_gene_index``
    genes (None: every gene), chosen by pre-training and saved with the weights.

    **Batch covariate** (``config.batch_names``, none by default): each batch has a learned vector added to
    the first layer of the encoder and of the decoder — a one-hot of the batch concatenated to those
    layers' inputs, as scVI does (and scArches' ``encode_covariates``), so the latent need not carry
    what the batch explains. The vectors start at zero (a new batch starts as "no batch"; other weights
    draw the same random numbers as without batches). ``batch_index`` (cells,) holds each cell's batch
    code in ``[0, n_batches)``, or ``-1`` for the *no-batch vector* (the mean of the batches' vectors:
    a cell of a batch the model never saw, mapped without adaptation)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n_count = config.n_count_genes
        # which genes the head reads and reconstructs (their indices in the vocabulary, sorted): set by
        # pretrain (neurofm.stream.variable_genes), saved with the weights; None: every gene
        subset = n_count < config.n_genes
        self.register_buffer("count_gene_index", torch.arange(n_count) if subset else None)
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
        self.expression_weight = self.bin_value = None
        if config.latent_reads_expression:
            # the encoder's first layer on the expression itself: a vector per gene (n_genes × hidden)
            # times a learned value of the gene's bin; bin 0 (and the mask token) add nothing
            self.expression_weight = nn.Parameter(torch.empty(n_count, config.decoder_dim))
            self.bin_value = nn.Parameter(torch.arange(config.n_bins + 1, dtype=torch.float32))
        self.batch_encoder = self.batch_decoder = None
        if config.n_batches:  # plain parameters, not nn.Embedding: no random draw, no re-initialisation
            self.batch_encoder = nn.Parameter(torch.zeros(config.n_batches, config.decoder_dim))
            self.batch_decoder = nn.Parameter(torch.zeros(config.n_batches, config.decoder_dim))

    def reset_expression_weight(self) -> None:
        """As ``nn.Linear(n_count, decoder_dim)`` initialises its weight (the encoder calls it after its
        other layers, so a model draws the same numbers as before the head was a module of its own)."""
        if self.expression_weight is not None:
            bound = 1.0 / math.sqrt(self.expression_weight.shape[0])
            nn.init.uniform_(self.expression_weight, -bound, bound)

    def expression_features(
        self,
        bins: torch.Tensor,
        gene_ids: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """(batch, decoder_dim) the head's direct read of the expression (``latent_reads_expression``;
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

    def batch_vectors(
        self, table: torch.Tensor | None, batch_index: torch.Tensor | None
    ) -> torch.Tensor | None:
        """(cells, decoder_dim) each cell's row of ``table`` (``batch_encoder`` or ``batch_decoder``); the
        mean row for ``-1``. None without a batch covariate. Refuses a missing or out-of-range index."""
        if table is None:
            if batch_index is not None and bool((batch_index >= 0).any()):
                raise NeurofmError(
                    "cells were given batches but this model's count head has no batch covariate; "
                    "leave the batch out (or pre-train with train.batch_key)"
                )
            return None
        if batch_index is None:
            raise NeurofmError(
                f"this model's count head was trained with {self.config.n_batches} batches "
                f"({', '.join(self.config.batch_names[:3])}…); give each cell's batch, or -1 for the "
                "no-batch vector"
            )
        batch_index = batch_index.long()
        if bool(((batch_index < -1) | (batch_index >= table.shape[0])).any()):
            raise NeurofmError(
                f"batch codes must lie in [-1, {table.shape[0] - 1}]; code them with batch_codes()"
            )
        rows = torch.cat([table, table.mean(0, keepdim=True)])  # row -1: the no-batch vector
        return rows[batch_index]

    def latent(
        self,
        cell: torch.Tensor,
        expression: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance), each (batch, latent_dim), of the latent for cell vectors (plus, with
        ``latent_reads_expression``, their :meth:`expression_features`, which it needs; and each cell's
        batch with a batch covariate)."""
        hidden = self.latent_encoder[0](cell)
        if self.expression_weight is not None:
            if expression is None:
                raise NeurofmError(
                    "this model's latent reads the expression; pass expression_features(bins) as well"
                )
            hidden = hidden + expression.to(hidden.dtype)
        shift = self.batch_vectors(self.batch_encoder, batch_index)
        if shift is not None:
            hidden = hidden + shift.to(hidden.dtype)
        mean, log_var = self.latent_encoder[1:](hidden).float().chunk(2, dim=-1)
        return mean, log_var.clamp(-10.0, 10.0)

    def decode(self, latent: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, n_count_genes) the decoder's logits of each count gene's share of the library."""
        hidden = self.count_decoder[0](latent)
        shift = self.batch_vectors(self.batch_decoder, batch_index)
        if shift is not None:
            hidden = hidden + shift.to(hidden.dtype)
        return self.count_decoder[1:](hidden).float()

    def nll(
        self,
        latent: torch.Tensor,
        counts: torch.Tensor,
        observed: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch,) negative-binomial NLL of each cell's raw ``counts`` (batch, n_count_genes), summed over
        genes: gene g's mean is ``softmax(decode(latent))_g × library`` (library = the cell's total count
        over the count genes, an offset, so the latent need not carry depth), its dispersion theta_g
        learned per gene. ``observed`` (same shape, bool): only those genes are decoded (the softmax runs
        over them), counted in the library and scored; the others' counts are placeholders, never read."""
        counts = counts.float()
        decoded = self.decode(latent, batch_index)
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

    def loss(
        self,
        cell: torch.Tensor,
        counts: torch.Tensor,
        expression: torch.Tensor | None = None,
        observed: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL, KL), each (batch,) and divided by the count genes: the negative-binomial NLL of the raw
        ``counts`` (batch, n_genes: every gene's, of which the count genes are scored; or batch,
        n_count_genes: those already) from the latent of ``cell`` (sampled in training mode, its mean
        otherwise) and the latent's KL divergence from N(0, I). ``observed`` (bool, the shape of
        ``counts``; None: all) limits the NLL to each cell's measured count genes and divides both terms
        by their number instead (a 141-gene file weighs like a 2,000-gene one)."""
        mean, log_var = self.latent(cell, expression, batch_index)
        latent = mean
        if self.training:
            latent = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        if self.count_gene_index is not None and counts.shape[1] == self.config.n_genes:
            counts = counts[:, self.count_gene_index]
            observed = None if observed is None else observed[:, self.count_gene_index]
        nll = self.nll(latent, counts, observed, batch_index)
        kl = 0.5 * (mean.float().pow(2) + log_var.float().exp() - 1.0 - log_var.float()).sum(1)
        if observed is not None:
            n_measured = observed.sum(1).clamp(min=1).float()
            return nll / n_measured, kl / n_measured
        n_count = self.config.n_count_genes
        return nll / n_count, kl / n_count

    def set_count_genes(self, index) -> None:
        """Choose the genes the head reads and reconstructs: ``index`` holds n_count_genes distinct
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


def batch_codes(config: ModelConfig, names, unseen: str = "error") -> torch.Tensor:
    """(cells,) int64 codes of the batch ``names`` (one per cell) in the count head's batches
    (``config.batch_names``). A batch the model never saw is refused in one line, unless ``unseen="none"``
    asks for the no-batch vector (code -1) for its cells."""
    known = {name: code for code, name in enumerate(config.batch_names)}
    names = np.asarray(names).astype(str)
    codes = np.array([known.get(name, -1) for name in names], dtype=np.int64)
    new = sorted(set(names[codes < 0].tolist()))
    if new and unseen != "none":
        raise NeurofmError(
            f"{len(new)} batch(es) the model never saw ({', '.join(new[:3])}); map them with the no-batch "
            "vector (unseen='none') or adapt the model to them"
        )
    return torch.from_numpy(codes)
