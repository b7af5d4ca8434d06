"""Tests of scx.io.read_10x_cell_types and scx.io.add_10x_cell_types."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatialcx as scx

BARCODES = [f"cell{i:03d}-1" for i in range(12)]
FINE = ["B cell", "T cell", "macrophage", "B cell", "T cell", "erythroblast"] * 2


def write_azimuth(path, barcodes=BARCODES):
    df = pd.DataFrame(
        {
            "barcode": barcodes,
            "broad_cell_type": ["Immune"] * 12,
            "coarse_cell_type": ["Lymphoid", "Lymphoid", "Myeloid", "Lymphoid", "Lymphoid", "Erythroid"] * 2,
            "fine_cell_type": FINE,
            "azimuth_hierarchy": [f"Immune|x|{f}" for f in FINE],
            "softmax_probability": np.linspace(0.5, 1.0, 12),
            "umi_count": np.arange(100, 112),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df


def write_cloud(path, barcodes=BARCODES):
    df = pd.DataFrame(
        {
            "barcode": barcodes,
            "coarse_cell_type": ["B cell", "T cell", "macrophage", "B cell", "T cell", "erythroblast"] * 2,
            "fine_cell_type": ["naive B cell", "CD8-positive, alpha-beta T cell", "macrophage"] * 4,
            "cell_count_in_model": [1500, 900, 30] * 4,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df


def table(ids=BARCODES, extra=3):
    names = list(ids) + [f"other{i}-1" for i in range(extra)]
    return ad.AnnData(np.zeros((len(names), 2), dtype=np.float32), obs=pd.DataFrame(index=names))


def test_read_azimuth(tmp_path):
    write_azimuth(tmp_path / "Azimuth" / "cell_types.csv")
    df = scx.io.read_10x_cell_types(tmp_path / "Azimuth" / "cell_types.csv")
    assert df.attrs["source"] == "azimuth" and df.attrs["file"] == "cell_types.csv"
    assert df.index.name == "barcode" and list(df.index) == BARCODES
    assert list(df.columns) == [
        "broad_cell_type",
        "coarse_cell_type",
        "fine_cell_type",
        "hierarchy",
        "softmax_probability",
        "umi_count",
    ]
    assert df["softmax_probability"].dtype.kind == "f" and df["umi_count"].tolist() == list(range(100, 112))
    assert df.loc["cell002-1", "fine_cell_type"] == "macrophage"


def test_read_cloud_and_folder_lookup(tmp_path):
    write_cloud(tmp_path / "cell_types" / "10x_Cloud" / "cell_types.csv")
    df = scx.io.read_10x_cell_types(tmp_path / "cell_types")  # the folder: one CSV inside
    assert df.attrs["source"] == "10x_cloud"
    assert list(df.columns) == ["coarse_cell_type", "fine_cell_type", "cell_count_in_model"]
    assert df["cell_count_in_model"].tolist()[:3] == [1500, 900, 30]
    write_azimuth(tmp_path / "cell_types" / "Azimuth" / "cell_types.csv")
    with pytest.raises(FileNotFoundError, match="Several cell_types.csv"):
        scx.io.read_10x_cell_types(tmp_path / "cell_types")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scx.io.read_10x_cell_types(tmp_path / "nothing")


def test_read_alternative_column_names_and_gzip(tmp_path):
    df = pd.DataFrame(
        {"Cell ID": ["a", "b"], "azimuth_broad": ["x", "y"], "azimuth_fine": ["B cell", "T cell"], "extra": [1, 2]}
    )
    df.to_csv(tmp_path / "cell_types.csv.gz", index=False)
    out = scx.io.read_10x_cell_types(tmp_path / "cell_types.csv.gz")
    assert list(out.index) == ["a", "b"] and list(out.columns) == ["broad_cell_type", "fine_cell_type", "extra"]
    assert out.attrs["source"] == "azimuth"


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (pd.DataFrame({"id": ["a"], "fine_cell_type": ["B"]}), "no barcode"),
        # one other column is a Loupe Browser export's category; with two, which one holds the labels is unknown
        (pd.DataFrame({"barcode": ["a"], "label": ["B"], "note": ["x"]}), "no cell type column"),
        (pd.DataFrame({"barcode": ["a", "a"], "fine_cell_type": ["B", "T"]}), "more than once"),
        (pd.DataFrame({"barcode": ["a", "b"], "fine_cell_type": ["B", "T"], "umi_count": [3, "many"]}), "non-numeric"),
    ],
)
def test_read_errors(tmp_path, frame, match):
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=match):
        scx.io.read_10x_cell_types(tmp_path / "bad.csv")


def test_add_joins_by_obs_names_with_cl_ids(tmp_path):
    write_azimuth(tmp_path / "cell_types.csv")
    adata = table()
    scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv")
    obs = adata.obs
    assert obs.loc["cell002-1", "10x_fine"] == "macrophage" and obs.loc["cell005-1", "10x_coarse"] == "Erythroid"
    assert obs.loc[BARCODES, "10x_probability"].tolist() == pytest.approx(np.linspace(0.5, 1.0, 12).tolist())
    assert obs.loc["other0-1", ["10x_fine", "10x_umi_count", "10x_ontology_term_id"]].isna().all()
    ids = obs.loc[BARCODES, "10x_ontology_term_id"].astype(str)
    expected = {"B cell": "CL:0000236", "T cell": "CL:0000084", "macrophage": "CL:0000235"}
    for fine, cl in expected.items():
        assert set(ids[obs.loc[BARCODES, "10x_fine"] == fine]) == {cl}
    assert set(obs.loc[BARCODES, "10x_ontology_label"].astype(str)) >= {"B cell", "T cell", "macrophage"}
    assert isinstance(obs["10x_fine"].dtype, pd.CategoricalDtype)
    u = adata.uns["10x"]
    assert u["source"] == "azimuth" and u["n_matched"] == 12 and u["n_table_cells"] == 15
    assert u["ontology_level"] == "fine_cell_type" and u["id_source"] == "obs_names"


def test_add_matches_cell_id_column_and_ignores_suffix(tmp_path):
    write_cloud(tmp_path / "cell_types.csv")
    # a SpatialData-style table: integer-like obs_names, Xenium ids in obs["cell_id"] without the "-1" suffix
    adata = table([str(i) for i in range(12)], extra=0)
    adata.obs["cell_id"] = [b.removesuffix("-1") for b in BARCODES]
    scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv", key_added="cloud", add_ontology=False)
    assert adata.uns["cloud"]["id_source"] == "obs['cell_id'] (suffix ignored)"
    assert (
        adata.obs["cloud_coarse"].astype(str).tolist() == write_cloud(tmp_path / "x.csv")["coarse_cell_type"].tolist()
    )
    assert "cloud_ontology_term_id" not in adata.obs and "ontology_level" not in adata.uns["cloud"]
    np.testing.assert_array_equal(adata.obs["cloud_cell_count_in_model"].to_numpy()[:3], [1500, 900, 30])


def test_add_uses_cl_ids_of_the_file(tmp_path):
    df = pd.DataFrame(
        {
            "barcode": BARCODES[:3],
            "fine_cell_type": ["b", "t", "m"],
            "cell_type_ontology_term_id": ["CL:1", "CL:2", "CL:3"],
        }
    )
    df.to_csv(tmp_path / "c.csv", index=False)
    adata = table()
    scx.io.add_10x_cell_types(adata, tmp_path / "c.csv")
    assert adata.obs.loc[BARCODES[:3], "10x_ontology_term_id"].astype(str).tolist() == ["CL:1", "CL:2", "CL:3"]
    assert adata.uns["10x"]["ontology_source"] == "file"


def test_add_errors_write_nothing(tmp_path):
    write_azimuth(tmp_path / "cell_types.csv")
    adata = table(["x", "y"], extra=0)
    with pytest.raises(ValueError, match="None of the 12 cells"):
        scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv")
    with pytest.raises(KeyError, match="id_key"):
        scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv", id_key="nope")
    with pytest.raises(ValueError, match="read_10x_cell_types"):
        scx.io.add_10x_cell_types(adata, pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="key_added='a/b' cannot be stored"):  # '/' would nest groups in h5ad/zarr
        scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv", key_added="a/b")
    assert adata.obs.shape[1] == 0 and "10x" not in adata.uns


def test_add_accepts_the_frame_and_round_trips(tmp_path):
    write_azimuth(tmp_path / "cell_types.csv")
    df = scx.io.read_10x_cell_types(tmp_path / "cell_types.csv")
    adata = table()
    scx.io.add_10x_cell_types(adata, df)
    for path, write, read in (
        (tmp_path / "t.h5ad", ad.AnnData.write_h5ad, ad.read_h5ad),
        (tmp_path / "t.zarr", ad.AnnData.write_zarr, ad.read_zarr),
    ):
        write(adata, path)
        back = read(path)
        pd.testing.assert_frame_equal(back.obs, adata.obs)
        assert back.uns["10x"]["n_matched"] == 12 and list(back.uns["10x"]["levels"]) == list(
            adata.uns["10x"]["levels"]
        )


def test_add_to_spatialdata_copy(tmp_path):
    from spatialdata import SpatialData

    write_azimuth(tmp_path / "cell_types.csv")
    sdata = SpatialData(tables={"table": table()})
    out = scx.io.add_10x_cell_types(sdata, tmp_path / "cell_types.csv", copy=True, add_ontology=False)
    assert "10x_fine" in out.tables["table"].obs and "10x_fine" not in sdata.tables["table"].obs


@pytest.mark.parametrize("kind", ["binary", "truncated_gz", "not_gzip", "latin1"])
def test_read_unreadable_file_raises_value_error(tmp_path, kind):
    import gzip

    good = pd.DataFrame({"barcode": BARCODES * 50, "fine_cell_type": FINE * 50}).to_csv(index=False).encode()
    if kind == "binary":
        path = tmp_path / "cell_types.csv"
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated_gz":
        path = tmp_path / "cell_types.csv.gz"
        packed = gzip.compress(good)
        path.write_bytes(packed[: len(packed) // 2])
    elif kind == "not_gzip":
        path = tmp_path / "cell_types.csv.gz"
        path.write_bytes(good)
    else:
        path = tmp_path / "cell_types.csv"
        path.write_bytes("barcode,fine_cell_type\ncell1,caf\xe9 cell\n".encode("latin-1"))
    why = {"binary": "parsed as CSV|not UTF-8", "latin1": "not UTF-8"}.get(kind, "truncated or damaged")
    with pytest.raises(
        ValueError, match=rf"cell_types\.csv(\.gz)?' is not a readable 10x cell_types CSV: .*({why})"
    ) as info:
        scx.io.read_10x_cell_types(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------------------------------------------------
# The real file flavours (fixtures in tests/data/tenx/, written after what the pipelines are documented to write)
#
# - Space Ranger (>= 4.1, Visium HD) writes segmented_outs/cell_types/{10x_Cloud,Azimuth}/cell_types.csv
#   (https://www.10xgenomics.com/support/software/space-ranger/latest/analysis/outputs/space-ranger-annotate-outputs);
#   segmented cells are named cellid_<9 digits>-1.
# - 10x Cloud: barcode, coarse_cell_type, fine_cell_type, then Cell Ranger's REPLACE_LOW_UMI_CELLS stage adds
#   coarse_cell_type_unfiltered and umi_count and relabels cells under 100 UMIs "Low UMI Barcode"
#   (github.com/10XGenomics/cellranger, mro/rna/stages/cas_cell_typing/replace_low_umi_cells/__init__.py).
# - Pan-Human Azimuth: barcode, broad/coarse/fine_cell_type, full_hierarchical_labels, final_level_softmax_prob,
#   coarse_cell_type_unfiltered, umi_count, with "Coarse/Fine Not Confidently Annotated" and "Unassigned" labels (as
#   Cell Ranger 10.1 writes it, see the ezRun test fixture of its reader readCellRangerPanHuman).
# - Xenium Explorer cell groups: cell_id, group, color; Xenium cell ids are "aaabckmo-1" (the first ids of the real
#   xenium_bonemarrow output in ../shared/data).

TENX = Path(__file__).parent / "data" / "tenx"
SEG = TENX / "spaceranger_segmented_outs"
CELL_IDS = [f"cellid_{i:09d}-1" for i in range(1, 7)]


def test_read_real_10x_cloud_file():
    df = scx.io.read_10x_cell_types(SEG / "cell_types" / "10x_Cloud")
    # a 10x Cloud file with umi_count was taken for an Azimuth one
    assert df.attrs["source"] == "10x_cloud"
    assert list(df.index) == CELL_IDS
    assert list(df.columns) == ["coarse_cell_type", "fine_cell_type", "coarse_cell_type_unfiltered", "umi_count"]
    assert df.loc["cellid_000000004-1", "coarse_cell_type"] == "Low UMI Barcode"
    assert df.loc["cellid_000000001-1", "fine_cell_type"] == "CD4-positive, alpha-beta T cell"

    adata = table(CELL_IDS, extra=2)
    scx.io.add_10x_cell_types(adata, SEG / "cell_types" / "10x_Cloud" / "cell_types.csv")
    obs = adata.obs
    assert adata.uns["10x"]["source"] == "10x_cloud"
    # the model's coarse label of low-UMI cells is kept next to the filtered one
    assert obs.loc["cellid_000000004-1", "10x_coarse"] == "Low UMI Barcode"
    assert obs.loc["cellid_000000004-1", "10x_coarse_unfiltered"] == "fibroblast"
    assert isinstance(obs["10x_coarse_unfiltered"].dtype, pd.CategoricalDtype)
    assert obs["10x_umi_count"].dtype == np.float64 and obs.loc["cellid_000000003-1", "10x_umi_count"] == 1204
    assert obs.loc["cellid_000000001-1", "10x_ontology_term_id"] == "CL:0000624"  # CD4-positive, alpha-beta T cell
    # a low-UMI cell keeps its fine label, but 10x filtered it out: no CL id
    assert obs.loc["cellid_000000004-1", "10x_fine"] == "fibroblast"
    assert obs.loc["cellid_000000004-1", "10x_ontology_term_id"] == "unknown"
    assert obs.loc["cellid_000000004-1", "10x_ontology_label"] == "unknown"


def test_read_real_azimuth_file_and_segmented_outs_layout():
    with pytest.raises(FileNotFoundError, match=r"Several cell_types.csv.*10x_Cloud.*pass the one"):
        scx.io.read_10x_cell_types(SEG)  # both models ran: the user must choose
    df = scx.io.read_10x_cell_types(SEG / "cell_types" / "Azimuth" / "cell_types.csv")
    assert df.attrs["source"] == "azimuth"
    assert list(df.columns) == [
        "broad_cell_type",
        "coarse_cell_type",
        "fine_cell_type",
        "hierarchy",
        "softmax_probability",
        "coarse_cell_type_unfiltered",
        "umi_count",
    ]
    adata = table(CELL_IDS, extra=0)
    scx.io.add_10x_cell_types(adata, df, key_added="azimuth")
    obs = adata.obs
    assert obs["azimuth_probability"].tolist() == pytest.approx(df["softmax_probability"].tolist())
    onto = obs["azimuth_ontology_term_id"].astype(str)
    assert onto["cellid_000000002-1"] == "CL:0000785"  # mature B cell
    # fine level not confident: the id of the finest level that names a type (coarse, else broad), not "unknown"
    assert onto["cellid_000000005-1"] == "CL:0000066"  # coarse "Epithelial cell"
    assert onto["cellid_000000003-1"] == "CL:0000738"  # broad "Immune cell"
    assert obs.loc["cellid_000000003-1", "azimuth_ontology_label"] == "leukocyte"
    assert onto["cellid_000000004-1"] == "unknown"  # "Low UMI Barcode": filtered out by 10x
    per_level = adata.uns["azimuth"]["ontology_cells_per_level"]
    assert per_level == {"broad_cell_type": 1, "coarse_cell_type": 1, "fine_cell_type": 3, "unknown": 1}


def test_xenium_explorer_cell_groups_on_a_spatialdata_style_table():
    ids = pd.read_csv(TENX / "xenium_explorer" / "cell_groups.csv")["cell_id"].tolist()
    df = scx.io.read_10x_cell_types(TENX / "xenium_explorer" / "cell_groups.csv")
    assert df.attrs["source"] == "xenium_explorer" and list(df.columns) == ["fine_cell_type", "color"]
    # as spatialdata-io reads Xenium: obs_names 0..n-1, the instance key an integer label, the Xenium id in cell_id
    adata = table([str(i) for i in range(len(ids) + 2)], extra=0)
    adata.obs["cell_labels"] = np.arange(1, len(ids) + 3)
    adata.obs["cell_id"] = ids + ["zzzzzzzz-1", "zzzzzzzy-1"]
    adata.uns["spatialdata_attrs"] = {"region": "cell_circles", "region_key": "region", "instance_key": "cell_labels"}
    scx.io.add_10x_cell_types(adata, df, add_ontology=False)
    assert adata.uns["10x"]["id_source"] == "obs['cell_id']"
    assert adata.obs["10x_fine"].astype(object).tolist()[:4] == ["Erythroid", "Myeloid", "Erythroid", "Lymphoid"]
    assert adata.obs["10x_fine"].isna().tolist()[-2:] == [True, True]


def test_real_xenium_cell_ids_with_bytes_ids(shared_data, tmp_path):
    """The real Xenium output: cell ids read as bytes from cell_feature_matrix.h5 still match the text ids."""
    import h5py

    root = shared_data("xenium_bonemarrow")
    with h5py.File(root / "cell_feature_matrix.h5", "r") as f:
        barcodes = f["matrix/barcodes"][:]  # bytes, e.g. b"aaabckmo-1"
    clusters = pd.read_parquet(root / "cell_clusters_graphclust.parquet")["cluster"]
    labelled = "cluster " + clusters.dropna().astype(str)
    assert labelled.size < clusters.size  # some cells have no cluster: they must stay unannotated
    # a Xenium Explorer cell-groups export of the graph clusters
    pd.DataFrame({"cell_id": labelled.index, "group": labelled.to_numpy()}).to_csv(tmp_path / "groups.csv", index=False)
    obs = pd.DataFrame({"cell_id": barcodes.astype(object)}, index=[str(i) for i in range(barcodes.size)])
    adata = ad.AnnData(obs=obs)
    scx.io.add_10x_cell_types(adata, tmp_path / "groups.csv", add_ontology=False)
    assert adata.uns["10x"]["id_source"] == "obs['cell_id']"
    assert adata.uns["10x"]["n_matched"] == labelled.size == int(adata.obs["10x_fine"].notna().sum())
    got = pd.Series(adata.obs["10x_fine"].to_numpy(), index=[b.decode() for b in barcodes])
    assert (got[labelled.index].astype(str) == labelled).all()


# --------------------------------------------------------------------------------------------------------------------
# Matching the file's ids to the table's cells


def test_visium_hd_cell_ids_match_the_bare_numbers_of_the_segmentation(tmp_path):
    # Space Ranger's segmented outputs name cells cellid_000000001-1; cell_segmentations.geojson, and a table built
    # from its polygons (e.g. a SpatialData instance key), holds the bare number 1
    hd_ids = [f"cellid_{i:09d}-1" for i in range(1, 13)]
    write_cloud(tmp_path / "cell_types.csv", barcodes=hd_ids)
    adata = table([str(i) for i in range(1, 13)], extra=0)
    adata.obs["cell_id"] = np.arange(1, 13)
    adata.uns["spatialdata_attrs"] = {"region": "cells", "region_key": "region", "instance_key": "cell_id"}
    scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv", key_added="hd", add_ontology=False)
    assert adata.uns["hd"]["id_source"] == "obs['cell_id'] (suffix ignored)" and adata.uns["hd"]["n_matched"] == 12
    expected = write_cloud(tmp_path / "x.csv")["coarse_cell_type"].tolist()
    assert adata.obs["hd_coarse"].astype(str).tolist() == expected
    # a number inside another id is not taken for a Visium HD one
    other = table([f"cell_{i}" for i in range(1, 13)], extra=0)
    with pytest.raises(ValueError, match="None of the 12 cells"):
        scx.io.add_10x_cell_types(other, tmp_path / "cell_types.csv", key_added="hd", add_ontology=False)


def test_suffix_is_not_ignored_when_it_tells_samples_apart(tmp_path):
    pd.DataFrame({"barcode": ["AAAC-1", "AAAG-1"], "fine_cell_type": ["T cell", "B cell"]}).to_csv(
        tmp_path / "s1.csv", index=False
    )
    # a table of two samples: AAAC-2 is another cell than AAAC-1 and must not get its label
    adata = table(["AAAC-1", "AAAC-2", "AAAG-1", "AAAG-2"], extra=0)
    scx.io.add_10x_cell_types(adata, tmp_path / "s1.csv", add_ontology=False)
    assert adata.obs["10x_fine"].astype(object).tolist()[:1] == ["T cell"]
    assert adata.obs["10x_fine"].isna().tolist() == [False, True, False, True]
    assert adata.uns["10x"]["id_source"] == "obs_names"
    # ids without the suffix in the file cannot tell the samples apart: say so instead of labelling both
    pd.DataFrame({"barcode": ["AAAC", "AAAG"], "fine_cell_type": ["T cell", "B cell"]}).to_csv(
        tmp_path / "nosuffix.csv", index=False
    )
    with pytest.raises(ValueError, match=r"pair several table cells with one file cell.*AAAC-1.*AAAC-2"):
        scx.io.add_10x_cell_types(adata, tmp_path / "nosuffix.csv", key_added="b", add_ontology=False)
    assert "b_fine" not in adata.obs


def test_integer_cell_ids_prefer_the_id_column_over_a_positional_index(tmp_path, caplog):
    import logging

    # Xenium before XOA 1.3 numbered cells 1, 2, ...; spatialdata-io names the rows 0, 1, ...: both match
    pd.DataFrame({"cell_id": range(1, 10), "fine_cell_type": [f"type{i}" for i in range(1, 10)]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    adata = table([str(i) for i in range(10)], extra=0)
    adata.obs["cell_id"] = np.arange(1, 11, dtype=np.float64)  # floats, as after a merge with missing values
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.io.add_10x_cell_types(adata, tmp_path / "c.csv", add_ontology=False)
    assert adata.uns["10x"]["id_source"] == "obs['cell_id']"
    assert adata.obs["10x_fine"].astype(object).tolist()[:3] == ["type1", "type2", "type3"]
    assert "obs_names pairs 9 cells differently" in caplog.text


def test_instance_key_of_a_spatialdata_table(tmp_path):
    pd.DataFrame({"cell_id": [5, 7, 9], "fine_cell_type": ["T cell", "B cell", "macrophage"]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    adata = table([f"c{i}" for i in range(3)], extra=0)
    adata.obs["label_id"] = pd.Categorical([9, 5, 7])
    adata.uns["spatialdata_attrs"] = {"region": "cells", "region_key": "region", "instance_key": "label_id"}
    scx.io.add_10x_cell_types(adata, tmp_path / "c.csv", add_ontology=False)
    assert adata.uns["10x"]["id_source"] == "obs['label_id']"
    assert adata.obs["10x_fine"].astype(object).tolist() == ["macrophage", "T cell", "B cell"]


def test_no_match_error_lists_the_ids_tried(tmp_path):
    write_azimuth(tmp_path / "cell_types.csv")
    adata = table(["x", "y"], extra=0)
    adata.obs["cell_id"] = ["u", "v"]
    with pytest.raises(
        ValueError, match=r"file ids such as \['cell000-1'.*obs\['cell_id'\] such as \['u', 'v'\].*id_key="
    ):
        scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv")


def test_partial_overlap_warns_with_the_share(tmp_path, caplog):
    import logging

    write_azimuth(tmp_path / "cell_types.csv")
    adata = table(BARCODES[:3], extra=7)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.io.add_10x_cell_types(adata, tmp_path / "cell_types.csv", add_ontology=False)
    assert (
        "only 3 of 10 table cells (30%)" in caplog.text
        and "9 of the file's 12 cells are not in the table" in caplog.text
    )
    assert adata.uns["10x"]["n_file_cells_not_in_table"] == 9


def test_frame_with_duplicated_barcodes_is_refused(tmp_path):
    write_azimuth(tmp_path / "cell_types.csv")
    df = scx.io.read_10x_cell_types(tmp_path / "cell_types.csv")
    adata = table()
    with pytest.raises(ValueError, match="more than once"):
        scx.io.add_10x_cell_types(adata, pd.concat([df, df]))
    assert adata.obs.shape[1] == 0


# --------------------------------------------------------------------------------------------------------------------
# File formats


@pytest.mark.parametrize("sep", ["\t", ";"])
def test_tab_and_semicolon_separated(tmp_path, sep):
    frame = pd.DataFrame({"barcode": BARCODES[:2], "fine_cell_type": ["CD4-positive, alpha-beta T cell", "B cell"]})
    frame.to_csv(tmp_path / "cell_types.tsv", sep=sep, index=False)
    df = scx.io.read_10x_cell_types(tmp_path / "cell_types.tsv")
    assert list(df.index) == BARCODES[:2] and df["fine_cell_type"].tolist() == frame["fine_cell_type"].tolist()


def test_gzip_content_without_gz_name_and_spaces_around_ids(tmp_path):
    import gzip

    text = "barcode,fine_cell_type\n cell000-1 ,B cell\ncell001-1,T cell\n"
    (tmp_path / "cell_types.csv").write_bytes(gzip.compress(text.encode()))
    df = scx.io.read_10x_cell_types(tmp_path / "cell_types.csv")
    assert list(df.index) == ["cell000-1", "cell001-1"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("barcode,coarse_cell_type,fine_cell_type\n", "has a header .* but no rows"),
        ("barcode,fine_cell_type,sample_name\nA-1,T,s1\nA-1,B,s2\n", "sample_name column"),
    ],
)
def test_read_more_errors(tmp_path, text, match):
    (tmp_path / "cell_types.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        scx.io.read_10x_cell_types(tmp_path / "cell_types.csv")


# --------------------------------------------------------------------------------------------------------------------
# Writing


def test_rerun_replaces_its_own_columns_and_warns_about_others(tmp_path, caplog):
    import logging

    write_azimuth(tmp_path / "az.csv")
    write_cloud(tmp_path / "cloud.csv")
    adata = table()
    scx.io.add_10x_cell_types(adata, tmp_path / "az.csv")
    assert {"10x_broad", "10x_hierarchy", "10x_ontology_label"} <= set(adata.obs.columns)
    scx.io.add_10x_cell_types(adata, tmp_path / "cloud.csv", add_ontology=False)
    # columns of the first file that the second lacks would sit next to the new ones as if they came from it
    assert not {"10x_broad", "10x_hierarchy", "10x_ontology_term_id", "10x_ontology_label"} & set(adata.obs.columns)
    assert set(adata.uns["10x"]["columns"]) <= set(adata.obs.columns)
    # a column of the user's own with an output name is replaced, with a warning
    other = table()
    other.obs["mine_fine"] = "kept?"
    other.obs["mine_note"] = "untouched"
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.io.add_10x_cell_types(other, tmp_path / "cloud.csv", key_added="mine", add_ontology=False)
    assert "replacing the obs column(s) ['mine_fine']" in caplog.text
    assert (other.obs["mine_note"] == "untouched").all()


def test_backed_store_gets_the_columns(merfish_store, tmp_path):
    import spatialdata as sd

    sdata = sd.read_zarr(merfish_store)
    n = sdata.tables["table"].n_obs
    ids = np.arange(0, n, 2)  # every other cell: the instance key (cell_id) of the table
    pd.DataFrame(
        {
            "barcode": ids,
            "coarse_cell_type": np.where(ids % 4 == 0, "neuron", "astrocyte"),
            "fine_cell_type": np.where(ids % 4 == 0, "glutamatergic neuron", "astrocyte"),
            "umi_count": ids + 100,
        }
    ).to_csv(tmp_path / "cell_types.csv", index=False)
    with pytest.raises(ValueError, match="None of the"):
        scx.io.add_10x_cell_types(sdata, _no_match_csv(tmp_path))
    assert "10x_fine" not in sd.read_zarr(merfish_store).tables["table"].obs  # nothing written on error
    scx.io.add_10x_cell_types(sdata, tmp_path / "cell_types.csv")
    back = sd.read_zarr(merfish_store).tables["table"]
    assert back.uns["10x"]["n_matched"] == ids.size and back.uns["10x"]["source"] == "10x_cloud"
    assert isinstance(back.obs["10x_fine"].dtype, pd.CategoricalDtype)
    assert back.obs["10x_umi_count"].dtype == np.float64
    pd.testing.assert_frame_equal(back.obs, sdata.tables["table"].obs)
    assert back.obs["10x_fine"].iloc[:4].astype(object).tolist()[::2] == ["glutamatergic neuron", "astrocyte"]


def _no_match_csv(tmp_path):
    path = tmp_path / "nomatch.csv"
    pd.DataFrame({"barcode": ["zz-1"], "fine_cell_type": ["B cell"]}).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Clusters (Cell Ranger / Space Ranger / Xenium Ranger analysis/clustering/*/clusters.csv), Loupe exports, archives


def test_clusters_csv_and_loupe_browser_exports(tmp_path):
    (tmp_path / "clusters.csv").write_text("Barcode,Cluster\naaabckmo-1,1\naaabckmp-1,10\naaabckmq-1,2\n")
    df = scx.io.read_10x_cell_types(tmp_path / "clusters.csv")
    assert df.attrs["source"] == "10x_clusters" and df.attrs["label_column"] == "Cluster"
    assert list(df.columns) == ["fine_cell_type"] and df["fine_cell_type"].tolist() == ["1", "10", "2"]
    # Loupe Browser: Barcode and one column named after the exported category
    (tmp_path / "loupe.csv").write_text("Barcode,My cell types\nAAAC-1,T cell\nAAAG-1,B cell\n")
    df = scx.io.read_10x_cell_types(tmp_path / "loupe.csv")
    assert df.attrs["source"] == "loupe" and df.attrs["label_column"] == "My cell types"
    adata = table(["AAAC-1", "AAAG-1"], extra=1)
    scx.io.add_10x_cell_types(adata, tmp_path / "loupe.csv")
    assert adata.obs["10x_fine"].astype(object).tolist()[:2] == ["T cell", "B cell"]
    assert adata.obs["10x_ontology_term_id"].astype(object).tolist()[:2] == ["CL:0000084", "CL:0000236"]
    assert adata.uns["10x"]["source"] == "loupe" and adata.uns["10x"]["label_column"] == "My cell types"


def test_path_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clusters.csv").write_text("Barcode,Cluster\naaabckmo-1,1\naaabckmp-1,10\n")
    df = scx.io.read_10x_cell_types("~/clusters.csv")
    assert df["fine_cell_type"].tolist() == ["1", "10"]


def _analysis_folder(root, clusters):
    """An ``analysis`` folder as the 10x pipelines write it: graph-based and k-means clusters."""
    for name, labels in clusters.items():
        folder = root / "analysis" / "clustering" / name
        folder.mkdir(parents=True)
        pd.DataFrame({"Barcode": labels.index, "Cluster": labels.to_numpy()}).to_csv(
            folder / "clusters.csv", index=False
        )
    return root / "analysis"


def test_analysis_folder_and_archives(tmp_path):
    import tarfile
    import zipfile

    labels = pd.Series(["1", "2", "1"], index=["a-1", "b-1", "c-1"])
    analysis = _analysis_folder(
        tmp_path, {"gene_expression_graphclust": labels, "gene_expression_kmeans_2_clusters": labels}
    )
    with pytest.raises(
        FileNotFoundError, match=r"Several clusters.csv.*gene_expression_kmeans_2_clusters.*pass the one"
    ):
        scx.io.read_10x_cell_types(analysis)
    df = scx.io.read_10x_cell_types(analysis / "clustering" / "gene_expression_graphclust")
    assert df.attrs["source"] == "10x_clusters" and list(df.index) == ["a-1", "b-1", "c-1"]
    # a folder with cell types and clusters (Space Ranger's segmented_outs): the cell types
    write_cloud(tmp_path / "cell_types" / "10x_Cloud" / "cell_types.csv")
    assert scx.io.read_10x_cell_types(tmp_path).attrs["source"] == "10x_cloud"

    # Xenium's analysis.tar.gz: several clusterings inside, then one
    with tarfile.open(tmp_path / "analysis.tar.gz", "w:gz") as tar:
        tar.add(analysis, arcname="analysis")
    with pytest.raises(FileNotFoundError, match=r"Several clusters.csv in the archive 'analysis.tar.gz'.*extract it"):
        scx.io.read_10x_cell_types(tmp_path / "analysis.tar.gz")
    with tarfile.open(tmp_path / "graphclust.tar.gz", "w:gz") as tar:
        tar.add(analysis / "clustering" / "gene_expression_graphclust", arcname="gene_expression_graphclust")
    df = scx.io.read_10x_cell_types(tmp_path / "graphclust.tar.gz")
    assert df.attrs["file"] == "graphclust.tar.gz/gene_expression_graphclust/clusters.csv"
    assert df["fine_cell_type"].tolist() == ["1", "2", "1"]
    # a zip of a cell_types folder, with other files beside the CSV
    with zipfile.ZipFile(tmp_path / "cell_types.zip", "w") as z:
        z.write(tmp_path / "cell_types" / "10x_Cloud" / "cell_types.csv", "cell_types/10x_Cloud/cell_types.csv")
        z.writestr("cell_types/README.txt", "notes")
    df = scx.io.read_10x_cell_types(tmp_path / "cell_types.zip")
    assert df.attrs["source"] == "10x_cloud" and list(df.index) == BARCODES
    # an archive of a single CSV, whatever its name (a Xenium Explorer cell groups export)
    with tarfile.open(tmp_path / "groups.tar.gz", "w:gz") as tar:
        tar.add(TENX / "xenium_explorer" / "cell_groups.csv", arcname="my_groups.csv")
    assert scx.io.read_10x_cell_types(tmp_path / "groups.tar.gz").attrs["source"] == "xenium_explorer"
    # a zip of one tab-separated file: read as the tar is (its delimiter found, the member named)
    text = (TENX / "xenium_explorer" / "cell_groups.csv").read_text().replace(",", "\t")
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as z:
        z.writestr("groups.tsv", text)
    df = scx.io.read_10x_cell_types(tmp_path / "one.zip")
    assert df.attrs["source"] == "xenium_explorer" and df.attrs["file"] == "one.zip/groups.tsv"
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a.txt", "x")
        z.writestr("b.txt", "y")
    with pytest.raises(FileNotFoundError, match=r"No cell_types.csv or clusters.csv in the archive 'other.zip'"):
        scx.io.read_10x_cell_types(tmp_path / "other.zip")


def test_real_xenium_graph_clusters_in_an_analysis_archive(shared_data, tmp_path):
    """The real Xenium graph-based clusters, as Xenium writes them in analysis.tar.gz, joined by the h5's cell ids."""
    import tarfile

    import h5py

    root = shared_data("xenium_bonemarrow")
    with h5py.File(root / "cell_feature_matrix.h5", "r") as f:
        barcodes = f["matrix/barcodes"][:].astype(str)
    clusters = pd.read_parquet(root / "cell_clusters_graphclust.parquet")["cluster"].dropna().astype(str)
    analysis = _analysis_folder(tmp_path, {"gene_expression_graphclust": clusters})
    with tarfile.open(tmp_path / "analysis.tar.gz", "w:gz") as tar:
        tar.add(analysis, arcname="analysis")
    adata = ad.AnnData(obs=pd.DataFrame({"cell_id": barcodes}, index=[str(i) for i in range(barcodes.size)]))
    scx.io.add_10x_cell_types(adata, tmp_path / "analysis.tar.gz", key_added="graphclust", add_ontology=False)
    params = adata.uns["graphclust"]
    assert params["source"] == "10x_clusters" and params["label_column"] == "Cluster"
    assert params["id_source"] == "obs['cell_id']" and params["n_matched"] == clusters.size
    got = pd.Series(adata.obs["graphclust_fine"].to_numpy(), index=barcodes)
    assert (got[clusters.index].astype(str) == clusters).all()
    assert got.isna().sum() == barcodes.size - clusters.size


