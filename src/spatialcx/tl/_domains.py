"""Contiguous tissue domains from a selection of cells (:func:`spatial_domains`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._settings import logger
from .._table import obs_column
from .._utils import whole_number

if TYPE_CHECKING:
    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData

    from .._table import TableRef

#: Largest distance (microns) between two selected cells of one domain, per platform: about two to three typical
#: cell spacings, so that selected cells link up across a gap of one or two unselected cells. Segmented cells are
#: larger on CosMx and on Visium HD (cells assembled from 2 micron bins), hence the larger distances there.
PLATFORM_MAX_DISTANCE: dict[str, float] = {
    "xenium": 30.0,
    "merscope": 30.0,
    "cosmx": 35.0,
    "visium_hd": 40.0,
}
#: Without a platform or a distance, the distance is this multiple of the median nearest-neighbour distance.
NN_DISTANCE_MULTIPLE = 2.0


def spatial_domains(
    data: AnnData | SpatialData,
    selection: str | Sequence[bool] | np.ndarray | pd.Series,
    *,
    value: Any = None,
    table_key: str = "table",
    spatial_key: str = "spatial",
    platform: Literal["xenium", "cosmx", "merscope", "visium_hd"] | None = None,
    max_distance: float | None = None,
    min_cells: int = 10,
    small_domains: Literal["merge", "drop"] = "merge",
    merge_distance: float | None = None,
    library_key: str | None = None,
    prefix: str = "domain",
    key_added: str = "domain",
    add_shapes: bool = False,
    shapes_key: str | None = None,
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Group selected cells into contiguous tissue domains.

    Selected cells at most ``max_distance`` apart are linked (pairs found with
    :meth:`scipy.spatial.cKDTree.query_pairs`; in 3D when the coordinates have a third column); each connected region
    is a domain. Domains with fewer than ``min_cells`` cells are merged into the nearest domain
    (``small_domains="merge"``, within ``merge_distance``) or dropped. Domains are named ``{prefix}_1``, ``{prefix}_2``,
    ... from the largest.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``, with coordinates in ``obsm[spatial_key]``. Without
        them, a SpatialData table linked to one shapes element uses the centroids of the cells' shapes (in that
        element's own coordinates; the domain polygons get its transformations).
    selection
        The cells to group: the name of an obs column (boolean, or 0/1 such as ``"threshold_cluster"``; with
        ``value``, the cells whose column equals ``value`` or, for a list, is one of its items), or a boolean
        array / Series with one entry per cell. Missing values are not selected.
    value
        Value(s) of the obs column ``selection`` that select a cell, e.g. ``value="T cell"``.
    table_key
        Table to use when ``data`` is SpatialData.
    spatial_key
        Key of the coordinates in ``obsm``.
    platform
        Gives ``max_distance`` a platform default, in microns: Xenium 30, MERSCOPE 30, CosMx 35, Visium HD 40. The
        coordinates must then be in microns (CosMx pixel coordinates are about 0.12 micron per pixel: pass
        ``max_distance`` in pixels instead).
    max_distance
        Largest distance between two linked selected cells, in the units of the coordinates; overrides
        ``platform``. Without either, ``2 x`` the median nearest-neighbour distance between all cells is used.
    min_cells
        Domains with fewer cells are small.
    small_domains
        ``"merge"``: a small domain joins the domain with the nearest cell, if that cell is within
        ``merge_distance``, else it is dropped. ``"drop"``: small domains are dropped.
    merge_distance
        Farthest a small domain is merged; default ``2 * max_distance``.
    library_key
        obs column of sections / samples: cells of different sections are never linked, and the default distance
        is taken within sections. Without it, sections that share one coordinate frame are linked together (a
        warning names a column such as ``"section"`` or ``"library_id"`` when the table has one).
    prefix
        Domain names are ``f"{prefix}_{n}"``.
    key_added
        obs column of the domain names (categorical; missing for cells in no domain) and ``uns`` key of the
        parameters.
    add_shapes
        Add one polygon per domain to the SpatialData as a shapes element, with the transformations of the table's
        region element. The polygon is the union of disks of radius ``max_distance`` around the domain's cells,
        shrunk by ``max_distance / 2`` (a morphological closing): it holds every cell with a margin of
        ``max_distance / 2`` and fills the gaps between linked cells. Needs SpatialData. When ``obsm[spatial_key]``
        is not in the cells' shapes' own coordinates but in one of their coordinate systems (e.g. ``"global"``),
        the polygons are placed in that system; coordinates matching the cells in none raise a ``ValueError``.
        With ``add_shapes=False``, the polygons an earlier run under the same ``key_added`` added are removed (with a
        warning), since they no longer match the domains.
    shapes_key
        Name of the shapes element; default ``f"{key_added}_shapes"``. An existing element of that name is
        replaced only if it holds domain polygons (of an earlier run); the cells' own shapes, other elements and
        other shapes are never overwritten.
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys (and the shapes element) into the zarr store when ``data`` is a backed SpatialData.

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes ``obs[key_added]`` and ``uns[key_added]`` (domain
    names and sizes, the distance used and where it came from, merge / drop counts), and with ``add_shapes`` the
    shapes element ``shapes_key`` indexed by domain name with a ``n_cells`` column. Domain names that
    :func:`~spatialcx.tl.annotate_domains` gave the domains of an earlier run (grouped by ``key_added``) are removed,
    with a warning, when the domains change.

    Raises
    ------
    KeyError
        Missing obs column or coordinates.
    ValueError
        Bad parameters, a selection of the wrong length or type, no selected cell, non-finite coordinates of selected
        cells, ``key_added`` naming the table's region or instance column, a ``shapes_key`` that would replace
        anything but earlier domain polygons, or coordinates that match the cells' shapes in no coordinate system.
    TypeError
        ``add_shapes=True`` with an AnnData; a distance, ``min_cells`` or ``prefix`` of the wrong type.
    """
    from anndata import AnnData

    from .._table import check_key, resolve_table

    max_distance = _check_number(max_distance, "max_distance")
    merge_distance = _check_number(merge_distance, "merge_distance")
    min_cells = whole_number(min_cells, "min_cells", minimum=1)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix={prefix!r} must be a string; domains are named f'{{prefix}}_1', f'{{prefix}}_2', ...")
    if platform is not None and platform not in PLATFORM_MAX_DISTANCE:
        raise ValueError(f"platform={platform!r} is not known; choose one of {sorted(PLATFORM_MAX_DISTANCE)} or None.")
    if max_distance is not None and not (np.isfinite(max_distance) and max_distance > 0):
        raise ValueError(f"max_distance={max_distance!r} must be a positive number (in the units of the coordinates).")
    if merge_distance is not None and not (np.isfinite(merge_distance) and merge_distance >= 0):
        raise ValueError(f"merge_distance={merge_distance!r} must be a non-negative number.")
    if small_domains not in ("merge", "drop"):
        raise ValueError(f"small_domains={small_domains!r} must be 'merge' or 'drop'.")
    if add_shapes and isinstance(data, AnnData):
        raise TypeError(
            "add_shapes=True adds a shapes element to a SpatialData, but data is an AnnData. Pass the SpatialData, "
            "or use add_shapes=False (the domain column is written either way)."
        )
    check_key(key_added, "key_added")
    shapes_key = check_key(shapes_key or f"{key_added}_shapes", "shapes_key")

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    _check_not_a_link_column(adata, key_added)
    if add_shapes:
        _check_shapes_key(ref.sdata, shapes_key, key_added)
    mask, described = _selection_mask(adata, selection, value)
    coords, coords_source = _coordinates(adata, spatial_key, ref.sdata)
    libraries = _libraries(adata, library_key)
    if library_key is None:
        _warn_if_sections(adata)

    n_sel = int(mask.sum())
    if n_sel == 0:
        present = ""
        if isinstance(selection, str) and value is not None:
            counts = obs_column(adata, selection).value_counts()
            present = f" The column holds {counts.size} value(s), e.g. {counts.index[:12].tolist()}."
        raise ValueError(
            f"The selection {described} picks no cell of the {adata.n_obs}, so there is nothing to group.{present} "
            "Check the column and value (e.g. classify first with scx.tl.classify_by_threshold)."
        )
    sel_idx = np.flatnonzero(mask)
    if not np.isfinite(coords[sel_idx]).all():
        bad = sel_idx[~np.isfinite(coords[sel_idx]).all(axis=1)]
        raise ValueError(
            f"{bad.size} selected cell(s) have missing or infinite coordinates ({coords_source}; e.g. "
            f"{adata.obs_names[bad[:3]].tolist()}), so they cannot be placed in a domain; drop them from the "
            "selection (e.g. a mask `& np.isfinite(coords).all(axis=1)`) or fix the coordinates."
        )

    xyz = coords[:, :3]  # distances in 3D when there is a z column (the polygons are drawn in x, y)
    nn_median = _median_nn_distance(xyz, libraries)
    if max_distance is not None:
        distance, source = float(max_distance), "max_distance"
    elif platform is not None:
        distance, source = PLATFORM_MAX_DISTANCE[platform], f"platform default ({platform}, microns)"
    else:
        if not np.isfinite(nn_median) or nn_median <= 0:
            raise ValueError(
                "Cannot derive a distance from the data (fewer than two distinct cell positions); pass max_distance."
            )
        distance, source = NN_DISTANCE_MULTIPLE * nn_median, f"{NN_DISTANCE_MULTIPLE:g} x median nearest-neighbour"
    if np.isfinite(nn_median) and nn_median > 0 and (distance < nn_median or distance > 50 * nn_median):
        logger.warning(
            "spatial_domains: max_distance %.4g is %s the median nearest-neighbour distance between cells (%.4g); "
            "are the coordinates in the units you expect (microns for platform defaults)?",
            distance,
            "below" if distance < nn_median else "more than 50 x",
            nn_median,
        )
    merge_dist = 2.0 * distance if merge_distance is None else float(merge_distance)

    comp = _components(xyz[sel_idx], None if libraries is None else libraries[sel_idx], distance)
    component_sizes = np.bincount(comp)
    comp, n_merged, n_dropped_domains = _handle_small(
        comp,
        xyz[sel_idx],
        None if libraries is None else libraries[sel_idx],
        min_cells=int(min_cells),
        how=small_domains,
        merge_distance=merge_dist,
    )
    labels_sel, names, sizes = _name_domains(comp, prefix)
    n_cells_dropped = int((labels_sel < 0).sum())

    shapes = None
    if add_shapes and names:
        gdf = _domain_polygons(coords[sel_idx], labels_sel, names, sizes, radius=distance / 2.0)
        shapes = _parse_shapes(gdf, ref.sdata, adata, coords=coords, rows=sel_idx, source=coords_source, nn=nn_median)
    # no domain, or no polygons asked for: polygons of an earlier run would describe domains that are gone
    stale_key = _stale_shapes_key(ref, key_added, shapes_key if add_shapes else None, bool(names))
    stale = stale_key is not None
    if not names:
        largest = int(component_sizes.max())
        logger.warning(
            "spatial_domains(%r): no domain found. The %d selected cells form %d group(s) of cells linked within "
            "max_distance=%.4g (%s; the median nearest-neighbour distance between all cells is %.4g), the largest of "
            "%d cell(s), and every group has fewer than min_cells=%d cells, so all were dropped%s. Try a smaller "
            "min_cells (e.g. min_cells=%d) or a larger max_distance (e.g. max_distance=%.3g); check that the selection "
            "is the cells you mean.",
            key_added,
            n_sel,
            component_sizes.size,
            distance,
            source,
            nn_median,
            largest,
            int(min_cells),
            f"; no shapes element {shapes_key!r}" + (" (the one of an earlier run is removed)" if stale else "")
            if add_shapes
            else "",
            max(1, largest),
            2 * distance,
        )

    # assign (everything computed and validated above)
    codes = np.full(adata.n_obs, -1, dtype=np.int64)
    codes[sel_idx] = labels_sel
    domains = (
        pd.Categorical.from_codes(codes, categories=names)
        if names
        else pd.Categorical([np.nan] * adata.n_obs, categories=[])
    )
    stale_names = _stale_annotations(adata, key_added, domains)
    adata.obs[key_added] = domains
    if stale_names:
        drop_annotations(adata, stale_names)
        logger.warning(
            "spatial_domains(%r): removing the names that annotate_domains gave the domains of an earlier run "
            "(obs / uns %s): the domains changed. Run scx.tl.annotate_domains(data, %r) again to name the new ones.",
            key_added,
            stale_names,
            key_added,
        )
    params: dict[str, Any] = {
        "selection": described,
        "n_selected": n_sel,
        "n_domains": len(names),
        "domains": list(names),
        "n_cells": [int(s) for s in sizes],
        "max_distance": float(distance),
        "distance_source": source,
        "median_nn_distance": float(nn_median) if np.isfinite(nn_median) else -1.0,
        "min_cells": int(min_cells),
        "small_domains": small_domains,
        "merge_distance": float(merge_dist),
        "n_small_merged": int(n_merged),
        "n_small_dropped": int(n_dropped_domains),
        "n_cells_dropped": n_cells_dropped,
        "prefix": prefix,
        "spatial_key": spatial_key,
        "coordinates": coords_source,
    }
    if platform is not None:
        params["platform"] = platform
    if library_key is not None:
        params["library_key"] = library_key
    if shapes is not None:
        params["shapes_key"] = shapes_key
    adata.uns[key_added] = params
    logger.info(
        "spatial_domains(%r): %d domain(s) from %d selected cells (distance %.4g from %s; %d small merged, %d dropped).",
        key_added,
        len(names),
        n_sel,
        distance,
        source,
        n_merged,
        n_dropped_domains,
    )

    if stale and names:  # the no-domain warning above already says so
        logger.warning(
            "spatial_domains(%r): removing the shapes element %r of an earlier run, whose polygons no longer match the "
            "domains; pass add_shapes=True to draw the new ones.",
            key_added,
            stale_key,
        )
    touched = stale_key if stale else shapes_key
    previous = ref.sdata.shapes.get(touched) if (ref.sdata is not None and not copy) else None
    if shapes is not None and not copy:
        if previous is not None:
            logger.info("spatial_domains: replacing the shapes element %r.", shapes_key)
        ref.sdata.shapes[shapes_key] = shapes
    if stale and not copy:
        del ref.sdata.shapes[stale_key]
    try:
        out = ref.finish(write=write, elements=("obs", "uns"))
    except BaseException as e:  # the table was put back on a Ctrl-C too
        from spatialcx._table import WRITTEN_ATTR

        put_back = not getattr(e, WRITTEN_ATTR, False)
        if put_back and not copy and (shapes is not None or stale):  # the table was put back: so are the shapes
            if previous is not None:
                ref.sdata.shapes[touched] = previous
            else:
                ref.sdata.shapes.pop(touched, None)
        raise
    if shapes is not None:
        if copy:
            out.shapes[shapes_key] = shapes  # the copy shares the other elements, never the original's dict
        elif write and ref.sdata.is_backed():
            _write_shapes(ref.sdata, shapes_key)
    elif stale:
        if copy:
            out.shapes.pop(stale_key, None)
        elif write and ref.sdata.is_backed():
            from spatialcx._table import remove_shapes_element

            remove_shapes_element(ref.sdata, stale_key)
    return out


# --------------------------------------------------------------------------------------------------------------------


def _check_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"{name}={value!r} must be a number, in the units of the coordinates (e.g. {name}=30.0 for microns)."
        )
    return float(value)


def _selection_mask(adata: AnnData, selection: Any, value: Any) -> tuple[np.ndarray, str]:
    if isinstance(selection, str):
        if selection not in adata.obs.columns:
            raise KeyError(
                f"obs has no column {selection!r} to select cells with. Columns: {list(adata.obs.columns)[:20]}."
            )
        col = obs_column(adata, selection)
        if value is not None:
            values = list(value) if pd.api.types.is_list_like(value) else [value]
            values = [v.item() if isinstance(v, np.generic) else v for v in values]  # plain names in uns
            mask = col.isin(values).to_numpy(dtype=bool)
            desc = f"obs[{selection!r}] in {values!r}" if len(values) > 1 else f"obs[{selection!r}] == {values[0]!r}"
            return mask, desc
        non_na = col.dropna()
        if (
            pd.api.types.is_bool_dtype(col)
            # True / False with missing values, as anndata's concat (outer join) leaves a boolean column
            or (col.dtype == object and pd.api.types.infer_dtype(non_na, skipna=True) == "boolean")
            or (
                pd.api.types.is_numeric_dtype(non_na)
                and non_na.isin([0, 1]).all()
                and not isinstance(col.dtype, pd.CategoricalDtype)
            )
        ):
            return col.to_numpy(dtype=np.float64, na_value=0.0) == 1, f"obs[{selection!r}] == 1"
        raise ValueError(
            f"obs[{selection!r}] has dtype {col.dtype} with values such as {list(non_na.unique()[:5])}, not True/False "
            f"or 0/1. Pass value=... to select the cells with that value, e.g. spatial_domains(data, {selection!r}, "
            "value=...)."
        )
    if value is not None:
        raise ValueError("value is only used when selection is the name of an obs column.")
    if isinstance(selection, pd.Series):
        if not selection.index.equals(adata.obs_names) and len(selection) == adata.n_obs:
            if selection.index.isin(adata.obs_names).all():
                selection = selection.reindex(adata.obs_names)
        arr = selection.to_numpy()
    else:
        arr = np.asarray(selection)
    if arr.ndim != 1 or arr.shape[0] != adata.n_obs:
        raise ValueError(
            f"selection has shape {arr.shape}, but the table has {adata.n_obs} cells; pass one boolean per cell or "
            "the name of an obs column."
        )
    if arr.dtype != bool:
        ser = pd.Series(arr)
        if not ser.dropna().isin([0, 1, True, False]).all():
            raise ValueError(f"selection has dtype {arr.dtype} with values other than True/False; pass booleans.")
        arr = ser.to_numpy(dtype=np.float64, na_value=0.0) == 1
    return arr.astype(bool), "boolean mask"


def _coordinates(adata: AnnData, spatial_key: str, sdata: SpatialData | None = None) -> tuple[np.ndarray, str]:
    """Cell coordinates: ``obsm[spatial_key]``, or else the centroids of the shapes the table annotates (SpatialData).

    Returns the ``(n_cells, d)`` coordinates and where they came from (for ``uns``).
    """
    if spatial_key not in adata.obsm:
        coords = None if sdata is None else _linked_shape_centroids(adata, sdata)
        if coords is None:
            raise KeyError(
                f"obsm has no {spatial_key!r} coordinates (obsm keys: {list(adata.obsm.keys())})"
                + ("" if sdata is None else " and the table is not linked to a shapes element of the SpatialData")
                + f". Put the cell centroids in adata.obsm[{spatial_key!r}] or pass spatial_key=..."
            )
        return coords
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"obsm[{spatial_key!r}] has shape {coords.shape}; expected (n_cells, 2) or (n_cells, 3).")
    return coords, f"obsm[{spatial_key!r}]"


def _linked_shape_centroids(adata: AnnData, sdata: SpatialData) -> tuple[np.ndarray, str] | None:
    """Centroids of the cells' shapes, in the shapes' own coordinates, when the table annotates one shapes element.

    The domain polygons get that element's transformations (:func:`_parse_shapes`), so they overlay the cells.
    ``None`` when the table is not linked to a shapes element.
    """
    from spatialdata.models import get_table_keys

    if not adata.uns.get("spatialdata_attrs"):
        return None
    region, _, instance_key = get_table_keys(adata)
    regions = [region] if isinstance(region, str) else list(region)
    if len(regions) != 1:
        raise ValueError(
            f"obsm has no coordinates and the table annotates {len(regions)} regions ({regions}), whose coordinates "
            "may differ; put the cell centroids in a common coordinate system in adata.obsm['spatial']."
        )
    region = regions[0]
    if region not in sdata.shapes or instance_key not in adata.obs:
        return None
    coords = _shape_centroids(adata, sdata.shapes[region], instance_key, region)
    logger.info("No coordinates in obsm; using the centroids of the shapes element %r.", region)
    return coords, f"centroids of shapes {region!r}"


def _shape_centroids(
    adata: AnnData, gdf: gpd.GeoDataFrame, instance_key: str, region: str, rows: np.ndarray | None = None
) -> np.ndarray:
    """``(n, 2)`` centroids, in the shapes' own coordinates, of the shapes of the table's cells (or of ``rows``)."""
    import shapely

    from .._table import instance_positions

    ids = obs_column(adata, instance_key).to_numpy()
    if rows is not None:
        ids = ids[rows]
    pos = instance_positions(gdf.index, ids)
    if (pos < 0).any():
        raise ValueError(
            f"{int((pos < 0).sum())} cell(s) of the table have an {instance_key!r} that is not in the index of the "
            f"shapes element {region!r} (e.g. {ids[pos < 0][:3].tolist()}); the table and its shapes do not match."
        )
    cent = shapely.centroid(gdf.geometry.to_numpy()[pos])  # points (circles) are their own centroid
    return np.column_stack([shapely.get_x(cent), shapely.get_y(cent)]).astype(np.float64)


def _libraries(adata: AnnData, library_key: str | None) -> np.ndarray | None:
    if library_key is None:
        return None
    if library_key not in adata.obs.columns:
        raise KeyError(f"obs has no column {library_key!r} (library_key).")
    col = obs_column(adata, library_key)
    if col.isna().any():
        raise ValueError(f"obs[{library_key!r}] has missing values; every cell needs a section / sample.")
    return pd.Categorical(col).codes.astype(np.int64)


#: obs columns that usually name sections / samples (squidpy's ``library_id`` first): without ``library_key``, cells of
#: different sections sharing one coordinate frame are linked into one domain.
SECTION_COLUMNS = ("library_id", "section", "sample", "sample_id", "slide", "slice")


def _warn_if_sections(
    adata: AnnData,
    fn: str = "spatial_domains",
    consequence: str = "cells of different sections are linked",
    remedy: str = "keep each section's domains apart",
) -> None:
    """Warn when an obs column of :data:`SECTION_COLUMNS` has several values and no ``library_key`` was given."""
    for name in SECTION_COLUMNS:
        if name in adata.obs.columns:
            n = obs_column(adata, name).nunique()
            if n > 1:
                logger.warning(
                    "%s: obs[%r] has %d values (sections or samples?) but library_key is None, so %s if their "
                    "coordinates are close (as when sections share one coordinate frame). Pass library_key=%r to %s.",
                    fn,
                    name,
                    n,
                    consequence,
                    name,
                    remedy,
                )
                return


def _median_nn_distance(coords: np.ndarray, libraries: np.ndarray | None, max_cells: int = 50_000) -> float:
    from scipy.spatial import cKDTree

    ok = np.isfinite(coords).all(axis=1)
    groups = [ok] if libraries is None else [ok & (libraries == lib) for lib in np.unique(libraries)]
    dists = []
    rng = np.random.default_rng(0)
    for g in groups:
        # distinct positions: cells stacked at one spot (duplicated centroids, a cell and its twin) would give a
        # nearest neighbour at distance 0, and, when every cell has a twin, no distance at all
        pts = np.unique(coords[g], axis=0)
        if pts.shape[0] < 2:
            continue
        tree = cKDTree(pts)
        q = pts if pts.shape[0] <= max_cells else pts[rng.choice(pts.shape[0], max_cells, replace=False)]
        d, _ = tree.query(q, k=2)
        dists.append(d[:, 1])
    if not dists:
        return float("nan")
    return float(np.median(np.concatenate(dists)))


