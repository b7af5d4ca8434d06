from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialcx as scx
from spatialcx._constants import DEFAULT_EXCLUDE_LABELS

HUMAN_IDS = ["ENSG00000128683", "ENSG00000136750", "ENSG00000157005", "ENSG00000075624", "ENSG00000198851"]
HUMAN_SYMBOLS = ["GAD1", "GAD2", "SST", "ACTB", "CD3E"]
MOUSE_SYMBOLS = ["Gad1", "Gad2", "Sst", "Actb", "Cd3e"]


def make_ref(labels: dict[str, int], genes: list[str], seed: int = 0, prefix: str = "c") -> ad.AnnData:
    rng = np.random.default_rng(seed)
    lab = np.repeat(list(labels), list(labels.values()))
    x = rng.poisson(2.0, (len(lab), len(genes))).astype(np.float32)
    x[:, 0] += 1  # every cell has counts over the first gene
    return ad.AnnData(
        sp.csr_matrix(x),
        obs=pd.DataFrame({"label": pd.Categorical(lab)}, index=[f"{prefix}{i}" for i in range(len(lab))]),
        var=pd.DataFrame(index=genes),
    )


def log1p_norm(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / np.where(totals == 0, 1, totals) * 1e4)


def test_combine_structure_values_and_provenance(tmp_path):
    a = make_ref({"T cell": 30, "B cell": 20}, MOUSE_SYMBOLS + ["Xist"], seed=1)
    b = make_ref({"T cell": 15, "NK cell": 25}, HUMAN_SYMBOLS, seed=2, prefix="d")
    b.write_h5ad(tmp_path / "human_ref.h5ad")
    panel = ["Sst", "Gad1", "Cd3e", "Pvalb"]
    out = scx.pp.combine_references(
        [a, f"file://{tmp_path}/human_ref.h5ad"], "label", genes=panel, min_cells_per_type=1
    )

    assert list(out.var_names) == ["Sst", "Gad1", "Cd3e"]  # shared panel genes, panel order and spelling
    assert out.n_obs == 90
    assert isinstance(out.obs["original_label"].dtype, pd.CategoricalDtype)
    assert list(out.obs["reference_source"].cat.categories) == ["ref0", "human_ref"]
    assert sp.issparse(out.X) and out.X.format == "csr" and out.X.dtype == np.float32
    counts = out.layers["counts"]
    assert counts.format == "csr" and counts.dtype == np.float32
    # raw counts are the references' own, over the shared genes
    np.testing.assert_array_equal(counts[:50].toarray(), a.X[:, [2, 0, 4]].toarray())
    np.testing.assert_array_equal(counts[50:].toarray(), b.X[:, [2, 0, 4]].toarray())
    np.testing.assert_allclose(out.X.toarray(), log1p_norm(counts.toarray()), rtol=1e-5)
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(axis=1), 1e4, rtol=1e-4)

    prov = out.uns["spatialcx_references"]
    assert list(prov) == ["ref0", "human_ref"]
    h = prov["human_ref"]
    assert h["uri"] == f"file://{tmp_path}/human_ref.h5ad" and h["checksum"].startswith("sha256:")
    assert h["n_panel_genes"] == 4 and h["n_panel_genes_found"] == 3 and h["n_genes_case_insensitive"] == 3
    assert h["expression"] == "counts" and h["expression_source"] == "X" and h["label_key"] == "label"
    assert dict(zip(h["cells_kept"]["cell_types"], h["cells_kept"]["n_cells"])) == {"NK cell": 25, "T cell": 15}
    assert prov["ref0"]["checksum"].startswith("sha256-names:")

    out.write_h5ad(tmp_path / "combined.h5ad")
    back = ad.read_h5ad(tmp_path / "combined.h5ad")
    assert int(back.uns["spatialcx_references"]["human_ref"]["n_cells"]) == 40
    out.write_zarr(tmp_path / "combined.zarr")
    assert set(ad.read_zarr(tmp_path / "combined.zarr").uns["spatialcx_references"]) == {"ref0", "human_ref"}
    # the inputs are untouched
    assert list(a.obs.columns) == ["label"] and a.X.shape == (50, 6)


