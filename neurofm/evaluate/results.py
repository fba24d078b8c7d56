"""What an evaluation shares and produced: the protocol every method runs under, per-method results and the
whole run (plain dataclasses)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurofm.evaluate.cluster import ClusterConfig, ClusterResult
from neurofm.evaluate.label_efficiency import Shot
from neurofm.evaluate.probe import ProbeConfig, ProbeResult, ProbeSplit
from neurofm.evaluate.visualize import Visualization


@dataclass(frozen=True)
class EvaluationProtocol:
    """What every method shares in one evaluation: the split, the settings and the cell samples."""

    split: ProbeSplit
    probe_config: ProbeConfig
    cluster_config: ClusterConfig
    seed: int
    figures: bool
    views: tuple[str, ...]
    label_efficiency_shots: Sequence[Shot]
    label_efficiency_draws: int
    max_cells_cluster: int | None
    max_cells_visualize: int | None
    cluster_cells: np.ndarray | None  # the seeded sample clustered; None: every cell
    view_cells: np.ndarray | None  # the seeded sample drawn in t-SNE/UMAP; None: every cell

    @property
    def same_cells(self) -> bool:
        """Whether t-SNE/UMAP draw exactly the clustered cells (so the kNN graph and cluster UMAPs apply)."""
        if self.view_cells is None or self.cluster_cells is None:
            return self.view_cells is None and self.cluster_cells is None
        return bool(np.array_equal(self.view_cells, self.cluster_cells))


@dataclass
class MethodResult:
    """Everything computed for one embedding; ``metrics`` are un-prefixed summary names."""

    name: str
    embedding_dim: int
    probe: ProbeResult
    clusters: ClusterResult
    visualization: Visualization | None
    metrics: dict[str, float]
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate_embeddings`: per-method results, tables, metrics and paths."""

    out_dir: Path
    methods: dict[str, MethodResult]
    baselines: pd.DataFrame
    label_efficiency: pd.DataFrame
    summary: dict[str, float]
    split: ProbeSplit
    classes: list[str]
    class_counts: dict[str, int]
    settings: dict[str, Any]
    timings: dict[str, float]
    paths: dict[str, Path] = field(default_factory=dict)
