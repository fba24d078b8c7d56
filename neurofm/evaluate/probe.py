"""Probes on frozen embeddings: one classifier menu for every method, picked on labelled cells only.

A probe is chosen from the same menu for every embedding (model, PCA, scVI, random weights), by
inner cross-validation on the *training* cells alone (never the test cells): logistic regression on
the raw embedding and on the z-scored embedding over a grid of ``C``, and k-nearest neighbours over a
grid of ``k`` (:data:`ProbeConfig.C_grid`, :data:`ProbeConfig.k_grid`). The inner split is
leave-one-out when there are few labelled cells (the few-shot draws) and stratified k-fold otherwise;
candidates are ranked by the macro-F1 of their pooled inner predictions, ties going to the simpler
(earlier) one. A fixed probe would favour one geometry: z-scoring 50 PCA components lets ~48 noise
dimensions weigh as much as the informative ones, while an unscaled probe or kNN does not — so no
method is judged through a classifier that suits another.

:func:`make_split` draws the hold-out split and the outer cross-validation folds once; pass the
returned :class:`ProbeSplit` to :func:`run_probe` for every embedding so all are scored on the very
same cells. With ``groups`` (e.g. Zeisel's ``c1_chip``) no group is ever on both sides of a split.
The fitted probe is exported as plain JSON (:func:`probe_to_json`), never pickled. The menu, its
selection and the JSON export live in :mod:`neurofm.classify` (mapping uses them too) and are
re-exported here.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score
from sklearn.model_selection import (
    RepeatedStratifiedKFold,
    StratifiedGroupKFold,
    train_test_split,
)
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from neurofm.classify import (  # noqa: F401  (re-exported: the evaluation's probe is the shared menu)
    PROBE_FORMAT,
    PROBE_FORMAT_VERSION,
    ProbeConfig,
    probe_from_json,
    probe_menu,
    probe_to_json,
    select_probe,
)
from neurofm.errors import NeurofmError
from neurofm.evaluate.labels import check_labels
from neurofm.io import write_json

logger = logging.getLogger(__name__)


@dataclass
class ProbeSplit:
    """Cell indices of the hold-out split and of the CV folds, shared by every method.

    ``grouped`` says whether groups were kept apart; ``n_splits`` is the number of folds used (it may
    be lower than configured when a class or the number of groups is too small).
    """

    train_indices: np.ndarray
    test_indices: np.ndarray
    cv_folds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    grouped: bool = False
    n_splits: int = 0

    def describe(self) -> dict[str, Any]:
        """Sizes and settings, JSON-ready (indices themselves are left out)."""
        return {
            "n_train": int(len(self.train_indices)),
            "n_test": int(len(self.test_indices)),
            "n_cv_folds": len(self.cv_folds),
            "cv_n_splits": self.n_splits,
            "grouped": self.grouped,
        }


@dataclass
class ProbeResult:
    """Hold-out metrics, CV metrics and the fitted probe for one embedding.

    ``confusion`` rows are true classes, columns predicted classes, both in ``classes`` order.
    ``test_probabilities`` are the probe's class probabilities on ``split.test_indices``.
    ``cv_*`` hold one value per fold (empty when cross-validation is off). ROC-AUC is binary for two
    classes and the macro one-vs-rest mean for more. ``classifier`` names the menu entry picked on the
    training cells (e.g. ``"knn k=5"``, ``"logistic C=1 z-scored"``).
    """

    classes: list[str]
    accuracy: float
    f1_macro: float
    roc_auc: float
    confusion: np.ndarray
    test_labels: np.ndarray
    test_predictions: np.ndarray
    test_probabilities: np.ndarray
    cv_accuracy: np.ndarray
    cv_f1_macro: np.ndarray
    cv_roc_auc: np.ndarray
    probe: Pipeline
    split: ProbeSplit
    config: ProbeConfig
    n_convergence_warnings: int = 0
    classifier: str = ""

    def metrics(self) -> dict[str, float]:
        """Flat metrics named as in ``summary.json`` (without the method prefix)."""
        out = {
            "probe_accuracy": self.accuracy,
            "probe_f1": self.f1_macro,
            "probe_auc": self.roc_auc,
        }
        for name, values in (
            ("accuracy", self.cv_accuracy),
            ("f1", self.cv_f1_macro),
            ("auc", self.cv_roc_auc),
        ):
            finite = values[np.isfinite(values)] if len(values) else values
            out[f"probe_cv_{name}_mean"] = float(np.mean(finite)) if len(finite) else float("nan")
            out[f"probe_cv_{name}_sd"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
        return out


def make_split(
    labels: np.ndarray, config: ProbeConfig | None = None, groups: np.ndarray | None = None
) -> ProbeSplit:
    """Draw the hold-out split and the CV folds once, for every method to share.

    Without groups (or with ``config.group_aware`` off): a stratified hold-out of ``test_size`` and
    ``RepeatedStratifiedKFold(n_splits, n_repeats)``. With groups: the hold-out is one fold of
    ``StratifiedGroupKFold(round(1 / test_size))`` and the CV repeats ``StratifiedGroupKFold`` with
    ``seed + repeat`` — no group ever lands on both sides. Deterministic for ``config.seed``.
    """
    config = config or ProbeConfig()
    labels = check_labels(labels)
    n_cells = len(labels)
    if not 0.0 < config.test_size < 1.0:
        raise NeurofmError(f"probe test_size must lie in (0, 1), got {config.test_size}; set e.g. 0.2")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        rare = ", ".join(str(c) for c in classes[counts < 2])
        raise NeurofmError(
            f"class(es) {rare} have fewer than 2 cells, too few to split; drop or merge them via the mapping"
        )
    use_groups = groups is not None and config.group_aware
    if use_groups:
        groups = np.asarray(groups)
        if groups.shape[0] != n_cells:
            raise NeurofmError(f"{groups.shape[0]} group values for {n_cells} cells; pass one group per cell")
        n_groups = len(np.unique(groups))
        n_folds_holdout = max(2, int(round(1.0 / config.test_size)))
        if n_groups < n_folds_holdout:
            raise NeurofmError(
                f"only {n_groups} groups for a group-aware split with test share {config.test_size}; "
                "pass a finer group column or turn group_aware off"
            )
        train_indices, test_indices = _group_holdout(labels, groups, n_folds_holdout, config.seed)
    else:
        indices = np.arange(n_cells)
        try:
            train_indices, test_indices = train_test_split(
                indices, test_size=config.test_size, stratify=labels, random_state=config.seed
            )
        except ValueError as error:
            raise NeurofmError(
                f"cannot draw a stratified hold-out split ({error}); use a larger test_size or more cells"
            ) from None
    train_indices, test_indices = np.sort(train_indices), np.sort(test_indices)

    cv_folds: list[tuple[np.ndarray, np.ndarray]] = []
    n_splits = config.n_splits
    if use_groups:
        n_splits = min(n_splits, len(np.unique(groups)))
    else:
        n_splits = min(n_splits, int(counts.min()))
    if n_splits < config.n_splits:
        logger.warning(
            "probe CV: %d folds requested, %d possible with these labels", config.n_splits, n_splits
        )
    if n_splits >= 2 and config.n_repeats >= 1:
        placeholder = np.zeros((n_cells, 1))
        if use_groups:
            for repeat in range(config.n_repeats):
                splitter = StratifiedGroupKFold(
                    n_splits=n_splits, shuffle=True, random_state=config.seed + repeat
                )
                cv_folds.extend(splitter.split(placeholder, labels, groups))
        else:
            splitter = RepeatedStratifiedKFold(
                n_splits=n_splits, n_repeats=config.n_repeats, random_state=config.seed
            )
            cv_folds.extend(splitter.split(placeholder, labels))
    return ProbeSplit(
        train_indices=train_indices,
        test_indices=test_indices,
        cv_folds=[(np.sort(train), np.sort(test)) for train, test in cv_folds],
        grouped=bool(use_groups),
        n_splits=n_splits if cv_folds else 0,
    )


def _group_holdout(
    labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One fold of StratifiedGroupKFold as test: the first whose train part holds every class."""
    n_classes = len(np.unique(labels))
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    best: tuple[np.ndarray, np.ndarray] | None = None
    for train, test in splitter.split(np.zeros((len(labels), 1)), labels, groups):
        if len(np.unique(labels[train])) < n_classes:
            continue
        if len(np.unique(labels[test])) == n_classes:
            return train, test
        best = best or (train, test)
    if best is None:
        raise NeurofmError(
            "no group-aware split keeps every class in the training part; pass a finer group column "
            "or turn group_aware off"
        )
    logger.warning("group-aware hold-out: the test part lacks some class; its AUC covers the classes present")
    return best


