from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialcx as scx
from spatialcx.pp._balance import (
    cap_and_fill,
    cap_to_total,
    read_target_proportions,
    resolve_target_proportions,
    split_across_sources,
)


# ------------------------------------------------------------------------------------------------ pure arithmetic
def test_worked_example_proportional_and_equal():
    counts = pd.DataFrame({"A": [30_000], "B": [5_000]}, index=["macrophage"])
    prop = cap_and_fill(counts, max_cells_per_type=10_000, source_balance="proportional")
    equal = cap_and_fill(counts, max_cells_per_type=10_000, source_balance="equal")
    assert prop.loc["macrophage"].tolist() == [8_571, 1_429]
    assert equal.loc["macrophage"].tolist() == [5_000, 5_000]


def test_floor_does_not_overshoot_the_cap():
    # the published implementation gave 995 + 50 = 1,045 here
    out = split_across_sources(np.array([9_950, 50]), 1_000, min_cells_per_source=50)
    assert out.tolist() == [950, 50]
    assert out.sum() == 1_000


def test_a_cap_below_the_floor_is_still_a_cap():
    counts = pd.DataFrame({"A": [300, 30]}, index=["T", "NK"])
    out = cap_and_fill(counts, max_cells_per_type=20)  # min_cells_per_type=50 by default
    assert out["A"].tolist() == [20, 20]
    out = cap_and_fill(counts, max_cells_per_type=100, min_cells_per_type=50)
    assert out["A"].tolist() == [100, 30]


def test_equal_redistributes_shortfall_to_sources_with_spare_cells():
    out = split_across_sources(np.array([30_000, 3_000, 100]), 10_000, source_balance="equal", min_cells_per_source=50)
    # 10,000 / 3 = 3,333 each; source 2 has 3,000 and source 3 has 100, the rest goes to source 1
    assert out.tolist() == [6_900, 3_000, 100]


def test_floors_larger_than_target_are_shared_equally():
    out = split_across_sources(np.array([500, 500, 500, 20]), 120, min_cells_per_source=50)
    assert out.sum() == 120
    assert out.tolist() == [34, 33, 33, 20]


def test_target_above_available_takes_everything():
    out = split_across_sources(np.array([10, 20]), 1_000)
    assert out.tolist() == [10, 20]


@pytest.mark.parametrize("balance", ["proportional", "equal"])
def test_allocation_invariants_on_random_tables(balance):
    rng = np.random.default_rng(1)
    for _ in range(300):
        n_types, n_src = rng.integers(1, 6), rng.integers(1, 5)
        counts = pd.DataFrame(
            rng.integers(0, 3) * rng.integers(0, 20_000, (n_types, n_src)) + rng.integers(0, 300, (n_types, n_src)),
            index=[f"t{i}" for i in range(n_types)],
            columns=[f"s{j}" for j in range(n_src)],
        )
        cap = int(rng.integers(1, 12_000))
        floor = int(rng.integers(0, 200))
        alloc = cap_and_fill(
            counts, max_cells_per_type=cap, min_cells_per_type=0, source_balance=balance, min_cells_per_source=floor
        )
        avail = counts.to_numpy()
        a = alloc.to_numpy()
        assert (a >= 0).all() and (a <= avail).all()
        assert (a.sum(axis=1) == np.minimum(avail.sum(axis=1), cap)).all()  # exactly the cap, never more
        floors = np.minimum(avail, floor)
        feasible = floors.sum(axis=1) <= np.minimum(avail.sum(axis=1), cap)
        assert (a[feasible] >= floors[feasible]).all()


def test_proportional_split_follows_shares():
    out = split_across_sources(np.array([6_000, 3_000, 1_000]), 5_000, min_cells_per_source=0)
    assert out.tolist() == [3_000, 1_500, 500]


def test_cap_to_total_keeps_rare_types_whole():
    counts = pd.Series({"a": 10_000, "b": 500, "c": 50, "d": 3_000})
    kept = cap_to_total(counts, 2_000)
    assert kept.sum() == 2_000
    assert kept["c"] == 50 and kept["b"] == 500
    assert kept["a"] == kept["d"] == 725
    assert cap_to_total(counts, None).equals(counts.sort_index())


# ------------------------------------------------------------------------------------------ target proportions
@pytest.fixture
def three_types():
    return pd.DataFrame({"A": [4_000, 3_000, 1_000], "B": [4_000, 1_000, 1_000]}, index=["T", "B", "NK"])