def test_integer_ids_that_became_floats_with_a_missing_one_still_match(tmp_path):
    # an integer id column with a missing value (e.g. after a concat) is float: 1.0, 2.0, NaN
    pd.DataFrame({"cell_id": [1, 2, 3], "group": ["B cell", "T cell", "B cell"]}).to_csv(
        tmp_path / "g.csv", index=False
    )
    adata = ad.AnnData(obs=pd.DataFrame({"cell_id": [1.0, 2.0, np.nan]}, index=["a", "b", "c"]))
    scx.io.add_10x_cell_types(adata, tmp_path / "g.csv", add_ontology=False)
    assert adata.uns["10x"]["id_source"] == "obs['cell_id']"
    assert adata.obs["10x_fine"].astype(object).tolist()[:2] == ["B cell", "T cell"]
    assert pd.isna(adata.obs["10x_fine"].iloc[2])


def test_suffix_stripping_keeps_its_rules():
    from spatialcx.io._tenx import _strip_suffix

    ids = pd.Index(["AAAC-1", "AAAC-12", "a-b", "x-", "cellid_000000042-1", "cellid_000", "cellid_12a-1", "c-1-2", "7"])
    assert list(_strip_suffix(ids)) == ["AAAC", "AAAC", "a-b", "x-", "42", "0", "cellid_12a", "c-1", "7"]