def roc_auc(true_labels: np.ndarray, probabilities: np.ndarray, classes: list[str] | np.ndarray) -> float:
    """ROC-AUC: binary for two classes, else the macro mean of one-vs-rest AUCs.

    Classes absent from ``true_labels`` (possible with group-aware splits) are left out of the mean;
    NaN when fewer than two classes are present.
    """
    true_labels = np.asarray(true_labels)
    values = []
    for column, name in enumerate(classes):
        positive = true_labels == name
        if positive.all() or not positive.any():
            continue
        values.append(roc_auc_score(positive, probabilities[:, column]))
        if len(classes) == 2:
            break  # the two one-vs-rest AUCs of a binary problem are equal
    return float(np.mean(values)) if values else float("nan")


def fit_probe(
    embedding: np.ndarray, labels: np.ndarray, train: np.ndarray, config: ProbeConfig
) -> tuple[Pipeline, int]:
    """A probe chosen from the menu on the cells ``train`` (:func:`select_probe`) and fitted on them, and
    how many convergence warnings the fits raised. ``probe.classifier_name`` names the choice."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # tiny inner folds lacking a class
        name, probe = select_probe(embedding[train], labels[train], config)
        probe.fit(embedding[train], labels[train])
    if "logistic" in probe.named_steps:
        logistic = probe.named_steps["logistic"]
        # one memory layout for fitted and JSON-loaded probes, so both predict bit for bit alike
        logistic.coef_ = np.ascontiguousarray(logistic.coef_)
    probe.classifier_name = name
    n_warnings = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return probe, n_warnings


def score_probe(probe: Pipeline, embedding: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and ROC-AUC of a fitted ``probe`` on ``embedding``/``labels``."""
    probabilities = probe.predict_proba(embedding)
    classes = list(probe.classes_)
    predictions = np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)]
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "roc_auc": roc_auc(labels, probabilities, classes),
    }


def run_probe(
    embedding: np.ndarray,
    labels: np.ndarray,
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
    split: ProbeSplit | None = None,
) -> ProbeResult:
    """Fit the probe on the hold-out training cells, score it on the test cells, cross-validate.

    ``split`` (from :func:`make_split`) fixes the cells; without it one is drawn from ``config`` and
    ``groups``. Returns a :class:`ProbeResult`; ``result.probe`` is the probe fitted on the training
    part. Nothing is written to disk — see :func:`save_probe`.
    """
    config = config or ProbeConfig()
    embedding = check_embedding(embedding)
    labels = check_labels(labels, n_cells=embedding.shape[0])
    split = split or make_split(labels, config, groups)
    if max(split.train_indices.max(), split.test_indices.max()) >= len(labels):
        raise NeurofmError(
            "the probe split indexes cells beyond the embedding; draw the split on these cells"
        )

    # small dense problems: multi-threaded BLAS only adds overhead (10x slower few-shot fits)
    with threadpool_limits(limits=1, user_api="blas"):
        probe, n_warnings = fit_probe(embedding, labels, split.train_indices, config)
        classes = [str(c) for c in probe.classes_]
        test_labels = labels[split.test_indices]
        probabilities = probe.predict_proba(embedding[split.test_indices])
        predictions = np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)]

        cv_scores: dict[str, list[float]] = {"accuracy": [], "f1_macro": [], "roc_auc": []}
        for train, test in split.cv_folds:
            fold_probe, fold_warnings = fit_probe(embedding, labels, train, config)
            n_warnings += fold_warnings
            for name, value in score_probe(fold_probe, embedding[test], labels[test]).items():
                cv_scores[name].append(value)
    if n_warnings:
        logger.warning("probe: %d fits hit max_iter=%d before converging", n_warnings, config.max_iter)

    return ProbeResult(
        classes=classes,
        accuracy=float(accuracy_score(test_labels, predictions)),
        f1_macro=float(f1_score(test_labels, predictions, average="macro", zero_division=0)),
        roc_auc=roc_auc(test_labels, probabilities, classes),
        confusion=confusion_matrix(test_labels, predictions, labels=classes),
        test_labels=test_labels,
        test_predictions=predictions,
        test_probabilities=probabilities,
        cv_accuracy=np.asarray(cv_scores["accuracy"], dtype=float),
        cv_f1_macro=np.asarray(cv_scores["f1_macro"], dtype=float),
        cv_roc_auc=np.asarray(cv_scores["roc_auc"], dtype=float),
        probe=probe,
        split=split,
        config=config,
        n_convergence_warnings=n_warnings,
        classifier=probe.classifier_name,
    )


def check_embedding(embedding: np.ndarray) -> np.ndarray:
    """``embedding`` as a finite 2-D float64 array, else a NeurofmError naming the fix."""
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim != 2 or embedding.shape[0] < 2 or embedding.shape[1] < 1:
        raise NeurofmError(
            f"an embedding must be a 2-D cells × dimensions matrix, got shape {embedding.shape}; "
            "pass e.g. adata.obsm['X_neurofm']"
        )
    if not np.isfinite(embedding).all():
        raise NeurofmError(
            "the embedding contains NaN or infinite values; re-embed the cells (check the model)"
        )
    return embedding


def save_probe(probe: Pipeline, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write :func:`probe_to_json` (plus ``extra`` under ``"meta"``) atomically to ``path``."""
    data = probe_to_json(probe)
    if extra:
        data["meta"] = extra
    return write_json(data, path)


def load_probe(path: str | os.PathLike) -> Pipeline:
    """Read a probe written by :func:`save_probe`."""
    import json

    path = Path(path)
    if not path.is_file():
        raise NeurofmError(f"probe file {path} does not exist; pass the probe.json an evaluation wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return probe_from_json(data)
    except NeurofmError:
        raise
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        reason = f"missing key {error}" if isinstance(error, KeyError) else str(error).splitlines()[0][:120]
        raise NeurofmError(
            f"{path} is not a probe.json written by neurofm ({reason}); pass the probe.json an evaluation wrote"
        ) from None


def config_dict(config: ProbeConfig) -> dict[str, Any]:
    """``config`` as a plain dict (for run_meta.json)."""
    return asdict(config)