def test_default_exclude_labels_exact_and_case_sensitive(caplog):
    labels = dict.fromkeys(DEFAULT_EXCLUDE_LABELS, 12)
    labels.update({"T cell": 12, "UNASSIGNED": 12, "unknown cells": 12, "Doublet cells": 12})
    ref = make_ref(labels, MOUSE_SYMBOLS)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS)
    n_excluded = 12 * len(DEFAULT_EXCLUDE_LABELS)
    assert f"reference 'ref0': {n_excluded} cells labelled" in caplog.text and "'Doublet'" in caplog.text
    assert set(out.obs["original_label"].cat.categories) == {"T cell", "UNASSIGNED", "unknown cells", "Doublet cells"}
    excluded = out.uns["spatialcx_references"]["ref0"]["excluded_labels"]
    assert set(excluded["labels"]) == set(DEFAULT_EXCLUDE_LABELS) and set(excluded["n_cells"]) == {12}
    kept_all = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, exclude_labels=[])
    assert kept_all.n_obs == ref.n_obs


def test_missing_labels_are_dropped():
    ref = make_ref({"T cell": 20, "B cell": 20}, MOUSE_SYMBOLS)
    ref.obs["label"] = ref.obs["label"].astype(object)
    ref.obs.iloc[:5, 0] = np.nan
    out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS)
    assert out.n_obs == 35 and out.uns["spatialcx_references"]["ref0"]["n_cells_labelled"] == 35
    # the same missing labels once written out as text (astype(str) of NaN / pd.NA) are no cell type either
    # (missing, not an excluded label: a list of exclude_labels of one's own does not bring them back)
    for missing in (np.nan, pd.NA):
        ref.obs["label"] = ref.obs["label"].astype(object)
        ref.obs.iloc[:5, 0] = missing
        ref.obs["label"] = ref.obs["label"].astype(str)
        for exclude in ({}, {"exclude_labels": ["Unknown"]}):
            out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, min_cells_per_type=1, **exclude)
            assert set(out.obs["original_label"].cat.categories) == {"T cell", "B cell"} and out.n_obs == 35


def test_min_cells_per_type_removes_or_warns(caplog):
    ref = make_ref({"T cell": 40, "rare": 4}, MOUSE_SYMBOLS)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, min_cells_per_type=10)
    assert list(out.obs["original_label"].cat.categories) == ["T cell"]
    assert "Removing 1 cell types" in caplog.text and "'rare' (4)" in caplog.text
    assert out.uns["spatialcx_combine"]["removed_types"] == ["rare"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        kept = scx.pp.combine_references(
            ref, "label", genes=MOUSE_SYMBOLS, min_cells_per_type=10, filter_min_cells=False
        )
    assert kept.obs["original_label"].value_counts()["rare"] == 4
    assert "Keeping 1 cell types" in caplog.text


def test_min_cells_counts_across_references():
    a = make_ref({"T cell": 6}, MOUSE_SYMBOLS)
    b = make_ref({"T cell": 6}, MOUSE_SYMBOLS, prefix="d")
    out = scx.pp.combine_references([a, b], "label", genes=MOUSE_SYMBOLS, min_cells_per_type=10)
    assert out.n_obs == 12


def test_max_cells_per_ref_caps_large_types_first_and_is_seeded():
    ref = make_ref({"big": 500, "mid": 60, "small": 15}, MOUSE_SYMBOLS)
    out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=100, random_state=7)
    counts = out.obs["original_label"].value_counts()
    assert counts["small"] == 15 and counts["big"] == 43 and counts["mid"] == 42
    again = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=100, random_state=7)
    assert list(again.obs_names) == list(out.obs_names)
    other = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=100, random_state=8)
    assert list(other.obs_names) != list(out.obs_names)


def test_types_too_small_to_keep_take_no_share_of_max_cells_per_ref():
    """30 types of 3 cells are removed (min_cells_per_type=10): the 100-cell budget goes to the type that stays."""
    ref = make_ref({"big": 500, **{f"rare{i}": 3 for i in range(30)}}, MOUSE_SYMBOLS)
    out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=100, min_cells_per_type=10)
    assert out.obs["original_label"].value_counts().to_dict() == {"big": 100}
    removed = out.uns["spatialcx_combine"]["removed_types"]
    assert len(removed) == 30 and "rare0" in removed
    kept = scx.pp.combine_references(
        ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=100, min_cells_per_type=10, filter_min_cells=False
    )
    assert kept.n_obs == 100 and kept.obs["original_label"].value_counts()["rare0"] == 3  # rare types kept whole


def test_max_cells_per_ref_never_removes_a_type_that_has_enough_cells(caplog):
    """Three types of 100 cells capped to 15 cells in all: 5 each, below min_cells_per_type=10, but not removed."""
    ref = make_ref({"A": 100, "B": 100, "C": 100}, MOUSE_SYMBOLS)
    x = ref.X.toarray()
    x[ref.obs["label"].to_numpy() == "C", 0] = 0  # C: 100 cells, 5 read, some of them without counts
    x[ref.obs["label"].to_numpy() == "C", 1:] = np.repeat([[0], [1]], 50, axis=0)
    ref.X = sp.csr_matrix(x)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=15, min_cells_per_type=10)
    counts = out.obs["original_label"].value_counts()
    assert counts["A"] == counts["B"] == 5 and 0 < counts["C"] < 5
    assert out.uns["spatialcx_combine"]["removed_types"] == []
    assert "Removing" not in caplog.text
    assert "max_cells_per_ref=15 leaves 3 cell types with fewer than min_cells_per_type=10 cells" in caplog.text
    assert "'A' (5 of 100)" in caplog.text


