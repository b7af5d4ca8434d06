"""Fit a CellTypist-family model (standard scaler + one-vs-rest logistic regression) on normalized expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import sparse

from spatialcx._settings import logger
from spatialcx._utils import as_str_array, progress
from spatialcx.model._model import CellTypeModel

Method = Literal["auto", "logreg", "sgd", "minibatch"]

#: Above this many matrix entries (cells x genes) "auto" trains with mini-batch SGD instead of densifying the data.
AUTO_DENSE_LIMIT = 200_000_000


def _scale_params(x: sparse.csr_matrix, with_mean: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.utils.sparsefuncs import mean_variance_axis

    mean, var = mean_variance_axis(sparse.csr_matrix(x, dtype=np.float64), axis=0)
    scale = np.sqrt(var)
    # sklearn's StandardScaler leaves (near-)constant features unscaled
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    if not with_mean:
        mean = np.zeros_like(mean)
    return mean, scale


def _scaled_dense(x: sparse.csr_matrix, mean: np.ndarray, scale: np.ndarray, clip: float) -> np.ndarray:
    z = x.toarray().astype(np.float32, copy=False)
    z -= mean.astype(np.float32)
    z /= scale.astype(np.float32)
    np.minimum(z, clip, out=z)
    return z


def _coef_from(clf: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(clf, "estimators_"):  # OneVsRestClassifier
        coef = np.vstack([est.coef_ for est in clf.estimators_])
        intercept = np.concatenate([np.ravel(est.intercept_) for est in clf.estimators_])
    else:
        coef, intercept = np.asarray(clf.coef_), np.ravel(clf.intercept_)
    if n_classes == 2 and coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
    return coef, intercept


#: A gene expressed in fewer training cells than this is named in a warning (see :func:`_genes_in_few_cells`).
FEW_CELLS = 10


def _genes_in_few_cells(
    features: np.ndarray, n_expressing: np.ndarray, n_cells: int, clip: float
) -> dict[str, list[Any]]:
    """Warn about genes expressed in fewer than :data:`FEW_CELLS` training cells; return them (at most 50) and counts.

    Their weights rest on those few cells, and the scaler (mean and spread over all training cells) puts a query cell
    that expresses such a gene far above anything seen in training: at the clip (``clip`` spreads up; 10, for a gene
    expressed in under 1 % of the cells, with CellTypist's clip). A query that expresses it widely (another platform, tissue or depth) is then pulled
    towards the types of those few cells.
    """
    rare = np.flatnonzero(n_expressing < FEW_CELLS)
    if rare.size == 0:
        return {}
    rare = rare[np.argsort(n_expressing[rare], kind="stable")]
    shown = ", ".join(f"{features[i]} ({int(n_expressing[i])})" for i in rare[:5])
    logger.warning(
        "%d gene(s) are expressed in fewer than %d of the %d training cells (e.g. %s): their weights rest on those "
        "cells, and a query cell that expresses one is scored far above the training range (clipped at %g spreads), "
        "towards those cells' types. If the query expresses them widely (another platform or tissue), leave them out "
        "of genes=, or use a reference that measures them.",
        rare.size,
        FEW_CELLS,
        n_cells,
        shown,
        clip,
    )
    keep = rare[:50]
    return {"genes": [str(features[i]) for i in keep], "n_cells": [int(n_expressing[i]) for i in keep]}


def _check_fit_params(
    method: Any,
    batch_size: Any,
    epochs: Any,
    clip: Any = 10.0,
    *,
    max_iter: Any = None,
    balance_cell_type: Any = False,
    C: Any = 1.0,
    alpha: Any = 1e-4,
    n_jobs: Any = None,
    random_state: Any = 0,
) -> None:
    """A ValueError for settings that cannot train, raised before the data are read or densified."""
    if method not in ("auto", "logreg", "sgd", "minibatch"):
        raise ValueError(f"Unknown training method {method!r}; use 'auto', 'logreg', 'sgd' or 'minibatch'.")
    for name, value, what in (("batch_size", batch_size, "cells per mini-batch"), ("epochs", epochs, "passes")):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive whole number of {what} (mini-batch SGD), got {value!r}.")
    if isinstance(clip, bool) or not isinstance(clip, int | float | np.number) or np.isnan(clip):
        raise ValueError(f"clip must be a number (the upper clip of scaled values; CellTypist: 10), got {clip!r}.")
    if max_iter is not None and (
        isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 1
    ):
        # scikit-learn takes max_iter=0 and returns an unfitted model with a warning only
        raise ValueError(
            f"max_iter must be a positive whole number of solver iterations, or None for CellTypist's defaults (1000 "
            f"below 50,000 cells, 500 below 500,000, else 200), got {max_iter!r}: the classifier would not be trained."
        )
    if not isinstance(balance_cell_type, bool | np.bool_):
        # a string such as "no" is truthy: it would balance the cell types
        raise ValueError(
            f"balance_cell_type must be True or False (mini-batch cells drawn inversely to their type's frequency), "
            f"got {balance_cell_type!r}."
        )
    if isinstance(C, bool) or not isinstance(C, int | float | np.number) or not C > 0:  # NaN is not > 0
        raise ValueError(f"C must be a positive number (the inverse L2 regularisation of 'logreg'), got {C!r}.")
    # SGD's learning rate (scikit-learn's 'optimal') divides by alpha; 'logreg' does not use it
    positive = method != "logreg"
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.number)
        or not (alpha > 0 if positive else alpha >= 0)
        or not np.isfinite(alpha)
    ):
        raise ValueError(
            f"alpha must be a {'positive' if positive else 'non-negative'} finite number (the L2 regularisation of "
            f"the SGD methods; method={method!r}), got {alpha!r}."
        )
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer) or n_jobs == 0):
        raise ValueError(f"n_jobs must be None (one) or a non-zero whole number (-1: every core), got {n_jobs!r}.")
    if random_state is not None and (
        isinstance(random_state, bool) or not isinstance(random_state, int | np.integer) or random_state < 0
    ):
        raise ValueError(f"random_state must be a non-negative whole number (the seed), got {random_state!r}.")


def fit_model(
    x: sparse.spmatrix | np.ndarray,
    labels: Sequence[str] | np.ndarray,
    features: Sequence[str],
    *,
    method: Method = "auto",
    C: float = 1.0,
    alpha: float = 1e-4,
    max_iter: int | None = None,
    batch_size: int = 1000,
    epochs: int = 10,
    balance_cell_type: bool = False,
    with_mean: bool = True,
    clip: float = 10.0,
    random_state: int = 0,
    n_jobs: int | None = None,
    description: dict[str, Any] | None = None,
    calibrate: bool = True,
) -> CellTypeModel:
    """Fit the model on log1p-normalized expression ``x`` (cells x ``features``).

    As CellTypist: genes not expressed in any training cell are dropped, the data are standard-scaled and clipped at
    ``clip``, and a one-vs-rest L2 logistic regression is fitted (``"logreg"``, lbfgs), or a log-loss SGD classifier
    (``"sgd"``), or the SGD classifier by mini-batches that densify only ``batch_size`` cells at a time
    (``"minibatch"``, for references too large to densify: ``epochs`` passes of ``n_cells`` cells each, every cell once
    per pass, or with ``balance_cell_type`` cells drawn with replacement, inversely to their type's frequency, so that
    each type is drawn about as often as any other). ``"auto"`` picks ``"logreg"`` when the training matrix
    has at most 200,000,000 entries (cells x expressed genes, e.g. 1,000,000 cells x 200 genes) and ``"minibatch"``
    above that.

    With ``calibrate`` (default), the training cells are scored by the fitted model (one sparse product, no second
    fit) and the confidence calibration is fitted on them (stored as ``model.calibration``; see
    :func:`spatialcx.tl.transform_confidence`).
    """
    _check_fit_params(
        method,
        batch_size,
        epochs,
        clip,
        max_iter=max_iter,
        balance_cell_type=balance_cell_type,
        C=C,
        alpha=alpha,
        n_jobs=n_jobs,
        random_state=random_state,
    )
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.multiclass import OneVsRestClassifier

    x = sparse.csr_matrix(x)
    labels = as_str_array(labels)
    features = as_str_array(features)
    if x.shape != (len(labels), len(features)):
        raise ValueError(f"Expression {x.shape} does not match {len(labels)} labels x {len(features)} genes.")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(
            f"The reference has a single cell type ({classes.tolist()}); a classifier needs at least two. "
            "Add references with other types, or check that the label key is the cell-type column."
        )
    n_expressing = np.asarray((x != 0).sum(axis=0)).ravel()
    expressed = n_expressing > 0
    if not expressed.all():
        logger.info("%d genes are not expressed in any training cell and are dropped", int((~expressed).sum()))
        x, features, n_expressing = x[:, expressed], features[expressed], n_expressing[expressed]
    if x.shape[1] == 0:
        raise ValueError("No gene is expressed in the training cells.")
    few = _genes_in_few_cells(features, n_expressing, x.shape[0], clip)
    mean, scale = _scale_params(x, with_mean)
    n, g = x.shape
    asked = method
    if method == "auto":
        method = "logreg" if n * g <= AUTO_DENSE_LIMIT else "minibatch"
    if balance_cell_type and method != "minibatch":
        logger.warning(
            "balance_cell_type applies to method='minibatch' only (it draws the cells of each mini-batch); method=%r%s "
            "trains on every cell once, unbalanced. Pass method='minibatch' to balance the cell types, or balance the "
            "reference first with scx.pp.subsample_balanced.",
            asked,
            f" (here {method!r})" if asked != method else "",
        )
    if max_iter is None:
        max_iter = 1000 if n < 50_000 else 500 if n < 500_000 else 200
    rng = np.random.default_rng(random_state)
    seed = int(rng.integers(2**31 - 1))

    if method == "logreg":
        z = _scaled_dense(x, mean, scale, clip)
        base = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
        clf = OneVsRestClassifier(base, n_jobs=n_jobs).fit(z, labels)
        del z
    elif method == "sgd":
        z = _scaled_dense(x, mean, scale, clip)
        clf = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=max_iter, random_state=seed, n_jobs=n_jobs)
        clf.fit(z, labels)
        del z
    elif method == "minibatch":
        clf = SGDClassifier(loss="log_loss", alpha=alpha, random_state=seed, n_jobs=n_jobs)
        if balance_cell_type:
            _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
            p = 1.0 / (counts[inverse] * len(counts))
            p /= p.sum()
        else:
            p = None
        for _ in progress(range(epochs), total=epochs, desc="training epochs"):
            # n cells per epoch: each cell once, or, balanced, drawn with replacement so that every type is drawn about
            # equally often (without replacement, drawing all n cells would only reorder them)
            order = rng.choice(n, size=n, replace=p is not None, p=p)
            for start in range(0, n, batch_size):
                idx = np.sort(order[start : start + batch_size])
                clf.partial_fit(_scaled_dense(x[idx], mean, scale, clip), labels[idx], classes=classes)
    else:  # pragma: no cover - rejected by _check_fit_params
        raise AssertionError(method)

    coef, intercept = _coef_from(clf, len(classes))
    clf_classes = as_str_array(getattr(clf, "classes_", classes))
    desc = dict(description or {})
    desc.update(
        {
            "method": method,
            "method_requested": asked,
            "C": C,
            "alpha": alpha,
            "random_state": random_state,
            "n_cells": int(n),
            "n_genes": int(g),
            "with_mean": with_mean,
            "clip": float(clip),
        }
    )
    if few:
        desc["genes_in_few_cells"] = few
    if method == "minibatch":  # the settings that shaped it (max_iter is not used)
        desc.update(
            {"batch_size": int(batch_size), "epochs": int(epochs), "balance_cell_type": bool(balance_cell_type)}
        )
    else:
        desc["max_iter"] = int(max_iter)
    model = CellTypeModel(
        features=features,
        classes=clf_classes,
        coef=coef,
        intercept=intercept,
        scaler_mean=mean,
        scaler_scale=scale,
        clip=clip,
        description=desc,
    )
    if calibrate:
        from spatialcx.model._calibration import fit_calibration

        model.calibration = fit_calibration(model.decision_function(x), labels, model.classes)
    return model
