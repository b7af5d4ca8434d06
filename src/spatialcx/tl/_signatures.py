"""Reference-free annotation from marker gene sets (:func:`score_signatures`, :func:`annotate_domains`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._settings import logger
from .._utils import label_text

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..pp._normalization import ExpressionSource

MarkerSets = Mapping[str, Sequence[str]] | str | Path | Any
_GENE_KEYS = ("genes", "markers", "positive", "positive_markers", "marker_genes")
#: What separates the genes of one string ("CD3D, CD3E" or "CD3D;CD3E").
_GENE_SEP = re.compile(r"[,;]")
#: How many marker sets a warning names before it says "..." (the full lists are in ``uns``).
_N_EXAMPLES = 3
#: A marker gene whose standard deviation across cells is at most this much (relative to its mean, or 1) is constant.
_CONSTANT_RTOL = 1e-12


def score_signatures(
    data: AnnData | SpatialData,
    markers: MarkerSets,
    *,
    table_key: str = "table",
    key_added: str = "signature",
    min_genes: int = 1,
    standardize: bool = True,
    smooth: bool = False,
    n_neighbors: int = 10,
    spatial_key: str = "spatial",
    library_key: str | None = None,
    chunk_size: int | None = None,
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    r"""Score every cell for every marker set (one score per cell type), without a reference.

    Expression is ``log1p(counts / library size * 1e4)`` from the raw counts, and each marker gene is standardized
    across cells (z-score). With ``standardize=True`` (the default) a signature's score is the sum of the z-scores of
    its ``n`` genes present in the panel divided by :math:`\sqrt{n}`; with ``standardize=False`` it is their mean (the
    sum divided by ``n``). Genes missing from the panel are dropped with a warning; a signature left with fewer than
    ``min_genes`` genes is dropped.

    Why :math:`\sqrt{n}`: the mean of ``n`` independent z-scores has a standard deviation of :math:`1/\sqrt{n}`, so
    with the mean a one-gene signature varies about 1.7 times as much as a three-gene one in cells that express
    neither, and noise in a single gene wins the per-cell argmax (e.g. ``obs["{key}_cell"]`` of
    :func:`annotate_domains`) against a coherent multi-gene signature. Summing and dividing by :math:`\sqrt{n}` gives
    every signature a standard deviation of 1 when its genes are independent (no signal) and more when they are
    co-expressed (signal), so signatures of different sizes are comparable. The two scores differ by a constant factor
    per signature: group-versus-rest statistics (AUCs, p-values of :func:`annotate_domains`) are the same either way.

    Expression is read a block of ``chunk_size`` cells at a time, twice (once for the genes' means and standard
    deviations, once for the scores), so memory is O(chunk x genes + cells x signatures), whatever the size and
    backing (sparse, dense, dask, backed h5ad) of the table.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``.
    markers
        Marker sets keyed by cell type: a dict ``{name: [genes]}``, the path of a YAML or JSON file holding such a
        mapping, a table (a DataFrame, or the path of a CSV / TSV file) either long (a ``cell_type`` and a ``gene``
        column) or wide (one column of genes per cell type), or the canonical markers of
        :func:`spatialcx.tl.load_canonical_markers`. Values may also be dicts with a ``"genes"`` (or ``"markers"``)
        list, or strings of genes separated by commas or semicolons (``"CD3D, CD3E"``, in a list or a table's cell
        too); a set of genes is taken in alphabetical order. Missing values (NaN, None), blanks and repeats are
        skipped. :func:`spatialcx.pl.marker_dotplot` and :func:`spatialcx.pl.validation_2d` read the same inputs.
    table_key
        Table to use when ``data`` is SpatialData.
    key_added
        ``obsm`` key of the scores (cells x signatures) and ``uns`` key of the parameters.
    min_genes
        Fewest panel genes a signature needs to be scored.
    standardize
        Divide the summed z-scores of a signature by :math:`\sqrt{n}` (comparable across set sizes) rather than by
        ``n`` (the mean z-score, which favours small sets in a per-cell comparison).
    smooth
        Average each cell's scores with its ``n_neighbors`` nearest spatial neighbours
        (:meth:`scipy.spatial.cKDTree.query`; in 3D when the coordinates have a third column), which reduces the noise
        of sparse panels.
    n_neighbors
        Neighbours used by ``smooth``.
    spatial_key
        Key of the coordinates in ``obsm`` (``smooth`` only). When ``obsm`` has none and ``data`` is a SpatialData
        whose table annotates a shapes element (SOPA, spatialdata-io), the centroids of the cells' shapes are used,
        as in :func:`spatialcx.tl.spatial_domains`.
    library_key
        obs column of sections / samples (``smooth`` only): a cell's neighbours are taken from its own section. Without
        it, sections that share one coordinate frame are averaged together (a warning names a column such as
        ``"section"`` or ``"library_id"`` when the table has one).
    chunk_size
        Cells per block read; default ``scx.settings.chunk_size``.
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys into the zarr store when ``data`` is a backed SpatialData.

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes ``obsm[key_added]`` (float32, cells x signatures) and
    ``uns[key_added]`` with ``names`` (the column order), ``genes`` (the genes used per signature, comma-joined),
    ``missing`` (the genes of each scored signature that are not in the panel, comma-joined), ``dropped``
    (signatures left out), ``coordinates`` (where the coordinates of ``smooth`` came from, or ``""``) and the
    parameters. The labels that :func:`annotate_domains` made from earlier scores under ``key_added`` (its obs
    columns and ``uns`` entry) are removed, with a warning, when the scores change.

    Raises
    ------
    FileNotFoundError
        ``markers`` is a path and no such file exists.
    TypeError
        ``markers`` is not a mapping or a table, or a marker set is not a list of genes.
    ValueError
        Empty or malformed marker sets, two sets of the same name, no signature with enough panel genes, or (with
        ``smooth``) cells without finite coordinates or a ``library_key`` column with missing values.
    KeyError
        ``smooth=True`` and no coordinates (neither ``obsm[spatial_key]`` nor shapes linked to the table), or no
        ``library_key`` column.
    """
    from .._table import check_key, resolve_table
    from ..pp._normalization import find_expression_source

    if int(min_genes) < 1:
        raise ValueError(f"min_genes={min_genes} must be at least 1.")
    if smooth and int(n_neighbors) < 1:
        raise ValueError(f"n_neighbors={n_neighbors} must be at least 1.")
    check_key(key_added, "key_added")
    marker_sets = _load_markers(markers)

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    _check_not_taken(adata, key_added, spatial_key)
    coords, coords_source, libraries = None, "", None
    if smooth:  # before reading any expression: a table without coordinates fails fast
        from ._domains import _coordinates, _libraries, _warn_if_sections

        coords, coords_source = _coordinates(adata, spatial_key, ref.sdata)
        libraries = _libraries(adata, library_key)
        if library_key is None:
            _warn_if_sections(
                adata, "score_signatures", "cells are averaged with neighbours of other sections", "smooth each alone"
            )
    src = find_expression_source(adata)
    # the genes of the matrix the scores are read from: raw.X may hold markers that X (e.g. highly variable genes) lacks
    names, used, missing, dropped = _match_genes(marker_sets, src.var_names, int(min_genes), key_added=key_added)

    scores, n_genes = _signature_scores(src, used, standardize=bool(standardize), chunk_size=chunk_size)
    if smooth:
        scores = _smooth(scores, coords, n_neighbors=int(n_neighbors), source=coords_source, libraries=libraries)

    stale = _stale_annotations(adata, key_added, names, scores)
    if stale:
        from ._domains import drop_annotations

        drop_annotations(adata, stale)
        logger.warning(
            "score_signatures(%r): removing the labels that annotate_domains made from the earlier scores (obs / uns "
            "%s): the scores changed. Run scx.tl.annotate_domains(data, groupby, signature_key=%r) again.",
            key_added,
            stale,
            key_added,
        )
    adata.obsm[key_added] = scores
    adata.uns[key_added] = {
        "names": list(names),
        "genes": [",".join(g) for g in used],
        "missing": [",".join(m) for m in missing],
        "dropped": list(dropped),
        "method": ("sum of z-scores / sqrt(n genes)" if standardize else "mean z-score")
        + " of log1p(counts / library size * 1e4) over the signature's genes",
        "min_genes": int(min_genes),
        "standardize": bool(standardize),
        "smooth": bool(smooth),
        "n_neighbors": int(n_neighbors) if smooth else 0,
        "coordinates": coords_source,
    }
    if smooth and library_key is not None:
        adata.uns[key_added]["library_key"] = library_key
    logger.info("score_signatures(%r): %d signature(s) scored over %d genes.", key_added, len(names), n_genes)
    return ref.finish(write=write, elements=("obs", "obsm", "uns") if stale else ("obsm", "uns"))


def _check_not_taken(adata: AnnData, key_added: str, spatial_key: str) -> None:
    """Refuse a ``key_added`` whose ``obsm`` entry holds something else (the coordinates, an embedding)."""
    earlier = adata.uns.get(key_added)
    ours = isinstance(earlier, Mapping) and "names" in earlier and "genes" in earlier  # score_signatures' record
    if key_added == spatial_key or (key_added in adata.obsm and not ours):
        what = "the cells' coordinates" if key_added == spatial_key else "an entry that score_signatures did not write"
        raise ValueError(
            f"key_added={key_added!r} would replace obsm[{key_added!r}], {what}. Choose another key_added (e.g. "
            "'signature')."
        )


def _stale_annotations(adata: AnnData, key_added: str, names: list[str], scores: np.ndarray) -> list[str]:
    """The ``uns`` keys of the annotate_domains runs made from ``obsm[key_added]``, when the new scores differ.

    Their labels and statistics would sit beside scores they were not made from.
    """
    runs = [
        name
        for name, value in adata.uns.items()
        if isinstance(value, dict) and value.get("signature_key") == key_added and "groupby" in value
    ]
    if not runs:
        return runs
    earlier = adata.uns.get(key_added)
    old_names = earlier.get("names") if isinstance(earlier, dict) else None
    same = (
        old_names is not None
        and key_added in adata.obsm
        and [str(n) for n in np.asarray(old_names).tolist()] == list(names)
        and np.array_equal(np.asarray(adata.obsm[key_added]), scores)
    )
    return [] if same else runs


def annotate_domains(
    data: AnnData | SpatialData,
    groupby: str,
    *,
    signature_key: str = "signature",
    table_key: str = "table",
    key_added: str | None = None,
    alpha: float = 0.05,
    min_auc: float = 0.55,
    closeness: float = 0.2,
    max_combined: int = 3,
    sep: str = "/",
    unassigned: str = "Unassigned",
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Name groups of cells (domains, clusters) after the marker signatures enriched in them.

    For every group and signature of :func:`score_signatures`, the scores of the group's cells are compared with
    those of all other cells (Wilcoxon rank-sum / Mann-Whitney U, two-sided, Benjamini-Hochberg across all tests).
    A signature is enriched when its adjusted p-value is below ``alpha`` and its AUC (the probability that a cell of
    the group scores above a cell outside it) is at least ``min_auc``. Each group gets its top signature by AUC or,
    when the runner-up is close (its effect ``AUC - 0.5`` is at least ``1 - closeness`` times the top one's), the
    signatures before the largest gap in the sorted effects ("elbow gap", at most ``max_combined``), joined with
    ``sep`` in the order of the signatures (the marker sets' order), e.g. ``"Macrophages/Neutrophils"``, so the same
    types make one label whichever leads in a group. Groups with no enriched signature are ``unassigned``.

    The tests use the normal approximation with tie and continuity corrections (the p-values equal
    ``scipy.stats.mannwhitneyu(..., method="asymptotic")``). Every group is tested against all other cells, so the
    pooled sample is the same for all groups: each signature is ranked once and a group's U statistic comes from its
    rank sum, in O(cells log cells) per signature whatever the number of groups.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``.
    groupby
        obs column of the groups, e.g. the ``key_added`` of :func:`spatial_domains` or a cluster column (any dtype,
        nullable ``Int64`` and ``string`` included). Cells with a missing group (NaN, None, ``pd.NA``) are not
        labelled (they still count as "other cells").
    signature_key
        The ``key_added`` of :func:`score_signatures`.
    table_key
        Table to use when ``data`` is SpatialData.
    key_added
        obs column of the group labels; default ``f"{groupby}_annotation"``. The per-cell top signature goes to
        ``f"{key_added}_cell"``, the statistics to ``uns[key_added]``.
    alpha
        Adjusted p-value below which a signature can be enriched.
    min_auc
        Smallest AUC of an enriched signature, in [0.5, 1].
    closeness
        How close (relative to the top effect) the runner-up must be for signatures to be combined; 0 never
        combines.
    max_combined
        Most signatures in a combined label.
    sep
        Separator of combined labels.
    unassigned
        Label of groups with no enriched signature.
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys into the zarr store when ``data`` is a backed SpatialData (with obs, uns and obsm, so
        scores computed with ``score_signatures(..., write=False)`` are stored with the labels made from them).

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes ``obs[key_added]`` (categorical group label),
    ``obs[f"{key_added}_cell"]`` (categorical: the signature with the highest score in each cell, or ``unassigned``
    when no signature scores above the average cell, e.g. a cell with no count of any marker) and
    ``uns[key_added]``: the parameters, ``groups`` and their ``labels``, and ``stats`` (one entry per group and
    signature: ``group``, ``signature``, ``auc``, ``statistic``, ``pvalue``, ``pvalue_adj``, ``enriched``,
    ``mean_in``, ``mean_out``).

    Raises
    ------
    KeyError
        Missing scores or group column.
    ValueError
        Bad parameters, a group column with every value missing, or a single group and no other cell.
    """
    from scipy.stats import false_discovery_control

    from .._table import check_key, obs_column, resolve_table

    if not 0 < float(alpha) <= 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1].")
    if not 0.5 <= float(min_auc) <= 1:
        raise ValueError(f"min_auc={min_auc} must be in [0.5, 1].")
    if not 0 <= float(closeness) <= 1:
        raise ValueError(f"closeness={closeness} must be in [0, 1].")
    if int(max_combined) < 1:
        raise ValueError(f"max_combined={max_combined} must be at least 1.")
    key_added = check_key(key_added or f"{groupby}_annotation", "key_added")
    clash = {groupby: "the group column obs", signature_key: "the signature scores obsm / uns"}
    for name in (key_added, f"{key_added}_cell"):
        if name in clash:
            raise ValueError(
                f"key_added={key_added!r} would overwrite {clash[name]}[{name!r}] (annotate_domains writes "
                f"obs[{key_added!r}], obs[{key_added + '_cell'!r}] and uns[{key_added!r}]); choose another key_added, "
                f"e.g. the default {groupby + '_annotation'!r}."
            )

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    if signature_key not in adata.obsm or signature_key not in adata.uns or "names" not in adata.uns[signature_key]:
        raise KeyError(
            f"No signature scores {signature_key!r} in the table (obsm / uns). Run "
            f"scx.tl.score_signatures(data, markers, key_added={signature_key!r}) first."
        )
    if groupby not in adata.obs.columns:
        raise KeyError(f"obs has no column {groupby!r} to group cells by. Columns: {list(adata.obs.columns)[:20]}.")
    scores = np.asarray(adata.obsm[signature_key])
    sig_names = [str(s) for s in np.asarray(adata.uns[signature_key]["names"]).tolist()]
    if scores.ndim != 2 or scores.shape[1] != len(sig_names):
        raise ValueError(
            f"obsm[{signature_key!r}] has shape {scores.shape} but uns[{signature_key!r}]['names'] lists "
            f"{len(sig_names)} signatures; rerun score_signatures."
        )
    col = obs_column(adata, groupby)
    codes, groups = _group_codes(col)
    if not groups:
        raise ValueError(
            f"obs[{groupby!r}] has no group at all: every one of its {adata.n_obs} values is missing (NaN / NA), "
            "e.g. because spatial_domains found no domain. Rerun spatial_domains with settings that find domains "
            "(a larger max_distance or a smaller min_cells), or group by another column."
        )
    if len(groups) == 1 and (codes >= 0).all():
        raise ValueError(
            f"obs[{groupby!r}] has a single group ({groups[0]!r}) and no cell outside it; ranking a group against "
            "the rest needs other cells to compare with. Group by a column with two or more groups."
        )

    stats = _rank_sum_tests(scores, codes, len(groups), alternative="two-sided")
    n_sig = len(sig_names)
    pvals = stats["pvalue"].ravel()
    pvals = np.where(np.isnan(pvals), 1.0, pvals)
    padj = false_discovery_control(pvals, method="bh").reshape(len(groups), n_sig)
    auc = stats["auc"]
    enriched = (padj < alpha) & (auc >= min_auc)
    labels = [
        _elbow_label(auc[gi], enriched[gi], sig_names, closeness=closeness, max_combined=int(max_combined), sep=sep)
        or unassigned
        for gi in range(len(groups))
    ]
    group_names = [str(g) for g in label_text(np.asarray(groups, dtype=object))]  # a float column's 0.0 reads "0"
    table = {
        "group": np.repeat(np.asarray(group_names, dtype=str), n_sig),
        "signature": np.tile(np.asarray(sig_names, dtype=str), len(groups)),
        "auc": auc.ravel(),
        "statistic": stats["statistic"].ravel(),
        "pvalue": pvals,
        "pvalue_adj": padj.ravel(),
        "enriched": enriched.ravel(),
        "mean_in": stats["mean_in"].ravel(),
        "mean_out": stats["mean_out"].ravel(),
    }

    group_label = np.full(adata.n_obs, np.nan, dtype=object)
    inside = codes >= 0
    group_label[inside] = np.asarray(labels, dtype=object)[codes[inside]]
    # a cell's own label: its top signature when that scores above the average cell; a cell below average in every
    # signature (e.g. no count of any marker) is not named after the set least hurt by zeros (the sparsest one-gene
    # set would win it)
    top = np.argmax(scores, axis=1)
    cell_top = np.asarray(sig_names, dtype=object)[top]
    cell_top[~(scores[np.arange(scores.shape[0]), top] > 0)] = unassigned

    adata.obs[key_added] = pd.Categorical(group_label, categories=list(dict.fromkeys(labels)))
    cell_categories = sig_names if unassigned in sig_names else [*sig_names, unassigned]
    adata.obs[f"{key_added}_cell"] = pd.Categorical(cell_top, categories=cell_categories)
    adata.uns[key_added] = {
        "groupby": groupby,
        "signature_key": signature_key,
        "test": (
            "Wilcoxon rank-sum (Mann-Whitney U, normal approximation with tie and continuity corrections), group vs "
            "rest, two-sided; Benjamini-Hochberg"
        ),
        "alpha": float(alpha),
        "min_auc": float(min_auc),
        "closeness": float(closeness),
        "max_combined": int(max_combined),
        "sep": sep,
        "unassigned": unassigned,
        "groups": group_names,
        "labels": labels,
        "stats": table,
    }
    logger.info("annotate_domains(%r): %s", key_added, dict(zip(group_names, labels)))
    # obsm too: scores made with score_signatures(write=False) would otherwise be named in the store's uns but absent
    return ref.finish(write=write, elements=("obs", "obsm", "uns"))


