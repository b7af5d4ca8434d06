from __future__ import annotations

import re
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from matplotlib.collections import EllipseCollection, PathCollection, PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.image import AxesImage

import spatialcx as scx
from spatialcx.pl import _utils
from spatialcx.pl._confidence import LOW_COLOR, MIN_OUTLINE_SCALE, MISSING_COLOR, OUTLINE_WIDTH

THRESHOLD = 0.8


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------------------


def _obs(n: int, rng: np.random.Generator) -> pd.DataFrame:
    types = np.array(["B cell", "T cell", "macrophage"])
    labels = types[np.arange(n) % 3]
    # Distinct medians per type: macrophage lowest, B cell highest.
    centre = {"B cell": 0.95, "T cell": 0.8, "macrophage": 0.5}
    conf = np.clip([centre[lab] + rng.normal(0, 0.08) for lab in labels], 0, 1)
    return pd.DataFrame(
        {"cell_type": pd.Categorical(labels), "cell_type_confidence": conf}, index=[f"c{i}" for i in range(n)]
    )


def _table(obs: pd.DataFrame, region: str, ids) -> AnnData:
    from spatialdata.models import TableModel

    obs = obs.copy()
    obs["region"] = pd.Categorical([region] * len(obs))
    obs["cell_id"] = np.asarray(ids)
    adata = AnnData(X=np.zeros((len(obs), 2), dtype=np.float32), obs=obs)
    return TableModel.parse(adata, region=region, region_key="region", instance_key="cell_id")


def _image(h: int = 40, w: int = 60, *, transform=None, scale_factors=None, coordinate_system: str = "global"):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    arr = np.arange(h * w, dtype=np.float32).reshape(1, h, w)
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        transformations={coordinate_system: transform or Identity()},
        scale_factors=scale_factors,
    )


def _px_to_um():
    """Image in pixels: 2 µm per pixel in x, 3 in y, origin at (10, 20) µm."""
    from spatialdata.transformations import Scale, Sequence, Translation

    return Sequence([Scale([2.0, 3.0], axes=("x", "y")), Translation([10.0, 20.0], axes=("x", "y"))])


def circles_sdata(n: int = 30, *, shapes_transform=None, seed: int = 0):
    """Image 40 x 60 px (Scale + Translation to µm) and circles spread over the whole image, in µm."""
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(seed)
    # Cells spanning the image: x in [10, 130], y in [20, 140] µm.
    xy = np.column_stack([rng.uniform(15, 125, n), rng.uniform(25, 135, n)])
    xy[0], xy[1] = (13.0, 23.0), (127.0, 137.0)
    radius = np.full(n, 3.0)
    ids = np.arange(100, 100 + n)
    circles = ShapesModel.parse(
        xy, geometry=0, radius=radius, index=ids, transformations={"global": shapes_transform or Identity()}
    )
    table = _table(_obs(n, rng), "cells", ids[::-1])  # table rows in another order than the shapes
    return SpatialData(images={"he": _image(transform=_px_to_um())}, shapes={"cells": circles}, tables={"table": table})


def polygons_sdata(n: int = 12):
    """Square cells (polygons) in pixel units, with a Scale of 0.5 to the global coordinate system."""
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    rng = np.random.default_rng(1)
    corners = np.column_stack([np.arange(n) * 20.0, np.arange(n) * 10.0])
    gdf = gpd.GeoDataFrame(
        geometry=[box(x, y, x + 8, y + 4) for x, y in corners], index=pd.Index([f"cell_{i}" for i in range(n)])
    )
    polys = ShapesModel.parse(gdf, transformations={"global": Scale([0.5, 0.5], axes=("x", "y"))})
    table = _table(_obs(n, rng), "cell_boundaries", polys.index)
    return SpatialData(shapes={"cell_boundaries": polys}, tables={"table": table})


def points_adata(n: int = 300, seed: int = 2) -> AnnData:
    rng = np.random.default_rng(seed)
    adata = AnnData(X=np.zeros((n, 2), dtype=np.float32), obs=_obs(n, rng))
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
    return adata


def _cell_collections(ax, layer: str = "any"):
    """Collections of cells on the map: confident cells ("cells (...)") and outlined ones ("low-confidence ...")."""
    prefixes = {"any": ("cells (", "low-confidence cells ("), "confident": ("cells (",), "low": ("low-confidence",)}
    return [c for c in ax.collections if str(c.get_label()).startswith(prefixes[layer])]


def _n_items(coll) -> int:
    if isinstance(coll, PolyCollection):
        return len(coll.get_paths())
    return len(coll.get_offsets())


# --------------------------------------------------------------------------------------------------------------------
# Map panel
# --------------------------------------------------------------------------------------------------------------------


def test_circles_over_image_aligned():
    sdata = circles_sdata()
    fig = scx.pl.confidence(sdata)
    ax_map, ax_strip = fig.axes[:2]
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 2

    images = [im for im in ax_map.get_images() if isinstance(im, AxesImage)]
    assert len(images) == 1
    # 60 x 40 px, 2 µm/px in x and 3 µm/px in y, origin at (10, 20): left, right, bottom, top (y points down).
    np.testing.assert_allclose(images[0].get_extent(), (10.0, 130.0, 140.0, 20.0))
    assert ax_map.get_ylim()[0] > ax_map.get_ylim()[1]  # y axis points down, as in the image

    colls = _cell_collections(ax_map)
    assert all(isinstance(c, EllipseCollection) for c in colls)
    assert sum(_n_items(c) for c in colls) == sdata.tables["table"].n_obs
    gdf = sdata.shapes["cells"]
    expected = np.column_stack([gdf.geometry.x, gdf.geometry.y])
    offsets = np.concatenate([c.get_offsets() for c in colls])
    np.testing.assert_allclose(np.sort(offsets, axis=0), np.sort(expected, axis=0))


def test_shapes_transform_is_applied():
    """Circles stored at half scale with a Scale(2) land at the same place, with twice the radius."""
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    sdata = circles_sdata()
    gdf = sdata.shapes["cells"]
    xy_um = np.column_stack([gdf.geometry.x, gdf.geometry.y])
    sdata.shapes["cells"] = ShapesModel.parse(
        xy_um / 2,
        geometry=0,
        radius=gdf["radius"].to_numpy() / 2,
        index=gdf.index,
        transformations={"global": Scale([2.0, 2.0], axes=("x", "y"))},
    )
    geoms = _utils.cell_geometries(sdata.tables["table"], sdata)
    (geom,) = geoms
    assert geom.kind == "circles"
    table_ids = sdata.tables["table"].obs["cell_id"].to_numpy()
    order = np.searchsorted(gdf.index.to_numpy(), table_ids[geom.rows])
    np.testing.assert_allclose(geom.centers, xy_um[order])
    np.testing.assert_allclose(geom.widths, 6.0)  # diameter 2 * 1.5 * 2


def test_anisotropic_and_rotated_transforms():
    from spatialdata.transformations import Affine

    sdata = circles_sdata()
    theta = np.deg2rad(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 5.0], [np.sin(theta), np.cos(theta), -3.0], [0, 0, 1]])
    sdata.images["he"] = _image(transform=Affine(rot, input_axes=("x", "y"), output_axes=("x", "y")))
    fig = scx.pl.confidence(sdata)
    ax_map = fig.axes[0]
    (im,) = ax_map.get_images()
    # The image is placed by the affine: pixel corner (x=60, y=0) goes where the rotation sends it.
    to_data = im.get_transform() - ax_map.transData
    x0, x1, y0, y1 = _utils.prepare_image(sdata.images["he"], rot).intrinsic_extent
    np.testing.assert_allclose(to_data.transform([[x1, y0]])[0], (rot @ [x1, y0, 1])[:2], atol=1e-6)

    # An anisotropic scale turns circles into ellipses.
    from spatialdata.transformations import Scale, set_transformation

    set_transformation(sdata.shapes["cells"], Scale([2.0, 1.0], axes=("x", "y")), "global")
    (geom,) = _utils.cell_geometries(sdata.tables["table"], sdata)
    np.testing.assert_allclose(geom.widths, 12.0)
    np.testing.assert_allclose(geom.heights, 6.0)


