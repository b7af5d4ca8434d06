"""Tests of scx.tl.score_signatures and scx.tl.annotate_domains."""

from __future__ import annotations

import json
import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import spatialcx as scx
from spatialcx.tl._signatures import _elbow_label, _rank_average, _rank_sum_tests

MARKERS = {
    "T cells": ["CD3D", "CD3E", "CD2"],
    "B cells": ["MS4A1", "CD79A", "CD19"],
    "Macrophages": ["CD68", "CD163", "MRC1"],
    "Neutrophils": ["S100A8", "MMP8", "CSF3R"],
}
OTHER = [f"G{i}" for i in range(30)]


def make_tissue(n_per_region=300, seed=0):
    """Five spatial regions: T, B, Macrophage, Neutrophil cells, and a mixed myeloid region (Mac + Neu together)."""
    rng = np.random.default_rng(seed)
    genes = [g for v in MARKERS.values() for g in v] + OTHER
    regions = ["T", "B", "Mac", "Neu", "Myeloid"]
    truth, region, xy = [], [], []
    for r_i, reg in enumerate(regions):
        for k in range(n_per_region):
            if reg == "Myeloid":
                cell_type = "Macrophages" if k % 2 else "Neutrophils"
            else:
                cell_type = {"T": "T cells", "B": "B cells", "Mac": "Macrophages", "Neu": "Neutrophils"}[reg]
            truth.append(cell_type)
            region.append(reg)
            xy.append([r_i * 1000 + rng.random() * 400, rng.random() * 400])
    n = len(truth)
    size = rng.lognormal(0, 0.3, n)
    lam = rng.gamma(2.0, 1.0, (n, len(genes))) * 0.3
    col = {g: i for i, g in enumerate(genes)}
    for i, cell_type in enumerate(truth):
        for g in MARKERS[cell_type]:
            lam[i, col[g]] = 6.0
    x = rng.poisson(lam * size[:, None]).astype(np.float32)
    adata = ad.AnnData(
        sparse.csr_matrix(x),
        obs=pd.DataFrame({"truth": truth, "region": pd.Categorical(region)}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=genes),
    )
    adata.obsm["spatial"] = np.asarray(xy)
    return adata


def test_scores_find_each_cell_type():
    adata = make_tissue()
    scx.tl.score_signatures(adata, MARKERS)
    scores = adata.obsm["signature"]
    names = list(adata.uns["signature"]["names"])
    assert names == list(MARKERS) and scores.shape == (adata.n_obs, 4) and scores.dtype == np.float32
    top = np.asarray(names)[scores.argmax(axis=1)]
    assert (top == adata.obs["truth"].to_numpy()).mean() > 0.95
    assert list(adata.uns["signature"]["genes"]) == [",".join(v) for v in MARKERS.values()]


def reference_scores(adata, sets, *, standardize=True):
    """The dense computation (the implementation before chunking): z-scores of log1p(10k), sum / sqrt(n) or mean."""
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    expr = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    mean, sd = expr.mean(axis=0), expr.std(axis=0)
    z = np.divide(expr - mean, sd, out=np.zeros_like(expr), where=sd > 0)
    cols = [adata.var_names.get_indexer(genes) for genes in sets]
    return np.column_stack([z[:, c].sum(axis=1) / (np.sqrt(len(c)) if standardize else len(c)) for c in cols])


def test_score_is_the_standardized_sum_of_z_scores_of_log1p_10k():
    adata = make_tissue(n_per_region=60)
    scx.tl.score_signatures(adata, {"T cells": MARKERS["T cells"]})
    scx.tl.score_signatures(adata, {"T cells": MARKERS["T cells"]}, standardize=False, key_added="mean")
    x = adata.X.toarray()
    expr = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)[:, adata.var_names.get_indexer(MARKERS["T cells"])]
    z = (expr - expr.mean(axis=0)) / expr.std(axis=0)
    np.testing.assert_allclose(adata.obsm["signature"][:, 0], z.sum(axis=1) / np.sqrt(3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adata.obsm["mean"][:, 0], z.mean(axis=1), rtol=1e-5, atol=1e-5)
    assert adata.uns["signature"]["standardize"] and not adata.uns["mean"]["standardize"]


def test_missing_genes_are_dropped_with_a_warning(caplog):
    adata = make_tissue(n_per_region=50)
    markers = {"T cells": ["CD3D", "NOTAGENE", "cd3e"], "Ghosts": ["GHOST1", "GHOST2"], "B cells": MARKERS["B cells"]}
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, markers)
    u = adata.uns["signature"]
    assert list(u["names"]) == ["T cells", "B cells"] and list(u["dropped"]) == ["Ghosts"]
    assert list(u["genes"])[0] == "CD3D,CD3E"  # case-insensitive match of cd3e
    assert list(u["missing"])[0] == "NOTAGENE"
    assert "NOTAGENE" in caplog.text and "Ghosts" in caplog.text
    with pytest.raises(ValueError, match="None of the 1 marker sets"):
        scx.tl.score_signatures(adata, {"Ghosts": ["GHOST1"]}, key_added="none")
    assert "none" not in adata.obsm
    scx.tl.score_signatures(adata, MARKERS, min_genes=3, key_added="strict")
    assert len(adata.uns["strict"]["names"]) == 4


def test_canonical_markers_restricted_to_the_panel(caplog):
    adata = make_tissue(n_per_region=80)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, scx.tl.load_canonical_markers(), min_genes=2)
    names = list(adata.uns["signature"]["names"])
    assert {"T cell", "B cell", "macrophage", "neutrophil"} <= set(names)
    assert len(adata.uns["signature"]["dropped"]) > 50  # most cell types have no marker in this small panel
    top = np.asarray(names)[adata.obsm["signature"].argmax(axis=1)]
    pure = adata.obs["region"].isin(["T", "B"]).to_numpy()
    expected = adata.obs["truth"].map({"T cells": "T cell", "B cells": "B cell"}).to_numpy()
    assert (top[pure] == expected[pure]).mean() > 0.9


def test_marker_inputs_yaml_json_and_nested(tmp_path):
    import yaml

    adata = make_tissue(n_per_region=40)
    scx.tl.score_signatures(adata, MARKERS, key_added="ref")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(MARKERS, sort_keys=False))  # the file order is kept
    (tmp_path / "m.json").write_text(json.dumps({k: {"genes": v, "cl_id": "CL:0"} for k, v in MARKERS.items()}))
    long = pd.DataFrame([(k, g) for k, v in MARKERS.items() for g in v], columns=["cell_type", "gene"])
    for i, markers in enumerate([tmp_path / "m.yaml", str(tmp_path / "m.json"), long]):
        scx.tl.score_signatures(adata, markers, key_added=f"k{i}")
        np.testing.assert_array_equal(adata.obsm[f"k{i}"], adata.obsm["ref"])
    with pytest.raises(FileNotFoundError):
        scx.tl.score_signatures(adata, tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="no genes"):
        scx.tl.score_signatures(adata, {"Empty": []})
    with pytest.raises(TypeError, match="markers must be a dict mapping cell type names to gene lists"):
        scx.tl.score_signatures(adata, ["CD3D"])