# --------------------------------------------------------------------------------------------------------------------
# Signature scores
# --------------------------------------------------------------------------------------------------------------------


def _signature_scores(
    src: ExpressionSource, used: list[list[str]], *, standardize: bool, chunk_size: int | None
) -> tuple[np.ndarray, int]:
    r"""Scores (float32, cells x signatures) of the gene sets ``used``, reading the expression chunk by chunk.

    A signature's score is :math:`\sum_j w_j (x_j - m_j) / s_j` over its genes ``j``, with the gene means ``m_j`` and
    standard deviations ``s_j`` (ddof 0) across cells and :math:`w_j = 1/\sqrt{n}` (``standardize``) or :math:`1/n`.
    That is linear in the expression: the first pass over the rows accumulates ``m`` and ``s``
    (:func:`sklearn.utils.sparsefuncs.incr_mean_variance_axis`), the second computes ``X_block @ W - c`` for each block, with
    ``W[j, k] = w_k / s_j`` and ``c_k = sum_j W[j, k] m_j``. A gene that does not vary contributes nothing (z = 0).
    ``src`` is the table's expression (:func:`~spatialcx.pp._normalization.find_expression_source`), ``used`` names
    genes of ``src.var_names``. Returns the scores and the number of genes read.
    """
    from .._matrix import default_chunk_size, gene_indices, iter_row_blocks, normalize_block

    union = list(dict.fromkeys(g for genes in used for g in genes))
    cols = gene_indices(src.var_names, union)
    chunk = default_chunk_size(src.matrix.shape[1], chunk_size)
    n_cells, n_genes = int(src.matrix.shape[0]), len(union)

    def blocks():
        for start, stop, block in iter_row_blocks(src.matrix, chunk):
            yield start, stop, normalize_block(block, cols, kind=src.kind, over="all", target_sum=1e4)

    # pass 1: per-gene mean and variance, merged block by block (scikit-learn's incremental sparse update)
    from sklearn.utils.sparsefuncs import incr_mean_variance_axis

    mean, var, seen = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes)
    for start, stop, x in blocks():
        if stop > start:
            mean, var, seen = incr_mean_variance_axis(x, axis=0, last_mean=mean, last_var=var, last_n=seen)
    sd = np.sqrt(var)
    constant = sd <= _CONSTANT_RTOL * np.maximum(np.abs(mean), 1.0)
    if constant.any():
        logger.warning(
            "score_signatures: %s do not vary across cells and add nothing to the scores: %s",
            _plural(int(constant.sum()), "marker gene"),
            [g for g, c in zip(union, constant) if c][:20],
        )

    # the scores are linear in the expression: W (genes x signatures) and the centring term c
    pos = {g: i for i, g in enumerate(union)}
    weights = np.zeros((n_genes, len(used)))
    inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=~constant)
    for k, genes in enumerate(used):
        idx = [pos[g] for g in genes]
        weights[idx, k] = inv_sd[idx] / (np.sqrt(len(idx)) if standardize else len(idx))
    centre = mean @ weights

    # pass 2: the scores, block by block
    scores = np.empty((n_cells, len(used)), dtype=np.float32)
    for start, stop, x in blocks():
        scores[start:stop] = np.asarray(x @ weights) - centre
    return scores, n_genes


