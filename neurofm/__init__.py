"""neurofm: a neuron-type foundation model for single-cell RNA-seq.

The user API, scanpy style (loaded lazily, so ``import neurofm`` stays fast)::

    import scanpy as sc, neurofm
    adata = sc.read_h5ad("my_cells.h5ad")                                # raw counts
    neurofm.embed(adata, model="models:/neurofm-encoder@champion")      # obsm['X_neurofm'], uns['neurofm']
    neurofm.map_query(adata, model="models:/neurofm-encoder@champion")  # obs['neurofm_<label>'], + _score
    model, tokenizer = neurofm.load_pretrained("outputs/pretrain/model")  # the run's model

- :func:`embed` (:mod:`neurofm.embedding`) — cell embeddings into ``obsm['X_neurofm']``
- :func:`map_query` (:mod:`neurofm.mapping`) — map cells onto a model's reference: labels transferred
  into ``obs['neurofm_<column>']`` (``unknown`` where none matches), ``uns['neurofm_map']``
- :func:`load_pretrained` (:mod:`neurofm.model`) — a model directory → ``(model, tokenizer)``
- :func:`pretrain` (:mod:`neurofm.train`) — masked-bin pre-training on raw counts
- :func:`evaluate_embeddings` (:mod:`neurofm.evaluate.compare`) — the fair protocol against baselines
- the settings: :class:`TokenizerConfig`, :class:`ModelConfig`, :class:`TrainConfig`,
  :class:`ProbeConfig`, :class:`ClusterConfig`

The science lives here, importable and testable without ZenML: :mod:`neurofm.data` (atlas files,
subset, region, dedupe, crop, the cell store, the synthetic atlas), :mod:`neurofm.tokenizer`,
:mod:`neurofm.genes` (gene matching), :mod:`neurofm.model` (the one model definition),
:mod:`neurofm.stream` (the streaming loader), :mod:`neurofm.train`, :mod:`neurofm.embedding`,
:mod:`neurofm.evaluate`, :mod:`neurofm.plots`, :mod:`neurofm.registry` (finding models) and
:mod:`neurofm.tracking` (MLflow runs and the registry, in one place).
"""

from __future__ import annotations

import importlib
from typing import Any

from neurofm.errors import NeurofmError

__version__ = "0.1.0"

_LAZY = {
    "embed": ("neurofm.embedding", "embed"),
    "map_query": ("neurofm.mapping", "map_query"),
    "load_pretrained": ("neurofm.model", "load_pretrained"),
    "pretrain": ("neurofm.train", "pretrain"),
    "evaluate_embeddings": ("neurofm.evaluate.compare", "evaluate_embeddings"),
    "TokenizerConfig": ("neurofm.tokenizer", "TokenizerConfig"),
    "ModelConfig": ("neurofm.model", "ModelConfig"),
    "TrainConfig": ("neurofm.train_config", "TrainConfig"),
    "ProbeConfig": ("neurofm.evaluate.probe", "ProbeConfig"),
    "ClusterConfig": ("neurofm.cluster_config", "ClusterConfig"),
}
__all__ = ["NeurofmError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'neurofm' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