def test_spatial_smoothing_averages_neighbours():
    from scipy.spatial import cKDTree

    adata = make_tissue(n_per_region=150)
    scx.tl.score_signatures(adata, MARKERS, key_added="raw")
    scx.tl.score_signatures(adata, MARKERS, smooth=True, n_neighbors=8, key_added="smooth")
    raw, smooth = adata.obsm["raw"].astype(np.float64), adata.obsm["smooth"]
    _, nn = cKDTree(adata.obsm["spatial"]).query(adata.obsm["spatial"], k=9)  # self + 8 neighbours
    np.testing.assert_allclose(smooth, raw[nn].mean(axis=1), rtol=1e-4, atol=1e-5)
    # smoothing removes noise in the pure regions
    truth = adata.obs["truth"].to_numpy()
    names = np.asarray(adata.uns["smooth"]["names"])
    pure = adata.obs["region"].to_numpy() != "Myeloid"
    acc_raw = (names[raw.argmax(axis=1)] == truth)[pure].mean()
    acc_smooth = (names[smooth.argmax(axis=1)] == truth)[pure].mean()
    assert acc_smooth >= acc_raw and acc_smooth > 0.99
    assert adata.uns["smooth"]["smooth"] and adata.uns["smooth"]["n_neighbors"] == 8


def test_key_added_never_replaces_the_coordinates_or_another_obsm_entry():
    """key_added="spatial" replaced the cells' coordinates with the scores (obsm[key_added] = scores)."""
    adata = make_tissue(n_per_region=50)
    coords = adata.obsm["spatial"].copy()
    adata.obsm["X_umap"] = np.zeros((adata.n_obs, 2))
    for key, what in (("spatial", "the cells' coordinates"), ("X_umap", "an entry that score_signatures did not")):
        with pytest.raises(ValueError, match=re.escape(f"key_added={key!r} would replace obsm[{key!r}], {what}")):
            scx.tl.score_signatures(adata, MARKERS, key_added=key)
    np.testing.assert_array_equal(adata.obsm["spatial"], coords)
    scx.tl.score_signatures(adata, MARKERS, key_added="sig")
    scx.tl.score_signatures(adata, MARKERS, key_added="sig")  # its own earlier scores are replaced
    assert adata.obsm["sig"].shape == (adata.n_obs, len(MARKERS))


def test_annotate_domains_labels_regions_with_elbow_gap():
    adata = make_tissue()
    scx.tl.score_signatures(adata, MARKERS)
    scx.tl.annotate_domains(adata, "region")
    label = adata.obs.groupby("region", observed=True)["region_annotation"].first().astype(str).to_dict()
    assert {k: v for k, v in label.items() if k != "Myeloid"} == {
        "T": "T cells",
        "B": "B cells",
        "Mac": "Macrophages",
        "Neu": "Neutrophils",
    }
    assert sorted(label["Myeloid"].split("/")) == ["Macrophages", "Neutrophils"]  # close pair: combined
    cell = adata.obs["region_annotation_cell"].astype(str).to_numpy()
    assert (cell == adata.obs["truth"].to_numpy()).mean() > 0.95
    u = adata.uns["region_annotation"]
    assert list(u["groups"]) == ["B", "Mac", "Myeloid", "Neu", "T"]
    stats = pd.DataFrame({k: np.asarray(v) for k, v in u["stats"].items()})
    assert len(stats) == 5 * 4
    t_row = stats[(stats.group == "T") & (stats.signature == "T cells")].iloc[0]
    assert t_row.auc > 0.95 and t_row.pvalue_adj < 1e-10 and t_row.enriched and t_row.mean_in > t_row.mean_out


def test_annotate_domains_unassigned_and_missing_groups():
    adata = make_tissue(n_per_region=100)
    scx.tl.score_signatures(adata, {"T cells": MARKERS["T cells"], "B cells": MARKERS["B cells"]})
    # cells outside any domain: missing group; they still count as "the rest"
    adata.obs["domain"] = adata.obs["region"].astype(str).replace({"T": np.nan, "Neu": np.nan})
    scx.tl.annotate_domains(adata, "domain", key_added="ann")
    labels = dict(zip(adata.uns["ann"]["groups"], adata.uns["ann"]["labels"]))
    assert labels["B"] == "B cells"
    assert labels["Mac"] == "Unassigned" and labels["Myeloid"] == "Unassigned"
    assert adata.obs["ann"][adata.obs["domain"].isna()].isna().all()
    # cluster ids with a missing value are stored as floats: groups 0.0, 1.0 read "0", "1" (as label_codes reads them)
    codes = adata.obs["region"].astype("category").cat.codes.astype(float)
    adata.obs["cluster"] = codes.where(adata.obs["region"] != "T")
    scx.tl.annotate_domains(adata, "cluster", key_added="by_cluster")
    assert sorted(adata.uns["by_cluster"]["groups"]) == ["0", "1", "2", "3"]  # not "0.0", ...; first-seen order


def test_elbow_gap_rule():
    names = ["A", "B", "C", "D", "E"]
    lab = lambda auc, enriched=None, **kw: _elbow_label(
        np.asarray(auc, dtype=float),
        np.ones(len(auc), bool) if enriched is None else np.asarray(enriched),
        names[: len(auc)],
        closeness=kw.get("closeness", 0.2),
        max_combined=kw.get("max_combined", 3),
        sep="/",
    )
    assert lab([0.95, 0.70, 0.60]) == "A"  # clear winner
    assert lab([0.90, 0.88, 0.60]) == "A/B"  # close pair, gap after two
    assert lab([0.90, 0.89, 0.88, 0.55]) == "A/B/C"  # three close, then a gap
    assert lab([0.60, 0.95, 0.94]) == "B/C"  # chosen by AUC
    assert lab([0.60, 0.94, 0.95]) == "B/C"  # joined in the signatures' order: one label whichever leads
    assert lab([0.90, 0.89, 0.88, 0.87, 0.86], max_combined=2) in ("A", "A/B")
    assert lab([0.90, 0.88], closeness=0.0) == "A"
    assert lab([0.90, 0.88], enriched=[False, True]) == "B"
    assert lab([0.90, 0.88], enriched=[False, False]) is None


def test_annotate_domains_errors():
    adata = make_tissue(n_per_region=30)
    with pytest.raises(KeyError, match="score_signatures"):
        scx.tl.annotate_domains(adata, "region")
    scx.tl.score_signatures(adata, MARKERS)
    with pytest.raises(KeyError, match="no column 'nope'"):
        scx.tl.annotate_domains(adata, "nope")
    adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="other cells"):
        scx.tl.annotate_domains(adata, "one")
    with pytest.raises(ValueError, match="min_auc"):
        scx.tl.annotate_domains(adata, "region", min_auc=0.3)
    assert "region_annotation" not in adata.obs


@pytest.mark.parametrize(
    ("key_added", "lost"),
    [("region", "the group column obs['region']"), ("signature", "the signature scores obsm / uns['signature']")],
)
def test_annotate_domains_refuses_a_key_added_that_overwrites_its_inputs(key_added, lost):
    """key_added=groupby replaced the clusters by their names; key_added=signature_key replaced uns[signature] (the
    signature names), so obsm[signature] could no longer be read."""
    adata = make_tissue(n_per_region=30)
    scx.tl.score_signatures(adata, MARKERS)
    before = adata.obs["region"].copy(), dict(adata.uns["signature"])
    with pytest.raises(ValueError, match=rf"key_added={key_added!r} would overwrite {re.escape(lost)}"):
        scx.tl.annotate_domains(adata, "region", key_added=key_added)
    pd.testing.assert_series_equal(adata.obs["region"], before[0])
    assert list(adata.uns["signature"]) == list(before[1]) and list(adata.obs.columns) == ["truth", "region"]
    adata.obs["region_cell"] = adata.obs["region"]  # the per-cell column of key_added="region" would replace it
    with pytest.raises(ValueError, match=r"would overwrite the group column obs\['region_cell'\]"):
        scx.tl.annotate_domains(adata, "region_cell", key_added="region")