def _smooth(
    scores: np.ndarray,
    coords: np.ndarray,
    *,
    n_neighbors: int,
    source: str,
    libraries: np.ndarray | None = None,
) -> np.ndarray:
    """Average each cell's scores with those of its ``n_neighbors`` nearest neighbours (itself included).

    The neighbours come from :meth:`scipy.spatial.cKDTree.query`, in 3D when the coordinates have a third column, and
    only among the cells of the same library (``libraries``: one code per cell) when given. A cell is always its own
    neighbour (when more than ``n_neighbors`` cells share its position, the others are the first ones found there); a
    library of fewer than ``n_neighbors + 1`` cells averages over all its cells.
    """
    import scipy.sparse as sp

    n_obs = scores.shape[0]
    coords = np.asarray(coords, dtype=np.float64)[:, :3]
    if not np.isfinite(coords).all():
        bad = int((~np.isfinite(coords).all(axis=1)).sum())
        raise ValueError(
            f"{bad} cell(s) have non-finite coordinates in {source}; smoothing needs every cell's position. Fix or "
            "drop those cells, or use smooth=False."
        )
    groups = [np.arange(n_obs)] if libraries is None else [np.flatnonzero(libraries == v) for v in np.unique(libraries)]
    indptr, indices, weights = [np.zeros(1, dtype=np.int64)], [], []
    row_of = np.empty(n_obs, dtype=np.int64)  # row of each cell in the stacked neighbour lists
    done = 0
    for rows in groups:
        nn = rows[_neighbours(coords[rows], min(n_neighbors, rows.size - 1))]
        indices.append(nn.ravel())
        weights.append(np.full(nn.size, 1.0 / nn.shape[1], dtype=np.float32))
        indptr.append(indptr[-1][-1] + nn.shape[1] * np.arange(1, rows.size + 1))
        row_of[rows] = done + np.arange(rows.size)
        done += rows.size
    stacked = (np.concatenate(weights), np.concatenate(indices), np.concatenate(indptr))
    w = sp.csr_matrix(stacked, shape=(n_obs, n_obs))[row_of]  # rows back in the order of the cells
    return np.asarray(w @ np.asarray(scores, dtype=np.float32), dtype=np.float32)