def test_target_proportions_of_a_type_removed_as_too_small_say_so():
    a = make_ref({"T cell": 40, "NK cell": 6}, MOUSE_SYMBOLS)
    b = make_ref({"T cell": 30, "B cell": 20}, MOUSE_SYMBOLS, prefix="d")
    out = scx.pp.combine_references([a, b], "label", genes=MOUSE_SYMBOLS, min_cells_per_type=10)
    with pytest.raises(
        ValueError, match=r"names \['NK cell'\], which combine_references removed.*min_cells_per_type=10"
    ):
        scx.pp.subsample_balanced(out, "original_label", target_proportions={"NK cell": 0.2})
    with pytest.raises(ValueError, match=r"names \['Mast cell'\], which are not among the cell types present"):
        scx.pp.subsample_balanced(out, "original_label", target_proportions={"Mast cell": 0.2})


def test_real_reference_capped_below_min_cells_per_type_keeps_its_types(shared_data):
    path = shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad")
    out = scx.pp.combine_references(path, "cell_type_author", max_cells_per_ref=100)  # 13 types of 69 to 100 cells
    assert out.n_obs == 100 and out.obs["original_label"].nunique() == 13
    assert out.obs["original_label"].value_counts().between(7, 8).all()


def test_whole_number_labels_held_as_floats_read_as_integers():
    ref = make_ref({"1": 20, "2": 20}, MOUSE_SYMBOLS)
    ref.obs["label"] = ref.obs["label"].astype(float)
    ref.obs.iloc[0, ref.obs.columns.get_loc("label")] = np.nan
    out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, min_cells_per_type=1)
    assert sorted(out.obs["original_label"].cat.categories) == ["1", "2"] and out.n_obs == 39


def test_ensembl_indexed_references(tmp_path):
    with_feature = make_ref({"T cell": 20}, HUMAN_IDS, seed=3)
    with_feature.var["feature_name"] = HUMAN_SYMBOLS
    with_feature.var_names = [f"{i}.5" for i in HUMAN_IDS]  # versioned ids
    table_only = make_ref({"T cell": 20}, HUMAN_IDS, seed=4, prefix="d")
    table_only.write_h5ad(tmp_path / "table_only.h5ad")
    out = scx.pp.combine_references(
        {"cxg": with_feature, "plain": tmp_path / "table_only.h5ad"}, "label", genes=["CD3E", "GAD1", "ACTB"]
    )
    assert list(out.var_names) == ["CD3E", "GAD1", "ACTB"]
    np.testing.assert_array_equal(out.layers["counts"][:20].toarray(), with_feature.X[:, [4, 0, 3]].toarray())
    np.testing.assert_array_equal(out.layers["counts"][20:].toarray(), table_only.X[:, [4, 0, 3]].toarray())
    prov = out.uns["spatialcx_references"]
    assert prov["cxg"]["gene_names"] == "feature_name"
    assert prov["plain"]["gene_names"] == "gene_table:homo_sapiens"


def test_counts_in_raw_and_layers_are_found(tmp_path):
    raw_ref = make_ref({"T cell": 20, "B cell": 20}, MOUSE_SYMBOLS)
    truth = raw_ref.X.toarray()
    raw_ref.raw = raw_ref.copy()
    raw_ref = raw_ref[:, :3].copy()
    raw_ref.X = sp.csr_matrix(log1p_norm(truth)[:, :3].astype(np.float32))
    layer_ref = make_ref({"T cell": 20}, MOUSE_SYMBOLS, seed=5, prefix="d")
    layer_truth = layer_ref.X.toarray()
    layer_ref.layers["counts"] = layer_ref.X.copy()
    layer_ref.X = sp.csr_matrix(log1p_norm(layer_truth).astype(np.float32))
    layer_ref.write_h5ad(tmp_path / "layer.h5ad")
    out = scx.pp.combine_references([raw_ref, tmp_path / "layer.h5ad"], "label", genes=["Actb", "Gad1"])
    np.testing.assert_array_equal(out.layers["counts"][:40].toarray(), truth[:, [3, 0]])
    np.testing.assert_array_equal(out.layers["counts"][40:].toarray(), layer_truth[:, [3, 0]])
    prov = out.uns["spatialcx_references"]
    assert prov["ref0"]["expression_source"] == "raw.X"
    assert prov["layer"]["expression_source"] == "layers['counts']"


