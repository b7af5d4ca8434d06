"""Detect how an expression matrix is normalized, find raw counts, and normalize to log1p(10k).

CellTypist-compatible models expect ``log1p(normalize_total(counts, target_sum=1e4))``. This module finds out what a
table holds, from a small seeded sample of its rows, so that even a lazily read (dask) or file-backed matrix is never
loaded whole.

Where raw counts are looked for
-------------------------------
``layers["counts"]``, ``layers["raw_counts"]``, ``layers["raw"]``, ``raw.X`` and ``X``, in that order. The first
candidate that is classified ``"raw"`` is the raw source. A layer always has ``X``'s shape; ``raw.X`` may have more
genes than ``X`` (its columns are ``raw.var_names``).

Sampling
--------
Up to :data:`N_SAMPLE_ROWS` cells are drawn without replacement with ``numpy.random.default_rng(random_state)``
(fewer for very wide matrices), sorted, and only those rows are read: by fancy indexing of in-memory arrays, of
anndata's backed datasets (``read_h5ad(..., backed="r")``) and of h5py datasets, and by computing only the chunks
holding those rows of a dask array (when those would be most of a table of small chunks, the rows are drawn from a
few randomly chosen chunks instead, see :data:`SAMPLE_ROW_BUDGET`). The same rows are used for every candidate.
Whole rows are read because the log1p check needs row sums. Up to :data:`N_SAMPLE_VALUES` of the non-zero values of
these rows are drawn for the value tests.

Decision rules (one state per matrix, see :data:`STATES`)
---------------------------------------------------------
Zeros (stored or not) are ignored; "values" are the non-zero entries of the sampled rows.

1. ``"unknown"``: the matrix has no cells or genes, the sampled rows are all zero, or a value is NaN or infinite.
2. ``"negative"``: any value is negative (scaled or centred data, residuals). Never usable.
3. ``"raw"``: more than 95 % of the sampled values are integers (``|v - round(v)| < max(1e-6, 1e-6 * |v|)``: the
   relative part forgives counts that went through float32 arithmetic, such as ``expm1(log1p(counts))``, which leaves
   them a few float32 steps off).
4. ``"linear"``: the largest value exceeds ``log1p(1e9)`` (about 20.7): no log1p of per-cell normalized data gets
   there.
5. Otherwise the matrix is compared on two scales, as it is (*linear*) and after ``expm1`` (*log*). Per-cell
   normalization multiplies each cell's counts by one factor, so on the right scale each value divided by the
   smallest non-zero value of its cell is (nearly, within 0.01) an integer: the fraction of such values is measured
   on both scales (values equal to their cell's minimum say nothing and are left out). When the two fractions
   differ by at least 0.2 the higher one decides; otherwise the scale on which the row sums are more nearly constant
   (smaller ``(q90 - q10) / median``) decides, since ``normalize_total`` makes them constant. The linear scale gives
   ``"linear"`` (e.g. ``normalize_total`` without ``log1p``, CPM, counts divided by cell volume).
6. On the log scale, with ``m`` the median of the ``expm1`` row sums of the non-empty sampled cells:
   ``"log1p_10k"`` when ``8e3 <= m <= 1.2e4``; ``"log1p_cpm"`` when ``8e5 <= m <= 1.2e6``; ``"log1p_other"``
   otherwise. Data whose ``expm1`` values are themselves integers (more than 95 %) is ``log1p`` of counts that were
   never normalized, and is ``"log1p_other"`` whatever ``m`` is.

A table is usable when raw counts are found, when ``X`` is ``"log1p_10k"``, when ``raw.X`` is (scanpy's layout), or
when ``X`` is a gene subset of a file's ``X`` that :func:`spatialcx.io.read_reference` verified ``"log1p_10k"`` over all
its genes (recorded in ``uns["spatialcx_reference"]``; ``_x_log1p_in_file`` checks that the values still fit).

``"log1p_cpm"`` data (in ``X`` or ``raw.X``) is not usable as it is, but :func:`ensure_normalized` rescales it exactly:
``log1p(expm1(x) * 1e4 / 1e6)`` is the log1p of the same counts normalized to 10,000 per cell (a constant factor on
the ``expm1`` scale, so a gene subset keeps its cells' relative totals); the check's ``reason`` says so. So is
``"log1p_other"`` data whose ``expm1`` row sums are one number in every sampled cell (``sc.pp.normalize_total``
without ``target_sum`` scales every cell to the median total, e.g. 2,481.5): ``log1p(expm1(x) * 1e4 / 2481.5)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from spatialcx._constants import RAW_COUNT_LAYERS, READ_UNS_KEY, TARGET_SUM
from spatialcx._matrix import rows_on_disk
from spatialcx._settings import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: The states a matrix can be in.
STATES: tuple[str, ...] = ("raw", "log1p_10k", "log1p_cpm", "log1p_other", "linear", "negative", "unknown")
#: Where raw counts are looked for, in order.
RAW_SEARCH_ORDER: tuple[str, ...] = (*(f"layers[{k!r}]" for k in RAW_COUNT_LAYERS), "raw.X", "X")
#: Most cells read to classify a matrix.
N_SAMPLE_ROWS = 1_000
#: Fewest cells read for very wide matrices (when ``N_SAMPLE_ROWS`` rows would exceed ``MAX_SAMPLE_ELEMENTS``).
MIN_SAMPLE_ROWS = 200
#: Rows x genes read at most (bounds memory when the matrix is dense).
MAX_SAMPLE_ELEMENTS = 20_000_000
#: Rows of a chunked (dask) matrix read at most to draw the sample, when the chunks are small (see
#: ``_sample_row_indices``); the rows are then drawn from randomly chosen whole chunks.
SAMPLE_ROW_BUDGET = 20_000
#: Fewest chunks the sample of a chunked matrix is drawn from.
MIN_SAMPLE_CHUNKS = 8
#: Most non-zero values used for the value tests.
N_SAMPLE_VALUES = 10_000
#: A value is an integer when ``|v - round(v)| < max(INTEGER_TOL, INTEGER_RTOL * |v|)``.
INTEGER_TOL = 1e-6
#: Relative part of the integer test: about 8 float32 steps (``np.finfo(np.float32).eps`` is 1.2e-7), the rounding
#: that float32 arithmetic leaves on counts (``expm1(log1p(c))`` is off by up to 5.5e-7 * c, ``c / s * s`` by 1.2e-7 *
#: c), so that counts above ~8 that were computed in float32 are still taken for integers.
INTEGER_RTOL = 1e-6
#: A matrix holds counts when more than this fraction of its sampled non-zero values are integers.
INTEGER_FRACTION = 0.95
#: Counts per cell of CPM data.
CPM = 1e6
#: Largest ``(q90 - q10) / median`` of the ``expm1`` row sums of log1p data normalized to one total per cell (float32
#: rounding leaves about 1e-6): such data, whatever the total, is rescaled exactly by :func:`ensure_normalized`.
CONSTANT_SUM_SPREAD = 1e-3
#: Median expm1 row sums of log1p data normalized to 10,000 counts per cell.
LOG1P_10K_RANGE: tuple[float, float] = (8e3, 1.2e4)
#: Median expm1 row sums of log1p data normalized to a million counts per cell (CPM).
LOG1P_CPM_RANGE: tuple[float, float] = (8e5, 1.2e6)
#: No log1p of per-cell normalized data exceeds this (``log1p(1e9)``).
LOG1P_MAX_VALUE = float(np.log1p(1e9))
#: Tolerance of "value / smallest value of its cell is an integer".
SCALED_INTEGER_TOL = 0.01
#: Difference between the scaled-integer fractions of the two scales that decides between them.
SCALE_VOTE_MARGIN = 0.2

#: What each state means, for messages.
_STATE_TEXT = {
    "raw": "raw counts (integer values)",
    "log1p_10k": "log1p of counts normalized to 10,000 per cell",
    "log1p_cpm": "log1p of counts normalized to 1,000,000 per cell (CPM)",
    "log1p_other": "log1p data, but not of counts normalized to 10,000 per cell",
    "linear": "normalized but not log-transformed (non-integer, non-log values)",
    "negative": "data with negative values (scaled, centred or residuals)",
    "unknown": "no usable values (empty, all zero, or NaN/infinite values)",
}


@dataclass
class NormalizationStatus:
    """What a table's expression matrices hold.

    Attributes
    ----------
    raw_source
        Where raw counts were found (``"layers['counts']"``, ``"layers['raw_counts']"``, ``"layers['raw']"``,
        ``"raw.X"`` or ``"X"``), or ``None``.
    x_state
        State of ``X``: ``"raw"``, ``"log1p_10k"``, ``"log1p_cpm"``, ``"log1p_other"``, ``"linear"``,
        ``"negative"`` or ``"unknown"``.
    x_target_sum
        Median ``expm1`` row sum of the sampled cells when ``X`` looks like log1p data, else ``None``.
    is_usable
        Raw counts were found, or ``X`` (or ``raw.X``) is verified ``"log1p_10k"``, or ``X`` is a gene subset of log1p(10k)
        data verified in its file by :func:`spatialcx.io.read_reference`. ``"log1p_cpm"`` data is not usable as it is;
        :func:`ensure_normalized` rescales it exactly to log1p(10k) (the check's ``reason`` says so).
    has_log1p_uns
        ``"log1p"`` is in ``adata.uns`` (scanpy's mark of log-transformed data).
    stats
        What was measured: ``n_obs``, ``n_vars``, ``n_rows_sampled``, ``random_state`` and, under ``"checked"``, a
        dict per inspected matrix (``"X"`` always) with its ``state``, a ``reason`` and the sampled figures
        (``integer_fraction``, ``min``, ``max``, row-sum medians and spreads, scaled-integer fractions, ...).
    """

    raw_source: str | None
    x_state: str
    x_target_sum: float | None
    is_usable: bool
    has_log1p_uns: bool
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        """A readable multi-line summary."""
        head = "usable" if self.is_usable else "NOT usable"
        if self.raw_source is not None:
            head += f": raw counts in {self.raw_source}"
        elif self.x_state == "log1p_10k":
            head += ": X is verified log1p(10k)"
        lines = [f"NormalizationStatus ({head})"]
        x_line = f"  X: {self.x_state} ({_STATE_TEXT.get(self.x_state, '?')})"
        if self.x_target_sum is not None:
            x_line += f", median expm1 row sum {self.x_target_sum:,.1f}"
        lines.append(x_line)
        lines.append(f"  uns['log1p']: {'present' if self.has_log1p_uns else 'absent'}")
        n = self.stats.get("n_rows_sampled")
        if n is not None:
            lines.append(
                f"  sampled {n} of {self.stats.get('n_obs')} cells (random_state={self.stats.get('random_state')})"
            )
        for where, s in self.stats.get("checked", {}).items():
            lines.append(f"  {where}: {s.get('state')} - {s.get('reason', '')}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class ExpressionSource:
    """The matrix to compute normalized expression from (internal, used by prediction and training).

    Attributes
    ----------
    matrix
        The raw counts, or ``X`` when it is verified log1p(10k) (or when forced). Not copied, not loaded.
    var_names
        Column names of ``matrix`` (``raw.var_names`` for ``raw.X``).
    kind
        ``"counts"`` or ``"log1p"`` (log1p of data normalized to 10,000 per cell).
    where
        ``"layers['counts']"``, ``"raw.X"``, ``"X"``, ...
    status
        The :class:`NormalizationStatus` the choice was made from.
    """

    matrix: Any
    var_names: pd.Index
    kind: str
    where: str
    status: NormalizationStatus


# --------------------------------------------------------------------------------------------------------------------
# sampling


def _n_sample_rows(n_obs: int, n_vars: int) -> int:
    by_size = MAX_SAMPLE_ELEMENTS // max(n_vars, 1)
    return int(min(n_obs, max(MIN_SAMPLE_ROWS, min(N_SAMPLE_ROWS, by_size))))


def _sample_row_indices(
    n_obs: int, n_vars: int, random_state: int, row_chunks: tuple[int, ...] | None = None
) -> np.ndarray:
    """Sorted, unique rows to read; for a chunked (dask) matrix, drawn from a few whole chunks when that reads less.

    A dask matrix is read chunk by chunk, so rows drawn from the whole table touch nearly every chunk when the chunks
    are small (anndata's lazy reader makes chunks of 1,000 rows: 1,000 rows of a million-cell table touch 630 of its
    1,000 chunks). When that would read more than :data:`SAMPLE_ROW_BUDGET` rows, the rows are drawn instead from
    randomly chosen chunks holding about that many rows (at least :data:`MIN_SAMPLE_CHUNKS` of them).
    """
    n = _n_sample_rows(n_obs, n_vars)
    if n >= n_obs:
        return np.arange(n_obs)
    rng = np.random.default_rng(random_state)
    rows = np.sort(rng.choice(n_obs, size=n, replace=False))
    if not row_chunks or len(row_chunks) < 2:
        return rows
    sizes = np.asarray(row_chunks, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    touched = np.unique(np.searchsorted(bounds, rows, side="right") - 1)
    if sizes[touched].sum() <= SAMPLE_ROW_BUDGET:
        return rows
    order = rng.permutation(sizes.size)
    enough = np.searchsorted(np.cumsum(sizes[order]), max(SAMPLE_ROW_BUDGET, n)) + 1
    chosen = np.sort(order[: max(MIN_SAMPLE_CHUNKS, enough)])
    if sizes[chosen].sum() >= sizes[touched].sum():
        return rows
    pool = np.concatenate([np.arange(bounds[c], bounds[c + 1]) for c in chosen])
    return np.sort(rng.choice(pool, size=min(n, pool.size), replace=False))


def _read_sampled_rows(x: Any, rows: np.ndarray) -> sparse.csr_matrix:
    """Read the (sorted, unique) ``rows`` of ``x`` into a float64 CSR matrix without explicit zeros."""
    if len(rows) == 0:
        return sparse.csr_matrix((0, x.shape[1]), dtype=np.float64)
    on_disk = rows_on_disk(x, rows)  # backed or lazy CSC: anndata / dask would read the whole matrix or whole columns
    if on_disk is not None:
        out = sparse.csr_matrix(on_disk, dtype=np.float64)
        out.eliminate_zeros()
        return out
    if sparse.issparse(x) and x.format not in ("csr", "csc"):
        x = sparse.csr_matrix(x)  # COO/DIA/... cannot be indexed; the matrix is in memory already
    if len(rows) == x.shape[0] and (sparse.issparse(x) or isinstance(x, np.ndarray)):
        part = x
    else:
        part = x[rows]
    if hasattr(part, "compute"):  # dask: computes only the chunks that hold the sampled rows
        part = part.compute()
    if sparse.issparse(part):
        out = sparse.csr_matrix(part, dtype=np.float64, copy=True)
    else:
        out = sparse.csr_matrix(np.asarray(part, dtype=np.float64))
    out.eliminate_zeros()
    return out


# --------------------------------------------------------------------------------------------------------------------
# classification


def _spread(values: np.ndarray) -> float:
    """``(q90 - q10) / median`` of positive values; 0 for a constant, NaN when undefined."""
    if values.size < 2:
        return float("nan")
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    if not np.isfinite(q90) or q50 <= 0:
        return float("inf")
    return float((q90 - q10) / q50)


def _near_integer(v: np.ndarray, tol: float, rtol: float = 0.0) -> np.ndarray:
    """``|v - round(v)| < max(tol, rtol * |v|)``."""
    return np.abs(v - np.round(v)) < np.maximum(tol, rtol * np.abs(v))


def _classify(sample: sparse.csr_matrix, random_state: int) -> dict[str, Any]:
    """Classify a sample of whole rows (see the module docstring for the rules)."""
    data = sample.data
    n_rows = sample.shape[0]
    row_nnz = np.diff(sample.indptr)
    nonempty = row_nnz > 0
    stats: dict[str, Any] = {
        "n_nonzero_sampled": int(data.size),
        "n_zero_rows": int(n_rows - nonempty.sum()),
    }
    if n_rows == 0 or sample.shape[1] == 0:
        return {"state": "unknown", "reason": "the matrix has no cells or no genes", **stats}
    if data.size == 0:
        return {"state": "unknown", "reason": f"all {n_rows} sampled cells are zero", **stats}
    finite = np.isfinite(data)
    if not finite.all():
        stats["n_nonfinite"] = int((~finite).sum())
        return {"state": "unknown", "reason": f"{stats['n_nonfinite']} sampled values are NaN or infinite", **stats}

    vmin, vmax = float(data.min()), float(data.max())
    stats.update(min=vmin, max=vmax)
    rng = np.random.default_rng(random_state)
    pick = rng.choice(data.size, size=N_SAMPLE_VALUES, replace=False) if data.size > N_SAMPLE_VALUES else None
    values = data if pick is None else data[pick]
    stats["n_values_checked"] = int(values.size)
    if vmin < 0:
        stats["negative_fraction"] = float((values < 0).mean())
        return {"state": "negative", "reason": f"negative values (min {vmin:.4g})", **stats}

    frac_int = float(_near_integer(values, INTEGER_TOL, INTEGER_RTOL).mean())
    stats["integer_fraction"] = frac_int
    row_sums = np.asarray(sample.sum(axis=1)).ravel()[nonempty]
    stats["row_sum_median"] = float(np.median(row_sums))
    if frac_int > INTEGER_FRACTION:
        return {
            "state": "raw",
            "reason": f"{frac_int:.1%} of {values.size} sampled non-zero values are integers",
            **stats,
        }
    stats["row_sum_spread"] = _spread(row_sums)
    if vmax > LOG1P_MAX_VALUE:
        reason = f"non-integer values up to {vmax:.4g}, above what log1p of normalized data reaches"
        return {"state": "linear", "reason": reason, **stats}

    # compare the linear and the expm1 scale
    expm1 = np.expm1(data)
    expm1_rows = sparse.csr_matrix((expm1, sample.indices, sample.indptr), shape=sample.shape)
    expm1_sums = np.asarray(expm1_rows.sum(axis=1)).ravel()[nonempty]
    median_expm1 = float(np.median(expm1_sums))
    stats.update(expm1_row_sum_median=median_expm1, expm1_row_sum_spread=_spread(expm1_sums))

    starts = sample.indptr[:-1][nonempty]
    row_min = np.repeat(np.minimum.reduceat(data, starts), row_nnz[nonempty])
    row_min_expm1 = np.repeat(np.minimum.reduceat(expm1, starts), row_nnz[nonempty])
    ratio_lin, ratio_exp = data / row_min, expm1 / row_min_expm1
    if pick is not None:
        ratio_lin, ratio_exp = ratio_lin[pick], ratio_exp[pick]
    informative = ratio_lin > 1 + 1e-9
    stats["n_scaled_values"] = int(informative.sum())
    f_lin = f_exp = float("nan")
    if informative.any():
        f_lin = float(_near_integer(ratio_lin[informative], SCALED_INTEGER_TOL).mean())
        f_exp = float(_near_integer(ratio_exp[informative], SCALED_INTEGER_TOL).mean())
    stats.update(linear_scaled_integer_fraction=f_lin, expm1_scaled_integer_fraction=f_exp)
    if np.isfinite(f_lin) and abs(f_exp - f_lin) >= SCALE_VOTE_MARGIN:
        log_scale = f_exp > f_lin
        why = f"per-cell scaled integers on the {'expm1' if log_scale else 'linear'} scale ({max(f_exp, f_lin):.0%})"
    else:
        s_lin, s_exp = stats["row_sum_spread"], stats["expm1_row_sum_spread"]
        log_scale = not (s_lin < s_exp)  # NaN (a single cell) leans to log
        why = f"row sums more constant on the {'expm1' if log_scale else 'linear'} scale"
    if not log_scale:
        return {"state": "linear", "reason": f"non-integer values up to {vmax:.4g}, {why}", **stats}

    expm1_values = expm1 if pick is None else expm1[pick]
    frac_expm1_int = float(_near_integer(expm1_values, 1e-3, INTEGER_RTOL).mean())
    stats["expm1_integer_fraction"] = frac_expm1_int
    if frac_expm1_int > INTEGER_FRACTION:
        reason = (
            f"log1p of counts that were not normalized per cell (expm1 gives integers; median sum {median_expm1:,.0f})"
        )
        return {"state": "log1p_other", "reason": reason, **stats}
    reason = f"log-scale values up to {vmax:.3g}, median expm1 row sum {median_expm1:,.1f}"
    if LOG1P_10K_RANGE[0] <= median_expm1 <= LOG1P_10K_RANGE[1]:
        return {"state": "log1p_10k", "reason": reason, **stats}
    if LOG1P_CPM_RANGE[0] <= median_expm1 <= LOG1P_CPM_RANGE[1]:
        return {"state": "log1p_cpm", "reason": reason, **stats}
    return {"state": "log1p_other", "reason": reason, **stats}


# --------------------------------------------------------------------------------------------------------------------
# candidates and status


def _candidates(adata: AnnData) -> list[tuple[str, Any, pd.Index]]:
    """``(where, matrix, var_names)`` of every matrix that may hold raw counts, in search order."""
    out = []
    for key in RAW_COUNT_LAYERS:
        if key in adata.layers:
            layer = adata.layers[key]
            if tuple(layer.shape) != tuple(adata.shape):
                raise ValueError(
                    f"layers[{key!r}] has shape {tuple(layer.shape)} but X has {tuple(adata.shape)}. "
                    "A layer must have X's shape; fix or delete the layer."
                )
            out.append((f"layers[{key!r}]", layer, adata.var_names))
    if adata.raw is not None:
        out.append(("raw.X", adata.raw.X, adata.raw.var_names))
    if adata.X is not None:
        out.append(("X", adata.X, adata.var_names))
    return out


def _as_anndata(data: AnnData | SpatialData, table_key: str) -> AnnData:
    if isinstance(data, AnnData):
        return data
    from spatialcx._table import get_table

    return get_table(data, table_key=table_key)


def _inspect(adata: AnnData, random_state: int) -> tuple[NormalizationStatus, dict[str, tuple[Any, pd.Index]]]:
    """Classify ``X`` and the raw candidates; return the status and the candidate matrices by location."""
    n_obs, n_vars = adata.shape
    candidates = _candidates(adata)
    widest = max([n_vars, *(m.shape[1] for _, m, _ in candidates)])
    # a dask candidate's row chunks (read_lazy gives X and the layers the same ones)
    row_chunks = next((m.chunks[0] for _, m, _ in candidates if hasattr(m, "chunks") and hasattr(m, "compute")), None)
    rows = _sample_row_indices(n_obs, widest, random_state, row_chunks)
    checked: dict[str, dict[str, Any]] = {}
    raw_source = None
    for where, matrix, _ in candidates:
        if raw_source is not None and where != "X":
            continue  # the first raw source wins; X is always classified
        result = _classify(_read_sampled_rows(matrix, rows), random_state)
        checked[where] = result
        logger.debug(f"{where}: {result['state']} ({result['reason']})")
        if raw_source is None and result["state"] == "raw":
            raw_source = where
    if "X" not in checked:  # X is None (AnnData without X)
        checked["X"] = {"state": "unknown", "reason": "X is None"}
    x = checked["X"]
    x_state = x["state"]
    x_target_sum = x.get("expm1_row_sum_median") if x_state.startswith("log1p") else None
    if not _log1p_normalized_to(x) and _x_log1p_in_file(adata, x):
        x["verified_in_file"] = True
        x["reason"] += "; a gene subset of a file's X verified log1p(10k) over all genes by read_reference"
    if raw_source is None and not _log1p_normalized_to(x) and not x.get("verified_in_file"):
        # what ensure_normalized converts (see there): X, else raw.X
        for where in ("X", "raw.X"):
            nominal = _log1p_nominal_target(checked.get(where, {}))
            if nominal is not None and nominal != TARGET_SUM:
                checked[where]["reason"] += "; scx.pp.ensure_normalized rescales it exactly to log1p(10k)"
            if nominal is not None:
                break
    status = NormalizationStatus(
        raw_source=raw_source,
        x_state=x_state,
        x_target_sum=x_target_sum,
        is_usable=raw_source is not None
        or _log1p_normalized_to(x)
        or bool(x.get("verified_in_file"))
        or _log1p_normalized_to(checked.get("raw.X", {})),
        has_log1p_uns="log1p" in adata.uns,
        stats={
            "n_obs": int(n_obs),
            "n_vars": int(n_vars),
            "n_rows_sampled": len(rows),
            "random_state": int(random_state),
            "log1p_base": _log1p_base(adata),
            "checked": checked,
        },
    )
    return status, {where: (matrix, names) for where, matrix, names in candidates}


def _log1p_base(adata: AnnData) -> float | None:
    """``uns["log1p"]["base"]`` when it is a number (scanpy's mark of ``log_base(1 + x)``), else ``None``."""
    info = adata.uns.get("log1p") if hasattr(adata.uns, "get") else None
    base = info.get("base") if isinstance(info, Mapping) else None
    try:
        return float(base) if base is not None else None
    except (TypeError, ValueError):
        return None


def _log1p_normalized_to(result: dict[str, Any], target_sum: float = TARGET_SUM) -> bool:
    """Whether a classified matrix (``_classify``'s result) is log1p of counts normalized to about ``target_sum``.

    The one rule for X and for ``raw.X``: a log scale, ``expm1`` values not themselves integers (counts never
    normalized), and a median ``expm1`` row sum within 20 % of ``target_sum`` (at the default, ``"log1p_10k"``).
    """
    median = result.get("expm1_row_sum_median")
    return (
        str(result.get("state", "")).startswith("log1p")
        and median is not None
        and not result.get("expm1_integer_fraction", 0.0) > INTEGER_FRACTION
        and 0.8 * target_sum <= median <= 1.2 * target_sum
    )


def classify_matrix(matrix: Any, random_state: int = 0) -> dict[str, Any]:
    """Classify one matrix (in memory, dask, backed or an h5py / zarr array) from a seeded sample of its rows.

    Returns ``_classify``'s result: ``state``, ``reason`` and the sampled figures (see the module docstring).
    """
    n_obs, n_vars = (int(s) for s in matrix.shape)
    chunks = matrix.chunks[0] if hasattr(matrix, "chunks") and hasattr(matrix, "compute") else None
    rows = _sample_row_indices(n_obs, n_vars, random_state, chunks)
    return _classify(_read_sampled_rows(matrix, rows), random_state)


def file_log1p_target_sum(result: dict[str, Any]) -> float:
    """The median ``expm1`` row sum of a matrix classified as log1p of per-cell normalized counts, else ``-1.0``.

    What :func:`spatialcx.io.read_reference` records (``uns["spatialcx_reference"]["x_log1p_target_sum"]``) about the
    file's ``X`` over all its genes, before keeping only some genes.
    """
    median = result.get("expm1_row_sum_median")
    if median is None or not _log1p_normalized_to(result, float(median)):
        return -1.0
    return float(median)


def _x_log1p_in_file(adata: AnnData, x: dict[str, Any], target_sum: float = TARGET_SUM) -> bool:
    """Whether ``X`` is a gene subset of a file's ``X`` verified log1p of counts normalized to about ``target_sum``.

    :func:`spatialcx.io.read_reference` checks the file's ``X`` over all its genes and records the median ``expm1``
    row sum in ``uns["spatialcx_reference"]["x_log1p_target_sum"]``; a subset of genes cannot show it (its row sums
    are smaller). The record is used only when the sampled values of ``X`` can still be such a subset: not integers,
    not negative, at most ``log1p(1.2 * target_sum)`` (one gene never exceeds its cell's total) and ``expm1`` row
    sums of at most ``1.2 * target_sum``, ``expm1`` values not themselves integers. ``X`` changed after reading (e.g.
    scaled, or replaced by counts) fails these checks.
    """
    info = adata.uns.get(READ_UNS_KEY) if hasattr(adata.uns, "get") else None
    if not isinstance(info, Mapping):
        return False
    try:
        recorded = float(info.get("x_log1p_target_sum", -1.0))
    except (TypeError, ValueError):
        return False
    if not (0.8 * target_sum <= recorded <= 1.2 * target_sum):
        return False
    median = x.get("expm1_row_sum_median")
    return (
        x.get("state") in ("log1p_10k", "log1p_cpm", "log1p_other", "linear")
        and median is not None
        and median <= 1.2 * target_sum
        and float(x.get("max", np.inf)) <= np.log1p(1.2 * target_sum) + 1e-6
        and not x.get("expm1_integer_fraction", 0.0) > INTEGER_FRACTION
    )


def _raw_log1p_at(status: NormalizationStatus, target_sum: float = TARGET_SUM) -> bool:
    """Whether ``raw.X`` holds log1p data normalized to about ``target_sum`` (scanpy's layout: X scaled or subset)."""
    return _log1p_normalized_to(status.stats.get("checked", {}).get("raw.X", {}), target_sum)


def _log1p_nominal_target(result: dict[str, Any]) -> float | None:
    """The counts per cell that a classified matrix of log1p data was normalized to, when it can be rescaled exactly.

    ``1e4`` or ``1e6`` (within 20 %, as :func:`_log1p_normalized_to`); otherwise the common ``expm1`` row sum when
    every sampled cell has the same one (within ``CONSTANT_SUM_SPREAD``): ``sc.pp.normalize_total`` without
    ``target_sum`` scales every cell to the median of the totals, a number of no meaning of its own. A gene subset
    (highly variable genes) has no constant row sums and gets ``None``, as do counts that were never normalized.
    """
    for nominal in (TARGET_SUM, CPM):
        if _log1p_normalized_to(result, nominal):
            return nominal
    median, spread = result.get("expm1_row_sum_median"), result.get("expm1_row_sum_spread")
    if (
        str(result.get("state", "")).startswith("log1p")
        and median is not None
        and median > 0
        and spread is not None
        and spread <= CONSTANT_SUM_SPREAD  # (NaN, a single cell, is not)
        and not result.get("expm1_integer_fraction", 0.0) > INTEGER_FRACTION
    ):
        return float(median)
    return None


def _log1p_rescaled(x: Any, factor: float) -> Any:
    """``log1p(expm1(x) * factor)`` as a new matrix of ``x``'s kind (zeros stay zeros, dask stays lazy).

    Computed in ``x``'s float type, float32 at least (``expm1`` of log1p CPM data overflows float16).
    """
    dtype = np.result_type(x.dtype, np.float32)
    if hasattr(x, "map_blocks") and hasattr(x, "compute"):  # dask
        return x.map_blocks(_log1p_rescaled, factor, dtype=dtype, meta=x._meta.astype(dtype))
    out = x.astype(dtype, copy=True)
    values = out.data if sparse.issparse(out) else out
    np.expm1(values, out=values)
    values *= dtype.type(factor)
    np.log1p(values, out=values)
    return out


def normalization_status(
    data: AnnData | SpatialData, *, table_key: str = "table", random_state: int = 0
) -> NormalizationStatus:
    """Find raw counts and tell how ``X`` is normalized, from a seeded sample of cells.

    Raw counts are looked for in ``layers["counts"]``, ``layers["raw_counts"]``, ``layers["raw"]``, ``raw.X`` and
    ``X``, in that order; a candidate is accepted when more than 95 % of its sampled non-zero values are integers
    and none is negative. ``X`` is classified as one of the states of :attr:`NormalizationStatus.x_state` by these rules
    (integer test, then ``expm1`` row sums: 8,000-12,000 is ``"log1p_10k"``, 800,000-1,200,000 ``"log1p_cpm"``).
    Only sampled rows are read: sparse, dense, dask and file-backed matrices are never loaded whole.

    Parameters
    ----------
    data
        The spatial data or its table (AnnData, also in backed mode).
    table_key
        The table of a SpatialData.
    random_state
        Seed of the sampling of cells and values.

    Returns
    -------
    The status; ``print`` it for a summary, read ``stats`` for the figures measured.

    Examples
    --------
    >>> import spatialcx as scx
    >>> status = scx.pp.normalization_status(adata)  # doctest: +SKIP
    >>> status.raw_source, status.x_state  # doctest: +SKIP
    ("X", "raw")
    """
    adata = _as_anndata(data, table_key)
    status, _ = _inspect(adata, random_state)
    return status


def _unusable_message(status: NormalizationStatus, *, target_sum: float = TARGET_SUM) -> str:
    """What was found, why it cannot be used and how to fix it."""
    checked = status.stats.get("checked", {})
    found = []
    for where in RAW_SEARCH_ORDER:
        if where in checked:
            s = checked[where]
            found.append(f"{where} is {s['state']!r} ({s.get('reason', '')})")
    absent = [w for w in RAW_SEARCH_ORDER if w not in checked]
    x = checked.get("X", {})
    figures = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in x.items()
        if k in ("integer_fraction", "min", "max", "row_sum_median", "expm1_row_sum_median", "n_values_checked")
    )
    hints = {
        "linear": (
            "If X holds counts scaled per cell (sc.pp.normalize_total without sc.pp.log1p, CPM, counts divided by "
            f"cell volume; its sampled rows sum to a median of {x.get('row_sum_median', float('nan')):,.6g}), "
            "sc.pp.normalize_total(adata, target_sum=1e4) then sc.pp.log1p(adata) make exactly the log1p(10k) data "
            "expected. "
        ),
        "log1p_cpm": (
            "X is log1p of CPM: scx.pp.ensure_normalized(adata) rescales it exactly to log1p(10k) "
            "(X = log1p(expm1(X) / 100)), or provide the counts. "
        ),
        "log1p_other": (
            f"X is log1p of counts normalized to {x_nominal:,.1f} per cell (sc.pp.normalize_total without target_sum "
            "scales every cell to the median total): scx.pp.ensure_normalized(adata) rescales it exactly to "
            "log1p(10k), or provide the counts. "
            if (x_nominal := _log1p_nominal_target(x)) is not None
            else "X looks like log1p of data normalized to a median of "
            f"{status.x_target_sum or float('nan'):,.0f} counts per cell (or of unnormalized counts, in which case "
            "np.rint(np.expm1(X)) gives the counts back, or of a gene subset of log1p(10k) data, e.g. highly "
            "variable genes, whose row sums are smaller: give the counts, or X before it was subset). "
        ),
        "negative": "X has negative values, e.g. after sc.pp.scale or as residuals; only the counts can help. ",
        "unknown": "X holds no usable values. ",
    }
    base = status.stats.get("log1p_base")
    base_hint = (
        f"uns['log1p'] says base={base:g}: X is log{base:g}(1 + x), and the model expects the natural log; "
        f"np.expm1(X * np.log({base:g})) gives the normalized values back (or provide the counts). "
        if base is not None
        else ""
    )
    raw_nominal = _log1p_nominal_target(checked.get("raw.X", {}))
    raw_hint = (
        "raw.X holds log1p of "
        + ("CPM" if raw_nominal == CPM else f"counts normalized to {raw_nominal:,.1f} per cell")
        + ": scx.pp.ensure_normalized(adata) sets X to it, rescaled exactly to log1p(10k), for X's genes. "
        if raw_nominal is not None and raw_nominal != TARGET_SUM and _log1p_nominal_target(x) is None
        else ""
    )
    return (
        f"No usable expression matrix: no raw counts among {', '.join(RAW_SEARCH_ORDER)}, and X is not "
        f"log1p of counts normalized to {target_sum:,.0f} per cell. "
        f"Found: {'; '.join(found)}"
        + (f"; absent: {', '.join(absent)}" if absent else "")
        + f". X figures from {status.stats.get('n_rows_sampled', 0)} sampled cells: {figures or 'none'}. "
        "Why: cell-type models expect log1p(normalize_total(counts, target_sum=1e4)), which cannot be derived "
        f"from X in state {status.x_state!r} ({_STATE_TEXT.get(status.x_state, '')}). "
        f"{base_hint}{hints.get(status.x_state, '')}{raw_hint}"
        "How to fix: put the raw integer counts in adata.layers['counts'] (same cells and genes as X), "
        "or set X to sc.pp.log1p(sc.pp.normalize_total(counts, target_sum=1e4)); "
        "or, for scx.tl.predict and scx.pp.ensure_normalized only, pass unsafe_force=True to use X as it is (results "
        "may be wrong)."
    )


def _force_warning(status: NormalizationStatus, what: str) -> None:
    logger.warning(
        "UNSAFE (unsafe_force=True): %s although it is not verified log1p(10k) data and no raw counts were found "
        "(X state %r: %s). Cell types predicted from it may be wrong. Put the raw counts in adata.layers['counts'] "
        "to fix this.",
        what,
        status.x_state,
        status.stats.get("checked", {}).get("X", {}).get("reason", ""),
    )


def find_expression_source(adata: AnnData, *, unsafe_force: bool = False, random_state: int = 0) -> ExpressionSource:
    """The matrix to compute log1p(10k) expression from.

    In this order: the raw counts (see :func:`normalization_status`); ``X`` when it is verified log1p(10k); ``raw.X``
    when it is verified log1p(10k) (scanpy's layout, with ``X`` scaled or a gene subset; CellTypist reads it too).

    Parameters
    ----------
    adata
        The table (in memory, backed or lazy).
    unsafe_force
        Use ``X`` as log1p(10k) data when neither raw counts nor verified log1p(10k) ``X`` are found, with a
        warning instead of an error.
    random_state
        Seed of the sampling.

    Returns
    -------
    The source; its ``matrix`` is the table's own (not copied, not loaded).

    Raises
    ------
    ValueError
        When the table has no cells or no genes, or nothing usable is found and ``unsafe_force`` is false; the
        message says what was found and how to fix it.
    """
    raw_genes = adata.raw.n_vars if adata.raw is not None else 0  # X may hold none of them (read_reference(genes=))
    if adata.n_obs == 0 or (adata.n_vars == 0 and raw_genes == 0):
        raise ValueError(
            f"The table has {adata.n_obs} cells x {adata.n_vars} genes: there is no expression to use. Was it subset "
            "to nothing (e.g. a filter or a category that matched no cell)?"
        )
    status, matrices = _inspect(adata, random_state)
    if status.raw_source is not None:
        matrix, names = matrices[status.raw_source]
        return ExpressionSource(matrix, pd.Index(names), "counts", status.raw_source, status)
    x = status.stats["checked"]["X"]
    if _log1p_normalized_to(x) or x.get("verified_in_file"):  # the latter: a gene subset (read_reference(genes=))
        return ExpressionSource(adata.X, pd.Index(adata.var_names), "log1p", "X", status)
    if _raw_log1p_at(status):  # scanpy's layout: log1p in raw, X scaled or a gene subset (CellTypist reads raw too)
        matrix, names = matrices["raw.X"]
        return ExpressionSource(matrix, pd.Index(names), "log1p", "raw.X", status)
    if not unsafe_force or adata.X is None:
        raise ValueError(_unusable_message(status))
    _force_warning(status, "using X as log1p(10k) expression")
    return ExpressionSource(adata.X, pd.Index(adata.var_names), "log1p", "X", status)


# --------------------------------------------------------------------------------------------------------------------
# normalization


def _log1p_normalized(counts: Any, target_sum: float) -> Any:
    """``log1p(normalize_total(counts, target_sum))`` through scanpy, as a new matrix (the input is not touched).

    Counts held in a float type narrower than float32 (float16: at most 65,504) are computed in float32: their cell
    totals and, with ``target_sum=1e6``, their normalized values would overflow to ``inf``.
    """
    import scanpy as sc

    dtype = np.dtype(getattr(counts, "dtype", np.float32))
    if dtype.kind == "f" and dtype.itemsize < 4:
        counts = counts.astype(np.float32)  # a new matrix (lazy for dask); the counts themselves are not touched
    tmp = AnnData(X=counts)
    x = sc.pp.normalize_total(tmp, target_sum=target_sum, inplace=False)["X"]
    out = AnnData(X=x)
    sc.pp.log1p(out)
    return out.X


def _columns_of_x_in_raw(adata: AnnData, raw_names: pd.Index, what: str) -> np.ndarray | None:
    """Positions of X's genes in ``raw.var_names`` (``None``: all of raw, in order); a ValueError when some lack."""
    pos = pd.Index(raw_names).get_indexer(adata.var_names)
    if (pos < 0).any():
        raise ValueError(
            f"raw.X holds {what}, but {(pos < 0).sum()} of X's genes are not in raw.var_names (e.g. "
            f"{list(adata.var_names[pos < 0][:10])}), so X cannot be computed from it. Put counts for X's genes in "
            "adata.layers['counts'] instead."
        )
    return None if pos.size == len(raw_names) and (pos == np.arange(pos.size)).all() else pos


def _check_counts_values(counts: Any, where: str, obs_names: pd.Index, var_names: pd.Index) -> None:
    """A ValueError when in-memory counts hold NaN, infinite or negative values anywhere (not only in the sample).

    The detection reads a sample of cells; one bad value in another cell would make that cell's whole row NaN (or
    negative) in the normalized ``X``. Dask and backed matrices are not read here (prediction checks every block it
    reads).
    """
    values = counts.data if sparse.issparse(counts) else counts
    if not isinstance(values, np.ndarray) or values.size == 0 or values.dtype.kind == "u":
        return
    lo, hi = values.min(), values.max()
    if lo >= 0 and hi < np.inf:  # NaN fails both
        return
    if sparse.issparse(counts):
        rows, cols, vals = sparse.find(counts)
    else:
        rows, cols = np.nonzero(~(values >= 0) | ~(values < np.inf))
        vals = values[rows, cols]
    bad = ~(vals >= 0) | ~(vals < np.inf)
    rows, cols, vals = rows[bad], cols[bad], vals[bad]
    first = int(np.lexsort((cols, rows))[0])
    n_cells = np.unique(rows).size
    raise ValueError(
        f"The raw counts in {where} hold {bad.sum():,} values that are not finite and non-negative, in {n_cells:,} "
        f"cell(s) (e.g. {vals[first].item()} for cell {obs_names[rows[first]]!r}, gene {var_names[cols[first]]!r}). "
        "Normalizing would turn those cells into NaN or negative rows of X: counts must be finite and >= 0. Correct "
        "those values (e.g. NaN to 0 with np.nan_to_num; anndata.concat(join='outer') fills missing genes of dense "
        "matrices with NaN) or drop the cells that hold them, then call again."
    )


def _near(a: Any, b: Any) -> np.ndarray:
    """``|a - b| < max(INTEGER_TOL, INTEGER_RTOL * |b|)`` (equal but for float32 rounding), elementwise."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) < np.maximum(INTEGER_TOL, INTEGER_RTOL * np.abs(b))


#: Rows compared at a time when ``X``'s counts are checked against the raw source (bounds memory).
_COMPARE_BLOCK_ROWS = 100_000


def _check_x_counts_kept(adata: AnnData, counts: Any, cols: np.ndarray | None, where: str, random_state: int) -> None:
    """A ValueError when ``X`` holds counts other than those in ``where``, which are about to replace them.

    ``X`` is normalized from the first raw source (e.g. ``layers["counts"]``); when ``X`` holds counts of its own
    (ambient-corrected counts next to the original ones, say) they would be lost. In-memory matrices are compared
    whole, block by block; dask and backed ones on the sampled cells only. Values equal within the integer test's
    tolerance (float32 rounding) count as equal.
    """
    x = adata.X
    n_obs = adata.n_obs
    in_memory = all(isinstance(m, np.ndarray) or sparse.issparse(m) for m in (x, counts))
    if in_memory:
        blocks = (np.arange(s, min(s + _COMPARE_BLOCK_ROWS, n_obs)) for s in range(0, n_obs, _COMPARE_BLOCK_ROWS))
    else:
        chunks = x.chunks[0] if hasattr(x, "chunks") and hasattr(x, "compute") else None
        blocks = iter([_sample_row_indices(n_obs, max(adata.n_vars, counts.shape[1]), random_state, chunks)])
    for rows in blocks:
        if in_memory:  # a block of rows, as it is stored
            mine, theirs = x[rows[0] : rows[-1] + 1], counts[rows[0] : rows[-1] + 1]
        else:
            mine, theirs = _read_sampled_rows(x, rows), _read_sampled_rows(counts, rows)
        theirs = theirs if cols is None else theirs[:, cols]
        if sparse.issparse(mine) != sparse.issparse(theirs):
            mine, theirs = sparse.csr_matrix(mine), sparse.csr_matrix(theirs)
        differ = mine != theirs  # exact first (cheap), then the tolerance on those values only
        found = differ.nonzero()
        if found[0].size:
            a = np.asarray(mine[found]).ravel() if sparse.issparse(mine) else mine[found]
            b = np.asarray(theirs[found]).ravel() if sparse.issparse(theirs) else theirs[found]
            keep = ~_near(a, b)
            found = (found[0][keep], found[1][keep])
        if found[0].size == 0:
            continue
        r, c = int(found[0][0]), int(found[1][0])
        move = (
            "adata.raw = None"
            if where == "raw.X"
            else f"adata.layers['{where[8:-2]}_old'] = adata.layers.pop('{where[8:-2]}')"
        )
        raise ValueError(
            f"X holds raw counts of its own that differ from the raw counts in {where} (e.g. cell "
            f"{adata.obs_names[rows[r]]!r}, gene {adata.var_names[c]!r}: {mine[r, c]:g} in X, {theirs[r, c]:g} in "
            f"{where}{'' if in_memory else ', among the sampled cells'}). X would be normalized from {where}, the "
            "first raw source found, and its own counts would be lost. Keep them under another name first (e.g. "
            f"adata.layers['counts_x'] = adata.X.copy()), or, if X's counts are the ones to use, move {where} out of "
            f"the way ({move}), then call again."
        )


def _check_x_replaceable(adata: AnnData) -> None:
    if adata.isbacked:
        raise ValueError(
            f"The table is backed by {adata.filename} (read with backed mode), so X cannot be replaced. "
            "Load it into memory first (adata = adata.to_memory()) or pass copy=True."
        )


def ensure_normalized(
    data: AnnData | SpatialData,
    *,
    target_sum: float = TARGET_SUM,
    unsafe_force: bool = False,
    copy: bool = False,
    table_key: str = "table",
    random_state: int = 0,
) -> AnnData | SpatialData | None:
    """Make ``X`` log1p of counts normalized to ``target_sum`` per cell, from the raw counts when they exist.

    What happens depends on :func:`normalization_status`:

    - raw counts found: ``X`` becomes ``log1p(normalize_total(counts, target_sum))`` (scanpy; sparse stays
      sparse, dask stays lazy; float16 counts are computed in float32, which their totals would overflow). When the
      counts are in ``X`` they are first kept in ``layers["counts"]``. When they are in ``raw.X``, cells are
      normalized over all of ``raw``'s genes and ``X``'s genes are kept. When ``X`` holds counts that differ from
      those of the raw source (e.g. ambient-corrected counts in ``X``, the original ones in ``layers["counts"]``):
      a ValueError, since they would be lost.
    - no raw counts, ``X`` already log1p data whose median ``expm1`` row sum is within 20 % of ``target_sum``
      (``"log1p_10k"`` for the default), or a gene subset of such data verified in its file by
      :func:`spatialcx.io.read_reference`: ``X`` is left as it is.
    - no raw counts, ``X`` not such data but ``raw.X`` is (scanpy's layout: log1p data frozen in ``raw``, then ``X``
      scaled or subset to highly variable genes): ``X`` becomes ``raw.X`` for ``X``'s genes.
    - no raw counts, ``X`` log1p of counts normalized to 10,000 or to 1,000,000 (CPM) per cell, or to any one total
      per cell (``sc.pp.normalize_total`` without ``target_sum``: the median total), but not to ``target_sum``: ``X``
      becomes ``log1p(expm1(X) * target_sum / 1e4)`` (or ``/ 1e6``, or ``/`` that total), exactly the log1p of the
      counts normalized to ``target_sum`` (sparse stays sparse, dask stays lazy). The same from ``raw.X`` (for ``X``'s
      genes) when ``X`` is neither.
    - otherwise: a ValueError saying what was found and how to fix it, or, with ``unsafe_force=True``, ``X`` is
      left as it is with a prominent warning.

    ``uns["log1p"]`` is set as scanpy does (``{"base": None}``) whenever ``X`` is (or is accepted as) log1p data; a
    ``base`` recorded there is reset, with a warning, when ``X`` is verified (or made) the natural log1p.
    Raw counts are never overwritten. With a SpatialData object the table is changed in memory only (``X`` is not
    written back into a zarr store).

    Parameters
    ----------
    data
        The spatial data or its table.
    target_sum
        Counts per cell after normalization.
    unsafe_force
        Accept ``X`` as it is when it cannot be verified, with a warning instead of an error.
    copy
        Return a changed copy instead of changing ``data``.
    table_key
        The table of a SpatialData.
    random_state
        Seed of the sampling used for the detection.

    Returns
    -------
    A copy when ``copy=True``, else ``None``.

    Raises
    ------
    ValueError
        No raw counts and ``X`` not normalized as asked (unless ``unsafe_force``); the counts are in ``X`` but
        ``layers["counts"]`` holds something else; ``X`` holds counts that differ from the raw source's (compared
        whole when both are in memory, on the sampled cells otherwise); ``raw`` lacks some of ``X``'s genes; a
        backed table would need a new ``X``; in-memory raw counts hold NaN, infinite or negative values (in any
        cell, not only the sampled ones).
    """
    if not (np.isfinite(target_sum) and target_sum > 0):
        raise ValueError(f"target_sum must be a positive number, got {target_sum!r}.")
    ref = None
    if isinstance(data, AnnData):
        adata = data
        if copy:
            adata = adata.to_memory() if adata.isbacked else adata.copy()
    else:
        from spatialcx._table import resolve_table

        ref = resolve_table(data, table_key, copy=copy)  # X changes in memory only: nothing is written
        adata = ref.adata

    status, matrices = _inspect(adata, random_state)
    x_checked = status.stats["checked"]["X"]
    x_at_target = _log1p_normalized_to(x_checked, target_sum) or _x_log1p_in_file(adata, x_checked, target_sum)

    new_x = None
    keep_counts = False
    if status.raw_source is not None:
        counts, names = matrices[status.raw_source]
        if status.raw_source == "X" and "counts" in adata.layers:
            c = status.stats["checked"].get("layers['counts']", {})
            raise ValueError(
                f"The raw counts are in X, but layers['counts'] already holds other data (state {c.get('state')!r}: "
                f"{c.get('reason', '')}). Normalizing X would lose the counts, and layers['counts'] is never "
                "overwritten. Rename or delete layers['counts'] (e.g. adata.layers['old'] = "
                "adata.layers.pop('counts')) and call again."
            )
        cols = _columns_of_x_in_raw(adata, names, "the raw counts") if status.raw_source == "raw.X" else None
        _check_x_replaceable(adata)
        _check_counts_values(counts, status.raw_source, adata.obs_names, pd.Index(names))
        if status.raw_source != "X" and status.x_state == "raw":
            _check_x_counts_kept(adata, counts, cols, status.raw_source, random_state)
        logger.info(f"normalizing the raw counts in {status.raw_source} to log1p({target_sum:g}) in X")
        new_x = _log1p_normalized(counts, target_sum)
        if cols is not None:
            new_x = new_x[:, cols]
        keep_counts = status.raw_source == "X"
    elif x_at_target:
        if x_checked.get("expm1_row_sum_median") is not None and _log1p_normalized_to(x_checked, target_sum):
            logger.info(f"X is already log1p data normalized to ~{status.x_target_sum:,.0f} per cell; left as is")
        else:
            logger.info(f"X is a gene subset of log1p({target_sum:g}) data (verified in its file); left as is")
    elif _raw_log1p_at(status, target_sum):
        logged, names = matrices["raw.X"]
        cols = _columns_of_x_in_raw(adata, names, f"log1p data normalized to ~{target_sum:g} per cell")
        _check_x_replaceable(adata)
        logger.info(f"X ({status.x_state}) is replaced by the log1p({target_sum:g}) data of raw.X for X's genes")
        new_x = logged.copy() if cols is None else logged[:, cols]
    elif (nominal := _log1p_nominal_target(x_checked)) is not None:
        _check_x_replaceable(adata)
        logger.info(f"X is log1p of counts normalized to {nominal:g} per cell: rescaled to log1p({target_sum:g})")
        new_x = _log1p_rescaled(adata.X, target_sum / nominal)
    elif (nominal := _log1p_nominal_target(status.stats["checked"].get("raw.X", {}))) is not None:
        logged, names = matrices["raw.X"]
        cols = _columns_of_x_in_raw(adata, names, f"log1p data normalized to {nominal:g} per cell")
        _check_x_replaceable(adata)
        logger.info(
            f"X ({status.x_state}) is replaced by raw.X's log1p({nominal:g}) data for X's genes, rescaled to "
            f"log1p({target_sum:g})"
        )
        new_x = _log1p_rescaled(logged if cols is None else logged[:, cols], target_sum / nominal)
    elif unsafe_force:
        _force_warning(status, "leaving X as it is")
    else:
        raise ValueError(_unusable_message(status, target_sum=target_sum))

    # everything is validated and computed: assign
    if keep_counts:
        adata.layers["counts"] = adata.X
    if new_x is not None:
        adata.X = new_x
    if new_x is not None or x_at_target or ("log1p" not in adata.uns and status.x_state.startswith("log1p")):
        # here X is natural log1p, or uns has no "log1p" entry at all
        old_uns = adata.uns.get("log1p")
        if isinstance(old_uns, Mapping) and old_uns.get("base") is not None:
            logger.warning(
                "uns['log1p'] said base=%r, but X is (now) the natural log1p of normalized counts; it is set to "
                "{'base': None} so that scanpy's expm1 (rank_genes_groups, highly_variable_genes) undoes it right.",
                old_uns.get("base"),
            )
        adata.uns["log1p"] = {"base": None}
    if ref is not None:
        return ref.finish(write=False)
    return adata if copy else None
