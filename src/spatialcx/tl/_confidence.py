"""Turn decision scores into a confidence in [0, 1] for the predicted (highest-scoring) class.

Every method works on the ``(n_cells, n_classes)`` decision scores of one query dataset, vectorised over cells
(memory O(n_cells x n_classes), no per-cell Python loop); the dataset-level statistics are computed once over all
cells, so the result does not depend on how the cells were scored in chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy.special import expit

from spatialcx._settings import logger

if TYPE_CHECKING:
    from spatialcx.model._model import CellTypeModel

ConfidenceMethod = Literal["calibrated", "zscore", "margin", "softmax", "raw", "cell_zscore"]
#: Every method :func:`transform_confidence` accepts.
CONFIDENCE_METHODS: tuple[str, ...] = ("calibrated", "zscore", "margin", "softmax", "raw", "cell_zscore")
#: The default method, chosen by the accuracy benchmark (``docs/confidence.md``).
DEFAULT_CONFIDENCE: str = "calibrated"

_MAD_TO_SD = 1.482602218505602  # 1 / Phi^-1(3/4): a normal's standard deviation from its median absolute deviation


def _check(decision_scores: np.ndarray) -> np.ndarray:
    s = np.asarray(decision_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(
            f"decision_scores must be a (n_cells, n_classes) matrix with at least 2 classes, got shape {s.shape}."
        )
    if not np.isfinite(s).all():
        raise ValueError("decision_scores contain NaN or infinite values.")
    return s


def _calibration_dict(calibration: Mapping[str, Any] | CellTypeModel | None, n_classes: int) -> dict[str, Any] | None:
    if calibration is None:
        return None
    if hasattr(calibration, "calibration") and hasattr(calibration, "classes"):  # a CellTypeModel
        calibration = calibration.calibration
        if calibration is None:
            return None
    from spatialcx.model._calibration import check_calibration

    try:
        return check_calibration(calibration, n_classes)
    except ValueError as e:
        raise ValueError(f"The calibration does not fit these decision scores ({n_classes} classes): {e}") from e


def _top_two_probability(s: np.ndarray, best: np.ndarray) -> np.ndarray:
    """CellTypist's probability of the predicted class relative to the runner-up: ``p1 / (p1 + p2)`` (0.5 at a tie)."""
    top2 = np.partition(s, -2, axis=1)[:, -2:]
    p = expit(top2)
    return p[:, 1] / (p[:, 0] + p[:, 1])


#: Cells the within-dataset discriminant is fitted on at most (a seeded subset that keeps every predicted type);
#: the posterior is then computed for every cell. Means and a shared covariance of a few dozen dimensions are
#: estimated to within sampling noise long before this many cells.
LDA_MAX_FIT_CELLS = 20_000


def _fit_subset(best: np.ndarray, *, max_cells: int, min_per_class: int = 50) -> np.ndarray | slice:
    """Rows to fit on: all, or a seeded subset of ``max_cells`` plus ``min_per_class`` cells of each predicted type.

    Rare types are always represented; the choice is deterministic.
    """
    n = best.shape[0]
    if n <= max_cells:
        return slice(None)
    rng = np.random.default_rng(0)
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.choice(n, size=max_cells, replace=False)] = True
    for k in np.unique(best):
        members = np.flatnonzero(best == k)
        if chosen[members].sum() < min_per_class:
            chosen[members[:min_per_class]] = True
    return np.flatnonzero(chosen)