# --------------------------------------------------------------------------------------------------------------------
# Files as users export them, and tables as users build them


def test_rows_with_more_fields_than_the_header(tmp_path):
    # a delimiter at the end of each row (empty last field): read as it is, never the labels as barcodes
    (tmp_path / "clusters.csv").write_text("Barcode,Cluster\naaabckmo-1,1,\naaabckmp-1,10,\n")
    df = scx.io.read_10x_cell_types(tmp_path / "clusters.csv")
    assert list(df.index) == ["aaabckmo-1", "aaabckmp-1"] and df["fine_cell_type"].tolist() == ["1", "10"]
    # a label holding the delimiter without quotes: its fields would shift or be lost
    for text in ("cell_id,group\na-1,T cell, CD4\nb-1,B cell\n", "cell_id,group\na-1,B cell\nb-1,T cell, CD4\n"):
        (tmp_path / "groups.csv").write_text(text)
        with pytest.raises(ValueError, match="a row has more fields than the header.*Quote the fields"):
            scx.io.read_10x_cell_types(tmp_path / "groups.csv")


def test_xenium_explorer_export_with_bom_crlf_and_quotes(tmp_path):
    text = '\ufeff"cell_id","group","color"\r\n"aaabckmo-1","T cell, CD4","#1f77b4"\r\n"aaabckmp-1","","#ff7f0e"\r\n'
    (tmp_path / "groups.csv").write_bytes(text.encode("utf-8"))
    df = scx.io.read_10x_cell_types(tmp_path / "groups.csv")
    assert df.attrs["source"] == "xenium_explorer" and list(df.index) == ["aaabckmo-1", "aaabckmp-1"]
    assert df["fine_cell_type"].iloc[0] == "T cell, CD4" and pd.isna(df["fine_cell_type"].iloc[1])


