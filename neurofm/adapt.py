"""Query adaptation: a model whose count head has a batch covariate learns the query's batches.

scArches' surgery on the count head (Lotfollahi et al. 2022): each new batch of the query gets a row of its
own in the count head's batch tables (:class:`neurofm.count_head.CountHead`'s ``batch_encoder`` and
``batch_decoder``), started at the no-batch vector, and only those rows are fit — to the query's own raw
counts, by the count head's loss (negative-binomial NLL + KL, the latent's mean as in embedding; no
labels). Every other weight stays as pre-trained, so the reference's embedding does not move and the
query's latent is read as if the query's batches had been seen in pre-training.

Bounded: at most ``max_cells`` query cells (a seeded sample) for ``epochs`` passes; the run says what it
fits before it starts. The adapted model is written to a directory of its own (with the reference), never
over the model it started from.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from neurofm.errors import NeurofmError
from neurofm.model import GeneEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptConfig:
    """How the query's new batches are fit."""

    epochs: int = 20  # passes over the adaptation cells
    max_cells: int = 20_000  # a seeded sample of the query's cells above this many
    batch_size: int = 128  # cells per step (scVI's)
    lr: float = 1e-2  # Adam learning rate of the new rows
    seed: int = 0  # the sample and the batches' order


def with_batches(model: GeneEncoder, names: list[str]) -> GeneEncoder:
    """A copy of ``model`` whose count head knows ``names`` too (appended after its own batches), each
    new batch starting at the no-batch vector (the mean of the known batches' rows)."""
    if not model.config.n_batches:
        raise NeurofmError(
            "--adapt needs a model whose count head has a batch covariate; this one has none — pre-train "
            "with --batch-col COL (train.batch_key), or map without --adapt"
        )
    config = replace(model.config, batch_names=[*model.config.batch_names, *names])
    adapted = GeneEncoder(config)
    state = model.state_dict()
    for table in ("count_head.batch_encoder", "count_head.batch_decoder"):
        known = state[table]
        state[table] = torch.cat([known, known.mean(0, keepdim=True).expand(len(names), -1)])
    adapted.load_state_dict(state)
    return adapted.eval()