def _neighbours(coords: np.ndarray, k: int) -> np.ndarray:
    """``(n, k + 1)`` positions of each point's ``k`` nearest other points, then of the point itself.

    The points are queried in the k-d tree's own order (neighbouring points one after another, so the nodes visited
    stay in the cache: about half the time on a million cells stored in no spatial order), over
    ``scx.settings.n_jobs`` threads; the result depends on neither.
    """
    from scipy.spatial import cKDTree

    from .._settings import n_workers, settings

    n = coords.shape[0]
    rows = np.arange(n)
    if k < 1:
        return rows[:, None]
    tree = cKDTree(coords)
    order = tree.indices
    _, found = tree.query(coords[order], k=k + 1, workers=n_workers(settings.n_jobs, n))
    nn = np.empty_like(found)
    nn[order] = found
    # the k nearest other cells: where a cell is among its own first k, the (k+1)-th nearest takes its place
    nn[:, 0] = np.where(nn[:, 0] == rows, nn[:, k], nn[:, 0])  # usually the cell itself (distance 0)
    own = nn[:, 1:k] == rows[:, None]  # a cell that shares its position with others may come later
    nn[:, 1:k][own] = nn[:, k][own.any(axis=1)]
    nn[:, k] = rows  # and the cell itself
    return nn