def test_polygons_drawn_with_transform():
    sdata = polygons_sdata()
    fig = scx.pl.confidence(sdata)
    ax_map = fig.axes[0]
    assert not ax_map.get_images()  # no image element
    colls = _cell_collections(ax_map)
    assert all(isinstance(c, PolyCollection) for c in colls)
    assert sum(_n_items(c) for c in colls) == sdata.tables["table"].n_obs
    verts = np.concatenate([p.vertices for c in colls for p in c.get_paths()])
    bounds = sdata.shapes["cell_boundaries"].total_bounds  # pixels, Scale(0.5) to global
    np.testing.assert_allclose(verts.min(axis=0), bounds[:2] * 0.5)
    np.testing.assert_allclose(verts.max(axis=0), bounds[2:] * 0.5)


def test_anndata_centroids():
    adata = points_adata()
    fig = scx.pl.confidence(adata, point_size=5)
    ax_map = fig.axes[0]
    assert not ax_map.get_images()
    colls = _cell_collections(ax_map)
    assert all(isinstance(c, PathCollection) for c in colls)
    assert sum(_n_items(c) for c in colls) == adata.n_obs
    offsets = np.concatenate([c.get_offsets() for c in colls])
    np.testing.assert_allclose(np.sort(offsets, axis=0), np.sort(adata.obsm["spatial"], axis=0))
    for coll in colls:
        np.testing.assert_allclose(coll.get_sizes(), 5)


def test_anndata_view():
    adata = points_adata()
    view = adata[adata.obs["cell_type"] != "macrophage"]
    fig = scx.pl.confidence(view)
    assert sum(_n_items(c) for c in _cell_collections(fig.axes[0])) == view.n_obs
    assert "cell_type_confidence" in adata.obs  # the parent is untouched


def test_low_confidence_marked_and_on_top():
    adata = points_adata()
    conf = adata.obs["cell_type_confidence"].to_numpy().copy()
    conf[:3] = np.nan
    adata.obs["cell_type_confidence"] = conf
    fig = scx.pl.confidence(adata, threshold=THRESHOLD)
    ax = fig.axes[0]
    (confident,) = _cell_collections(ax, "confident")
    (outlined,) = _cell_collections(ax, "low")
    low = np.isfinite(conf) & (conf < THRESHOLD)
    assert _n_items(outlined) == low.sum() > 0
    assert _n_items(confident) == adata.n_obs - low.sum()
    np.testing.assert_allclose(outlined.get_edgecolors(), [to_rgba(LOW_COLOR)])
    assert np.all(outlined.get_linewidths() > 0)
    assert np.all(confident.get_linewidths() == 0)
    # Outlined cells are drawn after (on top of) the others.
    assert ax.collections.index(outlined) > ax.collections.index(confident)
    # Their faces keep the confidence colour.
    np.testing.assert_allclose(
        np.sort(outlined.get_facecolors(), axis=0),
        np.sort(plt.get_cmap("viridis")(conf[low]), axis=0),
    )
    faces = np.concatenate([confident.get_facecolors(), outlined.get_facecolors()])
    assert np.all(np.isclose(faces, to_rgba(MISSING_COLOR)), axis=1).sum() == 3


def test_crop_to_cells_and_multiscale():
    sdata = circles_sdata()
    image = _image(400, 600, transform=_px_to_um(), scale_factors=[2, 2])
    matrix = _utils.affine_matrix(image, "global")
    # Whole image at a small size: coarsest level that still has >= 100 px, binned down to <= 100.
    layer = _utils.prepare_image(image, matrix, max_pixels=100)
    assert max(layer.pixels.shape) <= 100
    np.testing.assert_allclose(layer.intrinsic_extent, (0, 600, 0, 400))
    # A box in µm maps to a pixel-aligned crop that covers it.
    layer = _utils.prepare_image(image, matrix, bounds=(110.0, 210.0, 320.0, 620.0))
    left, right, bottom, top = layer.extent
    assert left <= 110 < 210 <= right and top <= 320 < 620 <= bottom
    assert right - left < 130 and bottom - top < 330
    x0, x1, y0, y1 = layer.intrinsic_extent
    assert all(float(v).is_integer() for v in (x0, x1, y0, y1))
    # Cells outside the image: nothing to crop.
    assert _utils.prepare_image(image, matrix, bounds=(5000.0, 6000.0, 5000.0, 6000.0)) is None

    sdata.images["he"] = image
    fig = scx.pl.confidence(sdata)
    (im,) = fig.axes[0].get_images()
    left, right, bottom, top = im.get_extent()
    cells = _utils.union_bounds([g.bounds() for g in _utils.cell_geometries(sdata.tables["table"], sdata)])
    assert left <= cells[0] and right >= cells[1] and top <= cells[2] and bottom >= cells[3]
    assert right - left < 200  # cropped to the cells (the image spans 1200 µm)


def test_large_data_drawn_as_points():
    sdata = circles_sdata()
    geoms = _utils.cell_geometries(sdata.tables["table"], sdata)
    fig, ax = plt.subplots()
    _utils.set_spatial_limits(ax, geoms[0].bounds())
    n = sdata.tables["table"].n_obs
    (coll,) = _utils.draw_cells(ax, geoms, np.ones((n, 4)), max_shapes=10)
    assert isinstance(coll, PathCollection)
    assert _n_items(coll) == n
    assert coll.get_rasterized()

    # Polygons become points at their centres.
    sdata = polygons_sdata()
    (geom,) = _utils.cell_geometries(sdata.tables["table"], sdata)
    (coll,) = _utils.draw_cells(ax, [geom], np.ones((geom.n_cells, 4)), max_shapes=5)
    assert isinstance(coll, PathCollection)
    boxes = sdata.shapes["cell_boundaries"].geometry
    expected = np.column_stack([boxes.centroid.x, boxes.centroid.y]) * 0.5  # Scale(0.5) to global
    np.testing.assert_allclose(np.sort(coll.get_offsets(), axis=0), np.sort(expected, axis=0))


def test_image_and_shapes_keys():
    from spatialdata.models import ShapesModel

    sdata = circles_sdata()
    sdata.images["dapi"] = _image(20, 30, transform=_px_to_um())
    fig = scx.pl.confidence(sdata, image_key="dapi")
    (im,) = fig.axes[0].get_images()
    assert im.get_array().shape == (20, 30)

    # A second shapes element indexed by the same ids (e.g. boundaries beside circles) can be chosen.
    gdf = sdata.shapes["cells"]
    sdata.shapes["cell_circles_big"] = ShapesModel.parse(
        np.column_stack([gdf.geometry.x, gdf.geometry.y]), geometry=0, radius=10.0, index=gdf.index
    )
    fig = scx.pl.confidence(sdata, shapes_key="cell_circles_big")
    colls = _cell_collections(fig.axes[0])
    np.testing.assert_allclose(np.concatenate([c.get_widths() for c in colls]), 20.0)  # full widths: diameters
    assert sum(_n_items(c) for c in colls) == gdf.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# Strip panel
# --------------------------------------------------------------------------------------------------------------------


def _strip_points(ax):
    colls = [c for c in ax.collections if str(c.get_label()).startswith("cells")]
    return np.concatenate([c.get_offsets() for c in colls])


