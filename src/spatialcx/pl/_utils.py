"""Shared plotting helpers: find a table's image and shapes, bring them into one coordinate system, draw, save.

Everything here works on plain arrays once the elements are found: an element's transformation to the target
coordinate system is reduced to a 2D affine matrix (``x, y`` in, ``x, y`` out) with
:func:`spatialdata.transformations.get_transformation`, and the geometry is transformed with numpy. Images are
drawn with :meth:`~matplotlib.axes.Axes.imshow` in coordinate-system units, cells with matplotlib collections in data
units (circles as :class:`~matplotlib.collections.EllipseCollection`, polygons as
:class:`~matplotlib.collections.PolyCollection`, centroids as a scatter, or, above ``MAX_SCATTER_POINTS`` of them, as
an image of the points binned onto the axes' pixel grid), so that image and cells align whatever their transforms are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from anndata import AnnData

from .._settings import logger
from .._table import instance_positions
from .._utils import write_atomically

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage
    from spatialdata import SpatialData

#: Largest side, in pixels, of an image as drawn (images are read at the pyramid level closest above, then binned).
MAX_IMAGE_PIXELS = 2000
#: Above this many cells, shapes are drawn as points at their centroids (each cell is then a few pixels at most).
MAX_SHAPES = 100_000
#: Cells whose median diameter on the figure is below this many points are drawn as points of at least a pixel:
#: smaller circles and polygons are antialiased to a faint tint of their colour, and an edge of any width on circles
#: and polygons a few pixels wide covers their colour (8,000 Xenium cells drawn as circles 1.6 points across, 63 % of
#: them with a red edge of a fifth of their diameter, came out brown-red all over). As points, they follow the rule of
#: the confidence map's scatter: points narrower than ``MIN_OUTLINED_POINTS`` (2.5 points) are not outlined.
MIN_SHAPE_POINTS = 2.5
#: Cells drawn as points narrower than this (points) get no edge from :func:`draw_cells`: a scatter marker's edge lies
#: half outside it, and on markers a few pixels wide the edges of crowded cells cover their colours (85,000 Xenium
#: cells drawn as points 1.2 points across came out red all over with half of them outlined). Artists drawn with an
#: edge have the gid ``"outlined"``.
MIN_OUTLINED_POINTS = 2.5
#: Most pixels of a labels element read to find its cells' centroids: larger elements are read at the finest pyramid
#: level under this size (a Xenium section of 10^9 pixels at a quarter of its resolution, 0.85 µm per pixel).
MAX_LABEL_PIXELS = 100_000_000
#: Resolution of saved raster figures and of rasterized layers in vector figures.
SAVE_DPI = 150
#: Above this many cells drawn as points in one layer, the points are drawn as an image: each is binned onto a pixel
#: grid of the axes at ``SAVE_DPI`` (the cell drawn last wins a pixel, as in a scatter). A million cells drawn and saved
#: take 2.2 s this way against 6.5 s as matplotlib markers (``benchmarks/plot_points.py``, 2 cores), and the picture is
#: the same at these sizes (a cell is a pixel or two).
MAX_SCATTER_POINTS = 100_000
#: Largest side, in pixels, of an image of points.
MAX_POINT_IMAGE_PIXELS = 4000
#: Most width, in pixels, of a point drawn into an image of points (larger points are drawn that wide).
MAX_POINT_PIXELS = 25
#: Most width of a cell's edge, as a share of the cell's diameter on screen (an edge is drawn half inside the cell:
#: wider edges would hide the cell's colour).
MAX_EDGE_FRACTION = 0.2

#: Margin, in coordinate-system units, around cells that all lie at one spot (e.g. a single cell drawn as a point):
#: about a cell's size in µm or pixels.
SINGLE_SPOT_PAD = 10.0

Bounds = tuple[float, float, float, float]  # xmin, xmax, ymin, ymax


class NoCoordinatesError(ValueError):
    """The table has no shapes to draw its cells from and no centroids in ``obsm``."""


# --------------------------------------------------------------------------------------------------------------------
# Finding the table and its elements
# --------------------------------------------------------------------------------------------------------------------


def split_data(data: AnnData | SpatialData, table_key: str = "table") -> tuple[AnnData, SpatialData | None]:
    """Return the table and the SpatialData that holds it (``None`` for an AnnData), to read from.

    Nothing is copied: a view stays a view (the plots only read the table).

    Parameters
    ----------
    data
        An AnnData table or a SpatialData object.
    table_key
        Name of the table in ``data.tables`` (SpatialData only).

    Returns
    -------
    The table and the SpatialData object, or the AnnData and ``None``.

    Raises
    ------
    TypeError
        ``data`` is neither an AnnData nor a SpatialData object.
    KeyError
        The SpatialData object has no table ``table_key``.
    """
    from anndata import AnnData

    from .._table import get_table

    return get_table(data, table_key), (None if isinstance(data, AnnData) else data)


def _available(keys: Any) -> str:
    keys = sorted(map(str, keys))
    return ", ".join(repr(k) for k in keys) if keys else "none"


def _coordinate_systems(element: Any) -> list[str]:
    """Names of the coordinate systems an element has a transformation to."""
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def find_image(
    sdata: SpatialData | None, image_key: str | None = None, coordinate_system: str | None = None
) -> tuple[str, Any] | None:
    """Pick the image element to draw under the cells.

    Parameters
    ----------
    sdata
        The SpatialData object, or ``None`` (AnnData input: there is no image).
    image_key
        Name of an element of ``sdata.images``; ``None`` picks the first one, if any (the first one with a
        transformation to ``coordinate_system`` when it is given: one image per field of view, each in its own
        coordinate system, is a common layout).
    coordinate_system
        The coordinate system the image is drawn in; only used when ``image_key`` is ``None``.

    Returns
    -------
    ``(name, element)`` or ``None`` when there is no image to draw.

    Raises
    ------
    KeyError
        ``image_key`` is not an image of ``sdata``.
    ValueError
        ``image_key`` was given for an AnnData.
    """
    if sdata is None:
        if image_key is not None:
            raise ValueError(
                f"image_key={image_key!r} was given, but the data is an AnnData, which holds no image elements. "
                "Pass the SpatialData object that holds the table and the image, or leave image_key=None."
            )
        return None
    if image_key is None:
        names = [
            name
            for name, element in sdata.images.items()
            if coordinate_system is None or coordinate_system in _coordinate_systems(element)
        ]
        if not names:
            if len(sdata.images):
                logger.info(
                    "No image element has a transformation to coordinate system %r (images: %s); drawing no image.",
                    coordinate_system,
                    _available(sdata.images.keys()),
                )
            return None
        image_key = names[0]
        logger.info("Drawing cells over image %r (the first image element); choose another with image_key.", image_key)
    elif image_key not in sdata.images:
        raise KeyError(
            f"image_key={image_key!r} is not an image element of the SpatialData object. "
            f"Available images: {_available(sdata.images.keys())}."
        )
    return image_key, sdata.images[image_key]


def affine_matrix(element: Any, coordinate_system: str, *, name: str = "element") -> np.ndarray:
    """Return the 3 x 3 affine matrix (``x, y`` in, ``x, y`` out) from an element to a coordinate system.

    Parameters
    ----------
    element
        A SpatialData element (image, labels, shapes, points).
    coordinate_system
        The target coordinate system.
    name
        Name of the element, for error messages.

    Returns
    -------
    The matrix ``M`` such that ``M @ [x, y, 1]`` are the coordinates in ``coordinate_system``.

    Raises
    ------
    ValueError
        The element has no transformation to ``coordinate_system``.
    """
    from spatialdata.transformations import get_transformation

    transformations = get_transformation(element, get_all=True)
    if coordinate_system not in transformations:
        raise ValueError(
            f"Element {name!r} has no transformation to coordinate system {coordinate_system!r}, so it cannot be drawn "
            f"there. Its coordinate systems: {_available(transformations)}. Pass one of them as coordinate_system."
        )
    matrix = transformations[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return np.asarray(matrix, dtype=float)


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3 x 3 affine matrix to an ``(n, 2)`` array of ``x, y`` coordinates."""
    xy = np.asarray(xy, dtype=float)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


