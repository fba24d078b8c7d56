"""Classifiers on cell features, shared by evaluation and mapping (below both in the import graph).

**The menu** (:func:`probe_menu`, :func:`select_probe`): logistic regression on the raw and on the
z-scored features over a grid of ``C``, and k-nearest neighbours over a grid of ``k``
(:class:`ProbeConfig`), one entry picked by inner cross-validation on the labelled cells alone —
the evaluation's probe for every method, and the protocol the map pipeline's baselines are scored by.
A fitted menu entry is exported as plain JSON (:func:`probe_to_json` / :func:`probe_from_json`), never
pickled.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------- the label head

FEATURE_SETS = ("genes", "embedding", "genes+embedding")  # what a head can read, simplest first


@dataclass(frozen=True)
class HeadConfig:
    """The label head of a reference: a softmax classifier trained on the reference cells' labels.

    Its inputs are z-scored cell features — the log-normalised expression of the model's genes, the
    model's embedding, or both side by side. ``features="auto"`` trains one head per available set and
    keeps the one with the best macro-F1 on a held-out share of the *reference* cells (the query is never
    seen). Training stops early on that share's loss; the weights of the best epoch are kept.
    """

    features: str = "auto"  # "auto" or one of FEATURE_SETS
    hidden: int = 256  # units of the one hidden layer (ReLU); 0: a linear head (multinomial logistic)
    dropout: float = 0.1  # on the hidden layer, in training
    max_epochs: int = 40  # passes over the training cells at most
    patience: int = 3  # epochs without a lower held-out loss before training stops
    batch_size: int = 512
    learning_rate: float = 2e-3  # Adam
    weight_decay: float = 1e-4  # L2 on the weights (Adam's decoupled decay)
    validation_share: float = 0.1  # held-out reference cells per label (labels with < 5 cells: none)
    class_weights: str = "none"  # "none" or "balanced" (each label weighted by 1 / its share of cells: lower
    #                              held-out macro-F1 on both M1 donors at both levels, BENCHMARKS "Label heads")
    seed: int = 0  # the held-out share, the initial weights and the batches

    def validate(self) -> HeadConfig:
        if self.features != "auto" and self.features not in FEATURE_SETS:
            raise NeurofmError(
                f"reference.head.features={self.features!r} is unknown; use auto or one of {', '.join(FEATURE_SETS)}"
            )
        if not 0.0 < self.validation_share < 0.5:
            raise NeurofmError(
                f"reference.head.validation_share={self.validation_share} must be in (0, 0.5); e.g. 0.1"
            )
        for name in ("max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise NeurofmError(
                    f"reference.head.{name}={getattr(self, name)} must be >= 1; pass a positive number"
                )
        if self.class_weights not in ("none", "balanced"):
            raise NeurofmError(f"reference.head.class_weights={self.class_weights!r} is unknown; use none or balanced")
        if self.hidden < 0 or not 0.0 <= self.dropout < 1.0:
            raise NeurofmError(
                "reference.head.hidden must be >= 0 and dropout in [0, 1); e.g. hidden=256, dropout=0.1"
            )
        return self


@dataclass
class LabelHead:
    """A fitted label head: z-scoring, then ``layers`` (weight, bias) with ReLU between them, then softmax.

    Inference is plain numpy (float32); features the query lacks (NaN) count as the reference mean."""

    classes: list[str]
    features: str  # one of FEATURE_SETS
    mean: np.ndarray  # (n_features,)
    scale: np.ndarray  # (n_features,)
    layers: list[tuple[np.ndarray, np.ndarray]]  # (in, out) weights and (out,) biases
    validation_f1: float = float("nan")  # macro-F1 on the held-out reference cells
    epochs: int = 0  # epochs trained (the best one's weights kept)

    @property
    def classes_(self) -> np.ndarray:  # the scikit-learn name, as transfer code reads it
        return np.asarray(self.classes, dtype=object)

    @property
    def name(self) -> str:
        shape = "linear" if len(self.layers) == 1 else f"mlp {self.layers[0][0].shape[1]}"
        return f"head {shape} on {self.features}"

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = (np.asarray(x, dtype=np.float32) - self.mean) / self.scale
        h[~np.isfinite(h)] = 0.0
        for index, (weight, bias) in enumerate(self.layers):
            h = h @ weight + bias
            if index < len(self.layers) - 1:
                np.maximum(h, 0.0, out=h)
        return h

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = self.logits(x)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        return logits / logits.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.logits(x).argmax(axis=1)]

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """The head as named arrays (for safetensors): ``prefix/mean``, ``/scale``, ``/w0``, ``/b0``, …"""
        out = {f"{prefix}/mean": self.mean, f"{prefix}/scale": self.scale}
        for index, (weight, bias) in enumerate(self.layers):
            out[f"{prefix}/w{index}"], out[f"{prefix}/b{index}"] = weight, bias
        return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in out.items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "head", "features": self.features, "n_layers": len(self.layers),
                "validation_f1": self.validation_f1, "epochs": self.epochs}  # fmt: skip

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, np.ndarray], prefix: str, classes: list[str], info: dict[str, Any]
    ) -> LabelHead:
        layers = [
            (tensors[f"{prefix}/w{i}"], tensors[f"{prefix}/b{i}"]) for i in range(int(info["n_layers"]))
        ]
        return cls(
            classes=list(classes), features=info["features"], mean=tensors[f"{prefix}/mean"],
            scale=tensors[f"{prefix}/scale"], layers=layers, validation_f1=float(info.get("validation_f1", "nan")),
            epochs=int(info.get("epochs", 0)),
        )  # fmt: skip


def held_out_share(codes: np.ndarray, share: float, seed: int, min_cells: int = 5) -> np.ndarray:
    """Boolean mask of a stratified held-out share: ``round(share × n)`` (≥ 1) cells of every label with at
    least ``min_cells`` cells; rarer labels are all kept for training."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(codes), dtype=bool)
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        if len(rows) >= min_cells:
            held[rng.choice(rows, size=max(1, int(round(share * len(rows)))), replace=False)] = True
    return held


