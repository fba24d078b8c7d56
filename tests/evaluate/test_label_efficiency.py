"""label_efficiency: a method × shots table from shared draws of the training part only."""

from __future__ import annotations

import numpy as np

from neurofm.evaluate.label_efficiency import COLUMNS, draw_few_shot, label_efficiency
from neurofm.evaluate.probe import ProbeConfig, make_split


def blobs(n_cells: int = 400, separation: float = 1.2, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, n_cells)
    embedding = rng.normal(size=(n_cells, 8))
    embedding[:, 0] += separation * codes
    return embedding, np.array(["a", "b"])[codes]


def test_table_shape_columns_and_trend():
    embedding, labels = blobs()
    noise = np.random.default_rng(9).normal(size=embedding.shape)
    table = label_efficiency(
        {"model": embedding, "random": noise}, labels, shots=(2, 10, 50, "all"), n_draws=6
    )
    assert list(table.columns) == COLUMNS
    assert len(table) == 8
    assert table["shots"].tolist()[:4] == ["2", "10", "50", "all"]
    model = table[table["method"] == "model"].set_index("shots")
    assert model.loc["all", "n_draws"] == 1 and np.isnan(model.loc["all", "accuracy_sd"])
    assert model.loc["2", "n_train"] == 4
    # more labels help a signal-bearing embedding; noise stays near chance throughout
    assert model.loc["all", "auc_mean"] > model.loc["2", "auc_mean"]
    assert model.loc["50", "accuracy_mean"] > model.loc["2", "accuracy_mean"]
    random = table[table["method"] == "random"]
    assert (random["auc_mean"] - 0.5).abs().max() < 0.15


def test_draws_come_from_the_training_part_only_and_are_shared():
    _, labels = blobs()
    split = make_split(labels, ProbeConfig())
    draws = draw_few_shot(labels, split.train_indices, 5, n_draws=4, seed=0)
    assert len(draws) == 4
    for draw in draws:
        assert set(draw) <= set(split.train_indices)
        assert sorted(np.unique(labels[draw], return_counts=True)[1]) == [5, 5]
    again = draw_few_shot(labels, split.train_indices, 5, n_draws=4, seed=0)
    for first, second in zip(draws, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_identical_embeddings_get_identical_rows():
    embedding, labels = blobs()
    table = label_efficiency({"one": embedding, "two": embedding.copy()}, labels, shots=(5, 20), n_draws=3)
    values = ["accuracy_mean", "auc_mean", "f1_mean"]
    np.testing.assert_array_equal(table.iloc[:2][values].to_numpy(), table.iloc[2:][values].to_numpy())


def test_small_classes_contribute_what_they_have():
    labels = np.array(["a"] * 30 + ["b"] * 8)
    draws = draw_few_shot(labels, np.arange(len(labels)), 20, n_draws=2, seed=0)
    assert all(np.sum(labels[d] == "b") == 8 and np.sum(labels[d] == "a") == 20 for d in draws)


def test_scores_do_not_depend_on_the_number_of_worker_processes():
    embedding, labels = blobs(n_cells=200)
    embeddings = {"model": embedding, "noise": np.random.default_rng(1).normal(size=embedding.shape)}
    one = label_efficiency(embeddings, labels, shots=(5, 25), n_draws=3, n_jobs=1)
    two = label_efficiency(embeddings, labels, shots=(5, 25), n_draws=3, n_jobs=2)
    assert one.equals(two)