def _write_props(tmp_path, fmt, props):
    if fmt == "json":
        path = tmp_path / "props.json"
        path.write_text(json.dumps(props))
        return path
    path = tmp_path / "props.csv"
    pd.DataFrame({"cell_type": list(props), "proportion": list(props.values())}).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("fmt", ["dict", "series", "table", "json", "csv"])
def test_target_proportions_all_formats(tmp_path, three_types, fmt):
    props = {"T": 0.5, "B": 0.3, "NK": 0.2}
    if fmt == "dict":
        source = props
    elif fmt == "series":
        source = pd.Series(props)
    elif fmt == "table":  # the CSV file's table, e.g. from pd.read_csv
        source = pd.DataFrame({"cell_type": list(props), "proportion": list(props.values())})
    else:
        source = _write_props(tmp_path, fmt, props)
    assert read_target_proportions(source) == props
    alloc = cap_and_fill(three_types, max_cells_per_type=5_000, target_proportions=source, min_cells_per_type=0)
    totals = alloc.sum(axis=1)
    # output size without proportions: 5,000 + 4,000 + 2,000 = 11,000; NK can only give its 2,000
    assert totals["T"] == 5_500 and totals["B"] == 3_300 and totals["NK"] == 2_000
    assert (alloc.to_numpy() <= three_types.to_numpy()).all()


def test_partial_proportions_leave_the_rest_to_the_other_types(three_types):
    alloc = cap_and_fill(three_types, max_cells_per_type=5_000, target_proportions={"NK": 0.1}, min_cells_per_type=0)
    totals = alloc.sum(axis=1)
    assert totals["NK"] == 1_100  # 10 % of 11,000
    # 9,900 are left for T and B, but the cap holds for types without a proportion
    assert totals["T"] == 5_000 and totals["B"] == 4_000


def test_unnamed_types_share_the_rest_in_proportion_to_their_capped_sizes():
    counts = pd.DataFrame({"A": [10_000, 10_000, 10_000]}, index=["T", "B", "NK"])
    alloc = cap_and_fill(counts, max_cells_per_type=6_000, target_proportions={"NK": 0.5}, min_cells_per_type=0)
    # N = 18,000: NK 9,000 (above the cap: proportions override it), T and B share 9,000 equally
    assert alloc["A"].tolist() == [4_500, 4_500, 9_000]


def test_min_cells_per_type_floor_applies_to_small_targets(three_types):
    alloc = cap_and_fill(three_types, max_cells_per_type=5_000, target_proportions={"NK": 0.001}, min_cells_per_type=50)
    assert alloc.sum(axis=1)["NK"] == 50


@pytest.mark.parametrize(
    ("props", "match"),
    [
        ({"T": 0.5, "Mast": 0.1}, "Mast"),
        ({"T": 0.7, "B": 0.4}, "at most 1"),
        ({"T": 0.6, "B": 0.4}, "leave out \\['NK'\\]"),
        ({"T": 0.5, "B": 0.3, "NK": 0.1}, "name every cell type but sum to 0.9"),
        ({"T": -0.1}, "between 0 and 1"),
        ({"T": "lots"}, "not a number"),
    ],
)
def test_bad_target_proportions_are_clear_errors(props, match):
    with pytest.raises(ValueError, match=match):
        resolve_target_proportions(props, ["T", "B", "NK"])


def test_bad_proportion_files(tmp_path):
    bad_csv = tmp_path / "p.csv"
    bad_csv.write_text("type,share\nT,0.5\n")
    with pytest.raises(ValueError, match="cell_type,proportion"):
        read_target_proportions(bad_csv)
    bad_json = tmp_path / "p.json"
    bad_json.write_text("[0.5]")
    with pytest.raises(ValueError, match="JSON object"):
        read_target_proportions(bad_json)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_target_proportions(tmp_path / "missing.csv")
    txt = tmp_path / "p.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match=".json or .csv"):
        read_target_proportions(txt)
    table = pd.DataFrame({"cell_type": ["T", "T"], "proportion": [0.5, 0.2]})
    with pytest.raises(ValueError, match=r"lists \['T'\] more than once"):
        read_target_proportions(table)
    with pytest.raises(ValueError, match="exactly the columns cell_type,proportion"):
        read_target_proportions(table.rename(columns={"proportion": "share"}))
    with pytest.raises(TypeError, match="target_proportions is a list; give a dict"):
        read_target_proportions([("T", 0.5)])