def _components(coords: np.ndarray, libraries: np.ndarray | None, distance: float) -> np.ndarray:
    """Connected components of the graph linking cells at most ``distance`` apart (2D or 3D), never across libraries.

    The pairs come from :meth:`scipy.spatial.cKDTree.query_pairs`, one library at a time; component ids are unique
    across libraries.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = coords.shape[0]
    comp = np.zeros(n, dtype=np.int64)
    groups = [np.arange(n)] if libraries is None else [np.flatnonzero(libraries == lib) for lib in np.unique(libraries)]
    offset = 0
    for rows in groups:
        pairs = cKDTree(coords[rows]).query_pairs(float(distance), output_type="ndarray")
        graph = sparse.coo_matrix(
            (np.ones(pairs.shape[0], dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(rows.size, rows.size)
        )
        k, local = connected_components(graph, directed=False)
        comp[rows] = local + offset
        offset += k
    return comp


def _handle_small(
    comp: np.ndarray,
    coords: np.ndarray,
    libraries: np.ndarray | None,
    *,
    min_cells: int,
    how: str,
    merge_distance: float,
) -> tuple[np.ndarray, int, int]:
    """Merge (or drop, -1) components with fewer than ``min_cells`` cells; returns new ids and merge / drop counts."""
    from scipy.spatial import cKDTree

    comp = comp.copy()
    sizes = np.bincount(comp)
    small = np.flatnonzero(sizes < min_cells)
    if small.size == 0:
        return comp, 0, 0
    is_small = np.isin(comp, small)
    if how == "drop" or not (~is_small).any():
        comp[is_small] = -1
        return comp, 0, int(small.size)
    # every small cell's nearest cell of a large domain of its library (within merge_distance), all at once
    small_cells = np.flatnonzero(is_small)
    libs = np.zeros(comp.size, dtype=np.int64) if libraries is None else libraries
    dist = np.full(small_cells.size, np.inf)
    target = np.full(small_cells.size, -1, dtype=np.int64)
    bound = np.nextafter(merge_distance, np.inf)  # cKDTree's bound is strict; merge_distance itself is in reach
    for lib in np.unique(libs[small_cells]):
        large_cells = np.flatnonzero(~is_small & (libs == lib))
        here = np.flatnonzero(libs[small_cells] == lib)
        if not large_cells.size:
            continue
        d, j = cKDTree(coords[large_cells]).query(coords[small_cells[here]], k=1, distance_upper_bound=bound)
        hit = np.isfinite(d)
        dist[here[hit]] = d[hit]
        target[here[hit]] = comp[large_cells[j[hit]]]
    # per small domain, its cell nearest to a large domain (ties: the first cell) decides where it goes
    order = np.lexsort((small_cells, dist, comp[small_cells]))
    groups, first = np.unique(comp[small_cells][order], return_index=True)
    goes_to = np.full(sizes.size, -1, dtype=np.int64)
    goes_to[groups] = target[order[first]]
    new = comp.copy()
    new[small_cells] = goes_to[comp[small_cells]]
    n_merged = int((goes_to[groups] >= 0).sum())
    return new, n_merged, int(groups.size - n_merged)


def _name_domains(comp: np.ndarray, prefix: str) -> tuple[np.ndarray, list[str], list[int]]:
    """Renumber components by size (largest first, ties by first cell) into codes 0..k-1; -1 stays -1."""
    kept = comp >= 0
    if not kept.any():
        return np.full(comp.size, -1, dtype=np.int64), [], []
    ids, first, counts = np.unique(comp[kept], return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    remap = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    remap[ids[order]] = np.arange(order.size)
    labels = np.full(comp.size, -1, dtype=np.int64)
    labels[kept] = remap[comp[kept]]
    names = [f"{prefix}_{i + 1}" for i in range(order.size)]
    return labels, names, [int(c) for c in counts[order]]


def _domain_polygons(
    coords: np.ndarray, labels: np.ndarray, names: list[str], sizes: list[int], *, radius: float
) -> gpd.GeoDataFrame:
    import geopandas as gpd
    import shapely

    geoms = []
    order = np.argsort(labels, kind="stable")  # the cells of each domain, in one pass (no scan per domain)
    bounds = np.searchsorted(labels[order], np.arange(len(names) + 1))
    for i in range(len(names)):
        pts = shapely.points(coords[order[bounds[i] : bounds[i + 1]], :2])
        # closing: disks of twice the radius, unioned, then shrunk by the radius. The result holds every disk of
        # ``radius`` around the domain's cells and fills the gaps between linked cells (no beads on a string).
        grown = shapely.union_all(shapely.buffer(pts, 2 * radius, quad_segs=4))
        geoms.append(shapely.buffer(grown, -radius, quad_segs=4))
    return gpd.GeoDataFrame(
        {"n_cells": np.asarray(sizes, dtype=np.int64)}, geometry=geoms, index=pd.Index(names, name="domain")
    )


def _parse_shapes(
    gdf: gpd.GeoDataFrame,
    sdata: SpatialData,
    adata: AnnData,
    *,
    coords: np.ndarray,
    rows: np.ndarray,
    source: str,
    nn: float,
) -> gpd.GeoDataFrame:
    """Shapes element of the domain polygons, placed where the cells are.

    The polygons are in the units of ``coords``. When the table annotates one shapes element, the polygons get its
    transformations if ``coords`` are in its own coordinates (the usual case: spatialdata-io and SOPA put the
    centroids there); if ``coords`` match the cells in one of its coordinate systems instead, the polygons are placed
    in that system (and mapped to the element's other systems through it). If they match none, this raises rather
    than write polygons that do not overlay the cells. A table annotating a labels element gives its transformations;
    no (or an ambiguous) link gives Identity to ``"global"``.
    """
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity, get_transformation

    transformations: dict[str, Any] = {"global": Identity()}
    regions = _table_regions(adata)
    elements = [sdata.shapes.get(r, sdata.labels.get(r)) for r in regions]
    elements = [e for e in elements if e is not None]
    if len(regions) == 1 and elements:
        transformations = get_transformation(elements[0], get_all=True)
        if regions[0] in sdata.shapes and not source.startswith("centroids of shapes"):
            transformations = _frame_of_coordinates(sdata, adata, regions[0], coords[rows], rows, source, nn)
    elif len(regions) > 1 and elements:
        found = [get_transformation(e, get_all=True) for e in elements]
        if all(f == found[0] for f in found[1:]):
            transformations = found[0]
        else:
            logger.warning(
                "spatial_domains: the table annotates %d regions %s with different transformations; the domain "
                "polygons are placed with Identity to 'global', which assumes the %s are global coordinates.",
                len(regions),
                regions,
                source,
            )
    return ShapesModel.parse(gdf, transformations=transformations)


def _frame_of_coordinates(
    sdata: SpatialData, adata: AnnData, region: str, coords: np.ndarray, rows: np.ndarray, source: str, nn: float
) -> dict[str, Any]:
    """Transformations for polygons drawn in the frame of ``coords`` (the coordinates of the cells ``rows``).

    That frame is the shapes element ``region``'s own, or the coordinate system of it in which its centroids equal
    ``coords`` (median offset at most half the median nearest-neighbour distance ``nn``).
    """
    from spatialdata.transformations import Identity, Sequence, get_transformation

    element = sdata.shapes[region]
    transformations = get_transformation(element, get_all=True)
    _, _, instance_key = _link_keys(adata)
    if instance_key is None or instance_key not in adata.obs:
        return transformations
    rng = np.random.default_rng(0)
    sample = rows if rows.size <= 10_000 else np.sort(rng.choice(rows, 10_000, replace=False))
    at = np.searchsorted(rows, sample)
    xy = coords[at, :2]
    cent = _shape_centroids(adata, element, instance_key, region, sample)
    tol = 0.5 * nn if np.isfinite(nn) and nn > 0 else 0.0
    tol = max(tol, 1e-6 * float(np.nanmax(np.abs(xy))) if xy.size else 0.0)

    def offset(points: np.ndarray) -> float:
        return float(np.nanmedian(np.linalg.norm(points - xy, axis=1)))

    own = offset(cent)
    if own <= tol:
        return transformations
    tried = {"the shapes' own coordinates": own}
    for cs, t in transformations.items():
        m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        moved = cent @ m[:2, :2].T + m[:2, 2]
        tried[f"coordinate system {cs!r}"] = offset(moved)
        if tried[f"coordinate system {cs!r}"] <= tol:
            logger.info(
                "spatial_domains: the %s are in coordinate system %r of %r; the polygons are too.", source, cs, region
            )
            back = t.inverse()
            return {other: Identity() if other == cs else Sequence([back, u]) for other, u in transformations.items()}
    found = ", ".join(f"{where}: {d:.4g}" for where, d in tried.items())
    raise ValueError(
        f"The {source} used for the domains do not match the cells' shapes {region!r} (median distance between a "
        f"cell's coordinates and its shape's centroid, in {found}; at most {tol:.4g} expected), so the domain "
        "polygons could not be placed over the cells. Put the centroids in the shapes' own coordinates into obsm "
        "(or delete the obsm entry: the shapes' centroids are used then), or pass add_shapes=False."
    )


def _link_keys(adata: AnnData) -> tuple[list[str], str | None, str | None]:
    """``(regions, region_key, instance_key)`` of the table's link to spatial elements; empty / None without one."""
    attrs = adata.uns.get("spatialdata_attrs")
    if not isinstance(attrs, dict) or not attrs:
        return [], None, None
    region = attrs.get("region")
    if region is None:
        regions: list[str] = []
    elif isinstance(region, str):
        regions = [region]
    else:
        regions = [str(r) for r in np.asarray(region).ravel()]
    return regions, attrs.get("region_key"), attrs.get("instance_key")


def _table_regions(adata: AnnData) -> list[str]:
    return _link_keys(adata)[0]


def _check_not_a_link_column(adata: AnnData, key_added: str) -> None:
    _, region_key, instance_key = _link_keys(adata)
    for name, key in (("region_key", region_key), ("instance_key", instance_key)):
        if key is not None and key_added == key:
            raise ValueError(
                f"key_added={key_added!r} is the table's {name} (uns['spatialdata_attrs']): writing the domains there "
                "would break the link between the table and its cells' shapes. Choose another key_added, e.g. "
                "key_added='domain'."
            )


def _check_shapes_key(sdata: SpatialData | None, shapes_key: str, key_added: str) -> None:
    """Refuse a ``shapes_key`` that names the cells' shapes, another element, or shapes not made by this function."""
    if sdata is None:
        return
    for kind in ("images", "labels", "points", "tables"):
        clash = [name for name in getattr(sdata, kind) if name.lower() == shapes_key.lower()]
        if clash:
            raise ValueError(
                f"shapes_key={shapes_key!r}: the SpatialData already has a {kind[:-1]} element {clash[0]!r}, and "
                f"element names must be unique across element types. Pass another shapes_key, e.g. "
                f"shapes_key='{key_added}_shapes'."
            )
    for name in sdata.shapes:
        if name != shapes_key and name.lower() == shapes_key.lower():
            raise ValueError(
                f"shapes_key={shapes_key!r} differs only in case from the shapes element {name!r}, which spatialdata "
                "does not allow. Pass another shapes_key."
            )
    if shapes_key not in sdata.shapes:
        return
    annotating = [key for key, table in sdata.tables.items() if shapes_key in _table_regions(table)]
    if annotating:
        raise ValueError(
            f"shapes_key={shapes_key!r} is the shapes element of the cells that the table(s) {annotating} annotate; "
            "replacing it with domain polygons would lose the cells' shapes and break the link. Pass another "
            f"shapes_key, e.g. shapes_key='{key_added}_shapes'."
        )
    recorded = bool(_runs_recording(sdata, shapes_key))
    element = sdata.shapes[shapes_key]
    looks_like_domains = list(element.columns.drop(element.geometry.name)) == ["n_cells"]
    if not (recorded or looks_like_domains):
        raise ValueError(
            f"The SpatialData already holds a shapes element {shapes_key!r} (columns {list(element.columns)}) that "
            "is not domain polygons of spatial_domains, so it is not replaced. Pass another shapes_key, or remove "
            f"the element first (del sdata[{shapes_key!r}])."
        )


def _stale_shapes_key(ref: TableRef, key_added: str, shapes_key: str | None, found: bool) -> str | None:
    """The shapes element whose polygons this run makes stale, if any.

    With ``add_shapes`` (``shapes_key`` given) that is ``shapes_key`` itself when no domain is found. Without it, it is
    the element that the earlier run under ``key_added`` recorded, unless another run has since claimed it.
    """
    sdata = ref.sdata
    if sdata is None:
        return None
    if shapes_key is not None:
        return shapes_key if (not found and shapes_key in sdata.shapes) else None
    earlier = ref.adata.uns.get(key_added)
    key = earlier.get("shapes_key") if isinstance(earlier, dict) else None
    if not isinstance(key, str) or key not in sdata.shapes:
        return None
    claimed = _runs_recording(sdata, key) - {(ref.table_key, key_added)}
    return None if claimed else key


def drop_annotations(adata: AnnData, names: list[str]) -> None:
    """Remove what the :func:`annotate_domains` runs ``names`` wrote: ``uns[name]``, ``obs[name]``, ``obs[name_cell]``."""
    for name in names:
        del adata.uns[name]
    gone = {c for k in names for c in (k, f"{k}_cell")}
    adata.obs = adata.obs[[c for c in adata.obs.columns if c not in gone]]  # a lazy table's obs has no drop()


def _stale_annotations(adata: AnnData, key_added: str, domains: pd.Categorical) -> list[str]:
    """The ``uns`` keys of the annotate_domains runs that named ``obs[key_added]``, when the new ``domains`` differ.

    Their group labels would sit beside domains they do not describe.
    """
    runs = [
        name
        for name, value in adata.uns.items()
        if isinstance(value, dict) and value.get("groupby") == key_added and "signature_key" in value
    ]
    if not runs or key_added not in adata.obs:
        return runs
    old = obs_column(adata, key_added)
    same = isinstance(old.dtype, pd.CategoricalDtype) and list(old.cat.categories) == list(domains.categories)
    return [] if same and np.array_equal(old.cat.codes.to_numpy(), domains.codes) else runs


def _runs_recording(sdata: SpatialData, shapes_key: str) -> set[tuple[str, str]]:
    """The ``(table, uns key)`` of every spatial_domains run whose parameters name ``shapes_key`` as its polygons."""
    return {
        (table_key, name)
        for table_key, table in sdata.tables.items()
        for name, value in table.uns.items()
        if isinstance(value, dict) and value.get("shapes_key") == shapes_key
    }


def _write_shapes(sdata: SpatialData, shapes_key: str) -> None:
    """Write the shapes element into the store, crash-safely replacing an earlier version (staged, then swapped)."""
    from spatialcx._table import write_shapes_element

    write_shapes_element(sdata, shapes_key)
