"""The unknown rule: a cell fails if its distance to its label or the head's probability of it is
unusual for the held-out reference cells, at a threshold set on those cells (``unknown_quantile``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from neurofm.mapping import (
    UNKNOWN,
    ReferenceConfig,
    build_reference,
    label_frame,
    load_reference,
    predict_labels,
    save_reference,
    transfer_labels,
    unknown_threshold,
)
from tests.test_mapping import blobs


def built(quantile: float = 0.95, seed: int = 0):
    points, labels = blobs(300, [0, 1, 2], seed=seed)
    config = ReferenceConfig(label_columns=("cell_type",), unknown_quantile=quantile)
    return build_reference(points, pd.DataFrame({"cell_type": labels}), config)


def test_the_threshold_calls_about_the_chosen_share_of_known_cells_unknown():
    for quantile in (0.99, 0.9):
        reference = built(quantile)
        query, truth = blobs(400, [0, 1, 2], seed=5)  # new cells of the known types
        frame = transfer_labels(reference, query, "cell_type")
        called = (frame["label"] == UNKNOWN).mean()
        assert abs(called - (1 - quantile)) < 0.06, (quantile, called)
        assert (frame["predicted"] == truth).mean() > 0.97


def test_a_cell_fails_if_either_check_fails():
    reference = built()
    ref = reference.columns["cell_type"]
    assert ref.probability_calibration is not None and 0 < unknown_threshold(reference, "cell_type") < 0.5
    query, _ = blobs(50, [1], seed=7)  # close to type1's reference cells
    codes, probability = predict_labels(reference, "cell_type", query)
    confident = label_frame(reference, "cell_type", query, codes, probability)
    assert (confident["label"] != UNKNOWN).mean() > 0.8
    doubtful = label_frame(reference, "cell_type", query, codes, np.full(len(query), 0.34))  # near chance
    assert (doubtful["label"] == UNKNOWN).all()
    np.testing.assert_allclose(doubtful["distance_score"], confident["distance_score"])
    assert (doubtful["score"] <= doubtful["distance_score"]).all()
    far = query + 12.0  # confident but far from every reference cell
    far_frame = label_frame(reference, "cell_type", far, codes, np.ones(len(query)))
    assert (far_frame["label"] == UNKNOWN).all()


def test_the_rule_survives_saving_and_an_older_reference_uses_the_distance_alone(tmp_path):
    reference = built()
    save_reference(reference, tmp_path)
    loaded = load_reference(tmp_path)
    ref, back = reference.columns["cell_type"], loaded.columns["cell_type"]
    np.testing.assert_array_equal(back.probability_calibration, ref.probability_calibration)
    assert back.unknown_threshold == ref.unknown_threshold
    query, _ = blobs(40, [0, 1, 2, 3], seed=9)
    pd.testing.assert_frame_equal(
        transfer_labels(loaded, query, "cell_type"), transfer_labels(reference, query, "cell_type")
    )
    back.probability_calibration, back.unknown_threshold = None, None  # as a reference saved before the rule
    older = transfer_labels(loaded, query, "cell_type")
    np.testing.assert_allclose(older["score"], older["distance_score"])
    assert unknown_threshold(loaded, "cell_type") == 1 - loaded.config.unknown_quantile
    assert ((older["score"] < 0.05) == (older["label"] == UNKNOWN)).all()