def adapt_model(
    model: GeneEncoder,
    tokenizer,
    adata,
    batches: np.ndarray,
    config: AdaptConfig | None = None,
    gene_col: str | None = None,
) -> tuple[GeneEncoder, dict]:
    """``(adapted model, summary)``: ``model`` with the query's batches it never saw (``batches``: a name
    per cell of ``adata``, raw counts) added and fit as the module docstring says. A query whose batches
    the model all knows is returned unchanged (summary ``new_batches`` empty)."""
    from neurofm.genes import match_adata
    from neurofm.pooling import cell_inputs, feature_table

    config = config or AdaptConfig()
    batches = np.asarray(batches).astype(str)
    if len(batches) != adata.n_obs:
        raise NeurofmError(f"{len(batches)} batch names for {adata.n_obs} cells; give one batch per cell")
    new = sorted(set(batches.tolist()) - set(model.config.batch_names))
    adapted = with_batches(model, new)
    summary = {"new_batches": new, "epochs": 0, "cells": 0, "seconds": 0.0}
    if not new:
        log.info("every query batch is one the model knows: nothing to adapt")
        return adapted, summary
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    rows = np.flatnonzero(np.isin(batches, new))
    if len(rows) > config.max_cells:
        rows = np.sort(rng.choice(rows, config.max_cells, replace=False))
    log.info(
        "adapting the count head to %d new batch(es) (%s) on %d query cells, %d epochs", len(new),
        ", ".join(new[:5]), len(rows), config.epochs,
    )  # fmt: skip
    match = match_adata(adata, tokenizer.gene_ids, tokenizer.gene_symbols, gene_col=gene_col)
    cells = adata[rows]
    if getattr(cells, "isbacked", False):
        cells = cells.to_memory()
    bins = torch.from_numpy(tokenizer.transform(cells, source=match.source))  # int16: widened per step
    counts = tokenizer.aligned_counts(cells, source=match.source)
    observed = None if match.observed.all() else torch.from_numpy(match.observed)
    codes = torch.tensor([adapted.config.batch_names.index(name) for name in batches[rows]])
    head = adapted.count_head
    n_known = model.config.n_batches
    for parameter in adapted.parameters():
        parameter.requires_grad_(False)
    tables = [head.batch_encoder, head.batch_decoder]
    for rows_of in tables:
        rows_of.requires_grad_(True)
        rows_of.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:n_known]), grad[n_known:]]))
    optimizer = torch.optim.Adam(tables, lr=config.lr)
    features = feature_table(adapted)
    generator = torch.Generator().manual_seed(config.seed)
    n_count = adapted.config.n_count_genes

    def loss_of(part: torch.Tensor) -> torch.Tensor:
        block = counts[part.numpy()]
        dense = torch.from_numpy(np.asarray(block.todense() if hasattr(block, "todense") else block, np.float32))
        per_cell = None if observed is None else observed[None, :].expand(len(part), -1)
        cell, expression = cell_inputs(adapted, bins[part].long(), "auto", features, observed)
        nll, kl = adapted.count_loss(cell, dense, expression, per_cell, codes[part])
        return (nll + kl).mean() * n_count

    with torch.no_grad():
        before = float(np.mean([loss_of(part).item() for part in torch.arange(len(rows)).split(1024)]))
    for _ in range(config.epochs):  # eval mode: the latent's mean, frozen batch-norm statistics
        for part in torch.randperm(len(rows), generator=generator).split(config.batch_size):
            optimizer.zero_grad()
            loss_of(part).backward()
            optimizer.step()
    for rows_of in tables:
        rows_of.requires_grad_(False)
    with torch.no_grad():
        after = float(np.mean([loss_of(part).item() for part in torch.arange(len(rows)).split(1024)]))
    summary.update(epochs=config.epochs, cells=len(rows), seconds=round(time.perf_counter() - started, 1),
                   loss_before=round(before, 4), loss_after=round(after, 4))  # fmt: skip
    log.info("adapted in %.1f s: the query cells' count loss %.4f -> %.4f", summary["seconds"], before, after)
    return adapted, summary


def adapt_model_dir(model, adata, batch_key: str, out_dir: str | Path, carry: tuple[str, ...] = (),
                    gene_col: str | None = None, tracking_uri: str | None = None,
                    config: AdaptConfig | None = None) -> Path:  # fmt: skip
    """Adapt the model (a directory or MLflow URI) to the batches in ``adata.obs``'s ``batch_key`` column and
    write it, with the files ``carry`` of its directory (e.g. its reference) and ``adapted.json``, to
    ``out_dir``; returns ``out_dir``. The model it started from is never written."""
    from neurofm.embedding import DEFAULT_MODEL_URI, REGISTERED_MODEL_NAME
    from neurofm.io import write_json
    from neurofm.model import load_pretrained
    from neurofm.registry import resolve_model_dir

    if batch_key not in adata.obs:
        raise NeurofmError(
            f"the query has no batch column {batch_key!r} (columns: {', '.join(map(str, adata.obs.columns[:8]))}); "
            "name one with --batch-col"
        )
    source = resolve_model_dir(DEFAULT_MODEL_URI if model is None else model, REGISTERED_MODEL_NAME, tracking_uri)
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(source).resolve():
        raise NeurofmError(f"{out_dir} is the model's own directory; the adapted model goes elsewhere")
    loaded, tokenizer = load_pretrained(source)
    adapted, summary = adapt_model(loaded, tokenizer, adata, adata.obs[batch_key].to_numpy(), config, gene_col)
    staging = out_dir.with_name(out_dir.name + ".partial")  # complete before it takes the final name
    shutil.rmtree(staging, ignore_errors=True)
    adapted.save_pretrained(staging, tokenizer)
    for name in carry:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, staging / name)
    write_json({"adapted_from": str(source), "batch_key": batch_key, **summary}, staging / "adapted.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir
