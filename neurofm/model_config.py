"""The shape of the model: :class:`ModelConfig`, everything needed to rebuild the encoder and its count head
from a model directory's ``config.json`` (``neurofm.model`` holds the network, ``neurofm.count_head`` the
count head's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from neurofm.errors import NeurofmError


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
    batch_names: list[str] = field(default_factory=list)  # the count head's batches (a per-cell
    #                          categorical covariate, e.g. donor or dataset; train.batch_key names its column),
    #                          in code order: each gets a learned vector added to the first layer of the
    #                          count head's encoder and decoder (scVI's batch one-hot, scArches'
    #                          encode_covariates). Empty (the default): no covariate.
    batch_key: str | None = None  # the obs column those batches came from (train.batch_key), the default
    #                               batch column of the cells a reference or a map embeds

    @property
    def mask_token(self) -> int:
        return self.n_bins

    @property
    def n_count_genes(self) -> int:
        """Genes the count head reads and reconstructs."""
        return self.n_genes if self.count_genes == 0 else min(self.count_genes, self.n_genes)

    @property
    def n_batches(self) -> int:
        """Categories of the count head's batch covariate (0: none)."""
        return len(self.batch_names)

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
            (
                isinstance(self.batch_names, list | tuple)
                and all(isinstance(name, str) for name in self.batch_names)
                and len(set(self.batch_names)) == len(self.batch_names),
                "batch_names must be a list of distinct strings",
            ),
            (self.latent_dim > 0 or not self.batch_names, "batch_names need a count head (latent_dim > 0)"),
        ]
        for ok, message in checks:
            if not ok:
                raise NeurofmError(
                    f"invalid model config: {message} (got {asdict(self)}); fix the model settings"
                )
        return self