def test_round_trip_h5ad_and_zarr(tmp_path):
    adata = make_tissue(n_per_region=60)
    markers = {"Macrophages/Monocytes": MARKERS["Macrophages"], **MARKERS}  # a name with a slash
    scx.tl.score_signatures(adata, markers)
    scx.tl.annotate_domains(adata, "region")
    for path, write, read in (
        (tmp_path / "s.h5ad", ad.AnnData.write_h5ad, ad.read_h5ad),
        (tmp_path / "s.zarr", ad.AnnData.write_zarr, ad.read_zarr),
    ):
        write(adata, path)
        back = read(path)
        np.testing.assert_array_equal(back.obsm["signature"], adata.obsm["signature"])
        assert list(back.uns["signature"]["names"]) == list(markers)
        assert list(back.uns["region_annotation"]["labels"]) == list(adata.uns["region_annotation"]["labels"])
        np.testing.assert_allclose(
            back.uns["region_annotation"]["stats"]["auc"], adata.uns["region_annotation"]["stats"]["auc"]
        )
        pd.testing.assert_series_equal(back.obs["region_annotation"], adata.obs["region_annotation"])


def test_spatialdata_copy():
    from spatialdata import SpatialData

    adata = make_tissue(n_per_region=40)
    sdata = SpatialData(tables={"table": adata})
    out = scx.tl.score_signatures(sdata, MARKERS, copy=True)
    assert "signature" in out.tables["table"].obsm and "signature" not in sdata.tables["table"].obsm
    out = scx.tl.annotate_domains(out, "region", copy=True)
    assert "region_annotation" in out.tables["table"].obs


# --------------------------------------------------------------------------------------------------------------------
# Group columns with missing values


@pytest.mark.parametrize("dtype", ["Int64", "string", "object", "category"])
def test_annotate_domains_nullable_group_columns_skip_missing_cells(dtype):
    adata = make_tissue(n_per_region=80)
    scx.tl.score_signatures(adata, MARKERS)
    region = adata.obs["region"].astype(str).to_numpy()
    codes = {"T": 1, "B": 2, "Mac": 3, "Neu": 4}
    missing = region == "Myeloid"  # the mixed region has no group
    if dtype == "Int64":
        values = pd.array(np.where(missing, pd.NA, [codes.get(r, 0) for r in region]), dtype="Int64")
    elif dtype == "string":
        values = pd.array(np.where(missing, pd.NA, [str(codes.get(r, 0)) for r in region]), dtype="string")
    else:
        values = pd.Series(np.where(missing, None, [str(codes.get(r, 0)) for r in region]), dtype=dtype).array
    adata.obs["g"] = values
    scx.tl.annotate_domains(adata, "g", key_added="ann")
    u = adata.uns["ann"]
    labels = dict(zip(u["groups"], u["labels"]))
    assert labels == {"1": "T cells", "2": "B cells", "3": "Macrophages", "4": "Neutrophils"}
    assert adata.obs["ann"][missing].isna().all()  # cells without a group are skipped
    expected = pd.Series(region).map({"T": "T cells", "B": "B cells", "Mac": "Macrophages", "Neu": "Neutrophils"})
    assert (adata.obs["ann"][~missing].astype(str).to_numpy() == expected[~missing].to_numpy()).all()
    stats = pd.DataFrame({k: np.asarray(v) for k, v in u["stats"].items()})
    t_row = stats[(stats.group == "1") & (stats.signature == "T cells")].iloc[0]
    assert t_row.auc > 0.95 and t_row.pvalue_adj < 1e-10  # tested against every other cell, missing ones included
    n_in = int((region == "T").sum())
    scores = adata.obsm["signature"][:, 0].astype(np.float64)
    assert t_row.mean_in == pytest.approx(scores[region == "T"].mean())
    assert t_row.mean_out == pytest.approx(scores[region != "T"].mean())
    assert n_in == 80


@pytest.mark.parametrize("values", [[np.nan] * 4, pd.array([pd.NA] * 4, dtype="Int64"), pd.Categorical([None] * 4)])
def test_annotate_domains_all_missing_group_column_says_so(values):
    adata = make_tissue(n_per_region=30)
    scx.tl.score_signatures(adata, MARKERS)
    adata.obs["empty"] = pd.Series(values).reindex(range(adata.n_obs)).array  # e.g. spatial_domains found nothing
    with pytest.raises(ValueError, match=r"no group at all: every one of its 150 values is missing") as err:
        scx.tl.annotate_domains(adata, "empty")
    assert "0 non-empty" not in str(err.value) and "spatial_domains" in str(err.value)
    assert "empty_annotation" not in adata.obs


# --------------------------------------------------------------------------------------------------------------------
# Coordinates of smooth=True


def linked_sdata(adata):
    """SpatialData whose table has no obsm, linked to circles at the cells' positions (rows shuffled)."""
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    xy = adata.obsm["spatial"]
    order = np.random.default_rng(1).permutation(adata.n_obs)  # matched by instance id, not by position
    circles = gpd.GeoDataFrame(
        {"radius": np.full(adata.n_obs, 5.0)},
        geometry=[Point(*xy[i]) for i in order],
        index=pd.Index(order + 100, name="cell_id"),
    )
    table = adata.copy()
    del table.obsm["spatial"]
    table.obs["region"] = pd.Categorical(["cells"] * table.n_obs)
    table.obs["cell_id"] = np.arange(table.n_obs) + 100
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")
    return SpatialData(shapes={"cells": ShapesModel.parse(circles)}, tables={"table": table})


def test_smooth_uses_the_centroids_of_the_linked_shapes():
    adata = make_tissue(n_per_region=60)
    scx.tl.score_signatures(adata, MARKERS, smooth=True, n_neighbors=6)
    sdata = linked_sdata(adata)
    assert "spatial" not in sdata.tables["table"].obsm
    scx.tl.score_signatures(sdata, MARKERS, smooth=True, n_neighbors=6)
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["signature"], adata.obsm["signature"], rtol=1e-6, atol=1e-6)
    assert table.uns["signature"]["coordinates"] == "centroids of shapes 'cells'"
    assert adata.uns["signature"]["coordinates"] == "obsm['spatial']"
    with pytest.raises(KeyError, match=r"obsm has no 'spatial' coordinates.*adata.obsm\['spatial'\]"):
        scx.tl.score_signatures(table, MARKERS, smooth=True, key_added="nocoords")  # an AnnData: no shapes to use
    assert "nocoords" not in table.obsm


def test_smooth_on_the_real_merfish_store(merfish_store):
    import spatialdata as sd

    sdata = sd.read_zarr(merfish_store)
    table = sdata.tables["table"]
    assert "spatial" not in table.obsm
    genes = list(table.var_names[:12])
    markers = {"a": genes[:4], "b": genes[4:8], "c": genes[8:12]}
    scx.tl.score_signatures(sdata, markers, smooth=True, n_neighbors=8, key_added="sm", write=False)
    scx.tl.score_signatures(sdata, markers, key_added="raw", write=False)
    table = sdata.tables["table"]
    assert table.uns["sm"]["coordinates"] == "centroids of shapes 'cells'"
    smooth, raw = table.obsm["sm"], table.obsm["raw"].astype(np.float64)
    assert smooth.shape == (2389, 3) and np.isfinite(smooth).all()
    # each cell's smoothed score is the mean over itself and its 8 nearest shape centroids
    from scipy.spatial import cKDTree

    from spatialcx.tl._domains import _coordinates

    xy, _ = _coordinates(table, "spatial", sdata)
    _, nn = cKDTree(xy).query(xy, k=9)
    np.testing.assert_allclose(smooth, raw[nn].mean(axis=1), rtol=1e-4, atol=1e-5)


