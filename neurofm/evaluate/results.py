"""What an evaluation produced: per-method results and the whole run (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from neurofm.evaluate.cluster import ClusterResult
from neurofm.evaluate.probe import ProbeResult, ProbeSplit
from neurofm.evaluate.visualize import Visualization


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
