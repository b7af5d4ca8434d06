"""Tests of scx.tl.score_signatures and scx.tl.annotate_domains."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import spatialcx as scx
from spatialcx.tl._signatures import _elbow_label

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


def test_score_is_the_mean_z_score_of_log1p_10k():
    adata = make_tissue(n_per_region=60)
    scx.tl.score_signatures(adata, {"T cells": MARKERS["T cells"]})
    x = adata.X.toarray()
    expr = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)[:, adata.var_names.get_indexer(MARKERS["T cells"])]
    z = (expr - expr.mean(axis=0)) / expr.std(axis=0)
    np.testing.assert_allclose(adata.obsm["signature"][:, 0], z.mean(axis=1), rtol=1e-4, atol=1e-4)


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
    with pytest.raises(TypeError, match="markers must map"):
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
    assert lab([0.60, 0.95, 0.94]) == "B/C"  # sorted by AUC first
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