def test_reference_with_only_log1p_10k_data():
    ref = make_ref({"T cell": 30}, MOUSE_SYMBOLS)
    counts = ref.X.toarray()
    ref.X = sp.csr_matrix(log1p_norm(counts).astype(np.float32))
    out = scx.pp.combine_references(ref, "label", genes=["Sst", "Gad1"])
    assert out.uns["spatialcx_references"]["ref0"]["expression"] == "log1p"
    # same training values as from the counts themselves
    np.testing.assert_allclose(out.X.toarray(), log1p_norm(counts[:, [2, 0]]), rtol=1e-4, atol=1e-5)


def test_cells_without_counts_over_shared_genes_are_dropped():
    ref = make_ref({"T cell": 30}, MOUSE_SYMBOLS)
    x = ref.X.toarray()
    x[:4, 1:3] = 0
    ref.X = sp.csr_matrix(x)
    out = scx.pp.combine_references(ref, "label", genes=["Gad2", "Sst"])
    assert out.n_obs == 26 and out.uns["spatialcx_references"]["ref0"]["n_cells_without_counts"] == 4
    assert (np.asarray(out.layers["counts"].sum(axis=1)).ravel() > 0).all()


def test_genes_none_uses_genes_shared_by_all_references():
    a = make_ref({"T cell": 20}, ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K"])
    b = make_ref({"B cell": 20}, ["K", "J", "I", "H", "G", "F", "E", "D", "C", "B", "Z"], prefix="d")
    out = scx.pp.combine_references([a, b], "label")
    assert list(out.var_names) == ["B", "C", "D", "E", "F", "G", "H", "I", "J", "K"]


def test_errors_are_clear(tmp_path):
    ref = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    with pytest.raises(ValueError, match=r"Only 0 of 20 panel genes.*ref0: 0/20"):
        scx.pp.combine_references(ref, "label", genes=[f"Foo{i}" for i in range(20)])
    with pytest.raises(KeyError, match="'cell_type' is not an obs column"):
        scx.pp.combine_references(ref, "cell_type", genes=MOUSE_SYMBOLS)
    with pytest.raises(ValueError, match="2 references but 3 label keys"):
        scx.pp.combine_references([ref, ref], ["label", "label", "label"], genes=MOUSE_SYMBOLS)
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        scx.pp.combine_references(tmp_path / "nope.h5ad", "label", genes=MOUSE_SYMBOLS)
    only_junk = make_ref({"Unknown": 20}, MOUSE_SYMBOLS)
    with pytest.raises(ValueError, match="no usable labels"):
        scx.pp.combine_references(only_junk, "label", genes=MOUSE_SYMBOLS)


def test_per_reference_label_keys_and_unique_names(tmp_path):
    a = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    b = make_ref({"B cell": 20}, MOUSE_SYMBOLS, prefix="c")  # same cell names as a
    b.obs = b.obs.rename(columns={"label": "ann_finest_level"})
    a.write_h5ad(tmp_path / "x.h5ad")
    out = scx.pp.combine_references(
        [tmp_path / "x.h5ad", b, tmp_path / "x.h5ad"], ["label", "ann_finest_level", "label"]
    )
    assert list(out.obs["reference_source"].cat.categories) == ["x", "ref1", "x-1"]
    assert out.obs_names.is_unique
    assert out.uns["spatialcx_references"]["ref1"]["label_key"] == "ann_finest_level"


def test_real_hypothalamus_reference(shared_data, tmp_path):
    path = shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad")
    query = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "merfish_query.h5ad"))
    panel = list(query.var_names)
    out = scx.pp.combine_references(f"file://{path}", "cell_type_author", genes=panel)
    full = ad.read_h5ad(path)
    assert list(out.var_names) == panel
    sub = full[out.obs_names, panel]
    np.testing.assert_array_equal(out.layers["counts"].toarray(), sub.X.toarray())
    # 14 author labels; "Ambiguous" (100 cells) is not a cell type and is left out by default
    assert out.obs["original_label"].nunique() == 13 and "Ambiguous" not in set(out.obs["original_label"])
    prov = out.uns["spatialcx_references"]["reference_scrna"]
    assert list(prov["excluded_labels"]["labels"]) == ["Ambiguous"] and list(prov["excluded_labels"]["n_cells"]) == [
        100
    ]
    assert out.n_obs == full.n_obs - 100 - prov["n_cells_without_counts"]
    balanced = scx.pp.subsample_balanced(out, "original_label", max_cells_per_type=50, min_cells_per_type=10)
    assert balanced.obs["original_label"].value_counts().max() == 50
    used = balanced.uns["spatialcx_references"]["reference_scrna"]["cells_used"]
    assert sum(used["n_cells"]) == balanced.n_obs


