from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

import spatialcx as scx
from spatialcx.datasets._demo import (
    CELL_TYPES,
    HOUSEKEEPING_GENES,
    MARKERS,
    PROGRAMS,
    REFERENCE_ONLY_CELL_TYPES,
    SPATIAL_CELL_TYPES,
    ZONES,
)

SMALL = {"n_cells": 400, "n_genes": 300, "n_reference_cells": 500, "n_reference_genes": 600}


@pytest.fixture(scope="module")
def default_demo():
    return scx.datasets.demo()


@pytest.fixture(scope="module")
def small_demo():
    return scx.datasets.demo(**SMALL, image=False)


def _totals(x) -> np.ndarray:
    return np.asarray(x.sum(axis=1)).ravel()


def _log_normalized(adata: ad.AnnData, genes: pd.Index) -> sp.csr_matrix:
    x = sp.csr_matrix(adata[:, genes].X, dtype=np.float64)
    x = sp.diags(1e4 / np.maximum(_totals(x), 1)) @ x
    return x.log1p()


# --- structure --------------------------------------------------------------------------------------------------------


def test_default_shapes_and_elements(default_demo):
    from spatialdata import SpatialData

    sdata, reference = default_demo
    assert isinstance(sdata, SpatialData)
    assert isinstance(reference, ad.AnnData)
    assert set(sdata.images) == {"image"}
    assert set(sdata.shapes) == {"cells"}
    assert set(sdata.tables) == {"table"}
    assert sdata["table"].shape == (4000, 300)
    assert reference.shape == (6000, 2000)
    assert sdata["table"].var_names.is_unique and reference.var_names.is_unique


def test_counts_are_raw_integer_csr(default_demo):
    sdata, reference = default_demo
    for x in (sdata["table"].X, reference.X):
        assert sp.issparse(x) and x.format == "csr"
        assert x.dtype in (np.float32, np.int32, np.int64)
        assert np.all(x.data >= 0)
        np.testing.assert_array_equal(x.data, np.round(x.data))
        assert _totals(x).min() > 0
    # sparse, as counts at these depths are
    for x in (sdata["table"].X, reference.X):
        assert 0.05 < x.nnz / np.prod(x.shape) < 0.5


def test_table_annotates_the_cell_shapes(default_demo):
    from spatialdata.models import get_table_keys

    sdata, _ = default_demo
    table, shapes = sdata["table"], sdata["cells"]
    region, region_key, instance_key = get_table_keys(table)
    assert (region, region_key, instance_key) == ("cells", "region", "instance_id")
    assert isinstance(table.obs["region"].dtype, pd.CategoricalDtype)
    assert set(table.obs["region"]) == {"cells"}
    assert table.obs["instance_id"].is_unique
    np.testing.assert_array_equal(shapes.index.to_numpy(), table.obs["instance_id"].to_numpy())
    # circles whose centres are the table's centroids
    assert set(shapes.geom_type) == {"Point"}
    assert (shapes["radius"] > 0).all()
    centres = np.column_stack([shapes.geometry.x, shapes.geometry.y])
    np.testing.assert_allclose(centres, table.obsm["spatial"])
    # the tissue is a 1-2 mm section
    extent = table.obsm["spatial"].max(axis=0) - table.obsm["spatial"].min(axis=0)
    assert np.all((extent > 500) & (extent < 2000))


def test_table_holds_truth_but_no_output_columns(default_demo):
    sdata, _ = default_demo
    obs = sdata["table"].obs
    assert not [c for c in obs.columns if c.startswith("cell_type")]
    truth = obs["true_cell_type"]
    assert isinstance(truth.dtype, pd.CategoricalDtype)
    assert list(truth.cat.categories) == list(SPATIAL_CELL_TYPES)
    counts = truth.value_counts()
    assert (counts > 0.01 * len(obs)).all(), counts  # every type is there, none vanishingly rare
    assert set(obs["true_zone"].cat.categories) == set(ZONES)
    assert set(obs["true_zone"]) == set(ZONES)


