"""Label efficiency: probe quality when only a few labelled cells per class are available.

This is where pre-training should show its value: a good embedding needs few labels. For every
shot count the training cells are drawn per class from the training part of the shared split; the
test cells are the shared hold-out; every method sees exactly the same draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from neurofm.cpu import free_cores
from neurofm.errors import NeurofmError
from neurofm.evaluate.labels import check_labels
from neurofm.evaluate.probe import (
    ProbeConfig,
    ProbeSplit,
    check_embedding,
    fit_probe,
    make_split,
    score_probe,
)

Shot = int | str
DEFAULT_SHOTS: tuple[Shot, ...] = (5, 10, 25, 50, "all")
COLUMNS = [
    "method",
    "shots",
    "n_train",
    "n_draws",
    "accuracy_mean",
    "accuracy_sd",
    "auc_mean",
    "auc_sd",
    "f1_mean",
    "f1_sd",
]


def draw_few_shot(
    labels: np.ndarray, train_indices: np.ndarray, shots: Shot, n_draws: int, seed: int
) -> list[np.ndarray]:
    """``n_draws`` index sets, each with ``shots`` cells per class drawn from ``train_indices``.

    A class with fewer training cells than ``shots`` contributes all it has. ``"all"`` gives the whole
    training part once (there is nothing to redraw). Deterministic for ``seed`` and ``shots``.
    """
    train_indices = np.asarray(train_indices)
    if shots == "all":
        return [np.sort(train_indices)]
    if not isinstance(shots, (int, np.integer)) or shots < 1:
        raise NeurofmError(f"label-efficiency shots must be positive integers or 'all', got {shots!r}")
    rng = np.random.default_rng([seed, int(shots)])
    train_labels = labels[train_indices]
    classes = np.unique(train_labels)
    draws = []
    for _ in range(n_draws):
        chosen = [
            rng.choice(
                train_indices[train_labels == name],
                size=min(int(shots), int(np.sum(train_labels == name))),
                replace=False,
            )
            for name in classes
        ]
        draws.append(np.sort(np.concatenate(chosen)))
    return draws


def label_efficiency(
    embeddings: Mapping[str, np.ndarray],
    labels: np.ndarray,
    shots: Sequence[Shot] = DEFAULT_SHOTS,
    n_draws: int = 10,
    seed: int = 0,
    split: ProbeSplit | None = None,
    probe_config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Probe accuracy/AUC/macro-F1 (mean and sd over draws) per method and shot count.

    ``split`` is the shared hold-out (drawn from ``probe_config``/``groups`` when not given); training
    cells are drawn from its training part only, scored on its test part. Returns one row per
    (method, shots) with the columns ``method, shots, n_train, n_draws, accuracy_mean, accuracy_sd,
    auc_mean, auc_sd, f1_mean, f1_sd``; ``shots`` is a string (``"5"`` … ``"all"``) and ``n_train`` the
    mean number of training cells per draw. sd is NaN for a single draw. The (method, shots) tasks run in
    ``n_jobs`` worker processes (None: the cores other processes leave free); the scores do not depend on it.
    """
    if not embeddings:
        raise NeurofmError("label_efficiency needs at least one embedding; pass {'model': ..., 'pca': ...}")
    if n_draws < 1:
        raise NeurofmError(f"label-efficiency n_draws must be at least 1, got {n_draws}")
    probe_config = probe_config or ProbeConfig()
    n_cells = next(iter(embeddings.values())).shape[0]
    labels = check_labels(labels, n_cells=n_cells)
    split = split or make_split(labels, probe_config, groups)
    draws = {shot: draw_few_shot(labels, split.train_indices, shot, n_draws, seed) for shot in shots}
    test = split.test_indices
    checked = {}
    for method, embedding in embeddings.items():
        checked[method] = check_embedding(embedding)
        if checked[method].shape[0] != n_cells:
            raise NeurofmError(
                f"embedding {method!r} has {checked[method].shape[0]} cells, others {n_cells}; embed the same cells"
            )
    tasks = [(method, shot) for method in checked for shot in draws]
    workers = min(len(tasks), free_cores() if n_jobs is None else max(1, n_jobs))
    # every fit is single-threaded and independent of the others: the same scores for any `workers`
    scored = Parallel(n_jobs=workers)(
        delayed(_score_draws)(checked[method], labels, draws[shot], test, probe_config)
        for method, shot in tasks
    )
    rows = []
    for (method, shot), scores in zip(tasks, scored, strict=True):
        index_sets = draws[shot]
        frame = pd.DataFrame(scores)
        rows.append(
            {
                "method": method,
                "shots": str(shot),
                "n_train": float(np.mean([len(train) for train in index_sets])),
                "n_draws": len(index_sets),
                "accuracy_mean": frame["accuracy"].mean(),
                "accuracy_sd": frame["accuracy"].std(ddof=1) if len(frame) > 1 else float("nan"),
                "auc_mean": frame["roc_auc"].mean(),
                "auc_sd": frame["roc_auc"].std(ddof=1) if len(frame) > 1 else float("nan"),
                "f1_mean": frame["f1_macro"].mean(),
                "f1_sd": frame["f1_macro"].std(ddof=1) if len(frame) > 1 else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def _score_draws(
    embedding: np.ndarray,
    labels: np.ndarray,
    index_sets: list[np.ndarray],
    test: np.ndarray,
    probe_config: ProbeConfig,
) -> list[dict[str, float]]:
    """A probe picked and fitted on each draw's cells, scored on the test cells (one worker's task)."""
    with threadpool_limits(limits=1, user_api="blas"):  # tiny fits: threads only add overhead
        return [
            score_probe(fit_probe(embedding, labels, train, probe_config)[0], embedding[test], labels[test])
            for train in index_sets
        ]
