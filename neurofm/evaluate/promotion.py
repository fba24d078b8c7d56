"""The promotion policy: whether a candidate model version becomes the ``champion`` alias, judged on
two ``summary.json`` dicts (:func:`should_promote`, a pure function; :mod:`neurofm.tracking` applies it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _metric(metrics: Mapping[str, Any] | None, method: str, name: str) -> float:
    """``metrics["<method>/<name>"]`` (or ``metrics[name]`` for the model), NaN when absent."""
    if not metrics:
        return float("nan")
    for key in (f"{method}/{name}", name if method == "model" else None):
        if key is not None and metrics.get(key) is not None:
            return float(metrics[key])
    return float("nan")


PROMOTION_BASELINES = {"pca": "PCA", "scvi": "scVI"}  # a champion keeps up with each on its probe


def should_promote(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    margin: float = 0.0,
    pca_tolerance: float = 0.0,
) -> tuple[bool, str]:
    """Decide whether the candidate model version becomes the ``champion`` alias, and why.

    ``candidate`` is the candidate's ``summary.json`` (it must hold ``model/probe_auc``,
    ``model/probe_accuracy`` and the same-run ``pca/probe_auc``, ``pca/probe_accuracy``);
    ``champion`` the current champion's (``model/…`` keys, or bare ``probe_auc``/``probe_accuracy``),
    or None when there is none. Both should come from the same evaluation data.

    The probes are the fair ones: every method's classifier is picked from the same menu on the
    training cells (see :mod:`neurofm.evaluate.probe`). The rule, in order:
    1. the candidate must not fall behind any same-run baseline (PCA, and scVI when it ran): neither
       its probe AUC nor its accuracy may be lower than the baseline's by more than ``pca_tolerance``
       (missing PCA metrics → no promotion);
    2. with no champion, a candidate that passes 1 is promoted;
    3. else it must beat the champion on the probe: AUC higher by more than ``margin``; or AUC within
       ``margin`` of the champion's and accuracy higher by more than ``margin``. Ties do not promote.
    """
    auc, accuracy = _metric(candidate, "model", "probe_auc"), _metric(candidate, "model", "probe_accuracy")
    pca_auc, pca_accuracy = (
        _metric(candidate, "pca", "probe_auc"),
        _metric(candidate, "pca", "probe_accuracy"),
    )
    if not (math.isfinite(auc) and math.isfinite(accuracy)):
        return False, "candidate has no finite model/probe_auc and model/probe_accuracy; not promoted"
    if not (math.isfinite(pca_auc) and math.isfinite(pca_accuracy)):
        return (
            False,
            "candidate run has no same-run PCA baseline (pca/probe_auc, pca/probe_accuracy); not promoted",
        )
    for baseline in PROMOTION_BASELINES:
        base_auc = _metric(candidate, baseline, "probe_auc")
        base_accuracy = _metric(candidate, baseline, "probe_accuracy")
        if math.isfinite(base_auc) and auc < base_auc - pca_tolerance:
            return (
                False,
                f"probe AUC {auc:.4f} falls behind the {PROMOTION_BASELINES[baseline]} baseline "
                f"{base_auc:.4f}; not promoted",
            )
        if math.isfinite(base_accuracy) and accuracy < base_accuracy - pca_tolerance:
            return (
                False,
                f"probe accuracy {accuracy:.4f} falls behind the {PROMOTION_BASELINES[baseline]} baseline "
                f"{base_accuracy:.4f}; "
                "not promoted",
            )
    if champion is None:
        return (
            True,
            f"no current champion; AUC {auc:.4f} / accuracy {accuracy:.4f} keep up with the baselines; "
            "promoted",
        )
    champion_auc = _metric(champion, "model", "probe_auc")
    champion_accuracy = _metric(champion, "model", "probe_accuracy")
    if not math.isfinite(champion_auc):
        return True, "the current champion has no probe AUC on record; promoted"
    if auc > champion_auc + margin:
        return (
            True,
            f"probe AUC {auc:.4f} beats the champion's {champion_auc:.4f} (margin {margin}); promoted",
        )
    if auc < champion_auc - margin:
        return False, f"probe AUC {auc:.4f} is below the champion's {champion_auc:.4f}; not promoted"
    if not math.isfinite(champion_accuracy) or accuracy > champion_accuracy + margin:
        return True, (
            f"probe AUC ties the champion's ({auc:.4f} vs {champion_auc:.4f}) and accuracy {accuracy:.4f} "
            "beats "
            f"{champion_accuracy:.4f} (margin {margin}); promoted"
        )
    return False, (
        f"probe AUC {auc:.4f} and accuracy {accuracy:.4f} do not beat the champion's "
        f"{champion_auc:.4f} / {champion_accuracy:.4f} (margin {margin}); not promoted"
    )