def test_repeated_table_ids_are_reported(tmp_path, caplog):
    import logging

    # two samples concatenated: their Xenium cell ids repeat; the file is of one sample
    (tmp_path / "groups.csv").write_text("cell_id,group\naaabckmo-1,T cell\naaabckmp-1,B cell\n")
    obs = pd.DataFrame({"cell_id": ["aaabckmo-1", "aaabckmp-1", "aaabckmo-1"]}, index=["s1_0", "s1_1", "s2_0"])
    adata = ad.AnnData(obs=obs)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.io.add_10x_cell_types(adata, tmp_path / "groups.csv", add_ontology=False)
    assert "2 table cells share their id (matched by obs['cell_id'])" in caplog.text
    assert "(1 file cells, e.g. ['aaabckmo-1'])" in caplog.text
    assert adata.obs["10x_fine"].astype(object).tolist() == ["T cell", "B cell", "T cell"]


def test_cluster_numbers_are_categories_in_numeric_order(tmp_path):
    (tmp_path / "clusters.csv").write_text("Barcode,Cluster\na-1,10\nb-1,2\nc-1,1\nd-1,2\n")
    adata = table(["a-1", "b-1", "c-1", "d-1"], extra=0)
    scx.io.add_10x_cell_types(adata, tmp_path / "clusters.csv", add_ontology=False)
    fine = adata.obs["10x_fine"]
    assert fine.cat.categories.tolist() == ["1", "2", "10"] and fine.astype(object).tolist() == ["10", "2", "1", "2"]
    (tmp_path / "groups.csv").write_text("cell_id,group\na-1,Cluster 2\nb-1,Cluster 10\n")
    scx.io.add_10x_cell_types(adata, tmp_path / "groups.csv", add_ontology=False)
    assert adata.obs["10x_fine"].cat.categories.tolist() == ["Cluster 10", "Cluster 2"]  # text: as pandas sorts it


