"""Measure how well predictions and their confidence hold up against known labels.

For labelled query cells: accuracy and macro-F1 of the predicted labels; AUROC of the confidence for "the call is
correct"; at a threshold, the share of correct calls kept and of wrong calls removed; and, for cells whose true type
the model never saw (an unseen type), the share that falls below the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from spatialcx._constants import DEFAULT_EXCLUDE_LABELS, KEY_ADDED, label_list, output_keys
from spatialcx._settings import logger
from spatialcx._utils import as_str_array, label_text

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from spatialcx.model._model import CellTypeModel

#: Keys of the dict returned by :func:`~spatialcx.tl.confidence_metrics`, in the order the benchmark prints them.
METRICS: tuple[str, ...] = (
    "n_cells",
    "accuracy",
    "macro_f1",
    "auroc",
    "correct_kept",
    "wrong_removed",
    "n_unseen",
    "unseen_below",
)


def confidence_metrics(
    truth: Sequence[str] | np.ndarray | pd.Series,
    predicted: Sequence[str] | np.ndarray | pd.Series,
    confidence: Sequence[float] | np.ndarray | pd.Series,
    *,
    known_classes: Sequence[str] | None = None,
    threshold: float = 0.8,
    exclude_labels: Sequence[str] | str | None = DEFAULT_EXCLUDE_LABELS,
) -> dict[str, float]:
    """Accuracy of the predictions and usefulness of their confidence, against true labels.

    Parameters
    ----------
    truth
        True label of each cell. Cells whose label is missing or in ``exclude_labels`` (``NA``, ``Unknown``, ...)
        are left out of every metric.
    predicted
        Predicted label of each cell (the model's call, before any low-confidence filtering).
    confidence
        Confidence of each call, in [0, 1].
    known_classes
        The model's classes. Cells whose true label is not among them belong to a type the model never saw: they are
        left out of the accuracy metrics and counted in ``unseen_below``. ``None``: every true label is known.
    threshold
        Confidence threshold (cells below it would be ``Unassigned``).
    exclude_labels
        True labels that are not cell types (a str is one label; ``None``: the default list).

    Returns
    -------
    A dict with ``n_cells`` (known-type cells evaluated), ``accuracy``, ``macro_f1`` (scikit-learn's macro average
    over the labels that occur in truth or predictions), ``auroc`` (confidence as a score for "the call is correct";
    NaN when every call is right or every call is wrong), ``correct_kept`` (share of correct calls at or above the
    threshold), ``wrong_removed`` (share of wrong calls below it), ``n_unseen`` and ``unseen_below`` (share of
    unseen-type cells below the threshold; NaN without such cells).
    """
    from sklearn.metrics import f1_score, roc_auc_score

    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold must be a number in [0, 1] (a confidence), got {threshold!r}.")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
    conf = np.asarray(confidence, dtype=np.float64)
    for name, values in (("truth", truth), ("predicted", predicted), ("confidence", conf)):
        shape = np.shape(values)
        if len(shape) != 1:
            raise ValueError(
                f"{name} must hold one value per cell (a 1-D sequence), got an array of shape {shape}. "
                "Pass one column: e.g. the confidence `obs['cell_type_confidence']`, not the decision scores."
            )
    # labels as text, missing ones None; cluster ids stored as floats ("3.0") read "3", as the predictions do
    y = pd.Series(label_text(truth))
    pred = as_str_array(label_text(predicted))
    if not (len(y) == len(pred) == len(conf)):
        raise ValueError(
            f"truth, predicted and confidence must have one value per cell; got {len(y)}, {len(pred)} and {len(conf)}."
        )
    bad = np.isnan(conf) | (conf < 0) | (conf > 1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"confidence must hold values in [0, 1] without NaN; {int(bad.sum())} of {conf.size} value(s) do not "
            f"(the first, at position {first}, is {float(conf[first])}). Evaluate only the cells that were predicted, "
            "with the confidence as predict wrote it."
        )
    labelled = y.notna().to_numpy() & ~y.astype(str).isin(label_list(exclude_labels)).to_numpy()
    y_str = y.astype(str).to_numpy()
    if known_classes is None:
        known = labelled
    else:  # a set or any other collection of class names
        classes = as_str_array(list(known_classes))
        known = labelled & pd.Series(y_str).isin(classes).to_numpy()  # hashed: np.isin compares str pairwise
        if labelled.any() and not known.any():
            logger.warning(
                "confidence_metrics: none of the %d labelled cells has a true label among the model's %d classes "
                "(true labels e.g. %s; classes e.g. %s), so every cell counts as an unseen type and the accuracy "
                "metrics are NaN. If the labels name the same types differently, map them to the model's classes.",
                int(labelled.sum()),
                classes.size,
                [str(v) for v in pd.unique(y_str[labelled])[:3]],
                [str(v) for v in classes[:3]],
            )
    unseen = labelled & ~known
    out: dict[str, float] = {"n_cells": int(known.sum()), "n_unseen": int(unseen.sum())}
    if known.any():
        correct = y_str[known] == pred[known]
        if pd.Index(pd.unique(y_str[known])).intersection(pd.unique(pred[known])).empty:
            logger.warning(
                "confidence_metrics: the predicted labels (e.g. %s) and the true labels (e.g. %s) have no label in "
                "common, so every call counts as wrong. If they name the same types differently (e.g. Cell Ontology "
                "names against the authors' labels), map one onto the other first.",
                [str(v) for v in pd.unique(pred[known])[:3]],
                [str(v) for v in pd.unique(y_str[known])[:3]],
            )
        c = conf[known]
        out["accuracy"] = float(correct.mean())
        # the labels as integer codes (one per label of truth or predictions): the same F1, without sorting strings
        codes = pd.factorize(np.concatenate([y_str[known], pred[known].astype(object)]))[0]
        y_codes, pred_codes = codes[: correct.size], codes[correct.size :]
        out["macro_f1"] = float(f1_score(y_codes, pred_codes, average="macro", zero_division=0))
        out["auroc"] = float(roc_auc_score(correct, c)) if 0 < correct.sum() < correct.size else float("nan")
        out["correct_kept"] = float((c[correct] >= threshold).mean()) if correct.any() else float("nan")
        out["wrong_removed"] = float((c[~correct] < threshold).mean()) if (~correct).any() else float("nan")
    else:
        out.update(accuracy=np.nan, macro_f1=np.nan, auroc=np.nan, correct_kept=np.nan, wrong_removed=np.nan)
    out["unseen_below"] = float((conf[unseen] < threshold).mean()) if unseen.any() else float("nan")
    return {k: out[k] for k in METRICS}


def compare_confidence_methods(
    decision_scores: np.ndarray,
    classes: Sequence[str],
    truth: Sequence[str] | np.ndarray | pd.Series,
    *,
    methods: Sequence[str] | str | None = None,
    calibration: Mapping[str, Any] | CellTypeModel | None = None,
    threshold: float = 0.8,
    exclude_labels: Sequence[str] | str | None = DEFAULT_EXCLUDE_LABELS,
    without_counts: np.ndarray | None = None,
) -> pd.DataFrame:
    """:func:`~spatialcx.tl.confidence_metrics` of every confidence method on the same decision scores.

    Parameters
    ----------
    decision_scores
        ``(n_cells, n_classes)`` decision scores of the whole query dataset (columns in the order of ``classes``).
    classes
        The model's classes.
    truth
        True label of each cell (see :func:`~spatialcx.tl.confidence_metrics`).
    methods
        Confidence methods (:func:`~spatialcx.tl.transform_confidence`; a str is one method); ``None``: all of them,
        ``"softmax"`` only with a calibration. A method named here that needs a calibration raises without one.
    calibration
        The model or its calibration dict.
    threshold, exclude_labels
        As in :func:`~spatialcx.tl.confidence_metrics`.
    without_counts
        Cells without counts in the model's genes (see :func:`~spatialcx.tl.transform_confidence`).

    Returns
    -------
    One row per method (index ``method``), the columns of :func:`~spatialcx.tl.confidence_metrics`.
    """
    from spatialcx.tl._confidence import CONFIDENCE_METHODS, _calibration_dict, transform_confidence

    scores = np.asarray(decision_scores, dtype=np.float64)
    classes = as_str_array(classes)
    if scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"decision_scores has shape {scores.shape} but there are {len(classes)} classes.")
    # every method by default (softmax only with a calibration); a method named without one raises, in transform
    skip = set() if methods is not None or _calibration_dict(calibration, len(classes)) is not None else {"softmax"}
    methods = list(CONFIDENCE_METHODS if methods is None else [methods] if isinstance(methods, str) else methods)
    predicted = classes[scores.argmax(axis=1)]
    rows = {}
    for method in methods:
        if method in skip:
            continue
        conf = transform_confidence(scores, method, calibration=calibration, without_counts=without_counts)
        rows[method] = confidence_metrics(
            truth, predicted, conf, known_classes=classes, threshold=threshold, exclude_labels=exclude_labels
        )
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")


def evaluate_confidence(
    data: AnnData | SpatialData,
    truth_key: str,
    *,
    key: str = KEY_ADDED,
    threshold: float = 0.8,
    methods: Sequence[str] | str | None = None,
    calibration: Mapping[str, Any] | CellTypeModel | None = None,
    exclude_labels: Sequence[str] | str | None = DEFAULT_EXCLUDE_LABELS,
    table_key: str = "table",
) -> pd.DataFrame:
    """Evaluate the predictions written by :func:`~spatialcx.tl.predict` / :func:`~spatialcx.tl.annotate` on a table.

    Parameters
    ----------
    data
        The spatial data or its table, with predictions under ``key`` and true labels in ``obs[truth_key]``.
    truth_key
        Column of ``obs`` with the true labels (e.g. the authors' annotation).
    key
        The ``key_added`` of the prediction: ``{key}_predicted`` (unfiltered calls), ``{key}_confidence`` and
        ``uns[key]["classes"]`` are read; with ``methods``, ``obsm["{key}_decision_scores"]`` too (and
        ``obs["{key}_n_genes"]``, so that cells without counts get confidence 0 as ``predict`` gave them).
    threshold
        Confidence threshold of the kept/removed shares.
    methods
        ``None``: evaluate the confidence stored in the table (row named by ``uns[key]["confidence_method"]``).
        Otherwise recompute each method (a str is one method) from the stored decision scores (see
        :func:`compare_confidence_methods`).
    calibration
        The model (or its calibration dict), for methods that use one.
    exclude_labels
        True labels that are not cell types (left out).
    table_key
        The table of a SpatialData.

    Returns
    -------
    One row per method, the columns of :func:`~spatialcx.tl.confidence_metrics`. Nothing in ``data`` changes.
    """
    from spatialcx._table import get_table, obs_column

    adata = get_table(data, table_key)  # read as it is: a view stays a view
    keys = output_keys(key)
    if truth_key not in adata.obs:
        raise KeyError(f"truth_key {truth_key!r} is not a column of obs; available: {list(adata.obs.columns)}.")
    params = adata.uns.get(key)
    if not isinstance(params, Mapping) or "classes" not in params:
        raise KeyError(
            f"uns[{key!r}] with the model's classes is missing: run `scx.tl.predict` or `scx.tl.annotate` with "
            f"key_added={key!r} first."
        )
    classes = as_str_array(params["classes"])
    truth = obs_column(adata, truth_key)  # also for a table read lazily
    if methods is not None:
        if keys["decision_scores"] not in adata.obsm:
            raise KeyError(
                f"obsm[{keys['decision_scores']!r}] is missing: recomputing confidence methods needs the decision "
                "scores; predict with `store_decision_scores=True`."
            )
        n_genes = obs_column(adata, keys["n_genes"]).to_numpy() if keys["n_genes"] in adata.obs else None
        return compare_confidence_methods(
            np.asarray(adata.obsm[keys["decision_scores"]]),
            classes,
            truth,
            methods=methods,
            calibration=calibration,
            threshold=threshold,
            exclude_labels=exclude_labels,
            without_counts=None if n_genes is None else n_genes == 0,  # as predict gave them confidence 0
        )
    for col in (keys["predicted"], keys["confidence"]):
        if col not in adata.obs:
            raise KeyError(f"obs[{col!r}] is missing: run `scx.tl.predict` or `scx.tl.annotate` first.")
    row = confidence_metrics(
        truth,
        obs_column(adata, keys["predicted"]).astype(str).to_numpy(),
        obs_column(adata, keys["confidence"]).to_numpy(dtype=np.float64),
        known_classes=classes,
        threshold=threshold,
        exclude_labels=exclude_labels,
    )
    name = str(params.get("confidence_method", "stored"))
    return pd.DataFrame([row], index=pd.Index([name], name="method"))
