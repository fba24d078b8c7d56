"""run_probe / make_split: separable labels score high, shuffled ones near chance, groups stay apart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neurofm.errors import NeurofmError
from neurofm.evaluate.probe import (
    ProbeConfig,
    load_probe,
    make_split,
    probe_from_json,
    probe_to_json,
    roc_auc,
    run_probe,
    save_probe,
)

FAST = ProbeConfig(n_splits=3, n_repeats=2, C_grid=(0.1, 10.0), k_grid=(3, 15))


def blobs(n_cells: int = 400, n_classes: int = 2, dims: int = 16, separation: float = 4.0, seed: int = 0):
    """Gaussian blobs: class k is shifted by ``separation`` along dimension k."""
    rng = np.random.default_rng(seed)
    classes = np.array([f"type_{k}" for k in range(n_classes)])
    codes = rng.integers(0, n_classes, n_cells)
    embedding = rng.normal(size=(n_cells, dims))
    embedding[np.arange(n_cells), codes] += separation
    return embedding, classes[codes]


def test_separable_blobs_score_high():
    embedding, labels = blobs()
    result = run_probe(embedding, labels, FAST)
    assert result.accuracy > 0.97 and result.f1_macro > 0.97 and result.roc_auc > 0.99
    assert result.cv_accuracy.shape == (6,) and result.cv_accuracy.mean() > 0.97
    assert result.confusion.sum() == len(result.split.test_indices)
    assert result.classes == ["type_0", "type_1"]


def test_shuffled_labels_score_near_chance():
    embedding, labels = blobs(n_cells=600)
    shuffled = np.random.default_rng(1).permutation(labels)
    result = run_probe(embedding, shuffled, FAST)
    assert abs(result.roc_auc - 0.5) < 0.12
    assert abs(result.cv_roc_auc.mean() - 0.5) < 0.07
    assert result.accuracy < 0.65


def test_three_classes_use_macro_one_vs_rest_auc():
    embedding, labels = blobs(n_cells=450, n_classes=3)
    result = run_probe(embedding, labels, FAST)
    assert result.test_probabilities.shape == (len(result.split.test_indices), 3)
    assert result.confusion.shape == (3, 3)
    assert result.roc_auc > 0.99 and result.f1_macro > 0.95


def test_roc_auc_binary_equals_macro_and_skips_absent_classes():
    true = np.array(["a", "a", "b", "b"])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    assert roc_auc(true, probabilities, ["a", "b"]) == pytest.approx(0.75)
    three = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    assert roc_auc(np.array(["a", "b", "a", "b"]), three, ["a", "b", "c"]) == pytest.approx(1.0)
    assert np.isnan(roc_auc(np.array(["a", "a"]), probabilities[:2], ["a", "b"]))


def test_stratified_split_is_seeded_and_keeps_class_shares():
    _, labels = blobs(n_cells=500)
    first, second = make_split(labels, ProbeConfig()), make_split(labels, ProbeConfig())
    np.testing.assert_array_equal(first.test_indices, second.test_indices)
    assert len(first.test_indices) == 100
    assert not set(first.train_indices) & set(first.test_indices)
    share = np.mean(labels == "type_0")
    assert np.mean(labels[first.test_indices] == "type_0") == pytest.approx(share, abs=0.02)
    other = make_split(labels, ProbeConfig(seed=7))
    assert not np.array_equal(first.test_indices, other.test_indices)


def test_group_aware_split_keeps_groups_disjoint():
    embedding, labels = blobs(n_cells=600, n_classes=3)
    groups = np.random.default_rng(2).integers(0, 40, len(labels)).astype(str)
    split = make_split(labels, FAST, groups=groups)
    assert split.grouped
    assert not set(groups[split.train_indices]) & set(groups[split.test_indices])
    for train, test in split.cv_folds:
        assert not set(groups[train]) & set(groups[test])
    assert 0.1 < len(split.test_indices) / len(labels) < 0.3
    result = run_probe(embedding, labels, FAST, split=split)
    assert result.split is split and result.accuracy > 0.95


def test_group_aware_off_ignores_groups():
    _, labels = blobs()
    groups = np.arange(len(labels)) % 10
    assert not make_split(labels, ProbeConfig(group_aware=False), groups=groups).grouped


def test_too_few_groups_is_an_error():
    _, labels = blobs()
    with pytest.raises(NeurofmError, match="groups"):
        make_split(labels, ProbeConfig(), groups=np.arange(len(labels)) % 3)


def test_shared_split_is_reused_across_embeddings():
    embedding, labels = blobs()
    split = make_split(labels, FAST)
    other = np.random.default_rng(5).normal(size=embedding.shape)
    first, second = (
        run_probe(embedding, labels, FAST, split=split),
        run_probe(other, labels, FAST, split=split),
    )
    np.testing.assert_array_equal(first.test_labels, second.test_labels)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_json_round_trip_predicts_identically(tmp_path, n_classes):
    embedding, labels = blobs(n_classes=n_classes, separation=1.5)
    probe = run_probe(embedding, labels, FAST).probe
    data = json.loads(json.dumps(probe_to_json(probe)))  # through text, as on disk
    rebuilt = probe_from_json(data)
    np.testing.assert_array_equal(rebuilt.predict_proba(embedding), probe.predict_proba(embedding))
    np.testing.assert_array_equal(rebuilt.predict(embedding), probe.predict(embedding))
    loaded = load_probe(save_probe(probe, tmp_path / "probe.json", extra={"method": "model"}))
    np.testing.assert_array_equal(loaded.predict_proba(embedding), probe.predict_proba(embedding))
    assert b"pickle" not in (tmp_path / "probe.json").read_bytes()


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (ProbeConfig(n_splits=0, k_grid=()), "logistic"),
        (ProbeConfig(n_splits=0, C_grid=(), k_grid=(5,)), "knn"),
    ],
)
def test_each_kind_of_probe_round_trips_through_json(config, kind):
    embedding, labels = blobs(separation=1.5)
    result = run_probe(embedding, labels, config)
    data = json.loads(json.dumps(probe_to_json(result.probe)))
    assert data["kind"] == kind and data["classifier"] == result.classifier
    rebuilt = probe_from_json(data)
    np.testing.assert_array_equal(rebuilt.predict_proba(embedding), result.probe.predict_proba(embedding))


def test_the_menu_picks_the_classifier_the_geometry_needs():
    """Two noise-free informative dimensions among many noisy ones: a z-scoring probe would weigh the
    noise like the signal; rings need a neighbour vote, which no linear probe can draw."""
    rng = np.random.default_rng(0)
    n = 300
    radius = np.where(rng.random(n) < 0.5, 1.0, 3.0)
    angle = rng.uniform(0, 2 * np.pi, n)
    rings = np.column_stack([radius * np.cos(angle), radius * np.sin(angle)]) + rng.normal(0, 0.1, (n, 2))
    labels = np.where(radius > 2, "outer", "inner")
    result = run_probe(rings, labels, ProbeConfig(n_splits=0))
    assert result.classifier.startswith("knn") and result.f1_macro > 0.95
    linear_only = run_probe(rings, labels, ProbeConfig(n_splits=0, k_grid=()))
    assert linear_only.f1_macro < 0.8  # what a fixed logistic probe would report


def test_the_choice_never_sees_the_test_cells():
    embedding, labels = blobs(n_classes=3, separation=1.0)
    split = make_split(labels, ProbeConfig(n_splits=0))
    shuffled = labels.copy()
    shuffled[split.test_indices] = np.random.default_rng(1).permutation(shuffled[split.test_indices])
    first = run_probe(embedding, labels, ProbeConfig(n_splits=0), split=split)
    second = run_probe(embedding, shuffled, ProbeConfig(n_splits=0), split=split)
    assert first.classifier == second.classifier
    np.testing.assert_array_equal(first.test_predictions, second.test_predictions)


def test_few_labels_are_chosen_by_leave_one_out():
    from sklearn.model_selection import LeaveOneOut

    from neurofm.classify import _inner_splitter

    labels = np.array(["a"] * 5 + ["b"] * 5)
    assert isinstance(_inner_splitter(labels, ProbeConfig()), LeaveOneOut)
    assert not isinstance(_inner_splitter(np.array(["a", "b"] * 100), ProbeConfig()), LeaveOneOut)


def test_bad_embeddings_and_labels_are_refused():
    embedding, labels = blobs()
    with pytest.raises(NeurofmError, match="2-D"):
        run_probe(embedding[:, 0], labels)
    bad = embedding.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NeurofmError, match="NaN"):
        run_probe(bad, labels)
    with pytest.raises(NeurofmError, match="single class"):
        run_probe(embedding, np.full(len(labels), "a"))
    with pytest.raises(NeurofmError, match="fewer than 2 cells"):
        make_split(np.array(["a"] * 10 + ["b"]))


def test_inner_predictions_equal_cross_val_predict_for_every_candidate():
    from sklearn.model_selection import cross_val_predict

    from neurofm.classify import _inner_predictions, _inner_splitter, probe_menu

    rng = np.random.default_rng(3)
    labels = np.array(["a", "b", "c"] * 12)
    embedding = rng.normal(size=(len(labels), 4)) + (labels == "a")[:, None] * 1.5
    config = ProbeConfig()
    for n_cells in (12, 36):  # leave-one-out and stratified k-fold
        x, y = embedding[:n_cells], labels[:n_cells]
        menu, splitter = probe_menu(config, n_cells), _inner_splitter(y, config)
        fast = _inner_predictions(x, y, menu, splitter)
        in_workers = _inner_predictions(x, y, menu, splitter, n_jobs=2)  # folds in 2 processes
        for name, candidate in menu:
            np.testing.assert_array_equal(fast[name], cross_val_predict(candidate, x, y, cv=splitter))
            np.testing.assert_array_equal(in_workers[name], fast[name])