def _zscore(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(x, axis=0) if np.isnan(x).any() else x.mean(axis=0)
    scale = np.nanstd(x, axis=0) if np.isnan(x).any() else x.std(axis=0)
    mean = np.nan_to_num(mean, nan=0.0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-6), scale, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def train_head(
    x: np.ndarray, codes: np.ndarray, classes: list[str], features: str, config: HeadConfig, held: np.ndarray
) -> LabelHead:
    """A :class:`LabelHead` on ``x`` (cells × features; NaN = unobserved) for integer ``codes`` into
    ``classes``, trained on the cells outside ``held`` and stopped early on the loss of those in it. Runs on
    one CPU thread: the network is small, and a second thread beside a busy process made it 10-25×
    slower (BENCHMARKS.md, "Label heads")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_head(x, codes, classes, features, config, held)
    finally:
        torch.set_num_threads(threads)


def _train_head(
    x: np.ndarray, codes: np.ndarray, classes: list[str], features: str, config: HeadConfig, held: np.ndarray
) -> LabelHead:
    import torch
    from torch import nn

    x = np.asarray(x, dtype=np.float32)
    mean, scale = _zscore(x[~held])
    z = (x - mean) / scale
    z[~np.isfinite(z)] = 0.0
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    n_in, n_out = z.shape[1], len(classes)
    if config.hidden:
        network = nn.Sequential(
            nn.Linear(n_in, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, n_out),
        )
    else:
        network = nn.Sequential(nn.Linear(n_in, n_out))
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    train_x, train_y = torch.from_numpy(z[~held]), torch.from_numpy(codes[~held].astype(np.int64))
    held_x, held_y = torch.from_numpy(z[held]), torch.from_numpy(codes[held].astype(np.int64))
    weight = None
    if config.class_weights == "balanced":  # scikit-learn's rule: n_cells / (n_labels × cells of the label)
        counts = np.bincount(codes[~held], minlength=n_out).astype(np.float32)
        weight = torch.from_numpy(np.where(counts > 0, counts.sum() / (n_out * np.maximum(counts, 1)), 0.0))
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    best: tuple[float, int, list[torch.Tensor]] | None = None
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        network.train()
        for batch in torch.randperm(len(train_y), generator=generator).split(config.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(network(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
        if not len(held_y):  # nothing held out (every label rare): a fixed number of epochs
            best = (0.0, epoch, [p.detach().clone() for p in network.state_dict().values()])
            continue
        network.eval()
        with torch.no_grad():
            held_loss = float(loss_fn(network(held_x), held_y))
        if best is None or held_loss < best[0] - 1e-4:
            best = (held_loss, epoch, [p.detach().clone() for p in network.state_dict().values()])
        elif epoch - best[1] >= config.patience:
            break
    assert best is not None
    network.load_state_dict(dict(zip(network.state_dict(), best[2], strict=True)))
    linears = [module for module in network if isinstance(module, nn.Linear)]
    layers = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears]
    head = LabelHead(
        classes=list(classes), features=features, mean=mean, scale=scale, layers=layers, epochs=best[1]
    )
    if len(held_y):
        predicted = head.logits(x[held]).argmax(axis=1)
        head.validation_f1 = float(f1_score(codes[held], predicted, average="macro", zero_division=0))
    return head


def head_features(features: str, expression: np.ndarray | None, embedding: np.ndarray) -> np.ndarray:
    """The input matrix of a head reading ``features`` (see :data:`FEATURE_SETS`)."""
    if features != "embedding" and expression is None:
        raise NeurofmError(f"a head on {features} needs the cells' gene expression; pass expression=")
    parts = {"genes": [expression], "embedding": [embedding], "genes+embedding": [expression, embedding]}[
        features
    ]
    return np.hstack([np.asarray(p, dtype=np.float32) for p in parts])


def fit_head(
    labels: np.ndarray, embedding: np.ndarray, expression: np.ndarray | None, config: HeadConfig | None = None
) -> LabelHead:
    """The reference's label head for ``labels`` (strings, one per cell), reading the embedding and/or the
    log-normalised ``expression`` (cells × genes, NaN = unobserved). With ``features="auto"`` every
    available feature set is tried on the same held-out reference cells and the best macro-F1 kept (ties:
    the simpler set, in :data:`FEATURE_SETS` order)."""
    config = (config or HeadConfig()).validate()
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    held = held_out_share(codes, config.validation_share, config.seed)
    if config.features != "auto":
        candidates = [config.features]
    else:
        candidates = ["embedding"] if expression is None else list(FEATURE_SETS)
    best: LabelHead | None = None
    for features in candidates:
        head = train_head(
            head_features(features, expression, embedding), codes, list(classes), features, config, held
        )
        logger.info(
            "label head on %s: held-out macro-F1 %.3f after %d epochs",
            features,
            head.validation_f1,
            head.epochs,
        )
        if best is None or head.validation_f1 > best.validation_f1 + 1e-9:
            best = head
    assert best is not None
    return best
