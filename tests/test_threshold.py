"""Tests of scx.tl.classify_by_threshold and scx.pl.threshold."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import spatialcx as scx

MARKERS = ["MK0", "MK1", "MK2"]


def make_counts(n=4000, *, markers=3, frac=0.2, noise=0.05, pos_mean=8.0, other=40, seed=0):
    """Raw counts: ``markers`` marker genes high (negative binomial, mean ``pos_mean``) in a ``frac`` of the cells."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < frac
    size = rng.lognormal(0.0, 0.4, n)
    bg = rng.poisson(rng.gamma(2.0, 2.0, (n, other)) * size[:, None])
    mean = np.where(truth, pos_mean, noise) * size
    mk = np.column_stack([rng.poisson(rng.gamma(2.0, mean / 2.0)) for _ in range(markers)])
    x = np.hstack([mk, bg]).astype(np.float32)
    names = [f"MK{i}" for i in range(markers)] + [f"G{i}" for i in range(other)]
    adata = ad.AnnData(
        sparse.csr_matrix(x),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=names),
    )
    adata.obsm["spatial"] = rng.random((n, 2)) * 1000
    return adata, truth


def log1p_10k(adata, genes):
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    lib = x.sum(axis=1, keepdims=True)
    idx = adata.var_names.get_indexer(genes)
    return np.log1p(x[:, idx] / lib * 1e4)


def accuracy(adata, key, truth):
    return float((adata.obs[f"{key}_cluster"].to_numpy() == truth).mean())


# --------------------------------------------------------------------------------------------------------------------
# known truth


@pytest.mark.parametrize("method", ["gmm", "ks"])
@pytest.mark.parametrize("metagene", ["shifted_geometric_mean", "mean", "pc1"])
def test_three_markers_known_truth(method, metagene):
    adata, truth = make_counts(frac=0.15)
    scx.tl.classify_by_threshold(adata, MARKERS, method=method, metagene=metagene)
    assert accuracy(adata, "threshold", truth) > 0.96
    assert adata.obs["threshold_cluster"].isin([0, 1]).all()
    assert adata.uns["threshold"]["n_high"] == int(adata.obs["threshold_cluster"].sum())


def test_zero_inflated_single_marker_ks_beats_gmm():
    adata, truth = make_counts(n=6000, markers=1, frac=0.2, noise=0.05)
    x = log1p_10k(adata, ["MK0"])[:, 0]
    assert (x == 0).mean() > 0.7  # the case is zero-inflated
    scx.tl.classify_by_threshold(adata, "MK0", method="ks", key_added="ks")
    scx.tl.classify_by_threshold(adata, "MK0", method="gmm", key_added="gmm")
    acc_ks, acc_gmm = accuracy(adata, "ks", truth), accuracy(adata, "gmm", truth)
    assert acc_ks > 0.96
    assert acc_ks > acc_gmm  # gmm calls every non-zero (ambient) cell high
    fit = adata.uns["ks"]["fit"]
    assert fit["zero_inflated"] and fit["floor"] == 0.0
    # cells with no counts are never high, and their probability is 0
    zero = x == 0
    assert (adata.obs["ks_cluster"].to_numpy()[zero] == 0).all()
    assert (adata.obs["ks_probability"].to_numpy()[zero] == 0).all()


def test_ks_without_ambient_counts_calls_every_expressing_cell_high():
    adata, truth = make_counts(n=5000, markers=1, frac=0.2, noise=0.0)
    scx.tl.classify_by_threshold(adata, "MK0", method="ks")
    x = log1p_10k(adata, ["MK0"])[:, 0]
    assert adata.uns["threshold"]["fit"]["side"] == "above_floor"
    np.testing.assert_array_equal(adata.obs["threshold_cluster"].to_numpy(), (x > 0).astype(int))
    assert accuracy(adata, "threshold", truth) > 0.98


def test_ks_on_continuous_feature_with_high_minority():
    rng = np.random.default_rng(3)
    adata, _ = make_counts(n=5000)
    truth = rng.random(adata.n_obs) < 0.1
    adata.obs["signal"] = np.where(truth, rng.normal(5, 1, adata.n_obs), rng.normal(0, 1, adata.n_obs))
    scx.tl.classify_by_threshold(adata, "signal", method="ks")
    assert adata.uns["threshold"]["fit"]["side"] == "high_minority"
    assert not adata.uns["threshold"]["fit"]["zero_inflated"]
    assert accuracy(adata, "threshold", truth) > 0.97


# --------------------------------------------------------------------------------------------------------------------
# scores


def test_genes_are_read_from_counts_not_from_x():
    adata, _ = make_counts(n=2000)
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    # X holds log1p(CPM): a different normalization, which the gene features must not use
    lib = np.asarray(counts.sum(axis=1)).ravel()
    adata.X = sparse.csr_matrix(np.log1p(counts.toarray() / lib[:, None] * 1e6))
    x_before = adata.X.copy()
    scx.tl.classify_by_threshold(adata, "MK1")
    np.testing.assert_allclose(adata.obs["threshold_score"], log1p_10k(adata, ["MK1"])[:, 0], rtol=1e-5, atol=1e-5)
    assert (adata.X != x_before).nnz == 0 and (adata.layers["counts"] != counts).nnz == 0
    assert adata.uns["threshold"]["metagene"] == "none (single feature)"
    assert "metagene_params" not in adata.uns["threshold"]