def _lda_posterior(s: np.ndarray, best: np.ndarray) -> np.ndarray | None:
    """Posterior of the predicted class under a linear discriminant of the scores, fitted on this dataset.

    Each cell's whole score vector is classified by a Gaussian model with one mean per predicted class and a shared
    (Ledoit-Wolf shrunk) covariance, fitted on the dataset itself with the predicted classes as labels. A cell whose
    score vector sits between two classes' clouds gets a low posterior even when its top score is high.
    ``None`` when the dataset cannot support the fit (a single predicted type, or no more cells than types).
    """
    import warnings

    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    present = np.unique(best)
    if present.size < 2 or s.shape[0] <= present.size:
        logger.warning(
            "%d cells called %d types: too few to fit the discriminant of the decision scores within the dataset; "
            "the confidence compares each cell's two best classes instead.",
            s.shape[0],
            present.size,
        )
        return None
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    fit = _fit_subset(best, max_cells=LDA_MAX_FIT_CELLS)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Only one sample available")  # a type called for a single cell
        try:
            lda.fit(s[fit], best[fit])
        except (ValueError, np.linalg.LinAlgError) as e:
            logger.warning("The discriminant of the decision scores could not be fitted (%s); it is not used.", e)
            return None
        post = _posterior_of(lda, s, np.searchsorted(lda.classes_, best))
    if not np.isfinite(post).all():
        logger.warning("The discriminant of the decision scores is degenerate for this dataset; it is not used.")
        return None
    return np.clip(post, 0.0, 1.0)


#: Cells whose discriminant posterior is computed at once: bounds the temporary (cells x classes) arrays.
POSTERIOR_BLOCK = 65_536


def _posterior_of(lda: Any, s: np.ndarray, col: np.ndarray) -> np.ndarray:
    """``lda.predict_proba(s)[i, col[i]]`` for every cell, block by block (never a whole cells x classes copy).

    The same computation as scikit-learn's (the linear decision function, then the logistic for two classes or a
    softmax), for the one column each cell needs.
    """
    coef = np.asarray(lda.coef_, dtype=np.float64)
    intercept = np.asarray(lda.intercept_, dtype=np.float64)
    out = np.empty(s.shape[0], dtype=np.float64)
    for start in range(0, s.shape[0], POSTERIOR_BLOCK):
        stop = min(start + POSTERIOR_BLOCK, s.shape[0])
        d = s[start:stop] @ coef.T
        d += intercept
        c = col[start:stop]
        if coef.shape[0] == 1:  # two classes: the decision function is the log-odds of the second
            p1 = expit(d[:, 0])
            out[start:stop] = np.where(c == 1, p1, 1.0 - p1)
            continue
        d -= d.max(axis=1, keepdims=True)
        np.exp(d, out=d)
        out[start:stop] = d[np.arange(stop - start), c] / d.sum(axis=1)
    return out


def _robust_location_scale(x: np.ndarray) -> tuple[float, float]:
    med = float(np.median(x))
    return med, float(np.median(np.abs(x - med))) * _MAD_TO_SD


