"""Turn decision scores into a confidence in [0, 1] for the predicted (highest-scoring) class."""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.special import expit

ConfidenceMethod = Literal["raw", "zscore"]
CONFIDENCE_METHODS: tuple[str, ...] = ("raw", "zscore")


def _check(decision_scores: np.ndarray) -> np.ndarray:
    s = np.asarray(decision_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(
            f"decision_scores must be a (n_cells, n_classes) matrix with at least 2 classes, got shape {s.shape}."
        )
    if not np.isfinite(s).all():
        raise ValueError("decision_scores contain NaN or infinite values.")
    return s


def transform_confidence(decision_scores: np.ndarray, method: ConfidenceMethod = "zscore") -> np.ndarray:
    """Confidence of the predicted class of each cell, from its decision scores.

    Parameters
    ----------
    decision_scores
        ``(n_cells, n_classes)`` decision scores of one query dataset (e.g. ``obsm["cell_type_decision_scores"]``).
    method
        ``"raw"``: CellTypist's probability of the predicted class, ``sigmoid(score)``. On spatial data scores shift
        negative under the platform change, so this collapses towards 0 even for right calls.
        ``"zscore"``: each class's scores are standardised within the query dataset (over cells) before the sigmoid,
        ``sigmoid((s_k - mean_k) / std_k)`` for the predicted class ``k``: the published fix for the platform shift.

    Returns
    -------
    float64 array of shape ``(n_cells,)`` with values in [0, 1].
    """
    s = _check(decision_scores)
    best = s.argmax(axis=1)
    rows = np.arange(s.shape[0])
    if method == "raw":
        return expit(s[rows, best])
    if method == "zscore":
        mean = s.mean(axis=0)
        std = s.std(axis=0)
        std[std == 0] = 1.0
        return expit((s[rows, best] - mean[best]) / std[best])
    raise ValueError(f"Unknown confidence method {method!r}; choose one of {CONFIDENCE_METHODS}.")