# --------------------------------------------------------------------------------------------------------------------
# Group-versus-rest rank-sum tests
# --------------------------------------------------------------------------------------------------------------------


def _group_codes(col: pd.Series) -> tuple[np.ndarray, list[Any]]:
    """Each cell's group index (-1 where the group is missing) and the non-empty groups.

    Categorical columns keep the order of their categories (empty ones are left out); others the order in which the
    values first appear. Missing values of any kind (NaN, None, ``pd.NA`` of nullable ``Int64`` / ``string``
    columns) belong to no group.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        cat = np.asarray(col.cat.codes.to_numpy(), dtype=np.int64)
        n_cat = len(col.cat.categories)
        keep = np.flatnonzero(np.bincount(cat[cat >= 0], minlength=n_cat) > 0)
        remap = np.full(n_cat + 1, -1, dtype=np.int64)  # the last entry maps the missing code -1 to -1
        remap[keep] = np.arange(keep.size)
        return remap[cat], list(col.cat.categories[keep])
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    return np.asarray(codes, dtype=np.int64), list(uniques)


def _rank_average(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ranks of ``x`` (1-based, ties get their average rank, as ``scipy.stats.rankdata``) and the tie term.

    The tie term is ``sum(t**3 - t)`` over the groups of ``t`` tied values, as in
    :func:`scipy.stats.mannwhitneyu`. One sort for both.
    """
    n = x.shape[0]
    order = np.argsort(x)
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]]) if n else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, n])
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    t = counts.astype(np.float64)
    return ranks, float(np.sum(t**3 - t))