def test_lazy_reference_from_read_reference(tmp_path):
    ref = make_ref({"T cell": 200, "B cell": 30}, MOUSE_SYMBOLS)
    ref.write_h5ad(tmp_path / "atlas.h5ad")
    lazy = scx.io.read_reference(
        tmp_path / "atlas.h5ad", label_key="label", genes=["Sst", "Gad1", "Actb"], max_cells=100
    )
    out = scx.pp.combine_references(lazy, "label", genes=["Gad1", "Sst"])
    assert out.n_obs == 100 and out.obs["original_label"].value_counts()["B cell"] == 30
    prov = out.uns["spatialcx_references"]["atlas"]
    assert prov["uri"] == str(tmp_path / "atlas.h5ad") and prov["checksum"].startswith("sha256:")
    np.testing.assert_array_equal(out.layers["counts"].toarray(), ref[out.obs_names, ["Gad1", "Sst"]].X.toarray())


def test_real_starmap_na_labels_are_excluded(shared_data):
    path = shared_data("starmap_mpfc", "starmap_mpfc.h5ad")
    full = ad.read_h5ad(path)
    n_na = int((full.obs["cell_type_author"].astype(str) == "NA").sum())
    assert n_na > 0
    out = scx.pp.combine_references(path, "cell_type_author", min_cells_per_type=1)
    assert "NA" not in set(out.obs["original_label"].cat.categories)
    excluded = out.uns["spatialcx_references"]["starmap_mpfc"]["excluded_labels"]
    assert dict(zip(excluded["labels"], excluded["n_cells"])) == {"NA": n_na}
    assert list(out.var_names) == list(full.var_names)  # genes=None: all genes of the single reference


def test_labels_are_stripped_and_empty_labels_dropped(caplog):
    a = make_ref({"T cell": 20, "B cell": 20}, MOUSE_SYMBOLS)
    b = make_ref({"T cell ": 20, " B cell": 20, "": 15, " ": 12, " Unknown": 10}, MOUSE_SYMBOLS, seed=1, prefix="d")
    b.obs["label"] = b.obs["label"].astype(object)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references([a, b], "label", genes=MOUSE_SYMBOLS)
    got = out.obs.groupby(["reference_source", "original_label"], observed=True).size().to_dict()
    assert got == {("ref0", "B cell"): 20, ("ref0", "T cell"): 20, ("ref1", "B cell"): 20, ("ref1", "T cell"): 20}
    assert (
        "27 cells with an empty or missing label ('', 'nan', '<NA>') are left out" in caplog.text
        and "'T cell ' -> 'T cell'" in caplog.text
    )
    prov = out.uns["spatialcx_references"]["ref1"]
    assert dict(zip(prov["excluded_labels"]["labels"], prov["excluded_labels"]["n_cells"])) == {"Unknown": 10}
    assert prov["n_cells_labelled"] == 40
    assert list(b.obs["label"].iloc[:1]) == ["T cell "]  # the input is untouched


def test_labels_differing_only_in_case_are_kept_apart_with_a_warning(caplog):
    a = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    b = make_ref({"T Cell": 15}, MOUSE_SYMBOLS, prefix="d")
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references([a, b], "label", genes=MOUSE_SYMBOLS)
    assert out.obs["original_label"].value_counts().to_dict() == {"T cell": 20, "T Cell": 15}
    assert "differ only in case" in caplog.text and "'T Cell' (15 cells) / 'T cell' (20 cells)" in caplog.text


def test_nullable_string_labels_with_na():
    ref = make_ref({"T cell": 20, "B cell": 20}, MOUSE_SYMBOLS)
    ref.obs["label"] = ref.obs["label"].astype("string")
    ref.obs.iloc[:3, 0] = pd.NA
    out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS)
    assert out.obs["original_label"].value_counts().to_dict() == {"B cell": 20, "T cell": 17}


def test_genes_as_a_table_and_a_single_string():
    ref = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    panel = ad.AnnData(
        np.zeros((2, 4), dtype=np.float32), var=pd.DataFrame(index=["Sst", "NegControlProbe_1", "Gad1", "BLANK_2"])
    )
    out = scx.pp.combine_references(ref, "label", genes=panel)
    assert list(out.var_names) == ["Sst", "Gad1"]  # the panel's genes, control probes left out
    with pytest.raises(TypeError, match=r"not a single string; pass genes=\['Gad1'\]"):
        scx.pp.combine_references(ref, "label", genes="Gad1")


