"""filter_low_confidence and filter_low_count_types: edge cases of labels, thresholds and stores."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatialcx as scx


def _predicted(labels, confidence, *, key: str = "cell_type") -> ad.AnnData:
    """A table as predict leaves it: predictions, final labels and confidence (no ontology columns)."""
    obs = pd.DataFrame(
        {
            f"{key}_predicted": pd.Categorical(labels),
            key: pd.Categorical(labels),
            f"{key}_confidence": np.asarray(confidence, dtype=np.float32),
        },
        index=[f"c{i}" for i in range(len(labels))],
    )
    adata = ad.AnnData(np.zeros((len(labels), 1), dtype=np.float32), obs=obs)
    adata.uns[key] = {"classes": sorted({str(v) for v in labels if isinstance(v, str)})}
    return adata


def test_count_filter_uses_the_unassigned_label_of_the_confidence_filter():
    """A custom label for low-confidence cells is not a type, and rare types get the same label."""
    adata = _predicted(["A"] * 5 + ["B"] * 12 + ["C"], [0.9] * 5 + [0.3] * 12 + [0.9])
    scx.tl.filter_low_confidence(adata, unassigned_label="low confidence")
    scx.tl.filter_low_count_types(adata, min_cells=3)
    assert adata.obs["cell_type"].value_counts().to_dict() == {"low confidence": 13, "A": 5}
    assert adata.uns["cell_type"]["removed_types"] == ["C"]
    assert adata.uns["cell_type"]["n_unassigned"] == 13  # before: 12, the confidence filter's count, stale
    assert adata.uns["cell_type"]["unassigned_label"] == "low confidence"
    # an explicit label still wins, and is recorded
    other = _predicted(["A"] * 5 + ["C"], [0.9] * 6)
    scx.tl.filter_low_count_types(other, min_cells=3, unassigned_label="rare")
    assert other.obs["cell_type"].astype(str).tolist() == ["A"] * 5 + ["rare"]
    assert other.uns["cell_type"]["unassigned_label"] == "rare"


def test_missing_labels_stay_missing_whatever_the_confidence():
    """Cells without a label (e.g. from a table concatenated with one never predicted) are not 'Unassigned'."""
    adata = _predicted(["A", None, None, "B", "B"], [0.9, np.nan, 0.1, 0.2, np.nan])
    scx.tl.filter_low_confidence(adata, threshold=0.5)
    labels = adata.obs["cell_type"]
    assert labels.isna().tolist() == [False, True, True, False, False]
    assert labels.astype(object).tolist()[3:] == ["Unassigned", "Unassigned"]  # a label with low or NaN confidence
    assert adata.uns["cell_type"]["n_unassigned"] == 2


def test_threshold_edges():
    adata = _predicted(["A", "B", "A", "B"], [0.0, 1.0, 0.8, 0.5])
    scx.tl.filter_low_confidence(adata, threshold=0.0)
    assert adata.obs["cell_type"].astype(str).tolist() == ["A", "B", "A", "B"]
    assert adata.obs["cell_type"].cat.categories.tolist() == ["A", "B"]  # no unused "Unassigned"
    scx.tl.filter_low_confidence(adata, threshold=1.0)
    assert adata.obs["cell_type"].astype(str).tolist() == ["Unassigned", "B", "Unassigned", "Unassigned"]
    assert adata.obs["cell_type"].cat.categories.tolist() == ["B", "Unassigned"]  # A filtered to zero cells: gone
    scx.tl.filter_low_confidence(adata, threshold=0.8)  # at the threshold is kept (float32 0.8 >= 0.8)
    assert adata.obs["cell_type"].astype(str).tolist() == ["Unassigned", "B", "A", "Unassigned"]
    assert adata.obs["cell_type_predicted"].astype(str).tolist() == ["A", "B", "A", "B"]  # predictions kept
    for bad in (np.nan, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
            scx.tl.filter_low_confidence(adata, threshold=bad)
    for bad in ("0.8", None, True):
        with pytest.raises(TypeError, match="threshold must be a number"):
            scx.tl.filter_low_confidence(adata, threshold=bad)
    assert adata.uns["cell_type"]["confidence_threshold"] == 0.8  # nothing written by the failed calls


@pytest.mark.parametrize(
    ("bad", "error"),
    [(2.5, ValueError), (np.nan, ValueError), (-1, ValueError), ("3", TypeError), (None, TypeError), (True, TypeError)],
)
def test_min_cells_must_be_a_count(bad, error):
    adata = _predicted(["A", "A", "B"], [0.9, 0.9, 0.9])
    with pytest.raises(error, match="min_cells must be a whole number"):
        scx.tl.filter_low_count_types(adata, min_cells=bad)
    assert "removed_types" not in adata.uns["cell_type"]


def test_labels_of_any_dtype_are_read_as_strings():
    """Integer categories, plain strings with None and categories left unused all give str labels."""
    adata = _predicted(["A"] * 4, [0.9, 0.9, 0.1, 0.9])
    adata.obs["ints"] = pd.Categorical([3, 7, 7, np.nan], categories=[3, 7, 9])
    scx.tl.filter_low_confidence(adata, source_key="ints", threshold=0.5)
    assert adata.obs["cell_type"].astype(object).tolist() == ["3", "7", "Unassigned", np.nan]
    assert adata.obs["cell_type"].cat.categories.tolist() == ["3", "7", "Unassigned"]
    adata.obs["strings"] = pd.Series(["x", None, "y", "x"], index=adata.obs_names, dtype=object)
    scx.tl.filter_low_confidence(adata, source_key="strings", threshold=0.5)
    assert adata.obs["cell_type"].astype(object).tolist() == ["x", np.nan, "Unassigned", "x"]


def test_refiltering_a_backed_store_keeps_the_predictions(tmp_path):
    """SpatialData backed by a zarr store: higher then lower threshold, custom key; the store holds what memory
    holds."""
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(0)
    n = 60
    predicted = rng.choice(["L2/3 IT", "Astro", "Unassigned"], n, p=[0.6, 0.35, 0.05])
    conf = rng.random(n).astype(np.float32)
    obs = pd.DataFrame(
        {"region": pd.Categorical(["cells"] * n), "cell_id": np.arange(n), "ct_predicted": pd.Categorical(predicted)},
        index=[f"c{i}" for i in range(n)],
    )
    obs["ct_confidence"] = conf
    table = TableModel.parse(
        ad.AnnData(np.ones((n, 2), dtype=np.float32), obs=obs),
        region="cells",
        region_key="region",
        instance_key="cell_id",
    )
    table.uns["ct"] = {"classes": ["Astro", "L2/3 IT", "Unassigned"]}
    circles = gpd.GeoDataFrame({"radius": np.ones(n)}, geometry=[Point(i, i) for i in range(n)])
    sd.SpatialData(shapes={"cells": ShapesModel.parse(circles)}, tables={"table": table}).write(tmp_path / "s.zarr")
    sdata = sd.read_zarr(tmp_path / "s.zarr")
    for threshold in (0.9, 0.2):
        scx.tl.filter_low_confidence(sdata, key="ct", threshold=threshold)
        back = ad.read_zarr(tmp_path / "s.zarr" / "tables" / "table")
        expected = np.where(conf < threshold, "Unassigned", predicted)
        assert (back.obs["ct"].astype(str).to_numpy() == expected).all()
        assert (sdata.tables["table"].obs["ct"].astype(str).to_numpy() == expected).all()
        assert (back.obs["ct_predicted"].astype(str).to_numpy() == predicted).all()
        assert back.uns["ct"]["confidence_threshold"] == threshold
        assert back.uns["ct"]["n_unassigned"] == int((conf < threshold).sum())  # filtered here
        assert dict(back.uns["spatialdata_attrs"]) == dict(table.uns["spatialdata_attrs"])  # link to the shapes kept


def test_unassigned_label_must_be_a_str_that_names_no_cell_type(tmp_path):
    """A number or None as the label broke writing to h5ad or failed inside pandas; a class name merged cell types."""
    adata = _predicted(["A", "A", "B", "B"], [0.9, 0.2, 0.9, 0.3])
    before = adata.obs.copy()
    for bad in (None, 0):
        with pytest.raises(TypeError, match="unassigned_label must be a str"):
            scx.tl.filter_low_confidence(adata, unassigned_label=bad)
    with pytest.raises(ValueError, match="unassigned_label must be a label"):
        scx.tl.filter_low_confidence(adata, unassigned_label="")
    # low-confidence B cells labelled "A" would be counted as A cells
    with pytest.raises(ValueError, match=r"'A' is one of the model's cell types \(uns\['cell_type'\]\['classes'\]\)"):
        scx.tl.filter_low_confidence(adata, unassigned_label="A")
    with pytest.raises(ValueError, match="'B' is one of the model's cell types"):
        scx.tl.filter_low_count_types(adata, min_cells=3, unassigned_label="B")
    pd.testing.assert_frame_equal(adata.obs, before)  # nothing written
    assert set(adata.uns["cell_type"]) == {"classes"}
    # a label that names no type is written, and the table still round-trips through h5ad
    scx.tl.filter_low_confidence(adata, unassigned_label="low confidence")
    assert adata.obs["cell_type"].astype(str).tolist() == ["A", "low confidence", "B", "low confidence"]
    adata.write_h5ad(tmp_path / "t.h5ad")
    assert ad.read_h5ad(tmp_path / "t.h5ad").obs["cell_type"].astype(str).tolist()[1] == "low confidence"


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_filters_on_a_lazily_read_table(tmp_path, suffix):
    """A table read with anndata.experimental.read_lazy has xarray obs columns (no ``to_numpy(dtype=...)``): both
    filters read them (annotate on such a table failed in the confidence filter) and give the in-memory results."""
    labels = ["A"] * 6 + ["B"] * 8 + ["C"] * 2
    conf = np.linspace(0.05, 1.0, len(labels))
    eager = _predicted(labels, conf)
    eager.obs["cell_type_ontology_term_id"] = pd.Categorical(
        np.where(np.asarray(labels) == "A", "CL:0000236", "unknown")
    )
    path = tmp_path / f"t{suffix}"
    eager.write_h5ad(path) if suffix == ".h5ad" else eager.write_zarr(path)
    lazy = ad.experimental.read_lazy(path)
    for table in (eager, lazy):
        scx.tl.filter_low_confidence(table, threshold=0.2)
        scx.tl.filter_low_count_types(table, min_cells=3)
    for column in ("cell_type", "cell_type_ontology_term_id"):
        assert np.asarray(lazy.obs[column]).astype(str).tolist() == eager.obs[column].astype(str).tolist()
    assert eager.obs["cell_type"].value_counts().to_dict() == {"B": 8, "Unassigned": 5, "A": 3}
