"""Classifiers on cell features, shared by evaluation and mapping (below both in the import graph).

**The menu** (:func:`probe_menu`, :func:`select_probe`): logistic regression on the raw and on the
z-scored features over a grid of ``C``, and k-nearest neighbours over a grid of ``k``
(:class:`ProbeConfig`), one entry picked by inner cross-validation on the labelled cells alone —
the evaluation's probe for every method, and the protocol the map pipeline's baselines are scored by.
A fitted menu entry is exported as plain JSON (:func:`probe_to_json` / :func:`probe_from_json`), never
pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import LeaveOneOut, StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from neurofm.errors import NeurofmError

PROBE_FORMAT = "neurofm-linear-probe"
PROBE_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the probe menu and of its splits."""

    test_size: float = 0.2  # hold-out share of cells (the original: 0.2)
    seed: int = 42  # seeds the hold-out split, the CV folds, the inner folds and the solver
    n_splits: int = 5  # folds of the outer (group) k-fold; < 2 turns cross-validation off
    n_repeats: int = 1  # repeats of the outer k-fold, each reshuffled
    C_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # logistic regression, raw and z-scored
    k_grid: tuple[int, ...] = (1, 3, 5, 15)  # k-nearest neighbours (Euclidean), capped by the labels
    inner_folds: int = 5  # stratified inner folds choosing the classifier (leave-one-out if few cells)
    loo_max_cells: int = 20  # at most this many labelled cells: leave-one-out inner selection (above:
    #                          stratified k-fold, a tenth of the fits at 50 cells; the scores moved within sd)
    select_max_cells: int = 5000  # the choice is made on a seeded stratified sample of this many cells
    max_iter: int = 2000  # lbfgs iterations
    group_aware: bool = True  # when groups are given, keep each group on one side of every split


def probe_menu(config: ProbeConfig, n_train: int) -> list[tuple[str, Pipeline]]:
    """The unfitted candidates, simplest first: logistic (raw, then z-scored) per C, then kNN per k.

    ``k`` values of at least ``n_train - 1`` are left out (a neighbour vote over every cell)."""
    candidates: list[tuple[str, Pipeline]] = []
    for standardize in (False, True):
        for c in config.C_grid:
            scaler = StandardScaler() if standardize else StandardScaler(with_mean=False, with_std=False)
            logistic = LogisticRegression(C=float(c), max_iter=config.max_iter, random_state=config.seed)
            name = f"logistic C={c:g}{' z-scored' if standardize else ''}"
            candidates.append((name, Pipeline([("scaler", scaler), ("logistic", logistic)])))
    for k in config.k_grid:
        if k < max(2, n_train - 1):
            identity = StandardScaler(with_mean=False, with_std=False)
            candidates.append(
                (f"knn k={k}", Pipeline([("scaler", identity), ("knn", KNeighborsClassifier(k))]))
            )
    if not candidates:
        raise NeurofmError("the probe menu is empty; give ProbeConfig a C_grid or a k_grid")
    return candidates


def _inner_splitter(labels: np.ndarray, config: ProbeConfig):
    counts = np.unique(labels, return_counts=True)[1]
    if len(labels) <= config.loo_max_cells or counts.min() < 2:
        return LeaveOneOut()
    return StratifiedKFold(
        n_splits=int(min(config.inner_folds, counts.min())), shuffle=True, random_state=config.seed
    )