def test_file_without_any_label_is_reported(tmp_path, caplog):
    import logging

    (tmp_path / "groups.csv").write_text("cell_id,group\na-1,\nb-1,\n")
    adata = table(["a-1", "b-1"], extra=0)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.io.add_10x_cell_types(adata, tmp_path / "groups.csv")
    assert "none of the 2 matched cells has a label in groups.csv (columns ['group'] are empty)" in caplog.text
    assert adata.obs[["10x_fine", "10x_ontology_term_id"]].isna().all().all()


def test_suffix_is_only_stripped_where_ids_did_not_pair_as_they_are(tmp_path, monkeypatch):
    # ignoring the suffix loops over ids in Python (seconds at a million cells): only ids that need it go through it
    from spatialcx.io import _tenx

    stripped: list[int] = []
    strip = _tenx._strip_suffix
    monkeypatch.setattr(_tenx, "_strip_suffix", lambda ids: stripped.append(len(ids)) or strip(ids))
    # a Xenium Explorer export of some of the table's cells: every file cell pairs as it is, nothing to strip
    (tmp_path / "groups.csv").write_text("cell_id,group\naaabckmo-1,T cell\naaabhbfn-1,B cell\n")
    adata = ad.AnnData(obs=pd.DataFrame({"cell_id": ["aaabckmo-1", "aaabhbfn-1", "aaabmaca-1"]}, index=["0", "1", "2"]))
    scx.io.add_10x_cell_types(adata, tmp_path / "groups.csv", add_ontology=False)
    assert adata.uns["10x"]["id_source"] == "obs['cell_id']" and stripped == []
    # ids of which some lack the suffix: the file's ids, then only the table ids that did not pair as they are
    (tmp_path / "mixed.csv").write_text("cell_id,group\na-1,T cell\nb-1,B cell\nc-1,B cell\nz-1,T cell\n")
    adata = ad.AnnData(obs=pd.DataFrame({"cell_id": ["a-1", "b-1", "c", "q-1"]}, index=["0", "1", "2", "3"]))
    scx.io.add_10x_cell_types(adata, tmp_path / "mixed.csv", add_ontology=False)
    assert adata.uns["10x"]["id_source"] == "obs['cell_id'] (suffix ignored)"
    assert adata.obs["10x_fine"].astype(object).tolist()[:3] == ["T cell", "B cell", "B cell"]
    assert stripped == [4, 2, 4]  # file ids; 'c' and 'q-1' of obs['cell_id']; obs_names (none paired as they are)


