"""Diagnostic figure of :func:`spatialcx.tl.classify_by_threshold` (``scx.pl.threshold``)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._table import obs_column

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_LOW, _HIGH = "#9e9e9e", "#d62728"
#: Unit of the genes' axes: how classify_by_threshold reads them.
GENE_UNIT = "log1p(counts per 10k)"
#: Most features drawn in the pairwise scatters (the first ones of the classification).
MAX_PAIR_FEATURES = 4


def threshold(
    data: AnnData | SpatialData,
    key: str = "threshold",
    *,
    table_key: str = "table",
    max_points: int = 20_000,
    bins: int = 80,
    random_state: int = 0,
    save: str | Path | None = None,
    dpi: int = 150,
    show: bool = False,
) -> Figure:
    """Plot the score histogram with the threshold, and pairwise feature scatters coloured by class.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``, classified by
        :func:`spatialcx.tl.classify_by_threshold` with ``key_added=key``.
    key
        The ``key_added`` of the classification.
    table_key
        Table to use when ``data`` is SpatialData.
    max_points
        Most cells drawn in each scatter (a seeded random subset; the histogram uses every cell).
    bins
        Histogram bins.
    random_state
        Seed of the subset drawn in the scatters.
    save
        Path to save the figure to (format from the suffix, e.g. ``.png`` or ``.pdf``; the folder is created).
    dpi
        Resolution of the saved figure.
    show
        Also leave the figure open in pyplot (for a loop or :func:`matplotlib.pyplot.show`); by default it is closed
        in pyplot and returned, which a notebook shows once, as the cell's result.

    Returns
    -------
    The matplotlib figure: panel 1 the score histogram (low and high cells stacked, log-scaled counts) with the
    threshold line, then one scatter per pair of the first four features (genes as log1p(counts per 10k), the unit
    given on their axes; obs columns as they are), its cells drawn in a seeded random order so that neither class
    hides the other where they overlap.
    """
    import matplotlib.pyplot as plt

    from .._table import get_table
    from .._utils import whole_number
    from ._utils import check_show, hand_over, save_figure

    show = check_show(show, "threshold")
    max_points = whole_number(max_points, "max_points", minimum=1)  # the most cells drawn in each scatter
    adata = get_table(data, table_key)
    params, score, cluster = _classification(adata, key)
    features = list(params.get("features", []))
    kinds = list(params.get("feature_kinds", ["obs"] * len(features)))
    gone = [f for f, k in zip(features[:MAX_PAIR_FEATURES], kinds) if k != "gene" and f not in adata.obs.columns]
    if len(features) > 1 and gone:
        raise KeyError(
            f"The classification {key!r} used the obs column(s) {gone}, which are no longer in the table, so its "
            "feature scatters cannot be drawn. Restore the column(s), or classify again with the current features."
        )
    pair_feats = features[:MAX_PAIR_FEATURES] if len(features) > 1 else []
    pairs = list(combinations(range(len(pair_feats)), 2))

    n_panels = 1 + len(pairs)
    ncols = min(n_panels, 4)
    nrows = int(np.ceil(n_panels / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    try:
        axes = axes.ravel()

        thr = float(params["threshold"])
        ax = axes[0]
        edges = np.histogram_bin_edges(score, bins=bins)
        high = cluster == 1
        labels = [f"low ({int((~high).sum()):,})", f"high ({int(high.sum()):,})"]  # the scatters' legend too
        ax.hist([score[~high], score[high]], bins=edges, stacked=True, color=[_LOW, _HIGH], label=labels)
        ax.axvline(thr, color="k", ls="--", lw=1)  # its value is in the title
        ax.set_yscale("log")
        if len(features) > 1:
            ax.set_xlabel(f"{key} score ({params.get('metagene')})")
        else:
            ax.set_xlabel(_axis_label(features[0], kinds[0]) if features else f"{key} score")
        ax.set_ylabel("cells")
        ax.set_title(
            f"{params.get('method', '')}: threshold {thr:.3g}, {int(high.sum()):,} / {high.size:,} high", fontsize=9
        )
        ax.legend(frameon=False, fontsize=8)

        if pairs:
            rng = np.random.default_rng(random_state)
            idx = np.arange(adata.n_obs)
            if idx.size > max_points:
                idx = np.sort(rng.choice(idx, size=max_points, replace=False))
            values = _feature_values(adata[idx], pair_feats, kinds[: len(pair_feats)])
            # Cells are drawn in a seeded random order, low and high mixed in one collection. Drawing one class after
            # the other would hide the first wherever they overlap (e.g. the many cells with no count of a gene, piled
            # on the axis): in a random order, the colour that shows where cells pile up follows the mix of the classes
            # there, so neither class is hidden and neither looks more common than it is.
            order = rng.permutation(idx.size)
            colors = np.where(cluster[idx][order] == 1, _HIGH, _LOW)
            subset = f"random {idx.size:,} of {adata.n_obs:,} cells" if idx.size < adata.n_obs else ""
            for ax, (i, j) in zip(axes[1:], pairs):
                ax.scatter(values[order, i], values[order, j], c=colors, s=3, lw=0, rasterized=True, gid="cells")
                ax.set_xlabel(_axis_label(pair_feats[i], kinds[i]))
                ax.set_ylabel(_axis_label(pair_feats[j], kinds[j]))
                if subset:
                    ax.set_title(subset, fontsize=9)
        for ax in axes[n_panels:]:
            ax.set_visible(False)
        fig.tight_layout()
        if save is not None:
            save_figure(fig, save, dpi=dpi)
    except BaseException:
        plt.close(fig)
        raise
    return hand_over(fig, show)


def _axis_label(feature: str, kind: str) -> str:
    """A feature's axis label: genes with their unit, obs columns as they are."""
    return f"{feature}, {GENE_UNIT}" if kind == "gene" else feature


def _classification(adata: AnnData, key: str) -> tuple[dict, np.ndarray, np.ndarray]:
    cols = [f"{key}_score", f"{key}_cluster"]
    missing = [c for c in cols if c not in adata.obs.columns]
    if key not in adata.uns or missing:
        raise KeyError(
            f"No classification {key!r} in the table (missing {missing or [f'uns[{key!r}]']}). Run "
            f"scx.tl.classify_by_threshold(data, features, key_added={key!r}) first."
        )
    params = dict(adata.uns[key])
    score = obs_column(adata, f"{key}_score").to_numpy(dtype=np.float64)
    cluster = obs_column(adata, f"{key}_cluster").to_numpy().astype(int)
    return params, score, cluster


def _feature_values(adata: AnnData, features: list[str], kinds: list[str]) -> np.ndarray:
    out = np.empty((adata.n_obs, len(features)), dtype=np.float64)
    genes = [f for f, k in zip(features, kinds) if k == "gene"]
    if genes:
        from .._matrix import normalized_expression

        expr = np.asarray(normalized_expression(adata, genes, target_sum=1e4, over="all"))
        for j, g in enumerate(genes):
            out[:, features.index(g)] = expr[:, j]
    for f, k in zip(features, kinds):
        if k != "gene":
            out[:, features.index(f)] = obs_column(adata, f).to_numpy(dtype=np.float64)
    return out