def test_csv_proportions_read_cell_types_as_written(tmp_path):
    """A CSV names types as written: "NA" or "None" is a type (kept with exclude_labels=()), not a missing value."""
    path = tmp_path / "p.csv"
    path.write_text("cell_type,proportion\nNA,0.2\nNone,0.1\nnull,0.1\n")
    assert read_target_proportions(path) == {"NA": 0.2, "None": 0.1, "null": 0.1}
    path.write_text("cell_type,proportion\nT,\n")
    with pytest.raises(ValueError, match="Proportion of 'T' in .* is '', not a number"):
        read_target_proportions(path)


# ------------------------------------------------------------------------------------------------ AnnData layer
def _reference(counts: dict[tuple[str, str], int], extra_obs: dict | None = None) -> ad.AnnData:
    labels, sources = [], []
    for (label, source), n in counts.items():
        labels += [label] * n
        sources += [source] * n
    n = len(labels)
    obs = pd.DataFrame(
        {"original_label": pd.Categorical(labels), "reference_source": pd.Categorical(sources)},
        index=[f"c{i}" for i in range(n)],
    )
    for key, fn in (extra_obs or {}).items():
        obs[key] = fn(obs)
    adata = ad.AnnData(X=sp.csr_matrix(np.ones((n, 3), dtype=np.float32)), obs=obs)
    adata.uns["spatialcx_references"] = {
        "A": {"index": 0, "name": "A", "cells_kept": {"cell_types": ["mac"], "n_cells": [1]}},
        "B": {"index": 1, "name": "B"},
    }
    return adata


def test_subsample_balanced_draws_the_allocation():
    adata = _reference({("mac", "A"): 3_000, ("mac", "B"): 500, ("T", "A"): 200, ("T", "B"): 40})
    before = adata.obs.copy()
    out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=1_000)
    assert adata.obs.equals(before) and adata.n_obs == 3_740  # input untouched
    got = pd.crosstab(out.obs["original_label"], out.obs["reference_source"])
    assert got.loc["mac"].tolist() == [857, 143]
    assert got.loc["T"].tolist() == [200, 40]
    assert out.obs_names.is_unique and set(out.obs_names) <= set(adata.obs_names)
    # original order is kept
    pos = adata.obs_names.get_indexer(out.obs_names)
    assert (np.diff(pos) > 0).all()
    bal = out.uns["spatialcx_balance"]
    assert bal["groups"] == ["T", "mac"] and bal["sources"] == ["A", "B"]
    np.testing.assert_array_equal(bal["drawn"], [[200, 40], [857, 143]])
    used = out.uns["spatialcx_references"]["A"]["cells_used"]
    assert dict(zip(used["cell_types"], used["n_cells"])) == {"T": 200, "mac": 857}
    assert out.uns["spatialcx_references"]["B"]["cells_used"]["n_cells"] == [40, 143]


def test_subsample_balanced_is_seeded():
    adata = _reference({("mac", "A"): 3_000, ("mac", "B"): 500})
    a = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=300, random_state=3)
    b = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=300, random_state=3)
    c = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=300, random_state=4)
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.obs_names) != list(c.obs_names)


def test_float_cluster_labels_read_as_whole_numbers():
    """Labels stored as floats (cluster ids with a missing value elsewhere) read "3", as training and
    combine_references read them: target_proportions keyed "3" matched no type before ("3.0")."""
    adata = _reference({("1", "A"): 600, ("3", "A"): 600})
    adata.obs["cluster"] = adata.obs["original_label"].astype(float)
    out = scx.pp.subsample_balanced(adata, "cluster", max_cells_per_type=600, target_proportions={"1": 0.25, "3": 0.75})
    assert out.uns["spatialcx_balance"]["groups"] == ["1", "3"]
    counts = out.obs["cluster"].value_counts()
    assert counts[3.0] == 600 and counts[1.0] < 600  # the proportions applied to the types they name