# --------------------------------------------------------------------------------------------------------------------
# Cells: shapes or centroids, in the target coordinate system
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CellGeometry:
    """Cells of one element, in the target coordinate system.

    Attributes
    ----------
    rows
        Positions (into the table's rows) of the cells, one per drawn item.
    centers
        ``(n, 2)`` centres (circles), centroids (points) or vertex means (polygons), one per item of ``rows``.
    kind
        ``"circles"``, ``"polygons"`` or ``"points"``.
    n_cells
        Number of distinct table rows (a cell drawn as a multipolygon is one item per part).
    widths, heights, angles
        Circles only: full axis lengths and angle (degrees, counter-clockwise) of each circle after the transform,
        which makes ellipses of circles when the scale is anisotropic.
    vertices, offsets
        Polygons only: the exterior rings of all items stacked, ``(m, 2)``, and where each starts
        (``vertices[offsets[i]:offsets[i + 1]]`` is item ``i``).
    source
        Name of the element the cells come from, or ``"obsm['spatial']"``.
    """

    rows: np.ndarray
    centers: np.ndarray
    kind: Literal["circles", "polygons", "points"]
    n_cells: int
    widths: np.ndarray | None = None
    heights: np.ndarray | None = None
    angles: np.ndarray | None = None
    vertices: np.ndarray | None = None
    offsets: np.ndarray | None = None
    source: str = ""

    def polygons(self, items: np.ndarray | None = None) -> list[np.ndarray]:
        """Exterior ring of each item (or of ``items``), an ``(m, 2)`` array each."""
        items = np.arange(len(self.rows)) if items is None else items
        return [self.vertices[self.offsets[i] : self.offsets[i + 1]] for i in items]

    def take(self, items: np.ndarray) -> CellGeometry:
        """The geometry of ``items`` only (positions into :attr:`rows`)."""
        items = np.asarray(items, dtype=np.int64)
        extra: dict[str, Any] = {}
        if self.kind == "circles":
            extra = {"widths": self.widths[items], "heights": self.heights[items], "angles": self.angles[items]}
        elif self.kind == "polygons":
            counts = np.diff(self.offsets)[items]
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            vertex = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - self.offsets[:-1][items], counts)
            extra = {"vertices": self.vertices[vertex], "offsets": offsets}
        rows = self.rows[items]
        return CellGeometry(
            rows=rows,
            centers=self.centers[items],
            kind=self.kind,
            n_cells=int(np.unique(rows).size),
            source=self.source,
            **extra,
        )

    def placed(self) -> np.ndarray:
        """Whether each item has a finite position (and size): items without one cannot be drawn."""
        ok = np.isfinite(self.centers).all(axis=1)
        if self.kind == "circles":
            ok &= np.isfinite(self.widths) & np.isfinite(self.heights)
        return ok

    def bounds(self) -> Bounds:
        """Return ``(xmin, xmax, ymin, ymax)`` of the cells, shapes included."""
        if self.kind == "polygons":
            xy = self.vertices
            return float(xy[:, 0].min()), float(xy[:, 0].max()), float(xy[:, 1].min()), float(xy[:, 1].max())
        pad = 0.0 if self.widths is None else np.maximum(self.widths, self.heights) / 2
        x, y = self.centers[:, 0], self.centers[:, 1]
        return float((x - pad).min()), float((x + pad).max()), float((y - pad).min()), float((y + pad).max())

    def typical_size(self) -> float:
        """Median cell diameter in coordinate-system units (0 for points)."""
        if self.kind == "circles":
            return float(np.median((self.widths + self.heights) / 2))
        if self.kind == "polygons":
            sample = np.arange(0, len(self.rows), max(1, len(self.rows) // 1000))
            return float(np.median([np.ptp(p, axis=0).mean() for p in self.polygons(sample)]))
        return 0.0


def union_bounds(bounds: Sequence[Bounds]) -> Bounds:
    """Smallest box holding all ``bounds``."""
    b = np.asarray(bounds, dtype=float)
    return float(b[:, 0].min()), float(b[:, 1].max()), float(b[:, 2].min()), float(b[:, 3].max())


def _shapes_geometry(gdf: Any, matrix: np.ndarray, rows: np.ndarray, source: str) -> CellGeometry:
    """Transform the geometries of ``gdf`` (already aligned with ``rows``) with ``matrix``.

    Above :data:`MAX_SHAPES` polygons (drawn as points then), each is kept as the circle of its area at its centroid:
    reading and transforming every vertex of a million polygons takes seconds and gigabytes for nothing.
    """
    import shapely

    geoms = np.asarray(gdf.geometry.values, dtype=object)
    # Empty or missing geometries (left by some segmentations and clipping) have no position: they are not drawn, and
    # they are dropped first, as shapely leaves them out of the coordinates it returns.
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    if not present.all():
        logger.warning(
            "%d of %d cells of %r have an empty geometry and are not drawn.", (~present).sum(), present.size, source
        )
        gdf, geoms, rows = gdf.iloc[np.flatnonzero(present)], geoms[present], rows[present]
    types = shapely.get_type_id(geoms)
    if np.all(types == shapely.GeometryType.POINT):
        centers = apply_affine(matrix, shapely.get_coordinates(geoms)[:, :2])
        if "radius" not in gdf.columns:
            return CellGeometry(rows=rows, centers=centers, kind="points", n_cells=len(rows), source=source)
        return _circles(rows, centers, 2 * np.asarray(gdf["radius"], dtype=float), matrix, source)
    polygonal = np.isin(types, [shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON])
    if not polygonal.all():
        found = sorted({shapely.GeometryType(t).name for t in np.unique(types[~polygonal])})
        raise ValueError(
            f"Shapes element {source!r} mixes geometry types ({', '.join(found)} besides polygons); cells can be drawn "
            "from circles (points with a 'radius' column) or from polygons. Pass another element as shapes_key."
        )
    if len(geoms) > MAX_SHAPES:
        centroids = shapely.get_coordinates(shapely.centroid(geoms))
        diameters = 2 * np.sqrt(shapely.area(geoms) / np.pi)
        return _circles(rows, apply_affine(matrix, centroids), diameters, matrix, source)
    parts, part_of = shapely.get_parts(geoms, return_index=True)
    rings = shapely.get_exterior_ring(parts)
    vertices = apply_affine(matrix, shapely.get_coordinates(rings)[:, :2])
    counts = shapely.get_num_coordinates(rings)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    # Mean of each ring's vertices (rings are closed: the last repeats the first): a cheap marker position.
    ok = counts > 1
    centers = np.full((len(parts), 2), np.nan)
    sums = np.add.reduceat(vertices, offsets[:-1][ok], axis=0) if ok.any() else np.zeros((0, 2))
    centers[ok] = (sums - vertices[offsets[1:][ok] - 1]) / (counts[ok, None] - 1)
    return CellGeometry(
        rows=rows[part_of],
        centers=centers,
        kind="polygons",
        n_cells=len(rows),
        vertices=vertices,
        offsets=offsets,
        source=source,
    )


def _circles(
    rows: np.ndarray, centers: np.ndarray, diameters: np.ndarray, matrix: np.ndarray, source: str
) -> CellGeometry:
    """Circles of ``diameters`` (element units) at ``centers`` (already transformed), under the linear part of ``matrix``.

    A circle maps under ``A = U S V^T`` to an ellipse with axes ``diameter * S`` and the first axis along ``U[:, 0]``.
    """
    u, s, _ = np.linalg.svd(matrix[:2, :2])
    angle = float(np.degrees(np.arctan2(u[1, 0], u[0, 0])))
    return CellGeometry(
        rows=rows,
        centers=centers,
        kind="circles",
        n_cells=len(rows),
        widths=diameters * s[0],
        heights=diameters * s[1],
        angles=np.full(len(rows), angle),
        source=source,
    )


def _label_lookup(ids: np.ndarray) -> Any:
    """A function from label values to positions in ``ids`` (-1 for labels not in ``ids``)."""
    if ids.size and ids.min() >= 0 and ids.max() < 2**24:  # a dense table: one array lookup per pixel
        table = np.full(int(ids.max()) + 2, -1, dtype=np.int64)
        table[ids] = np.arange(ids.size)
        last = table.size - 1  # stays -1: every value above the largest id goes there

        def lookup(values: np.ndarray) -> np.ndarray:
            return table[np.clip(values, 0, last)] if values.size else values.astype(np.int64)

        return lookup
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def lookup(values: np.ndarray) -> np.ndarray:
        at = np.clip(np.searchsorted(sorted_ids, values), 0, max(sorted_ids.size - 1, 0))
        hit = sorted_ids[at] == values if sorted_ids.size else np.zeros(values.shape, dtype=bool)
        return np.where(hit, order[at], -1)

    return lookup


def _label_sums(block: np.ndarray, y0: int, x0: int, z0: int, lookup: Any, n: int) -> tuple[np.ndarray, ...]:
    """Pixel count, sums of pixel-centre coordinates and first and last ``z`` of each label of ``block``, by position.

    ``block`` is ``(y, x)`` or ``(z, y, x)`` (its first plane at ``z0``); only labels present in it are returned
    (their positions first). It is read in strips of about a million pixels, so that memory stays a few bytes per
    pixel of a strip plus a few numbers per cell.
    """
    block = np.asarray(block)
    ny, nx = block.shape[-2:]
    block = block.reshape(-1, ny, nx)
    nz = block.shape[0]
    counts, sum_x, sum_y = np.zeros(n), np.zeros(n), np.zeros(n)
    z_first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    z_last = np.full(n, -1, dtype=np.int64)
    step = max(1, 2**20 // max(nx * nz, 1))
    x = np.arange(nx, dtype=float) + (x0 + 0.5)
    for start in range(0, ny, step):
        strip = block[:, start : start + step]
        pos = lookup(strip.reshape(-1))
        keep = pos >= 0
        if not keep.any():
            continue
        pos = pos[keep]
        xs = np.broadcast_to(x, strip.shape).reshape(-1)[keep]
        ys = np.broadcast_to((np.arange(strip.shape[1], dtype=float) + (y0 + start + 0.5))[:, None], strip.shape)
        counts += np.bincount(pos, minlength=n)
        sum_x += np.bincount(pos, weights=xs, minlength=n)
        sum_y += np.bincount(pos, weights=ys.reshape(-1)[keep], minlength=n)
        if nz > 1:
            zs = np.repeat(np.arange(z0, z0 + nz, dtype=np.int64), strip.shape[1] * nx)[keep]
            np.minimum.at(z_first, pos, zs)
            np.maximum.at(z_last, pos, zs)
    present = np.flatnonzero(counts)
    if nz == 1:
        z_first[present] = z_last[present] = z0
    return present, counts[present], sum_x[present], sum_y[present], z_first[present], z_last[present]


def _labels_geometry(element: Any, matrix: np.ndarray, ids: Any, rows: np.ndarray, source: str) -> CellGeometry:
    """Cells of a labels element: circles of each label's area at its centroid, for the table rows ``rows``.

    The element is read chunk by chunk (memory of a chunk plus a few numbers per cell), at full resolution or, above
    ``MAX_LABEL_PIXELS``, at the finest pyramid level under it. In 3D elements a label's circle has the mean area of
    its sections (its voxels over the planes from its first to its last ``z``), its centre the mean of its voxels'
    ``x, y``.
    """
    import dask
    import dask.array as da
    import pandas as pd

    numeric = pd.to_numeric(pd.Series(np.asarray(ids)), errors="coerce").to_numpy(dtype=float)
    if np.isnan(numeric).all() or not np.all(np.isnan(numeric) | (numeric == np.round(numeric))):
        raise ValueError(
            f"The table annotates the labels element {source!r}, but its instance ids are not integer label values "
            f"(e.g. {list(np.asarray(ids)[:3])}), so rows cannot be matched to labels. Store the label of each cell "
            "in the instance key column, or pass shapes_key= with a shapes element of the cells."
        )
    valid = np.isfinite(numeric) & (numeric > 0)  # 0 is the background of a labels element, never a cell
    ids = np.where(valid, numeric, -1).astype(np.int64)

    levels = _pyramid(element)
    full, chosen = levels[0], levels[-1]
    for level in levels:  # finest first
        if int(np.prod([level.sizes[d] for d in level.dims])) <= MAX_LABEL_PIXELS:
            chosen = level
            break
    sx, sy = full.sizes["x"] / chosen.sizes["x"], full.sizes["y"] / chosen.sizes["y"]
    if chosen is not full:
        logger.info("Labels %r: reading the level at 1/%g resolution to find the cells' centroids.", source, sx)
    dims = [d for d in chosen.dims if d not in ("y", "x")] + ["y", "x"]
    data = chosen.transpose(*dims).data
    data = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
    lookup = _label_lookup(np.where(valid, ids, np.iinfo(np.int64).max))
    starts = [np.concatenate([[0], np.cumsum(chunks)[:-1]]) for chunks in data.chunks]
    tasks = [
        dask.delayed(_label_sums)(
            data.blocks[idx],
            int(starts[-2][idx[-2]]),
            int(starts[-1][idx[-1]]),
            int(starts[0][idx[0]]) if data.ndim == 3 else 0,
            lookup,
            ids.size,
        )
        for idx in np.ndindex(*data.numblocks)
    ]
    counts, sum_x, sum_y = np.zeros(ids.size), np.zeros(ids.size), np.zeros(ids.size)
    z_first = np.full(ids.size, np.iinfo(np.int64).max, dtype=np.int64)
    z_last = np.full(ids.size, -1, dtype=np.int64)
    for present, c, x, y, first, last in dask.compute(*tasks):
        counts[present] += c
        sum_x[present] += x
        sum_y[present] += y
        z_first[present] = np.minimum(z_first[present], first)
        z_last[present] = np.maximum(z_last[present], last)
    found = counts > 0
    if not found.any():
        raise ValueError(
            f"None of the table's instance ids were found among the labels of {source!r} (e.g. table "
            f"{list(np.asarray(ids)[:3])}). Check the table's instance key column, or pass shapes_key=."
        )
    if not found.all():
        logger.warning("%d of %d cells have no label in %r and are not drawn.", (~found).sum(), found.size, source)
    px = np.column_stack([sum_x[found] / counts[found] * sx, sum_y[found] / counts[found] * sy])
    planes = z_last[found] - z_first[found] + 1  # 1 in 2D
    diameters = 2 * np.sqrt(counts[found] / planes * sx * sy / np.pi)
    return _circles(rows[found], apply_affine(matrix, px), diameters, matrix, source)


def cell_geometries(
    adata: AnnData,
    sdata: SpatialData | None = None,
    *,
    shapes_key: str | None = None,
    coordinate_system: str = "global",
    spatial_key: str = "spatial",
) -> list[CellGeometry]:
    """Find where each cell of a table is, in one coordinate system.

    Cells come from the shapes or labels element(s) that the table annotates (``uns["spatialdata_attrs"]``: region,
    region_key, instance_key), or from ``shapes_key``, transformed to ``coordinate_system``; without them, from
    the centroids in ``obsm[spatial_key]`` (taken to be in ``coordinate_system`` units already). The cells of a
    labels element are circles of each label's area at its centroid (see :data:`MAX_LABEL_PIXELS`). Annotated
    elements without a transformation to ``coordinate_system`` are left out (one field of view per coordinate
    system), and so are cells without a position (empty geometries, NaN coordinates), with a warning.

    Parameters
    ----------
    adata
        The table.
    sdata
        The SpatialData object holding it, or ``None``.
    shapes_key
        A shapes element to draw the cells from. When the table does not annotate it, table rows are matched to its
        index by the table's instance key (e.g. ``cell_boundaries`` for a table that annotates ``cell_circles``).
    coordinate_system
        Coordinate system to draw in.
    spatial_key
        Key in ``adata.obsm`` with centroids, used when there are no shapes.

    Returns
    -------
    One :class:`CellGeometry` per shapes or labels element (or one for the centroids).

    Raises
    ------
    KeyError
        ``shapes_key`` is not a shapes element.
    NoCoordinatesError
        No coordinates at all, or none finite (a ``ValueError``).
    ValueError
        The table cannot be matched to the shapes or labels, or none of the elements it annotates is in
        ``coordinate_system``.
    """
    from spatialdata.models import get_table_keys

    if sdata is None and shapes_key is not None:
        raise ValueError(
            f"shapes_key={shapes_key!r} was given, but the data is an AnnData, which holds no shapes elements. "
            "Pass the SpatialData object, or leave shapes_key=None to draw the centroids in obsm."
        )
    if sdata is not None and shapes_key is not None and shapes_key not in sdata.shapes:
        raise KeyError(
            f"shapes_key={shapes_key!r} is not a shapes element of the SpatialData object. "
            f"Available shapes: {_available(sdata.shapes.keys())}."
        )

    regions: list[str] = []
    region_key = instance_key = None
    if sdata is not None and adata.uns.get("spatialdata_attrs"):
        region, region_key, instance_key = get_table_keys(adata)
        regions = [region] if isinstance(region, str) else list(region)

    if sdata is not None and shapes_key is not None:
        targets = [shapes_key]
    elif sdata is not None:
        targets = [r for r in regions if r in sdata.shapes or r in sdata.labels]
        # A table may annotate one element per field of view, each in its own coordinate system (MIBI-TOF, CosMx
        # FOVs): only those in coordinate_system are drawn there.
        systems = {r: _coordinate_systems(sdata.shapes[r] if r in sdata.shapes else sdata.labels[r]) for r in targets}
        inside = [r for r in targets if coordinate_system in systems[r]]
        if targets and not inside:
            found = sorted({cs for names in systems.values() for cs in names})
            raise ValueError(
                f"The elements the table annotates ({_available(targets)}) have no transformation to coordinate "
                f"system {coordinate_system!r}, so its cells cannot be drawn there. Their coordinate systems: "
                f"{_available(found)}. Pass one of them as coordinate_system."
            )
        if len(inside) < len(targets):
            logger.info(
                "Drawing the cells of %s in coordinate system %r; those of %s (not in it) are left out of the map.",
                _available(inside),
                coordinate_system,
                _available(set(targets) - set(inside)),
            )
        targets = inside
    else:
        targets = []

    geometries: list[CellGeometry] = []
    for name in targets:
        if instance_key is None or instance_key not in adata.obs:
            raise ValueError(
                f"Cannot match the table's rows to element {name!r}: the table has no instance key column "
                f"(uns['spatialdata_attrs']['instance_key']={instance_key!r}). Annotate the table with "
                "spatialdata.models.TableModel.parse(..., region=..., region_key=..., instance_key=...)."
            )
        if name in regions and region_key in adata.obs:
            rows = np.flatnonzero((adata.obs[region_key].astype(str) == name).to_numpy())
        else:
            rows = np.arange(adata.n_obs)
        if name not in sdata.shapes:  # a labels element the table annotates (Xenium's and CosMx's readers do so)
            element = sdata.labels[name]
            matrix = affine_matrix(element, coordinate_system, name=name)
            ids = adata.obs[instance_key].to_numpy()[rows]
            geometries.append(_labels_geometry(element, matrix, ids, rows, name))
            continue
        gdf = sdata.shapes[name]
        if name not in regions and len(regions) > 1 and adata.obs[instance_key].duplicated().any():
            raise ValueError(
                f"shapes_key={name!r} is not an element the table annotates, and the table's {instance_key!r} values "
                f"repeat across the elements it annotates ({_available(regions)}), so its rows cannot be matched to "
                f"the shapes of {name!r}. Leave shapes_key=None to draw the cells of the annotated elements, or link "
                "the table to this element with spatialdata.models.TableModel.parse."
            )
        pos = instance_positions(gdf.index, adata.obs[instance_key].to_numpy()[rows])
        found = pos >= 0
        if not found.any():
            raise ValueError(
                f"None of the table's {instance_key!r} values were found in the index of shapes {name!r} "
                f"(e.g. table {adata.obs[instance_key].iloc[rows[:3]].tolist()} vs shapes {gdf.index[:3].tolist()}). "
                + (
                    f"Leave shapes_key=None to draw the cells from the labels the table annotates ({labelled})."
                    if (labelled := ", ".join(repr(r) for r in regions if r in sdata.labels))
                    else "Pass the shapes element that the table annotates as shapes_key."
                )
            )
        if not found.all():
            logger.warning("%d of %d cells have no shape in %r and are not drawn.", (~found).sum(), found.size, name)
        matrix = affine_matrix(gdf, coordinate_system, name=name)
        geometries.append(_shapes_geometry(gdf.iloc[pos[found]], matrix, rows[found], name))
    if geometries:
        return _placed_only(geometries)

    if spatial_key in adata.obsm:
        xy = np.asarray(adata.obsm[spatial_key], dtype=float)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise ValueError(f"obsm[{spatial_key!r}] must be an (n_cells, 2) array of x, y; found shape {xy.shape}.")
        if sdata is not None:
            logger.info("No shapes found for the table; drawing centroids from obsm[%r] as they are.", spatial_key)
        geometry = CellGeometry(
            rows=np.arange(adata.n_obs),
            centers=xy[:, :2],
            kind="points",
            n_cells=adata.n_obs,
            source=f"obsm[{spatial_key!r}]",
        )
        return _placed_only([geometry])

    where = (
        f"the table annotates {regions or 'no element'} (shapes elements: {_available(sdata.shapes.keys())}; "
        f"labels elements: {_available(sdata.labels.keys())})"
        if sdata is not None
        else "the data is an AnnData"
    )
    raise NoCoordinatesError(
        f"No coordinates to draw the cells: {where}, and obsm has no {spatial_key!r} key "
        f"(obsm keys: {_available(adata.obsm.keys())}). Add cell centroids as obsm[{spatial_key!r}] "
        "(n_cells x 2), or link the table to its shapes with spatialdata.models.TableModel.parse."
    )


def _placed_only(geometries: list[CellGeometry]) -> list[CellGeometry]:
    """Leave out the cells without a finite position (NaN centroids, vertices or radii), with a warning.

    Raises
    ------
    NoCoordinatesError
        No cell has a finite position.
    """
    kept = []
    for geom in geometries:
        ok = geom.placed()
        if not ok.all():
            logger.warning(
                "%d of %d cells of %s have no finite position (NaN coordinates) and are not drawn.",
                len(np.unique(geom.rows[~ok])),
                geom.n_cells,
                geom.source if geom.source.startswith("obsm[") else repr(geom.source),
            )
            geom = geom.take(np.flatnonzero(ok))
        if len(geom.rows):
            kept.append(geom)
    if not kept:
        raise NoCoordinatesError(
            f"None of the cells has a finite position in {', '.join(g.source for g in geometries)} (all coordinates "
            "are NaN or all geometries are empty). Check the cells' coordinates or pass the element that holds them."
        )
    return kept


def _points_per_data_unit(ax: Axes) -> float:
    """Current scale of the axes, in points per data unit.

    With an equal aspect the box shrinks at drawing time to the smaller of the two axes' scales: that one is taken.
    """
    box = ax.get_window_extent()
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    scale_x = box.width / max(abs(x1 - x0), 1e-12)
    scale_y = box.height / max(abs(y1 - y0), 1e-12)
    scale = min(scale_x, scale_y) if ax.get_aspect() == 1.0 else scale_x
    return float(scale * 72 / ax.figure.dpi)


def _edge_width(linewidth: float, diameter_pt: float) -> float:
    """``linewidth``, thinned to at most ``MAX_EDGE_FRACTION`` of the cells' diameter (never below 0.1 point)."""
    return float(min(linewidth, max(MAX_EDGE_FRACTION * diameter_pt, 0.1)))


def draw_cells(
    ax: Axes,
    geometries: Sequence[CellGeometry],
    facecolors: np.ndarray,
    *,
    subset: np.ndarray | None = None,
    edgecolor: Any = None,
    linewidth: float = 0.8,
    point_size: float | None = None,
    max_shapes: int = MAX_SHAPES,
    rasterized: bool = True,
    label: str = "cells",
) -> list[Artist]:
    """Draw cells as one collection per geometry, coloured per table row.

    Set the axes limits before calling: points are sized from them. Call once per layer (e.g. a second call with
    ``subset`` and ``edgecolor`` outlines some cells on top of the others); edges cost drawing time, so draw
    them only where they carry meaning.

    Parameters
    ----------
    ax
        Axes to draw on.
    geometries
        From :func:`cell_geometries`.
    facecolors
        ``(n_obs, 4)`` RGBA colours, indexed by table row.
    subset
        Boolean mask over table rows: draw only these cells.
    edgecolor
        One colour for the cells' edges; ``None`` draws no edges.
    linewidth
        Edge width in points; at most 20 % (``MAX_EDGE_FRACTION``) of a cell's diameter on screen (the median cell
        of each element; never below 0.1 point), so that small cells keep their colour.
    point_size
        Marker area (points²) when cells are drawn as points; ``None`` sizes markers from the cell size, or from
        the number of cells for centroids.
    max_shapes
        Above this many cells in one element, circles and polygons are drawn as points at their centres; so are
        cells whose median diameter on the figure is below ``MIN_SHAPE_POINTS`` (2.5 points). Points narrower than
        ``MIN_OUTLINED_POINTS`` (2.5 points) get no edge (as a scatter) or ring (as an image, above
        ``MAX_SCATTER_POINTS``); the artists drawn with one have the gid ``"outlined"``.
    rasterized
        Rasterize the collections in vector output (keeps PDFs of many cells small).
    label
        Label of the collections; the source element is appended, e.g. ``"cells (cell_boundaries)"``.

    Returns
    -------
    The artists added: collections, or images for points above :data:`MAX_SCATTER_POINTS`.
    """
    from matplotlib.collections import EllipseCollection, PolyCollection
    from matplotlib.colors import to_rgba

    ec = "none" if edgecolor is None else to_rgba(edgecolor)
    n_total = sum(g.n_cells for g in geometries)
    collections = []
    for geom in geometries:
        items = np.arange(len(geom.rows)) if subset is None else np.flatnonzero(subset[geom.rows])
        fc = facecolors[geom.rows[items]]
        kind = geom.kind
        if kind != "points" and geom.n_cells > max_shapes:
            logger.info("%d cells in %r: drawing them as points at their centres.", geom.n_cells, geom.source)
            kind = "points"
        elif kind != "points" and (shown := geom.typical_size() * _points_per_data_unit(ax)) < MIN_SHAPE_POINTS:
            logger.info(
                "Cells of %r are %.2g points across on the figure: drawing them as points of at least a pixel.",
                geom.source,
                shown,
            )
            kind = "points"
        edged = edgecolor is not None  # shapes are drawn as shapes only when wide enough to outline (see above)
        lw = _edge_width(linewidth, geom.typical_size() * _points_per_data_unit(ax)) if edged else 0.0
        if kind == "circles":
            coll = EllipseCollection(
                geom.widths[items],
                geom.heights[items],
                geom.angles[items],
                units="xy",
                offsets=geom.centers[items],
                offset_transform=ax.transData,
                facecolors=fc,
                edgecolors=ec,
                linewidths=lw,
            )
            ax.add_collection(coll, autolim=False)
        elif kind == "polygons":
            coll = PolyCollection(geom.polygons(items), facecolors=fc, edgecolors=ec, linewidths=lw)
            ax.add_collection(coll, autolim=False)
        else:
            if point_size is None:
                diameter_pt = geom.typical_size() * _points_per_data_unit(ax)
                size = diameter_pt**2 if diameter_pt > 0 else min(30.0, 120_000 / max(n_total, 1))
                size = max(size, (72 / ax.figure.dpi) ** 2)  # at least a pixel
            else:
                size = float(point_size)
            # points too narrow to be outlined keep their colour only (an edge, or a ring around groups of them in
            # the image, would cover their colours)
            edged = edged and np.sqrt(size) >= MIN_OUTLINED_POINTS
            if items.size > MAX_SCATTER_POINTS:
                coll = draw_points_image(
                    ax, geom.centers[items], fc, size=size, edgecolor=edgecolor if edged else None, linewidth=linewidth
                )
                coll.set_label(f"{label} ({geom.source})")
                coll.set_gid("outlined" if edged else None)
                collections.append(coll)
                continue
            coll = ax.scatter(
                geom.centers[items, 0],
                geom.centers[items, 1],
                s=size,
                c=fc,
                edgecolors=ec if edged else "none",
                linewidths=_edge_width(linewidth, np.sqrt(size)) if edged else 0.0,
                marker="o" if size >= 4 else "s",  # a square is cheaper and looks the same at a few pixels
            )
        coll.set_gid("outlined" if edged else None)
        coll.set_rasterized(rasterized)
        coll.set_label(f"{label} ({geom.source})")
        collections.append(coll)
    return collections


def draw_points_image(
    ax: Axes,
    xy: np.ndarray,
    colors: np.ndarray,
    *,
    size: float,
    edgecolor: Any = None,
    linewidth: float = 0.8,
    dpi: float = SAVE_DPI,
    zorder: float = 1,
) -> AxesImage:
    """Draw many points as one RGBA image over the current axes limits (what a scatter shows, far faster).

    The axes' data range is cut into pixels of the size they have at ``dpi`` on the figure (at most
    ``MAX_POINT_IMAGE_PIXELS`` a side); each point covers the pixels of a disc of its diameter (``sqrt(size)``
    points, at least one pixel), and where points overlap, the one that comes last in ``xy`` wins, as in a scatter.
    With ``edgecolor``, the pixels around the drawn points (a ring of one pixel, or ``linewidth`` when wider)
    are drawn in that colour, as opaque as ``linewidth`` covers a pixel: an outline of the points as a whole, since
    a point a pixel wide cannot have one of its own. Set the axes limits before calling.

    Parameters
    ----------
    ax
        Axes, with their final limits.
    xy
        ``(n, 2)`` point positions in data units.
    colors
        ``(n, 4)`` RGBA colours of the points.
    size
        Marker area in points², as for :meth:`~matplotlib.axes.Axes.scatter`.
    edgecolor
        Colour of the outline; ``None`` draws none.
    linewidth
        Outline width in points.
    dpi
        Resolution at which the image is made (the figure's rendering resamples it).
    zorder
        Drawing order (that of collections by default).

    Returns
    -------
    The image, with its RGBA pixels as the array (row 0 at the top of the axes).
    """
    from matplotlib.colors import to_rgba
    from scipy import ndimage

    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    per_unit = _points_per_data_unit(ax) * dpi / 72  # pixels per data unit
    nx = int(np.clip(np.ceil(abs(right - left) * per_unit), 1, MAX_POINT_IMAGE_PIXELS))
    ny = int(np.clip(np.ceil(abs(top - bottom) * per_unit), 1, MAX_POINT_IMAGE_PIXELS))
    xy = np.asarray(xy, dtype=float)
    colors = np.asarray(colors, dtype=np.float32)
    # positions in pixels, column from the left and row from the top of the axes (either axis may be inverted)
    fx = (xy[:, 0] - left) / (right - left) * nx
    fy = (xy[:, 1] - top) / (bottom - top) * ny
    width = int(np.clip(np.round(np.sqrt(size) * dpi / 72), 1, MAX_POINT_PIXELS))
    steps = np.arange(width) - (width - 1) / 2
    winner = np.full(nx * ny, -1, dtype=np.int64)  # the last point drawn at each pixel
    order = np.arange(len(xy))
    for dy in steps:
        for dx in steps:
            if width > 2 and dx**2 + dy**2 > (width / 2) ** 2:  # a disc, as the round markers of a scatter
                continue
            col, row = np.floor(fx + dx), np.floor(fy + dy)
            inside = (col >= 0) & (col < nx) & (row >= 0) & (row < ny)
            pixel = row[inside].astype(np.int64) * nx + col[inside].astype(np.int64)
            np.maximum.at(winner, pixel, order[inside])
    winner = winner.reshape(ny, nx)
    drawn = winner >= 0
    rgba = np.zeros((ny, nx, 4), dtype=np.float32)
    rgba[drawn] = colors[winner[drawn]]
    if edgecolor is not None and drawn.any():
        ring_px = linewidth * dpi / 72
        ring = ndimage.binary_dilation(drawn, np.ones((3, 3), bool), iterations=max(1, int(np.round(ring_px)))) & ~drawn
        edge = np.asarray(to_rgba(edgecolor), dtype=np.float32)
        edge[3] *= min(1.0, ring_px)
        rgba[ring] = edge
    return ax.imshow(
        rgba,
        extent=(left, right, bottom, top),
        origin="upper",
        interpolation="antialiased",
        aspect=ax.get_aspect(),
        zorder=zorder,
    )


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageLayer:
    """An image ready to draw: pixels and where they lie in the coordinate system.

    Attributes
    ----------
    pixels
        ``(h, w)`` floats (drawn with ``cmap`` between ``vmin`` and ``vmax``) or ``(h, w, 3)`` RGB in ``[0, 1]``.
    intrinsic_extent
        ``(x0, x1, y0, y1)`` of the pixels in the element's own full-resolution pixel coordinates (pixel ``i``
        spans ``[i, i + 1)``).
    matrix
        3 x 3 affine from full-resolution pixel coordinates to the coordinate system.
    name
        Name of the image element.
    """

    pixels: np.ndarray
    intrinsic_extent: tuple[float, float, float, float]
    matrix: np.ndarray
    vmin: float | None = None
    vmax: float | None = None
    cmap: str | None = "gray"
    name: str = ""

    @property
    def axis_aligned(self) -> bool:
        """Whether the transform is a scale and translation only (no rotation or shear)."""
        m = self.matrix[:2, :2]
        return bool(np.isclose(m[0, 1], 0) and np.isclose(m[1, 0], 0))

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` in the coordinate system, as :meth:`~matplotlib.axes.Axes.imshow` wants.

        Only meaningful when :attr:`axis_aligned`; row 0 of :attr:`pixels` is at ``top``.
        """
        x0, x1, y0, y1 = self.intrinsic_extent
        (left, top), (right, bottom) = apply_affine(self.matrix, [[x0, y0], [x1, y1]])
        return float(left), float(right), float(bottom), float(top)

    def bounds(self) -> Bounds:
        """``(xmin, xmax, ymin, ymax)`` of the drawn image in the coordinate system."""
        x0, x1, y0, y1 = self.intrinsic_extent
        c = apply_affine(self.matrix, [[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
        return float(c[:, 0].min()), float(c[:, 0].max()), float(c[:, 1].min()), float(c[:, 1].max())


def _pyramid(image: Any) -> list[Any]:
    """Levels of a multiscale image (finest first), or ``[image]`` for a single-scale one."""
    from xarray import DataArray

    if isinstance(image, DataArray):
        return [image]
    from spatialdata import get_pyramid_levels

    return list(get_pyramid_levels(image))


def _is_rgb(dtype: np.dtype, channels: Sequence[Any]) -> bool:
    """Whether an image of these channels is drawn in colour (RGB or RGBA: 8-bit, or channels named r, g, b)."""
    names = [str(c).lower() for c in channels]
    return len(names) in (3, 4) and (np.issubdtype(dtype, np.uint8) or names[:3] == ["r", "g", "b"])


def _to_display(arr: np.ndarray, dtype: np.dtype, channels: Sequence[Any]) -> tuple[np.ndarray, Any, Any, Any]:
    """Turn a binned ``(c, h, w)`` array of the drawn channels into what imshow draws: (pixels, vmin, vmax, cmap).

    ``arr`` holds the first three channels of an RGB(A) image (:func:`_is_rgb`), else the first channel only;
    ``channels`` names all of the image's channels.
    """

    def stretch(a: np.ndarray) -> tuple[float, float]:
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
        return float(lo), float(hi if hi > lo else lo + 1)

    if _is_rgb(dtype, channels):
        rgb = arr[:3].transpose(1, 2, 0).astype(float)
        if np.issubdtype(dtype, np.uint8):
            rgb = rgb / 255
        else:
            for i in range(3):
                lo, hi = stretch(rgb[..., i])
                rgb[..., i] = (rgb[..., i] - lo) / (hi - lo)
        return np.clip(rgb, 0, 1), None, None, None
    if len(channels) > 1:
        logger.info("Image has %d channels; drawing the first (%s) in grey.", len(channels), channels[0])
    lo, hi = stretch(arr[0])
    return arr[0].astype(float), lo, hi, "gray"


def prepare_image(
    image: Any,
    matrix: np.ndarray,
    *,
    bounds: Bounds | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    name: str = "",
) -> ImageLayer | None:
    """Read the part of an image that covers ``bounds``, at a resolution fit for display.

    The coarsest pyramid level that still has at least ``max_pixels`` along the longer side of the crop is read (the
    finest when none has), and it is binned (mean) down to at most ``max_pixels``. 3D images are max-projected
    along ``z``. Only the needed region of the needed level is computed.

    Parameters
    ----------
    image
        An image element (``DataArray`` or multiscale ``DataTree``) with ``c, y, x`` (or ``c, z, y, x``) axes.
    matrix
        3 x 3 affine from the image's full-resolution pixels to the coordinate system (:func:`affine_matrix`).
    bounds
        ``(xmin, xmax, ymin, ymax)`` in the coordinate system to cover; ``None`` reads the whole image.
    max_pixels
        Largest side of the returned pixels.
    name
        Name of the element, kept on the result.

    Returns
    -------
    The image layer, or ``None`` when the image does not overlap ``bounds``.
    """
    levels = _pyramid(image)
    full = levels[0]
    h0, w0 = int(full.sizes["y"]), int(full.sizes["x"])

    x0, x1, y0, y1 = 0.0, float(w0), 0.0, float(h0)
    if bounds is not None:
        bx0, bx1, by0, by1 = bounds
        corners = np.array([[bx0, by0], [bx1, by0], [bx0, by1], [bx1, by1]])
        px = apply_affine(np.linalg.inv(matrix), corners)
        x0, x1 = max(0.0, np.floor(px[:, 0].min())), min(float(w0), np.ceil(px[:, 0].max()))
        y0, y1 = max(0.0, np.floor(px[:, 1].min())), min(float(h0), np.ceil(px[:, 1].max()))
        if x1 <= x0 or y1 <= y0:
            return None

    # Coarsest level with enough pixels over the crop.
    chosen, sx, sy = full, 1.0, 1.0
    for level in levels[1:]:
        lsx, lsy = w0 / level.sizes["x"], h0 / level.sizes["y"]
        if max((x1 - x0) / lsx, (y1 - y0) / lsy) < max_pixels:
            break
        chosen, sx, sy = level, lsx, lsy
    lx0, lx1 = int(np.floor(x0 / sx)), int(np.ceil(x1 / sx))
    ly0, ly1 = int(np.floor(y0 / sy)), int(np.ceil(y1 / sy))
    lx1, ly1 = min(lx1, int(chosen.sizes["x"])), min(ly1, int(chosen.sizes["y"]))
    crop = chosen.isel(x=slice(lx0, lx1), y=slice(ly0, ly1))
    if "c" not in crop.dims:
        crop = crop.expand_dims("c")
    channels = list(crop.coords["c"].values) if "c" in crop.coords else list(range(crop.sizes["c"]))
    # Only the channels drawn are read: the first three of an RGB(A) image, else the first (a 40-channel image
    # costs what a one-channel image does).
    crop = crop.isel(c=slice(0, 3 if _is_rgb(full.dtype, channels) else 1))
    if "z" in crop.dims:
        crop = crop.max("z")
    factor = max(1, int(np.ceil(max(lx1 - lx0, ly1 - ly0) / max_pixels)))
    if factor > 1:
        crop = crop.coarsen(x=factor, y=factor, boundary="trim").mean()
    crop = crop.transpose("c", "y", "x")
    arr = np.asarray(crop.values)
    if arr.size == 0:
        return None
    pixels, vmin, vmax, cmap = _to_display(arr, full.dtype, channels)
    h, w = arr.shape[1:]
    intrinsic = (lx0 * sx, (lx0 + w * factor) * sx, ly0 * sy, (ly0 + h * factor) * sy)
    return ImageLayer(pixels, intrinsic, matrix, vmin=vmin, vmax=vmax, cmap=cmap, name=name)


def draw_image(ax: Axes, layer: ImageLayer, *, zorder: float = 0) -> AxesImage:
    """Draw an :class:`ImageLayer` in coordinate-system units.

    Scale and translation become the ``extent``; rotations and shears go through an affine artist transform.
    """
    from matplotlib.transforms import Affine2D

    kwargs = {"cmap": layer.cmap, "vmin": layer.vmin, "vmax": layer.vmax, "interpolation": "antialiased"}
    if layer.axis_aligned:
        im = ax.imshow(layer.pixels, extent=layer.extent, origin="upper", zorder=zorder, **kwargs)
    else:
        x0, x1, y0, y1 = layer.intrinsic_extent
        im = ax.imshow(layer.pixels, extent=(x0, x1, y1, y0), origin="upper", zorder=zorder, **kwargs)
        im.set_transform(Affine2D(layer.matrix) + ax.transData)
    im.set_label(f"image ({layer.name})")
    return im


def set_spatial_limits(ax: Axes, bounds: Bounds, *, pad: float = 0.02) -> None:
    """Frame ``bounds`` with equal aspect and y pointing down, as images are shown.

    Bounds of no extent (one cell drawn as a point, or all cells at one spot) are framed by a box of
    ``2 * SINGLE_SPOT_PAD`` units around them, not by one of float rounding size.
    """
    xmin, xmax, ymin, ymax = bounds
    d = max(xmax - xmin, ymax - ymin, 0.0) * pad
    if d <= 1e-9 * max(abs(xmin), abs(xmax), abs(ymin), abs(ymax), 1.0):
        d = SINGLE_SPOT_PAD
    ax.set_xlim(xmin - d, xmax + d)
    ax.set_ylim(ymax + d, ymin - d)
    ax.set_aspect("equal")


# --------------------------------------------------------------------------------------------------------------------
# Showing and saving
# --------------------------------------------------------------------------------------------------------------------


def check_show(show: Any, fn: str) -> bool:
    """Validate the ``show`` argument of a plotting function."""
    if not isinstance(show, bool | np.bool_):
        raise TypeError(f"{fn}: show must be True or False, got {show!r}.")
    return bool(show)


def hand_over(fig: Figure, show: bool) -> Figure:
    """Return ``fig``, closed in pyplot unless ``show``.

    A figure closed in pyplot gets an Agg canvas (pyplot leaves it a bare one, whose ``draw`` does nothing), so that
    ``fig.canvas.draw()`` and ``fig.canvas.buffer_rgba()`` work as on an open figure; saving and displaying need none.
    """
    if not show:
        import matplotlib.pyplot as plt
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        plt.close(fig)
        FigureCanvasAgg(fig)  # sets fig.canvas
    return fig


def check_dpi(dpi: Any, fn: str = "save_figure") -> float:
    """``dpi`` as a float; a ValueError unless it is a positive finite number (a bool is not one)."""
    if isinstance(dpi, bool) or not isinstance(dpi, int | float | np.integer | np.floating) or not 0 < dpi < np.inf:
        raise ValueError(f"{fn}: dpi must be a positive number of dots per inch (e.g. 150), got {dpi!r}.")
    return float(dpi)


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = SAVE_DPI) -> Path:
    """Write a figure, choosing the format from the suffix; parent folders are created.

    The file is written next to its destination and moved into place, so an interrupted save leaves no partial
    file.

    Parameters
    ----------
    fig
        The figure.
    path
        Destination, e.g. ``"plots/confidence.png"`` or ``.pdf``/``.svg``.
    dpi
        Resolution of raster output and of rasterized layers in vector output.

    Returns
    -------
    The path written.

    Raises
    ------
    ValueError
        The suffix is missing or not a format matplotlib can write, or ``dpi`` is not a positive number.
    """
    dpi = check_dpi(dpi)
    path = Path(path).expanduser()
    fmt = path.suffix.lower().lstrip(".")
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"Cannot save the figure to {str(path)!r}: the suffix {path.suffix or '(none)'!r} is not a figure format. "
            f"Use one of: {', '.join('.' + s for s in sorted(supported))} (e.g. '.png' or '.pdf')."
        )
    # Figures with a layout engine are already laid out; "tight" would draw them twice.
    bbox = None if fig.get_layout_engine() is not None else "tight"
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches=bbox), suffix=path.suffix)
    logger.info("Saved figure to %s", path)
    return path