def _fold_predictions(embedding, labels, menu, train, test) -> dict[str, np.ndarray]:
    """Every menu entry's predictions for one inner fold (one z-scoring fitted for all of them), on one
    BLAS thread (tiny fits: more threads only add overhead, and in worker processes oversubscribe)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _fold_predictions_unlimited(embedding, labels, menu, train, test)


def _fold_predictions_unlimited(embedding, labels, menu, train, test) -> dict[str, np.ndarray]:
    raw = (embedding[train], embedding[test])
    scaler = StandardScaler().fit(raw[0])
    scaled = (scaler.transform(raw[0]), scaler.transform(raw[1]))
    out = {}
    for name, candidate in menu:
        steps = candidate.named_steps
        x_train, x_test = scaled if steps["scaler"].with_std else raw
        estimator = clone(steps["logistic"] if "logistic" in steps else steps["knn"])
        out[name] = estimator.fit(x_train, labels[train]).predict(x_test)
    return out


def _inner_predictions(
    embedding: np.ndarray, labels: np.ndarray, menu: list[tuple[str, Pipeline]], splitter, n_jobs: int = 1
) -> dict[str, np.ndarray]:
    """Every menu entry's pooled out-of-fold predictions (what ``cross_val_predict`` returns for each),
    computed fold by fold so that a fold's z-scoring is fitted once for all its candidates; ``n_jobs`` > 1
    runs the folds in that many worker processes (the same predictions: each fit is independent)."""
    folds = list(splitter.split(embedding, labels))
    if n_jobs > 1 and len(folds) > 1:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=min(n_jobs, len(folds)))(
            delayed(_fold_predictions)(embedding, labels, menu, train, test) for train, test in folds
        )
    else:
        parts = [_fold_predictions(embedding, labels, menu, train, test) for train, test in folds]
    predicted = {name: np.empty(len(labels), dtype=labels.dtype) for name, _ in menu}
    for (_, test), part in zip(folds, parts, strict=True):
        for name, values in part.items():
            predicted[name][test] = values
    return predicted


def select_probe(
    embedding: np.ndarray, labels: np.ndarray, config: ProbeConfig, n_jobs: int = 1
) -> tuple[str, Pipeline]:
    """The menu entry with the best inner-CV macro-F1 on these (training) cells, unfitted.

    Only ``embedding``/``labels`` — the labelled cells — are seen. Above ``select_max_cells`` the choice
    is made on a seeded stratified sample of them. ``n_jobs``: worker processes for the inner folds
    (the choice does not depend on it).
    """
    if len(labels) > config.select_max_cells:
        sample, _ = train_test_split(
            np.arange(len(labels)),
            train_size=config.select_max_cells,
            stratify=labels if np.unique(labels, return_counts=True)[1].min() >= 2 else None,
            random_state=config.seed,
        )
        embedding, labels = embedding[np.sort(sample)], labels[np.sort(sample)]
    menu = probe_menu(config, len(labels))
    if len(np.unique(labels)) < 2 or len(menu) == 1:
        return menu[0]
    predicted = _inner_predictions(embedding, labels, menu, _inner_splitter(labels, config), n_jobs)
    best: tuple[float, str, Pipeline] | None = None
    for name, candidate in menu:
        score = f1_score(labels, predicted[name], average="macro", zero_division=0)
        if best is None or score > best[0] + 1e-12:
            best = (score, name, candidate)
    assert best is not None
    return best[1], best[2]


# ---------------------------------------------------------------------------------------- export


def probe_to_json(probe: Pipeline) -> dict[str, Any]:
    """The fitted probe as a JSON-ready dict, exact to full precision (no pickle).

    Logistic probes keep classes, coefficients, intercepts and the scaler's mean/scale; kNN probes keep
    ``k`` and their training embedding and labels (a kNN classifier *is* its training set).
    """
    scaler: StandardScaler = probe.named_steps["scaler"]
    data: dict[str, Any] = {
        "format": PROBE_FORMAT,
        "format_version": PROBE_FORMAT_VERSION,
        "classifier": getattr(probe, "classifier_name", ""),
        "scaler_mean": None if getattr(scaler, "mean_", None) is None else scaler.mean_.tolist(),
        "scaler_scale": None if getattr(scaler, "scale_", None) is None else scaler.scale_.tolist(),
    }
    if "knn" in probe.named_steps:
        knn: KNeighborsClassifier = probe.named_steps["knn"]
        return {
            **data,
            "kind": "knn",
            "classes": [str(c) for c in knn.classes_],
            "n_features": int(knn.n_features_in_),
            "params": {"k": int(knn.n_neighbors)},
            "train_embedding": np.asarray(knn._fit_X).tolist(),
            "train_labels": [str(knn.classes_[i]) for i in np.asarray(knn._y)],
            "model": "KNeighborsClassifier (scikit-learn, Euclidean, uniform votes)",
        }
    logistic: LogisticRegression = probe.named_steps["logistic"]
    return {
        **data,
        "kind": "logistic",
        "classes": [str(c) for c in logistic.classes_],
        "n_features": int(logistic.n_features_in_),
        "coef": logistic.coef_.tolist(),
        "intercept": logistic.intercept_.tolist(),
        "params": {"C": float(logistic.C), "max_iter": int(logistic.max_iter)},
        "model": "StandardScaler -> LogisticRegression (scikit-learn); binary: sigmoid, multiclass: softmax",
    }


def probe_from_json(data: dict[str, Any]) -> Pipeline:
    """Rebuild the fitted scikit-learn pipeline from :func:`probe_to_json` output (no pickle)."""
    if data.get("format") != PROBE_FORMAT:
        raise NeurofmError(f"not a {PROBE_FORMAT} file (format={data.get('format')!r}); pass a probe.json")
    n_features = int(data["n_features"])
    scaler = StandardScaler(
        with_mean=data["scaler_mean"] is not None, with_std=data["scaler_scale"] is not None
    )
    scaler.mean_ = None if data["scaler_mean"] is None else np.asarray(data["scaler_mean"], dtype=np.float64)
    scaler.scale_ = (
        None if data["scaler_scale"] is None else np.asarray(data["scaler_scale"], dtype=np.float64)
    )
    scaler.var_ = None if scaler.scale_ is None else scaler.scale_**2
    scaler.n_features_in_ = n_features
    scaler.n_samples_seen_ = 0
    params = data.get("params", {})
    if data.get("kind") == "knn":
        knn = KNeighborsClassifier(n_neighbors=int(params["k"]))
        knn.fit(
            np.asarray(data["train_embedding"], dtype=np.float64),
            np.asarray(data["train_labels"], dtype=object),
        )
        pipeline = Pipeline([("scaler", scaler), ("knn", knn)])
    else:
        logistic = LogisticRegression(C=params.get("C", 1.0), max_iter=params.get("max_iter", 100))
        logistic.classes_ = np.asarray(data["classes"], dtype=object)
        logistic.coef_ = np.ascontiguousarray(data["coef"], dtype=np.float64)
        logistic.intercept_ = np.asarray(data["intercept"], dtype=np.float64)
        logistic.n_features_in_ = n_features
        logistic.n_iter_ = np.zeros(1, dtype=np.int32)
        pipeline = Pipeline([("scaler", scaler), ("logistic", logistic)])
    pipeline.classifier_name = data.get("classifier", "")
    return pipeline
