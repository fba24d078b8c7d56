"""Frozen-model cell embeddings into ``adata.obsm``.

Every gene of the tokenizer takes part: a cell's genes are split into fixed chunks no longer than the
model's ``max_tokens`` (its training context), strided over the gene order so each chunk is a spread-out
sample like the ones seen in training (chunk ``c`` holds genes ``c, c + n_chunks, c + 2 n_chunks…``). Each
token's cell features (``GeneEncoder.cell_features``, the vectors the cell head was trained on) are
pooled over all the cell's tokens; the default ``"mean"`` is exactly ``GeneEncoder.cell_embedding``
over every gene. No cell ever shares a sequence with another, so an embedding does not depend on the
batch size or on which other cells are embedded with it.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import torch
from tqdm.auto import tqdm

from neurofm import keys
from neurofm.errors import NeurofmError
from neurofm.model import GeneEncoder, ModelConfig
from neurofm.tokenizer import ExpressionTokenizer
from neurofm.train import resolve_device

log = logging.getLogger(__name__)

POOLINGS = ("mean", "mean_nonzero", "max")
_TOKENIZE_BLOCK = 4096  # cells tokenized at a time (bounds the dense float matrix in memory)


def gene_chunks(n_genes: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_chunks, chunk_len) gene indices striding over ``range(n_genes)``, and its padding mask
    (True = padding)."""
    n_chunks = -(-n_genes // max_tokens)
    chunk_len = -(-n_genes // n_chunks)
    grid = torch.arange(chunk_len)[None, :] * n_chunks + torch.arange(n_chunks)[:, None]
    padding = grid >= n_genes
    return torch.where(padding, torch.zeros_like(grid), grid), padding


@torch.no_grad()
def embed_bins(model: GeneEncoder, bins: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(cells, d_model) embeddings of already-tokenized cells (bins, cells × all genes) on the
    model's device."""
    chunk_genes, chunk_padding = gene_chunks(bins.shape[1], model.config.max_tokens)
    chunk_genes, chunk_padding = chunk_genes.to(bins.device), chunk_padding.to(bins.device)
    n_cells, (n_chunks, chunk_len) = bins.shape[0], chunk_genes.shape
    gene_ids = chunk_genes.expand(n_cells, -1, -1).reshape(n_cells * n_chunks, chunk_len)
    padding = chunk_padding.expand(n_cells, -1, -1).reshape(n_cells * n_chunks, chunk_len)
    token_bins = torch.gather(bins.long(), 1, gene_ids.view(n_cells, -1)).view(n_cells * n_chunks, chunk_len)
    hidden = model.cell_features(gene_ids, token_bins).float()
    hidden = hidden.view(n_cells, n_chunks * chunk_len, -1)
    keep = ~padding.view(n_cells, -1)
    if pooling == "mean_nonzero":
        keep = keep & (token_bins.view(n_cells, -1) > 0)
        keep[keep.sum(1) == 0] = ~padding.view(n_cells, -1)[keep.sum(1) == 0]  # all-zero cells: plain mean
    if pooling == "max":
        return hidden.masked_fill(~keep[..., None], float("-inf")).amax(1)
    return model.pool(hidden, keep)  # "mean": the cell vector the cell head was trained on


def embed(
    model: GeneEncoder,
    tokenizer: ExpressionTokenizer,
    adata: ad.AnnData,
    batch_size: int = 256,
    pooling: str = "mean",
    device: str = "auto",
    key_added: str = keys.EMBEDDING,
    missing_genes: str = "error",
    progress: bool = True,
) -> np.ndarray:
    """Embed every cell of ``adata`` with the frozen ``model``; returns (n_cells, d_model) float32.

    Raw counts are tokenized with ``tokenizer`` (genes matched by ``var_names``; see
    ``ExpressionTokenizer.transform`` for ``missing_genes``), every gene is encoded (see module docstring)
    and hidden states are pooled: ``"mean"`` over all genes (default), ``"mean_nonzero"`` over genes with
    a non-zero bin, ``"max"`` element-wise. Writes ``adata.obsm[key_added]``.
    """
    if pooling not in POOLINGS:
        raise NeurofmError(f"pooling={pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise NeurofmError(f"batch_size={batch_size} must be >= 1; pass a positive batch size")
    if tokenizer.n_genes != model.config.n_genes:
        raise NeurofmError(
            f"tokenizer has {tokenizer.n_genes} genes but the model {model.config.n_genes}; "
            "use the tokenizer saved with the model (load_pretrained)"
        )
    torch_device = resolve_device(device)
    was_training = model.training
    model = model.to(torch_device).eval()
    embeddings = np.empty((adata.n_obs, model.config.d_model), dtype=np.float32)
    bar = tqdm(total=adata.n_obs, desc="embed", unit="cell", disable=not progress)
    autocast = torch.autocast(
        device_type=torch_device.type, dtype=torch.bfloat16, enabled=torch_device.type == "cuda"
    )
    for block_start in range(0, adata.n_obs, _TOKENIZE_BLOCK):
        block = adata[block_start : block_start + _TOKENIZE_BLOCK]
        bins = torch.from_numpy(tokenizer.transform(block, missing_genes=missing_genes)).to(torch_device)
        for start in range(0, bins.shape[0], batch_size):
            with autocast:
                pooled = embed_bins(model, bins[start : start + batch_size], pooling)
            embeddings[block_start + start : block_start + start + len(pooled)] = pooled.float().cpu().numpy()
            bar.update(len(pooled))
    bar.close()
    model.train(was_training)
    adata.obsm[key_added] = embeddings
    return embeddings


def random_encoder_like(model_config: ModelConfig, seed: int = 0) -> GeneEncoder:
    """The same architecture with freshly initialised (untrained) weights, in eval mode — the baseline
    that shows what pre-training adds. Seeded without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GeneEncoder(model_config).eval()