def test_cells_of_small_types_are_not_hidden_by_their_median():
    # A type of one cell has its median at that cell: the small translucent dot lay under the black median line and
    # the strip looked empty (two cells: both half covered). They are drawn as larger outlined dots over the lines.
    from spatialcx.pl._confidence import FEW_CELLS

    adata = points_adata(300)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[:3] = ["single", "pair", "pair"]
    adata.obs["cell_type"] = pd.Categorical(labels)
    conf = adata.obs["cell_type_confidence"].to_numpy()
    conf[:3] = [0.9, 0.7, 0.72]
    adata.obs["cell_type_confidence"] = conf
    ax = scx.pl.confidence(adata).axes[1]
    (medians,) = [c for c in ax.collections if c.get_label() == "median"]
    (few,) = [c for c in ax.collections if c.get_label() == f"cells of types of fewer than {FEW_CELLS} cells"]
    (many,) = [c for c in ax.collections if c.get_label() == "cells"]
    assert many.get_zorder() < medians.get_zorder() < few.get_zorder()  # the median line stays over crowded strips
    ticks = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_xticklabels()]
    offsets = few.get_offsets()
    columns = [ticks[int(i)] for i in np.round(offsets[:, 0])]
    assert sorted(zip(columns, np.round(offsets[:, 1], 6))) == [("pair", 0.7), ("pair", 0.72), ("single", 0.9)]
    assert few.get_sizes()[0] > many.get_sizes()[0] and few.get_alpha() is None  # larger and opaque
    assert len(many.get_offsets()) == 297
    assert "large dots: types of fewer than 10 cells" in ax.get_title().replace("\n", " ")
    ax = scx.pl.confidence(points_adata(300)).axes[1]  # no small type: no such dots, nothing in the key
    assert not [c for c in ax.collections if "fewer" in str(c.get_label())]
    assert "large dots" not in ax.get_title()


def test_one_cell_is_not_called_cells():
    adata = points_adata(1)
    fig = scx.pl.confidence(adata, threshold=0.5)
    assert fig._suptitle.get_text() == "cell_type_confidence: 0 of 1 cell (0.0%) below 0.5"
    assert fig.axes[0].get_title().startswith("1 cell from obsm['spatial']\n")
    fig = scx.pl.confidence(points_adata(30), max_points_per_type=1)
    assert "at most 1 random cell drawn per type" in fig.axes[1].get_title().replace("\n", " ")


def test_a_single_cell_map_is_as_tall_as_its_colourbar():
    # One cell is framed by a square, but the panel was sized for the narrowest map (its bounds are 0 by 0): the
    # square map shrank to half the panel's height, with the colourbar standing out above and below it.
    fig = scx.pl.confidence(points_adata(1))
    fig.canvas.draw()
    ax_map, cbar = fig.axes[0], fig.axes[2]
    assert cbar.get_label() == "<colorbar>"
    assert ax_map.get_position().height >= cbar.get_position().height


def test_strip_threshold_sorting_shares():
    adata = points_adata(600)
    fig = scx.pl.confidence(adata, threshold=0.7)
    ax = fig.axes[1]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("threshold")]
    np.testing.assert_allclose(line.get_ydata(), [0.7, 0.7])

    ticks = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_xticklabels()]
    assert ticks == ["B cell", "T cell", "macrophage"]  # by median confidence, highest first

    obs = adata.obs
    shares = [f"{np.mean(obs.loc[obs.cell_type == t, 'cell_type_confidence'] < 0.7):.0%}" for t in ticks]
    texts = [t.get_text() for t in ax.texts if t.get_gid() == "share_below"]
    assert texts == shares
    assert len(_strip_points(ax)) == adata.n_obs  # below the cap: every cell is drawn
    # Points sit on their type's column.
    pts = _strip_points(ax)
    assert np.all(np.abs(pts[:, 0] - np.round(pts[:, 0])) <= 0.35)


def test_strip_subsampled_to_cap_and_seeded():
    adata = points_adata(900)
    adata.obs["cell_type"] = pd.Categorical(np.where(np.arange(900) < 40, "rare", "common"))
    fig = scx.pl.confidence(adata, max_points_per_type=100, random_state=3)
    pts = _strip_points(fig.axes[1])
    assert len(pts) == 100 + 40
    assert "at most 100 random cells drawn per type" in fig.axes[1].get_title().replace("\n", " ")
    assert fig.axes[1].get_legend() is None  # a legend inside the axes would hide cells
    again = _strip_points(scx.pl.confidence(adata, max_points_per_type=100, random_state=3).axes[1])
    other = _strip_points(scx.pl.confidence(adata, max_points_per_type=100, random_state=4).axes[1])
    np.testing.assert_array_equal(pts, again)
    assert not np.array_equal(pts, other)
    # Which cells are drawn (not only their jitter) depends on the seed; they are cells of the type.
    ticks = [t.get_text().rsplit(" (", 1)[0] for t in fig.axes[1].get_xticklabels()]
    col = ticks.index("common")
    common = adata.obs["cell_type_confidence"].to_numpy()[40:]
    drawn = [np.sort(np.asarray(p[np.round(p[:, 0]) == col, 1])) for p in (pts, other)]
    assert all(len(d) == 100 and np.isin(d, common).all() for d in drawn)
    assert not np.array_equal(drawn[0], drawn[1])


def test_unassigned_uses_raw_prediction():
    adata = points_adata()
    predicted = adata.obs["cell_type"].copy()
    low = adata.obs["cell_type_confidence"] < THRESHOLD
    adata.obs["cell_type"] = pd.Categorical(np.where(low, "Unassigned", predicted.astype(str)))
    fig = scx.pl.confidence(adata)
    assert "Unassigned" in [t.get_text().rsplit(" (", 1)[0] for t in fig.axes[1].get_xticklabels()]

    adata.obs["cell_type_predicted"] = predicted
    fig = scx.pl.confidence(adata)
    ax = fig.axes[1]
    ticks = {t.get_text().rsplit(" (", 1)[0] for t in ax.get_xticklabels()}
    assert ticks == {"B cell", "T cell", "macrophage"}
    assert ax.get_xlabel().startswith("cell_type_predicted")
    # the model's classes are shown by the names they have in cell_type (as annotate records them)
    adata.obs["cell_type_predicted"] = pd.Categorical(predicted.astype(str).str.replace(" ", "_"))
    adata.uns["cell_type"] = {
        "classes": ["B_cell", "T_cell", "macrophage"],
        "names": ["B cell", "T cell", "macrophage"],
    }
    ticks = {t.get_text().rsplit(" (", 1)[0] for t in scx.pl.confidence(adata).axes[1].get_xticklabels()}
    assert ticks == {"B cell", "T cell", "macrophage"}