def test_image_is_placed_on_the_cells(default_demo):
    from spatialdata.transformations import get_transformation

    sdata, _ = default_demo
    image = sdata["image"]
    assert image.dims == ("c", "y", "x")
    assert image.dtype == np.uint8
    assert 1 <= image.sizes["c"] <= 3
    assert max(image.sizes["y"], image.sizes["x"]) <= 1200
    scale = get_transformation(image, to_coordinate_system="global").to_affine_matrix(("y", "x"), ("y", "x"))
    pixel = np.array([scale[0, 0], scale[1, 1]])
    xy = sdata["table"].obsm["spatial"]
    # the image covers every cell...
    assert image.sizes["x"] * pixel[1] >= xy[:, 0].max()
    assert image.sizes["y"] * pixel[0] >= xy[:, 1].max()
    # ...and its nuclear channel is bright where the cells are, dark elsewhere
    dapi = image.sel(c="DAPI").values.astype(float)
    rows, cols = (xy[:, 1] / pixel[0]).astype(int), (xy[:, 0] / pixel[1]).astype(int)
    at_cells = dapi[rows, cols].mean()
    assert at_cells > 3 * np.median(dapi)


def test_image_false_has_no_image(small_demo):
    sdata, _ = small_demo
    assert len(sdata.images) == 0
    assert "cells" in sdata.shapes


# --- biology ----------------------------------------------------------------------------------------------------------


def test_cell_type_names_are_current_cell_ontology_labels():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    for label, term_id in CELL_TYPES.items():
        assert parser.is_valid_term_id(term_id, "CL"), term_id
        assert not parser.is_term_deprecated(term_id), term_id
        assert parser.get_term_label(term_id) == label
    assert 10 <= len(SPATIAL_CELL_TYPES) <= 12
    assert set(SPATIAL_CELL_TYPES) | set(REFERENCE_ONLY_CELL_TYPES) == set(CELL_TYPES)
    assert not set(SPATIAL_CELL_TYPES) & set(REFERENCE_ONLY_CELL_TYPES)


def test_markers_are_specific_real_symbols_on_the_panel(default_demo):
    sdata, reference = default_demo
    assert set(MARKERS) == set(CELL_TYPES)
    all_markers = [g for genes in MARKERS.values() for g in genes]
    assert len(all_markers) == len(set(all_markers)), "a gene marks a single type"
    programme_genes = {g for genes, _ in PROGRAMS.values() for g in genes}
    assert not programme_genes & set(all_markers)
    for markers in MARKERS.values():
        assert 5 <= len(markers) <= 10
    symbol = re.compile(r"^[A-Z][A-Z0-9-]*$")
    assert all(symbol.match(g) for g in sdata["table"].var_names)
    assert all(symbol.match(g) for g in reference.var_names)
    for genes in (all_markers, programme_genes, HOUSEKEEPING_GENES):
        assert set(genes) <= set(sdata["table"].var_names)
        assert set(genes) <= set(reference.var_names)  # the genes the reference lacks are none of these


@pytest.mark.parametrize("which", ["spatial", "reference"])
def test_markers_are_high_in_their_own_type(default_demo, which):
    sdata, reference = default_demo
    adata, key = (sdata["table"], "true_cell_type") if which == "spatial" else (reference, "cell_type")
    x = _log_normalized(adata, adata.var_names)
    labels = adata.obs[key].astype(str).to_numpy()
    for cell_type in np.unique(labels):
        score = np.asarray(x[:, adata.var_names.get_indexer(MARKERS[cell_type])].mean(axis=1)).ravel()
        own, others = score[labels == cell_type], score[labels != cell_type]
        assert np.median(own) > np.median(others) + 2.0, cell_type  # > e^2 ~ 7-fold
        assert np.median(own) > np.quantile(others, 0.9), cell_type


def test_reference_shares_most_but_not_all_panel_genes(default_demo):
    sdata, reference = default_demo
    panel = sdata["table"].var_names
    shared = panel.intersection(reference.var_names)
    assert 0.85 * len(panel) <= len(shared) < len(panel)
    assert len(reference.var_names) > len(panel)
    assert set(panel.difference(reference.var_names)).isdisjoint(g for genes in MARKERS.values() for g in genes)