def test_smoothing_takes_each_cell_and_its_nearest_others_also_where_cells_share_a_position():
    """Six cells at each of 50 positions, 4 neighbours: each cell averages itself and 4 distinct others of its spot."""
    from spatialcx.tl._signatures import _smooth

    rng = np.random.default_rng(0)
    coords = np.repeat(rng.uniform(0, 1000, (50, 2)), 6, axis=0)
    member = np.tile(np.arange(6), 50)
    scores = (2.0**member)[:, None].astype(np.float32)  # one bit per member of a spot
    others = np.rint(_smooth(scores, coords, n_neighbors=4, source="test")[:, 0] * 5 - scores[:, 0]).astype(int)
    assert all(bin(v).count("1") == 4 for v in others)  # four distinct others
    assert not (others & (1 << member)).any()  # never the cell itself twice
    # no shared positions: the mean over the cell and its 4 nearest, as a plain k-d tree query gives them
    from scipy.spatial import cKDTree

    xy, values = rng.uniform(0, 1000, (500, 2)), rng.normal(size=(500, 3)).astype(np.float32)
    _, nn = cKDTree(xy).query(xy, k=5)
    np.testing.assert_allclose(_smooth(values, xy, n_neighbors=4, source="test"), values[nn].mean(axis=1), atol=1e-6)


