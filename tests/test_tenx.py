"""Tests of scx.io.read_10x_cell_types and scx.io.add_10x_cell_types."""

from __future__ import annotations

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
        (pd.DataFrame({"barcode": ["a"], "label": ["B"]}), "no cell type column"),
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