def test_reference_sources_depths_and_types(default_demo):
    sdata, reference = default_demo
    obs = reference.obs
    assert set(obs["source"].cat.categories) == {"atlas_A", "atlas_B"}
    assert set(obs["cell_type"].cat.categories) == set(CELL_TYPES)
    assert (obs["cell_type_ontology_term_id"].astype(str) == obs["cell_type"].astype(str).map(CELL_TYPES)).all()
    assert not [c for c in obs.columns if c.startswith("true_")]
    assert "spatial" not in reference.obsm

    totals = pd.Series(_totals(reference.X), index=obs.index)
    depth = totals.groupby(obs["source"], observed=True).median()
    assert depth.max() / depth.min() > 1.5, depth
    spatial_depth = np.median(_totals(sdata["table"].X))
    assert 5 <= np.median(totals) / spatial_depth <= 15

    # unequal type proportions between the sources, every type in both
    props = pd.crosstab(obs["cell_type"], obs["source"], normalize="columns")
    assert (pd.crosstab(obs["cell_type"], obs["source"]) > 0).all().all()
    assert (props["atlas_A"] - props["atlas_B"]).abs().max() > 0.05

    # types only the reference has
    for cell_type in REFERENCE_ONLY_CELL_TYPES:
        assert (obs["cell_type"] == cell_type).sum() > 0
        assert cell_type not in set(sdata["table"].obs["true_cell_type"])


def test_reference_has_a_platform_bias_against_the_panel(default_demo):
    sdata, reference = default_demo
    shared = sdata["table"].var_names.intersection(reference.var_names)
    mean_spatial = np.asarray(_log_normalized(sdata["table"], shared).mean(axis=0)).ravel()
    mean_reference = np.asarray(_log_normalized(reference, shared).mean(axis=0)).ravel()
    correlation = np.corrcoef(mean_spatial, mean_reference)[0, 1]
    assert 0.5 < correlation < 0.99  # the same biology, not the same numbers


# --- space ------------------------------------------------------------------------------------------------------------


def test_cell_types_are_spatially_organised(default_demo):
    sdata, _ = default_demo
    table = sdata["table"]
    xy = table.obsm["spatial"]
    codes = table.obs["true_cell_type"].cat.codes.to_numpy()
    _, neighbours = cKDTree(xy).query(xy, k=6)
    same = (codes[neighbours[:, 1:]] == codes[:, None]).mean()
    chance = ((np.bincount(codes) / len(codes)) ** 2).sum()
    assert same > 2 * chance, (same, chance)

    obs = table.obs.assign(y=xy[:, 1])
    depth = obs.groupby("true_cell_type", observed=True)["y"].median()
    # crypt base below the surface epithelium, muscularis below the crypts
    assert depth["intestinal crypt stem cell"] > depth["enterocyte"] + 150
    assert depth["smooth muscle cell"] > depth["intestinal crypt stem cell"]
    zone = pd.crosstab(obs["true_cell_type"], obs["true_zone"], normalize="index")
    assert zone.loc["B cell", "lymphoid follicle"] > 0.6
    assert zone.loc["enterocyte", "epithelium"] > 0.8
    assert zone.loc["plasma cell", "lamina propria"] > 0.5
    # mixing at the borders, not hard partitions
    assert 0.02 < 1 - zone.loc["enterocyte", "epithelium"] < 0.3


# --- reproducibility and inputs ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_data(small_demo):
    sdata, reference = small_demo
    sdata2, reference2 = scx.datasets.demo(**SMALL, image=False, random_state=0)
    table, table2 = sdata["table"], sdata2["table"]
    assert (table.X != table2.X).nnz == 0
    pd.testing.assert_frame_equal(table.obs, table2.obs)
    np.testing.assert_array_equal(table.obsm["spatial"], table2.obsm["spatial"])
    assert list(table.var_names) == list(table2.var_names)
    assert (reference.X != reference2.X).nnz == 0
    pd.testing.assert_frame_equal(reference.obs, reference2.obs)
    assert list(reference.var_names) == list(reference2.var_names)