def test_metagene_formulas():
    adata, _ = make_counts(n=2000)
    x = log1p_10k(adata, MARKERS)
    scx.tl.classify_by_threshold(adata, MARKERS, metagene="shifted_geometric_mean", key_added="sgm")
    np.testing.assert_allclose(adata.obs["sgm_score"], np.exp(np.log(x + 1).mean(axis=1)) - 1, rtol=1e-5, atol=1e-5)
    scx.tl.classify_by_threshold(adata, MARKERS, metagene="mean", key_added="avg")
    np.testing.assert_allclose(adata.obs["avg_score"], x.mean(axis=1), rtol=1e-5, atol=1e-5)


def test_shifted_geometric_mean_needs_joint_expression():
    adata, _ = make_counts(n=500)
    # single-positive vs triple-positive cells with the same arithmetic mean
    adata.obs["a"] = np.r_[np.full(250, 9.0), np.full(250, 3.0)]
    adata.obs["b"] = np.r_[np.zeros(250), np.full(250, 3.0)]
    adata.obs["c"] = np.r_[np.zeros(250), np.full(250, 3.0)]
    scx.tl.classify_by_threshold(adata, ["a", "b", "c"], method="ks")
    score = adata.obs["threshold_score"].to_numpy()
    assert (score[250:] > score[:250]).all()
    assert (
        adata.obs["threshold_cluster"].to_numpy()[250:].all()
        and not adata.obs["threshold_cluster"].to_numpy()[:250].any()
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pc1_sign_means_higher_expression(seed):
    adata, _ = make_counts(n=1500, seed=seed)
    feats = MARKERS[::-1] if seed % 2 else MARKERS
    scx.tl.classify_by_threshold(adata, feats, metagene="pc1")
    x = log1p_10k(adata, feats)
    assert np.corrcoef(adata.obs["threshold_score"], x.mean(axis=1))[0, 1] > 0.9
    params = adata.uns["threshold"]["metagene_params"]
    assert all(v > 0 for v in params["loadings"]) and 0 < params["explained_variance_ratio"] <= 1


def test_mixes_genes_and_obs_columns():
    adata, truth = make_counts(n=3000)
    adata.obs["marker_protein"] = log1p_10k(adata, ["MK2"])[:, 0]  # an obs column, used as it is
    scx.tl.classify_by_threshold(adata, ["MK0", "MK1", "marker_protein"], metagene="mean")
    assert adata.uns["threshold"]["feature_kinds"] == ["gene", "gene", "obs"]
    assert accuracy(adata, "threshold", truth) > 0.96


# --------------------------------------------------------------------------------------------------------------------
# threshold rule


@pytest.mark.parametrize("method", ["gmm", "ks"])
def test_threshold_is_the_rule_used(method):
    adata, _ = make_counts(n=3000, frac=0.3)
    scx.tl.classify_by_threshold(adata, MARKERS, method=method, probability_cutoff=0.3)
    thr = adata.uns["threshold"]["threshold"]
    score = adata.obs["threshold_score"].to_numpy(dtype=np.float64)
    cluster = adata.obs["threshold_cluster"].to_numpy()
    np.testing.assert_array_equal(cluster, (score > thr).astype(int))
    prob = adata.obs["threshold_probability"].to_numpy(dtype=np.float64)
    order = np.argsort(score, kind="stable")
    assert (np.diff(prob[order]) >= -1e-6).all()  # probability never decreases with the score
    if method == "gmm":
        far = np.abs(score - thr) > 1e-4 * max(1.0, abs(thr))
        np.testing.assert_array_equal((prob > 0.3)[far], (cluster == 1)[far])


def test_gmm_cutoff_moves_the_threshold():
    adata, _ = make_counts(n=3000, frac=0.3, pos_mean=4.0, noise=0.5)
    thresholds, n_high = [], []
    for cutoff in (0.1, 0.5, 0.9):
        scx.tl.classify_by_threshold(adata, MARKERS, method="gmm", probability_cutoff=cutoff)
        thresholds.append(adata.uns["threshold"]["threshold"])
        n_high.append(adata.uns["threshold"]["n_high"])
    assert thresholds[0] < thresholds[1] < thresholds[2]
    assert n_high[0] >= n_high[1] >= n_high[2]


def test_gmm_fits_a_seeded_subsample_and_scores_every_cell():
    adata, truth = make_counts(n=4000)
    scx.tl.classify_by_threshold(adata, MARKERS, max_fit_cells=500, random_state=7)
    first = adata.obs["threshold_probability"].to_numpy().copy()
    fit = adata.uns["threshold"]["fit"]
    assert fit["n_fit_cells"] == 500 and fit["means"][0] < fit["means"][1]
    assert accuracy(adata, "threshold", truth) > 0.95
    scx.tl.classify_by_threshold(adata, MARKERS, max_fit_cells=500, random_state=7)
    np.testing.assert_array_equal(first, adata.obs["threshold_probability"].to_numpy())


# --------------------------------------------------------------------------------------------------------------------
# errors: clear, and nothing written


def _unchanged(adata, before_cols):
    assert list(adata.obs.columns) == before_cols
    assert "threshold" not in adata.uns


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"features": ["MK0", "NOPE"]}, KeyError, "NOPE"),
        ({"features": ["MK00"]}, KeyError, "did you mean"),
        ({"features": []}, ValueError, "empty"),
        ({"features": ["MK0", "MK0"]}, ValueError, "more than once"),
        ({"features": MARKERS, "method": "otsu"}, ValueError, "method"),
        ({"features": MARKERS, "metagene": "median"}, ValueError, "metagene"),
        ({"features": MARKERS, "probability_cutoff": 1.5}, ValueError, "probability_cutoff"),
        ({"features": MARKERS, "plots_dir": "x"}, ValueError, "plot=True"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    adata, _ = make_counts(n=200)
    before = list(adata.obs.columns)
    with pytest.raises(exc, match=match):
        scx.tl.classify_by_threshold(adata, **kwargs)
    _unchanged(adata, before)


def test_degenerate_features():
    adata, _ = make_counts(n=300)
    x = adata.X.toarray()
    x[:, adata.var_names.get_loc("MK2")] = 0
    adata.X = sparse.csr_matrix(x)
    adata.obs["flat"] = 2.5
    adata.obs["holes"] = np.where(np.arange(300) % 7 == 0, np.nan, 1.0 * np.arange(300))
    adata.obs["kind"] = pd.Categorical(["a", "b", "c"] * 100)
    adata.obs["signed"] = np.linspace(-1, 1, 300)
    before = list(adata.obs.columns)
    with pytest.raises(ValueError, match="zero in all 300 cells"):
        scx.tl.classify_by_threshold(adata, ["MK0", "MK2"])
    with pytest.raises(ValueError, match="same value"):
        scx.tl.classify_by_threshold(adata, "flat")
    with pytest.raises(ValueError, match="43 missing value"):
        scx.tl.classify_by_threshold(adata, "holes")
    with pytest.raises(ValueError, match="not numbers"):
        scx.tl.classify_by_threshold(adata, "kind")
    with pytest.raises(ValueError, match="negative values"):
        scx.tl.classify_by_threshold(adata, ["MK0", "signed"])
    adata.obs["MK1"] = 1.0
    with pytest.raises(ValueError, match="both a gene and an obs column"):
        scx.tl.classify_by_threshold(adata, "MK1")
    _unchanged(adata, [*before, "MK1"])
    scx.tl.classify_by_threshold(adata, ["MK0", "signed"], metagene="mean", key_added="ok")  # fine with a mean
    assert adata.uns["ok"]["feature_kinds"] == ["gene", "obs"]


def test_one_cell_is_refused():
    adata, _ = make_counts(n=50)
    with pytest.raises(ValueError, match="1 cell"):
        scx.tl.classify_by_threshold(adata[:1].copy(), "MK0")


# --------------------------------------------------------------------------------------------------------------------
# storage, SpatialData, copies


@pytest.mark.parametrize("method", ["gmm", "ks"])
@pytest.mark.parametrize("metagene", ["shifted_geometric_mean", "pc1"])
def test_round_trip_h5ad_and_zarr(tmp_path, method, metagene):
    adata, _ = make_counts(n=800)
    scx.tl.classify_by_threshold(adata, MARKERS, method=method, metagene=metagene)
    for path, write, read in (
        (tmp_path / "t.h5ad", ad.AnnData.write_h5ad, ad.read_h5ad),
        (tmp_path / "t.zarr", ad.AnnData.write_zarr, ad.read_zarr),
    ):
        write(adata, path)
        back = read(path)
        assert back.uns["threshold"]["threshold"] == adata.uns["threshold"]["threshold"]
        assert back.uns["threshold"]["method"] == method
        assert list(back.uns["threshold"]["features"]) == MARKERS
        pd.testing.assert_frame_equal(back.obs, adata.obs)


def test_copy_leaves_input_untouched():
    adata, _ = make_counts(n=500)
    out = scx.tl.classify_by_threshold(adata, MARKERS, copy=True)
    assert "threshold_cluster" in out.obs and "threshold_cluster" not in adata.obs and "threshold" not in adata.uns
    assert scx.tl.classify_by_threshold(adata, MARKERS) is None


def _sdata(adata):
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    circles = gpd.GeoDataFrame(
        {"radius": np.full(adata.n_obs, 5.0)},
        geometry=[Point(x, y) for x, y in adata.obsm["spatial"]],
        index=pd.RangeIndex(adata.n_obs),
    )
    adata = adata.copy()
    adata.obs["region"] = pd.Categorical(["cells"] * adata.n_obs)
    adata.obs["cell_index"] = np.arange(adata.n_obs)
    table = TableModel.parse(adata, region="cells", region_key="region", instance_key="cell_index")
    return SpatialData(shapes={"cells": ShapesModel.parse(circles)}, tables={"table": table})


def test_spatialdata_backed_store_is_updated(tmp_path):
    from spatialdata import read_zarr

    adata, truth = make_counts(n=600)
    sdata = _sdata(adata)
    sdata.write(tmp_path / "s.zarr")
    sdata = read_zarr(tmp_path / "s.zarr")
    out = scx.tl.classify_by_threshold(sdata, MARKERS, method="ks", copy=True)
    assert "threshold_cluster" in out.tables["table"].obs and "threshold_cluster" not in sdata.tables["table"].obs
    scx.tl.classify_by_threshold(sdata, MARKERS, method="ks")
    back = read_zarr(tmp_path / "s.zarr")
    obs = back.tables["table"].obs
    assert (obs["threshold_cluster"].to_numpy() == truth).mean() > 0.95
    assert back.tables["table"].uns["threshold"]["method"] == "ks"
    assert back.tables["table"].uns["spatialdata_attrs"]["region"] == "cells"


# --------------------------------------------------------------------------------------------------------------------
# plot


def test_plot_is_saved_and_drawn(tmp_path):
    import matplotlib.pyplot as plt

    adata, _ = make_counts(n=1500)
    plt.close("all")
    scx.tl.classify_by_threshold(adata, MARKERS, plot=True, plots_dir=tmp_path / "plots", key_added="t")
    png = tmp_path / "plots" / "t_threshold.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert plt.get_fignums() == []  # saved, then closed
    scx.tl.classify_by_threshold(adata, MARKERS, plot=True, key_added="t")
    assert len(plt.get_fignums()) == 1  # not saved: left open, so that a notebook shows it
    plt.close("all")
    fig = scx.pl.threshold(adata, "t", max_points=300)
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 1 + 3  # histogram + 3 gene pairs
    hist = visible[0]
    assert any(np.allclose(line.get_xdata(), adata.uns["t"]["threshold"]) for line in hist.get_lines())
    # genes with their unit (was the bare name)
    unit = "log1p(counts per 10k)"
    assert {visible[1].get_xlabel(), visible[1].get_ylabel()} == {f"MK0, {unit}", f"MK1, {unit}"}
    plt.close("all")

    scx.tl.classify_by_threshold(adata, "MK0", key_added="one")
    fig = scx.pl.threshold(adata, "one", save=tmp_path / "one.png")
    assert len([a for a in fig.axes if a.get_visible()]) == 1 and (tmp_path / "one.png").is_file()
    assert fig.axes[0].get_xlabel() == f"MK0, {unit}"
    plt.close("all")
    with pytest.raises(KeyError, match="classify_by_threshold"):
        scx.pl.threshold(adata, "never")


# --------------------------------------------------------------------------------------------------------------------
# ks: no split below noise


def one_population(seed, n=3000):
    """75 % of cells at 0, the others one Gaussian population of expressing cells (no minority)."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(n) < 0.75, 0.0, rng.normal(5, 1.3, n).clip(0.5))
    return ad.AnnData(obs=pd.DataFrame({"f": x}, index=[str(i) for i in range(n)])), x


def test_ks_does_not_split_one_population_of_expressing_cells():
    # seed 1 used to be split at 5.87 (27 % of the expressing cells high) on a statistic of 0.044, below noise
    adata, x = one_population(1)
    scx.tl.classify_by_threshold(adata, "f", method="ks")
    fit = adata.uns["threshold"]["fit"]
    assert fit["side"] == "above_floor"
    assert adata.uns["threshold"]["threshold"] == 0.0
    np.testing.assert_array_equal(adata.obs["threshold_cluster"].to_numpy(), (x > 0).astype(int))
    n = int((x > 0).sum())
    assert fit["critical_value"] == pytest.approx(1.949 / np.sqrt(n), rel=0.02)  # kstwo at alpha 0.001
    assert fit["statistic_high"] < fit["critical_value"] and fit["statistic_low"] < fit["critical_value"]


def test_ks_one_population_over_seeds_every_expressing_cell_high():
    # before: 18 high_minority, 16 above_floor, 6 low_minority of 40; median share of expressing cells high 0.65
    from spatialcx.tl._threshold import _split_ks

    sides = []
    for seed in range(40):
        _, x = one_population(seed)
        threshold, _, info = _split_ks(x.astype(np.float32).astype(np.float64), random_state=0)
        sides.append(info["side"])
        if info["side"] == "above_floor":
            assert threshold == 0.0
    assert sides.count("above_floor") == 40


def test_ks_low_minority_needs_its_own_mode():
    from spatialcx.tl._threshold import _has_low_mode

    rng = np.random.default_rng(0)
    bimodal = np.sort(np.r_[rng.normal(1, 0.3, 600), rng.normal(4, 0.6, 2400)])
    assert _has_low_mode(bimodal, 1.8, float(np.median(bimodal)), random_state=0)
    one = np.sort(rng.normal(5, 1.3, 3000))
    assert not _has_low_mode(one, 4.0, 5.0, random_state=0)  # a dip of a few % of a single mode is not a mode
    assert not _has_low_mode(one, 3.0, 5.0, random_state=0)


def test_ks_continuous_feature_without_minority_calls_cells_above_the_lowest_high(caplog):
    import logging

    rng = np.random.default_rng(5)
    adata = ad.AnnData(obs=pd.DataFrame({"g": rng.normal(0, 1, 4000)}, index=[str(i) for i in range(4000)]))
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.classify_by_threshold(adata, "g", method="ks")
    assert adata.uns["threshold"]["fit"]["side"] == "above_floor"
    assert adata.uns["threshold"]["n_high"] == 3999
    assert "no minority departs from the bulk" in caplog.text


def test_ks_real_xenium_erythroid_threshold_unchanged(shared_data):
    import scanpy as sc

    folder = shared_data("xenium_bonemarrow")
    adata = sc.read_10x_h5(folder / "cell_feature_matrix.h5", gex_only=True)
    scx.tl.classify_by_threshold(adata, ["GYPA", "AHSP", "ALAS2"], method="ks", key_added="ery")
    assert adata.uns["ery"]["threshold"] == pytest.approx(1.94, abs=0.005)
    assert adata.uns["ery"]["n_high"] == 5083
    assert adata.uns["ery"]["fit"]["side"] == "high_minority"


def test_ks_real_starmap_flt1_is_not_split_inside_its_distribution(shared_data):
    adata = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    scx.tl.classify_by_threshold(adata, "flt1", method="ks")  # was low_minority at 3.32, 650 of 763 high
    x = log1p_10k(adata, ["flt1"])[:, 0]
    assert adata.uns["threshold"]["fit"]["side"] == "above_floor"
    assert adata.uns["threshold"]["n_high"] == int((x > 0).sum()) == 763


# --------------------------------------------------------------------------------------------------------------------
# names and lazy tables


def test_gene_names_match_ignoring_case_when_unambiguous():
    adata, _ = make_counts(n=2000)
    scx.tl.classify_by_threshold(adata, ["mk0", "Mk1", "MK2"], key_added="ci")  # was a KeyError
    scx.tl.classify_by_threshold(adata, MARKERS, key_added="exact")
    np.testing.assert_array_equal(adata.obs["ci_score"], adata.obs["exact_score"])
    assert adata.uns["ci"]["features"] == MARKERS
    assert adata.uns["ci"]["features_requested"] == ["mk0", "Mk1", "MK2"]
    assert "features_requested" not in adata.uns["exact"]
    scx.pl.threshold(adata, "ci")  # the plot reads the recorded names


def test_gene_names_ambiguous_or_unknown_are_refused():
    adata, _ = make_counts(n=500)
    adata.var_names = ["MK0", "mk0", *adata.var_names[2:]]  # two genes differing only by case
    with pytest.raises(KeyError, match=r"'Mk0' matches \['MK0', 'mk0'\] ignoring case"):
        scx.tl.classify_by_threshold(adata, "Mk0")
    with pytest.raises(KeyError, match="did you mean"):
        scx.tl.classify_by_threshold(adata, "MK22")
    with pytest.raises(ValueError, match="more than once"):
        scx.tl.classify_by_threshold(adata, ["MK2", "mk2"])
    assert "threshold" not in adata.uns


@pytest.fixture
def lazy_starmap(shared_data, tmp_path):
    import shutil

    import h5py
    from anndata.experimental import read_lazy

    path = tmp_path / "star.h5ad"
    shutil.copy(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"), path)
    with h5py.File(path, "r") as f:
        yield read_lazy(f)


def test_lazy_table_obs_columns(lazy_starmap):
    lazy = lazy_starmap
    scx.tl.classify_by_threshold(lazy, ["gad1", "gad2"])
    assert type(lazy.obs["threshold_score"]).__name__ == "DataArray"  # what failed: xarray obs columns
    n_high = lazy.uns["threshold"]["n_high"]
    # an obs column of a lazy table as a feature (was a TypeError: DataArray.to_numpy() got ... 'dtype')
    scx.tl.classify_by_threshold(lazy, "threshold_score", key_added="t2")
    assert lazy.uns["t2"]["feature_kinds"] == ["obs"]
    assert lazy.uns["t2"]["threshold"] == pytest.approx(lazy.uns["threshold"]["threshold"], abs=1e-6)
    assert lazy.uns["t2"]["n_high"] == n_high
    fig = scx.pl.threshold(lazy, "threshold")
    assert f"{n_high:,} / {lazy.n_obs:,} high" in fig.axes[0].get_title()  # 3,704 cells: with a thousands separator


# --------------------------------------------------------------------------------------------------------------------
# gmm: one population is not cut in two


@pytest.mark.parametrize(
    "draw",
    [
        lambda r, n: r.normal(5.0, 1.0, n),  # was: 61 % of the cells high
        lambda r, n: r.lognormal(1.0, 0.5, n),  # was: 29 % high
        lambda r, n: r.standard_t(3, n),  # was: 96 % high (the two Gaussians shared one mean)
        lambda r, n: r.gamma(2.0, 1.0, n),
    ],
    ids=["normal", "lognormal", "student_t", "gamma"],
)
def test_gmm_refuses_one_population(draw):
    n = 5000
    x = draw(np.random.default_rng(0), n)
    adata = ad.AnnData(obs=pd.DataFrame({"f": x}, index=[str(i) for i in range(n)]))
    with pytest.raises(ValueError, match=r"does not look like two populations.*single mode.*method='ks'"):
        scx.tl.classify_by_threshold(adata, "f", method="gmm")
    _unchanged(adata, ["f"])


def test_gmm_two_populations_record_their_dip():
    rng = np.random.default_rng(0)
    truth = rng.random(5000) < 0.2
    x = np.where(truth, rng.normal(5, 1, truth.size), rng.normal(0, 1, truth.size))
    adata = ad.AnnData(obs=pd.DataFrame({"f": x}, index=[str(i) for i in range(x.size)]))
    scx.tl.classify_by_threshold(adata, "f")
    fit = adata.uns["threshold"]["fit"]
    assert 0 < fit["mode_dip_ratio"] < 0.3 and fit["separation"] > 4
    assert accuracy(adata, "threshold", truth) > 0.98
    # a zero-inflated marker: a narrow component on the zeros and one on the expressing cells is two modes
    adata, truth = make_counts(n=4000, markers=1, frac=0.2)
    scx.tl.classify_by_threshold(adata, "MK0")
    assert adata.uns["threshold"]["fit"]["mode_dip_ratio"] < 0.1


def test_gmm_real_markers_are_not_refused(shared_data, xenium_bone_marrow):
    adata = xenium_bone_marrow.copy()
    # zeros (79 %) and the rest: two modes, although Ashman's D of the two Gaussians is only 1.84
    scx.tl.classify_by_threshold(adata, ["GYPA", "AHSP", "ALAS2"], key_added="ery")
    fit = adata.uns["ery"]["fit"]
    assert fit["separation"] < 2 and fit["mode_dip_ratio"] < 0.6
    star = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    scx.tl.classify_by_threshold(star, ["slc17a7", "tbr1", "cux2"], key_added="exc")  # the shallowest dip seen: 0.89
    assert star.uns["exc"]["fit"]["mode_dip_ratio"] < 0.95
    label = star.obs["cell_type_author"].astype(str)
    exc, known = label.str.match(r"^e?L\d").to_numpy(), (label != "NA").to_numpy()
    high = star.obs["exc_cluster"].to_numpy() == 1
    # the labelled cells called high are enriched in the authors' excitatory neurons (0.80 against 0.67 of all)
    assert (exc & high).sum() / (known & high).sum() > exc.sum() / known.sum() + 0.1


# --------------------------------------------------------------------------------------------------------------------
# argument types, expression source, plot after persisting


def test_dict_of_classes_is_refused_with_the_loop_to_write():
    adata, _ = make_counts(n=300)
    with pytest.raises(TypeError, match=r"dict of 2 classes \(\['a', 'b'\]\).*once per class.*key_added=name"):
        scx.tl.classify_by_threshold(adata, {"a": ["MK0"], "b": ["MK1", "MK2"]})  # was: KeyError "['a', 'b']"
    _unchanged(adata, [])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probability_cutoff": "0.5"}, r"probability_cutoff must be a number in \(0, 1\), got '0.5' \(str\)"),
        ({"probability_cutoff": True}, r"probability_cutoff must be a number.*True \(bool\)"),
        ({"random_state": None}, r"random_state must be an integer seed, got None"),
        ({"random_state": np.random.default_rng(0)}, r"random_state must be an integer seed.*\(Generator\)"),
    ],
)
def test_parameter_types_are_checked(kwargs, match):
    # were: "unsupported operand type(s) for -: 'int' and 'str'" from the mixture, int(None), scikit-learn's message
    adata, _ = make_counts(n=300)
    with pytest.raises(TypeError, match=match):
        scx.tl.classify_by_threshold(adata, MARKERS, **kwargs)
    _unchanged(adata, [])


def test_expression_source_is_recorded():
    import scanpy as sc

    adata, truth = make_counts(n=2000)
    scx.tl.classify_by_threshold(adata, MARKERS)
    expr = adata.uns["threshold"]["expression"]
    assert expr["source"] == "X" and expr["source_kind"] == "raw counts"
    score = adata.obs["threshold_score"].to_numpy()
    # X normalized and log1p'd, counts in a layer: the counts are used, and the layer is named
    layered = adata.copy()
    layered.layers["counts"] = layered.X.copy()
    sc.pp.normalize_total(layered, target_sum=1e4)
    sc.pp.log1p(layered)
    scx.tl.classify_by_threshold(layered, MARKERS)
    assert layered.uns["threshold"]["expression"]["source"] == "layers['counts']"
    np.testing.assert_allclose(layered.obs["threshold_score"].to_numpy(), score, rtol=1e-5, atol=1e-5)
    # only log1p(10k) values: used as they are, and said so
    del layered.layers["counts"]
    scx.tl.classify_by_threshold(layered, MARKERS)
    expr = layered.uns["threshold"]["expression"]
    assert expr["source"] == "X" and expr["source_kind"].startswith("log1p(10k) values")
    np.testing.assert_allclose(layered.obs["threshold_score"].to_numpy(), score, rtol=1e-4, atol=1e-4)
    # obs features only: no expression read
    adata.obs["s"] = score
    scx.tl.classify_by_threshold(adata, "s", key_added="obs_only")
    assert "expression" not in adata.uns["obs_only"]


def test_a_failing_plot_leaves_memory_and_store_agreeing(tmp_path, monkeypatch):
    from spatialdata import read_zarr

    import spatialcx.pl._threshold as pl_threshold

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    adata, _ = make_counts(n=600)
    _sdata(adata).write(tmp_path / "s.zarr")
    sdata = read_zarr(tmp_path / "s.zarr")
    monkeypatch.setattr(pl_threshold, "threshold", broken)
    with pytest.raises(RuntimeError, match="no display"):
        scx.tl.classify_by_threshold(sdata, MARKERS, plot=True)
    # was: the keys in memory only; the store kept the old table
    back = read_zarr(tmp_path / "s.zarr").tables["table"]
    pd.testing.assert_series_equal(back.obs["threshold_cluster"], sdata.tables["table"].obs["threshold_cluster"])
    assert back.uns["threshold"]["n_high"] == sdata.tables["table"].uns["threshold"]["n_high"]


def test_spatialdata_other_table_key_and_write_false(tmp_path):
    from spatialdata import read_zarr

    adata, truth = make_counts(n=600)
    sdata = _sdata(adata)
    sdata.tables["cells_table"] = sdata.tables.pop("table")
    sdata.write(tmp_path / "s.zarr")
    sdata = read_zarr(tmp_path / "s.zarr")
    with pytest.raises(KeyError, match=r"Available tables: \['cells_table'\]"):
        scx.tl.classify_by_threshold(sdata, MARKERS)
    scx.tl.classify_by_threshold(sdata, MARKERS, table_key="cells_table", write=False)
    assert "threshold" not in read_zarr(tmp_path / "s.zarr").tables["cells_table"].uns
    scx.tl.classify_by_threshold(sdata, MARKERS, table_key="cells_table")
    back = read_zarr(tmp_path / "s.zarr").tables["cells_table"]
    assert (back.obs["threshold_cluster"].to_numpy() == truth).mean() > 0.95


def test_ks_says_it_ignores_probability_cutoff(caplog):
    adata, _ = make_counts(n=2000, frac=0.2)
    scx.tl.classify_by_threshold(adata, MARKERS, method="ks")
    default = adata.obs["threshold_cluster"].to_numpy().copy()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.classify_by_threshold(adata, MARKERS, method="ks", probability_cutoff=0.9)
    assert "probability_cutoff=0.9 is ignored by method='ks'" in caplog.text
    np.testing.assert_array_equal(adata.obs["threshold_cluster"].to_numpy(), default)
    assert "probability_cutoff" not in adata.uns["threshold"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.classify_by_threshold(adata, MARKERS, method="gmm", probability_cutoff=0.9)
    assert "ignored" not in caplog.text


def test_gmm_on_a_zero_inflated_score_points_to_ks(xenium_bone_marrow, caplog):
    """Xenium bone marrow erythroid markers: the mixture puts a component on the cells without counts, so one count
    makes a cell high (the docs' example: 18,138 cells); a warning says so and names ks."""
    adata = xenium_bone_marrow.copy()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.classify_by_threshold(adata, ["GYPA", "AHSP", "ALAS2"], method="gmm", key_added="ery")
    assert "calls every other cell high" in caplog.text and "method='ks'" in caplog.text
    score = adata.obs["ery_score"].to_numpy()
    assert adata.uns["ery"]["n_high"] == int((score > score.min()).sum())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.classify_by_threshold(adata, ["GYPA", "AHSP", "ALAS2"], method="ks", key_added="ery")
    assert "calls every other cell high" not in caplog.text


def test_gmm_on_separated_populations_does_not_warn(caplog):
    adata, _ = make_counts(n=3000)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.classify_by_threshold(adata, MARKERS)
    assert "calls every other cell high" not in caplog.text


def test_plots_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    adata, _ = make_counts(n=600)
    scx.tl.classify_by_threshold(adata, MARKERS, plot=True, plots_dir="~/plots", key_added="t")
    assert (tmp_path / "home" / "plots" / "t_threshold.png").is_file()
    assert not (tmp_path / "~").exists()  # no literal "~" folder beside it
    plt.close("all")


@pytest.mark.parametrize("layout", ["raw counts", "scanpy log1p"])
def test_genes_only_in_raw_are_read_from_raw(tmp_path, layout):
    adata, truth = make_counts(n=1000)
    expected = log1p_10k(adata, MARKERS)
    if layout == "scanpy log1p":  # normalized and log1p in raw, X subset to other genes and scaled
        adata.X = sparse.csr_matrix(np.log1p(adata.X.toarray() / adata.X.sum(axis=1).A * 1e4))
    adata.raw = adata
    adata = adata[:, 3:].copy()
    if layout == "scanpy log1p":
        adata.X = (adata.X.toarray() - adata.X.toarray().mean(0)) / adata.X.toarray().std(0)
    assert not set(MARKERS) & set(adata.var_names)
    plot = layout == "scanpy log1p"  # the figure reads the genes from raw too
    scx.tl.classify_by_threshold(adata, MARKERS, metagene="mean", plot=plot, plots_dir=tmp_path if plot else None)
    assert adata.uns["threshold"]["expression"]["source"] == "raw.X"
    np.testing.assert_allclose(adata.obs["threshold_score"], expected.mean(axis=1), rtol=1e-4, atol=1e-5)
    assert accuracy(adata, "threshold", truth) > 0.96
    assert (tmp_path / "threshold_threshold.png").is_file() == plot
    with pytest.raises(KeyError, match=r"\(43 genes in raw\.X"):
        scx.tl.classify_by_threshold(adata, ["MK0", "NOPE"])


def test_feature_beyond_float32_precision_says_so():
    adata, _ = make_counts(n=300)
    rng = np.random.default_rng(0)
    adata.obs["offset"] = 1e9 + rng.normal(0, 1, adata.n_obs)  # varies, but not in float32
    with pytest.raises(
        ValueError, match=r"feature 'offset' is the same .* below float32 precision.*subtract an offset"
    ):
        scx.tl.classify_by_threshold(adata, "offset", method="ks")
    assert "threshold" not in adata.uns
    adata.obs["offset"] -= adata.obs["offset"].min()
    scx.tl.classify_by_threshold(adata, "offset", method="ks")
    assert adata.uns["threshold"]["n_cells"] == adata.n_obs


def test_plot_bad_max_points_and_missing_obs_feature():
    import matplotlib.pyplot as plt

    adata, _ = make_counts(n=500)
    adata.obs["mk0_counts"] = adata.X[:, 0].toarray().ravel()
    scx.tl.classify_by_threshold(adata, ["MK1", "mk0_counts"], method="ks")
    n_open = len(plt.get_fignums())
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match=r"max_points must be a whole number >= 1"):
            scx.pl.threshold(adata, max_points=bad)
    del adata.obs["mk0_counts"]
    with pytest.raises(KeyError, match=r"used the obs column\(s\) \['mk0_counts'\], which are no longer in the table"):
        scx.pl.threshold(adata)
    assert len(plt.get_fignums()) == n_open


# --------------------------------------------------------------------------------------------------------------------
# ks: discrete scores, a marker expressed in every cell


def test_ks_marker_in_every_cell_is_not_split():
    # Every cell expresses the marker (one Poisson population, no zeros): the steps of the discrete counts were
    # counted as a departure from the bulk, and 1601 of 3000 cells (53 %) were called a high "minority".
    rng = np.random.default_rng(0)
    n = 3000
    x = rng.poisson(1.0, (n, 20)).astype(np.float32)
    x[:, 0] = rng.poisson(20, n)
    adata = ad.AnnData(
        sparse.csr_matrix(x),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(20)]),
    )
    scx.tl.classify_by_threshold(adata, "G0", method="ks")
    fit = adata.uns["threshold"]["fit"]
    assert not fit["zero_inflated"] and fit["side"] == "above_floor"
    assert adata.uns["threshold"]["n_high"] == n - 1  # every cell above the lowest score, with a warning