def test_bad_arguments_name_what_was_found():
    ref = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    with pytest.raises(ValueError, match="output_key and source_key are both 'x'"):
        scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, output_key="x", source_key="x")
    with pytest.raises(TypeError, match="Reference 1 is a ndarray"):
        scx.pp.combine_references([ref, np.zeros((3, 3))], "label", genes=MOUSE_SYMBOLS)
    with pytest.raises(TypeError, match="label_keys is None"):
        scx.pp.combine_references(ref, None, genes=MOUSE_SYMBOLS)
    import spatialdata as sd  # a dependency of spatialcx

    with pytest.raises(TypeError, match=r"Reference 0 is a SpatialData.*sdata.tables\['table'\]"):
        scx.pp.combine_references(sd.SpatialData(tables={"table": ref}), "label", genes=MOUSE_SYMBOLS)


def test_errors_from_one_reference_name_it():
    good = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    unlabelled = make_ref({"T cell": 20}, MOUSE_SYMBOLS, prefix="d")
    del unlabelled.obs["label"]
    with pytest.raises(KeyError, match=r"Reference 1 \(label key 'label'\): label_key 'label' is not an obs column"):
        scx.pp.combine_references([good, unlabelled], "label", genes=MOUSE_SYMBOLS)
    scaled = make_ref({"T cell": 20}, MOUSE_SYMBOLS, prefix="e")
    scaled.X = sp.csr_matrix(scaled.X.toarray() - 1.5)
    with pytest.raises(ValueError, match=r"Reference 'atlas' \(label key 'label'\): No usable expression"):
        scx.pp.combine_references({"good": good, "atlas": scaled}, "label", genes=MOUSE_SYMBOLS)


def test_backed_reference_is_named_after_its_file(tmp_path):
    make_ref({"T cell": 20}, MOUSE_SYMBOLS).write_h5ad(tmp_path / "lung_atlas.h5ad")
    backed = ad.read_h5ad(tmp_path / "lung_atlas.h5ad", backed="r")
    out = scx.pp.combine_references([backed, make_ref({"T cell": 20}, MOUSE_SYMBOLS, prefix="d")], "label")
    assert list(out.obs["reference_source"].cat.categories) == ["lung_atlas", "ref1"]
    assert backed.isbacked and backed.file.is_open  # still usable


def test_three_references_counts_by_hand(tmp_path):
    a = make_ref({"T cell": 300, "B cell": 40, "NK cell": 8}, MOUSE_SYMBOLS, seed=1, prefix="a")
    b = make_ref({"T cell": 100, "Monocyte": 500, "NK cell": 5}, HUMAN_SYMBOLS, seed=2, prefix="b")
    b.obs = b.obs.rename(columns={"label": "cell_type"})
    c = make_ref({"T cell": 20, "Unknown": 30}, MOUSE_SYMBOLS, seed=3, prefix="c")
    c.write_zarr(tmp_path / "c.zarr")
    refs = {"A": a, "B": b, "C": tmp_path / "c.zarr"}
    keys = {"A": "label", "B": "cell_type", "C": "label"}
    out = scx.pp.combine_references(refs, keys, genes=MOUSE_SYMBOLS, max_cells_per_ref=200, random_state=3)
    got = out.obs.groupby(["reference_source", "original_label"], observed=True).size().to_dict()
    # A: 348 cells > 200, cap c with min(300, c) + 40 + 8 = 200 -> c = 152
    # B: 605 > 200, min(100, c) + min(500, c) + 5 = 200 -> c = 97.5: 97 + 98 (the tie goes to the first, "Monocyte")
    # C: the 30 "Unknown" are excluded; NK: 8 + 5 = 13 >= min_cells_per_type=10, kept
    assert got == {
        ("A", "B cell"): 40,
        ("A", "NK cell"): 8,
        ("A", "T cell"): 152,
        ("B", "Monocyte"): 98,
        ("B", "NK cell"): 5,
        ("B", "T cell"): 97,
        ("C", "T cell"): 20,
    }
    balanced = scx.pp.subsample_balanced(
        out, "original_label", max_cells_per_type=100, min_cells_per_source=10, random_state=3
    )
    got = pd.crosstab(balanced.obs["original_label"], balanced.obs["reference_source"])
    # T cell: 152 + 97 + 20, 100 drawn: C's share (7.4) is lifted to its floor of 10, A and B share the other 90
    # as 152 : 97 (54.9 + 35.1) -> 55 + 35 + 10
    assert got.loc["T cell"].tolist() == [55, 35, 10]
    assert got.loc["Monocyte"].tolist() == [0, 98, 0] and got.loc["B cell"].tolist() == [40, 0, 0]
    assert got.loc["NK cell"].tolist() == [8, 5, 0]
    again = scx.pp.subsample_balanced(
        scx.pp.combine_references(refs, keys, genes=MOUSE_SYMBOLS, max_cells_per_ref=200, random_state=3),
        "original_label",
        max_cells_per_type=100,
        min_cells_per_source=10,
        random_state=3,
    )
    assert list(again.obs_names) == list(balanced.obs_names)