def test_different_seed_gives_different_data(small_demo):
    sdata, reference = small_demo
    sdata2, reference2 = scx.datasets.demo(**SMALL, image=False, random_state=1)
    assert not np.allclose(sdata["table"].obsm["spatial"], sdata2["table"].obsm["spatial"])
    assert (reference.X != reference2.X).nnz > 0
    # a Generator works too, and is reproducible through its seed
    a, _ = scx.datasets.demo(**SMALL, image=False, random_state=np.random.default_rng(5))
    b, _ = scx.datasets.demo(**SMALL, image=False, random_state=np.random.default_rng(5))
    np.testing.assert_array_equal(a["table"].obsm["spatial"], b["table"].obsm["spatial"])


def test_seeded_image_is_reproducible():
    kwargs = {**SMALL, "n_cells": 200}
    a, _ = scx.datasets.demo(**kwargs, random_state=3)
    b, _ = scx.datasets.demo(**kwargs, random_state=3)
    np.testing.assert_array_equal(a["image"].values, b["image"].values)


def test_sizes_follow_the_arguments():
    sdata, reference = scx.datasets.demo(
        n_cells=250, n_genes=320, n_reference_cells=300, n_reference_genes=800, image=False, random_state=2
    )
    assert sdata["table"].shape == (250, 320)
    assert reference.shape == (300, 800)
    assert len(sdata["cells"]) == 250


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_genes": 50}, ValueError, r"n_genes.*at least \d+"),
        ({"n_reference_genes": 100}, ValueError, r"n_reference_genes.*between"),
        ({"n_reference_genes": 100_000}, ValueError, r"n_reference_genes.*between"),
        ({"n_genes": 100_000}, ValueError, r"n_genes.*or fewer"),
        # before: "at least 1 ... Pass `n_reference_genes=1`", which failed again
        ({"n_reference_genes": 0}, ValueError, r"n_reference_genes` is 0.*between \d{3} and \d{4}"),
        ({"n_reference_genes": -3}, ValueError, r"n_reference_genes` is -3.*between \d{3} and \d{4}"),
        ({"n_reference_genes": 2.0}, TypeError, r"n_reference_genes.*integer"),
        # before: every minimum claimed "so that every cell type ... fits", untrue for 50 cells
        ({"n_cells": 10}, ValueError, r"n_cells.*at least 50 \(a smaller section is too sparse"),
        ({"n_reference_cells": 100}, ValueError, r"n_reference_cells.*at least 130 \(10 for each of its 13 cell types"),
        ({"n_cells": 400.5}, TypeError, r"n_cells.*integer"),
        ({"n_reference_cells": True}, TypeError, r"n_reference_cells.*integer"),
        ({"random_state": "zero"}, TypeError, r"random_state"),
        # before: numpy's bare "expected non-negative integer"
        ({"random_state": -1}, ValueError, r"random_state.*non-negative"),
        # before: accepted, any truthy value rendered an image
        ({"image": "no"}, TypeError, r"image.*True or False"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        scx.datasets.demo(**{**SMALL, "image": False, **kwargs})


# --- fitness for the demo ---------------------------------------------------------------------------------------------


def test_reference_classifier_recovers_spatial_truth(default_demo):
    """Guards the `spatialcx demo` target: a reference-trained classifier labels >= 90 % of the section right."""
    from sklearn.linear_model import LogisticRegression

    sdata, reference = default_demo
    table = sdata["table"]
    shared = table.var_names.intersection(reference.var_names)
    model = LogisticRegression(max_iter=300).fit(
        _log_normalized(reference, shared), reference.obs["cell_type"].astype(str)
    )
    predicted = model.predict(_log_normalized(table, shared))
    truth = table.obs["true_cell_type"].astype(str).to_numpy()
    accuracy = (predicted == truth).mean()
    assert accuracy >= 0.9, accuracy
    assert accuracy < 1.0  # borders and segmentation bleed leave some cells ambiguous, as in real data
    per_type = pd.Series(predicted == truth).groupby(truth).mean()
    assert per_type.min() > 0.7, per_type


def test_spatialdata_and_reference_round_trip(small_demo, tmp_path):
    from spatialdata import read_zarr

    sdata, reference = scx.datasets.demo(**{**SMALL, "n_cells": 200}, random_state=4)
    path = tmp_path / "demo.zarr"
    sdata.write(path)
    back = read_zarr(path)
    assert set(back.images) == {"image"} and set(back.shapes) == {"cells"} and set(back.tables) == {"table"}
    table, table_back = sdata["table"], back["table"]
    assert (table.X != sp.csr_matrix(table_back.X)).nnz == 0
    pd.testing.assert_frame_equal(table.obs, table_back.obs)
    np.testing.assert_array_equal(table.obsm["spatial"], table_back.obsm["spatial"])
    assert table_back.uns["spatialdata_attrs"]["region"] == "cells"
    np.testing.assert_array_equal(back["image"].values, sdata["image"].values)
    np.testing.assert_array_equal(back["cells"].index.to_numpy(), sdata["cells"].index.to_numpy())
    np.testing.assert_allclose(back["cells"]["radius"].to_numpy(), sdata["cells"]["radius"].to_numpy())

    reference.write_h5ad(tmp_path / "reference.h5ad")
    reference_back = ad.read_h5ad(tmp_path / "reference.h5ad")
    assert (reference.X != reference_back.X).nnz == 0
    pd.testing.assert_frame_equal(reference.obs, reference_back.obs)


def _median_neighbour_distance(xy: np.ndarray) -> float:
    distance, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(distance[:, 1]))