def test_labels_written_to_the_store_come_with_the_scores_they_were_made_from(merfish_store):
    """Scores kept in memory (write=False), then annotate_domains writes: the store named scores it did not hold."""
    import spatialdata as sd

    sdata = sd.read_zarr(merfish_store)
    table = sdata.tables["table"]
    genes = list(table.var_names[:8])
    scx.tl.score_signatures(sdata, {"a": genes[:4], "b": genes[4:8]}, write=False)
    table.obs["half"] = pd.Categorical(np.where(np.arange(table.n_obs) < table.n_obs // 2, "x", "y"))
    scx.tl.annotate_domains(sdata, "half", key_added="half_label")
    back = sd.read_zarr(merfish_store).tables["table"]
    assert "signature" in back.uns and "half_label" in back.obs
    np.testing.assert_array_equal(back.obsm["signature"], table.obsm["signature"])


# --------------------------------------------------------------------------------------------------------------------
# Rank-sum tests: one ranking per signature, the same p-values as scipy


def test_rank_average_matches_scipy_rankdata():
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=2_000), 1)  # many ties
    ranks, tie_term = _rank_average(x)
    np.testing.assert_array_equal(ranks, rankdata(x, method="average"))
    _, t = np.unique(x, return_counts=True)
    assert tie_term == float(np.sum(t.astype(float) ** 3 - t))
    assert _rank_average(np.arange(5.0))[1] == 0.0


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_rank_sum_tests_equal_scipy_mannwhitneyu(alternative):
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(4)
    n = 3_000
    codes = rng.integers(-1, 6, n)  # -1: no group (counts as "the rest")
    codes[:3] = [0, 1, 2]
    scores = np.round(rng.normal(size=(n, 3)) + 0.3 * (codes[:, None] == np.arange(3)), 1)  # ties, some signal
    scores[:, 2] = np.where(rng.random(n) < 0.7, 0.0, scores[:, 2])  # a zero-inflated column: a huge tie
    out = _rank_sum_tests(scores, codes, 6, alternative=alternative)
    for g in range(6):
        x, y = scores[codes == g], scores[codes != g]
        res = mannwhitneyu(x, y, axis=0, alternative=alternative, method="asymptotic", use_continuity=True)
        np.testing.assert_allclose(out["statistic"][g], res.statistic, rtol=1e-12)
        np.testing.assert_allclose(out["pvalue"][g], res.pvalue, rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(out["auc"][g], res.statistic / (len(x) * len(y)), rtol=1e-12)
        np.testing.assert_allclose(out["mean_in"][g], x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(out["mean_out"][g], y.mean(axis=0), rtol=1e-12)
    if alternative != "less":
        assert (out["pvalue"][:3] < 1e-3).sum() >= 2  # the signal (groups 0-2 score higher) is found


def test_annotate_domains_stats_equal_the_per_group_scipy_tests():
    from scipy.stats import false_discovery_control, mannwhitneyu

    adata = make_tissue(n_per_region=120)
    scx.tl.score_signatures(adata, MARKERS)
    adata.obsm["signature"] = np.round(adata.obsm["signature"], 1)  # ties
    scx.tl.annotate_domains(adata, "region")
    stats = adata.uns["region_annotation"]["stats"]
    scores = adata.obsm["signature"].astype(np.float64)
    region = adata.obs["region"].to_numpy()
    stat, pvals = [], []
    for g in adata.uns["region_annotation"]["groups"]:
        res = mannwhitneyu(scores[region == g], scores[region != g], axis=0, method="asymptotic")
        stat.append(res.statistic)
        pvals.append(res.pvalue)
    np.testing.assert_allclose(stats["statistic"], np.concatenate(stat), rtol=1e-12)
    np.testing.assert_allclose(stats["pvalue"], np.concatenate(pvals), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(
        stats["pvalue_adj"], false_discovery_control(np.concatenate(pvals)), rtol=1e-9, atol=1e-300
    )


def test_annotate_domains_ranks_each_signature_once_whatever_the_number_of_groups(monkeypatch):
    """200 groups cost one ranking per signature, not one test per group (timings: benchmarks/signatures.py)."""
    from spatialcx.tl import _signatures

    rng = np.random.default_rng(5)
    n, n_groups = 20_000, 200
    g = rng.integers(0, n_groups, n)
    scores = rng.normal(size=(n, 4)).astype(np.float32)
    scores[np.arange(n), g % 4] += 1.0
    adata = ad.AnnData(obs=pd.DataFrame({"g": pd.Categorical(g)}, index=pd.RangeIndex(n).astype(str)))
    adata.obsm["signature"] = scores
    adata.uns["signature"] = {"names": ["a", "b", "c", "d"]}
    calls = []
    real = _signatures._rank_average
    monkeypatch.setattr(_signatures, "_rank_average", lambda x: calls.append(x.shape) or real(x))
    scx.tl.annotate_domains(adata, "g")
    assert calls == [(n,)] * 4  # one ranking of all cells per signature
    labels = adata.uns["g_annotation"]["labels"]
    assert labels == [["a", "b", "c", "d"][i % 4] for i in range(n_groups)]


# --------------------------------------------------------------------------------------------------------------------
# Chunked scores: the same values from any backing, memory O(chunk)


def test_chunked_scores_equal_the_dense_computation():
    adata = make_tissue(n_per_region=70)
    sets = list(MARKERS.values())
    reference = reference_scores(adata, sets)
    scx.tl.score_signatures(adata, MARKERS)
    np.testing.assert_allclose(adata.obsm["signature"], reference, rtol=1e-5, atol=1e-5)
    for chunk_size in (1, 37, 10_000):
        scx.tl.score_signatures(adata, MARKERS, chunk_size=chunk_size, key_added="c")
        np.testing.assert_allclose(adata.obsm["c"], reference, rtol=1e-5, atol=1e-5)
    # dense and CSC counts, counts in a layer, a gene that does not vary
    for x in (adata.X.toarray(), sparse.csc_matrix(adata.X)):
        other = ad.AnnData(x, obs=adata.obs, var=adata.var)
        scx.tl.score_signatures(other, MARKERS, chunk_size=50)
        np.testing.assert_allclose(other.obsm["signature"], reference, rtol=1e-5, atol=1e-5)
    layered = ad.AnnData(np.log1p(adata.X.toarray()), obs=adata.obs, var=adata.var, layers={"counts": adata.X})
    scx.tl.score_signatures(layered, MARKERS, chunk_size=64)
    np.testing.assert_allclose(layered.obsm["signature"], reference, rtol=1e-5, atol=1e-5)
    x = adata.X.toarray()
    x[:, adata.var_names.get_loc("G0")] = 0
    flat = ad.AnnData(sparse.csr_matrix(x), obs=adata.obs, var=adata.var)
    scx.tl.score_signatures(flat, {"T": ["CD3D", "G0"]}, chunk_size=33, standardize=False)
    np.testing.assert_allclose(
        flat.obsm["signature"][:, 0],
        reference_scores(flat, [["CD3D", "G0"]], standardize=False)[:, 0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_scores_from_dask_and_backed_tables(tmp_path):
    import dask.array as da

    adata = make_tissue(n_per_region=60)
    reference = reference_scores(adata, list(MARKERS.values()))
    lazy = ad.AnnData(da.from_array(adata.X.toarray(), chunks=(70, -1)), obs=adata.obs, var=adata.var)
    scx.tl.score_signatures(lazy, MARKERS, chunk_size=100)
    np.testing.assert_allclose(lazy.obsm["signature"], reference, rtol=1e-5, atol=1e-5)
    lazy_sparse = ad.AnnData(
        da.from_array(adata.X, chunks=(90, -1)).map_blocks(sparse.csr_matrix), obs=adata.obs, var=adata.var
    )
    scx.tl.score_signatures(lazy_sparse, MARKERS)
    np.testing.assert_allclose(lazy_sparse.obsm["signature"], reference, rtol=1e-5, atol=1e-5)
    for fmt in ("csr", "csc"):
        path = tmp_path / f"t_{fmt}.h5ad"
        ad.AnnData(
            sparse.csr_matrix(adata.X) if fmt == "csr" else sparse.csc_matrix(adata.X), obs=adata.obs, var=adata.var
        ).write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r")
        scx.tl.score_signatures(backed, MARKERS, chunk_size=45)
        np.testing.assert_allclose(backed.obsm["signature"], reference, rtol=1e-5, atol=1e-5)
        backed.file.close()


def test_score_memory_is_o_chunk_not_cells_x_genes():
    import tracemalloc

    rng = np.random.default_rng(6)
    n, n_genes = 60_000, 200
    x = sparse.random(n, n_genes, density=0.05, format="csr", random_state=rng, dtype=np.float32)
    x.data[:] = rng.integers(1, 10, x.nnz)
    genes = [f"g{i}" for i in range(n_genes)]
    adata = ad.AnnData(x, var=pd.DataFrame(index=genes))
    markers = {f"s{k}": genes[4 * k : 4 * k + 4] for k in range(50)}  # all 200 genes
    tracemalloc.start()
    scx.tl.score_signatures(adata, markers, chunk_size=2_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    dense = n * n_genes * 8  # one dense float64 copy of the cells x marker genes: 96 MB
    assert peak < dense / 4, f"peak {peak / 2**20:.0f} MiB"
    assert adata.obsm["signature"].shape == (n, 50)


# --------------------------------------------------------------------------------------------------------------------
# Warnings


def test_missing_gene_and_dropped_set_warnings_are_short(caplog):
    adata = make_tissue(n_per_region=40)
    markers = scx.tl.load_canonical_markers()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, markers)
    u = adata.uns["signature"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all(len(m) < 500 for m in messages), [len(m) for m in messages]
    missing = next(m for m in messages if "not in the panel and left out" in m)
    n_sets = sum(bool(m) for m in u["missing"])
    n_scored = len(u["names"])
    assert n_sets <= n_scored
    assert (
        f"marker genes of {n_sets} signatures (of the {n_scored} scored) are not in the panel and left out (e.g. T cell: "
        in missing
    )
    assert "uns['signature']['missing']" in missing and "; ..." in missing
    dropped = next(m for m in messages if "not scored" in m)
    assert f"{len(u['dropped'])} marker sets of {len(markers)} have no gene in the panel and are not scored" in dropped
    assert "uns['signature']['dropped']" in dropped and "(s)" not in dropped and "fewer than 1" not in dropped
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, {"T": ["CD3D", "CD3E"], "X": ["CD3D", "NOPE"]}, min_genes=2, key_added="k")
    text = caplog.text
    assert "1 marker set of 2 has fewer than 2 genes in the panel and is not scored (e.g. 'X')" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, {"A": ["CD3D", "CD3E"], "B": ["CD3E", "CD3D"], "C": ["CD68"]}, key_added="twins")
    assert "1 group of marker sets has the same genes in the panel" in caplog.text and "'A' = 'B'" in caplog.text
    np.testing.assert_array_equal(adata.obsm["twins"][:, 0], adata.obsm["twins"][:, 1])
    caplog.clear()
    # a set that lost the genes that told it apart ("lamp5 interneuron" without LAMP5 is "GABAergic neuron"): it
    # scored as the other set and named that set's cells after itself; it is not scored now
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, {"A": ["CD3D", "NOPE"], "B": ["CD3D"], "C": ["CD68"]}, key_added="lost")
    assert (
        "1 marker set lost the genes that told it apart and is left with exactly the panel genes of another set, so "
        "it is not scored (e.g. 'A' = 'B')" in caplog.text
    )
    assert "same genes in the panel" not in caplog.text
    assert list(adata.uns["lost"]["names"]) == ["B", "C"] and list(adata.uns["lost"]["dropped"]) == ["A"]
    assert "has no gene in the panel" not in caplog.text  # 'A' is not counted among the sets without genes
    assert list(adata.uns["k"]["dropped"]) == ["X"]


# --------------------------------------------------------------------------------------------------------------------
# Standardized scores: sets of different sizes are comparable


def test_standardized_scores_do_not_favour_small_sets():
    rng = np.random.default_rng(7)
    n = 4_000
    genes = [f"g{i}" for i in range(300)]  # many genes: the library size hardly couples them
    x = rng.poisson(rng.gamma(2.0, 1.0, (n, 300)) * 2.0).astype(np.float32)  # independent genes: no signal
    adata = ad.AnnData(sparse.csr_matrix(x), var=pd.DataFrame(index=genes))
    markers = {"one": ["g0"], "four": genes[1:5], "nine": genes[5:14]}
    scx.tl.score_signatures(adata, markers, key_added="std")
    scx.tl.score_signatures(adata, markers, standardize=False, key_added="mean")
    sd_std, sd_mean = adata.obsm["std"].std(axis=0), adata.obsm["mean"].std(axis=0)
    np.testing.assert_allclose(sd_std, 1.0, atol=0.05)  # every signature has SD 1 under independence
    np.testing.assert_allclose(sd_mean, [1.0, 0.5, 1 / 3], atol=0.03)  # the mean: 1 / sqrt(n)
    share_std = np.bincount(adata.obsm["std"].argmax(axis=1), minlength=3) / n
    share_mean = np.bincount(adata.obsm["mean"].argmax(axis=1), minlength=3) / n
    assert share_mean[0] > 0.45 and share_mean[2] < 0.25  # the mean: the one-gene set wins most, on noise alone
    np.testing.assert_allclose(share_std, 1 / 3, atol=0.05)  # standardized: each set about as often


def test_standardized_scores_on_real_starmap(shared_data):
    """Canonical markers (all tissues) on STARmap mouse cortex: per-cell tops closer to the author labels."""
    adata = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    markers = scx.tl.load_canonical_markers(species="mouse")
    scx.tl.score_signatures(adata, markers, key_added="std")
    scx.tl.score_signatures(adata, markers, standardize=False, key_added="mean")
    sizes = np.array([len(g.split(",")) for g in adata.uns["std"]["genes"]])
    names = np.asarray(adata.uns["std"]["names"])
    gaba = {"GABAergic neuron", "pvalb GABAergic interneuron", "sst GABAergic interneuron"}
    gaba |= {"VIP GABAergic interneuron", "lamp5 GABAergic interneuron"}
    expected = {"Astro": {"astrocyte"}, "Oligo": {"oligodendrocyte"}, "SST": {"sst GABAergic interneuron"}}
    expected |= {"VIP": {"VIP GABAergic interneuron"}, "Lhx6": gaba, "NPY": gaba, "Reln": gaba}
    expected |= {k: {"glutamatergic neuron"} for k in ("eL2/3", "eL5-2", "eL5-3", "eL6-1", "eL6-2", "L5-1")}
    label = adata.obs["cell_type_author"].astype(str).to_numpy()
    sel = np.isin(label, list(expected))
    result = {}
    for key in ("std", "mean"):
        top = adata.obsm[key].argmax(axis=1)
        hit = np.array([names[t] in expected[lab] for t, lab in zip(top[sel], label[sel])])
        result[key] = ((sizes[top] == 1).mean(), hit.mean(), hit[np.isin(label[sel], ["Lhx6", "NPY", "Reln"])].mean())
    assert (sizes == 1).sum() == 18 and len(sizes) == 25
    one_std, acc_std, inter_std = result["std"]
    one_mean, acc_mean, inter_mean = result["mean"]
    assert one_mean > 0.85 and one_std < 0.80  # 18 of the 25 sets have one panel gene: a fair share is 72 %
    assert acc_std > acc_mean + 0.02  # 16.8 % -> 19.7 % of 2,987 labelled cells
    assert inter_std > inter_mean + 0.3  # interneurons (3-gene GABAergic sets) 37 % -> 75 %
    # the group-versus-rest statistics do not depend on the scaling: the same domain names
    scx.tl.annotate_domains(adata, "cell_type_author", signature_key="std", key_added="a_std")
    scx.tl.annotate_domains(adata, "cell_type_author", signature_key="mean", key_added="a_mean")
    assert list(adata.uns["a_std"]["labels"]) == list(adata.uns["a_mean"]["labels"])
    np.testing.assert_allclose(adata.uns["a_std"]["stats"]["auc"], adata.uns["a_mean"]["stats"]["auc"], atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Canonical markers of one tissue


def test_canonical_markers_of_a_tissue_keep_its_types_and_those_found_anywhere():
    every = scx.tl.load_canonical_markers()
    brain = scx.tl.load_canonical_markers(tissue="brain")
    assert brain == scx.tl.load_canonical_markers(tissue=" Nervous-System ")  # group name, any case and punctuation
    assert list(brain) == [k for k in every if k in brain]  # the table's order
    for kept in ("astrocyte", "sst GABAergic interneuron", "microglial cell", "T cell", "endothelial cell", "pericyte"):
        assert kept in brain
    for dropped in ("pancreatic D cell", "hepatocyte", "Schwann cell", "retinal rod cell", "alveolar macrophage"):
        assert dropped in every and dropped not in brain
    both = scx.tl.load_canonical_markers(tissue=["colon", "lymph node"], key="id")
    assert "CL:0000584" in both and "CL:0000127" not in both  # enterocyte kept, astrocyte not
    assert set(scx.tl.load_canonical_markers(tissue="spleen")) < set(every)  # only the types found anywhere
    mouse = scx.tl.load_canonical_markers(species="mouse", tissue="hippocampus")
    assert mouse["sst GABAergic interneuron"] == ["Sst", "Gad1", "Gad2"]
    with pytest.raises(ValueError, match=r"Unknown tissue 'brian'.*Known tissues: bone marrow, breast"):
        scx.tl.load_canonical_markers(tissue="brian")
    with pytest.raises(TypeError, match="tissue must be a tissue name or a list"):
        scx.tl.load_canonical_markers(tissue=[1])
    # the docstring lists the packaged tissue groups
    import json
    from importlib import resources

    groups = json.loads((resources.files("spatialcx") / "data" / "canonical_markers.json").read_text())["tissue_groups"]
    doc = " ".join(scx.tl.load_canonical_markers.__doc__.split())
    assert [g for g in groups if f'``"{g}"``' not in doc] == []


def test_canonical_markers_by_tissue_from_a_file_checks_its_tissue_lists(tmp_path):
    import json

    record = {"ontology_term_id": "CL:0000127", "name": "astrocyte", "markers": ["GFAP"], "tissues": ["brain"]}
    path = tmp_path / "markers.json"
    path.write_text(json.dumps({"cell_types": [record]}))
    assert scx.tl.load_canonical_markers(path=path) == {"astrocyte": ["GFAP"]}  # no tissue: not checked
    with pytest.raises(ValueError, match="has no 'tissue_groups' object"):
        scx.tl.load_canonical_markers(path=path, tissue="brain")
    path.write_text(json.dumps({"tissue_groups": {"nervous system": ["brain"]}, "cell_types": [record]}))
    with pytest.raises(ValueError, match=r"'astrocyte' lists the tissues \['brain'\]; each must be one of"):
        scx.tl.load_canonical_markers(path=path, tissue="brain")
    record["tissues"] = ["nervous system"]
    path.write_text(json.dumps({"tissue_groups": {"nervous system": ["brain"], "lung": []}, "cell_types": [record]}))
    assert scx.tl.load_canonical_markers(path=path, tissue="brain") == {"astrocyte": ["GFAP"]}
    assert scx.tl.load_canonical_markers(path=path, tissue="lung") == {}


def test_brain_markers_name_starmap_domains_without_other_organs(shared_data):
    """On mouse cortex, the markers of every organ name SST cells 'pancreatic D cell' as well; the brain's do not."""
    adata = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    labels = {}
    for tissue in (None, "brain"):
        markers = scx.tl.load_canonical_markers(species="mouse", tissue=tissue)
        scx.tl.score_signatures(adata, markers, key_added="sig")
        scx.tl.annotate_domains(adata, "cell_type_author", signature_key="sig", key_added="domain")
        labels[tissue] = dict(zip(adata.uns["domain"]["groups"], adata.uns["domain"]["labels"], strict=True))
    assert labels[None]["SST"] == "pancreatic D cell/sst GABAergic interneuron"  # the marker table's order
    assert labels["brain"]["SST"] == "sst GABAergic interneuron"
    assert labels[None]["Smc"] == labels["brain"]["Smc"] == "endothelial cell"
    assert "colonocyte" in labels[None]["eL2/3"] and "colonocyte" not in labels["brain"]["eL2/3"]
    assert "mammary gland" in labels[None]["Endo"]
    every = scx.tl.load_canonical_markers(species="mouse")
    brain = set(scx.tl.load_canonical_markers(species="mouse", tissue="brain"))
    other_organs = set(every) - brain
    assert not any(part in other_organs for label in labels["brain"].values() for part in label.split("/"))
    for group in ("Astro", "Oligo", "VIP", "L5-1", "eL5-2"):
        assert labels["brain"][group] == labels[None][group]  # the brain's own types are named as before


def test_bone_marrow_markers_name_xenium_erythroid_clusters(xenium_bone_marrow, top_clusters):
    """On the Xenium bone marrow, SLC4A1 (band 3) made erythroid clusters 'kidney collecting duct intercalated cell'."""
    adata = xenium_bone_marrow.copy()
    erythroid = top_clusters(adata, "ALAS2", n=3)
    labels = {}
    for tissue in (None, "bone marrow"):
        scx.tl.score_signatures(adata, scx.tl.load_canonical_markers(tissue=tissue), key_added="sig")
        scx.tl.annotate_domains(adata, "cluster", signature_key="sig", key_added="domain")
        labels[tissue] = dict(zip(adata.uns["domain"]["groups"], adata.uns["domain"]["labels"], strict=True))
    assert any("kidney collecting duct" in labels[None][c] for c in erythroid)
    assert all("erythroblast" in labels["bone marrow"][c].split("/") for c in erythroid)
    kept = set(scx.tl.load_canonical_markers(tissue="bone marrow")) | {"Unassigned"}
    assert all(set(label.split("/")) <= kept for label in labels["bone marrow"].values())


def test_mouse_muscle_markers_are_the_adult_mouse_myosins():
    """Title-casing the human markers gave mouse cardiomyocytes Myh7 (beta-MHC: fetal and slow fibres in the mouse;
    adult mouse ventricles express Myh6) and mouse fast fibres only Myh2 (most mouse fast fibres are IIb, Myh4)."""
    human = scx.tl.load_canonical_markers(tissue=["heart", "skeletal muscle"])
    mouse = scx.tl.load_canonical_markers(species="mouse", tissue=["heart", "skeletal muscle"])
    assert "MYH7" in human["cardiac muscle cell"]  # human adult ventricles: beta-MHC
    assert "Myh6" in mouse["cardiac muscle cell"] and "Myh7" not in mouse["cardiac muscle cell"]
    assert mouse["cardiac muscle cell"][:2] == ["Tnnt2", "Actc1"]
    assert {"Myh4", "Acta1", "Ckm"} <= set(mouse["cell of skeletal muscle"])


def test_bone_marrow_neutrophils_are_named_neutrophils_not_osteoclasts(xenium_bone_marrow, top_clusters):
    """The marrow's most abundant cells were never named neutrophil: no neutrophil marker (CSF3R, FCGR3B, CXCR2,
    S100A8/9) is on the Xenium panel, and MMP9, an osteoclast marker that neutrophils express more (gelatinase
    granules), named the neutrophil clusters "osteoclast". FABP4 and LPL, adipocyte markers that marrow sinusoidal
    endothelium expresses too, named the VWF-high endothelial cluster "adipocyte"."""
    adata = xenium_bone_marrow.copy()
    scx.tl.score_signatures(adata, scx.tl.load_canonical_markers(tissue="bone marrow"))
    scx.tl.annotate_domains(adata, "cluster", key_added="domain")
    labels = dict(zip(adata.uns["domain"]["groups"], adata.uns["domain"]["labels"], strict=True))
    neutrophil = top_clusters(adata, "MMP8", n=3)  # neutrophil collagenase: the granulocyte clusters
    granulocytes = ("neutrophil", "neutrophilic myelocyte")
    assert all(labels[c] in granulocytes for c in neutrophil), {c: labels[c] for c in neutrophil}
    assert not any("osteoclast" in label for label in labels.values())
    vwf = top_clusters(adata, "VWF", n=2)
    assert all("endothelial cell" in labels[c].split("/") for c in vwf), {c: labels[c] for c in vwf}
    assert "adipocyte" not in "/".join(labels[c] for c in vwf)
    markers = scx.tl.load_canonical_markers()
    assert {"CEACAM8", "MMP8"} <= set(markers["neutrophil"]) and "MMP9" not in markers["osteoclast"]
    assert not {"FABP4", "LPL"} & set(markers["adipocyte"])


def test_a_set_of_genes_is_taken_in_alphabetical_order():
    """A set's order is its strings' hashes, seeded per process: uns['genes'] (and the float rounding of the scores)
    changed from one run to the next (PYTHONHASHSEED)."""
    adata = make_tissue(n_per_region=20)
    genes = ["MS4A1", "CD79A", "CD19", "CD3D", "CD3E", "CD2", "CD68", "CD163", "MRC1"]
    scx.tl.score_signatures(adata, {"immune": set(genes), "B": frozenset(MARKERS["B cells"])})
    assert list(adata.uns["signature"]["genes"]) == [",".join(sorted(genes)), "CD19,CD79A,MS4A1"]


def test_marker_tables_from_csv_tsv_and_wide_frames_skip_missing_values(tmp_path):
    """A CSV of markers was read as YAML and refused as "got str"; the NaN padding of a wide table (one column per
    type) and NaN / None in a list became genes named "nan" / "None"."""
    adata = make_tissue(n_per_region=20)
    expected = {"T cells": ["CD3D", "CD3E"], "B cells": ["CD19"]}
    long = pd.DataFrame({"cell_type": ["T cells", "T cells", "B cells"], "gene": ["CD3D", "CD3E", "CD19"]})
    wide = pd.DataFrame({"T cells": ["CD3D", "CD3E"], "B cells": ["CD19", np.nan]})
    long.to_csv(tmp_path / "long.csv", index=False)
    wide.to_csv(tmp_path / "wide.tsv", sep="\t", index=False)
    for markers in (
        tmp_path / "long.csv",
        str(tmp_path / "wide.tsv"),
        wide,
        {"T cells": ["CD3D", np.nan, None, " CD3E"], "B cells": ["CD19"]},
    ):
        scx.tl.score_signatures(adata, markers)
        u = adata.uns["signature"]
        assert dict(zip(u["names"], u["genes"], strict=True)) == {k: ",".join(v) for k, v in expected.items()}
        assert list(u["missing"]) == ["", ""], markers
    (tmp_path / "empty.yaml").write_text("T cells:\n")
    with pytest.raises(ValueError, match="Marker set 'T cells' has no genes"):
        scx.tl.score_signatures(adata, tmp_path / "empty.yaml")
    with pytest.raises(ValueError, match="Two marker sets are both named '1'"):  # one silently replaced the other
        scx.tl.score_signatures(adata, {1: ["CD3D"], "1": ["CD19"]})
    (tmp_path / "list.yaml").write_text("- CD3D\n- CD3E\n")
    with pytest.raises(TypeError, match=r"list.yaml' holds list, not a mapping of cell types to gene lists"):
        scx.tl.score_signatures(adata, tmp_path / "list.yaml")


def test_marker_table_cells_of_comma_joined_genes_a_home_path_and_repeated_columns(tmp_path, monkeypatch):
    """A CSV with one row per type ("T cells","CD3D, CD3E") gave a gene named "CD3D, CD3E", not in the panel, and
    the set was dropped; "~/markers.yaml" was not found; a frame with two columns of one name raised AttributeError."""
    adata = make_tissue(n_per_region=20)
    table = pd.DataFrame({"cell_type": ["T cells", "B cells"], "markers": ["CD3D, CD3E", "CD19;MS4A1"]})
    table.to_csv(tmp_path / "joined.csv", index=False)
    scx.tl.score_signatures(adata, tmp_path / "joined.csv")
    u = adata.uns["signature"]
    assert dict(zip(u["names"], u["genes"], strict=True)) == {"T cells": "CD3D,CD3E", "B cells": "CD19,MS4A1"}
    assert list(u["dropped"]) == []
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "markers.yaml").write_text("T cells: [CD3D, CD3E]\n")
    scx.tl.score_signatures(adata, "~/markers.yaml", key_added="home")
    assert list(adata.uns["home"]["names"]) == ["T cells"]
    twice = pd.DataFrame([["CD3D", "CD19"]], columns=["T cells", "T cells"])
    with pytest.raises(ValueError, match="Two marker sets are both named 'T cells'"):
        scx.tl.score_signatures(adata, twice)
    with pytest.raises(TypeError, match=r"markers\['T cells'\] must be a list of gene names .*got int 3\.$"):
        scx.tl.score_signatures(adata, {"T cells": 3})


def test_cells_with_no_marker_signal_are_not_named_after_the_sparsest_set(xenium_bone_marrow):
    """A cell below average in every signature (median 6 counts on this panel) gets no per-cell label; the argmax
    named a third of the cells after CA4, a one-gene set non-zero in 0.4 % of them."""
    adata = xenium_bone_marrow.copy()
    scx.tl.score_signatures(adata, scx.tl.load_canonical_markers(tissue="bone marrow"), key_added="sig")
    scx.tl.annotate_domains(adata, "cluster", signature_key="sig", key_added="domain")
    cell = adata.obs["domain_cell"]
    scores = adata.obsm["sig"]
    below = (scores <= 0).all(axis=1)
    assert below.any()
    assert (cell[below] == "Unassigned").all() and (cell[~below] != "Unassigned").all()
    names = list(adata.uns["sig"]["names"])
    shown = cell[~below].astype(str).to_numpy()
    np.testing.assert_array_equal(shown, np.asarray(names)[scores[~below].argmax(axis=1)])
    # no single one-gene set takes a large share of the cells any more
    assert cell.value_counts(normalize=True).drop("Unassigned").max() < 0.2


def test_smoothing_keeps_sections_that_share_coordinates_apart(caplog):
    """Two sections laid over one coordinate frame: with library_key a cell's neighbours come from its own section."""
    from scipy.spatial import cKDTree

    one = make_tissue(n_per_region=40, seed=0)
    two = make_tissue(n_per_region=40, seed=1)
    adata = ad.concat({"s1": one, "s2": two}, label="section", index_unique="-")
    scx.tl.score_signatures(adata, MARKERS, key_added="raw")
    raw = adata.obsm["raw"].astype(np.float64)
    expected = np.empty_like(raw)
    for section in ("s1", "s2"):
        rows = np.flatnonzero(adata.obs["section"] == section)
        _, nn = cKDTree(adata.obsm["spatial"][rows]).query(adata.obsm["spatial"][rows], k=7)
        expected[rows] = raw[rows[nn]].mean(axis=1)
    scx.tl.score_signatures(adata, MARKERS, smooth=True, n_neighbors=6, library_key="section", key_added="apart")
    np.testing.assert_allclose(adata.obsm["apart"], expected, rtol=1e-4, atol=1e-5)
    assert adata.uns["apart"]["library_key"] == "section"
    # without it, the sections are averaged together, and a warning names the column to pass
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, MARKERS, smooth=True, n_neighbors=6, key_added="mixed")
    assert "Pass library_key='section'" in caplog.text
    assert np.abs(adata.obsm["mixed"] - expected).max() > 0.1
    with pytest.raises(KeyError, match="no column 'sample'"):
        scx.tl.score_signatures(adata, MARKERS, smooth=True, library_key="sample", key_added="bad")
    assert "bad" not in adata.obsm


def test_smoothing_in_3d_takes_neighbours_in_3d():
    """Two layers of cells 1000 apart in z over the same x, y: a cell's neighbours are in its own layer."""
    from spatialcx.tl._signatures import _smooth

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (300, 2))
    xyz = np.vstack([np.column_stack([xy, np.zeros(300)]), np.column_stack([xy, np.full(300, 1000.0)])])
    scores = np.repeat([[0.0], [1.0]], 300, axis=0).astype(np.float32)  # one value per layer
    smooth = _smooth(scores, xyz, n_neighbors=5, source="test")
    np.testing.assert_array_equal(smooth, scores)


def test_smoothing_queries_the_tree_in_its_own_order(monkeypatch):
    """The points go to the k-d tree in its leaf order (cache-friendly at a million cells); the result is unchanged."""
    import scipy.spatial

    from spatialcx.tl._signatures import _smooth

    queried = []

    class Spy(scipy.spatial.cKDTree):
        def query(self, x, *args, **kwargs):
            queried.append((np.asarray(x).copy(), self.indices.copy(), self.data.copy()))
            return super().query(x, *args, **kwargs)

    rng = np.random.default_rng(0)
    xy, values = rng.uniform(0, 1000, (2000, 2)), rng.normal(size=(2000, 3)).astype(np.float32)
    _, nn = scipy.spatial.cKDTree(xy).query(xy, k=6)
    monkeypatch.setattr(scipy.spatial, "cKDTree", Spy)
    smooth = _smooth(values, xy, n_neighbors=5, source="test")
    points, order, data = queried[0]
    np.testing.assert_array_equal(points, data[order])
    np.testing.assert_allclose(smooth, values[nn].mean(axis=1), atol=1e-6)


def test_markers_that_only_raw_holds_are_scored():
    """scanpy's layout: raw holds log1p of every gene, X a scaled subset. Markers outside X are read from raw."""
    import scanpy as sc

    adata = make_tissue(n_per_region=60)
    scx.tl.score_signatures(adata, MARKERS, key_added="full")
    scaled = adata.copy()
    sc.pp.normalize_total(scaled, target_sum=1e4)
    sc.pp.log1p(scaled)
    scaled.raw = scaled
    scaled = scaled[:, [g for g in scaled.var_names if g not in ("CD3D", "CD3E", "CD2", "MS4A1")]].copy()
    sc.pp.scale(scaled)
    scx.tl.score_signatures(scaled, MARKERS, key_added="full")
    assert list(scaled.uns["full"]["names"]) == list(MARKERS) and list(scaled.uns["full"]["dropped"]) == []
    assert list(scaled.uns["full"]["genes"]) == [",".join(v) for v in MARKERS.values()]
    np.testing.assert_allclose(scaled.obsm["full"], adata.obsm["full"], rtol=1e-4, atol=1e-5)


def test_new_scores_drop_the_labels_annotate_domains_made_from_the_old_ones(caplog):
    adata = make_tissue(n_per_region=40)
    scx.tl.score_signatures(adata, MARKERS)
    scx.tl.annotate_domains(adata, "region")
    before = adata.obs["region_annotation"].copy()
    scx.tl.score_signatures(adata, MARKERS)  # the same scores again: the labels still hold
    pd.testing.assert_series_equal(adata.obs["region_annotation"], before)
    assert "region_annotation" in adata.uns
    fewer = {k: v for k, v in MARKERS.items() if k != "T cells"}
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.score_signatures(adata, fewer)
    assert "removing the labels that annotate_domains made" in caplog.text
    assert "region_annotation" not in adata.uns
    assert not {"region_annotation", "region_annotation_cell"} & set(adata.obs.columns)
    assert {"truth", "region"} <= set(adata.obs.columns)
    scx.tl.annotate_domains(adata, "region")
    assert "T cells" not in adata.obs["region_annotation_cell"].cat.categories


def test_new_scores_of_a_lazy_table_drop_the_earlier_labels(tmp_path):
    from anndata.experimental import read_lazy

    make_tissue(n_per_region=30).write_zarr(tmp_path / "t.zarr")
    lazy = read_lazy(tmp_path / "t.zarr")
    scx.tl.score_signatures(lazy, MARKERS)
    scx.tl.annotate_domains(lazy, "region")
    scx.tl.score_signatures(lazy, {k: v[:2] for k, v in MARKERS.items()})
    assert "region_annotation" not in lazy.uns
    assert not {"region_annotation", "region_annotation_cell"} & set(lazy.obs.columns)
    assert {"truth", "region"} <= set(lazy.obs.columns)
