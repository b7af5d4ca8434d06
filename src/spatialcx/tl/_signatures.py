"""Reference-free annotation from marker gene sets (:func:`score_signatures`, :func:`annotate_domains`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

MarkerSets = Mapping[str, Sequence[str]] | str | Path | Any
_GENE_KEYS = ("genes", "markers", "positive", "positive_markers", "marker_genes")


def score_signatures(
    data: AnnData | SpatialData,
    markers: MarkerSets,
    *,
    table_key: str = "table",
    key_added: str = "signature",
    min_genes: int = 1,
    smooth: bool = False,
    n_neighbors: int = 10,
    spatial_key: str = "spatial",
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Score every cell for every marker set (one score per cell type), without a reference.

    Expression is ``log1p(counts / library size * 1e4)`` from the raw counts; each marker gene is standardized across
    cells (z-score), and a signature's score is the mean z-score of its genes present in the panel. Genes missing from
    the panel are dropped with a warning; a signature left with fewer than ``min_genes`` genes is dropped.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``.
    markers
        Marker sets keyed by cell type: a dict ``{name: [genes]}``, the path of a YAML or JSON file holding such a
        mapping, or the canonical markers of :func:`spatialcx.tl.load_canonical_markers`. Values may also be dicts
        with a ``"genes"`` (or ``"markers"``) list.
    table_key
        Table to use when ``data`` is SpatialData.
    key_added
        ``obsm`` key of the scores (cells x signatures) and ``uns`` key of the parameters.
    min_genes
        Fewest panel genes a signature needs to be scored.
    smooth
        Average each cell's scores with its ``n_neighbors`` nearest spatial neighbours
        (:func:`squidpy.gr.spatial_neighbors_knn`), which reduces the noise of sparse panels.
    n_neighbors
        Neighbours used by ``smooth``.
    spatial_key
        Key of the coordinates in ``obsm`` (``smooth`` only).
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys into the zarr store when ``data`` is a backed SpatialData.

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes ``obsm[key_added]`` (float32, cells x signatures) and
    ``uns[key_added]`` with ``names`` (the column order), ``genes`` (the genes used per signature, comma-joined),
    ``missing`` (the genes not in the panel, comma-joined), ``dropped`` (signatures left out) and the parameters.

    Raises
    ------
    ValueError
        Empty or malformed marker sets, or no signature with enough panel genes.
    """
    from .._table import check_key, resolve_table

    if int(min_genes) < 1:
        raise ValueError(f"min_genes={min_genes} must be at least 1.")
    if smooth and int(n_neighbors) < 1:
        raise ValueError(f"n_neighbors={n_neighbors} must be at least 1.")
    check_key(key_added, "key_added")
    marker_sets = _load_markers(markers)

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    names, used, missing, dropped = _match_genes(marker_sets, adata.var_names, int(min_genes))

    union = list(dict.fromkeys(g for genes in used for g in genes))
    from .._matrix import normalized_expression

    expr = np.asarray(normalized_expression(adata, union, target_sum=1e4, over="all"), dtype=np.float64)
    mean, sd = expr.mean(axis=0), expr.std(axis=0)
    constant = [g for g, s in zip(union, sd) if s <= 0]
    if constant:
        logger.warning(
            "score_signatures: %d marker gene(s) do not vary across cells and add nothing to the scores: %s",
            len(constant),
            constant[:20],
        )
    z = np.divide(expr - mean, sd, out=np.zeros_like(expr), where=sd > 0)
    col = {g: i for i, g in enumerate(union)}
    scores = np.column_stack([z[:, [col[g] for g in genes]].mean(axis=1) for genes in used]).astype(np.float32)
    del expr, z

    if smooth:
        scores = _smooth(adata, scores, n_neighbors=int(n_neighbors), spatial_key=spatial_key)

    adata.obsm[key_added] = scores
    adata.uns[key_added] = {
        "names": list(names),
        "genes": [",".join(g) for g in used],
        "missing": [",".join(m) for m in missing],
        "dropped": list(dropped),
        "method": "mean z-score of log1p(counts / library size * 1e4) over the signature's genes",
        "min_genes": int(min_genes),
        "smooth": bool(smooth),
        "n_neighbors": int(n_neighbors) if smooth else 0,
    }
    logger.info("score_signatures(%r): %d signature(s) scored over %d genes.", key_added, len(names), len(union))
    return ref.finish(write=write, elements=("obsm", "uns"))


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
    ``sep``, e.g. ``"Macrophages/Neutrophils"``. Groups with no enriched signature are ``unassigned``.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``.
    groupby
        obs column of the groups, e.g. the ``key_added`` of :func:`spatial_domains` or a cluster column. Cells
        with a missing group are not labelled (they still count as "other cells").
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
        Persist the new keys into the zarr store when ``data`` is a backed SpatialData.

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes ``obs[key_added]`` (categorical group label),
    ``obs[f"{key_added}_cell"]`` (categorical: the signature with the highest score in each cell) and
    ``uns[key_added]``: the parameters, ``groups`` and their ``labels``, and ``stats`` (one entry per group and
    signature: ``group``, ``signature``, ``auc``, ``statistic``, ``pvalue``, ``pvalue_adj``, ``enriched``,
    ``mean_in``, ``mean_out``).

    Raises
    ------
    KeyError
        Missing scores or group column.
    ValueError
        Bad parameters, or fewer than two groups.
    """
    from scipy.stats import false_discovery_control, mannwhitneyu

    from .._table import check_key, resolve_table

    if not 0 < float(alpha) <= 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1].")
    if not 0.5 <= float(min_auc) <= 1:
        raise ValueError(f"min_auc={min_auc} must be in [0.5, 1].")
    if not 0 <= float(closeness) <= 1:
        raise ValueError(f"closeness={closeness} must be in [0, 1].")
    if int(max_combined) < 1:
        raise ValueError(f"max_combined={max_combined} must be at least 1.")
    key_added = check_key(key_added or f"{groupby}_annotation", "key_added")

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    if signature_key not in adata.obsm or signature_key not in adata.uns or "names" not in adata.uns[signature_key]:
        raise KeyError(
            f"No signature scores {signature_key!r} in the table (obsm / uns). Run "
            f"scx.tl.score_signatures(data, markers, key_added={signature_key!r}) first."
        )
    if groupby not in adata.obs.columns:
        raise KeyError(f"obs has no column {groupby!r} to group cells by. Columns: {list(adata.obs.columns)[:20]}.")
    scores = np.asarray(adata.obsm[signature_key], dtype=np.float64)
    sig_names = [str(s) for s in np.asarray(adata.uns[signature_key]["names"]).tolist()]
    if scores.ndim != 2 or scores.shape[1] != len(sig_names):
        raise ValueError(
            f"obsm[{signature_key!r}] has shape {scores.shape} but uns[{signature_key!r}]['names'] lists "
            f"{len(sig_names)} signatures; rerun score_signatures."
        )
    col = adata.obs[groupby]
    candidates = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col.dropna())
    groups = [g for g in candidates if (col == g).any()]
    if not groups or (len(groups) == 1 and not col.isna().any()):
        raise ValueError(
            f"obs[{groupby!r}] has {len(groups)} non-empty group(s) and no cell outside them; ranking a group "
            "against the rest needs other cells to compare with."
        )

    n_sig = len(sig_names)
    rows = []
    for g in groups:
        inside = (col == g).to_numpy()
        x, y = scores[inside], scores[~inside]
        res = mannwhitneyu(x, y, axis=0, alternative="two-sided", method="asymptotic")
        u = np.asarray(res.statistic, dtype=np.float64)
        auc = u / (x.shape[0] * y.shape[0])
        rows.append((g, auc, u, np.asarray(res.pvalue, dtype=np.float64), x.mean(axis=0), y.mean(axis=0)))
    pvals = np.concatenate([r[3] for r in rows])
    pvals = np.where(np.isnan(pvals), 1.0, pvals)
    padj = false_discovery_control(pvals, method="bh").reshape(len(groups), n_sig)

    labels: dict[Any, str] = {}
    enriched_all = []
    for gi, (g, auc, _, _, _, _) in enumerate(rows):
        enriched = (padj[gi] < alpha) & (auc >= min_auc)
        enriched_all.append(enriched)
        label = _elbow_label(auc, enriched, sig_names, closeness=closeness, max_combined=int(max_combined), sep=sep)
        labels[g] = label or unassigned
    stats = {
        "group": np.repeat(np.asarray([str(g) for g in groups], dtype=str), n_sig),
        "signature": np.tile(np.asarray(sig_names, dtype=str), len(groups)),
        "auc": np.concatenate([r[1] for r in rows]),
        "statistic": np.concatenate([r[2] for r in rows]),
        "pvalue": pvals,
        "pvalue_adj": padj.ravel(),
        "enriched": np.concatenate(enriched_all),
        "mean_in": np.concatenate([r[4] for r in rows]),
        "mean_out": np.concatenate([r[5] for r in rows]),
    }

    group_label = col.map(lambda v: labels.get(v, np.nan) if pd.notna(v) else np.nan)
    label_categories = list(dict.fromkeys(labels[g] for g in groups))
    cell_top = np.asarray(sig_names, dtype=object)[np.argmax(scores, axis=1)]

    adata.obs[key_added] = pd.Categorical(group_label.astype(object), categories=label_categories)
    adata.obs[f"{key_added}_cell"] = pd.Categorical(cell_top, categories=sig_names)
    adata.uns[key_added] = {
        "groupby": groupby,
        "signature_key": signature_key,
        "test": "Wilcoxon rank-sum (Mann-Whitney U), group vs rest, two-sided; Benjamini-Hochberg",
        "alpha": float(alpha),
        "min_auc": float(min_auc),
        "closeness": float(closeness),
        "max_combined": int(max_combined),
        "sep": sep,
        "unassigned": unassigned,
        "groups": [str(g) for g in groups],
        "labels": [labels[g] for g in groups],
        "stats": stats,
    }
    logger.info("annotate_domains(%r): %s", key_added, dict(zip(map(str, groups), (labels[g] for g in groups))))
    return ref.finish(write=write, elements=("obs", "uns"))


# --------------------------------------------------------------------------------------------------------------------


def _elbow_label(
    auc: np.ndarray, enriched: np.ndarray, names: list[str], *, closeness: float, max_combined: int, sep: str
) -> str | None:
    """Top enriched signature, or the close top ones before the largest gap in the sorted effects."""
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
    return sep.join(names[i] for i in order[:k])


def _load_markers(markers: MarkerSets) -> dict[str, list[str]]:
    """Normalize marker sets to ``{name: [genes]}``."""
    source = markers
    if isinstance(markers, str | Path):
        path = Path(markers)
        if not path.is_file():
            raise FileNotFoundError(f"Marker file {str(markers)!r} does not exist; pass a YAML / JSON file or a dict.")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            import json

            markers = json.loads(text)
        else:
            import yaml

            markers = yaml.safe_load(text)
    elif isinstance(markers, pd.DataFrame):
        markers = _markers_from_frame(markers)
    elif not isinstance(markers, Mapping) and hasattr(markers, "to_dict"):
        markers = markers.to_dict()
    if not isinstance(markers, Mapping):
        raise TypeError(
            f"markers must map cell type names to gene lists (a dict, a YAML / JSON file, or the canonical markers), "
            f"got {type(source).__name__}."
        )
    out: dict[str, list[str]] = {}
    for name, genes in markers.items():
        if isinstance(genes, Mapping):
            key = next((k for k in _GENE_KEYS if k in genes), None)
            if key is None:
                raise ValueError(
                    f"Marker set {name!r} is a mapping without a gene list (looked for {list(_GENE_KEYS)}); give "
                    "its genes as a list."
                )
            genes = genes[key]
        if isinstance(genes, str):
            genes = [g.strip() for g in genes.replace(";", ",").split(",")]
        if not isinstance(genes, Sequence | np.ndarray | pd.Index | set):
            raise ValueError(f"Marker set {name!r} is {type(genes).__name__}, not a list of genes.")
        genes = [str(g) for g in genes if str(g).strip()]
        if not genes:
            raise ValueError(f"Marker set {name!r} has no genes; remove it or add its markers.")
        out[str(name)] = list(dict.fromkeys(genes))
    if not out:
        raise ValueError("markers is empty; pass at least one marker set {name: [genes]}.")
    return out


def _markers_from_frame(df: pd.DataFrame) -> dict[str, list[str]]:
    lower = {str(c).lower(): c for c in df.columns}
    name_col = next((lower[c] for c in ("cell_type", "celltype", "name", "label") if c in lower), None)
    gene_col = next((lower[c] for c in ("gene", "genes", "marker", "markers", "gene_symbol") if c in lower), None)
    if name_col is None or gene_col is None:
        raise ValueError(
            f"A marker table needs a cell type column and a gene column (e.g. 'cell_type', 'gene'); got "
            f"{list(df.columns)}."
        )
    return {str(k): v[gene_col].astype(str).tolist() for k, v in df.groupby(name_col, sort=False, observed=True)}


def _match_genes(
    marker_sets: dict[str, list[str]], var_names: pd.Index, min_genes: int
) -> tuple[list[str], list[list[str]], list[list[str]], list[str]]:
    """Genes of each set found in the panel (exact, else a unique case-insensitive match)."""
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
        if miss:
            all_missing[name] = miss
        if len(found) < min_genes:
            dropped.append(name)
            continue
        names.append(name)
        used.append(found)
        missing.append(miss)
    if all_missing:
        logger.warning(
            "score_signatures: marker genes not in the panel were dropped: %s",
            "; ".join(f"{k}: {', '.join(v)}" for k, v in all_missing.items()),
        )
    if dropped:
        logger.warning(
            "score_signatures: %d signature(s) have fewer than %d panel gene(s) and are not scored: %s",
            len(dropped),
            min_genes,
            dropped,
        )
    if not names:
        raise ValueError(
            f"None of the {len(marker_sets)} marker sets has {min_genes} or more genes in the panel of "
            f"{len(var_names)} genes (e.g. {list(map(str, var_names[:5]))}). Check the gene naming (symbols vs "
            "Ensembl ids, species) or give markers that the panel measures."
        )
    return names, used, missing, dropped


def _smooth(adata: AnnData, scores: np.ndarray, *, n_neighbors: int, spatial_key: str) -> np.ndarray:
    import scipy.sparse as sp

    from spatialcx._utils import import_squidpy

    sq = import_squidpy()
    from anndata import AnnData as _AnnData

    from ._domains import _quiet_spatialdata_logger

    if spatial_key not in adata.obsm:
        raise KeyError(f"smooth=True needs coordinates in obsm[{spatial_key!r}]; obsm has {list(adata.obsm.keys())}.")
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    if not np.isfinite(coords).all():
        raise ValueError(f"obsm[{spatial_key!r}] has non-finite coordinates; smoothing needs every cell's position.")
    k = min(n_neighbors, adata.n_obs - 1)
    if k < 1:
        return scores
    tmp = _AnnData(obs=pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str)), obsm={"spatial": coords})
    with _quiet_spatialdata_logger():
        conn, _ = sq.gr.spatial_neighbors_knn(tmp, n_neighs=k, copy=True)
    w = sp.csr_matrix(conn, dtype=np.float64)
    w.data[:] = 1.0
    w = w + sp.identity(adata.n_obs, format="csr")
    w = sp.diags(1.0 / np.asarray(w.sum(axis=1)).ravel()) @ w
    return np.asarray(w @ scores.astype(np.float64), dtype=np.float32)