def test_more_cells_make_a_larger_section_not_a_denser_one(default_demo):
    """Before: the section stayed 1.2 mm x 0.8 mm whatever n_cells, so 12,000 cells sat three times as densely
    (neighbours about 4 µm apart, most cell circles overlapping) and 1M cells 1.4 µm apart."""
    from spatialdata.transformations import get_transformation

    sdata, _ = scx.datasets.demo(n_cells=12_000, n_reference_cells=500, n_reference_genes=600, random_state=1)
    xy = sdata["table"].obsm["spatial"]
    default_xy = default_demo[0]["table"].obsm["spatial"]
    assert _median_neighbour_distance(xy) == pytest.approx(_median_neighbour_distance(default_xy), rel=0.15)
    area = np.prod(xy.max(axis=0) - xy.min(axis=0))
    assert area > 2.5 * np.prod(default_xy.max(axis=0) - default_xy.min(axis=0))
    # the larger section is the same tissue: every zone and type, in similar shares
    obs = sdata["table"].obs
    assert set(obs["true_zone"]) == set(ZONES)
    shares = obs["true_cell_type"].value_counts(normalize=True)
    default_shares = default_demo[0]["table"].obs["true_cell_type"].value_counts(normalize=True)
    np.testing.assert_allclose(shares[default_shares.index], default_shares, atol=0.04)
    # the image still covers every cell and shows their nuclei
    image = sdata["image"]
    pixel = get_transformation(image, to_coordinate_system="global").to_affine_matrix(("y", "x"), ("y", "x"))[0, 0]
    assert image.sizes["x"] * pixel >= xy[:, 0].max() and image.sizes["y"] * pixel >= xy[:, 1].max()
    dapi = image.sel(c="DAPI").values.astype(float)
    rows, cols = (xy[:, 1] / pixel).astype(int), (xy[:, 0] / pixel).astype(int)
    assert dapi[rows, cols].mean() > 3 * np.median(dapi)


def test_large_image_is_multiscale_and_round_trips(monkeypatch, tmp_path):
    from spatialdata import read_zarr
    from xarray import DataTree

    from spatialcx.datasets import _demo

    monkeypatch.setattr(_demo, "_MAX_SINGLE_SCALE", 256)  # as a section of a million cells would be
    sdata, _ = scx.datasets.demo(**{**SMALL, "n_cells": 200}, random_state=4)
    image = sdata["image"]
    assert isinstance(image, DataTree)
    levels = [image[k]["image"] for k in sorted(image.children)]
    assert levels[0].shape == (2, 667, 1000) and levels[-1].shape[2] <= 256
    sdata.write(tmp_path / "demo.zarr")
    back = read_zarr(tmp_path / "demo.zarr")
    np.testing.assert_array_equal(back["image"]["scale0"]["image"].values, levels[0].values)
