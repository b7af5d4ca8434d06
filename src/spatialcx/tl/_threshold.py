"""Classify cells as marker-high or marker-low from one or more features (:func:`classify_by_threshold`)."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._settings import logger
from .._table import obs_column

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData
    from spatialdata import SpatialData

Metagene = Literal["shifted_geometric_mean", "mean", "pc1"]
Method = Literal["gmm", "ks"]

METAGENES: tuple[str, ...] = ("shifted_geometric_mean", "mean", "pc1")
METHODS: tuple[str, ...] = ("gmm", "ks")
#: P(high) above which ``gmm`` calls a cell high, unless ``probability_cutoff`` says otherwise.
DEFAULT_PROBABILITY_CUTOFF = 0.3

#: Fewest cells a threshold is fitted on.
MIN_CELLS = 10
#: Largest number of cells the Gaussian mixture is fitted on; all cells are then scored with the fitted parameters.
MAX_FIT_CELLS = 50_000
#: Smallest share of cells at the lowest score for ``ks`` to treat the data as zero-inflated.
ZERO_INFLATION_MIN_FRACTION = 0.05
#: ``gmm`` warns when at least this share of the cells sit at the lowest score and its threshold calls every other
#: cell high (a component on the cells without counts: a single count makes a cell high), pointing to ``ks``.
ZERO_INFLATED_FRACTION = 0.3
#: Significance level of ``ks``: a departure from the bulk is a minority only when its KS statistic exceeds the
#: ``1 - KS_ALPHA`` quantile of the two-sided one-sample Kolmogorov-Smirnov statistic for that many cells
#: (:data:`scipy.stats.kstwo`; about ``1.95 / sqrt(n)``). On a single Gaussian population the larger of the two
#: one-sided statistics of ``ks`` (bulk parameters estimated from the same cells) follows that distribution closely
#: (simulated: 95th / 99th percentiles 1.3-1.4 / 1.5-1.8 over sqrt(n), for 200 to 50,000 cells), so about one single
#: population in a thousand is split by chance.
KS_ALPHA = 0.001
#: ``ks`` splits off a low minority only when it forms its own mode: between the minority's density peak and the
#: bulk's, the density must fall below this fraction of the minority's peak (a dip of at least 15 %).
MODE_DIP_RATIO = 0.85
#: ``gmm`` splits the score only when the fitted mixture has two modes: between the two means, its density must fall
#: below this fraction of the lower of the two peaks. A mixture fitted to one population (Gaussian, log-normal, gamma,
#: exponential, Student t, a population with a shoulder) has a single mode (simulated: no dip at all), while on real
#: panels (each gene of STARmap mPFC and Xenium bone marrow, and marker sets of both) the deepest antimode is 0.89
#: of the lower peak (Slc17a7 + Tbr1 + Cux2) and most are below 0.5. The tolerance only absorbs rounding.
UNIMODAL_DIP_RATIO = 0.99
_KDE_MAX_CELLS = 5_000
_KDE_GRID = 128
_SIGMA_QUANTILES = (0.15865525393145707, 0.8413447460685429)  # Phi(-1), Phi(1)


def classify_by_threshold(
    data: AnnData | SpatialData,
    features: str | Sequence[str],
    *,
    metagene: Metagene = "shifted_geometric_mean",
    method: Method = "gmm",
    probability_cutoff: float = DEFAULT_PROBABILITY_CUTOFF,
    key_added: str = "threshold",
    table_key: str = "table",
    max_fit_cells: int = MAX_FIT_CELLS,
    random_state: int = 0,
    plot: bool = False,
    plots_dir: str | Path | None = None,
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Classify cells as high (1) or low (0) for a marker or a set of markers.

    Gene features are read as ``log1p(counts / library size * 1e4)`` computed from the raw counts (whatever ``X``
    holds: the counts are found by :func:`spatialcx.pp.normalization_status`, and ``X`` is used as it is only when it
    is verified log1p(10k) data and no counts are found; ``uns[key_added]["expression"]["source"]`` says which was
    used); obs columns are used as they are. Several features are combined into one score per cell (the metagene);
    a single feature is used directly. The score is then split in two.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``.
    features
        Gene names (``var_names``; ``raw.var_names`` when the expression is read from ``raw``, e.g. scanpy's layout
        with ``X`` subset to variable genes) and/or numeric obs columns, for one class (a dict of several classes is
        refused: call the function once per class, with its own ``key_added``).
    metagene
        How several features become one score:

        - ``"shifted_geometric_mean"``: ``exp(mean(log(x + 1))) - 1``. High only when the markers are high
          together; tolerant of dropout in one of them. Needs non-negative features.
        - ``"mean"``: arithmetic mean; a single very high marker is enough.
        - ``"pc1"``: first principal component of the standardized features, signed so that a higher score means
          higher expression (the loadings are stored in ``uns``).
    method
        How the score is split:

        - ``"gmm"``: two-component Gaussian mixture; a cell is high when P(high | score) > ``probability_cutoff``.
          The mixture is fitted on at most ``max_fit_cells`` cells drawn with ``random_state`` and every cell is
          then scored with the fitted parameters. Suited to two sizeable populations. A score that the two fitted
          Gaussians do not split into two modes (one population: its density has no dip between their means) is
          refused with a ValueError rather than cut through its middle.
        - ``"ks"``: a Kolmogorov-Smirnov-inspired split for a minority population, robust to zero-inflation. Cells
          at the lowest score (zeros) are low; on the remaining cells a robust Gaussian is fitted to the bulk
          (median and one-sided spread) and the threshold is where the empirical CDF (tied values counted
          together) departs most from it, above the bulk's median. When the departing minority lies below the bulk
          (dropout-heavy markers whose non-zero cells are mostly positive) it is split off only if it forms its own
          mode; otherwise every non-zero cell is high.
    probability_cutoff
        P(high) above which a cell is high (``gmm`` only), in (0, 1). ``ks`` ignores it, with a warning when it is
        not the default.
    key_added
        Prefix of the output keys.
    table_key
        Table to use when ``data`` is SpatialData.
    max_fit_cells
        Most cells the Gaussian mixture is fitted on.
    random_state
        Seed (an integer) for the subsample and the mixture initialisation.
    plot
        Draw the diagnostic figure (:func:`spatialcx.pl.threshold`) once the keys are written (and persisted); it
        stays open (shown in notebooks) unless ``plots_dir`` is given.
    plots_dir
        Folder where the figure is saved as ``{key_added}_threshold.png`` and then closed (needs ``plot=True``).
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys into the zarr store when ``data`` is a backed SpatialData.

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes into the table:

    ``obs[f"{key_added}_score"]``
        the metagene score (or the single feature).
    ``obs[f"{key_added}_probability"]``
        ``gmm``: posterior P(high | score), made non-decreasing in the score; ``ks``: a soft version of the split,
        ``Phi((score - threshold) / scale)`` (0.5 at the threshold, 0 for cells at the lowest score when the
        zero-inflated branch is used).
    ``obs[f"{key_added}_cluster"]``
        0 (low) or 1 (high); always equal to ``score > threshold``.
    ``uns[key_added]``
        the threshold, the rule, the method, the metagene and all parameters (plain serialisable types).

    Raises
    ------
    KeyError
        A feature is neither a gene nor an obs column.
    TypeError
        ``features``, ``probability_cutoff`` or ``random_state`` of the wrong type (e.g. a dict of classes).
    ValueError
        Bad parameters, too few cells, non-numeric or missing values, a constant / all-zero feature, or (``gmm``) a
        score that is not two populations.
    """
    from .._table import check_key, resolve_table
    from .._utils import check_writable_dir, whole_number

    if metagene not in METAGENES:
        raise ValueError(f"metagene={metagene!r} is not supported; choose one of {list(METAGENES)}.")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {list(METHODS)}.")
    if isinstance(probability_cutoff, bool) or not isinstance(probability_cutoff, numbers.Real):
        raise TypeError(
            f"probability_cutoff must be a number in (0, 1), got {probability_cutoff!r} "
            f"({type(probability_cutoff).__name__}); pass e.g. probability_cutoff=0.3."
        )
    if not 0.0 < float(probability_cutoff) < 1.0:
        raise ValueError(
            f"probability_cutoff={probability_cutoff!r} is outside (0, 1); it is the P(high) above which a cell is "
            "called high, e.g. 0.3 or 0.5."
        )
    if method == "ks" and float(probability_cutoff) != DEFAULT_PROBABILITY_CUTOFF:
        logger.warning(
            "classify_by_threshold(%r): probability_cutoff=%s is ignored by method='ks', which splits where the "
            "score departs from its bulk; use method='gmm' to set the cut by P(high).",
            key_added,
            probability_cutoff,
        )
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"random_state must be an integer seed, got {random_state!r} ({type(random_state).__name__}); the "
            "classification is seeded so that it can be reproduced: pass e.g. random_state=0."
        )
    max_fit_cells = whole_number(max_fit_cells, "max_fit_cells", minimum=MIN_CELLS)  # e.g. 50000 (the default)
    if plots_dir is not None and not plot:
        raise ValueError("plots_dir was given but plot=False; pass plot=True to draw and save the figure.")
    check_key(key_added, "key_added")
    if plots_dir is not None:
        check_writable_dir(plots_dir, "plots_dir")  # before anything is written into the table
    features = _as_feature_list(features)

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    if adata.n_obs < MIN_CELLS:
        raise ValueError(
            f"The table has {adata.n_obs} cell(s); a threshold needs at least {MIN_CELLS} cells to be estimated. "
            "Classify a larger table (e.g. all sections together)."
        )

    requested = features
    src = _expression_source(adata, requested)
    features, kinds = _resolve_features(adata, requested, src)
    values, expression = _feature_values(adata, features, kinds, src)
    _check_features(values, features, kinds, metagene)

    score, metagene_info = _metagene(values, metagene if len(features) > 1 else None)
    # split the score exactly as it is stored (float32), so that "score > threshold" holds on the stored column
    exact, score = score, score.astype(np.float32).astype(np.float64)
    what = f"feature {features[0]!r}" if len(features) == 1 else f"{metagene} score"
    if not np.isfinite(score).all():
        raise ValueError(
            f"The {what} has values beyond float32 range (about 3.4e38) or non-finite; the score is stored as float32. "
            "Rescale the features (e.g. take their log)."
        )
    if np.ptp(score) <= 0:
        why = (
            f"its values differ by {np.ptp(exact):.3g} around {exact[0]:.6g}, below float32 precision (the score is "
            "stored as float32); subtract an offset first (e.g. the column's minimum)"
            if np.ptp(exact) > 0
            else "choose features that vary across cells"
        )
        raise ValueError(
            f"The {what} is the same ({score[0]:.6g}) for every cell, so there is nothing to split: {why}."
        )

    if method == "gmm":
        threshold, probability, fit_info = _split_gmm(
            score, probability_cutoff, max_fit_cells=int(max_fit_cells), random_state=random_state
        )
        _check_separation(fit_info, score, threshold, features, metagene)
    else:
        threshold, probability, fit_info = _split_ks(score, random_state=random_state)
    cluster = (score > threshold).astype(np.int8)
    n_high = int(cluster.sum())
    floor = score <= score.min()
    if method == "gmm" and floor.mean() >= ZERO_INFLATED_FRACTION and n_high == int((~floor).sum()):
        logger.warning(
            "classify_by_threshold(%r): %.0f%% of the cells have the lowest score (no count of the markers), and the "
            "mixture's threshold (%.4g) calls every other cell high (%d cells, %.1f%%): one count makes a cell high. "
            "For a zero-inflated score, method='ks' looks for the minority that departs from the bulk.",
            key_added,
            100 * floor.mean(),
            threshold,
            n_high,
            100 * n_high / cluster.size,
        )
    if n_high == 0 or n_high == cluster.size:
        logger.warning(
            "classify_by_threshold(%r): all %d cells fall in the %s class; the features may not separate two "
            "populations in this table.",
            key_added,
            cluster.size,
            "high" if n_high else "low",
        )

    params: dict[str, Any] = {
        "features": list(features),
        "features_requested": list(requested) if requested != features else None,
        "feature_kinds": [kinds[f] for f in features],
        "metagene": metagene if len(features) > 1 else "none (single feature)",
        "method": method,
        "threshold": float(threshold),
        "rule": "cluster = 1 where score > threshold",
        "probability_cutoff": float(probability_cutoff) if method == "gmm" else None,
        "n_cells": int(cluster.size),
        "n_high": n_high,
        "fraction_high": float(n_high / cluster.size),
        "random_state": int(random_state),
        "expression": expression,
        "metagene_params": metagene_info,
        "fit": fit_info,
    }
    params = _drop_none(params)

    obs_new = {
        f"{key_added}_score": score.astype(np.float32),
        f"{key_added}_probability": probability.astype(np.float32),
        f"{key_added}_cluster": cluster,
    }
    for k, v in obs_new.items():
        adata.obs[k] = v
    adata.uns[key_added] = params
    logger.info(
        "classify_by_threshold(%r): %d of %d cells high (threshold %.4g, %s%s).",
        key_added,
        n_high,
        cluster.size,
        threshold,
        method,
        f"; genes from {expression['source']}" if expression else "",
    )
    # persist first: a figure that fails to draw must not leave the table in memory and the store disagreeing
    result = ref.finish(write=write, elements=("obs", "uns"))

    if plot:
        from ..pl._threshold import threshold as plot_threshold

        save = None
        if plots_dir is not None:
            from pathlib import Path

            save = Path(plots_dir).expanduser() / f"{key_added}_threshold.png"  # the folder is made by the save
        # saved: closed (no figures kept open in loops and scripts); not saved: left open in pyplot, so that a
        # notebook shows it (the figure is not returned)
        plot_threshold(adata, key=key_added, save=save, random_state=random_state, show=save is None)

    return result


