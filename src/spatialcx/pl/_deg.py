"""``scx.pl.deg_heatmap``: the top differentially expressed panel genes of each predicted type."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger
from .._table import obs_column
from . import _utils
from ._markers import (
    check_label_column,
    check_positive_int,
    draw_group_header,
    fit_text,
    group_codes,
    largest_groups,
    name_counts,
    unassigned_label,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["deg_heatmap"]

#: Methods of :func:`scanpy.tl.rank_genes_groups` accepted.
METHODS = ("wilcoxon", "t-test", "t-test_overestim_var", "logreg")


def subsample_groups(codes: np.ndarray, n_groups: int, max_cells_per_group: int, random_state: int) -> np.ndarray:
    """Sorted row positions: all cells of each group, or a seeded random ``max_cells_per_group`` of them."""
    rng = np.random.default_rng(random_state)
    picked = []
    for k in range(n_groups):
        members = np.flatnonzero(codes == k)
        if members.size > max_cells_per_group:
            members = rng.choice(members, size=max_cells_per_group, replace=False)
        picked.append(members)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _normalized_rows(adata: AnnData, rows: np.ndarray) -> tuple[AnnData, str]:
    """A new AnnData of log1p(10k) expression (sparse) of ``rows``, every gene of the expression source."""
    from .._matrix import normalize_block
    from ..pp._normalization import _read_sampled_rows, find_expression_source

    src = find_expression_source(adata)
    names = pd.Index(src.var_names.astype(str))
    if not names.is_unique:
        dup = list(names[names.duplicated()].unique())
        raise ValueError(
            f"deg_heatmap: the gene names of {src.where} repeat ({len(dup)}, e.g. {dup[:5]}): every gene is tested and "
            "drawn by its name, so two genes of one name would be mixed up. Make them unique first, e.g. with "
            "`adata.var_names_make_unique()`."
        )
    block = _read_sampled_rows(src.matrix, rows)
    x = normalize_block(block, np.arange(block.shape[1]), kind=src.kind, over="all")
    tmp = AnnData(X=x.astype(np.float32), var=pd.DataFrame(index=names))
    tmp.uns["log1p"] = {"base": None}
    return tmp, src.where


def top_genes(
    result: dict, groups: list[str], n_genes: int, *, pval_cutoff: float | None = 0.05
) -> tuple[list[str], list[str]]:
    """Top up-regulated genes of each group from a ``rank_genes_groups`` result, each gene once.

    A group takes its best-ranked genes with a positive score, a positive log fold change (when computed) and an
    adjusted p-value below ``pval_cutoff`` (when computed; ``None`` does not filter) that an earlier group has not
    taken: at most ``n_genes``, fewer when fewer pass.
    """
    names = pd.DataFrame(result["names"])
    scores = pd.DataFrame(result["scores"])
    lfc = pd.DataFrame(result["logfoldchanges"]) if "logfoldchanges" in result else None
    padj = pd.DataFrame(result["pvals_adj"]) if pval_cutoff is not None and "pvals_adj" in result else None
    genes: list[str] = []
    owners: list[str] = []
    taken: set[str] = set()
    for g in groups:
        ok = scores[g].to_numpy(dtype=float) > 0
        if lfc is not None:
            ok &= lfc[g].to_numpy(dtype=float) > 0
        if padj is not None:
            ok &= padj[g].to_numpy(dtype=float) < pval_cutoff  # NaN (untested) fails
        chosen = [str(n) for n in names[g].to_numpy()[ok] if str(n) not in taken][:n_genes]
        taken.update(chosen)
        genes += chosen
        owners += [g] * len(chosen)
    return genes, owners


def deg_heatmap(
    data: AnnData | SpatialData,
    *,
    key: str = "cell_type",
    n_genes: int = 5,
    pval_cutoff: float | None = 0.05,
    method: str = "wilcoxon",
    max_types: int = 60,
    min_cells: int = 10,
    max_cells_per_group: int = 2000,
    random_state: int = 0,
    table_key: str = "table",
    cmap: str = "RdBu_r",
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    dpi: int = 150,
    show: bool = False,
) -> Figure:
    """Heatmap of the top differentially expressed panel genes of each predicted type.

    The cells of each type in obs[``key``] (``"Unassigned"`` left out; types with at least ``min_cells`` cells, the
    ``max_types`` largest) are subsampled to at most ``max_cells_per_group`` (seeded), normalized to log1p(10k) from
    the raw counts, and tested one type against the rest with :func:`scanpy.tl.rank_genes_groups` on a temporary
    AnnData (nothing is written into the table). Each type contributes its best up-regulated genes (positive score
    and log fold change, Benjamini-Hochberg adjusted p-value below ``pval_cutoff``; each gene shown once):
    ``n_genes`` at most, fewer when fewer pass, so that background genes are not drawn as if they were markers. The
    heatmap shows each type's mean expression over the subsample, z-scored per gene across types; the blocks where
    a type meets its own genes are outlined.

    Parameters
    ----------
    data
        AnnData table or SpatialData object holding it.
    key
        obs column with the cell-type labels.
    n_genes
        Most genes per type.
    pval_cutoff
        Largest Benjamini-Hochberg adjusted p-value (``pvals_adj`` of :func:`scanpy.tl.rank_genes_groups`) of a
        gene shown, in (0, 1]; ``None`` shows the best-ranked up-regulated genes whatever their p-value. ``"logreg"``
        computes no p-values, so the cutoff does not apply to it.
    method
        Test of :func:`scanpy.tl.rank_genes_groups`: ``"wilcoxon"``, ``"t-test"``, ``"t-test_overestim_var"`` or
        ``"logreg"``.
    max_types
        Most types (rows): the largest ones, shown in the order of obs[``key``]'s categories. The smaller types are
        left out of the test and the figure, counted in a note and named in a logged warning. The default keeps the
        types of typical references; hundreds (fine clusters) would make an unreadable figure, slowly.
    min_cells
        Types with fewer cells are left out (named in a note over the heatmap). A type of a single cell cannot be
        tested, so it is left out (and named) even with ``min_cells=1``.
    max_cells_per_group
        Most cells per type used for the test and the means.
    random_state
        Seed of the subsample.
    table_key
        Name of the table in ``data.tables`` (SpatialData only).
    cmap
        Diverging colormap of the z-scores.
    title
        Figure title.
    save
        Write the figure there (format from the suffix); parent folders are created.
    dpi
        Resolution of the saved figure.
    show
        Also leave the figure open in pyplot (for a loop or :func:`matplotlib.pyplot.show`); by default it is closed
        in pyplot and returned, which a notebook shows once, as the cell's result.

    Returns
    -------
    The figure: the heatmap axes (rows: types, columns: genes, an image whose array holds the z-scores), the type
    header above and the colourbar.

    Raises
    ------
    KeyError
        ``key`` is missing from obs.
    ValueError
        Fewer than two types have ``min_cells`` cells, gene names repeat, or a bad argument.
    """
    import matplotlib.pyplot as plt
    import scanpy as sc
    from matplotlib.patches import Rectangle

    fn = "deg_heatmap"
    show = _utils.check_show(show, fn)
    adata, _ = _utils.split_data(data, table_key)
    check_label_column(adata, key, fn=fn)
    n_genes = check_positive_int(n_genes, "n_genes", fn=fn)
    max_types = check_positive_int(max_types, "max_types", fn=fn, minimum=2)
    min_cells = check_positive_int(min_cells, "min_cells", fn=fn)
    max_cells_per_group = check_positive_int(max_cells_per_group, "max_cells_per_group", fn=fn, minimum=2)
    if pval_cutoff is not None and (
        isinstance(pval_cutoff, bool) or not (isinstance(pval_cutoff, int | float) and 0 < pval_cutoff <= 1)
    ):
        raise ValueError(
            f"{fn}: pval_cutoff must be in (0, 1] (e.g. 0.05), or None to show genes whatever their p-value; got "
            f"{pval_cutoff!r}."
        )
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS} (scanpy.tl.rank_genes_groups), got {method!r}.")

    # rank_genes_groups cannot test a group of one cell: such a type is left out and named, whatever min_cells says
    min_cells = max(min_cells, 2)
    groups, codes, sizes, too_small = group_codes(
        obs_column(adata, key), min_cells=min_cells, exclude=(unassigned_label(adata, key),)
    )
    if len(groups) < 2:
        raise ValueError(
            f"{fn}: differential expression needs at least two types with min_cells={min_cells} cells in "
            f"obs[{key!r}] (besides 'Unassigned'); found {groups or 'none'}"
            + (f" and smaller ones: {name_counts(too_small)}" if too_small else "")
            + ". Lower min_cells or check the labels."
        )
    groups, codes, sizes, n_left_out = largest_groups(groups, codes, sizes, max_types, fn=fn)
    rows = subsample_groups(codes, len(groups), max_cells_per_group, random_state)
    tmp, where = _normalized_rows(adata, rows)
    group_names = np.asarray(groups, dtype=object)[codes[rows]]
    tmp.obs["group"] = pd.Categorical(group_names, categories=groups)
    tmp.obs_names = adata.obs_names[rows].astype(str)
    logger.info("%s: %s on %d cells of %d types (log1p(10k) of %s)", fn, method, len(rows), len(groups), where)
    kwargs = {"random_state": random_state} if method == "logreg" else {}
    with warnings.catch_warnings():
        # scanpy fills its result frame column by column: pandas warns about fragmentation once per group (dozens)
        warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(tmp, "group", method=method, use_raw=False, key_added="rank", **kwargs)
    genes, owners = top_genes(tmp.uns["rank"], groups, n_genes, pval_cutoff=pval_cutoff)
    filtered = pval_cutoff is not None and "pvals_adj" in tmp.uns["rank"]
    if not genes:
        raise ValueError(
            f"{fn}: no gene is up-regulated in any type ({method}"
            + (f", adjusted p-value < {pval_cutoff:g}" if filtered else "")
            + "); the types are not separable"
            + (", or raise pval_cutoff / pass pval_cutoff=None." if filtered else ".")
        )
    counts = {g: owners.count(g) for g in groups}
    short = {g: c for g, c in counts.items() if c < n_genes}
    if short:
        logger.info("%s: fewer than %d significant up-regulated genes for %s", fn, n_genes, short)

    cols = tmp.var_names.get_indexer(genes)
    x = tmp.X[:, cols]
    from scipy import sparse

    member = sparse.csr_matrix(pd.get_dummies(tmp.obs["group"]).to_numpy(dtype=np.float64).T)  # types x cells
    means = (member @ x).toarray() / np.asarray(member.sum(axis=1))
    sd = means.std(axis=0)
    z = np.where(sd > 0, (means - means.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)

    # ---- figure ----
    from ._markers import _header_height, _label_width, text_inches, wrap_notes

    n_rows, n_cols = len(groups), len(genes)
    row_labels = [f"{g} ({n:,})" for g, n in zip(groups, sizes, strict=True)]
    header_h, gene_h = _header_height(owners), text_inches(genes, 9) + 0.2
    cell_w, cell_h = max(0.26 * n_cols, 1.5), max(0.3 * n_rows, 1.2)
    left_w = _label_width(row_labels)
    fig_w = left_w + cell_w + 1.3
    notes = []
    if n_left_out:
        notes.append(f"{n_left_out} smaller types not shown (max_types={max_types})")
    if too_small:
        notes.append(f"fewer than {min_cells} cells, not tested: {name_counts(too_small)}")
    note = wrap_notes(notes, cell_w + 1.2, 8)
    fig_h = 0.7 + header_h + cell_h + gene_h + (0.15 + 0.14 * (note.count("\n") + 1) if note else 0.0)
    fig = plt.figure(figsize=(max(fig_w, 6.0), max(fig_h, 3.5)), layout="constrained")
    try:
        grid = fig.add_gridspec(2, 2, height_ratios=[header_h, cell_h], width_ratios=[cell_w, 0.25], hspace=0.0)
        ax = fig.add_subplot(grid[1, 0])
        header = fig.add_subplot(grid[0, 0], sharex=ax)
        cax = fig.add_subplot(grid[1, 1])
        vmax = float(max(np.abs(z).max(), 1e-9))
        image = ax.imshow(z, aspect="auto", cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
        for i, g in enumerate(groups):
            own = [j for j, o in enumerate(owners) if o == g]
            if own:
                ax.add_patch(
                    Rectangle((own[0] - 0.5, i - 0.5), len(own), 1, fill=False, edgecolor="black", linewidth=1.2)
                )
        ax.set_xticks(np.arange(n_cols), genes, rotation=90, fontsize=9)
        ax.set_yticks(np.arange(n_rows), row_labels, fontsize=9)
        ax.set_ylabel(f"{key} (cells)")
        ax.tick_params(length=2)
        draw_group_header(header, owners)
        header.tick_params(labelbottom=False)
        cbar = fig.colorbar(image, cax=cax)
        cbar.set_label("mean log1p(10k), z-score per gene", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        if title is None:
            capped = " (subsampled)" if (sizes > max_cells_per_group).any() else ""
            title = (
                f"Top {n_genes} DE genes per type in obs[{key!r}]"
                + (f" (adj. p < {pval_cutoff:g}; fewer where fewer pass)" if filtered else "")
                + f": {method}, one type vs rest, ≤ {max_cells_per_group:,} cells per type{capped}"
            )
            # wrapped to the figure's width, which few genes make narrow
            title = fit_text(title, fig.get_figwidth() - 0.3, 10)
        fig.suptitle(title, fontsize=10)
        if note:
            header.set_title(note, fontsize=8, color="#c62828", loc="left")
        if save is not None:
            _utils.save_figure(fig, save, dpi=dpi)
    except BaseException:
        plt.close(fig)
        raise
    return _utils.hand_over(fig, show)