def test_random_state_none_or_a_generator_is_accepted():
    ref = make_ref({"big": 200, "small": 15}, MOUSE_SYMBOLS)
    unseeded = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=50, random_state=None)
    assert unseeded.n_obs == 50 and unseeded.uns["spatialcx_combine"]["random_state"] == -1
    kwargs = {"genes": MOUSE_SYMBOLS, "max_cells_per_ref": 50}
    a = scx.pp.combine_references(ref, "label", random_state=np.random.default_rng(4), **kwargs)
    b = scx.pp.combine_references(ref, "label", random_state=np.random.default_rng(4), **kwargs)
    assert list(a.obs_names) == list(b.obs_names) and a.uns["spatialcx_combine"]["random_state"] == -1
    assert (
        scx.pp.combine_references(ref, "label", random_state=np.int64(4), **kwargs).uns["spatialcx_combine"][
            "random_state"
        ]
        == 4
    )


def test_cell_caps_must_be_whole_numbers():
    ref = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    with pytest.raises(TypeError, match="max_cells_per_ref must be a whole number or None, got str '100'"):
        scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref="100")
    with pytest.raises(TypeError, match="got bool True"):
        scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=True)
    with pytest.raises(ValueError, match=r"max_cells_per_ref must be a whole number >= 1 or None, got 10.5"):
        scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=10.5)
    with pytest.raises(ValueError, match="min_cells_per_type must be a whole number >= 0, got -1"):
        scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, min_cells_per_type=-1)
    out = scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS, max_cells_per_ref=10.0)  # a YAML float
    assert out.n_obs == 10 and out.uns["spatialcx_combine"]["max_cells_per_ref"] == 10


def test_genes_none_matches_genes_across_case_and_names_disjoint_references():
    mouse = make_ref({"T cell": 20}, MOUSE_SYMBOLS + ["Xist"])
    human = make_ref({"B cell": 20}, ["CD3E", "ACTB", "SST", "GAD1", "FOO"], seed=1, prefix="d")
    out = scx.pp.combine_references([mouse, human], "label")
    assert list(out.var_names) == ["Gad1", "Sst", "Actb", "Cd3e"]  # first reference's order and spelling
    np.testing.assert_array_equal(out.layers["counts"][20:].toarray(), human.X[:, [3, 2, 1, 0]].toarray())
    other = make_ref({"B cell": 20}, ["A", "B", "C"], prefix="e")
    with pytest.raises(ValueError, match=r"no gene in common \('ref0': 6 genes, e.g. \['Gad1', 'Gad2', 'Sst'\]; "):
        scx.pp.combine_references([mouse, other], "label")


def test_real_references_of_different_gene_case_with_genes_none(shared_data):
    hypothalamus = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad"))
    starmap = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    folded = {g.casefold(): g for g in starmap.var_names}
    expected = [g for g in hypothalamus.var_names if g.casefold() in folded]
    assert len(expected) > 10 and not set(expected) & set(starmap.var_names)  # no gene spelled alike
    out = scx.pp.combine_references(
        {"hypothalamus": hypothalamus, "starmap": starmap}, "cell_type_author", min_cells_per_type=1
    )
    assert list(out.var_names) == expected
    star = out[out.obs["reference_source"] == "starmap"]
    truth = starmap[star.obs_names, [folded[g.casefold()] for g in expected]].X
    np.testing.assert_array_equal(star.layers["counts"].toarray(), np.asarray(sp.csr_matrix(truth).toarray()))


def test_label_keys_mapping_with_unnamed_references_is_a_clear_error():
    ref = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    with pytest.raises(ValueError, match=r"label_keys is a mapping \(keys \['atlas'\]\) but references is a list"):
        scx.pp.combine_references([ref], {"atlas": "label"}, genes=MOUSE_SYMBOLS)