# --------------------------------------------------------------------------------------------------------------------
# features


def _as_feature_list(features: str | Sequence[str]) -> list[str]:
    if isinstance(features, Mapping):
        raise TypeError(
            f"features is a {type(features).__name__} of {len(features)} classes ({list(features)[:5]}); "
            "classify_by_threshold splits cells into high and low for one set of features at a time. Call it once "
            "per class, each with its own key_added, e.g. `for name, genes in features.items(): "
            "scx.tl.classify_by_threshold(data, genes, key_added=name)`."
        )
    if isinstance(features, str):
        features = [features]
    try:
        features = [str(f) for f in features]
    except TypeError as e:
        raise TypeError(f"features must be a name or a list of names, got {type(features).__name__}.") from e
    if not features:
        raise ValueError("features is empty; pass at least one gene or obs column.")
    dup = sorted({f for f in features if features.count(f) > 1})
    if dup:
        raise ValueError(f"features lists {dup} more than once; pass each feature once.")
    return features


def _expression_source(adata: AnnData, features: list[str]) -> Any:
    """The matrix genes are read from, or ``None`` when every feature is an obs column or none is usable.

    ``None`` for an unusable table defers the error: a misspelt name is reported as such, and a gene feature then
    raises :func:`spatialcx.pp._normalization.find_expression_source`'s message in :func:`_feature_values`.
    """
    from ..pp._normalization import find_expression_source

    obs_columns = {str(c) for c in adata.obs.columns}
    if all(f in obs_columns for f in features):
        return None
    try:
        return find_expression_source(adata)
    except ValueError:
        return None