def _mwu_pvalue(
    u1: np.ndarray,
    n1: np.ndarray,
    n2: np.ndarray,
    tie_term: float,
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
) -> np.ndarray:
    """P-value of the Mann-Whitney U statistic ``u1`` of the first sample, normal approximation.

    The same as ``scipy.stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic",
    use_continuity=True).pvalue``, with the tie correction ``tie_term`` of the pooled sample (:func:`_rank_average`).
    """
    from scipy.special import ndtr

    n1 = np.asarray(n1, dtype=np.float64)
    n2 = np.asarray(n2, dtype=np.float64)
    u2 = n1 * n2 - u1
    if alternative == "greater":
        u, factor = u1, 1.0
    elif alternative == "less":
        u, factor = u2, 1.0
    elif alternative == "two-sided":
        u, factor = np.maximum(u1, u2), 2.0
    else:
        raise ValueError(f"alternative={alternative!r} must be 'two-sided', 'greater' or 'less'.")
    mu = n1 * n2 / 2
    n = n1 + n2
    s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - mu - 0.5) / s
    return np.clip(ndtr(-z) * factor, 0.0, 1.0)


def _rank_sum_tests(
    scores: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
) -> dict[str, np.ndarray]:
    """Each group (``codes`` >= 0) against all other cells, for every column of ``scores``: Mann-Whitney U tests.

    The pooled sample of every test is all cells, so each column is ranked once (ties averaged); a group's U is its
    rank sum less ``n1 (n1 + 1) / 2``, and the tie correction is shared by all groups. The results equal
    ``scipy.stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")`` group by group, in
    O(cells log cells) per column instead of per column and group. A column with NaN gives NaN statistics (as
    scipy's default ``nan_policy="propagate"``).

    Returns ``statistic`` (U of the group), ``auc`` (U / (n1 n2)), ``pvalue``, ``mean_in`` and ``mean_out``, each of
    shape ``(n_groups, n_columns)``.
    """
    n_cells, n_cols = scores.shape
    inside = codes >= 0
    member = codes[inside]
    n1 = np.bincount(member, minlength=n_groups).astype(np.float64)
    n2 = n_cells - n1
    out = {k: np.empty((n_groups, n_cols)) for k in ("statistic", "auc", "pvalue", "mean_in", "mean_out")}
    for j in range(n_cols):
        x = np.asarray(scores[:, j], dtype=np.float64)
        total = x.sum()
        sum_in = np.bincount(member, weights=x[inside], minlength=n_groups)
        out["mean_in"][:, j] = sum_in / n1
        out["mean_out"][:, j] = (total - sum_in) / n2
        if np.isnan(total):
            out["statistic"][:, j] = out["auc"][:, j] = out["pvalue"][:, j] = np.nan
            continue
        ranks, tie_term = _rank_average(x)
        u1 = np.bincount(member, weights=ranks[inside], minlength=n_groups) - n1 * (n1 + 1) / 2
        out["statistic"][:, j] = u1
        out["auc"][:, j] = u1 / (n1 * n2)
        out["pvalue"][:, j] = _mwu_pvalue(u1, n1, n2, tie_term, alternative)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Marker sets
# --------------------------------------------------------------------------------------------------------------------


