"""Confidence QC plot: confidence over the tissue and per cell type."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import CONFIDENCE_SUFFIX, PREDICTED_SUFFIX, UNASSIGNED
from .._settings import logger
from . import _utils
from ._markers import predicted_labels, resolve_threshold

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Colour that marks cells below the threshold (edges on the map, the threshold line, the shares above the strips).
LOW_COLOR = "#ff2d55"
#: Colour of cells without a confidence value.
MISSING_COLOR = "#bdbdbd"
#: Width (points) of the outline of low-confidence cells while at most half of the cells are below the threshold.
OUTLINE_WIDTH = 0.8
#: Thinnest outline, as a share of ``OUTLINE_WIDTH``, reached when nearly all cells are below the threshold.
MIN_OUTLINE_SCALE = 0.3
#: Cells drawn as points narrower than this (points) are not outlined (see ``_utils.MIN_OUTLINED_POINTS``): their
#: colour shows the confidence, with the threshold marked on the colour bar.
MIN_OUTLINED_POINTS = _utils.MIN_OUTLINED_POINTS
#: Longest line of a type's name under the strips; longer names are wrapped at spaces.
MAX_LABEL_LINE = 40
#: Width of a character of the strip panel's title, in ems (a generous average, so that wrapped lines fit).
_CHAR_WIDTH_EM = 0.6
#: Room the strip panel's y axis (label and tick labels) takes left of the plot, in inches.
_Y_AXIS_INCHES = 0.9
#: Types with fewer cells than this have their cells drawn as larger, outlined dots over the median line: one cell sits
#: on its type's median (as does the middle cell of any odd number), and a few small dots look like an empty strip.
FEW_CELLS = 10

_WRITERS = "`scx.tl.predict` or `scx.tl.annotate`"


def _cells(n: int) -> str:
    """``"1 cell"``, ``"2,000 cells"``."""
    return f"{n:,} cell" if n == 1 else f"{n:,} cells"


def _check_columns(adata: AnnData, key: str, confidence_key: str) -> tuple[pd.Series, np.ndarray, str]:
    """Validate and return (labels, confidence, label column used)."""
    obs = adata.obs
    for name, what in ((key, "cell-type labels"), (confidence_key, "confidence")):
        if name not in obs.columns:
            raise KeyError(
                f"obs has no column {name!r} with {what}. It is written by {_WRITERS}; run one of them first or pass "
                f"the right column name. obs columns: {', '.join(map(repr, obs.columns)) or 'none'}."
            )
    raw = obs[confidence_key]
    if not (pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw)):
        raise TypeError(
            f"obs[{confidence_key!r}] must hold numbers (confidence in [0, 1]) but has dtype {raw.dtype} "
            f"(e.g. {raw.iloc[:3].tolist()}). Pass the confidence column written by {_WRITERS}, not a label column."
        )
    conf = raw.to_numpy(dtype=float, na_value=np.nan)
    predicted = f"{key}{PREDICTED_SUFFIX}"
    if (obs[key].astype(object) == UNASSIGNED).any() and predicted in obs.columns:
        logger.info("obs[%r] has %r cells; grouping by the raw prediction obs[%r].", key, UNASSIGNED, predicted)
        labels, label_key = predicted_labels(adata, key)  # by the names the types have in obs[key]
        return labels, conf, label_key
    return obs[key], conf, key


def _check_args(max_points_per_type: int, point_size: float | None) -> None:
    if isinstance(max_points_per_type, bool) or not isinstance(max_points_per_type, int | np.integer):
        raise TypeError(f"max_points_per_type must be a positive integer, got {max_points_per_type!r}.")
    if max_points_per_type < 1:
        raise ValueError(f"max_points_per_type must be a positive integer, got {max_points_per_type}.")
    if point_size is not None and not (isinstance(point_size, Real) and point_size > 0):
        raise ValueError(f"point_size must be a positive number (marker area in points²) or None, got {point_size!r}.")


def _type_summary(labels: pd.Series, conf: np.ndarray, threshold: float) -> pd.DataFrame:
    """Per type: number of cells, median confidence, share below the threshold; sorted by median (highest first)."""
    valid = labels.notna().to_numpy() & np.isfinite(conf)
    frame = pd.DataFrame({"label": labels.astype(object).to_numpy()[valid], "conf": conf[valid]})
    frame["label"] = frame["label"].astype(str)
    summary = frame.groupby("label", sort=False)["conf"].agg(
        n="size", median="median", below=lambda c: float(np.mean(c < threshold))
    )
    summary.index.name = None
    summary["type"] = summary.index
    return summary.sort_values(["median", "type"], ascending=[False, True])


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, width=width, break_long_words=False, break_on_hyphens=False)


def _strip_panel(
    ax: Axes,
    labels: pd.Series,
    conf: np.ndarray,
    summary: pd.DataFrame,
    *,
    width_in: float,
    threshold: float,
    cmap: Colormap,
    norm: Normalize,
    max_points_per_type: int,
    label_key: str,
    confidence_key: str,
    random_state: int,
) -> None:
    rng = np.random.default_rng(random_state)
    valid = labels.notna().to_numpy() & np.isfinite(conf)
    codes = np.where(valid, pd.Categorical(labels.astype(object).astype(str), categories=summary.index).codes, -1)
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes + 1, minlength=len(summary) + 1)))
    xs, ys = [], []
    for i in range(len(summary)):
        idx = members[i + 1]
        if idx.size > max_points_per_type:
            idx = np.sort(rng.choice(idx, size=max_points_per_type, replace=False))
        xs.append(i + rng.uniform(-0.35, 0.35, size=idx.size))
        ys.append(conf[idx])
    x, y = np.concatenate(xs), np.concatenate(ys)
    n_types = len(summary)
    size = 6.0 if n_types <= 20 else 3.0
    # Types of many cells: small translucent dots under the median line, which stays visible over the crowd. Types of
    # few cells: larger opaque dots with a dark edge over the lines, so that no cell is hidden by its median.
    few = np.repeat(summary["n"].to_numpy() < FEW_CELLS, [len(v) for v in xs])
    points = ax.scatter(
        x[~few], y[~few], c=y[~few], cmap=cmap, norm=norm, s=size, alpha=0.7, linewidths=0, rasterized=True, zorder=1
    )
    points.set_label("cells")  # artists keep their labels (no legend is drawn)
    if few.any():
        ax.scatter(
            x[few],
            y[few],
            c=y[few],
            cmap=cmap,
            norm=norm,
            s=4 * size,
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
            label=f"cells of types of fewer than {FEW_CELLS} cells",
        )
    positions = np.arange(n_types)
    ax.hlines(
        summary["median"], positions - 0.4, positions + 0.4, colors="black", linewidths=1.5, label="median", zorder=2
    )
    ax.axhline(threshold, color=LOW_COLOR, linestyle="--", linewidth=1.2, label=f"threshold {threshold:g}", zorder=2)

    ax.set_xticks(positions)
    ax.set_xticklabels(
        [_wrap(f"{lab} ({n:,})", MAX_LABEL_LINE) for lab, n in zip(summary.index, summary["n"])],
        rotation=90 if n_types > 4 else 0,
        fontsize="small" if n_types <= 30 else "x-small",
    )
    ax.set_xlim(-0.6, n_types - 0.4)
    lo = min(0.0, float(np.nanmin(conf[valid]))) if valid.any() else 0.0
    hi = max(1.0, float(np.nanmax(conf[valid]))) if valid.any() else 1.0
    ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
    ax.set_ylabel(confidence_key)
    ax.set_xlabel(f"{label_key} (cells)")

    # Share of each type below the threshold, above the strips.
    blended = ax.get_xaxis_transform()
    fontsize = "small" if n_types <= 20 else "x-small"
    for i, share in enumerate(summary["below"]):
        ax.text(
            i,
            1.01,
            f"{share:.0%}",
            transform=blended,
            ha="center",
            va="bottom",
            fontsize=fontsize,
            color=LOW_COLOR,
            rotation=0 if n_types <= 12 else 90,
            gid="share_below",
        )
    ax.text(
        -0.01,
        1.01,
        f"< {threshold:g}:",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=fontsize,
        color=LOW_COLOR,
    )
    # the key is in the title: a legend inside the axes hides cells whatever corner it takes; its lines are wrapped to
    # the panel's width, so that none is clipped
    from matplotlib.font_manager import FontProperties

    key = ["(black: median; red: share of cells below the threshold"]
    if (summary["n"] < FEW_CELLS).any():
        key[0] += ";"
        key.append(f"large dots: types of fewer than {FEW_CELLS} cells")
    if (summary["n"] > max_points_per_type).any():
        key[-1] += ";"
        noun = "cell" if max_points_per_type == 1 else "cells"
        key.append(f"at most {max_points_per_type:,} random {noun} drawn per type")
    key[-1] += ")"
    em = FontProperties(size="medium").get_size_in_points()
    chars = max(20, int((width_in - _Y_AXIS_INCHES) * 72 / (_CHAR_WIDTH_EM * em)))
    key_text = "\n".join(_wrap(item, chars) for item in key)  # each item on its own lines
    ax.set_title(f"Confidence per cell type\n{key_text}", fontsize="medium", pad=28)


@dataclass
class _MapData:
    geometries: list[_utils.CellGeometry]
    layer: _utils.ImageLayer | None
    bounds: _utils.Bounds


def _prepare_map(
    adata: AnnData,
    sdata: SpatialData | None,
    *,
    image_key: str | None,
    shapes_key: str | None,
    coordinate_system: str,
    spatial_key: str,
) -> _MapData:
    """Find the cells and the image, in ``coordinate_system``, and read the image over the cells' extent."""
    geometries = _utils.cell_geometries(
        adata, sdata, shapes_key=shapes_key, coordinate_system=coordinate_system, spatial_key=spatial_key
    )
    image = _utils.find_image(sdata, image_key, coordinate_system)
    bounds = _utils.union_bounds([g.bounds() for g in geometries])
    layer = None
    if image is not None:
        name, element = image
        matrix = _utils.affine_matrix(element, coordinate_system, name=name)
        layer = _utils.prepare_image(element, matrix, bounds=bounds, name=name)
        if layer is None:
            logger.warning(
                "Image %r does not overlap the cells in coordinate system %r; check the elements' transformations. "
                "Drawing the whole image.",
                name,
                coordinate_system,
            )
            layer = _utils.prepare_image(element, matrix, name=name)
            bounds = _utils.union_bounds([bounds, layer.bounds()])
    return _MapData(geometries, layer, bounds)


