"""Balanced subsampling of references ("Cap & Fill") and target cell-type proportions."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import SOURCE_KEY
from .._settings import logger
from .._utils import label_text, whole_number

if TYPE_CHECKING:
    from anndata import AnnData

SourceBalance = Literal["proportional", "equal"]
TargetProportions = Mapping[str, float] | pd.Series | pd.DataFrame | str | os.PathLike | None
_TOL = 1e-6
#: Key in ``.uns`` of the output of :func:`subsample_balanced` (parameters and the allocation table).
BALANCE_UNS_KEY = "spatialcx_balance"
#: Key in ``.uns`` holding the provenance of the references (written by :func:`spatialcx.pp.combine_references`).
REFERENCES_UNS_KEY = "spatialcx_references"


# --------------------------------------------------------------------------------------------------------------------
# Pure allocation arithmetic
# --------------------------------------------------------------------------------------------------------------------
def _fill(weights: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: float) -> np.ndarray:
    """Real-valued x with ``x_i = clip(lam * w_i, lower_i, upper_i)`` and ``sum(x) == total`` (water filling).

    ``total`` is clipped to ``[sum(lower), sum(upper)]``. ``f(lam) = sum(clip(lam * w, lower, upper))`` is
    non-decreasing and piecewise linear, so ``lam`` is found exactly between two breakpoints.
    """
    w = np.asarray(weights, dtype=float)
    lo = np.asarray(lower, dtype=float)
    hi = np.asarray(upper, dtype=float)
    if total <= lo.sum():
        return lo.copy()
    if total >= hi.sum():
        return hi.copy()

    def f(lam: float) -> float:
        return float(np.clip(lam * w, lo, hi).sum())

    pos = w > 0
    breaks = np.unique(np.concatenate([[0.0], lo[pos] / w[pos], hi[pos] / w[pos]]))
    values = np.array([f(b) for b in breaks])
    i = int(np.searchsorted(values, total))  # first breakpoint with f >= total; 0 < i < len(breaks)
    a, b = breaks[i - 1], breaks[i]
    fa, fb = values[i - 1], values[i]
    lam = a + (total - fa) * (b - a) / (fb - fa)
    return np.clip(lam * w, lo, hi)


def _round_to_total(x: np.ndarray, total: int, upper: np.ndarray) -> np.ndarray:
    """Integers that sum to ``total``: floors of ``x`` plus one for the largest remainders (ties: first first)."""
    base = np.floor(np.asarray(x, dtype=float) + 1e-9).astype(np.int64)
    base = np.minimum(base, np.asarray(upper, dtype=np.int64))
    short = int(total - base.sum())
    if short > 0:
        frac = np.asarray(x, dtype=float) - base
        order = np.argsort(-frac, kind="stable")
        order = [i for i in order if base[i] < upper[i]]
        for i in order[:short]:
            base[i] += 1
    return base


def cap_to_total(counts: pd.Series, total: int | None) -> pd.Series:
    """Cells to keep per type so that at most ``total`` are kept, capping the largest types first.

    Finds the cap ``c`` with ``sum(min(n_t, c)) == total`` ("water filling"): rare types are kept whole and the
    abundant ones are cut to the same size. Types are processed in sorted order so ties are deterministic.

    Parameters
    ----------
    counts
        Cells available per type.
    total
        Maximum number of cells kept; ``None`` keeps everything.
    """
    counts = counts.astype(np.int64).sort_index()
    n = counts.to_numpy()
    if total is None or n.sum() <= total:
        return counts.copy()
    total = int(total)
    x = _fill(np.ones(len(n)), np.zeros(len(n)), n, total)
    return pd.Series(_round_to_total(x, total, n), index=counts.index, name=counts.name)


def split_across_sources(
    available: np.ndarray,
    target: int,
    *,
    source_balance: SourceBalance = "proportional",
    min_cells_per_source: int = 50,
) -> np.ndarray:
    """Split one type's ``target`` across sources ("Cap & Fill").

    1. Ideal share per source: ``target * available / sum(available)`` (``"proportional"``) or ``target / S``
       (``"equal"``).
    2. Floor: every source keeps at least ``min(min_cells_per_source, available)`` cells.
    3. Cap: no source gives more than it has.
    4. Fill: the shortfall of capped sources goes to sources with spare cells, in the same proportions.

    Steps 1-4 are solved together: ``x_s = clip(lam * w_s, floor_s, available_s)`` with ``sum(x) == target``, then
    rounded by largest remainders, so the total is exactly ``min(target, sum(available))`` and never more. When the
    floors alone exceed the target, the target is shared equally up to each floor.

    Examples
    --------
    >>> split_across_sources(np.array([30_000, 5_000]), 10_000)
    array([8571, 1429])
    >>> split_across_sources(np.array([30_000, 5_000]), 10_000, source_balance="equal")
    array([5000, 5000])
    >>> split_across_sources(np.array([9_950, 50]), 1_000)
    array([950,  50])
    """
    a = np.asarray(available, dtype=np.int64)
    target = int(min(int(target), int(a.sum())))
    if target <= 0:
        return np.zeros(len(a), dtype=np.int64)
    floors = np.minimum(a, int(min_cells_per_source))
    if floors.sum() >= target:
        x = _fill(np.ones(len(a)), np.zeros(len(a)), floors, target)
    else:
        if source_balance == "proportional":
            w = a.astype(float)
        elif source_balance == "equal":
            w = (a > 0).astype(float)
        else:
            raise ValueError(f"source_balance must be 'proportional' or 'equal', got {source_balance!r}.")
        x = _fill(w, floors, a, target)
    return _round_to_total(x, target, a)


def type_targets(
    available: pd.Series,
    *,
    max_cells_per_type: int | None = 5000,
    min_cells_per_type: int = 50,
    target_proportions: Mapping[str, float] | None = None,
) -> pd.Series:
    """Number of cells wanted per type.

    Without proportions: ``min(available, max_cells_per_type)``. With ``target_proportions`` (validated by
    :func:`resolve_target_proportions`), proportions are resolved against the output size ``N`` the cap alone
    would give (``sum(min(available, max_cells_per_type))``): a named type gets ``round(p * N)`` cells (overriding
    ``max_cells_per_type``, capped by what is available, with a warning when short), and the remaining
    ``N - sum(named)`` is shared by the other types in proportion to their capped sizes, never above them. Finally
    every type not given a proportion of 0 keeps at least ``min(available, min_cells_per_type, max_cells_per_type)``
    cells.
    """
    avail = available.astype(np.int64)
    cap = avail if max_cells_per_type is None else np.minimum(avail, int(max_cells_per_type))
    cap = pd.Series(np.asarray(cap), index=avail.index)
    if not target_proportions:
        targets = cap.copy()
        zero = pd.Series(False, index=avail.index)
    else:
        n_total = int(cap.sum())
        named = [t for t in avail.index if t in target_proportions]
        others = [t for t in avail.index if t not in target_proportions]
        p = np.array([float(target_proportions[t]) for t in named])
        # largest remainders: the named types together get round(sum(p) * N), never more than N
        n_named = min(int(np.floor(p.sum() * n_total + 0.5)), n_total)
        wanted = _round_to_total(p * n_total, n_named, np.full(len(p), n_total, dtype=np.int64))
        targets = pd.Series(0, index=avail.index, dtype=np.int64)
        targets[named] = np.minimum(wanted, avail[named].to_numpy())
        short = [(t, int(w), int(a)) for t, w, a in zip(named, wanted, avail[named]) if w > a]
        if short:
            logger.warning(
                "Target proportions ask for more cells than available for %s; all available cells are used.",
                ", ".join(f"{t!r} ({w} wanted, {a} available)" for t, w, a in short),
            )
        if others:
            rest = max(n_total - int(wanted.sum()), 0)
            up = cap[others].to_numpy()
            x = _fill(up.astype(float), np.zeros(len(up)), up, rest)
            targets[others] = _round_to_total(x, min(rest, int(up.sum())), up)
        zero = pd.Series(False, index=avail.index)
        zero[named] = p <= 0
    least = (
        int(min_cells_per_type) if max_cells_per_type is None else min(int(min_cells_per_type), int(max_cells_per_type))
    )
    floor = np.minimum(avail, least)  # the cap wins over the floor: min_cells_per_type=50 never lifts a cap of 20
    targets = targets.where(zero | (targets >= floor), floor).astype(np.int64)
    if target_proportions:
        _warn_unmet_proportions(targets, target_proportions, cap)
    return targets


def _warn_unmet_proportions(targets: pd.Series, proportions: Mapping[str, float], cap: pd.Series) -> None:
    """Warn when the shares of the named types in the output differ from the proportions asked for.

    This happens when a named type has fewer cells than its share, when the other types cannot take up the rest
    (they are never drawn above ``max_cells_per_type`` or what they have), or when ``min_cells_per_type`` lifts a
    type above its share. Differences within rounding (half a cell) are not reported.
    """
    total = int(targets.sum())
    if total == 0:
        return
    off = []
    for t, p in proportions.items():
        if t not in targets.index:
            continue
        got = int(targets[t])
        if abs(got - p * total) > 0.5 + 1e-9 and abs(got / total - p) > 1e-3:
            off.append(f"{t!r} {got / total:.3g} (asked {p:.3g}, {got} of {total} cells)")
    if not off:
        return
    others = [t for t in targets.index if t not in proportions]
    logger.warning(
        "target_proportions cannot be met with the cells available; shares in the output: %s. Named types get "
        "round(p x N) of N = %d cells (the output size max_cells_per_type alone gives); %s. Lower the proportions, "
        "raise max_cells_per_type, or name every type.",
        "; ".join(off),
        int(cap.sum()),
        (
            f"the other types ({len(others)}) are never drawn above max_cells_per_type or what they have "
            f"({int(cap[others].sum())} cells) and get {int(targets[others].sum())}"
            if others
            else "every type is named"
        ),
    )


def cap_and_fill(
    counts: pd.DataFrame,
    *,
    max_cells_per_type: int | None = 5000,
    min_cells_per_type: int = 50,
    source_balance: SourceBalance = "proportional",
    min_cells_per_source: int = 50,
    target_proportions: TargetProportions = None,
) -> pd.DataFrame:
    """Allocate cells per type and source: the pure arithmetic of :func:`subsample_balanced`.

    Parameters
    ----------
    counts
        Cells available, types (rows) x sources (columns).
    max_cells_per_type
        Cap per type (``None``: no cap).
    min_cells_per_type
        Every type keeps at least ``min(available, min_cells_per_type)`` cells (matters with target proportions);
        never more than ``max_cells_per_type``.
    source_balance
        ``"proportional"`` (each source's share of the type) or ``"equal"`` (same number per source).
    min_cells_per_source
        Floor per source within a type, capped by what the source has.
    target_proportions
        Wanted share of each type in the output: a mapping, a JSON file or a CSV file (see
        :func:`read_target_proportions`).

    Returns
    -------
    Cells to draw, same shape and labels as ``counts``. Row totals are ``type_targets(...)``: never above the cap,
    never above what is available.

    Examples
    --------
    >>> counts = pd.DataFrame({"A": [30_000], "B": [5_000]}, index=["macrophage"])
    >>> cap_and_fill(counts, max_cells_per_type=10_000).loc["macrophage"].tolist()
    [8571, 1429]
    """
    if source_balance not in ("proportional", "equal"):
        raise ValueError(f"source_balance must be 'proportional' or 'equal', got {source_balance!r}.")
    for name, value in (("min_cells_per_type", min_cells_per_type), ("min_cells_per_source", min_cells_per_source)):
        whole_number(value, name, minimum=0)
    if max_cells_per_type is not None:
        whole_number(max_cells_per_type, "max_cells_per_type", minimum=1, none_ok=True)
    counts = counts.fillna(0).astype(np.int64)
    if (counts.to_numpy() < 0).any():
        raise ValueError("counts must be non-negative.")
    proportions = resolve_target_proportions(target_proportions, counts.index)
    targets = type_targets(
        counts.sum(axis=1),
        max_cells_per_type=max_cells_per_type,
        min_cells_per_type=min_cells_per_type,
        target_proportions=proportions,
    )
    out = np.zeros(counts.shape, dtype=np.int64)
    for i, t in enumerate(counts.index):
        out[i] = split_across_sources(
            counts.iloc[i].to_numpy(),
            int(targets[t]),
            source_balance=source_balance,
            min_cells_per_source=min_cells_per_source,
        )
    return pd.DataFrame(out, index=counts.index, columns=counts.columns)


# --------------------------------------------------------------------------------------------------------------------
# Target proportions
# --------------------------------------------------------------------------------------------------------------------
def _table_proportions(table: pd.DataFrame, origin: str) -> dict[Any, Any]:
    """``{cell type: proportion}`` from a table with exactly the columns ``cell_type`` and ``proportion``."""
    if list(table.columns) != ["cell_type", "proportion"]:
        raise ValueError(
            f"target_proportions {origin} has columns {list(table.columns)}; it must have exactly the columns "
            "cell_type,proportion (in this order)."
        )
    dup = table["cell_type"][table["cell_type"].duplicated()].tolist()
    if dup:
        raise ValueError(f"target_proportions {origin} lists {dup} more than once.")
    return dict(zip(table["cell_type"], table["proportion"]))


def read_target_proportions(source: TargetProportions) -> dict[str, float] | None:
    """Read target proportions from a mapping, a table, a JSON file (``{"cell type": proportion}``) or a CSV file.

    A table (:class:`pandas.DataFrame`) or CSV file must have the columns ``cell_type,proportion``. Values must be
    numbers in ``[0, 1]``.
    """
    if source is None:
        return None
    if isinstance(source, pd.Series):
        source = source.to_dict()
    if isinstance(source, pd.DataFrame):
        raw = _table_proportions(source, "table")
        origin = "target_proportions"
    elif isinstance(source, Mapping):
        raw = dict(source)
        origin = "target_proportions"
    elif not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"target_proportions is a {type(source).__name__}; give a dict {{cell type: proportion}}, a pandas Series "
            "or DataFrame (columns cell_type, proportion), or the path of a .json or .csv file."
        )
    else:
        path = Path(source).expanduser()
        origin = str(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"target_proportions file {origin!r} does not exist. Give a dict, a .json file mapping cell types to "
                "proportions, or a .csv file with columns cell_type,proportion."
            )
        suffix = path.suffix.lower()
        if suffix == ".json":
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"target_proportions file {origin!r} is not valid JSON: {e}.") from e
            if not isinstance(raw, dict):
                raise ValueError(
                    f"target_proportions file {origin!r} holds a {type(raw).__name__}; it must hold one JSON object "
                    'mapping cell types to proportions, e.g. {"T cell": 0.2}.'
                )
        elif suffix == ".csv":
            # cell types are read as written: "NA", "None" or "null" is a label here, not a missing value
            table = pd.read_csv(path, dtype={"cell_type": str}, keep_default_na=False)
            raw = _table_proportions(table, f"file {origin!r}")
        else:
            raise ValueError(
                f"target_proportions file {origin!r} must end in .json or .csv (got {suffix or 'no suffix'!r})."
            )
    out: dict[str, float] = {}
    for key, value in raw.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Proportion of {key!r} in {origin} is {value!r}, not a number.") from None
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"Proportion of {key!r} in {origin} is {v}; proportions must be between 0 and 1.")
        out[str(key)] = v
    return out


def resolve_target_proportions(source: TargetProportions, types: pd.Index | list[str]) -> dict[str, float] | None:
    """Read and validate target proportions against the types present.

    Rules: every named type must be present; proportions sum to at most 1; when they sum to 1 every type must be
    named (the others would get no cells); when every type is named they must sum to 1 (the rest would have nowhere
    to go).
    """
    props = read_target_proportions(source)
    if props is None:
        return None
    present = [str(t) for t in types]
    unknown = [t for t in props if t not in set(present)]
    if unknown:
        raise ValueError(
            f"target_proportions names {unknown}, which are not among the cell types present ({present}). Use the "
            "labels exactly as they appear (or the group_by values when group_by is set)."
        )
    total = sum(props.values())
    if total > 1 + _TOL:
        raise ValueError(f"target_proportions sum to {total:.6g}; they must sum to at most 1.")
    missing = [t for t in present if t not in props]
    if missing and total >= 1 - _TOL:
        raise ValueError(
            f"target_proportions sum to 1 but leave out {missing}, which would get no cells. Name every type when "
            "the proportions sum to 1, or make them sum to less than 1 so the others share the rest."
        )
    if not missing and total < 1 - _TOL:
        raise ValueError(
            f"target_proportions name every cell type but sum to {total:.6g}; when every type is named they must "
            "sum to 1."
        )
    return props


# --------------------------------------------------------------------------------------------------------------------
# AnnData layer
# --------------------------------------------------------------------------------------------------------------------
def subsample_balanced(
    adata: AnnData,
    label_key: str,
    *,
    max_cells_per_type: int | None = 5000,
    min_cells_per_type: int = 50,
    source_key: str | None = SOURCE_KEY,
    source_balance: SourceBalance = "proportional",
    min_cells_per_source: int = 50,
    group_by: str | None = None,
    target_proportions: TargetProportions = None,
    random_state: int | np.random.Generator | None = 0,
) -> AnnData:
    """Subsample a (combined) reference so that cell types and sources are balanced ("Cap & Fill").

    Per cell type (or per ``group_by`` value) at most ``max_cells_per_type`` cells are drawn, split across the
    sources in ``obs[source_key]``: ``"proportional"`` (each source gives its share
    of the type) or ``"equal"``, at least ``min_cells_per_source`` per source (capped by what it has), never more
    than a source has, the shortfall going to sources with spare cells. Totals never exceed the cap. Within a type
    and source, cells are drawn uniformly at random without replacement, from the cells ordered by name: the same
    cells in another order (e.g. references combined the other way round) give the same draw (when names repeat,
    the draw follows the order of the cells).

    Worked example: macrophages 30,000 (source A) + 5,000 (source B), cap 10,000 -> 8,571 + 1,429
    (``"proportional"``) or 5,000 + 5,000 (``"equal"``).

    Parameters
    ----------
    adata
        The reference, e.g. the output of :func:`spatialcx.pp.combine_references`. Not modified.
    label_key
        obs column with the cell-type labels.
    max_cells_per_type
        Cap per type or group (``None``: no cap).
    min_cells_per_type
        Every type keeps at least ``min(available, min_cells_per_type)`` cells (never more than
        ``max_cells_per_type``); matters when target proportions give a type only a few cells. Types are never
        dropped here (see ``combine_references``).
    source_key
        obs column naming each cell's source; ``None``, or the default column when absent (a reference that did not
        come from ``combine_references``), makes all cells one source. Another column that is absent is a KeyError.
        Every cell needs a source: missing values raise an error rather than forming a source of their own.
    source_balance
        ``"proportional"`` or ``"equal"``.
    min_cells_per_source
        Floor per source within a type.
    group_by
        obs column that defines the groups to balance instead of ``label_key``, e.g.
        ``"cell_type_ontology_term_id"`` so that "CD4+ T cells" and "CD4-positive, alpha-beta T cell" from two
        references form one group. Cells with no value there are grouped by their label.
    target_proportions
        Wanted share of each type (or group) in the output: a dict, a JSON file, or a table (DataFrame or CSV
        file) with the columns ``cell_type,proportion``. Resolved against the output size the cap alone gives;
        named types override the cap; the others share the rest. Names must exist; proportions sum to at most 1 (to
        exactly 1 when all types are named, and all types must be named when they sum to 1). When the cells
        available cannot give the shares asked for (a named type has too few cells, or the other types cannot take
        up the rest), a warning gives the shares obtained.
    random_state
        Seed of the draw.

    Returns
    -------
    A new AnnData (a subset copy; ``adata`` is unchanged) holding the drawn cells in their original order. A backed
    (``backed="r"``) or lazy (:func:`anndata.experimental.read_lazy`) ``adata`` gives an in-memory AnnData: only the
    drawn cells are read.
    ``uns["spatialcx_balance"]`` records the parameters and the allocation table (``groups`` x ``sources``:
    ``available`` and ``drawn``); each entry of ``uns["spatialcx_references"]`` (a dict keyed by source name, as
    written by :func:`~spatialcx.pp.combine_references`) gets ``cells_used``: ``cell_types`` and ``n_cells``, the
    cells drawn per ``label_key`` value. The reference of each cell is read from ``obs[source_key]``, or from
    ``obs["reference_source"]`` when ``source_key`` is ``None`` or groups the cells otherwise (its values are not
    the references' names).
    """
    from .._table import obs_column

    columns = list(adata.obs.columns)
    for key, what in ((label_key, "label_key"), (group_by, "group_by")):
        if key is not None and key not in columns:
            raise KeyError(f"{what} {key!r} is not an obs column; available: {columns}.")
    if source_key is not None and source_key != SOURCE_KEY and source_key not in columns:
        # a misspelt column would otherwise turn the sources into one, and balance nothing across them
        raise KeyError(
            f"source_key {source_key!r} is not an obs column; available: {columns}. Pass source_key=None to treat "
            "all cells as one source."
        )
    if source_balance not in ("proportional", "equal"):
        raise ValueError(f"source_balance must be 'proportional' or 'equal', got {source_balance!r}.")
    obs_names = pd.Index(np.asarray(adata.obs_names))
    labels = obs_column(adata, label_key).set_axis(obs_names)
    if labels.isna().any():
        raise ValueError(
            f"{int(labels.isna().sum())} cells have no label in obs[{label_key!r}]. Drop them or give them a label "
            "first (combine_references does this)."
        )
    labels = pd.Series(label_text(labels), index=obs_names)  # float cluster ids 3.0 read "3", as in training
    if group_by is None:
        groups = labels
    else:
        raw = obs_column(adata, group_by).set_axis(obs_names)
        groups = pd.Series(label_text(raw), index=obs_names).where(raw.notna(), labels)
    if source_key in columns:
        raw_sources = obs_column(adata, source_key).set_axis(obs_names)
        if raw_sources.isna().any():
            raise ValueError(
                f"{int(raw_sources.isna().sum())} cells have no source in obs[{source_key!r}]. Give them one (e.g. "
                f"obs[{source_key!r}] = obs[{source_key!r}].cat.add_categories('other').fillna('other')), or pass "
                "source_key=None to treat all cells as one source."
            )
        sources = raw_sources.astype(str)
    else:
        logger.info("obs[%r] not found: all cells are treated as one source.", source_key)
        sources = pd.Series("all", index=obs_names)

    g_codes, g_names = pd.factorize(groups, sort=True)
    s_codes, s_names = pd.factorize(sources, sort=True)
    counts = pd.DataFrame(
        np.zeros((len(g_names), len(s_names)), dtype=np.int64), index=pd.Index(g_names), columns=pd.Index(s_names)
    )
    np.add.at(counts.values, (g_codes, s_codes), 1)
    props = read_target_proportions(target_proportions) or {}
    if group_by is None:
        _check_not_removed(props, set(g_names), adata.uns.get("spatialcx_combine"))
    alloc = cap_and_fill(
        counts,
        max_cells_per_type=max_cells_per_type,
        min_cells_per_type=min_cells_per_type,
        source_balance=source_balance,
        min_cells_per_source=min_cells_per_source,
        target_proportions=props or None,
    )

    rng = np.random.default_rng(random_state)
    cell_key = g_codes.astype(np.int64) * len(s_names) + s_codes
    # within a group and source, cells are ordered by (a fixed hash of) their name before drawing, so that the same
    # cells in another order (references combined the other way round, a sorted table) give the same draw; by
    # position when names repeat. The hash gives each name a fixed number, so the order depends on the names alone.
    if obs_names.is_unique:
        name_key = pd.util.hash_array(obs_names.to_numpy(dtype=object, copy=False))
        order = np.lexsort((name_key, cell_key))
    else:
        order = np.argsort(cell_key, kind="stable")
    bounds = np.searchsorted(cell_key[order], np.arange(len(g_names) * len(s_names) + 1))
    keep: list[np.ndarray] = []
    a = alloc.to_numpy()
    for gi in range(len(g_names)):
        for si in range(len(s_names)):
            k = int(a[gi, si])
            if k == 0:
                continue
            j = gi * len(s_names) + si
            members = order[bounds[j] : bounds[j + 1]]
            keep.append(members if k >= len(members) else rng.choice(members, size=k, replace=False))
    idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)

    if not isinstance(adata.obs, pd.DataFrame):  # lazy: read only the drawn cells, straight from disk where it can
        from ..io._reference import lazy_subset

        out = lazy_subset(adata, idx).to_memory()
    elif adata.isbacked:  # backed: read only the drawn cells
        out = _backed_rows(adata, idx)
    else:
        out = adata[idx].copy()
    for col in {label_key, group_by, source_key} - {None}:
        if col in out.obs.columns and isinstance(out.obs[col].dtype, pd.CategoricalDtype):
            out.obs[col] = out.obs[col].cat.remove_unused_categories()

    out.uns[BALANCE_UNS_KEY] = {
        "label_key": label_key,
        "group_by": group_by or "",
        "source_key": source_key,
        "source_balance": source_balance,
        "max_cells_per_type": -1 if max_cells_per_type is None else int(max_cells_per_type),
        "min_cells_per_type": int(min_cells_per_type),
        "min_cells_per_source": int(min_cells_per_source),
        "target_proportions": {"cell_types": list(props), "proportions": [float(v) for v in props.values()]},
        "random_state": int(random_state) if isinstance(random_state, int | np.integer) else -1,
        "groups": [str(g) for g in g_names],
        "sources": [str(s) for s in s_names],
        "available": counts.to_numpy(),
        "drawn": a,
        "n_cells": int(len(idx)),
    }
    refs = out.uns.get(REFERENCES_UNS_KEY)
    if isinstance(refs, Mapping):
        out.uns[REFERENCES_UNS_KEY] = _cells_used(adata, refs, labels, idx, sources, source_key, obs_names)
    logger.info(
        "Balanced subsample: %d of %d cells, %d groups, %d sources.", len(idx), adata.n_obs, len(g_names), len(s_names)
    )
    return out


def _check_not_removed(props: Mapping[str, float], present: set[str], combine: Any) -> None:
    """Raise a ValueError when target proportions name types that :func:`combine_references` removed as too small."""
    removed = combine.get("removed_types") if isinstance(combine, Mapping) else None
    if removed is None:
        return
    gone = [t for t in props if t not in present and t in {str(r) for r in removed}]
    if gone:
        raise ValueError(
            f"target_proportions names {gone}, which combine_references removed: fewer than "
            f"min_cells_per_type={combine.get('min_cells_per_type')} cells across the references. Leave them out of "
            "target_proportions, or combine with a lower min_cells_per_type (or filter_min_cells=False) to keep them."
        )


def _backed_rows(adata: AnnData, idx: np.ndarray) -> AnnData:
    """``adata[idx]`` of a backed AnnData in memory, reading only those cells, also when ``adata`` is a view.

    anndata cannot index a view of a backed AnnData again ("cannot make a view of a view"): the view's parent is
    indexed with the view's own rows and genes instead.
    """
    if not adata.is_view:
        return adata[idx].to_memory()
    parent = adata._adata_ref
    rows = np.arange(parent.n_obs)[adata._oidx][idx]
    return parent[rows, adata._vidx].to_memory()


def _cells_used(
    adata: AnnData,
    refs: Mapping[str, Mapping],
    labels: pd.Series,
    idx: np.ndarray,
    sources: pd.Series,
    source_key: str | None,
    obs_names: pd.Index,
) -> dict[str, Any]:
    """The provenance entries with ``cells_used``: the cells drawn from each reference, per label.

    The reference of each cell is read from ``obs[source_key]``, or from the column ``combine_references`` wrote
    (``reference_source``) when ``source_key`` is ``None`` or names another grouping (e.g. donors): the column whose
    values are the entries' names. When no column names the references, ``cells_used`` is left out rather than
    written as zero cells.
    """
    from .._table import obs_column

    names = {str(entry.get("name", key)) if isinstance(entry, Mapping) else str(key) for key, entry in refs.items()}
    column = None
    columns = list(adata.obs.columns)
    for key in dict.fromkeys(k for k in (source_key, SOURCE_KEY) if k is not None and k in columns):
        values = sources if key == source_key else obs_column(adata, key).set_axis(obs_names)
        if values.notna().all() and {str(v) for v in pd.unique(values)} <= names:
            column = values.astype(str)
            break
    if column is None:
        logger.info("No obs column names the references of uns[%r]: cells_used is not written.", REFERENCES_UNS_KEY)
    used = None if column is None else pd.crosstab(column.iloc[idx].to_numpy(), labels.iloc[idx].to_numpy())
    updated = {}
    for ref_name, entry in refs.items():
        if not isinstance(entry, Mapping):
            updated[ref_name] = entry
            continue
        entry = dict(entry)
        entry.pop("cells_used", None)  # from an earlier draw: it describes other cells
        if used is not None:
            name = str(entry.get("name", ref_name))
            row = used.loc[name] if name in used.index else pd.Series(dtype=np.int64)
            row = row[row > 0]
            entry["cells_used"] = {"cell_types": [str(t) for t in row.index], "n_cells": row.astype(int).tolist()}
        updated[ref_name] = entry
    return updated
