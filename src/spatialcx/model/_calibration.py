"""Confidence calibration fitted on reference cells at training time.

The ``"calibrated"`` confidence (:func:`spatialcx.tl.transform_confidence`) corrects CellTypist's probability for the
platform shift by moving each class's scores so that the cells *not* called that class sit where reference cells of
other types sat. That needs one number per class from the reference: the median decision score of class ``k`` over
reference cells of the other types. The ``"softmax"`` confidence needs a temperature. Both are fitted here, on the
model's own training cells (scored by the final model, so no second model is fitted), and stored with the model.

The calibration is a plain dict of JSON types (stored in the model file and, with its values, in ``uns``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spatialcx._utils import as_str_array

#: Version of the calibration dict layout.
CALIBRATION_VERSION = 1


def column_standardise(scores: np.ndarray) -> np.ndarray:
    """Standardise each class's scores over the cells (rows) of one dataset: ``(s_k - mean_k) / std_k``."""
    mean = scores.mean(axis=0)
    std = scores.std(axis=0)
    std[std == 0] = 1.0
    return (scores - mean) / std


def fit_softmax_temperature(z: np.ndarray, label_idx: np.ndarray) -> float:
    """Temperature ``T`` minimising the negative log-likelihood of ``softmax(z / T)`` for the true classes."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    rows = np.arange(len(label_idx))

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, label_idx].mean())

    res = minimize_scalar(nll, bounds=(-6.0, 6.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def fit_calibration(
    scores: np.ndarray, labels: Sequence[str] | np.ndarray, classes: Sequence[str] | np.ndarray
) -> dict[str, Any]:
    """Fit the confidence calibration from reference cells' decision scores.

    Parameters
    ----------
    scores
        ``(n_cells, n_classes)`` decision scores of labelled reference cells (columns in the order of ``classes``).
    labels
        The cells' true labels, all of them in ``classes``.
    classes
        The model's classes.

    Returns
    -------
    A JSON-serialisable dict: ``negative_median`` (per class, aligned with ``classes``: the median score of class
    ``k`` over cells of other types), ``softmax_temperature``, ``n_cells``, ``source`` and ``version``.
    """
    s = np.asarray(scores, dtype=np.float64)
    classes = as_str_array(classes)
    labels = as_str_array(labels)
    if s.ndim != 2 or s.shape != (len(labels), len(classes)):
        raise ValueError(
            f"Calibration scores have shape {s.shape}; expected (n_cells, n_classes) = {(len(labels), len(classes))}."
        )
    if not np.isfinite(s).all():
        raise ValueError("Calibration scores contain NaN or infinite values.")
    pos = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(pos))
    if unknown:
        raise ValueError(f"Calibration labels {unknown[:5]} are not classes of the model {classes[:5].tolist()}.")
    idx = np.fromiter((pos[label] for label in labels), dtype=np.intp, count=len(labels))
    negative_median = np.empty(len(classes))
    for k in range(len(classes)):
        neg = idx != k
        if not neg.any():
            raise ValueError(f"No reference cell outside class {classes[k]!r}: a calibration needs two cell types.")
        negative_median[k] = np.median(s[neg, k])
    return {
        "version": CALIBRATION_VERSION,
        "source": "training cells",
        "n_cells": int(len(labels)),
        "negative_median": [float(v) for v in negative_median],
        "softmax_temperature": fit_softmax_temperature(column_standardise(s), idx),
    }


def check_calibration(calibration: Mapping[str, Any], n_classes: int) -> dict[str, Any]:
    """Validate a calibration dict for a model with ``n_classes`` classes; return it as a plain dict."""
    if not isinstance(calibration, Mapping):
        raise TypeError(f"calibration must be a dict (as fitted by training), got {type(calibration).__name__}.")
    cal = dict(calibration)
    missing = {"negative_median", "softmax_temperature"} - set(cal)
    if missing:
        raise ValueError(f"The calibration lacks {sorted(missing)}; retrain the model to fit a complete one.")
    med = np.asarray(cal["negative_median"], dtype=np.float64)
    if med.shape != (n_classes,) or not np.isfinite(med).all():
        raise ValueError(
            f"calibration['negative_median'] has shape {med.shape} (finite: {bool(np.isfinite(med).all())}); "
            f"expected {n_classes} finite values, one per class."
        )
    temp = float(cal["softmax_temperature"])
    if not np.isfinite(temp) or temp <= 0:
        raise ValueError(f"calibration['softmax_temperature'] must be a positive number, got {temp}.")
    cal["negative_median"] = [float(v) for v in med]
    cal["softmax_temperature"] = temp
    return cal