def test_read_errors_name_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "segmented_outs" / "cell_types" / "Azimuth"
    folder.mkdir(parents=True)
    path = folder / "cell_types.csv"
    # the folder was passed: the message names the file found in it, not only "cell_types.csv"
    path.write_text("barcode,fine_cell_type\n")
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " has a header"):
        scx.io.read_10x_cell_types(tmp_path / "segmented_outs")
    path.write_text("barcode,fine_cell_type\na-1,T cell\n ,B cell\n")
    with pytest.raises(
        ValueError, match=r"1 row\(s\) without a barcode / cell id \(e.g. data row 2\).*Remove those rows"
    ):
        scx.io.read_10x_cell_types(path)
    # a numeric column is named as the file names it
    path.write_text("barcode,fine_cell_type,final_level_softmax_prob\na-1,T cell,high\nb-1,B cell,0.9\n")
    with pytest.raises(
        ValueError, match=r"column 'final_level_softmax_prob' \(read as 'softmax_probability'\) has 1 non-numeric"
    ):
        scx.io.read_10x_cell_types(path)
    path.write_text("")
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " is empty.*Pass the file"):
        scx.io.read_10x_cell_types(path)


def test_xenium_output_folder_points_to_the_analysis_archive(tmp_path):
    import gzip
    import tarfile

    # a Xenium output folder as the instrument writes it: the clusters only inside analysis.tar.gz
    labels = pd.Series(["1", "2"], index=["aaabckmo-1", "aaabhbfn-1"])
    analysis = _analysis_folder(
        tmp_path / "work", {"gene_expression_graphclust": labels, "gene_expression_kmeans_2_clusters": labels}
    )
    out = tmp_path / "output-XETG00000__0011111__Region_1"
    out.mkdir()
    with tarfile.open(out / "analysis.tar.gz", "w:gz") as tar:
        tar.add(analysis, arcname="analysis")
    (out / "cells.csv.gz").write_bytes(gzip.compress(b"cell_id,x_centroid\naaabckmo-1,1.0\n"))
    for name in ("analysis.zarr.zip", "cells.zarr.zip"):
        (out / name).write_bytes(b"PK\x05\x06" + bytes(18))
    with pytest.raises(
        FileNotFoundError, match=r"only inside archives \(\['analysis.tar.gz'\]\).*gene_expression_graphclust/clusters"
    ):
        scx.io.read_10x_cell_types(out)


def test_spaces_around_labels_are_removed(tmp_path):
    # a hand-made export with a space after each comma: " T cell" would be another category than "T cell"
    (tmp_path / "groups.csv").write_text("cell_id, group\na-1, T cell\nb-1, B cell \nc-1,T cell\nd-1,  \n")
    df = scx.io.read_10x_cell_types(tmp_path / "groups.csv")
    assert df["fine_cell_type"].tolist()[:3] == ["T cell", "B cell", "T cell"] and pd.isna(df["fine_cell_type"].iloc[3])
    adata = table(["a-1", "b-1", "c-1", "d-1"], extra=0)
    scx.io.add_10x_cell_types(adata, df)
    assert adata.obs["10x_fine"].cat.categories.tolist() == ["B cell", "T cell"]
    assert adata.obs["10x_ontology_term_id"].astype(object).tolist()[:3] == ["CL:0000084", "CL:0000236", "CL:0000084"]