def test_a_reference_given_twice_is_warned_about(caplog, tmp_path):
    ref = make_ref({"T cell": 20}, MOUSE_SYMBOLS)
    ref.write_h5ad(tmp_path / "atlas.h5ad")
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.pp.combine_references([ref, make_ref({"T cell": 20}, MOUSE_SYMBOLS, prefix="d")], "label")
    assert "same checksum" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.pp.combine_references({"a": ref, "b": ref}, "label")
    assert "References ['a', 'b'] have the same checksum" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references([tmp_path / "atlas.h5ad", f"file://{tmp_path}/atlas.h5ad"], "label")
    assert "References ['atlas', 'atlas-1'] have the same checksum" in caplog.text
    assert out.n_obs == 40 and out.obs_names.is_unique


def test_references_with_the_same_names_but_other_counts_are_not_called_a_repeat(caplog):
    """Two replicates with default cell names ("0", "1", ...) and the same labels are different references."""
    a = make_ref({"T cell": 20, "B cell": 20}, MOUSE_SYMBOLS)
    b = a.copy()
    b.X = b.X[::-1].copy()  # other counts, same cell names, gene names and labels
    b.obs["label"] = a.obs["label"].to_numpy()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.pp.combine_references({"a": a, "b": b}, "label")
    assert "same checksum" not in caplog.text  # before: "References ['a', 'b'] have the same checksum"
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.pp.combine_references({"a": a, "b": b, "c": a.copy()}, "label")
    assert "References ['a', 'c'] have the same checksum" in caplog.text


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_repeated_var_names_of_panel_genes_are_warned_about(caplog):
    ref = make_ref({"T cell": 20}, ["Gad1", "Sst", "Gad1", "Actb", "Cd3e"])
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references(ref, "label", genes=["Sst", "Gad1", "Actb"])
    assert "reference 'ref0': 1 panel genes are var names held more than once (e.g. ['Gad1'])" in caplog.text
    np.testing.assert_array_equal(out.layers["counts"].toarray(), ref.X[:, [1, 0, 3]].toarray())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -2.0])
def test_bad_values_missed_by_the_sampled_detection_are_an_error(monkeypatch, bad):
    """The normalization check reads a sample of cells; a bad value in another cell must not reach the output."""
    import spatialcx.pp._normalization as norm

    monkeypatch.setattr(norm, "N_SAMPLE_ROWS", 5)
    monkeypatch.setattr(norm, "MIN_SAMPLE_ROWS", 5)
    ref = make_ref({"T cell": 100, "B cell": 100}, MOUSE_SYMBOLS)
    x = ref.X.toarray()
    x[137, 2] = bad
    ref.X = sp.csr_matrix(x)
    assert scx.pp.normalization_status(ref).raw_source == "X"  # the sample does not see it
    with pytest.raises(ValueError, match=rf"Reference 'ref0': X holds {bad} for cell 'c137', gene 'Sst'; 1 values"):
        scx.pp.combine_references(ref, "label", genes=MOUSE_SYMBOLS)


def test_a_reference_left_without_cells_does_not_narrow_the_shared_genes(caplog):
    """A small reference whose only type is too small gives no cells: its genes must not limit the others' genes."""
    atlas = make_ref({"T cell": 30, "B cell": 20}, MOUSE_SYMBOLS + ["Xist", "Pvalb"])
    rare = make_ref({"tuft cell": 4}, MOUSE_SYMBOLS[:3], prefix="d")
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        out = scx.pp.combine_references({"atlas": atlas, "rare": rare}, "label", min_cells_per_type=10)
    assert list(out.var_names) == MOUSE_SYMBOLS + ["Xist", "Pvalb"]
    np.testing.assert_array_equal(out.layers["counts"].toarray(), atlas.X.toarray())
    assert "reference 'rare' gives no cells: its 4 labelled cells" in caplog.text and "'tuft cell'" in caplog.text
    assert "reference 'rare': 3 of 7 panel genes found" not in caplog.text
    assert out.uns["spatialcx_references"]["rare"]["cells_kept"] == {"cell_types": [], "n_cells": []}
    assert out.uns["spatialcx_combine"]["removed_types"] == ["tuft cell"]
    # with a panel, the genes the small reference lacks stay in the model too
    panel = ["Pvalb", "Sst", "Cd3e", "Gad1", "Actb", "Gad2", "Xist", "Vip"]
    out = scx.pp.combine_references({"atlas": atlas, "rare": rare}, "label", genes=panel, min_cells_per_type=10)
    assert list(out.var_names) == ["Pvalb", "Sst", "Cd3e", "Gad1", "Actb", "Gad2", "Xist"]
    # every type too small: a clear error, not an empty table
    with pytest.raises(ValueError, match=r"No cells left: every cell type has fewer than min_cells_per_type=50"):
        scx.pp.combine_references({"atlas": atlas, "rare": rare}, "label", min_cells_per_type=50)