def _plural(count: int, noun: str) -> str:
    """``"1 marker set"``, ``"2 marker sets"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _elbow_label(
    auc: np.ndarray, enriched: np.ndarray, names: list[str], *, closeness: float, max_combined: int, sep: str
) -> str | None:
    """Top enriched signature, or the close top ones before the largest gap in the sorted effects.

    The signatures of a combined label are joined in the order of ``names`` (not by effect), so the same types make
    the same label in every group.
    """
    idx = np.flatnonzero(enriched)
    if idx.size == 0:
        return None
    order = idx[np.lexsort((np.asarray(names, dtype=object)[idx].astype(str), -auc[idx]))]
    effect = auc[order] - 0.5
    if order.size == 1 or max_combined == 1 or effect[1] < (1.0 - closeness) * effect[0]:
        return names[order[0]]
    top = effect[:max_combined]
    after = effect[max_combined] if effect.size > max_combined else 0.0
    gaps = np.diff(np.r_[top, after]) * -1.0
    k = int(np.argmax(gaps)) + 1
    return sep.join(names[i] for i in sorted(order[:k]))


def _load_markers(markers: MarkerSets, *, fn: str | None = None, allow_empty: bool = False) -> dict[str, list[str]]:
    """Normalize marker sets to ``{name: [genes]}``: the one reader of users' marker sets.

    :func:`score_signatures` and the marker plots (:func:`spatialcx.pl.marker_dotplot`,
    :func:`spatialcx.pl.validation_2d`) read ``markers`` here, so the same file, dict or table gives the same sets.

    Parameters
    ----------
    markers
        A dict ``{name: genes}``, the path of a YAML / JSON file holding one, a table (a DataFrame, or the path of a
        CSV / TSV / TXT file), long (a cell type and a gene column) or wide (one column of genes per type), or an
        object with ``to_dict()`` (a Series). ``genes`` is a list, a set (taken in alphabetical order), a dict with a
        ``"genes"`` (or ``"markers"``, ...) list, or one string; strings are split at commas and semicolons, blanks
        and missing values (NaN, None) are dropped, repeats kept once.
    fn
        Name of the public function, put before error messages (``"marker_dotplot: ..."``).
    allow_empty
        Keep a set left with no gene as ``[]`` (a plot shows it as a type without markers) instead of raising.

    Raises
    ------
    FileNotFoundError
        A path that is not a file.
    TypeError
        ``markers`` is not a mapping or a table, or a set is not a list of genes.
    ValueError
        No marker set, a set without genes (unless ``allow_empty``), two sets of the same name.
    """
    prefix = f"{fn}: " if fn else ""
    items: list[tuple[Any, Any]] | None = None  # (name, genes) in the given order
    if isinstance(markers, str | os.PathLike):
        path = Path(markers).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{prefix}markers={str(markers)!r} is read as the path of a marker file, and there is no such file; "
                "pass an existing YAML / JSON / CSV / TSV file or a dict {cell type: [genes]}."
            )
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv", ".txt"):
            table = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", dtype=str)
            items = _markers_from_frame(table, prefix=prefix)
        else:
            text = path.read_text()
            if suffix == ".json":
                import json

                content = json.loads(text)
            else:
                import yaml

                content = yaml.safe_load(text)
            if not isinstance(content, Mapping):
                raise TypeError(
                    f"{prefix}Marker file {str(path)!r} holds {type(content).__name__}, not a mapping of cell types "
                    "to gene lists ({name: [genes]}). YAML / JSON files hold such a mapping; CSV / TSV files (.csv, "
                    ".tsv, .txt) a table with a cell type and a gene column, or one column of genes per cell type."
                )
            items = list(content.items())
    elif isinstance(markers, pd.DataFrame):
        items = _markers_from_frame(markers, prefix=prefix)
    elif isinstance(markers, Mapping):
        items = list(markers.items())
    elif hasattr(markers, "to_dict") and isinstance(content := markers.to_dict(), Mapping):  # a Series
        items = list(content.items())
    if items is None:
        raise TypeError(
            f"{prefix}markers must be a dict mapping cell type names to gene lists ({{name: [genes]}}), the path of a "
            "YAML / JSON / CSV / TSV file, a DataFrame (a cell type and a gene column, or one column of genes per "
            f"type), or the canonical markers of scx.tl.load_canonical_markers(); got {type(markers).__name__}."
        )
    out: dict[str, list[str]] = {}
    for name, genes in items:
        if isinstance(genes, Mapping):
            key = next((k for k in _GENE_KEYS if k in genes), None)
            if key is None:
                raise ValueError(
                    f"{prefix}Marker set {name!r} is a mapping without a gene list (looked for {list(_GENE_KEYS)}); "
                    "give its genes as a list."
                )
            genes = genes[key]
        if genes is None:  # "T cell:" with nothing after it in a YAML file
            genes = []
        if isinstance(genes, str):
            genes = [genes]
        if isinstance(genes, set | frozenset):  # no order of its own (and a hash-seeded one): alphabetical
            genes = sorted(str(g) for g in genes)
        if not isinstance(genes, Sequence | np.ndarray | pd.Index | pd.Series):
            raise TypeError(
                f"{prefix}markers[{name!r}] must be a list of gene names (or one string of comma-separated names), "
                f"got {type(genes).__name__} {genes!r}."
            )
        # "CD3D, CD3E" (a YAML value, a cell of a table) is two genes; blanks and NaN padding are none
        genes = [g.strip() for entry in genes if not _is_missing(entry) for g in _GENE_SEP.split(str(entry))]
        genes = [g for g in genes if g]
        if not genes and not allow_empty:
            raise ValueError(f"{prefix}Marker set {name!r} has no genes; remove it or add its markers.")
        if str(name) in out:  # 1 and "1": the second would replace the first
            raise ValueError(
                f"{prefix}Two marker sets are both named {str(name)!r} (as text); give them distinct names."
            )
        out[str(name)] = list(dict.fromkeys(genes))
    if not out:
        raise ValueError(f"{prefix}markers is empty; pass at least one marker set {{name: [genes]}}.")
    return out


def _is_missing(value: Any) -> bool:
    """Whether a gene entry is a missing value (None, NaN, ``pd.NA``): the padding of a wide table's columns."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or an array: not a scalar missing value
        return False


def _markers_from_frame(df: pd.DataFrame, *, prefix: str = "") -> list[tuple[str, list[str]]]:
    """``(cell type, genes)`` of a long table (a cell type and a gene column) or a wide one (a column per type)."""
    lower = {str(c).lower(): c for c in df.columns}
    name_col = next((lower[c] for c in ("cell_type", "celltype", "name", "label") if c in lower), None)
    gene_col = next((lower[c] for c in ("gene", "genes", "marker", "markers", "gene_symbol") if c in lower), None)
    if name_col is not None and gene_col is not None:
        rows = df[df[name_col].notna() & df[gene_col].notna()]
        names = rows[name_col].astype(str)  # 1 and "1" are one set, as they are one name
        return [(str(k), v[gene_col].astype(str).tolist()) for k, v in rows.groupby(names, sort=False)]
    if name_col is not None or gene_col is not None or df.empty:
        raise ValueError(
            f"{prefix}A marker table needs a cell type column and a gene column (e.g. 'cell_type', 'gene'), or one "
            f"column of genes per cell type; got the columns {list(df.columns)}."
        )
    # wide: one column per cell type, padded with missing values to the longest
    return [(str(c), [g for g in col.tolist() if not _is_missing(g)]) for c, col in df.items()]