def _framed_aspect(bounds: _utils.Bounds) -> float:
    """Width over height of the map as :func:`~spatialcx.pl._utils.set_spatial_limits` frames ``bounds``.

    One cell, or cells at one spot, are framed by a square: the bounds' own ratio (0 / 0) would size the panel for
    a map it does not draw, with the colourbar standing out above and below it.
    """
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()  # not in pyplot: nothing to close
    _utils.set_spatial_limits(ax, bounds)
    (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
    return (x1 - x0) / (y1 - y0)


def outline_width(share_low: float) -> float:
    """Width (points) of the red outline of low-confidence cells when ``share_low`` of the cells are below.

    ``OUTLINE_WIDTH`` up to half of the cells, then thinner in proportion to the share of cells above the threshold,
    down to ``MIN_OUTLINE_SCALE * OUTLINE_WIDTH`` (reached at 85 % below).
    """
    scale = float(np.clip(2.0 * (1.0 - share_low), MIN_OUTLINE_SCALE, 1.0))
    return OUTLINE_WIDTH * scale


def _map_panel(
    ax: Axes,
    map_data: _MapData,
    conf: np.ndarray,
    *,
    threshold: float,
    cmap: Colormap,
    norm: Normalize,
    axis_labels: tuple[str, str],
    point_size: float | None,
) -> None:
    from matplotlib.colors import to_rgba

    _utils.set_spatial_limits(ax, map_data.bounds)
    if map_data.layer is not None:
        _utils.draw_image(ax, map_data.layer)

    finite = np.isfinite(conf)
    low = finite & (conf < threshold)
    face = np.asarray(cmap(norm(np.where(finite, conf, 0.0))))
    face[~finite] = to_rgba(MISSING_COLOR)
    geometries = map_data.geometries
    drawn = np.zeros(len(conf), dtype=bool)
    for geom in geometries:
        drawn[geom.rows] = True
    n_low = int((low & drawn).sum())
    share_low = n_low / max(int((finite & drawn).sum()), 1)
    width = outline_width(share_low)
    # Confident cells first without edges, then low-confidence cells outlined, on top. The outline is thinner the
    # more cells are below the threshold: outlining most cells says little, and thick outlines would hide their
    # colours and the image (draw_cells also keeps it thin next to small cells).
    _utils.draw_cells(ax, geometries, face, subset=~low, point_size=point_size)
    outlined = [
        artist.get_gid() == "outlined"  # cells drawn as points too small to outline keep their colour only
        for artist in _utils.draw_cells(
            ax,
            geometries,
            face,
            subset=low,
            edgecolor=LOW_COLOR,
            linewidth=width,
            point_size=point_size,
            label="low-confidence cells",
        )
    ]

    where = f" over {map_data.layer.name!r}" if map_data.layer is not None else ""
    sources = sorted({g.source if g.source.startswith("obsm[") else repr(g.source) for g in geometries})
    lines = [f"{_cells(int(drawn.sum()))} from {', '.join(sources)}{where}"]
    if any(outlined):
        outline = "red outline" if width == OUTLINE_WIDTH else "thin red outline"
        lines.append(f"{outline}: {n_low:,} ({share_low:.1%}) below {threshold:g}")
    else:  # cells too small to outline (or none below)
        lines.append(f"{n_low:,} ({share_low:.1%}) below {threshold:g} (under the red mark of the colour bar)")
    if (~finite & drawn).any():
        lines[-1] += f"; grey: {int((~finite & drawn).sum()):,} without confidence"
    ax.set_title("\n".join(lines), fontsize="medium")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.tick_params(labelsize="small")


def confidence(
    data: AnnData | SpatialData,
    *,
    key: str = "cell_type",
    confidence_key: str | None = None,
    threshold: float | None = None,
    table_key: str = "table",
    image_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str = "global",
    spatial_key: str = "spatial",
    cmap: str | Colormap = "viridis",
    point_size: float | None = None,
    max_points_per_type: int = 2000,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    random_state: int = 0,
    show: bool = False,
) -> Figure:
    """Plot cell-type confidence over the tissue and per cell type.

    Left: the cells, coloured by confidence, over the tissue image (SpatialData only), with cells below
    ``threshold`` outlined in red (cells drawn as points narrower than ``MIN_OUTLINED_POINTS``, 2.5 points, keep their
    colour only: an outline would cover it). Cells are drawn from the shapes element the table annotates (circles or
    polygons) or from ``shapes_key``, or, when the table annotates a labels element (as the Xenium and CosMx readers
    make it), as circles of each label's area at its centroid; all are transformed to ``coordinate_system`` like the
    image, so both align whatever their transformations. Without such an element, cells are drawn from the
    centroids in ``obsm[spatial_key]``. Right: confidence per cell
    type as jittered strips (types sorted by median confidence, highest first; at most ``max_points_per_type``
    random cells drawn per type; the cells of types of fewer than ``FEW_CELLS``, 10, as larger dots over the median),
    with the median, the threshold and the share of each type's cells below it.

    Parameters
    ----------
    data
        AnnData table or SpatialData object holding it.
    key
        obs column with cell-type labels. When it has ``"Unassigned"`` cells (see
        :func:`spatialcx.tl.filter_low_confidence`) and ``f"{key}_predicted"`` exists, the strips group cells by the
        raw prediction, so that filtered cells stay with their type.
    confidence_key
        obs column with the confidence of each cell, in ``[0, 1]``; defaults to ``{key}_confidence``.
    threshold
        Confidence below which a cell is flagged, in ``[0, 1]``; ``None`` uses the one recorded by
        :func:`spatialcx.tl.filter_low_confidence` in ``uns[key]["confidence_threshold"]`` (else 0.8).
    table_key
        Name of the table in ``data.tables`` (SpatialData only).
    image_key
        Image element to draw under the cells; ``None`` takes the first image, if any. Multiscale images are read
        at the coarsest level sharp enough for display, over the cells' extent only.
    shapes_key
        Shapes element to draw the cells from; ``None`` uses the shapes or labels element(s) the table annotates.
    coordinate_system
        Coordinate system in which image and cells are drawn. When the table annotates several elements (one per
        field of view, each in its own coordinate system), the map shows the cells of those in this coordinate
        system; the strips keep all cells of the table.
    spatial_key
        obsm key with cell centroids, used when there are no shapes. Taken to be in ``coordinate_system`` units.
    cmap
        Colormap for confidence.
    point_size
        Marker area (points²) when cells are drawn as points (centroids, more than 100,000 shapes, or shapes
        smaller than 2.5 points on the figure); ``None`` sizes markers from the cells' size, at least a pixel.
    max_points_per_type
        Most cells drawn per type in the strips (a seeded random subset); statistics use all cells.
    figsize
        Figure size in inches; ``None`` sizes it from the number of types.
    title
        Figure title; ``None`` summarises the share of cells below the threshold.
    save
        Write the figure there (format from the suffix, e.g. ``.png`` or ``.pdf``); parent folders are created.
    random_state
        Seed for the subsampling and the jitter.
    show
        Also leave the figure open in pyplot (for a loop or :func:`matplotlib.pyplot.show`); by default it is closed
        in pyplot and returned, which a notebook shows once, as the cell's result.

    Returns
    -------
    The figure, with the map and the strip plot as its first two axes (the third is the colourbar). When the cells
    have no coordinates (no shapes and no ``obsm[spatial_key]``) and no ``image_key`` is given, the map is left out
    with a logged warning: the strip plot is then the figure's only axes.

    Raises
    ------
    KeyError
        ``key`` or ``confidence_key`` is missing from obs, ``image_key``/``shapes_key`` is not an element, or
        ``table_key`` is not a table.
    TypeError
        ``confidence_key`` is not numeric, or ``data`` is neither an AnnData nor a SpatialData object.
    ValueError
        No coordinates for the cells while ``image_key`` is given, an empty table, ``threshold`` not in ``[0, 1]``,
        or another bad argument.

    Examples
    --------
    >>> fig = scx.pl.confidence(sdata, threshold=0.8, save="plots/confidence.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import Colormap, Normalize

    _check_args(max_points_per_type, point_size)
    show = _utils.check_show(show, "confidence")
    adata, sdata = _utils.split_data(data, table_key)
    threshold = resolve_threshold(adata, key, threshold, fn="confidence")
    confidence_key = confidence_key or f"{key}{CONFIDENCE_SUFFIX}"
    if adata.n_obs == 0:
        raise ValueError(f"The table {table_key!r} has no cells; there is nothing to plot.")
    labels, conf, label_key = _check_columns(adata, key, confidence_key)
    finite = np.isfinite(conf)
    if not finite.any():
        raise ValueError(
            f"obs[{confidence_key!r}] has no finite values (all NaN); run {_WRITERS} to compute confidence."
        )
    cmap = cmap if isinstance(cmap, Colormap) else colormaps[cmap]
    lo, hi = float(np.min(conf[finite])), float(np.max(conf[finite]))
    if lo < 0 or hi > 1:
        logger.warning("obs[%r] has values outside [0, 1] (%.3g to %.3g).", confidence_key, lo, hi)
    norm = Normalize(vmin=min(0.0, lo), vmax=max(1.0, hi))
    summary = _type_summary(labels, conf, threshold)
    if summary.empty:
        raise ValueError(
            f"No cell has both a label in obs[{label_key!r}] and a finite confidence; run {_WRITERS} to label the "
            "cells."
        )

    try:
        map_data = _prepare_map(
            adata,
            sdata,
            image_key=image_key,
            shapes_key=shapes_key,
            coordinate_system=coordinate_system,
            spatial_key=spatial_key,
        )
    except _utils.NoCoordinatesError as e:
        if image_key is not None:  # an image was asked for: the map cannot be left out
            raise
        logger.warning("%s Drawing the confidence per cell type only.", e)
        map_data = None

    # Widths: the map keeps the tissue's aspect ratio (plus the colourbar), the strips grow with the types.
    strip_width = max(4.0, 0.28 * len(summary) + 1.5)
    map_width, cbar_shrink = 0.0, 0.8
    if map_data is not None:
        framed = _framed_aspect(map_data.bounds)
        aspect = float(np.clip(framed, 0.6, 2.0))
        map_width = 5.0 * aspect + 1.6
        # a map wider than the panel leaves is shorter than it: so is the colourbar, which would stand out otherwise
        cbar_shrink *= min(1.0, aspect / framed)
    if figsize is None:  # (the strips alone: wide enough for the figure's title)
        figsize = (map_width + strip_width, 6.5) if map_data is not None else (max(strip_width + 0.5, 6.5), 6.5)
    fig = plt.figure(figsize=figsize, layout="constrained")
    try:
        strip_kwargs = {
            "threshold": threshold,
            "cmap": cmap,
            "norm": norm,
            "max_points_per_type": max_points_per_type,
            "label_key": label_key,
            "confidence_key": confidence_key,
            "random_state": random_state,
        }
        if map_data is None:
            _strip_panel(fig.subplots(), labels, conf, summary, width_in=float(figsize[0]), **strip_kwargs)
            _finish(fig, conf, finite, threshold, confidence_key, title, save)
            return _utils.hand_over(fig, show)
        # one subfigure per panel: the strips' (rotated) type names do not shrink the map, whose aspect is fixed
        sub_map, sub_strip = fig.subfigures(1, 2, width_ratios=[map_width, strip_width], wspace=0.03)
        ax_map, ax_strip = sub_map.subplots(), sub_strip.subplots()
        _map_panel(
            ax_map,
            map_data,
            conf,
            threshold=threshold,
            cmap=cmap,
            norm=norm,
            axis_labels=(f"x ({coordinate_system})", f"y ({coordinate_system})") if sdata is not None else ("x", "y"),
            point_size=point_size,
        )
        strip_share = strip_width / (map_width + strip_width)
        _strip_panel(ax_strip, labels, conf, summary, width_in=float(figsize[0]) * strip_share, **strip_kwargs)
        from matplotlib.cm import ScalarMappable

        cbar = sub_map.colorbar(
            ScalarMappable(norm=norm, cmap=cmap), ax=ax_map, shrink=cbar_shrink, pad=0.02, aspect=30
        )
        cbar.set_label(confidence_key)
        cbar.ax.axhline(threshold, color=LOW_COLOR, linewidth=2)
        _finish(fig, conf, finite, threshold, confidence_key, title, save)
    except BaseException:
        plt.close(fig)
        raise
    return _utils.hand_over(fig, show)


def _finish(
    fig: Figure,
    conf: np.ndarray,
    finite: np.ndarray,
    threshold: float,
    confidence_key: str,
    title: str | None,
    save: str | os.PathLike[str] | None,
) -> None:
    """Add the figure's title and save it."""
    from matplotlib.font_manager import FontProperties

    n_low = int((conf[finite] < threshold).sum())
    if title is None:
        title = (
            f"{confidence_key}: {n_low:,} of {_cells(int(finite.sum()))} ({n_low / finite.sum():.1%}) "
            f"below {threshold:g}"
        )
        em = FontProperties(size="large").get_size_in_points()
        title = _wrap(title, max(20, int(fig.get_figwidth() * 72 / (_CHAR_WIDTH_EM * em))))
    fig.suptitle(title, fontsize="large")
    if save is not None:
        _utils.save_figure(fig, save)