def test_group_by_merges_differently_named_labels():
    names = {"CD4+ T cells": "CL:0000624", "CD4-positive, alpha-beta T cell": "CL:0000624", "B cell": "CL:0000236"}
    adata = _reference(
        {("CD4+ T cells", "A"): 600, ("CD4-positive, alpha-beta T cell", "B"): 600, ("B cell", "A"): 100},
        extra_obs={"ontology": lambda obs: obs["original_label"].map(names).astype(str)},
    )
    out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=400, group_by="ontology")
    assert (out.obs["ontology"] == "CL:0000624").sum() == 400  # one group, one cap
    assert out.obs["original_label"].value_counts()["B cell"] == 100
    assert out.uns["spatialcx_balance"]["groups"] == ["CL:0000236", "CL:0000624"]


def test_subsample_balanced_target_proportions_and_uns_round_trip(tmp_path):
    adata = _reference({("mac", "A"): 3_000, ("T", "A"): 3_000, ("NK", "B"): 3_000})
    path = tmp_path / "p.csv"
    path.write_text("cell_type,proportion\nNK,0.2\n")
    out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=1_000, target_proportions=path)
    assert out.obs["original_label"].value_counts()["NK"] == 600  # 20 % of 3,000
    out.write_h5ad(tmp_path / "b.h5ad")
    back = ad.read_h5ad(tmp_path / "b.h5ad")
    assert list(back.uns["spatialcx_balance"]["target_proportions"]["cell_types"]) == ["NK"]
    out.write_zarr(tmp_path / "b.zarr")
    assert int(ad.read_zarr(tmp_path / "b.zarr").uns["spatialcx_balance"]["n_cells"]) == out.n_obs


def test_subsample_balanced_errors():
    adata = _reference({("mac", "A"): 10})
    with pytest.raises(KeyError, match="not an obs column"):
        scx.pp.subsample_balanced(adata, "cell_type")
    with pytest.raises(ValueError, match="proportional' or 'equal"):
        scx.pp.subsample_balanced(adata, "original_label", source_balance="fair")
    adata.obs["original_label"] = adata.obs["original_label"].astype(object)
    adata.obs.iloc[0, 0] = None
    with pytest.raises(ValueError, match="no label"):
        scx.pp.subsample_balanced(adata, "original_label")


def test_without_source_column_all_cells_are_one_source():
    adata = _reference({("mac", "A"): 100, ("mac", "B"): 100})
    del adata.obs["reference_source"]
    out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=50)
    assert out.n_obs == 50
    both = _reference({("mac", "A"): 100, ("mac", "B"): 100})
    one = scx.pp.subsample_balanced(both, "original_label", max_cells_per_type=50, source_key=None)
    assert one.n_obs == 50 and one.uns["spatialcx_balance"]["sources"] == ["all"]


def test_a_misspelt_source_key_is_an_error_not_one_source():
    adata = _reference({("mac", "A"): 900, ("mac", "B"): 100})
    with pytest.raises(KeyError, match=r"source_key 'referencesource' is not an obs column; .*source_key=None"):
        scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=100, source_key="referencesource")
    out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=100, source_balance="equal")
    assert out.obs["reference_source"].value_counts().to_dict() == {"A": 50, "B": 50}


def test_cells_without_a_source_are_an_error_not_a_source_named_nan():
    adata = _reference({("mac", "A"): 100, ("mac", "B"): 100})
    adata.obs["reference_source"] = adata.obs["reference_source"].astype(object)
    adata.obs.iloc[:7, adata.obs.columns.get_loc("reference_source")] = None
    with pytest.raises(ValueError, match=r"7 cells have no source in obs\['reference_source'\]"):
        scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=50)


def test_named_proportions_never_add_up_to_more_than_the_output_size():
    counts = pd.DataFrame({"A": [100, 100, 100]}, index=["x", "y", "z"])
    # N = 3 x 11 = 33; 33/6 = 5.5 twice: rounding each half up would give 6 + 6 + 22 = 34 > 33
    props = {"x": 1 / 6, "y": 1 / 6, "z": 2 / 3}
    alloc = cap_and_fill(counts, max_cells_per_type=11, target_proportions=props, min_cells_per_type=0)
    assert alloc["A"].tolist() == [6, 5, 22]