def _match_genes(
    marker_sets: dict[str, list[str]], var_names: pd.Index, min_genes: int, *, key_added: str = "signature"
) -> tuple[list[str], list[list[str]], list[list[str]], list[str]]:
    """Genes of each set found in the panel (exact, else a unique case-insensitive match).

    Logs one short warning for the genes not in the panel and one for the sets left with fewer than ``min_genes``
    genes: counts and a few examples; the full lists go to ``uns[key_added]`` (``missing``, ``dropped``).
    """
    panel = set(map(str, var_names))
    by_lower: dict[str, list[str]] = {}
    for v in map(str, var_names):
        by_lower.setdefault(v.lower(), []).append(v)
    names, used, missing, dropped = [], [], [], []
    all_missing: dict[str, list[str]] = {}
    for name, genes in marker_sets.items():
        found, miss = [], []
        for g in genes:
            if g in panel:
                found.append(g)
            elif len(by_lower.get(g.lower(), [])) == 1:
                found.append(by_lower[g.lower()][0])
            else:
                miss.append(g)
        found = list(dict.fromkeys(found))
        if len(found) < min_genes:
            dropped.append(name)
            continue
        if miss:
            all_missing[name] = miss
        names.append(name)
        used.append(found)
        missing.append(miss)
    # a set that lost its own genes and is left with exactly another, complete set's ("lamp5 GABAergic interneuron"
    # without LAMP5 is {GAD1, GAD2}, "GABAergic neuron") would score as that set and name its cells after itself
    by_genes: dict[frozenset[str], list[int]] = {}
    for i, genes in enumerate(used):
        by_genes.setdefault(frozenset(genes), []).append(i)
    reduced = {
        i: next(j for j in group if not missing[j])
        for group in by_genes.values()
        if any(not missing[j] for j in group)
        for i in group
        if missing[i]
    }
    if reduced:
        one = len(reduced) == 1
        pairs = [f"{names[i]!r} = {names[j]!r}" for i, j in reduced.items()]
        logger.warning(
            f"score_signatures: {_plural(len(reduced), 'marker set')} lost the genes that told {'it' if one else 'them'} "
            f"apart and {'is' if one else 'are'} left with exactly the panel genes of another set, so "
            f"{'it is' if one else 'they are'} not scored (e.g. {'; '.join(pairs[:_N_EXAMPLES])}"
            f"{'; ...' if len(pairs) > _N_EXAMPLES else ''}); uns[{key_added!r}]['dropped'] lists them."
        )
        dropped.extend(names[i] for i in reduced)
        for name in (names[i] for i in reduced):
            all_missing.pop(name, None)
        keep = [i for i in range(len(names)) if i not in reduced]
        names, used, missing = [names[i] for i in keep], [used[i] for i in keep], [missing[i] for i in keep]
    if all_missing:
        n_genes = len({g for v in all_missing.values() for g in v})
        examples = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(all_missing.items())[:_N_EXAMPLES])
        logger.warning(
            "score_signatures: %s of %s (of the %d scored) %s not in the panel and left out (e.g. %s%s); "
            "uns[%r]['missing'] lists them per signature.",
            _plural(n_genes, "marker gene"),
            _plural(len(all_missing), "signature"),
            len(names),
            "is" if n_genes == 1 else "are",
            examples,
            "; ..." if len(all_missing) > _N_EXAMPLES else "",
            key_added,
        )
    too_few = dropped[: len(dropped) - len(reduced)]  # the sets left with too few genes (the reduced ones come last)
    if too_few:
        shortfall = "no gene in the panel" if min_genes == 1 else f"fewer than {min_genes} genes in the panel"
        logger.warning(
            "score_signatures: %s of %d %s %s and %s not scored (e.g. %s%s); uns[%r]['dropped'] lists them.",
            _plural(len(too_few), "marker set"),
            len(marker_sets),
            "has" if len(too_few) == 1 else "have",
            shortfall,
            "is" if len(too_few) == 1 else "are",
            ", ".join(map(repr, too_few[:_N_EXAMPLES])),
            ", ..." if len(too_few) > _N_EXAMPLES else "",
            key_added,
        )
    same: dict[frozenset[str], list[str]] = {}
    for name, genes in zip(names, used):
        same.setdefault(frozenset(genes), []).append(name)
    twins = [v for v in same.values() if len(v) > 1]
    if twins:
        logger.warning(
            "score_signatures: %s of marker sets %s the same genes in the panel, so their scores are identical "
            "and cannot tell them apart (e.g. %s%s).",
            _plural(len(twins), "group"),
            "has" if len(twins) == 1 else "have",
            "; ".join(" = ".join(map(repr, v)) for v in twins[:_N_EXAMPLES]),
            "; ..." if len(twins) > _N_EXAMPLES else "",
        )
    if not names:
        raise ValueError(
            f"None of the {len(marker_sets)} marker sets has {min_genes} or more genes in the panel of "
            f"{len(var_names)} genes (e.g. {list(map(str, var_names[:5]))}). Check the gene naming (symbols vs "
            "Ensembl ids, species) or give markers that the panel measures."
        )
    return names, used, missing, dropped