# --------------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_save(tmp_path, suffix, magic):
    path = tmp_path / "sub" / "dir" / f"confidence{suffix}"
    fig = scx.pl.confidence(circles_sdata(), save=path)
    assert fig is not None
    assert path.read_bytes()[:4] == magic
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_save_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"suffix '\.txt' is not a figure format"):
        scx.pl.confidence(points_adata(), save=tmp_path / "plot.txt")
    with pytest.raises(ValueError, match="suffix '\\(none\\)'"):
        scx.pl.confidence(points_adata(), save=str(tmp_path / "plot"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def test_error_missing_columns():
    adata = points_adata()
    no_conf = AnnData(obs=adata.obs[["cell_type"]], obsm={"spatial": adata.obsm["spatial"]})
    with pytest.raises(KeyError, match=r"no column 'cell_type_confidence'.*scx\.tl\.predict"):
        scx.pl.confidence(no_conf)
    with pytest.raises(KeyError, match=r"no column 'label'.*scx\.tl\.annotate"):
        scx.pl.confidence(adata, key="label")


def test_error_non_numeric_confidence():
    adata = points_adata()
    adata.obs["cell_type_confidence"] = adata.obs["cell_type"]
    with pytest.raises(TypeError, match="must hold numbers"):
        scx.pl.confidence(adata)


def test_no_coordinates_draws_the_strips_only(caplog):
    """Without shapes or centroids, the map is left out (with a warning saying how to add coordinates)."""
    import logging

    adata = points_adata()
    del adata.obsm["spatial"]
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        fig = scx.pl.confidence(adata, threshold=0.7)
    assert re.search(r"No coordinates to draw the cells.*obsm\['spatial'\].*per cell type only", caplog.text)
    (ax,) = fig.axes
    assert [t.get_text().rsplit(" (", 1)[0] for t in ax.get_xticklabels()] == ["B cell", "T cell", "macrophage"]
    assert len(_strip_points(ax)) == adata.n_obs
    assert "of 300 cells" in fig._suptitle.get_text()
    sdata = polygons_sdata()
    del sdata.shapes["cell_boundaries"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        assert len(scx.pl.confidence(sdata).axes) == 1
    assert re.search(r"No coordinates.*annotates \['cell_boundaries'\]", caplog.text)
    sdata.images["he"] = _image()
    with pytest.raises(ValueError, match=r"No coordinates.*annotates \['cell_boundaries'\]"):
        scx.pl.confidence(sdata, image_key="he")  # an image asked for: no map without cells is an error


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    box, frame = artist.get_window_extent(), fig.bbox
    return box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y0 >= frame.y0 - 1 and box.y1 <= frame.y1 + 1


@pytest.mark.parametrize("n_types", [2, 3, 40])
def test_titles_fit_in_the_figure(n_types):
    """The strip panel's key and the figure's title are wrapped to the width they have: nothing is clipped."""
    adata = points_adata(400)
    adata.obs["cell_type"] = pd.Categorical([f"type {i % n_types}" for i in range(adata.n_obs)])
    fig = scx.pl.confidence(adata, max_points_per_type=5)
    ax_strip = fig.axes[1]
    assert "at most 5 random cells drawn per type" in ax_strip.get_title().replace("\n", " ")
    assert _inside(fig, ax_strip.title) and _inside(fig, fig._suptitle)
    del adata.obsm["spatial"]
    fig = scx.pl.confidence(adata, max_points_per_type=5)
    assert _inside(fig, fig.axes[0].title) and _inside(fig, fig._suptitle)


def test_long_type_names_are_wrapped():
    from spatialcx.pl._confidence import MAX_LABEL_LINE

    adata = points_adata(60)
    long_name = "L2/3 intratelencephalic projecting glutamatergic neuron"
    adata.obs["cell_type"] = pd.Categorical(np.where(np.arange(60) % 2, long_name, "astrocyte"))
    fig = scx.pl.confidence(adata)
    texts = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert any(" ".join(t.split("\n")) == f"{long_name} (30)" for t in texts)  # wrapped at spaces, nothing lost
    assert max(len(line) for t in texts for line in t.split("\n")) <= MAX_LABEL_LINE
    assert "astrocyte (30)" in texts  # short names stay on one line


def test_error_unknown_elements():
    sdata = circles_sdata()
    with pytest.raises(KeyError, match=r"image_key='nope'.*Available images: 'he'"):
        scx.pl.confidence(sdata, image_key="nope")
    with pytest.raises(KeyError, match=r"shapes_key='nope'.*Available shapes: 'cells'"):
        scx.pl.confidence(sdata, shapes_key="nope")
    with pytest.raises(ValueError, match=r"no transformation to coordinate system 'aligned'.*'global'"):
        scx.pl.confidence(sdata, coordinate_system="aligned")
    with pytest.raises(ValueError, match="holds no image elements"):
        scx.pl.confidence(points_adata(), image_key="he")
    with pytest.raises(ValueError, match="holds no shapes elements"):
        scx.pl.confidence(points_adata(), shapes_key="cells")


def test_error_table():
    with pytest.raises(KeyError, match=r"Table 'cells_table' not found.*Available tables: \['table'\]"):
        scx.pl.confidence(circles_sdata(), table_key="cells_table")
    with pytest.raises(TypeError):
        scx.pl.confidence(points_adata().obs)


def test_error_bad_arguments():
    adata = points_adata()
    with pytest.raises(ValueError, match=r"threshold must be a confidence in \[0, 1\]"):
        scx.pl.confidence(adata, threshold=float("nan"))
    with pytest.raises(ValueError, match="max_points_per_type must be a positive integer"):
        scx.pl.confidence(adata, max_points_per_type=0)
    assert plt.get_fignums() == []  # nothing left open by failed calls


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("inf"), True, "0.8"])
def test_threshold_validated_like_validation_2d(threshold):
    adata = points_adata()
    with pytest.raises(ValueError, match=r"confidence: threshold must be a confidence in \[0, 1\].*got") as conf_err:
        scx.pl.confidence(adata, threshold=threshold)
    with pytest.raises(ValueError, match=r"threshold must be a confidence in \[0, 1\]") as val_err:
        scx.pl.validation_2d(adata, threshold=threshold)
    # one helper, one message (but for the function's name)
    assert str(conf_err.value).split(":", 1)[1] == str(val_err.value).split(":", 1)[1]
    assert plt.get_fignums() == []


def test_threshold_none_uses_recorded_one():
    adata = points_adata()
    adata.uns["cell_type"] = {"confidence_threshold": 0.6}
    fig = scx.pl.confidence(adata, threshold=None)
    conf = adata.obs["cell_type_confidence"].to_numpy()
    (outlined,) = _cell_collections(fig.axes[0], "low")
    assert _n_items(outlined) == (conf < 0.6).sum()
    assert fig._suptitle.get_text().endswith("below 0.6")


def test_defaults_follow_the_key_and_the_recorded_threshold():
    """key="ct" reads ct_confidence and the threshold filter_low_confidence recorded, without being told."""
    adata = points_adata()
    adata.obs["ct_confidence"] = adata.obs.pop("cell_type_confidence")
    adata.obs["ct"] = adata.obs.pop("cell_type")
    scx.tl.filter_low_confidence(adata, key="ct", source_key="ct", threshold=0.5)
    fig = scx.pl.confidence(adata, key="ct")
    conf = adata.obs["ct_confidence"].to_numpy()
    (outlined,) = _cell_collections(fig.axes[0], "low")
    assert _n_items(outlined) == (conf < 0.5).sum() > 0
    assert fig._suptitle.get_text().endswith("below 0.5")
    assert fig.axes[1].get_ylabel() == "ct_confidence"


def _with_share_below(sdata, share: float):
    """Set the confidence so that the first ``share`` of the cells are below THRESHOLD."""
    table = sdata.tables["table"]
    n_low = int(round(share * table.n_obs))
    table.obs["cell_type_confidence"] = np.where(np.arange(table.n_obs) < n_low, 0.3, 0.95)
    return n_low


def test_outlines_thinner_when_most_cells_are_below():
    sdata = circles_sdata(n=40)  # cells wider than 4 points on screen: the outline is not capped by their size
    n_low = _with_share_below(sdata, 0.25)
    ax = scx.pl.confidence(sdata, threshold=THRESHOLD).axes[0]
    (outlined,) = _cell_collections(ax, "low")
    assert _n_items(outlined) == n_low
    np.testing.assert_allclose(outlined.get_linewidths(), OUTLINE_WIDTH)
    assert ax.get_title().splitlines()[1] == f"red outline: {n_low} (25.0%) below 0.8"
    plt.close("all")

    widths = []
    for share in (0.5, 0.7, 0.95):
        n_low = _with_share_below(sdata, share)
        ax = scx.pl.confidence(sdata, threshold=THRESHOLD).axes[0]
        (outlined,) = _cell_collections(ax, "low")
        assert _n_items(outlined) == n_low
        np.testing.assert_allclose(outlined.get_edgecolors(), [to_rgba(LOW_COLOR)])
        widths.append(float(outlined.get_linewidths()[0]))
        plt.close("all")
    assert widths[0] == OUTLINE_WIDTH > widths[1] > widths[2] == pytest.approx(MIN_OUTLINE_SCALE * OUTLINE_WIDTH)
    assert ax.get_title().splitlines()[1] == f"thin red outline: {n_low} (95.0%) below 0.8"


def test_outlines_thin_on_small_cells():
    """An outline is at most a fifth of the cells' diameter on screen, so small cells keep their colour."""
    from matplotlib.figure import Figure

    centers = np.array([[10.0, 10.0], [90.0, 90.0]])
    circles = _utils.CellGeometry(
        rows=np.arange(2),
        centers=centers,
        kind="circles",
        n_cells=2,
        source="circles",
        widths=np.full(2, 1.5),
        heights=np.full(2, 1.5),
        angles=np.zeros(2),
    )
    points = _utils.CellGeometry(rows=np.arange(2), centers=centers, kind="points", n_cells=2, source="points")
    ax = Figure(figsize=(4, 4)).add_subplot()
    _utils.set_spatial_limits(ax, (0.0, 100.0, 0.0, 100.0))
    faces = np.ones((2, 4))
    (coll,) = _utils.draw_cells(ax, [circles], faces, edgecolor=LOW_COLOR, linewidth=0.8)
    diameter_pt = 1.5 * _utils._points_per_data_unit(ax)
    assert _utils.MIN_SHAPE_POINTS < diameter_pt < 4
    np.testing.assert_allclose(coll.get_linewidths(), _utils.MAX_EDGE_FRACTION * diameter_pt)
    assert coll.get_gid() == "outlined"
    (pts,) = _utils.draw_cells(ax, [points], faces, edgecolor=LOW_COLOR, linewidth=0.8, point_size=9.0)
    np.testing.assert_allclose(pts.get_linewidths(), _utils.MAX_EDGE_FRACTION * 3.0)  # 3 points across
    (big,) = _utils.draw_cells(ax, [points], faces, edgecolor=LOW_COLOR, linewidth=0.8, point_size=100.0)
    np.testing.assert_allclose(big.get_linewidths(), 0.8)  # 10 points across: the width asked for
    (tiny,) = _utils.draw_cells(ax, [points], faces, edgecolor=LOW_COLOR, linewidth=0.8, point_size=4.0)
    assert np.all(tiny.get_linewidths() == 0) and tiny.get_gid() is None  # 2 points across: no edge


def _channels_image(good: np.ndarray, n_channels: int, names=None):
    """An image whose first channels are ``good`` and whose other channels raise when computed."""
    import dask.array as da
    from spatialdata.models import Image2DModel

    def boom(block):
        raise AssertionError("a channel that is not drawn was computed")

    dtype = good.dtype
    shape = (n_channels - good.shape[0], *good.shape[1:])
    bad = da.zeros(shape, dtype=dtype, chunks=(1, 20, 30)).map_blocks(boom, dtype=dtype)
    arr = da.concatenate([da.from_array(good, chunks=(1, 20, 30)), bad])
    return Image2DModel.parse(arr, dims=("c", "y", "x"), c_coords=names or [f"ch{i}" for i in range(n_channels)])


def test_only_the_drawn_channels_are_read():
    # A 40-channel immunofluorescence image is drawn as its first channel in grey: the other 39 are not computed
    # (they were: 40x the time and memory for channels that were thrown away).
    first = np.arange(40 * 60, dtype=np.uint16).reshape(1, 40, 60)
    layer = _utils.prepare_image(_channels_image(first, 40), np.eye(3))
    assert layer.pixels.shape == (40, 60) and layer.cmap == "gray"
    np.testing.assert_array_equal(layer.pixels, first[0])
    # An RGBA uint8 image is drawn from its first three channels; the fourth (alpha) is not read.
    rgb = (np.arange(3 * 40 * 60) % 251).astype(np.uint8).reshape(3, 40, 60)
    layer = _utils.prepare_image(_channels_image(rgb, 4, names=["r", "g", "b", "a"]), np.eye(3))
    assert layer.pixels.shape == (40, 60, 3) and layer.cmap is None
    np.testing.assert_allclose(layer.pixels, np.moveaxis(rgb, 0, -1) / 255)


def labels_sdata(*, scale_factors=None):
    """Square cells in a labels element (pixels; 0.5 µm per pixel), annotated by the table as readers do for Xenium.

    The table's rows are in another order than the label ids, one label (99) is not in the table, and
    ``obsm["spatial"]`` holds centroids in other units (as Xenium's µm next to labels in pixels): it must not be
    used when the labels give the cells' positions.
    """
    from spatialdata import SpatialData
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale

    labels = np.zeros((64, 96), dtype=np.int32)
    boxes = {}  # label -> (x0, y0, side) in pixels
    for i, (x0, y0, side) in enumerate([(2, 3, 4), (20, 10, 6), (40, 40, 8), (70, 5, 10), (10, 50, 3), (80, 50, 5)]):
        labels[y0 : y0 + side, x0 : x0 + side] = i + 1
        boxes[i + 1] = (x0, y0, side)
    labels[60:62, 90:92] = 99  # a segmented object that is not in the table
    element = Labels2DModel.parse(
        labels,
        dims=("y", "x"),
        transformations={"global": Scale([0.5, 0.5], axes=("x", "y"))},
        scale_factors=scale_factors,
    )
    ids = np.array([6, 3, 1, 5, 2, 4])
    rng = np.random.default_rng(0)
    table = _table(_obs(len(ids), rng), "cell_labels", ids)
    table.obsm["spatial"] = rng.uniform(0, 10_000, (len(ids), 2))
    image = _image(64, 96, transform=Scale([0.5, 0.5], axes=("x", "y")))
    sdata = SpatialData(images={"morphology": image}, labels={"cell_labels": element}, tables={"table": table})
    # expected, per table row: centroid (pixel centres, in µm) and the diameter of the circle of the same area
    centres = np.array([[boxes[i][0] + boxes[i][2] / 2, boxes[i][1] + boxes[i][2] / 2] for i in ids]) * 0.5
    diameters = 2 * np.sqrt(np.array([boxes[i][2] ** 2 for i in ids]) / np.pi) * 0.5
    return sdata, centres, diameters


def test_table_annotating_labels_draws_cells_at_their_label_centroids():
    # Readers of Xenium and CosMx link the table to a labels element (e.g. 'cell_labels'): the cells are drawn at
    # their labels' centroids, as circles of the same area, in the coordinate system of the image. (They were drawn
    # from obsm['spatial'], taken to be in the image's units, or not at all.)
    sdata, centres, diameters = labels_sdata()
    fig = scx.pl.confidence(sdata)
    ax = fig.axes[0]
    colls = _cell_collections(ax)
    assert all(isinstance(c, EllipseCollection) for c in colls)
    offsets = np.concatenate([c.get_offsets() for c in colls])
    widths = np.concatenate([c.get_widths() for c in colls])
    order = np.lexsort(offsets.T[::-1])
    expected = np.lexsort(centres.T[::-1])
    np.testing.assert_allclose(offsets[order], centres[expected])
    np.testing.assert_allclose(widths[order], diameters[expected])
    assert "6 cells from 'cell_labels'" in ax.get_title()
    (im,) = ax.get_images()
    left, right, bottom, top = im.get_extent()  # the image (48 x 32 µm), cropped to the cells, under them
    assert 0 <= left <= centres[:, 0].min() and centres[:, 0].max() <= right <= 48
    assert 0 <= top <= centres[:, 1].min() and centres[:, 1].max() <= bottom <= 32


def test_labels_centroids_from_a_coarser_level_of_a_large_labels_element(monkeypatch):
    # Above MAX_LABEL_PIXELS, the finest pyramid level under that size is read (chunk by chunk): centroids are then
    # those of the coarser pixels, within a coarse pixel of the truth.
    sdata, centres, _ = labels_sdata(scale_factors=[2])
    monkeypatch.setattr(_utils, "MAX_LABEL_PIXELS", 64 * 96 // 2)
    (geom,) = _utils.cell_geometries(sdata.tables["table"], sdata)
    assert geom.kind == "circles" and geom.source == "cell_labels"
    got = np.full((geom.n_cells, 2), np.nan)
    got[geom.rows] = geom.centers
    found = np.isfinite(got[:, 0])
    assert found.sum() >= 5  # the 3-pixel cell may vanish at half resolution
    np.testing.assert_allclose(got[found], centres[found], atol=0.5 * 2)


def test_table_annotating_labels_with_string_instance_ids_is_a_clear_error():
    sdata, _, _ = labels_sdata()
    table = sdata.tables["table"]
    table.obs["cell_id"] = [f"cell-{i}" for i in table.obs["cell_id"]]
    with pytest.raises(ValueError, match=r"labels element 'cell_labels'.*integer"):
        _utils.cell_geometries(table, sdata)


# --------------------------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------------------------


def test_real_merfish_store(shared_data, tmp_path):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    path = shared_data("merfish_visp_spatialdata", "merfish.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sd.read_zarr(path)
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    table.obs["cell_type"] = pd.Categorical(rng.choice(["L2/3 IT", "L5 IT", "Astro", "Oligo", "Pvalb"], table.n_obs))
    table.obs["cell_type_confidence"] = rng.beta(6, 1.5, table.n_obs)

    out = tmp_path / "merfish_confidence.png"
    fig = scx.pl.confidence(sdata, image_key="rasterized", shapes_key="cells", save=out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    ax_map = fig.axes[0]
    (im,) = ax_map.get_images()
    matrix = get_transformation(sdata.images["rasterized"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    h, w = sdata.images["rasterized"].shape[1:]
    left, right, bottom, top = im.get_extent()
    # The cells extend beyond the image on every side but the top-left: the whole image is drawn.
    np.testing.assert_allclose([left, top], matrix[:2, 2])
    np.testing.assert_allclose([right, bottom], matrix[:2, :2] @ [w, h] + matrix[:2, 2])
    colls = _cell_collections(ax_map)
    assert sum(_n_items(c) for c in colls) == table.n_obs == 2389
    # The shapes have an identity transform: circles keep their radii.
    radius = sdata.shapes["cells"]["radius"].to_numpy()
    widths = np.concatenate([c.get_widths() for c in colls])
    np.testing.assert_allclose(np.sort(widths), np.sort(2 * radius))


def test_many_polygons_are_kept_as_centroids_without_reading_every_vertex(monkeypatch):
    # Above MAX_SHAPES polygons the cells are drawn as points: each polygon is kept as the circle of its area at its
    # centroid. Every vertex of every polygon was read and transformed (1M Xenium/MERSCOPE boundaries: 30 s, +2 GB).
    import shapely

    sdata = polygons_sdata()
    table = sdata.tables["table"]
    (full,) = _utils.cell_geometries(table, sdata)
    assert full.kind == "polygons"
    monkeypatch.setattr(_utils, "MAX_SHAPES", 5)
    monkeypatch.setattr(shapely, "get_exterior_ring", lambda *a, **k: pytest.fail("every vertex was read"))
    (geom,) = _utils.cell_geometries(table, sdata)
    assert geom.kind == "circles" and geom.vertices is None
    np.testing.assert_array_equal(np.sort(geom.rows), np.arange(table.n_obs))
    by_row = np.empty((table.n_obs, 2))
    by_row[geom.rows] = geom.centers
    expected = np.empty((table.n_obs, 2))
    expected[full.rows] = full.centers  # boxes: the mean of the vertices is the centroid
    np.testing.assert_allclose(by_row, expected)
    # boxes of 8 x 4 px at 0.5 µm per px: the circle of the same area
    np.testing.assert_allclose(geom.widths, 2 * np.sqrt(8 * 4 / np.pi) * 0.5)
    fig = scx.pl.confidence(sdata)
    assert sum(_n_items(c) for c in _cell_collections(fig.axes[0])) == table.n_obs


def test_cells_smaller_than_a_pixel_are_drawn_as_visible_points():
    # A whole Xenium section (24 x 8 mm, 85k cells of 8 µm) on a 10-inch map: each cell is a third of a pixel. As
    # circles they faded into the background (antialiased to a tint), so the map showed no colours; they are drawn as
    # points of at least a pixel instead. Cells a few points across stay circles.
    from matplotlib.figure import Figure

    n = 50
    rng = np.random.default_rng(0)
    centers = rng.uniform(0, 24_000, (n, 2))

    def circles(diameter: float) -> _utils.CellGeometry:
        return _utils.CellGeometry(
            rows=np.arange(n),
            centers=centers,
            kind="circles",
            n_cells=n,
            source="cell_circles",
            widths=np.full(n, diameter),
            heights=np.full(n, diameter),
            angles=np.zeros(n),
        )

    ax = Figure(figsize=(10, 4), dpi=100).add_subplot()
    _utils.set_spatial_limits(ax, (0.0, 24_000.0, 0.0, 24_000.0))
    faces = np.tile(to_rgba("tab:blue"), (n, 1))
    (coll,) = _utils.draw_cells(ax, [circles(8.0)], faces)
    assert isinstance(coll, PathCollection)
    np.testing.assert_allclose(coll.get_offsets(), centers)
    assert coll.get_sizes()[0] >= (72 / ax.figure.dpi) ** 2  # at least a pixel
    np.testing.assert_allclose(coll.get_facecolors(), faces)
    (coll,) = _utils.draw_cells(ax, [circles(400.0)], faces)  # ~ 4 points across: circles
    assert isinstance(coll, EllipseCollection)


# --------------------------------------------------------------------------------------------------------------------
# Many points: drawn as an image
# --------------------------------------------------------------------------------------------------------------------


def _pixel(im, x: float, y: float) -> np.ndarray:
    """RGBA of the image's pixel at data position (x, y)."""
    left, right, bottom, top = im.get_extent()
    rgba = im.get_array()
    ny, nx = rgba.shape[:2]
    col = int((x - left) / (right - left) * nx)
    row = int((y - top) / (bottom - top) * ny)
    return np.asarray(rgba[row, col])


def test_points_image_puts_each_point_in_its_pixel_last_one_on_top():
    """The image of points shows what a scatter shows: each point's colour where it lies, later points on top."""
    fig, ax = plt.subplots(figsize=(4, 4))
    _utils.set_spatial_limits(ax, (0.0, 100.0, 0.0, 100.0))  # y pointing down, as the map
    xy = np.array([[10.0, 20.0], [80.0, 30.0], [50.0, 90.0], [50.0, 90.0]])
    colors = np.array([to_rgba(c) for c in ("red", "green", "blue", "orange")])
    one_pixel = (72 / _utils.SAVE_DPI) ** 2  # points² of a pixel of the image
    im = _utils.draw_points_image(ax, xy, colors, size=one_pixel)
    for (x, y), c in zip(xy[:2], colors[:2], strict=True):
        np.testing.assert_allclose(_pixel(im, x, y), c)
    np.testing.assert_allclose(_pixel(im, 50, 90), to_rgba("orange"))  # drawn last, on top of blue
    assert _pixel(im, 30, 60)[3] == 0  # transparent where there is no point
    rgba = im.get_array()
    assert ((rgba[..., 3] > 0).sum(), im.get_zorder()) == (3, 1)  # one pixel per point, over the tissue image
    im = _utils.draw_points_image(ax, xy[:1], colors[:1], size=(5 * 72 / _utils.SAVE_DPI) ** 2)
    assert (im.get_array()[..., 3] > 0).sum() == 21  # 5 pixels across: a disc, as a round marker
    # the outline: pixels around the drawn ones, none over them
    for linewidth, n_edge, alpha in (
        (72 / _utils.SAVE_DPI, 8, 1.0),
        (36 / _utils.SAVE_DPI, 8, 0.5),
        (144 / _utils.SAVE_DPI, 24, 1),
    ):
        im = _utils.draw_points_image(ax, xy[:1], colors[:1], size=one_pixel, edgecolor=LOW_COLOR, linewidth=linewidth)
        rgba = im.get_array()
        edge = np.all(np.isclose(rgba, (*to_rgba(LOW_COLOR)[:3], alpha)), axis=-1)
        assert edge.sum() == n_edge and np.allclose(_pixel(im, 10, 20), to_rgba("red"))  # thinner: fainter


def test_many_points_are_drawn_as_images_with_the_scatter_colours(monkeypatch):
    """A million points took 10 s per rendering as a scatter; above MAX_SCATTER_POINTS they are drawn as images."""
    monkeypatch.setattr(_utils, "MAX_SCATTER_POINTS", 50)
    adata = points_adata(300)
    adata.obs.loc[adata.obs_names[:5], "cell_type_confidence"] = np.nan
    fig = scx.pl.confidence(adata, threshold=THRESHOLD)
    ax = fig.axes[0]
    assert _cell_collections(ax) == []
    confident, low = ax.get_images()
    assert (confident.get_label(), low.get_label()) == (
        "cells (obsm['spatial'])",
        "low-confidence cells (obsm['spatial'])",
    )
    np.testing.assert_allclose(confident.get_extent(), [*ax.get_xlim(), *ax.get_ylim()])  # the whole map
    conf = adata.obs["cell_type_confidence"].to_numpy()
    xy = adata.obsm["spatial"]
    norm = plt.Normalize(0, 1)
    faces = plt.get_cmap("viridis")(norm(np.nan_to_num(conf)))
    faces[np.isnan(conf)] = to_rgba(MISSING_COLOR)
    is_low = conf < THRESHOLD
    drawn = np.asarray(confident.get_array()).reshape(-1, 4)
    drawn = drawn[drawn[:, 3] > 0]
    nearest = np.abs(drawn[:, None, :] - faces[None, ~is_low, :]).max(axis=-1).min(axis=1)
    assert nearest.max() < 1e-6  # colours of confident cells and grey NaN ones only
    assert np.isclose(drawn, to_rgba(MISSING_COLOR), atol=1e-6).all(axis=1).any()
    hits = [np.allclose(_pixel(low, *xy[i]), faces[i], atol=1e-3) for i in np.flatnonzero(is_low)]
    assert np.mean(hits) > 0.9  # a low cell's colour is at its position (unless another low cell covers it)
    ring = np.all(np.isclose(low.get_array()[..., :3], to_rgba(LOW_COLOR)[:3]), axis=-1)
    assert ring.sum() > 0  # outlined in red around the low-confidence cells
    monkeypatch.setattr(_utils, "MAX_SCATTER_POINTS", 10_000)  # below it: the scatter, as before
    fig = scx.pl.confidence(adata, threshold=THRESHOLD)
    assert [type(c) for c in _cell_collections(fig.axes[0])] == [PathCollection, PathCollection]


# --------------------------------------------------------------------------------------------------------------------
# Fields of view in their own coordinate systems, cells without a position
# --------------------------------------------------------------------------------------------------------------------


def fields_of_view_sdata():
    """Two fields of view (as MIBI-TOF or CosMx stores hold them): each an image and a labels element in its own
    coordinate system, one table annotating both labels elements. ``fov2``'s image comes first in ``sdata.images``."""
    from spatialdata import SpatialData
    from spatialdata.models import Labels2DModel, TableModel
    from spatialdata.transformations import Scale

    rng = np.random.default_rng(3)
    images, labels, obs = {}, {}, []
    for fov, n in (("fov2", 3), ("fov1", 4)):
        lab = np.zeros((40, 60), dtype=np.int32)
        for i in range(n):
            lab[5:9, 10 * i + 2 : 10 * i + 6] = i + 1  # 4 x 4 px squares
        to_um = Scale([2.0, 2.0], axes=("x", "y"))
        images[f"{fov}_image"] = _image(transform=to_um, coordinate_system=fov)
        labels[f"{fov}_labels"] = Labels2DModel.parse(lab, dims=("y", "x"), transformations={fov: to_um})
        obs.append(pd.DataFrame({"region": f"{fov}_labels", "cell_id": np.arange(1, n + 1)}))
    obs = pd.concat(obs, ignore_index=True).set_axis([f"c{i}" for i in range(7)])
    obs["region"] = pd.Categorical(obs["region"])
    obs["cell_type"] = pd.Categorical(rng.choice(["B cell", "T cell"], 7))
    obs["cell_type_confidence"] = rng.uniform(0, 1, 7)
    table = TableModel.parse(
        AnnData(np.zeros((7, 2), np.float32), obs=obs),
        region=list(labels),
        region_key="region",
        instance_key="cell_id",
    )
    return SpatialData(images=images, labels=labels, tables={"table": table})


def test_fields_of_view_in_their_own_coordinate_systems():
    # A table annotating one labels element per field of view, each in its own coordinate system: drawing 'fov1'
    # draws the cells of 'fov1_labels' over 'fov1_image'. It raised "Element 'fov2_labels' has no transformation to
    # coordinate system 'fov1'" (and the first image, 'fov2_image', was taken whatever the coordinate system).
    sdata = fields_of_view_sdata()
    fig = scx.pl.confidence(sdata, coordinate_system="fov1")
    ax = fig.axes[0]
    assert ax.get_title().startswith("4 cells from 'fov1_labels' over 'fov1_image'")
    (im,) = ax.get_images()
    assert im.get_label() == "image (fov1_image)"
    offsets = np.concatenate([c.get_offsets() for c in _cell_collections(ax)])
    # squares of 4 x 4 px at x = 2 + 10 i, y = 5, 2 µm per px: centres at (8 + 20 i, 14) µm
    np.testing.assert_allclose(np.sort(offsets[:, 0]), [8.0, 28.0, 48.0, 68.0])
    np.testing.assert_allclose(offsets[:, 1], 14.0)
    assert "of 7 cells" in fig._suptitle.get_text()  # the strips keep every cell of the table
    with pytest.raises(ValueError, match=r"coordinate system 'global'.*'fov1', 'fov2'\. Pass one of them"):
        scx.pl.confidence(sdata)


def test_first_image_in_the_coordinate_system_is_drawn():
    from spatialdata import SpatialData

    sdata = circles_sdata()
    images = {"a_other": _image(coordinate_system="other"), "he": sdata.images["he"]}  # another system's image first
    sdata = SpatialData(images=images, shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    fig = scx.pl.confidence(sdata)
    assert [im.get_label() for im in fig.axes[0].get_images()] == ["image (he)"]
    with pytest.raises(ValueError, match=r"'a_other' has no transformation to coordinate system 'global'"):
        scx.pl.confidence(sdata, image_key="a_other")  # asked for by name: an error, not left out silently
    del sdata.images["he"]
    assert not scx.pl.confidence(sdata).axes[0].get_images()  # none in 'global': no image


def test_cells_without_a_position_are_left_out(caplog):
    # NaN centroids (cells without a segmentation, lost in a merge) crashed the plot ("figure size must be positive
    # finite not (nan, 6.5)"); they are left out of the map, with a warning, and kept in the strips.
    import logging

    adata = points_adata()
    adata.obsm["spatial"][:4] = np.nan
    adata.obsm["spatial"][4, 1] = np.inf
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        fig = scx.pl.confidence(adata, point_size=5)
    assert "5 of 300 cells of obsm['spatial'] have no finite position" in caplog.text
    ax = fig.axes[0]
    offsets = np.concatenate([c.get_offsets() for c in _cell_collections(ax)])
    np.testing.assert_allclose(np.sort(offsets, axis=0), np.sort(adata.obsm["spatial"][5:], axis=0))
    assert ax.get_title().startswith("295 cells from obsm['spatial']")
    assert np.isfinite(ax.get_xlim()).all() and np.isfinite(ax.get_ylim()).all()
    assert "of 300 cells" in fig._suptitle.get_text()
    adata.obsm["spatial"][:] = np.nan  # no position at all: the strips only, as without coordinates
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        assert len(scx.pl.confidence(adata).axes) == 1
    assert "None of the cells has a finite position" in caplog.text


@pytest.mark.parametrize("max_shapes", [_utils.MAX_SHAPES, 5])
def test_empty_geometries_are_left_out(monkeypatch, caplog, max_shapes):
    # An empty polygon (as clipping or some segmentations leave) crashed the plot: shapely leaves empty geometries out
    # of the coordinates it returns, so the cells no longer matched their rows ("zero-size array" on the polygons,
    # "operands could not be broadcast" above MAX_SHAPES). Empty cells are left out; the others keep their rows.
    import logging

    from shapely.geometry import MultiPolygon, Point, Polygon, box
    from spatialdata.models import ShapesModel

    sdata = polygons_sdata()
    gdf = sdata.shapes["cell_boundaries"]
    geoms = list(gdf.geometry)
    geoms[3] = Polygon()
    geoms[5] = MultiPolygon([box(0, 0, 2, 2), box(200, 100, 202, 102)])
    sdata.shapes["cell_boundaries"] = ShapesModel.parse(gdf.set_geometry(geoms))  # keeps its Scale(0.5)
    monkeypatch.setattr(_utils, "MAX_SHAPES", max_shapes)
    table = sdata.tables["table"]
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        (geom,) = _utils.cell_geometries(table, sdata)
        fig = scx.pl.confidence(sdata)
    assert "1 of 12 cells of 'cell_boundaries' have an empty geometry" in caplog.text
    row_of = pd.Index(table.obs["cell_id"]).get_indexer(gdf.index)
    drawn = sorted(set(geom.rows.tolist()))
    assert drawn == sorted(set(range(12)) - {row_of[3]})
    centres = {int(r): c for r, c in zip(geom.rows, geom.centers) if r != row_of[5]}
    for i in set(range(12)) - {3, 5}:  # each cell at its own box: 8 x 4 px at (20 i, 10 i), 0.5 µm per px
        np.testing.assert_allclose(centres[row_of[i]], [(20 * i + 4) * 0.5, (10 * i + 2) * 0.5])
    assert fig.axes[0].get_title().startswith("11 cells from 'cell_boundaries'")
    # circles with a NaN position, next to an empty point
    points = [Point(np.nan, np.nan), Point()] + [Point(20 * i, 10 * i) for i in range(2, 12)]
    sdata.shapes["cell_boundaries"] = ShapesModel.parse(gdf.set_geometry(points).assign(radius=2.0))
    (geom,) = _utils.cell_geometries(table, sdata)
    assert sorted(geom.rows.tolist()) == sorted(row_of[2:].tolist())
    for row, centre in zip(geom.rows, geom.centers, strict=True):
        i = int(np.flatnonzero(row_of == row)[0])
        np.testing.assert_allclose(centre, [10 * i, 5 * i])


def test_take_keeps_the_vertices_of_each_polygon():
    geom = _utils.CellGeometry(
        rows=np.array([0, 1, 1, 2]),
        centers=np.array([[0.5, 0.5], [2.5, 0.5], [np.nan, np.nan], [4.5, 0.5]]),
        kind="polygons",
        n_cells=3,
        vertices=np.array(
            [
                [0, 0],
                [1, 0],
                [1, 1],
                [0, 0],
                [2, 0],
                [3, 0],
                [3, 1],
                [2, 0],
                [np.nan, 0],
                [0, 0],
                [4, 0],
                [5, 1],
                [4, 0],
            ],
            dtype=float,
        ),
        offsets=np.array([0, 4, 8, 10, 13]),
        source="cells",
    )
    np.testing.assert_array_equal(geom.placed(), [True, True, False, True])
    kept = geom.take(np.flatnonzero(geom.placed()))
    assert (kept.n_cells, kept.rows.tolist(), kept.offsets.tolist()) == (3, [0, 1, 2], [0, 4, 8, 11])
    np.testing.assert_array_equal(kept.polygons()[2], [[4, 0], [5, 1], [4, 0]])
    np.testing.assert_array_equal(kept.polygons()[1], geom.polygons()[1])
    assert kept.bounds() == (0.0, 5.0, 0.0, 1.0)


def test_a_single_cell_is_framed_readably():
    # One cell (or all at one spot) was framed by a box of 1e-11 units: tick labels such as "1e-11+4.68e1".
    adata = points_adata()[:1]
    x, y = adata.obsm["spatial"][0]
    ax = scx.pl.confidence(adata).axes[0]
    np.testing.assert_allclose(ax.get_xlim(), (x - _utils.SINGLE_SPOT_PAD, x + _utils.SINGLE_SPOT_PAD))
    np.testing.assert_allclose(ax.get_ylim(), (y + _utils.SINGLE_SPOT_PAD, y - _utils.SINGLE_SPOT_PAD))


def test_3d_labels_are_circles_of_their_sections():
    # In a 3D labels element a cell's circle had the area of its volume in voxels: sqrt(planes) times too wide (each
    # cell over many others in a stack of 50 planes). It has the mean area of its sections now, wherever the chunks cut.
    from spatialdata import SpatialData
    from spatialdata.models import Labels3DModel
    from spatialdata.transformations import Scale

    stack = np.zeros((6, 30, 30), dtype=np.int32)
    stack[1:4, 8:12, 18:22] = 1  # 4 x 4 px on planes 1 to 3, cut by the chunks in y and x
    stack[0, 2:8, 2:8] = 2  # 6 x 6 px on one plane
    stack[2:6, 20:23, 3:6] = 3  # 3 x 3 px on planes 2 to 5
    element = Labels3DModel.parse(
        stack,
        dims=("z", "y", "x"),
        chunks=(1, 10, 10),
        transformations={"global": Scale([0.5, 0.5, 2.0], axes=("x", "y", "z"))},
    )
    rng = np.random.default_rng(0)
    table = _table(_obs(3, rng), "cells3d", [3, 1, 2])
    sdata = SpatialData(labels={"cells3d": element}, tables={"table": table})
    (geom,) = _utils.cell_geometries(table, sdata)
    order = np.argsort(geom.rows)
    np.testing.assert_allclose(geom.centers[order], [[4.5 * 0.5, 21.5 * 0.5], [20 * 0.5, 10 * 0.5], [5 * 0.5, 5 * 0.5]])
    sides = np.array([3, 4, 6]) * 0.5  # µm
    np.testing.assert_allclose(geom.widths[order], 2 * np.sqrt(sides**2 / np.pi))


def test_shapes_key_of_another_element_with_ids_repeated_across_regions_is_a_clear_error():
    # The table numbers the cells of each field of view from 1: rows of both fields were matched to the shapes of one
    # (cells of 'fov2' drawn at the places of cells of 'fov1').
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    sdata = fields_of_view_sdata()
    sdata.shapes["fov1_circles"] = ShapesModel.parse(
        np.array([[8.0, 14.0], [28.0, 14.0], [48.0, 14.0], [68.0, 14.0]]),
        geometry=0,
        radius=np.full(4, 4.0),
        index=[1, 2, 3, 4],
        transformations={"fov1": Identity()},
    )
    with pytest.raises(ValueError, match=r"'cell_id' values repeat across.*'fov1_labels', 'fov2_labels'"):
        scx.pl.confidence(sdata, shapes_key="fov1_circles", coordinate_system="fov1")


def test_cells_drawn_as_tiny_points_are_not_outlined():
    # Markers a few pixels wide with a red edge each came out red all over (the edge lies half outside the marker):
    # 85,000 Xenium cells at 1.2 points across, half of them below the threshold, hid every colour. They keep their
    # colour only, and the title says where the threshold is.
    from spatialcx.pl._confidence import MIN_OUTLINED_POINTS

    adata = points_adata()
    n_low = int((adata.obs["cell_type_confidence"] < THRESHOLD).sum())
    ax = scx.pl.confidence(adata, point_size=(MIN_OUTLINED_POINTS * 0.8) ** 2).axes[0]
    (low,) = _cell_collections(ax, "low")
    assert _n_items(low) == n_low > 0
    np.testing.assert_array_equal(low.get_linewidths(), 0.0)
    assert (
        ax.get_title().splitlines()[1]
        == f"{n_low} ({n_low / 300:.1%}) below 0.8 (under the red mark of the colour bar)"
    )
    ax = scx.pl.confidence(adata, point_size=(MIN_OUTLINED_POINTS * 1.2) ** 2).axes[0]  # wide enough: outlined
    (low,) = _cell_collections(ax, "low")
    np.testing.assert_allclose(low.get_edgecolors(), [to_rgba(LOW_COLOR)])
    assert np.all(low.get_linewidths() > 0)
    assert "red outline" in ax.get_title()


def test_the_colourbar_of_a_wide_map_is_not_taller_than_the_map():
    # A tissue three times as wide as tall (as Xenium sections often are) is drawn in a panel twice as wide as tall:
    # the map is shorter than the panel, and the colourbar stood out above and below it.
    adata = points_adata()
    adata.obsm["spatial"][:, 0] *= 3
    fig = scx.pl.confidence(adata)
    fig.canvas.draw()
    ax_map, cbar = fig.axes[0], fig.axes[2]
    assert cbar.get_label() == "<colorbar>"
    assert cbar.get_position().height <= ax_map.get_position().height