def test_unmet_target_proportions_warn_with_the_shares_obtained(caplog):
    counts = pd.DataFrame({"A": [10_000, 100]}, index=["T", "B"])
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        alloc = cap_and_fill(counts, max_cells_per_type=5_000, target_proportions={"T": 0.5}, min_cells_per_type=0)
    # N = 5,100: T gets 2,550 as documented, B cannot take up the other 2,550 (it has 100)
    assert alloc["A"].tolist() == [2_550, 100]
    assert "cannot be met" in caplog.text and "'T' 0.962 (asked 0.5, 2550 of 2650 cells)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        cap_and_fill(counts, max_cells_per_type=100, target_proportions={"T": 0.5}, min_cells_per_type=0)
    assert "cannot be met" not in caplog.text  # N = 200: 100 + 100, met exactly


@pytest.mark.parametrize("mode", ["backed", "lazy"])
def test_subsample_balanced_reads_only_the_drawn_cells_of_a_backed_or_lazy_reference(tmp_path, mode):
    from anndata.experimental import read_lazy

    adata = _reference({("mac", "A"): 300, ("mac", "B"): 50, ("T", "A"): 40})
    adata.X = sp.csr_matrix(np.arange(adata.n_obs * 3, dtype=np.float32).reshape(-1, 3))
    adata.write_h5ad(tmp_path / "combined.h5ad")
    ondisk = (
        ad.read_h5ad(tmp_path / "combined.h5ad", backed="r")
        if mode == "backed"
        else read_lazy(tmp_path / "combined.h5ad")
    )
    kwargs = {"max_cells_per_type": 100, "min_cells_per_source": 10, "random_state": 5}
    out = scx.pp.subsample_balanced(ondisk, "original_label", **kwargs)
    expected = scx.pp.subsample_balanced(adata, "original_label", **kwargs)
    assert not out.isbacked and sp.issparse(out.X)
    assert list(out.obs_names) == list(expected.obs_names)
    np.testing.assert_array_equal(out.X.toarray(), expected.X.toarray())
    # mac: 300 + 50 cells, 100 drawn in proportion (85.7 + 14.3); T: all 40
    got = pd.crosstab(out.obs["original_label"], out.obs["reference_source"])
    assert got.loc["mac"].tolist() == [86, 14] and got.loc["T"].tolist() == [40, 0]
    assert out.uns["spatialcx_balance"]["n_cells"] == 140


def test_subsample_balanced_on_a_view_of_a_backed_reference(tmp_path):
    """A subset of a backed file (a view) is drawn from too; anndata cannot index such a view again."""
    adata = _reference({("mac", "A"): 300, ("mac", "B"): 50, ("T", "A"): 40, ("NK", "B"): 30})
    adata.X = sp.csr_matrix(np.arange(adata.n_obs * 3, dtype=np.float32).reshape(-1, 3))
    adata.write_h5ad(tmp_path / "combined.h5ad")
    backed = ad.read_h5ad(tmp_path / "combined.h5ad", backed="r")
    keep = (adata.obs["original_label"] != "NK").to_numpy()
    kwargs = {"max_cells_per_type": 100, "min_cells_per_source": 10, "random_state": 5}
    out = scx.pp.subsample_balanced(backed[keep, [2, 0]], "original_label", **kwargs)
    expected = scx.pp.subsample_balanced(adata[keep, [2, 0]].copy(), "original_label", **kwargs)
    assert not out.isbacked and out.n_obs == 140 and list(out.var_names) == ["2", "0"]
    assert list(out.obs_names) == list(expected.obs_names)
    np.testing.assert_array_equal(out.X.toarray(), expected.X.toarray())


def test_cells_used_follows_the_references_when_source_key_is_none_or_another_column():
    adata = _reference({("mac", "A"): 300, ("mac", "B"): 50, ("T", "A"): 40})
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    for source_key in (None, "donor", "reference_source"):
        out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=100, source_key=source_key)
        refs = out.uns["spatialcx_references"]
        got = {name: dict(zip(e["cells_used"]["cell_types"], e["cells_used"]["n_cells"])) for name, e in refs.items()}
        expected = pd.crosstab(out.obs["reference_source"], out.obs["original_label"])
        assert got["A"] == {t: n for t, n in expected.loc["A"].items() if n}, source_key
        assert got["B"] == {"mac": int(expected.loc["B", "mac"])} and sum(got["B"].values()) > 0, source_key
    # no column names the references: no cells_used rather than zero cells (and none left from an earlier draw)
    del adata.obs["reference_source"]
    adata.uns["spatialcx_references"]["A"]["cells_used"] = {"cell_types": ["mac"], "n_cells": [1]}
    out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=100, source_key="donor")
    assert all("cells_used" not in e for e in out.uns["spatialcx_references"].values())


