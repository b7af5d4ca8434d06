"""Tests of scx.tl.spatial_domains."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatialcx as scx

SPACING = 10.0


def grid_table(n=40):
    """Cells on a square grid (spacing 10) with selected blocks: A 16x16, B 11x16, C 3x3 (40 from A), D 2x2 (far)."""
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    block = np.full(ii.size, "", dtype=object)
    block[(ii >= 2) & (ii < 18) & (jj >= 2) & (jj < 18)] = "A"
    block[(ii >= 24) & (ii < 35) & (jj >= 20) & (jj < 36)] = "B"
    block[(ii >= 2) & (ii < 5) & (jj >= 22) & (jj < 25)] = "C"
    block[(ii >= 37) & (ii < 39) & (jj >= 2) & (jj < 4)] = "D"
    adata = ad.AnnData(
        np.ones((ii.size, 1), dtype=np.float32),
        obs=pd.DataFrame({"block": pd.Categorical(block)}, index=[f"c{k}" for k in range(ii.size)]),
    )
    adata.obs["selected"] = block != ""
    adata.obs["cluster01"] = (block != "").astype(int)
    adata.obsm["spatial"] = np.column_stack([jj, ii]).astype(float) * SPACING
    return adata


def members(adata, key="domain"):
    col = adata.obs[key]
    return {name: set(adata.obs["block"][col == name]) for name in col.cat.categories}


def test_blocks_become_domains_ordered_by_size_and_small_ones_are_dropped():
    adata = grid_table()
    scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=10, small_domains="drop")
    col = adata.obs["domain"]
    assert list(col.cat.categories) == ["domain_1", "domain_2"]
    assert members(adata) == {"domain_1": {"A"}, "domain_2": {"B"}}
    assert (col == "domain_1").sum() == 256 and (col == "domain_2").sum() == 176
    assert col[adata.obs["block"].isin(["C", "D", ""])].isna().all()
    u = adata.uns["domain"]
    assert u["n_domains"] == 2 and list(u["n_cells"]) == [256, 176]
    assert u["n_small_dropped"] == 2 and u["n_cells_dropped"] == 13 and u["n_selected"] == 445
    assert u["max_distance"] == 15 and u["distance_source"] == "max_distance"


def test_small_domains_merge_into_nearest_within_merge_distance():
    adata = grid_table()
    # C is 50 from A (5 spacings); the default merge distance (2 x 15) is too short
    scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=10)
    assert members(adata) == {"domain_1": {"A"}, "domain_2": {"B"}}
    assert adata.uns["domain"]["n_small_merged"] == 0 and adata.uns["domain"]["n_small_dropped"] == 2
    scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=10, merge_distance=55)
    assert members(adata) == {"domain_1": {"A", "C"}, "domain_2": {"B"}}
    assert adata.uns["domain"]["n_small_merged"] == 1 and adata.uns["domain"]["n_small_dropped"] == 1
    assert adata.obs["domain"][adata.obs["block"] == "D"].isna().all()


def test_distance_links_across_gaps():
    adata = grid_table()
    # A and C are 50 apart: linked with a 55 radius, so C is part of A's domain without any merging
    scx.tl.spatial_domains(adata, "selected", max_distance=55, min_cells=10, small_domains="drop", prefix="tumour")
    assert members(adata) == {"tumour_1": {"A", "C"}, "tumour_2": {"B"}}
    assert adata.uns["domain"]["n_small_merged"] == 0


def test_default_distances_platform_and_data_driven(caplog):
    adata = grid_table()
    scx.tl.spatial_domains(adata, "selected")
    u = adata.uns["domain"]
    assert u["median_nn_distance"] == pytest.approx(SPACING)
    assert u["max_distance"] == pytest.approx(2 * SPACING) and "nearest-neighbour" in u["distance_source"]
    scx.tl.spatial_domains(adata, "selected", platform="xenium", key_added="x")
    assert adata.uns["x"]["max_distance"] == 30.0 and adata.uns["x"]["platform"] == "xenium"
    scx.tl.spatial_domains(adata, "selected", platform="cosmx", max_distance=12, key_added="y")
    assert adata.uns["y"]["max_distance"] == 12 and adata.uns["y"]["distance_source"] == "max_distance"
    # coordinates in millimetres with a micron default: warned
    adata.obsm["spatial"] = adata.obsm["spatial"] / 1000
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(adata, "selected", platform="merscope", key_added="z")
    assert "median nearest-neighbour" in caplog.text


def test_cells_stacked_in_pairs_still_give_a_distance():
    """Every cell with a twin at its position (duplicated centroids): the distance comes from the distinct positions."""
    one = grid_table()
    adata = ad.concat([one, one], index_unique="-")
    scx.tl.spatial_domains(adata, "selected")  # before: "fewer than two distinct cell positions"
    assert adata.uns["domain"]["median_nn_distance"] == pytest.approx(SPACING)
    want = members(scx.tl.spatial_domains(one, "selected", min_cells=5, copy=True))  # twins: twice the cells
    assert sorted(map(sorted, members(adata).values())) == sorted(map(sorted, want.values()))


def test_sections_are_never_linked():
    one = grid_table()
    two = grid_table()
    adata = ad.concat([one, two], index_unique="-", keys=["s1", "s2"], label="section")
    adata.obs["section"] = adata.obs["section"].astype("category")
    adata.obs["block"] = adata.obs["block"].astype(str)
    scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=10, library_key="section")
    col = adata.obs["domain"]
    assert len(col.cat.categories) == 4
    for name in col.cat.categories:
        assert adata.obs["section"][col == name].nunique() == 1
    scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=10, key_added="mixed")
    mixed = adata.obs["mixed"]
    assert len(mixed.cat.categories) == 3  # A, B and the two C blocks together (18 cells, no longer small)
    for name in mixed.cat.categories:  # same coordinates: the sections overlap without library_key
        assert adata.obs["section"][mixed == name].nunique() == 2


def test_selection_forms():
    adata = grid_table()
    ref = None
    for sel, kw in (
        ("selected", {}),
        ("cluster01", {}),
        ("block", {"value": ["A", "B", "C", "D"]}),
        (adata.obs["selected"].to_numpy(), {}),
        (adata.obs["selected"], {}),
        (list(adata.obs["cluster01"]), {}),
    ):
        scx.tl.spatial_domains(adata, sel, max_distance=15, min_cells=10, **kw)
        cur = adata.obs["domain"].astype(str).to_numpy()
        if ref is None:
            ref = cur
        np.testing.assert_array_equal(cur, ref)
    scx.tl.spatial_domains(adata, "block", value="B", max_distance=15)
    assert members(adata) == {"domain_1": {"B"}}
    assert adata.uns["domain"]["selection"] == "obs['block'] == 'B'"


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (("nope",), {}, KeyError, "no column 'nope'"),
        (("block",), {}, ValueError, "value="),
        (("block",), {"value": "Z"}, ValueError, "picks no cell"),
        ((np.ones(5, dtype=bool),), {}, ValueError, "1600 cells"),
        (("selected",), {"platform": "visium"}, ValueError, "platform"),
        (("selected",), {"max_distance": -1}, ValueError, "max_distance"),
        (("selected",), {"min_cells": 0}, ValueError, "min_cells"),
        (("selected",), {"small_domains": "keep"}, ValueError, "small_domains"),
        (("selected",), {"add_shapes": True}, TypeError, "SpatialData"),
        (("selected",), {"spatial_key": "xy"}, KeyError, "obsm has no 'xy'"),
    ],
)
def test_errors_write_nothing(args, kwargs, exc, match):
    adata = grid_table()
    before = list(adata.obs.columns)
    with pytest.raises(exc, match=match):
        scx.tl.spatial_domains(adata, *args, **kwargs)
    assert list(adata.obs.columns) == before and "domain" not in adata.uns


def test_round_trip_h5ad_and_zarr(tmp_path):
    adata = grid_table()
    adata.obs["block"] = adata.obs["block"].astype(str)
    scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=10, library_key=None)
    for path, write, read in (
        (tmp_path / "d.h5ad", ad.AnnData.write_h5ad, ad.read_h5ad),
        (tmp_path / "d.zarr", ad.AnnData.write_zarr, ad.read_zarr),
    ):
        write(adata, path)
        back = read(path)
        pd.testing.assert_series_equal(back.obs["domain"], adata.obs["domain"])
        assert list(back.uns["domain"]["domains"]) == ["domain_1", "domain_2"]
        assert list(back.uns["domain"]["n_cells"]) == [256, 176]


# --------------------------------------------------------------------------------------------------------------------
# SpatialData: shapes element


def grid_sdata():
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Scale

    adata = grid_table()
    circles = gpd.GeoDataFrame(
        {"radius": np.full(adata.n_obs, 4.0)},
        geometry=[Point(x, y) for x, y in adata.obsm["spatial"]],
        index=pd.RangeIndex(adata.n_obs),
    )
    shapes = ShapesModel.parse(circles, transformations={"global": Scale([2.0, 2.0], axes=("x", "y"))})
    adata.obs["region"] = pd.Categorical(["cells"] * adata.n_obs)
    adata.obs["cell_index"] = np.arange(adata.n_obs)
    adata.obs["block"] = adata.obs["block"].astype(str)
    table = TableModel.parse(adata, region="cells", region_key="region", instance_key="cell_index")
    return SpatialData(shapes={"cells": shapes}, tables={"table": table})


def test_domain_polygons_cover_their_cells():
    import shapely
    from spatialdata.transformations import get_transformation

    sdata = grid_sdata()
    scx.tl.spatial_domains(sdata, "selected", max_distance=15, min_cells=10, add_shapes=True)
    gdf = sdata.shapes["domain_shapes"]
    table = sdata.tables["table"]
    assert list(gdf.index) == ["domain_1", "domain_2"] and list(gdf["n_cells"]) == [256, 176]
    xy = table.obsm["spatial"]
    for name, geom in zip(gdf.index, gdf.geometry):
        inside = shapely.contains_xy(geom, xy[:, 0], xy[:, 1])
        np.testing.assert_array_equal(inside, (table.obs["domain"] == name).to_numpy())
    assert get_transformation(gdf, "global").scale.tolist() == [2.0, 2.0]
    assert table.uns["domain"]["shapes_key"] == "domain_shapes"


def test_spatialdata_without_obsm_uses_the_linked_shapes_centroids():
    reference = grid_sdata()
    scx.tl.spatial_domains(reference, "selected", max_distance=15, min_cells=10, add_shapes=True)
    sdata = grid_sdata()
    # shuffle the shapes' rows: cells are matched by instance id, not by position
    sdata.shapes["cells"] = sdata.shapes["cells"].iloc[np.random.default_rng(0).permutation(sdata["table"].n_obs)]
    del sdata.tables["table"].obsm["spatial"]
    scx.tl.spatial_domains(sdata, "selected", max_distance=15, min_cells=10, add_shapes=True)
    table = sdata.tables["table"]
    pd.testing.assert_series_equal(table.obs["domain"], reference.tables["table"].obs["domain"])
    assert table.uns["domain"]["coordinates"] == "centroids of shapes 'cells'"
    assert reference.tables["table"].uns["domain"]["coordinates"] == "obsm['spatial']"
    assert "spatial" not in table.obsm  # nothing written besides the documented keys
    gdf, ref_gdf = sdata.shapes["domain_shapes"], reference.shapes["domain_shapes"]
    assert gdf.geometry.geom_equals(ref_gdf.geometry).all()


def test_spatialdata_without_coordinates_or_link_raises():
    sdata = grid_sdata()
    del sdata.tables["table"].obsm["spatial"]
    sdata.tables["table"].uns["spatialdata_attrs"]["region"] = ["cells", "nuclei"]
    with pytest.raises(ValueError, match="annotates 2 regions"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=15)
    sdata.tables["table"].uns["spatialdata_attrs"]["region"] = "cells"
    sdata.tables["table"].obs["cell_index"] = np.arange(sdata.tables["table"].n_obs) + 10_000
    with pytest.raises(ValueError, match="not in the index of the shapes element 'cells'"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=15)
    adata = sdata.tables["table"].copy()
    with pytest.raises(KeyError, match="obsm has no 'spatial'"):
        scx.tl.spatial_domains(adata, "selected", max_distance=15)
    assert "domain" not in adata.obs and "domain" not in sdata.tables["table"].obs


def test_copy_keeps_the_original_spatialdata_unchanged():
    sdata = grid_sdata()
    out = scx.tl.spatial_domains(sdata, "selected", max_distance=15, add_shapes=True, shapes_key="tum", copy=True)
    assert "tum" in out.shapes and "domain" in out.tables["table"].obs
    assert "tum" not in sdata.shapes and "domain" not in sdata.tables["table"].obs


def test_backed_store_gets_table_columns_and_shapes(tmp_path):
    from spatialdata import read_zarr

    sdata = grid_sdata()
    sdata.write(tmp_path / "g.zarr")
    sdata = read_zarr(tmp_path / "g.zarr")
    scx.tl.spatial_domains(sdata, "selected", max_distance=15, add_shapes=True)
    scx.tl.spatial_domains(sdata, "selected", max_distance=55, add_shapes=True)  # replaced in place
    back = read_zarr(tmp_path / "g.zarr")
    assert list(back.shapes["domain_shapes"].index) == ["domain_1", "domain_2"]
    assert list(back.shapes["domain_shapes"]["n_cells"]) == [265, 176]
    assert back.tables["table"].obs["domain"].notna().sum() == 441
    assert back.tables["table"].uns["domain"]["max_distance"] == 55


def test_no_domain_writes_no_polygons_and_removes_an_earlier_runs(tmp_path, caplog):
    from spatialdata import read_zarr

    sdata = grid_sdata()
    sdata.write(tmp_path / "g.zarr")
    sdata = read_zarr(tmp_path / "g.zarr")
    # no domain at all, no earlier polygons: a warning, the obs column empty, nothing to add
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=15, min_cells=10_000, add_shapes=True)
    assert "no shapes element 'domain_shapes'" in caplog.text
    assert "domain_shapes" not in sdata.shapes and sdata.tables["table"].obs["domain"].isna().all()

    scx.tl.spatial_domains(sdata, "selected", max_distance=15, add_shapes=True)
    assert "domain_shapes" in read_zarr(tmp_path / "g.zarr").shapes
    # a copy without domains drops the polygons from the copy only
    out = scx.tl.spatial_domains(sdata, "selected", max_distance=15, min_cells=10_000, add_shapes=True, copy=True)
    assert "domain_shapes" not in out.shapes and "domain_shapes" in sdata.shapes
    # in place: the polygons of the earlier run describe domains that are gone, so they leave memory and the store
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=15, min_cells=10_000, add_shapes=True)
    assert "the one of an earlier run is removed" in caplog.text
    assert "domain_shapes" not in sdata.shapes
    back = read_zarr(tmp_path / "g.zarr")
    assert "domain_shapes" not in back.shapes and "cells" in back.shapes
    assert back.tables["table"].obs["domain"].isna().all() and back.tables["table"].uns["domain"]["n_domains"] == 0


# --------------------------------------------------------------------------------------------------------------------
# real Xenium data


def test_real_xenium_erythroid_domains(shared_data):
    import scanpy as sc

    folder = shared_data("xenium_bonemarrow")
    adata = sc.read_10x_h5(folder / "cell_feature_matrix.h5", gex_only=True)
    cent = pd.read_parquet(folder / "cell_metadata_centroids.parquet")
    adata.obsm["spatial"] = np.vstack(cent.loc[adata.obs_names, "geometry"].to_numpy()).astype(float)
    assert adata.n_vars == 477  # control probes / codewords dropped
    scx.tl.classify_by_threshold(adata, ["GYPA", "AHSP", "ALAS2"], method="ks", key_added="ery")
    scx.tl.spatial_domains(adata, "ery_cluster", platform="xenium", min_cells=20, prefix="ery", key_added="ery_domain")
    u = adata.uns["ery_domain"]
    assert u["n_domains"] >= 5
    sizes = adata.obs["ery_domain"].value_counts()
    assert (sizes >= 20).all() and list(sizes.loc[u["domains"]]) == list(u["n_cells"])
    assert list(u["n_cells"]) == sorted(u["n_cells"], reverse=True)
    in_domain = adata.obs["ery_domain"].notna().to_numpy()
    assert (adata.obs["ery_cluster"].to_numpy()[in_domain] == 1).all()
    # domain cells are packed: the nearest other cell of the domain is within the linking (or merging) distance
    from scipy.spatial import cKDTree

    for name in u["domains"][:5]:
        xy = adata.obsm["spatial"][(adata.obs["ery_domain"] == name).to_numpy()]
        d, _ = cKDTree(xy).query(xy, k=2)
        assert (d[:, 1] <= u["merge_distance"] + 1e-9).all()


def test_no_domain_warns_why_and_what_to_try(caplog):
    adata = grid_table()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=1000)  # was an INFO line only
    assert adata.obs["domain"].isna().all() and adata.uns["domain"]["n_domains"] == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "no domain found" in warning
    # 256 + 176 + 9 + 4 selected cells in 4 linked groups, the largest of 256 cells
    assert "The 445 selected cells form 4 group(s)" in warning and "the largest of 256 cell(s)" in warning
    assert "min_cells=1000" in warning and "min_cells=256" in warning and "max_distance=30" in warning


def test_lazy_table_selection_and_library(shared_data, tmp_path):
    import shutil

    import h5py
    from anndata.experimental import read_lazy

    path = tmp_path / "star.h5ad"
    shutil.copy(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"), path)
    with h5py.File(path, "r") as f:
        lazy = read_lazy(f)
        scx.tl.classify_by_threshold(lazy, ["gad1", "gad2"])
        # a 0/1 column (was: TypeError DataArray.dropna() missing 'dim'), a categorical value, a library column
        scx.tl.spatial_domains(lazy, "threshold_cluster", max_distance=400, min_cells=5, library_key="section")
        assert lazy.uns["domain"]["n_selected"] == lazy.uns["threshold"]["n_high"]
        assert lazy.uns["domain"]["n_domains"] > 0
        scx.tl.spatial_domains(lazy, "cell_type_author", value="Astro", key_added="astro", min_cells=3)
        assert lazy.uns["astro"]["n_selected"] == 240


# --------------------------------------------------------------------------------------------------------------------
# review: what must never be overwritten, coordinate frames, parameter types, scaling, real stores


@pytest.mark.parametrize(
    ("shapes_key", "match"),
    [
        ("cells", "shapes element of the cells"),  # was: the 1600 cell circles silently replaced by 2 polygons
        ("anatomical", "is not domain polygons"),
        ("image", "image element 'image'"),  # was: KeyError from spatialdata after obs/uns were written
    ],
)
def test_shapes_key_never_replaces_the_cells_or_other_elements(shapes_key, match):
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata.models import Image2DModel, ShapesModel

    sdata = grid_sdata()
    sdata.shapes["anatomical"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=[box(0, 0, 100, 100)]))
    sdata.images["image"] = Image2DModel.parse(np.zeros((1, 8, 8), dtype=np.uint8), dims=("c", "y", "x"))
    before = {k: v.copy() for k, v in sdata.shapes.items()}
    for min_cells in (10, 10_000):  # with domains, and without (the path that removes an earlier run's polygons)
        with pytest.raises(ValueError, match=match):
            scx.tl.spatial_domains(
                sdata, "selected", max_distance=15, min_cells=min_cells, add_shapes=True, shapes_key=shapes_key
            )
    assert set(sdata.shapes) == set(before) and "image" in sdata.images
    for k, v in before.items():
        assert sdata.shapes[k].geometry.geom_equals(v.geometry).all()
    assert "domain" not in sdata.tables["table"].obs and "domain" not in sdata.tables["table"].uns
    # polygons of an earlier run are replaced, also under another key_added
    scx.tl.spatial_domains(sdata, "selected", max_distance=15, add_shapes=True, shapes_key="dom")
    scx.tl.spatial_domains(sdata, "selected", max_distance=55, add_shapes=True, shapes_key="dom", key_added="d2")
    assert list(sdata.shapes["dom"]["n_cells"]) == [265, 176]


@pytest.mark.parametrize("key_added", ["region", "cell_index"])
def test_key_added_never_overwrites_the_tables_link_columns(key_added):
    sdata = grid_sdata()
    table = sdata.tables["table"]
    region, instance = table.obs["region"].copy(), table.obs["cell_index"].copy()
    with pytest.raises(ValueError, match=f"key_added={key_added!r} is the table's"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=15, key_added=key_added)
    pd.testing.assert_series_equal(table.obs["region"], region)
    pd.testing.assert_series_equal(table.obs["cell_index"], instance)


def test_polygons_follow_coordinates_given_in_a_coordinate_system_of_the_cells():
    import shapely
    from spatialdata import transform
    from spatialdata.transformations import Identity, get_transformation

    sdata = grid_sdata()  # the cells' circles map to 'global' with a scale of 2
    table = sdata.tables["table"]
    table.obsm["spatial"] = table.obsm["spatial"] * 2  # centroids in 'global' coordinates, not the circles' own
    scx.tl.spatial_domains(sdata, "selected", max_distance=30, min_cells=10, add_shapes=True)
    # was: the polygons got the circles' scale of 2 on top, so in 'global' they lay twice as far out as the cells
    assert get_transformation(sdata.shapes["domain_shapes"], "global") == Identity()
    polygons = transform(sdata.shapes["domain_shapes"], to_coordinate_system="global")
    cells = transform(sdata.shapes["cells"], to_coordinate_system="global")
    for name, geom in zip(polygons.index, polygons.geometry):
        inside = shapely.contains_xy(geom, cells.geometry.x.to_numpy(), cells.geometry.y.to_numpy())
        np.testing.assert_array_equal(inside, (table.obs["domain"] == name).to_numpy())
    # coordinates that match the cells in no coordinate system: an error, nothing written
    sdata = grid_sdata()
    sdata.tables["table"].obsm["spatial"] = sdata.tables["table"].obsm["spatial"] + 1000
    with pytest.raises(ValueError, match="do not match the cells' shapes 'cells'"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=15, add_shapes=True)
    assert "domain" not in sdata.tables["table"].obs and "domain_shapes" not in sdata.shapes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_distance": "15"}, "max_distance='15' must be a number"),  # was: numpy's ufunc 'isfinite' message
        ({"merge_distance": [30]}, "merge_distance=\\[30\\] must be a number"),
        ({"min_cells": "10"}, "min_cells must be a whole number"),
        ({"prefix": 1}, "prefix=1 must be a string"),
    ],
)
def test_parameter_types_are_checked(kwargs, match):
    adata = grid_table()
    with pytest.raises(TypeError, match=match):
        scx.tl.spatial_domains(adata, "selected", **kwargs)
    assert "domain" not in adata.obs


def test_error_messages_name_the_cells_and_values_found():
    adata = grid_table()
    adata.obsm["spatial"][[5, 42], 0] = np.nan  # c42 is selected below, c5 is not
    with pytest.raises(ValueError, match=r"1 selected cell\(s\) have missing .*obsm\['spatial'\]; e.g. \['c42'\]"):
        scx.tl.spatial_domains(adata, np.isin(np.arange(adata.n_obs), [42, 43]) | adata.obs["selected"].to_numpy())
    adata = grid_table()
    with pytest.raises(ValueError, match=r"picks no cell.*holds 5 value\(s\), e.g. \['', 'A', 'B', 'C', 'D'\]"):
        scx.tl.spatial_domains(adata, "block", value="a")


def test_sections_sharing_coordinates_without_library_key_warn(caplog):
    one, two = grid_table(), grid_table()
    adata = ad.concat([one, two], index_unique="-", keys=["s1", "s2"], label="section")
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(adata, "selected", max_distance=15)
    assert "Pass library_key='section'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(adata, "selected", max_distance=15, library_key="section")
    assert "library_key" not in caplog.text


def test_small_domains_are_matched_in_one_query_per_section(monkeypatch):
    """Many small domains cost one nearest-neighbour query per section, not one per small domain (was O(n x small))."""
    from scipy import spatial

    from spatialcx.tl import _domains

    rng = np.random.default_rng(0)
    big = np.column_stack([np.repeat(np.arange(20.0), 20), np.tile(np.arange(20.0), 20)])  # 400 cells, spacing 1
    singles = rng.uniform(-10, 30, size=(300, 2)) * [1, 1] + [0, 40]  # far above the block, mostly isolated
    coords = np.vstack([big, big + [100, 0], singles])
    libraries = np.r_[np.zeros(400), np.ones(400), rng.integers(0, 2, 300)].astype(np.int64)
    comp = _domains._components(coords, libraries, 1.5)
    calls = []
    real = spatial.cKDTree

    class Counting(real):
        def query(self, *args, **kwargs):
            calls.append(1)
            return super().query(*args, **kwargs)

    monkeypatch.setattr(spatial, "cKDTree", Counting)
    new, n_merged, n_dropped = _domains._handle_small(
        comp, coords, libraries, min_cells=5, how="merge", merge_distance=25
    )
    assert len(calls) <= 2
    # the same result as matching each small domain on its own: its cell nearest to a large domain of its section
    small = np.flatnonzero(np.bincount(comp) < 5)
    assert n_merged + n_dropped == small.size and n_merged > 0 and n_dropped > 0
    for c in small:
        cells = np.flatnonzero(comp == c)
        lib = libraries[cells[0]]
        large = np.flatnonzero(~np.isin(comp, small) & (libraries == lib))
        d = np.linalg.norm(coords[cells, None, :] - coords[None, large, :], axis=2)
        i, j = np.unravel_index(np.argmin(d), d.shape)
        expected = comp[large[j]] if d[i, j] <= 25 else -1
        assert (new[cells] == expected).all()


def test_real_merfish_store_gets_domain_polygons_over_the_cells(merfish_store):
    import shapely
    from spatialdata import read_zarr
    from spatialdata.transformations import get_transformation

    sdata = read_zarr(merfish_store)
    scx.tl.classify_by_threshold(sdata, ["Cux2"], key_added="l23")
    scx.tl.spatial_domains(sdata, "l23_cluster", platform="merscope", add_shapes=True)
    with pytest.raises(ValueError, match="shapes element of the cells"):
        scx.tl.spatial_domains(sdata, "l23_cluster", platform="merscope", add_shapes=True, shapes_key="cells")
    with pytest.raises(ValueError, match="is not domain polygons"):
        scx.tl.spatial_domains(sdata, "l23_cluster", platform="merscope", add_shapes=True, shapes_key="anatomical")
    back = read_zarr(merfish_store)  # the store stays readable, with its cells and anatomy untouched
    assert len(back.shapes["cells"]) == 2389 and len(back.shapes["anatomical"]) == 6
    table = back.tables["table"]
    u = table.uns["domain"]
    assert u["coordinates"] == "centroids of shapes 'cells'" and u["n_domains"] >= 1
    assert isinstance(table.obs["domain"].dtype, pd.CategoricalDtype)
    polygons = back.shapes["domain_shapes"]
    assert list(polygons.index) == list(u["domains"]) and list(polygons["n_cells"]) == list(u["n_cells"])
    assert get_transformation(polygons, get_all=True) == get_transformation(back.shapes["cells"], get_all=True)
    cells = back.shapes["cells"].loc[table.obs["cell_id"].to_numpy()]
    for name, geom in zip(polygons.index, polygons.geometry):
        inside = shapely.contains_xy(geom, cells.geometry.x.to_numpy(), cells.geometry.y.to_numpy())
        assert inside[(table.obs["domain"] == name).to_numpy()].all()


def test_a_run_without_shapes_removes_the_earlier_runs_polygons(tmp_path, caplog):
    from spatialdata import read_zarr

    sdata = grid_sdata()
    sdata.write(tmp_path / "g.zarr")
    sdata = read_zarr(tmp_path / "g.zarr")
    scx.tl.spatial_domains(sdata, "selected", max_distance=15, add_shapes=True)
    scx.tl.spatial_domains(sdata, "selected", max_distance=55, add_shapes=True, key_added="other")
    assert {"domain_shapes", "other_shapes"} <= set(read_zarr(tmp_path / "g.zarr").shapes)
    # a copy leaves the original's polygons alone
    out = scx.tl.spatial_domains(sdata, "selected", max_distance=55, copy=True)
    assert "domain_shapes" not in out.shapes and "domain_shapes" in sdata.shapes
    # in place: the 'domain' polygons no longer match the new domains, so they go; the 'other' run's polygons stay
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=55)
    assert "removing the shapes element 'domain_shapes'" in caplog.text
    assert "domain_shapes" not in sdata.shapes and "other_shapes" in sdata.shapes
    back = read_zarr(tmp_path / "g.zarr")
    assert "domain_shapes" not in back.shapes and {"other_shapes", "cells"} <= set(back.shapes)
    assert "shapes_key" not in back.tables["table"].uns["domain"]
    assert back.tables["table"].uns["domain"]["max_distance"] == 55
    # a second run without shapes has nothing left to remove
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=15)
    assert "removing" not in caplog.text


def test_polygons_claimed_by_a_later_run_are_kept():
    sdata = grid_sdata()
    scx.tl.spatial_domains(sdata, "selected", max_distance=15, add_shapes=True, shapes_key="dom")
    scx.tl.spatial_domains(sdata, "selected", max_distance=55, add_shapes=True, shapes_key="dom", key_added="d2")
    scx.tl.spatial_domains(sdata, "selected", max_distance=15)  # 'dom' now holds d2's polygons
    assert list(sdata.shapes["dom"]["n_cells"]) == [265, 176]


def test_new_domains_drop_the_names_annotate_domains_gave_the_old_ones(tmp_path, caplog):
    """Re-running spatial_domains with other settings removes the earlier domain names (memory and store)."""
    from spatialdata import read_zarr

    sdata = grid_sdata()
    sdata.write(tmp_path / "g.zarr")
    sdata = read_zarr(tmp_path / "g.zarr")
    table = sdata.tables["table"]
    in_a = table.obs["block"].to_numpy() == "A"
    table.obsm["signature"] = np.column_stack([in_a, ~in_a]).astype(float) + np.linspace(0, 0.1, table.n_obs)[:, None]
    table.uns["signature"] = {"names": ["A type", "other type"]}
    scx.tl.spatial_domains(sdata, "selected", max_distance=15)
    scx.tl.annotate_domains(sdata, "domain")
    assert {"domain_annotation", "domain_annotation_cell"} <= set(table.obs)
    scx.tl.spatial_domains(sdata, "selected", max_distance=15)  # the same domains: their names stay
    assert "domain_annotation" in sdata.tables["table"].uns
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(sdata, "selected", max_distance=55)  # C joins A: other domains
    assert "removing the names that annotate_domains gave the domains of an earlier run" in caplog.text
    for t in (sdata.tables["table"], read_zarr(tmp_path / "g.zarr").tables["table"]):
        assert "domain_annotation" not in t.uns and "signature" in t.uns
        assert not {"domain_annotation", "domain_annotation_cell"} & set(t.obs) and "domain" in t.obs


# --------------------------------------------------------------------------------------------------------------------
# parameters as users give them, columns with missing values, 3D coordinates, the radius graph


@pytest.mark.parametrize("min_cells", [10.0, np.float64(10), np.int32(10)])
def test_min_cells_given_as_a_whole_float(min_cells):
    """A YAML ``10.0`` is ten cells (was: TypeError for any float)."""
    adata = grid_table()
    scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=min_cells, small_domains="drop")
    assert adata.uns["domain"]["min_cells"] == 10 and isinstance(adata.uns["domain"]["min_cells"], int)
    assert list(adata.uns["domain"]["n_cells"]) == [256, 176]


@pytest.mark.parametrize("min_cells", [2.5, 0, float("nan")])
def test_min_cells_not_a_whole_number_of_at_least_one_is_refused(min_cells):
    adata = grid_table()
    with pytest.raises(ValueError, match="min_cells must be a whole number >= 1"):
        scx.tl.spatial_domains(adata, "selected", max_distance=15, min_cells=min_cells)
    assert "domain" not in adata.obs


@pytest.mark.parametrize("dtype", ["object", "Int64", "array"])
def test_boolean_selection_with_missing_values(dtype):
    """Missing values are not selected, whatever holds the True/False or 0/1 values.

    Was: a ValueError ("not True/False or 0/1") for an object column of True/False/NaN, as anndata's outer concat
    leaves it, and a TypeError from pandas for a nullable ``Int64`` 0/1 column with missing values.
    """
    adata = grid_table()
    first_a = np.flatnonzero(adata.obs["block"].to_numpy() == "A")[:3]
    if dtype == "Int64":
        col = pd.array(adata.obs["cluster01"].to_numpy(), dtype="Int64")
        col[first_a] = pd.NA
    else:
        col = adata.obs["selected"].to_numpy().astype(object)
        col[first_a] = np.nan
    if dtype == "array":
        selection = col
    else:
        adata.obs["sel"] = col
        selection = "sel"
    scx.tl.spatial_domains(adata, selection, max_distance=15, min_cells=10, small_domains="drop")
    assert list(adata.uns["domain"]["n_cells"]) == [253, 176]
    assert adata.obs["domain"].iloc[first_a].isna().all()


def test_value_given_as_an_index_or_numpy_scalars():
    adata = grid_table()
    # was: TypeError unhashable type 'Index'
    scx.tl.spatial_domains(adata, "block", value=pd.Index(["A", "B"]), max_distance=15)
    assert members(adata) == {"domain_1": {"A"}, "domain_2": {"B"}}
    assert adata.uns["domain"]["selection"] == "obs['block'] in ['A', 'B']"  # was: [np.str_('A'), ...]
    scx.tl.spatial_domains(adata, "block", value=adata.obs["block"].cat.categories[2:3], max_distance=15)
    assert members(adata) == {"domain_1": {"B"}} and adata.uns["domain"]["selection"] == "obs['block'] == 'B'"


def test_3d_coordinates_link_and_merge_within_their_layer():
    """Two layers 100 apart in z over the same x, y: small domains merge into their own layer's domain.

    Was: linking used x, y, z but merging only x, y, so both small C blocks went to the first layer's A (274 cells).
    """
    layers = ad.concat([grid_table(), grid_table()], index_unique="-", keys=["low", "high"], label="layer")
    layers.obs["block"] = layers.obs["block"].astype(str)
    z = np.where(layers.obs["layer"].to_numpy() == "low", 0.0, 100.0)
    layers.obsm["spatial"] = np.column_stack([layers.obsm["spatial"], z])
    scx.tl.spatial_domains(layers, "selected", max_distance=15, min_cells=10, merge_distance=55)
    col = layers.obs["domain"]
    assert list(layers.uns["domain"]["n_cells"]) == [265, 265, 176, 176]
    for name in col.cat.categories:
        assert layers.obs["layer"][col == name].nunique() == 1
    assert layers.uns["domain"]["median_nn_distance"] == pytest.approx(SPACING)


def test_radius_graph_matches_brute_force():
    """Cells at most max_distance apart are linked (ties included), never across libraries.

    Was: a squidpy radius graph, whose import took 8-16 s and whose graph took most of the time at 1M cells.
    """
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial.distance import cdist

    from spatialcx.tl import _domains

    rng = np.random.default_rng(0)
    coords = rng.integers(0, 40, size=(300, 2)).astype(float)  # integer positions: many pairs exactly 3 apart
    libraries = rng.integers(0, 3, 300)
    comp = _domains._components(coords, libraries, 3.0)
    linked = (cdist(coords, coords) <= 3.0) & (libraries[:, None] == libraries[None, :])
    _, expected = connected_components(linked, directed=False)
    assert len(set(zip(comp.tolist(), expected.tolist()))) == len(set(comp.tolist())) == len(set(expected.tolist()))
    adata = grid_table()
    scx.tl.spatial_domains(adata, "selected", max_distance=SPACING, min_cells=10, small_domains="drop")
    assert list(adata.uns["domain"]["n_cells"]) == [256, 176]  # neighbours exactly max_distance apart are linked


def test_new_domains_of_a_lazy_table_drop_the_earlier_names(tmp_path, caplog):
    """A table read with read_lazy: the earlier domain names are removed too (was: AttributeError, obs has no drop)."""
    from anndata.experimental import read_lazy

    adata = grid_table()
    in_a = adata.obs["block"].to_numpy() == "A"
    adata.obsm["signature"] = np.column_stack([in_a, ~in_a]).astype(float) + np.linspace(0, 0.1, adata.n_obs)[:, None]
    adata.uns["signature"] = {"names": ["A type", "other type"]}
    adata.write_zarr(tmp_path / "g.zarr")
    lazy = read_lazy(tmp_path / "g.zarr")
    scx.tl.spatial_domains(lazy, "selected", max_distance=15)
    scx.tl.annotate_domains(lazy, "domain")
    assert {"domain_annotation", "domain_annotation_cell"} <= set(lazy.obs.columns)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.spatial_domains(lazy, "selected", max_distance=55)
    assert "removing the names that annotate_domains gave" in caplog.text
    assert "domain_annotation" not in lazy.uns
    assert not {"domain_annotation", "domain_annotation_cell"} & set(lazy.obs.columns)
    assert {"block", "selected", "domain"} <= set(lazy.obs.columns) and lazy.n_obs == adata.n_obs