@pytest.mark.parametrize(
    ("values", "was"),
    [
        (lambda r: r.poisson(20, 3000).astype(float), "high_minority, 21 % high"),
        (lambda r: np.log1p(r.poisson(20, 3000)), "high_minority, 70 % high"),
        (lambda r: r.poisson(5, 3000).astype(float), "low_minority, 56 % high"),
    ],
    ids=["counts", "log1p_counts", "few_counts"],
)
def test_ks_discrete_single_population_is_not_split(values, was):
    from spatialcx.tl._threshold import _split_ks

    x = values(np.random.default_rng(0))
    threshold, _, info = _split_ks(x, random_state=0)
    assert info["side"] == "above_floor", was
    assert threshold == x.min()


def test_ks_high_minority_is_above_the_bulk_median():
    from spatialcx.tl._threshold import _split_ks

    # a discrete bulk (1 to ~10 counts over a library of ~90) without a minority: its steps once made a "high
    # minority" of 69 % of the cells
    rng = np.random.default_rng(0)
    n = 20_000
    counts = rng.poisson(5, n) + 1
    x = np.log1p(counts / (counts + rng.poisson(90, n)) * 1e4).astype(np.float32).astype(np.float64)
    threshold, _, info = _split_ks(x, random_state=0)
    assert info["side"] != "high_minority" or (x > threshold).mean() < 0.5
    # a real high minority is still found
    truth = rng.random(n) < 0.1
    y = np.where(truth, rng.normal(5, 1, n), rng.normal(0, 1, n))
    threshold, _, info = _split_ks(y, random_state=0)
    assert info["side"] == "high_minority" and ((y > threshold) == truth).mean() > 0.97


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (None, TypeError, r"max_fit_cells must be a whole number, got NoneType None"),
        (1000.5, ValueError, r"max_fit_cells must be a whole number >= 10, got 1000.5"),
        (5, ValueError, r"max_fit_cells must be a whole number >= 10, got 5"),
    ],
)
def test_max_fit_cells_is_checked(value, exc, match):
    # were: int(None)'s TypeError, and 1000.5 accepted as 1000
    adata, _ = make_counts(n=300)
    with pytest.raises(exc, match=match):
        scx.tl.classify_by_threshold(adata, MARKERS, max_fit_cells=value)
    _unchanged(adata, [])


@pytest.mark.parametrize("seed", [1, 3, 5, 6])
def test_ks_discrete_values_are_not_modes_of_their_own(seed):
    from spatialcx.tl._threshold import _split_ks

    # log1p of one Poisson population: the density estimate resolved each integer as a mode, so the lowest values
    # were split off as a low minority with a mode of its own (seeds 1, 3, 5, 6 of 8)
    x = np.log1p(np.random.default_rng(seed).poisson(20, 3000)).astype(float)
    _, _, info = _split_ks(x, random_state=0)
    assert info["statistic_low"] > info["critical_value"]  # the steps still depart from a Gaussian ...
    assert info["side"] == "above_floor"  # ... but they are one population