def test_subsample_balanced_draw_does_not_depend_on_the_order_of_the_cells():
    """The same cells in another order (references combined the other way round, a sorted table) give the same draw."""
    adata = _reference({("mac", "A"): 3_000, ("mac", "B"): 500, ("T", "A"): 800, ("T", "B"): 90})
    kw = {"max_cells_per_type": 400, "min_cells_per_source": 20}
    first = scx.pp.subsample_balanced(adata, "original_label", **kw)
    for order in (np.random.default_rng(1).permutation(adata.n_obs), np.arange(adata.n_obs)[::-1]):
        again = scx.pp.subsample_balanced(adata[order].copy(), "original_label", **kw)
        assert set(again.obs_names) == set(first.obs_names)
        pos = adata[order].obs_names.get_indexer(again.obs_names)
        assert (np.diff(pos) > 0).all()  # still in the order of the input
    other_seed = scx.pp.subsample_balanced(adata, "original_label", random_state=1, **kw)
    assert set(other_seed.obs_names) != set(first.obs_names)
    # duplicated cell names: still a valid, seeded draw (by position)
    dup = adata.copy()
    dup.obs_names = ["x"] * dup.n_obs
    a = scx.pp.subsample_balanced(dup, "original_label", **kw)
    b = scx.pp.subsample_balanced(dup, "original_label", **kw)
    assert a.n_obs == first.n_obs and np.array_equal(a.obs["original_label"], b.obs["original_label"])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_cells_per_type": True}, TypeError),  # was a silent cap of 1 cell per type
        ({"max_cells_per_type": 10.7}, ValueError),  # was silently 10
        ({"max_cells_per_type": "100"}, TypeError),  # was silently accepted
        ({"min_cells_per_type": 2.5}, ValueError),
        ({"min_cells_per_source": False}, TypeError),
    ],
)
def test_cell_numbers_must_be_whole_numbers(kwargs, error):
    adata = _reference({("mac", "A"): 100, ("T", "B"): 100})
    with pytest.raises(error, match="whole number"):
        scx.pp.subsample_balanced(adata, "original_label", **kwargs)
    out = scx.pp.subsample_balanced(adata, "original_label", max_cells_per_type=1e1, min_cells_per_source=np.int64(5))
    assert out.n_obs == 20  # 1e1 is a whole number


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_subsample_balanced_on_read_lazy_reads_the_drawn_cells_from_disk(tmp_path, fmt, monkeypatch):
    """A lazy AnnData gives the same cells and values as in memory, read straight from the file's CSR arrays."""
    from spatialcx.io import _reference

    rng = np.random.default_rng(0)
    n = 600
    adata = ad.AnnData(
        sp.csr_matrix(rng.poisson(0.4, (n, 25)).astype(np.int32)),
        obs=pd.DataFrame(
            {"ct": pd.Categorical(rng.choice(["a", "b", "c"], n, p=[0.7, 0.2, 0.1])), "src": rng.choice(["x", "y"], n)},
            index=[f"cell{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=[f"G{i}" for i in range(25)]),
    )
    adata.layers["counts"] = adata.X.copy()
    path = tmp_path / f"r.{fmt}"
    adata.write_h5ad(path) if fmt == "h5ad" else adata.write_zarr(path)
    calls = []
    real = _reference._read_sparse_chunk
    monkeypatch.setattr(
        _reference, "_read_sparse_chunk", lambda s, block_info=None: calls.append(1) or real(s, block_info)
    )
    kwargs = {"max_cells_per_type": 60, "min_cells_per_type": 5, "source_key": "src", "random_state": 4}
    lazy = scx.pp.subsample_balanced(ad.experimental.read_lazy(path), "ct", **kwargs)
    mem = scx.pp.subsample_balanced(adata, "ct", **kwargs)
    assert calls  # read by spatialcx's reader, not anndata's blocks of 1,000 rows
    assert list(lazy.obs_names) == list(mem.obs_names)
    assert lazy.X.dtype == np.int32
    np.testing.assert_array_equal(lazy.X.toarray(), mem.X.toarray())
    np.testing.assert_array_equal(lazy.layers["counts"].toarray(), mem.layers["counts"].toarray())
    np.testing.assert_array_equal(lazy.uns["spatialcx_balance"]["drawn"], mem.uns["spatialcx_balance"]["drawn"])