def _resolve_features(adata: AnnData, features: list[str], src: Any = None) -> tuple[list[str], dict[str, str]]:
    """The table's names of ``features`` and the kind of each (``"gene"`` or ``"obs"``), keyed by those names.

    A name is used as it is when it is a gene or an obs column. Otherwise it is matched to a gene
    case-insensitively (``Gad1`` finds ``GAD1``, as in :func:`spatialcx.pp._harmonize.match_genes`), unless the
    table has several genes that differ from it only by case. Genes are those of the matrix expression is read from
    (``src``: ``raw.var_names`` when it is ``raw.X``, e.g. scanpy's layout with ``X`` subset to variable genes), or
    ``var_names`` without one.
    """
    from ..pp._harmonize import match_genes

    var_names = pd.Index((adata.var_names if src is None else src.var_names).astype(str))
    obs_columns = {str(c) for c in adata.obs.columns}
    names: list[str] = []
    kinds: dict[str, str] = {}
    missing = []
    for f in features:
        in_var, in_obs = f in var_names, f in obs_columns
        if in_var and in_obs:
            raise ValueError(
                f"{f!r} is both a gene and an obs column, so it is unclear which one to use. Rename the obs column "
                f"(e.g. adata.obs.rename(columns={{{f!r}: {f + '_obs'!r}}})) and pass the name you mean."
            )
        if in_var or in_obs:
            names.append(f)
            kinds[f] = "gene" if in_var else "obs"
            continue
        match = match_genes([f], var_names, case_insensitive=True)
        if not match.genes:
            missing.append(f)
            continue
        gene = str(var_names[int(match.columns[0])])
        if gene in obs_columns:
            raise ValueError(
                f"{f!r} matches the gene {gene!r} (ignoring case), which is also an obs column; pass {gene!r} after "
                f"renaming the obs column (e.g. adata.obs.rename(columns={{{gene!r}: {gene + '_obs'!r}}}))."
            )
        logger.info("classify_by_threshold: feature %r is the gene %r of the table (matched ignoring case).", f, gene)
        names.append(gene)
        kinds[gene] = "gene"
    if missing:
        hints = []
        pool = list(map(str, var_names)) + sorted(obs_columns)
        folded: dict[str, list[str]] = {}
        for p in pool:
            folded.setdefault(p.casefold(), []).append(p)
        for f in missing:
            same = folded.get(f.casefold(), [])
            if len(same) > 1:
                hints.append(f"{f!r} matches {same} ignoring case: pass the exact name of the one you mean.")
                continue
            close = difflib.get_close_matches(f, pool, n=3)
            if close:
                hints.append(f"{f!r} -> did you mean {close}?")
        where = f" in {src.where}" if src is not None and src.where.startswith("raw.") else ""
        raise KeyError(
            f"Feature(s) {missing} are neither genes of the table ({var_names.size} genes{where}, matched exactly or "
            "ignoring case when unambiguous) nor obs columns. "
            + (" ".join(hints) + " " if hints else "")
            + "Check the spelling or use scx.pp.panel_genes(data) to list the panel."
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        same = {n: [f for f, m in zip(features, names) if m == n] for n in dup}
        raise ValueError(
            f"features name the same gene or column more than once ({same}, matched ignoring case); pass each once."
        )
    return names, kinds


def _feature_values(
    adata: AnnData, features: list[str], kinds: dict[str, str], src: Any = None
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Cells x features values, and where the genes' expression came from (``None`` without genes)."""
    genes = [f for f in features if kinds[f] == "gene"]
    out = np.empty((adata.n_obs, len(features)), dtype=np.float64)
    expression = None
    if genes:
        from .._matrix import normalized_expression
        from ..pp._normalization import find_expression_source

        if src is None:  # found once: the values, and the record of where they come from
            src = find_expression_source(adata)
        out[:, [features.index(g) for g in genes]] = normalized_expression(
            adata, genes, target_sum=1e4, over="all", source=src
        )
        expression = {
            "source": src.where,
            "source_kind": "raw counts" if src.kind == "counts" else "log1p(10k) values, used as they are",
            "target_sum": 1e4,
            "transform": "log1p",
            "library_size_over": "all genes",
        }
    for f in features:
        if kinds[f] != "obs":
            continue
        col = obs_column(adata, f)
        if isinstance(col.dtype, pd.CategoricalDtype) or not (
            pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
        ):
            raise ValueError(
                f"obs column {f!r} has dtype {col.dtype}, not numbers. classify_by_threshold needs a numeric "
                "feature; to select cells by category use spatial_domains(data, selection=..., value=...)."
            )
        vals = col.to_numpy(dtype=np.float64, na_value=np.nan)
        n_nan = int(np.isnan(vals).sum())
        if n_nan:
            raise ValueError(
                f"obs column {f!r} has {n_nan} missing value(s) of {vals.size}; every cell needs a value. Fill "
                f"them (e.g. adata.obs[{f!r}].fillna(0)) or classify the subset of cells that have one."
            )
        out[:, features.index(f)] = vals
    return out, expression


def _check_features(values: np.ndarray, features: list[str], kinds: dict[str, str], metagene: str) -> None:
    for j, f in enumerate(features):
        col = values[:, j]
        if not np.isfinite(col).all():
            raise ValueError(f"Feature {f!r} has non-finite values (inf); replace them before classifying.")
        if np.ptp(col) <= 0:
            what = "expression" if kinds[f] == "gene" else "value"
            if col[0] == 0:
                raise ValueError(
                    f"Feature {f!r} is zero in all {col.size} cells: there is no {what} to threshold. Is the "
                    f"{'gene detected in this sample' if kinds[f] == 'gene' else 'column filled'}? Remove it from "
                    "features."
                )
            raise ValueError(
                f"Feature {f!r} has the same {what} ({col[0]:.4g}) in all {col.size} cells, so it cannot separate "
                "cells. Remove it from features."
            )
    if len(features) > 1 and metagene == "shifted_geometric_mean":
        neg = [f for j, f in enumerate(features) if (values[:, j] < 0).any()]
        if neg:
            raise ValueError(
                f"Feature(s) {neg} have negative values, but the shifted geometric mean exp(mean(log(x + 1))) - 1 "
                "needs x >= 0. Use metagene='mean' or metagene='pc1' for signed features."
            )


# --------------------------------------------------------------------------------------------------------------------
# metagene


def _metagene(values: np.ndarray, metagene: str | None) -> tuple[np.ndarray, dict[str, Any] | None]:
    """One score per cell from ``values`` (cells x features); ``None`` when there is one feature."""
    if metagene is None:
        return values[:, 0].copy(), None
    if metagene == "shifted_geometric_mean":
        return np.expm1(np.log1p(values).mean(axis=1)), {"shift": 1.0}
    if metagene == "mean":
        return values.mean(axis=1), None
    # pc1 of the standardized features
    from sklearn.decomposition import PCA

    mean, std = values.mean(axis=0), values.std(axis=0)
    z = (values - mean) / std
    pca = PCA(n_components=1, svd_solver="covariance_eigh")
    score = pca.fit_transform(z)[:, 0]
    loadings = pca.components_[0]
    if loadings.sum() < 0:  # higher score = higher expression: PC1 correlates positively with the mean z-score
        loadings, score = -loadings, -score
    info = {
        "loadings": loadings.astype(float).tolist(),
        "explained_variance_ratio": float(pca.explained_variance_ratio_[0]),
        "center": mean.astype(float).tolist(),
        "scale": std.astype(float).tolist(),
    }
    return score, info


# --------------------------------------------------------------------------------------------------------------------
# splits


def _split_gmm(
    score: np.ndarray, cutoff: float, *, max_fit_cells: int, random_state: int
) -> tuple[float, np.ndarray, dict[str, Any]]:
    """Two-component Gaussian mixture; returns the threshold, monotone P(high | score) and the fitted parameters."""
    from scipy.special import expit
    from sklearn.mixture import GaussianMixture

    n = score.size
    rng = np.random.default_rng(random_state)
    fit = score if n <= max_fit_cells else score[rng.choice(n, size=max_fit_cells, replace=False)]
    # one dimension: "diag" is the same model as "full", with less overhead
    gmm = GaussianMixture(n_components=2, covariance_type="diag", random_state=random_state)
    gmm.fit(fit.reshape(-1, 1).astype(np.float64))
    means = gmm.means_.ravel()
    var = gmm.covariances_.ravel()
    w = gmm.weights_.ravel()
    hi = int(np.argmax(means))
    lo = 1 - hi  # two equal means (one population): the separation below is 0 and the split is refused
    mu_h, mu_l, v_h, v_l, w_h, w_l = means[hi], means[lo], var[hi], var[lo], w[hi], w[lo]

    # log-odds L(s) = a s^2 + b s + c0; P(high | s) = sigmoid(L(s))
    a = 0.5 / v_l - 0.5 / v_h
    b = mu_h / v_h - mu_l / v_l
    c0 = np.log(w_h / w_l) + 0.5 * np.log(v_l / v_h) - 0.5 * mu_h**2 / v_h + 0.5 * mu_l**2 / v_l
    # L is a parabola; it increases with s on one side of its vertex. Clamping s to that side makes the posterior
    # non-decreasing in the score, so that "P(high) > cutoff" and "score > threshold" are the same rule.
    scale = max(abs(mu_h - mu_l), np.sqrt(max(v_h, v_l)))
    if abs(a) * scale**2 < 1e-12:
        vertex = None
        s_eff = score
    else:
        vertex = -b / (2 * a)
        s_eff = np.maximum(score, vertex) if a > 0 else np.minimum(score, vertex)
    logodds = (a * s_eff + b) * s_eff + c0
    probability = expit(logodds)

    target = np.log(cutoff / (1 - cutoff))
    c = c0 - target
    if vertex is None:
        threshold = -c / b
    else:
        disc = b * b - 4 * a * c
        if disc >= 0:
            threshold = (-b + np.sqrt(disc)) / (2 * a)  # the root on the increasing side, for either sign of a
        elif a < 0:  # P(high) never reaches the cutoff
            threshold = np.inf
        else:  # P(high) is above the cutoff everywhere
            threshold = -np.inf
    if not np.isfinite(threshold):
        # keep the rule "score > threshold" exact with a finite, serialisable value
        threshold = float(score.max()) if threshold > 0 else float(np.nextafter(score.min(), -np.inf))
    info = {
        "means": [float(mu_l), float(mu_h)],
        "sds": [float(np.sqrt(v_l)), float(np.sqrt(v_h))],
        "weights": [float(w_l), float(w_h)],
        "components": ["low", "high"],
        "mode_dip_ratio": _mixture_dip_ratio(mu_l, mu_h, np.sqrt(v_l), np.sqrt(v_h), w_l, w_h),
        "separation": float(np.sqrt(2.0) * (mu_h - mu_l) / np.sqrt(v_l + v_h)),  # Ashman's D
        "n_fit_cells": int(fit.size),
        "converged": bool(gmm.converged_),
        "n_iter": int(gmm.n_iter_),
    }
    return float(threshold), probability, info


def _check_separation(
    fit: dict[str, Any], score: np.ndarray, threshold: float, features: list[str], metagene: str
) -> None:
    """Refuse a mixture with a single mode (one population cut in two); the message says what to do."""
    if fit["mode_dip_ratio"] < UNIMODAL_DIP_RATIO:
        return
    what = f"feature {features[0]!r}" if len(features) == 1 else f"{metagene} score of {features}"
    (m_l, m_h), (s_l, s_h), (w_l, w_h) = fit["means"], fit["sds"], fit["weights"]
    raise ValueError(
        f"The {what} does not look like two populations: the two Gaussians fitted to it (means {m_l:.3g} and "
        f"{m_h:.3g}, sds {s_l:.3g} and {s_h:.3g}, weights {w_l:.2f} and {w_h:.2f}) make a single mode, with no dip "
        "between them, so they describe one population (skewed or heavy-tailed) rather than two. Splitting it "
        f"would call {float((score > threshold).mean()):.0%} of the cells high. If a minority of cells departs from "
        "the bulk, use method='ks' (it says so when none does); otherwise choose features that separate the cells "
        "(markers specific to the population). Nothing was written."
    )


def _mixture_dip_ratio(mu_l: float, mu_h: float, sd_l: float, sd_h: float, w_l: float, w_h: float) -> float:
    """Lowest density of the mixture between its two means over the lower of its peaks on either side (1: no dip).

    Evaluated on a grid over ``[mu_l, mu_h]``, refined within ten sds of each mean (a component on the cells with
    zero counts is very narrow).
    """
    from scipy.stats import norm

    if not mu_h > mu_l:
        return 1.0
    grid = np.r_[
        np.linspace(mu_l, mu_h, 2001), mu_l + sd_l * np.linspace(0, 10, 401), mu_h - sd_h * np.linspace(0, 10, 401)
    ]
    grid = np.unique(grid[(grid >= mu_l) & (grid <= mu_h)])
    density = w_l * norm.pdf(grid, mu_l, sd_l) + w_h * norm.pdf(grid, mu_h, sd_h)
    i = int(np.argmin(density))
    if i == 0 or i == grid.size - 1:
        return 1.0
    return float(density[i] / min(density[:i].max(), density[i + 1 :].max()))


def _split_ks(score: np.ndarray, *, random_state: int) -> tuple[float, np.ndarray, dict[str, Any]]:
    """KS-inspired split of a minority population, robust to an excess of cells at the lowest score."""
    from scipy.stats import kstwo, norm

    floor = float(score.min())
    at_floor = score <= floor
    floor_fraction = float(at_floor.mean())
    zero_inflated = floor_fraction >= ZERO_INFLATION_MIN_FRACTION
    v = np.sort(score[~at_floor] if zero_inflated else score)
    info: dict[str, Any] = {
        "floor": floor,
        "floor_fraction": floor_fraction,
        "zero_inflated": bool(zero_inflated),
    }
    if v.size < MIN_CELLS or np.ptp(v) <= 0:
        # (almost) binary score: everything above the floor is high
        info.update({"side": "above_floor", "n_above_floor": int(v.size)})
        scale = float(np.ptp(score)) or 1.0
        return floor, _soft(score, floor, scale, at_floor if zero_inflated else None), info

    n = v.size
    # the empirical CDF at and just below each value, counting tied values together (discrete scores, e.g. cells
    # with one count and the same library size): ranks within a run of ties are not departures from the bulk
    ecdf_at = np.searchsorted(v, v, side="right") / n
    ecdf_below = np.searchsorted(v, v, side="left") / n
    med = float(np.median(v))
    q_lo, q_hi = np.quantile(v, _SIGMA_QUANTILES)
    tiny = 1e-9 * max(1.0, abs(med))
    sd_left, sd_right = max(med - q_lo, tiny), max(q_hi - med, tiny)
    # excess of cells above t over a Gaussian fitted to the left half of the bulk (a high minority) ...
    d_high = norm.cdf(v, med, sd_left) - ecdf_at
    # ... and of cells below t over a Gaussian fitted to the right half (a low minority)
    d_low = ecdf_below - norm.cdf(v, med, sd_right)
    i_high, i_low = int(np.argmax(d_high)), int(np.argmax(d_low))
    stat_high, stat_low = float(d_high[i_high]), float(d_low[i_low])
    critical = float(kstwo.isf(KS_ALPHA, n))
    info.update(
        {
            "bulk_median": med,
            "bulk_sd_left": float(sd_left),
            "bulk_sd_right": float(sd_right),
            "statistic_high": stat_high,
            "statistic_low": stat_low,
            "critical_value": critical,
            "alpha": KS_ALPHA,
        }
    )
    # a departure that starts below the bulk's median would call most cells high: that is no minority (e.g. the
    # steps of a discrete score, or a skewed bulk)
    high_below_median = bool(v[i_high] < med)
    high_ok, low_ok = stat_high > critical and not high_below_median, stat_low > critical
    low_mode = False
    if low_ok and stat_low > stat_high:
        t_low = float(v[max(i_low - 1, 0)])
        low_mode = _has_low_mode(v, t_low, med, random_state=random_state)
    if high_ok and stat_high >= stat_low:
        threshold, side, scale = float(v[i_high]), "high_minority", sd_left
    elif low_mode:
        threshold, side, scale = t_low, "low_minority", sd_right
    elif high_ok and not zero_inflated:
        threshold, side, scale = float(v[i_high]), "high_minority", sd_left
    else:
        # no minority above noise (or a low one without its own mode): one population, every cell above the floor
        threshold, side, scale = floor, "above_floor", sd_right
        (logger.info if zero_inflated else logger.warning)(
            "classify_by_threshold (ks): no minority departs from the bulk of the %d cells%s beyond noise (KS "
            "statistics %.3g above, %.3g below, critical value %.3g at alpha %g%s); every cell above the lowest "
            "score (%.4g) is high.",
            n,
            " above the lowest score" if zero_inflated else "",
            stat_high,
            stat_low,
            critical,
            KS_ALPHA,
            ("; the low departure forms no mode of its own" if low_ok else "")
            + (
                "; the high departure starts below the bulk's median"
                if high_below_median and stat_high > critical
                else ""
            ),
            floor,
        )
    info["side"] = side
    return threshold, _soft(score, threshold, scale, at_floor if zero_inflated else None), info


def _has_low_mode(v: np.ndarray, t: float, center: float, *, random_state: int) -> bool:
    """Whether the sorted values ``v`` at or below ``t`` form a density mode of their own, apart from the bulk.

    On a kernel density estimate, the peak at or below ``t`` must be separated from the bulk's peak (the highest
    density at or above the bulk's ``center``) by a dip below :data:`MODE_DIP_RATIO` times its own height. A
    shoulder on the bulk (the density still rising up to ``t``) has no dip.
    """
    from scipy.stats import gaussian_kde

    below = v[v <= t]
    if below.size < MIN_CELLS or below.size == v.size or center <= t:
        return False
    rng = np.random.default_rng(random_state)
    sub = v if v.size <= _KDE_MAX_CELLS else rng.choice(v, size=_KDE_MAX_CELLS, replace=False)
    if np.ptp(sub) <= 0:
        return False
    kde = gaussian_kde(sub)
    # Scott's rule over-smooths two close modes (e.g. ambient and expressing): half of it, but no narrower than the
    # typical (median) step between the distinct values of the central 90 % (a discrete score, e.g. log1p of
    # integers, would otherwise show a mode at each of its values; a continuous one has tiny steps)
    lo_q, hi_q = np.quantile(sub, [0.05, 0.95])
    steps = np.diff(np.unique(sub[(sub >= lo_q) & (sub <= hi_q)]))
    step = float(np.median(steps)) if steps.size else 0.0
    kde.set_bandwidth(max(kde.factor * 0.5, step / float(np.sqrt(kde.covariance[0, 0]) / kde.factor)))
    grid = np.linspace(v[0], v[-1], 2 * _KDE_GRID)
    density = kde(grid)
    low, bulk = grid <= t, grid >= center
    if not low.any() or not bulk.any():
        return False
    i_low = int(np.flatnonzero(low)[np.argmax(density[low])])
    i_bulk = int(np.flatnonzero(bulk)[np.argmax(density[bulk])])
    dip = float(density[i_low : i_bulk + 1].min())
    return bool(dip < MODE_DIP_RATIO * density[i_low])


def _soft(score: np.ndarray, threshold: float, scale: float, at_floor: np.ndarray | None) -> np.ndarray:
    from scipy.stats import norm

    p = norm.cdf((score - threshold) / scale)
    if at_floor is not None:
        p[at_floor] = 0.0
    return p


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """Recursively remove ``None`` values (not storable in h5ad / zarr)."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = _drop_none(v) if isinstance(v, dict) else v
    return out