def _negative_medians(s: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Per class ``k``: the median score of class ``k`` over the cells not called ``k`` (NaN when there are none)."""
    out = np.full(s.shape[1], np.nan)
    for k in range(s.shape[1]):  # a loop over classes, vectorised over cells
        neg = best != k
        if neg.any():
            out[k] = np.median(s[neg, k])
    return out


def _known_probability_shifted(
    s: np.ndarray, best: np.ndarray, calibration: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """CellTypist's probability of the predicted class after moving each class's scores by the platform shift.

    The shift of class ``k`` is how far the cells not called ``k`` sit from where reference cells of other types sat
    (medians), so a query whose scores all moved down by the platform change is moved back before the sigmoid.
    """
    ref = np.asarray(calibration["negative_median"], dtype=np.float64)
    query = _negative_medians(s, best)
    shift = np.where(np.isfinite(query), query - ref, 0.0)
    rows = np.arange(s.shape[0])
    p = expit(s[rows, best] - shift[best])
    params = {
        "reference_negative_median": [float(v) for v in ref],
        "query_negative_median": [float(v) if np.isfinite(v) else float(r) for v, r in zip(query, ref, strict=True)],
        "score_shift": [float(v) for v in shift],
    }
    return p, params


def _known_probability_within(s: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Without a reference calibration: per class, a two-group model of its scores fitted within the dataset.

    For class ``k``, the cells called ``k`` and the others are taken as two normal groups (medians, robust spreads
    pooled, group shares as priors); the probability that a cell belongs to the upper group is a logistic function of
    its score, which moves with the dataset however the platform shifted the scores.
    """
    n, n_k = s.shape
    slope = np.zeros(n_k)
    intercept = np.zeros(n_k)
    everyone = np.zeros(n_k, dtype=bool)  # every cell is called k: nothing to contrast with, CellTypist's probability
    for k in range(n_k):
        pos = best == k
        n_pos = int(pos.sum())
        if n_pos == 0:
            continue
        if n_pos == n:
            everyone[k] = True
            continue
        m1, sd1 = _robust_location_scale(s[pos, k])
        m0, sd0 = _robust_location_scale(s[~pos, k])
        pi1 = n_pos / n
        var = pi1 * sd1**2 + (1 - pi1) * sd0**2
        var = max(var, 1e-12 * max(1.0, (m1 - m0) ** 2))
        a = max((m1 - m0) / var, 0.0)
        slope[k] = a
        intercept[k] = -a * (m1 + m0) / 2 + np.log(pi1 / (1 - pi1))
    rows = np.arange(n)
    p = np.where(everyone[best], expit(s[rows, best]), expit(slope[best] * s[rows, best] + intercept[best]))
    params = {"within_slope": [float(v) for v in slope], "within_intercept": [float(v) for v in intercept]}
    return p, params


def _calibrated(s: np.ndarray, best: np.ndarray, calibration: dict[str, Any] | None) -> tuple[np.ndarray, dict]:
    if calibration is not None:
        p_known, params = _known_probability_shifted(s, best, calibration)
        params["known_probability"] = "celltypist probability, platform shift removed with the reference calibration"
    else:
        p_known, params = _known_probability_within(s, best)
        params["known_probability"] = "two-group model within the dataset (the model has no reference calibration)"
    p_which = _lda_posterior(s, best)
    if p_which is None:
        p_which = _top_two_probability(s, best)
        params["which_probability"] = "celltypist probability of the best class relative to the runner-up"
    else:
        params["which_probability"] = "linear discriminant of the decision scores within the dataset"
    params["combine"] = "geometric mean"
    return np.sqrt(p_known * p_which), params


def confidence_with_params(
    decision_scores: np.ndarray,
    method: ConfidenceMethod = DEFAULT_CONFIDENCE,
    *,
    calibration: Mapping[str, Any] | CellTypeModel | None = None,
    without_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`transform_confidence` plus the (serialisable) parameters it used, for ``uns``."""
    if without_counts is not None:
        empty = np.asarray(without_counts, dtype=bool)
        s = _check(decision_scores)
        if empty.shape != (s.shape[0],):
            raise ValueError(f"without_counts has shape {empty.shape}; expected one value per cell ({s.shape[0]},).")
        n_empty = int(empty.sum())
        if n_empty == len(empty):
            raise ValueError(
                f"None of the {len(empty):,} cells has counts in the model's genes: no confidence to give."
            )
        if n_empty:
            conf = np.zeros(len(empty), dtype=np.float64)
            conf[~empty], params = confidence_with_params(s[~empty], method, calibration=calibration)
        else:
            conf, params = confidence_with_params(s, method, calibration=calibration)
        params["n_cells_without_counts"] = n_empty
        return conf, params
    s = _check(decision_scores)
    if method not in CONFIDENCE_METHODS:
        raise ValueError(f"Unknown confidence method {method!r}; choose one of {CONFIDENCE_METHODS}.")
    cal = _calibration_dict(calibration, s.shape[1])
    best = s.argmax(axis=1)
    rows = np.arange(s.shape[0])
    params: dict[str, Any] = {"method": method}
    if method == "raw":
        conf = expit(s[rows, best])
    elif method == "zscore":
        mean = s.mean(axis=0)
        std = s.std(axis=0)
        std[std == 0] = 1.0
        conf = expit((s[rows, best] - mean[best]) / std[best])
        params.update(class_mean=[float(v) for v in mean], class_std=[float(v) for v in std])
    elif method == "margin":
        top2 = np.partition(s, -2, axis=1)[:, -2:]
        gap = top2[:, 1] - top2[:, 0]
        sd = float(gap.std()) or 1.0
        conf = np.tanh(gap / (2 * sd))  # = 2 sigmoid(gap / sd) - 1: 0 at a tie
        params["margin_std"] = sd
    elif method == "softmax":
        if cal is None:
            raise ValueError(
                "confidence='softmax' needs the model's reference calibration (a temperature), and none was given. "
                "Models trained by `scx.tl.train` carry one (pass `calibration=model`); imported CellTypist models do "
                "not: use confidence='calibrated' (it works without one) or 'zscore'."
            )
        from scipy.special import softmax

        from spatialcx.model._calibration import column_standardise

        temp = float(cal["softmax_temperature"])
        conf = softmax(column_standardise(s) / temp, axis=1)[rows, best]
        params["temperature"] = temp
    elif method == "cell_zscore":
        z = (s - s.mean(axis=1, keepdims=True)) / np.where((sd := s.std(axis=1, keepdims=True)) == 0, 1.0, sd)
        conf = expit(z[rows, best])
    else:  # calibrated
        conf, extra = _calibrated(s, best, cal)
        params.update(extra)
        params["reference_calibration"] = cal is not None
    return np.clip(conf, 0.0, 1.0), params


def transform_confidence(
    decision_scores: np.ndarray,
    method: ConfidenceMethod = DEFAULT_CONFIDENCE,
    *,
    calibration: Mapping[str, Any] | CellTypeModel | None = None,
    without_counts: np.ndarray | None = None,
) -> np.ndarray:
    """Confidence of the predicted class of each cell, from the decision scores of one query dataset.

    Parameters
    ----------
    decision_scores
        ``(n_cells, n_classes)`` decision scores of one query dataset (e.g. ``obsm["cell_type_decision_scores"]``).
        The dataset-level methods use statistics over all its cells: pass the whole dataset, not a chunk.
    method
        ``"calibrated"`` (default): the geometric mean of two probabilities. (1) *Is it one of the known types?*
        CellTypist's probability of the predicted class, ``sigmoid(s_k - shift_k)``, after removing the platform
        shift: each class's scores are moved so that the cells not called that class sit where reference cells of
        other types sat (the model's reference calibration). Without a calibration (imported CellTypist models), a
        two-group model of each class's scores fitted within the dataset replaces it. (2) *Which of the known types?*
        The posterior of the predicted class under a linear discriminant of the whole score vector, fitted within the
        dataset on the predicted classes. Unseen cell types (every score low) fail (1); cells between two types fail
        (2). A confidence of 0.8 means the product of the two probabilities is 0.64.

        ``"zscore"``: each class's scores standardised within the query dataset (over cells) before the sigmoid,
        ``sigmoid((s_k - mean_k) / std_k)``.

        ``"margin"``: the gap between the best and second-best scores, scaled by its standard deviation within the
        dataset, ``tanh(gap / (2 std))`` (0 at a tie).

        ``"softmax"``: ``softmax(z / T)`` of the predicted class over the per-class standardised scores ``z`` (as in
        ``"zscore"``), with the temperature ``T`` fitted on reference cells (needs a calibration).

        ``"raw"``: CellTypist's probability, ``sigmoid(s_k)``. On spatial data scores shift negative under the
        platform change, so this collapses towards 0 even for right calls.

        ``"cell_zscore"``: each cell's scores standardised across classes before the sigmoid: a published
        implementation, kept as a baseline only. It is bounded by ``sigmoid(sqrt(K - 1))``, is 0.731 for every cell
        with 2 classes and ignores whether any score is high, so unseen types are never flagged.
    calibration
        The model (:class:`~spatialcx.CellTypeModel`) or its ``calibration`` dict, fitted on reference cells by
        :func:`~spatialcx.tl.train`; used by ``"calibrated"`` and required by ``"softmax"``.
    without_counts
        Boolean mask of the cells without counts in the model's genes (their scores are the model's constant terms
        alone, e.g. ``obs["cell_type_n_genes"] == 0`` after :func:`~spatialcx.tl.predict`): their confidence is 0,
        whatever the method, and they are left out of the dataset-level statistics, as ``predict`` does.

    Returns
    -------
    float64 array of shape ``(n_cells,)`` with values in [0, 1].
    """
    return confidence_with_params(decision_scores, method, calibration=calibration, without_counts=without_counts)[0]
