from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import spatialdata as sd
import zarr

import spatialcx as scx
from spatialcx import _table
from spatialcx._table import WORK_DIR, get_table, resolve_table, write_table

pytestmark = pytest.mark.filterwarnings(
    "ignore:SpatialData is not stored in the most current format:UserWarning",
    "ignore:Consolidated metadata is currently not part:UserWarning",
    "ignore:zarr v3 autosharding:UserWarning",
)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _synthetic_sdata(n: int = 60, n_genes: int = 12, seed: int = 0):
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(seed)
    circles = ShapesModel.parse(rng.uniform(0, 100, (n, 2)), geometry=0, radius=np.ones(n))
    X = sp.random(n, n_genes, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.round(X.data * 10) + 1  # integer counts
    obs = pd.DataFrame(
        {"region": pd.Categorical(["cells"] * n), "cell_id": np.arange(n)}, index=[f"cell{i}" for i in range(n)]
    )
    var = pd.DataFrame(index=[f"Gene{i}" for i in range(n_genes)])
    table = TableModel.parse(
        ad.AnnData(X, obs=obs, var=var), region="cells", region_key="region", instance_key="cell_id"
    )
    return sd.SpatialData(shapes={"cells": circles}, tables={"table": table})


@pytest.fixture
def v3_store(tmp_path) -> Path:
    """A synthetic SpatialData written fresh with the current spatialdata (zarr v3, consolidated metadata)."""
    path = tmp_path / "synthetic.zarr"
    _synthetic_sdata().write(path)
    return path


@pytest.fixture
def v2_store(tmp_path) -> Path:
    """The same synthetic SpatialData in the older container format (zarr v2, ``.zmetadata``)."""
    from spatialdata._io.format import SpatialDataContainerFormatV01

    path = tmp_path / "synthetic_v2.zarr"
    _synthetic_sdata().write(path, sdata_formats=[SpatialDataContainerFormatV01()])
    return path


def _snapshot(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``path`` with (inode, mtime, size)."""
    out = {}
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), path)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _under(snapshot: dict, prefix: str) -> dict:
    return {k: v for k, v in snapshot.items() if k.startswith(prefix)}


def _annotate(adata: ad.AnnData) -> None:
    """Add what a cell-typing run adds: categorical + float obs columns, an obsm matrix, nested uns params."""
    n = adata.n_obs
    adata.obs["cell_type"] = pd.Categorical(np.where(np.arange(n) % 3 == 0, "Astrocyte", "Neuron"))
    adata.obs["cell_type_confidence"] = np.linspace(0.0, 1.0, n)
    adata.obsm["cell_type_decision_scores"] = np.random.default_rng(0).normal(size=(n, 4))
    adata.uns["cell_type"] = {"params": {"threshold": 0.8, "labels": ["Astrocyte", "Neuron"]}, "n_classes": 2}


def _formats(path: Path) -> set[str]:
    names = {f for _, _, files in os.walk(path) for f in files}
    return {fmt for fmt, marker in (("v3", "zarr.json"), ("v2", ".zgroup")) if marker in names}


# --------------------------------------------------------------------------------------------------------------------
# resolving
# --------------------------------------------------------------------------------------------------------------------


def test_resolve_anndata_ignores_table_key():
    adata = ad.AnnData(np.ones((3, 2)))
    ref = resolve_table(adata, table_key="does_not_matter")
    assert ref.adata is adata
    assert ref.sdata is None
    ref.adata.obs["x"] = [1, 2, 3]
    assert ref.finish() is None
    assert list(adata.obs["x"]) == [1, 2, 3]
    assert get_table(adata, "anything") is adata


def test_resolve_anndata_view_becomes_actual():
    adata = ad.AnnData(np.arange(12.0).reshape(4, 3))
    view = adata[:2]
    ref = resolve_table(view)
    assert not ref.adata.is_view
    ref.adata.obs["x"] = ["a", "b"]
    assert "x" not in adata.obs  # the parent is untouched
    assert list(view.obs["x"]) == ["a", "b"]


def test_get_table_reads_a_view_without_copying_it():
    adata = ad.AnnData(sp.random(40, 5, density=0.3, format="csr", random_state=0))
    adata.obs["group"] = pd.Categorical(["a", "b"] * 20)
    view = adata[adata.obs["group"] == "a"]
    table = get_table(view)
    assert table is view and table.is_view  # nothing copied, the caller's view left as it was
    assert table.X.shape == (20, 5)
    assert "x" not in adata.obs


def test_views_of_a_backed_anndata(tmp_path):
    """A view of a backed AnnData can be read, and changed (it is read into memory; the file is left alone)."""
    path = tmp_path / "backed.h5ad"
    ad.AnnData(np.arange(12.0).reshape(4, 3)).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        view = backed[:2]
        table = get_table(view)
        assert table is view and table.is_view and table.isbacked
        ref = resolve_table(view)
        assert not ref.adata.is_view and not ref.adata.isbacked
        np.testing.assert_array_equal(ref.adata.X, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
        ref.adata.obs["x"] = ["a", "b"]
        assert "x" not in backed.obs
    finally:
        backed.file.close()
    assert "x" not in ad.read_h5ad(path).obs


def test_resolve_spatialdata():
    sdata = _synthetic_sdata()
    ref = resolve_table(sdata)
    assert ref.adata is sdata.tables["table"]
    assert ref.sdata is sdata
    assert ref.table_key == "table"
    assert get_table(sdata) is sdata.tables["table"]


def test_wrong_key_lists_available_tables():
    sdata = _synthetic_sdata()
    sdata.tables["other"] = sdata.tables["table"].copy()
    with pytest.raises(KeyError, match=r"'cells_table' not found.*\['other', 'table'\]"):
        resolve_table(sdata, table_key="cells_table")
    with pytest.raises(KeyError, match="Available tables"):
        get_table(sdata, "nope")


def test_no_tables():
    sdata = _synthetic_sdata()
    del sdata.tables["table"]
    with pytest.raises(KeyError, match="has no tables"):
        resolve_table(sdata)


@pytest.mark.parametrize("bad", [pd.DataFrame({"a": [1]}), np.ones((2, 2)), "table.zarr"])
def test_wrong_type(bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        resolve_table(bad)


def test_copy_anndata_leaves_original_untouched():
    adata = ad.AnnData(np.ones((4, 2)))
    ref = resolve_table(adata, copy=True)
    assert ref.adata is not adata
    ref.adata.obs["label"] = list("abcd")
    ref.adata.uns["params"] = {"k": 1}
    out = ref.finish()
    assert out is ref.adata
    assert list(out.obs["label"]) == list("abcd")
    assert "label" not in adata.obs and "params" not in adata.uns


def test_copy_spatialdata_returns_new_object_sharing_other_elements(v3_store):
    sdata = sd.read_zarr(v3_store)
    on_disk = _snapshot(v3_store)
    ref = resolve_table(sdata, copy=True)
    assert ref.adata is not sdata.tables["table"]
    ref.adata.obs["label"] = "x"
    out = ref.finish(write=True)
    assert isinstance(out, sd.SpatialData)
    assert out is not sdata
    assert out.path is None  # in memory: nothing was written
    assert out.shapes["cells"] is sdata.shapes["cells"]
    assert out.tables["table"] is ref.adata
    assert "label" in out.tables["table"].obs
    assert "label" not in sdata.tables["table"].obs
    assert out.tables["table"].uns["spatialdata_attrs"] == sdata.tables["table"].uns["spatialdata_attrs"]
    assert _snapshot(v3_store) == on_disk


def test_finish_puts_a_replaced_table_into_the_spatialdata():
    sdata = _synthetic_sdata()
    ref = resolve_table(sdata)
    ref.adata = ref.adata.copy()
    ref.adata.obs["x"] = 1.0
    assert ref.finish() is None
    assert sdata.tables["table"] is ref.adata


def test_finish_on_in_memory_spatialdata_writes_nothing():
    sdata = _synthetic_sdata()
    ref = resolve_table(sdata)
    ref.adata.obs["x"] = 1.0
    assert ref.finish(write=True) is None
    assert "x" in sdata.tables["table"].obs


# --------------------------------------------------------------------------------------------------------------------
# write_table: errors
# --------------------------------------------------------------------------------------------------------------------


def test_write_table_not_backed():
    sdata = _synthetic_sdata()
    with pytest.raises(ValueError, match=r"not backed.*sdata\.write\(path\)"):
        write_table(sdata)


def test_write_table_needs_spatialdata():
    with pytest.raises(TypeError, match="AnnData"):
        write_table(ad.AnnData(np.ones((2, 2))))


def test_write_table_remote_store_is_refused():
    sdata = _synthetic_sdata()
    sdata.path = "s3://bucket/sample.zarr"
    with pytest.raises(ValueError, match="remote store 's3://bucket/sample.zarr'.*local"):
        write_table(sdata)


def test_write_table_missing_store(tmp_path):
    sdata = _synthetic_sdata()
    sdata.path = tmp_path / "gone.zarr"
    with pytest.raises(ValueError, match="does not exist"):
        write_table(sdata)


@pytest.mark.parametrize(
    ("elements", "match"),
    [(("obs", "X"), "never rewrites X"), (("layers",), "raw counts"), (("obsn",), "not a table element")],
)
def test_write_table_bad_elements(v3_store, elements, match):
    sdata = sd.read_zarr(v3_store)
    before = _snapshot(v3_store)
    with pytest.raises(ValueError, match=match):
        write_table(sdata, elements=elements)
    assert _snapshot(v3_store) == before


def test_unserialisable_uns_raises_before_anything_changes(v3_store):
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    table.obs["label"] = "x"
    table.uns["cell_type"] = {"params": {"callback": object(), "threshold": 0.8}}
    before = _snapshot(v3_store)
    with pytest.raises(ValueError, match=r"uns\['cell_type'\]\['params'\]\['callback'\] holds a builtins\.object"):
        write_table(sdata)
    assert _snapshot(v3_store) == before
    assert not (v3_store / WORK_DIR).exists()


def test_broken_link_is_refused(v3_store):
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    before = _snapshot(v3_store)
    del table.uns["spatialdata_attrs"]
    with pytest.raises(ValueError, match="spatialdata_attrs.*removed"):
        write_table(sdata)
    sdata2 = sd.read_zarr(v3_store)
    table2 = sdata2.tables["table"]
    del table2.obs["cell_id"]
    with pytest.raises(ValueError, match="link to the spatial elements"):
        write_table(sdata2)
    assert _snapshot(v3_store) == before


@pytest.mark.parametrize("store", ["v3_store", "v2_store"])
def test_keys_spatialdata_cannot_read_are_refused_before_anything_is_written(store, request):
    """One bad key in a table and spatialdata.read_zarr refuses the whole store: such keys are never written."""
    path = request.getfixturevalue(store)
    sdata = sd.read_zarr(path)
    sdata.tables["plain"] = ad.AnnData(np.ones((3, 2)))  # a table without a link to shapes
    write_table(sdata, "plain")
    before = _snapshot(path)

    sdata.tables["plain"].obs["cell type"] = "T"
    with pytest.raises(ValueError, match=r"obs\['cell type'\].*only alphanumeric.*sanitize_table.*Nothing was written"):
        write_table(sdata, "plain")
    table = sdata.tables["table"]
    table.obs["cell_type"] = "T"
    table.obs["Cell_Type"] = "T"
    table.obs[3] = 1.0
    with pytest.raises(ValueError, match=r"obs\['Cell_Type'\].*only in case; obs\[3\].*type int") as info:
        write_table(sdata, "table")
    assert "link" not in str(info.value)
    assert _snapshot(path) == before
    back = sd.read_zarr(path)  # the store still opens
    assert set(back.tables) == {"table", "plain"}

    # keys of elements that are not written do not matter: the store keeps its own
    del table.obs["Cell_Type"], table.obs[3]
    table.layers["raw counts"] = table.X.copy()
    write_table(sdata, "table", elements=("obs",))
    assert (sd.read_zarr(path).tables["table"].obs["cell_type"] == "T").all()


@pytest.mark.parametrize("store", ["v3_store", "v2_store"])
def test_a_changed_link_is_written_with_obs_and_uns_together(store, request):
    from spatialdata.models import ShapesModel

    path = request.getfixturevalue(store)
    sdata = sd.read_zarr(path)
    n = sdata.tables["table"].n_obs
    rng = np.random.default_rng(1)
    sdata.shapes["cells2"] = ShapesModel.parse(rng.uniform(0, 100, (n, 2)), geometry=0, radius=np.ones(n))
    sdata.write_element("cells2")
    before = _snapshot(path)
    table = sdata.tables["table"]
    table.obs["region"] = pd.Categorical(["cells2"] * n)
    sdata.set_table_annotates_spatialelement("table", region="cells2", region_key="region", instance_key="cell_id")
    for elements in [("obs",), ("uns",), ("obs", "obsm")]:
        with pytest.raises(ValueError, match="link of table 'table' to its spatial elements changed"):
            write_table(sdata, elements=elements)
    assert _snapshot(path) == before
    write_table(sdata, elements=("obs", "uns"))
    again = sd.read_zarr(path)  # readable, linked to the new shapes
    assert again.tables["table"].uns["spatialdata_attrs"]["region"] == "cells2"
    assert set(again.tables["table"].obs["region"]) == {"cells2"}
    table.obs["note"] = "x"  # the link is unchanged now: obs alone is fine
    write_table(sdata, elements=("obs",))
    assert "note" in sd.read_zarr(path).tables["table"].obs


def test_table_that_no_longer_matches_the_store_is_refused(v3_store):
    sdata = sd.read_zarr(v3_store)
    before = _snapshot(v3_store)
    table = sdata.tables["table"]
    sdata.tables["table"] = table[::-1].copy()  # same cells, other order
    with pytest.raises(ValueError, match="cells .* differ"):
        write_table(sdata)
    sdata.tables["table"] = table[:, :5].copy()
    with pytest.raises(ValueError, match="genes .* differ"):
        write_table(sdata)
    assert _snapshot(v3_store) == before


# --------------------------------------------------------------------------------------------------------------------
# write_table: real and synthetic stores
# --------------------------------------------------------------------------------------------------------------------


def test_real_store_round_trip(merfish_store, shared_data):
    pristine = sd.read_zarr(shared_data("merfish_visp_spatialdata", "merfish.zarr")).tables["table"]
    sdata = sd.read_zarr(merfish_store)
    table = sdata.tables["table"]
    before = _snapshot(merfish_store)
    formats_before = _formats(merfish_store)
    _annotate(table)

    scx.io.write_table(sdata, "table")

    after = _snapshot(merfish_store)
    # X, var, the other elements and the rest of the store: the very same files (inode, mtime, size)
    for prefix in ("tables/table/X", "tables/table/var", "tables/table/layers", "images", "shapes"):
        assert _under(after, prefix) == _under(before, prefix), prefix
    assert _under(after, "tables/table/X")
    assert _formats(merfish_store) == formats_before == {"v2"}
    assert not (merfish_store / WORK_DIR).exists()

    back = sd.read_zarr(merfish_store)
    table2 = back.tables["table"]
    pd.testing.assert_frame_equal(table2.obs, table.obs)
    assert isinstance(table2.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert table2.obs["cell_type_confidence"].dtype == np.float64
    np.testing.assert_array_equal(table2.obsm["cell_type_decision_scores"], table.obsm["cell_type_decision_scores"])
    assert table2.uns["cell_type"]["params"]["threshold"] == 0.8
    assert list(table2.uns["cell_type"]["params"]["labels"]) == ["Astrocyte", "Neuron"]
    assert table2.uns["spatialdata_attrs"] == pristine.uns["spatialdata_attrs"]
    assert back.get_annotated_regions(table2) == ["cells"]
    assert back.get_instance_key_column(table2).equals(pristine.obs["cell_id"])
    np.testing.assert_array_equal(np.asarray(table2.X), np.asarray(pristine.X))
    attrs = json.loads((merfish_store / "tables/table/.zattrs").read_text())
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("cells", "region", "cell_id")

    # the store's consolidated metadata (undotted ``zmetadata`` in this copy) was refreshed, not left stale
    consolidated = zarr.open_group(str(merfish_store), mode="r", use_consolidated="zmetadata")
    assert {"cell_type", "cell_type_confidence"} <= set(consolidated["tables/table/obs"].keys())
    assert "cell_type_decision_scores" in consolidated["tables/table/obsm"]
    assert not (merfish_store / ".zmetadata").exists()  # no new consolidated file was added


@pytest.mark.parametrize("store", ["v3_store", "v2_store"])
def test_synthetic_store_round_trip(store, request):
    path = request.getfixturevalue(store)
    sdata = sd.read_zarr(path)
    table = sdata.tables["table"]
    X_before = table.X.toarray()
    before = _snapshot(path)
    _annotate(table)

    write_table(sdata)

    after = _snapshot(path)
    x_files = _under(before, "tables/table/X")
    assert x_files and _under(after, "tables/table/X") == x_files
    assert _under(after, "tables/table/var") == _under(before, "tables/table/var")
    assert _under(after, "shapes") == _under(before, "shapes")
    expected = {"v3"} if store == "v3_store" else {"v2"}
    assert _formats(path / "tables" / "table") == expected
    assert not (path / WORK_DIR).exists()

    back = sd.read_zarr(path)
    table2 = back.tables["table"]
    pd.testing.assert_frame_equal(table2.obs, table.obs)
    np.testing.assert_array_equal(table2.obsm["cell_type_decision_scores"], table.obsm["cell_type_decision_scores"])
    np.testing.assert_array_equal(table2.X.toarray(), X_before)
    assert table2.uns["spatialdata_attrs"] == {"region": "cells", "region_key": "region", "instance_key": "cell_id"}
    assert back.get_annotated_regions(table2) == ["cells"]

    # readers that trust the consolidated metadata see the new elements
    consolidated = zarr.open_group(str(path), mode="r", use_consolidated=True)
    assert "cell_type" in consolidated["tables/table/obs"]
    assert "cell_type" in consolidated["tables/table/uns"]


@pytest.mark.parametrize("store", ["v3_store", "v2_store"])
def test_text_with_missing_values_stays_missing(store, request):
    """anndata writes an object column of strings as text, so None/NaN came back as the strings 'None'/'nan'."""
    path = request.getfixturevalue(store)
    sdata = sd.read_zarr(path)
    table = sdata.tables["table"]
    n = table.n_obs
    text = ["B cell" if i % 3 else None for i in range(n)]
    table.obs["label"] = pd.Series(text, index=table.obs_names, dtype=object)
    table.obs["note"] = pd.Series(["x" if i % 2 else np.nan for i in range(n)], index=table.obs_names, dtype=object)
    table.obs["empty"] = pd.Series([None] * n, index=table.obs_names, dtype=object)
    table.obs["name"] = pd.Series([f"c{i}" for i in range(n)], index=table.obs_names, dtype=object)  # no missing
    table.obsm["meta"] = pd.DataFrame({"source": pd.Series(text, index=table.obs_names, dtype=object)})

    write_table(sdata)

    assert table.obs["label"].dtype == object and table.obs["label"].isna().sum() == 20  # memory untouched
    back = sd.read_zarr(path).tables["table"]
    for key, frame in (("label", back.obs), ("note", back.obs), ("empty", back.obs), ("source", back.obsm["meta"])):
        written = pd.Series(frame[key]).astype(object)
        expected = (table.obs[key] if key != "source" else table.obsm["meta"][key]).to_numpy()
        np.testing.assert_array_equal(written.isna().to_numpy(), pd.isna(expected), err_msg=key)
        assert not written.isin(["None", "nan"]).any(), key
        assert (written.dropna() == pd.Series(expected).dropna().to_numpy()).all(), key
    assert back.obs["name"].dtype == object and back.obs["name"].tolist() == table.obs["name"].tolist()


def test_a_value_anndata_cannot_store_is_named_with_the_fix(v3_store):
    sdata = sd.read_zarr(v3_store)
    sdata.tables["table"].obs["acquired"] = pd.date_range("2024-01-01", periods=sdata.tables["table"].n_obs)
    before = _snapshot(v3_store)
    with pytest.raises(Exception, match="DatetimeArray") as info:
        write_table(sdata)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "'acquired'" in notes and "astype(str)" in notes and "left unchanged" in notes
    assert _snapshot(v3_store) == before and not (v3_store / WORK_DIR).exists()


def test_another_table_with_the_same_names_is_refused(v3_store):
    """Tables named by position ('cell0', ... here) share their names: the layout of X tells them apart."""
    sdata = sd.read_zarr(v3_store)
    other = _synthetic_sdata(seed=1).tables["table"]  # same cells and genes names, other counts
    other.obs["cell_type"] = "T cell"
    sdata.tables["table"] = other
    before = _snapshot(v3_store)
    with pytest.raises(ValueError, match=r"different table put in place.*new key.*Nothing was written"):
        write_table(sdata)
    assert _snapshot(v3_store) == before

    # the table read from the store, with X transformed in memory (same stored values), is written
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    table.X = table.X.multiply(1e4 / np.maximum(table.X.sum(axis=1), 1)).tocsr().log1p()
    table.obs["cell_type"] = "T cell"
    write_table(sdata, elements=("obs",))
    assert (sd.read_zarr(v3_store).tables["table"].obs["cell_type"] == "T cell").all()


def test_repeated_writes_change_dtype_and_delete(v3_store):
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    _annotate(table)
    write_table(sdata)

    table.obs["cell_type_confidence"] = table.obs["cell_type_confidence"].round(1).astype(str)  # float -> str
    table.obs["cell_type"] = table.obs["cell_type"].cat.codes.astype(np.int32)  # categorical -> int
    del table.obsm["cell_type_decision_scores"]
    del table.uns["cell_type"]
    table.obs["extra"] = True
    write_table(sdata)
    back = sd.read_zarr(v3_store).tables["table"]
    pd.testing.assert_frame_equal(back.obs, table.obs)
    assert back.obs["cell_type"].dtype == np.int32
    assert "cell_type_decision_scores" not in back.obsm
    assert "cell_type" not in back.uns

    del table.obs["extra"]
    write_table(sdata, elements="obs")
    back = sd.read_zarr(v3_store)
    assert "extra" not in back.tables["table"].obs
    consolidated = zarr.open_group(str(v3_store), mode="r", use_consolidated=True)
    assert "extra" not in consolidated["tables/table/obs"]
    assert not (v3_store / WORK_DIR).exists()


def test_only_named_elements_are_written(v3_store):
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    before = _snapshot(v3_store)
    table.obs["label"] = "a"
    table.uns["params"] = {"k": 1}
    write_table(sdata, elements=("uns",))
    after = _snapshot(v3_store)
    assert _under(after, "tables/table/obs") == _under(before, "tables/table/obs")
    back = sd.read_zarr(v3_store).tables["table"]
    assert "label" not in back.obs
    assert back.uns["params"]["k"] == 1


def test_finish_writes_backed_spatialdata(v3_store):
    sdata = sd.read_zarr(v3_store)
    ref = resolve_table(sdata)
    ref.adata.obs["not_written"] = 1.0
    assert ref.finish(write=False) is None
    assert "not_written" not in sd.read_zarr(v3_store).tables["table"].obs

    ref = resolve_table(sdata)
    ref.adata.obs["written"] = 2.0
    assert ref.finish() is None
    back = sd.read_zarr(v3_store).tables["table"].obs
    assert (back["written"] == 2.0).all()
    assert "not_written" in back  # it was in memory too, and obs is written whole


@pytest.mark.parametrize("store", ["v3_store", "v2_store"])
def test_new_table_is_written_whole(store, request):
    from spatialdata.models import TableModel

    path = request.getfixturevalue(store)
    sdata = sd.read_zarr(path)
    obs = sdata.tables["table"].obs[["region", "cell_id"]].copy()
    sdata.tables["scores"] = TableModel.parse(
        ad.AnnData(np.arange(obs.shape[0] * 2.0).reshape(-1, 2), obs=obs),
        region="cells",
        region_key="region",
        instance_key="cell_id",
    )
    write_table(sdata, "scores")
    assert not (path / WORK_DIR).exists()
    back = sd.read_zarr(path)
    np.testing.assert_array_equal(back.tables["scores"].X, sdata.tables["scores"].X)
    assert back.get_annotated_regions(back.tables["scores"]) == ["cells"]
    expected = {"v3"} if store == "v3_store" else {"v2"}
    assert _formats(path / "tables" / "scores") == expected
    consolidated = zarr.open_group(str(path), mode="r", use_consolidated=True)
    assert "scores" in consolidated["tables"]


# --------------------------------------------------------------------------------------------------------------------
# crash safety
# --------------------------------------------------------------------------------------------------------------------


def _fail_on_call(monkeypatch, n_ok: int):
    """Make anndata's write_elem fail after ``n_ok`` successful calls."""
    import anndata.io

    real = anndata.io.write_elem
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(anndata.io, "write_elem", flaky)
    return calls


def test_failure_while_staging_leaves_old_table(v3_store, monkeypatch):
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    _annotate(table)
    before = _snapshot(v3_store)
    # uns is checked in memory first (1 call), then obs is staged (1 call), then obsm fails
    calls = _fail_on_call(monkeypatch, n_ok=2)
    with pytest.raises(OSError, match="simulated") as info:
        write_table(sdata)
    assert calls["n"] == 3
    assert any("left unchanged" in note for note in getattr(info.value, "__notes__", []))
    assert _snapshot(v3_store) == before
    back = sd.read_zarr(v3_store).tables["table"]
    assert "cell_type" not in back.obs

    monkeypatch.undo()
    write_table(sdata)
    back = sd.read_zarr(v3_store).tables["table"]
    pd.testing.assert_frame_equal(back.obs, table.obs)
    assert not (v3_store / WORK_DIR).exists()


def test_failure_in_swap_leaves_old_table(v3_store, monkeypatch):
    sdata = sd.read_zarr(v3_store)
    _annotate(sdata.tables["table"])
    before = _snapshot(v3_store)

    def broken(a, b):
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(_table, "_exchange", broken)
    with pytest.raises(OSError, match="simulated"):
        write_table(sdata)
    assert _snapshot(v3_store) == before
    assert "cell_type" not in sd.read_zarr(v3_store).tables["table"].obs


def test_fallback_two_step_rename(v3_store, monkeypatch):
    """Without renameat2 the table is renamed aside and the new one renamed in."""
    monkeypatch.setattr(_table, "_exchange", lambda a, b: False)
    sdata = sd.read_zarr(v3_store)
    _annotate(sdata.tables["table"])
    x_before = _under(_snapshot(v3_store), "tables/table/X")
    write_table(sdata)
    assert _under(_snapshot(v3_store), "tables/table/X") == x_before
    assert "cell_type" in sd.read_zarr(v3_store).tables["table"].obs
    assert not (v3_store / WORK_DIR).exists()

    # an error between the two renames puts the old table straight back
    sdata.tables["table"].obs["second"] = 1

    def fail(staged, live):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(_table, "_move_in", fail)
    with pytest.raises(OSError, match="simulated"):
        write_table(sdata)
    back = sd.read_zarr(v3_store).tables["table"]
    assert "cell_type" in back.obs and "second" not in back.obs
    assert not (v3_store / WORK_DIR).exists()


def test_exchange_swaps_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not _table._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this platform or file system")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import anndata.io
    import spatialdata as sd
    from spatialcx import _table

    path, mode = sys.argv[1], sys.argv[2]
    sdata = sd.read_zarr(path)
    sdata.tables["table"].obs["crashed_write"] = 1.5
    sdata.tables["table"].obsm["crashed_scores"] = sdata.tables["table"].obs[["crashed_write"]].to_numpy()
    die = lambda *args, **kwargs: os._exit(17)
    if mode == "mid_staging":  # obs staged, obsm half way
        real, calls = anndata.io.write_elem, []
        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) > 2:
                os._exit(17)
            return real(*args, **kwargs)
        anndata.io.write_elem = flaky
    elif mode == "before_swap":
        _table._swap = die
    elif mode == "after_swap":
        _table._cleanup = die
    elif mode == "between_renames":
        _table._exchange = lambda a, b: False
        _table._move_in = die
    _table.write_table(sdata, "table")
    """
)


def _crash_write(path: Path, mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(path), mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr


@pytest.mark.parametrize("mode", ["mid_staging", "before_swap", "between_renames"])
def test_hard_crash_keeps_previous_table_and_next_write_recovers(v3_store, mode):
    sdata = sd.read_zarr(v3_store)  # read before the crash, as a running session would hold it
    x_before = _under(_snapshot(v3_store), "tables/table/X")

    _crash_write(v3_store, mode)

    assert (v3_store / WORK_DIR).exists()  # the crash left its staging behind
    if mode == "between_renames":
        assert not (v3_store / "tables" / "table").exists()
        assert (v3_store / WORK_DIR / "aside" / "table").is_dir()
    else:
        back = sd.read_zarr(v3_store).tables["table"]
        assert "crashed_write" not in back.obs  # the previous table, readable
        pd.testing.assert_frame_equal(back.obs, sdata.tables["table"].obs)

    _annotate(sdata.tables["table"])
    write_table(sdata)  # recovers, then writes

    assert not (v3_store / WORK_DIR).exists()
    back = sd.read_zarr(v3_store)
    table2 = back.tables["table"]
    pd.testing.assert_frame_equal(table2.obs, sdata.tables["table"].obs)
    assert "crashed_write" not in table2.obs
    assert back.get_annotated_regions(table2) == ["cells"]
    assert _under(_snapshot(v3_store), "tables/table/X") == x_before


def test_hard_crash_after_swap_refreshes_consolidated_metadata(v3_store):
    _crash_write(v3_store, "after_swap")
    # the new table is in place, only the cleanup and the metadata refresh were lost
    assert "crashed_write" in sd.read_zarr(v3_store).tables["table"].obs
    stale = zarr.open_group(str(v3_store), mode="r", use_consolidated=True)
    assert "crashed_write" not in stale["tables/table/obs"]

    sdata = sd.read_zarr(v3_store)
    sdata.tables["table"].obs["later"] = 0.5
    write_table(sdata, elements=("obs",))
    assert not (v3_store / WORK_DIR).exists()
    fresh = zarr.open_group(str(v3_store), mode="r", use_consolidated=True)
    assert {"crashed_write", "later"} <= set(fresh["tables/table/obs"].keys())


# --------------------------------------------------------------------------------------------------------------------
# shapes elements (the polygons of spatial domains)
# --------------------------------------------------------------------------------------------------------------------


def _squares(n: int, offset: float = 0.0):
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    polys = [shapely.box(offset + 10 * i, 0, offset + 10 * i + 5, 5) for i in range(n)]
    gdf = gpd.GeoDataFrame({"n_cells": np.arange(n) + 1}, geometry=polys, index=[f"domain_{i + 1}" for i in range(n)])
    return ShapesModel.parse(gdf)


@pytest.mark.parametrize("store", ["v3_store", "v2_store"])
def test_write_shapes_element_adds_then_replaces(store, request):
    path = request.getfixturevalue(store)
    formats = _formats(path)
    cells_before = _under(_snapshot(path), "shapes/cells")
    sdata = sd.read_zarr(path)
    sdata.shapes["domains"] = _squares(3)
    _table.write_shapes_element(sdata, "domains")
    back = sd.read_zarr(path)
    assert list(back.shapes["domains"].index) == ["domain_1", "domain_2", "domain_3"]

    sdata.shapes["domains"] = _squares(2, offset=100.0)
    _table.write_shapes_element(sdata, "domains")
    back = sd.read_zarr(path)
    assert list(back.shapes["domains"]["n_cells"]) == [1, 2]
    assert back.shapes["domains"].total_bounds[0] == 100.0
    assert _formats(path) == formats  # the store's zarr format is kept
    assert _under(_snapshot(path), "shapes/cells") == cells_before  # nothing else touched
    assert not (path / WORK_DIR).exists()
    assert "domains" in zarr.open_group(str(path), mode="r", use_consolidated=True)["shapes"]  # metadata refreshed


def test_write_shapes_element_unknown_key_raises(v3_store):
    sdata = sd.read_zarr(v3_store)
    with pytest.raises(KeyError, match="no shapes element 'nope'.*cells"):
        _table.write_shapes_element(sdata, "nope")


_SHAPES_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import geopandas as gpd, shapely
    import spatialdata as sd
    from spatialdata.models import ShapesModel
    from spatialcx import _table

    path, mode = sys.argv[1], sys.argv[2]
    sdata = sd.read_zarr(path)
    sdata.shapes["domains"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)], index=["new"]))
    die = lambda *args, **kwargs: os._exit(17)
    if mode == "mid_write":
        real = sdata._write_element
        def half(**kwargs):
            real(**kwargs)  # the staged element is complete; dying now leaves it in the work directory only
            os._exit(17)
        sdata._write_element = half
    elif mode == "between_renames":
        _table._exchange = lambda a, b: False
        _table._move_in = die
    _table.write_shapes_element(sdata, "domains")
    """
)


@pytest.mark.parametrize("mode", ["mid_write", "between_renames"])
def test_hard_crash_while_replacing_shapes_keeps_the_old_ones_and_recovers(v3_store, mode):
    sdata = sd.read_zarr(v3_store)
    sdata.shapes["domains"] = _squares(3)
    _table.write_shapes_element(sdata, "domains")

    proc = subprocess.run(
        [sys.executable, "-c", _SHAPES_CRASH_SCRIPT, str(v3_store), mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr
    assert (v3_store / WORK_DIR).exists()
    if mode == "between_renames":
        assert (v3_store / WORK_DIR / "aside-shapes" / "domains").is_dir()
    else:
        back = sd.read_zarr(v3_store)  # readable, with the previous polygons
        assert list(back.shapes["domains"].index) == ["domain_1", "domain_2", "domain_3"]

    sdata.tables["table"].obs["later"] = 1.0
    write_table(sdata, elements=("obs",))  # any later write recovers first
    assert not (v3_store / WORK_DIR).exists()
    back = sd.read_zarr(v3_store)
    assert list(back.shapes["domains"].index) == ["domain_1", "domain_2", "domain_3"]
    assert "later" in back.tables["table"].obs


@pytest.mark.parametrize("store", ["v3_store", "v2_store"])
def test_remove_shapes_element(store, request):
    path = request.getfixturevalue(store)
    sdata = sd.read_zarr(path)
    sdata.shapes["domains"] = _squares(3)
    _table.write_shapes_element(sdata, "domains")
    formats = _formats(path)
    cells_before = _under(_snapshot(path), "shapes/cells")

    assert _table.remove_shapes_element(sdata, "domains") is True
    assert "domains" in sdata.shapes  # the object in memory is the caller's business
    assert not (path / "shapes" / "domains").exists() and not (path / WORK_DIR).exists()
    back = sd.read_zarr(path)
    assert list(back.shapes) == ["cells"] and "table" in back.tables
    assert "domains" not in zarr.open_group(str(path), mode="r", use_consolidated=True)["shapes"]
    assert _formats(path) == formats and _under(_snapshot(path), "shapes/cells") == cells_before
    assert _table.remove_shapes_element(sdata, "domains") is False  # nothing left to remove


_REMOVE_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import spatialdata as sd
    from spatialcx import _table

    path, mode = sys.argv[1], sys.argv[2]
    sdata = sd.read_zarr(path)
    if mode == "after_metadata":
        real_drop = _table._drop_from_consolidated
        def then_die(*args):
            real_drop(*args)  # the metadata no longer lists the element; its files are still in place
            os._exit(17)
        _table._drop_from_consolidated = then_die
    else:  # after_move: the element's folder has left the store
        real_rename = os.rename
        def rename_then_die(src, dst):
            real_rename(src, dst)
            if str(src).endswith(os.path.join("shapes", "domains")):
                os._exit(17)
        os.rename = rename_then_die
    _table.remove_shapes_element(sdata, "domains")
    """
)


@pytest.mark.parametrize("mode", ["after_metadata", "after_move"])
def test_hard_crash_while_removing_shapes_leaves_a_readable_store(v3_store, mode):
    sdata = sd.read_zarr(v3_store)
    sdata.shapes["domains"] = _squares(3)
    _table.write_shapes_element(sdata, "domains")
    proc = subprocess.run(
        [sys.executable, "-c", _REMOVE_CRASH_SCRIPT, str(v3_store), mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr
    back = sd.read_zarr(v3_store)  # readable: the metadata never lists an element whose files are gone
    assert "cells" in back.shapes and "table" in back.tables
    _table.remove_shapes_element(sdata, "domains")  # the next call finishes the job (or finds it done)
    assert list(sd.read_zarr(v3_store).shapes) == ["cells"] and not (v3_store / WORK_DIR).exists()


def test_failed_write_restores_the_table_in_memory(v3_store, monkeypatch):
    """When the store cannot be written, the object in memory is put back as it was, so that the two still agree."""
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    table.uns["kept"] = {"a": 1}
    obs_before, uns_before = table.obs.copy(), {"kept": {"a": 1}}
    sdata_uns = dict(table.uns)
    before = _snapshot(v3_store)
    _fail_on_call(monkeypatch, n_ok=1)  # the in-memory uns check passes, staging obs fails
    ref = resolve_table(sdata, write=True)
    ref.adata.obs["cell_type"] = "T cell"
    ref.adata.obsm["scores"] = np.zeros((ref.adata.n_obs, 2))
    ref.adata.uns["kept"]["a"] = 2  # changed in place
    ref.adata.uns["new"] = "x"
    with pytest.raises(OSError, match="simulated") as info:
        ref.finish()
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "left as it was" in notes and "write=False" in notes
    assert sdata.tables["table"] is table
    pd.testing.assert_frame_equal(table.obs, obs_before)
    assert "scores" not in table.obsm
    assert set(table.uns) == set(sdata_uns) and table.uns["kept"] == uns_before["kept"] and "new" not in table.uns
    assert _snapshot(v3_store) == before


def test_ctrl_c_while_writing_puts_the_table_in_memory_back(v3_store, monkeypatch):
    """A KeyboardInterrupt before the new table is in place leaves memory as the store: both as they were."""
    import anndata.io

    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    obs_before = table.obs.copy()
    before = _snapshot(v3_store)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    ref = resolve_table(sdata, write=True)
    ref.adata.obs["cell_type"] = "T cell"
    ref.adata.uns["new"] = "x"
    monkeypatch.setattr(anndata.io, "write_elem", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        ref.finish()
    assert "left as it was" in " ".join(getattr(info.value, "__notes__", []))
    pd.testing.assert_frame_equal(table.obs, obs_before)
    assert "new" not in table.uns
    assert _snapshot(v3_store) == before


def test_ctrl_c_after_the_swap_keeps_the_results_in_memory(v3_store, monkeypatch):
    """A KeyboardInterrupt while tidying up after the new table is in place: the store has the results, memory too."""
    real = _table._refresh_consolidated

    def interrupted(group_dir):
        if Path(group_dir) == v3_store:  # the store's own metadata, refreshed after the swap
            raise KeyboardInterrupt
        real(group_dir)

    sdata = sd.read_zarr(v3_store)
    ref = resolve_table(sdata, write=True)
    ref.adata.obs["cell_type"] = "T cell"
    monkeypatch.setattr(_table, "_refresh_consolidated", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        ref.finish()
    assert getattr(info.value, _table.WRITTEN_ATTR) is True
    assert "cell_type" in sdata.tables["table"].obs
    monkeypatch.undo()
    assert (sd.read_zarr(v3_store).tables["table"].obs["cell_type"] == "T cell").all()


@pytest.mark.parametrize("key", ["a/b", "", "__x", 3])
def test_keys_that_cannot_be_stored_are_refused_before_anything_is_written(key):
    from spatialcx._table import check_key

    with pytest.raises((ValueError, TypeError), match="key_added"):
        check_key(key)
    assert check_key("cell_type_v2") == "cell_type_v2"


def test_a_write_that_only_failed_to_tidy_up_keeps_the_results_in_memory(v3_store, monkeypatch):
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]

    real = _table._refresh_consolidated

    def broken(group_dir):
        if Path(group_dir) == v3_store:  # the store's own metadata, refreshed after the swap
            raise OSError("consolidated metadata (simulated)")
        real(group_dir)

    monkeypatch.setattr(_table, "_refresh_consolidated", broken)
    ref = resolve_table(sdata, write=True)
    ref.adata.obs["cell_type"] = "T cell"
    with pytest.raises(OSError, match="simulated") as info:
        ref.finish()
    assert getattr(info.value, _table.WRITTEN_ATTR) is True
    assert "the tidying up" in " ".join(info.value.__notes__)
    assert "cell_type" in table.obs  # the store has it: so does memory
    monkeypatch.undo()
    assert (sd.read_zarr(v3_store).tables["table"].obs["cell_type"] == "T cell").all()


@pytest.mark.parametrize("exchange", [True, False])
def test_a_failure_right_after_the_swap_keeps_the_results_in_memory(v3_store, monkeypatch, exchange):
    """Once the new table is in place, a failing flush or removal of the old one must not undo the results in memory
    (the store has them)."""
    if not exchange:
        monkeypatch.setattr(_table, "_exchange", lambda a, b: False)
    tables_dir = v3_store / "tables"
    real = _table._fsync_dir

    def broken(path):
        if Path(path) == tables_dir:  # flushed only once the new table is in place
            raise OSError("fsync failed (simulated)")
        real(path)

    monkeypatch.setattr(_table, "_fsync_dir", broken)
    sdata = sd.read_zarr(v3_store)
    ref = resolve_table(sdata, write=True)
    ref.adata.obs["cell_type"] = "T cell"
    with pytest.raises(OSError, match="simulated") as info:
        ref.finish()
    assert getattr(info.value, _table.WRITTEN_ATTR, False) is True
    assert "left unchanged" not in " ".join(getattr(info.value, "__notes__", []))
    assert "cell_type" in sdata.tables["table"].obs
    monkeypatch.undo()
    assert (sd.read_zarr(v3_store).tables["table"].obs["cell_type"] == "T cell").all()
    sdata.tables["table"].obs["later"] = 1.0
    write_table(sdata, elements=("obs",))  # the next write tidies up
    assert not (v3_store / WORK_DIR).exists()


def _refuse_work_dir(monkeypatch, store: Path, code: int) -> None:
    """Creating the work directory fails as on a store without write permission (EACCES) or a read-only mount."""
    import errno

    real_mkdir = Path.mkdir
    error = PermissionError if code == errno.EACCES else OSError

    def refused(self, *args, **kwargs):
        if WORK_DIR in self.parts:
            raise error(code, os.strerror(code), str(store / WORK_DIR))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)


@pytest.mark.parametrize("code", ["EACCES", "EROFS"])
def test_read_only_store_says_so_and_changes_nothing(v3_store, monkeypatch, code):
    """A store the user may not write to (chmod a-w, a read-only mount): the error names the store and the way out."""
    import errno

    _refuse_work_dir(monkeypatch, v3_store, getattr(errno, code))
    sdata = sd.read_zarr(v3_store)
    before = _snapshot(v3_store)
    ref = resolve_table(sdata, write=True)
    ref.adata.obs["cell_type"] = "T cell"
    with pytest.raises(OSError, match=r"Cannot write into the zarr store .*read-only.*Nothing in the store") as info:
        ref.finish()
    assert info.value.errno == getattr(errno, code)
    assert "cell_type" not in sdata.tables["table"].obs  # memory and store still agree
    assert _snapshot(v3_store) == before


def test_removing_shapes_from_a_read_only_store_changes_nothing(v3_store, monkeypatch):
    """The consolidated metadata was rewritten without the element before the store turned out to be read-only."""
    import errno

    sdata = sd.read_zarr(v3_store)
    sdata.shapes["domains"] = _squares(3)
    _table.write_shapes_element(sdata, "domains")
    before = _snapshot(v3_store)
    _refuse_work_dir(monkeypatch, v3_store, errno.EACCES)
    with pytest.raises(PermissionError, match=r"Cannot write into the zarr store .*Nothing in the store"):
        _table.remove_shapes_element(sdata, "domains")
    assert _snapshot(v3_store) == before
    assert "domains" in zarr.open_group(str(v3_store), mode="r", use_consolidated=True)["shapes"]


def test_read_only_calls_take_no_snapshot(v3_store):
    import threading

    sdata = sd.read_zarr(v3_store)
    sdata.tables["table"].uns["lock"] = threading.Lock()  # cannot be copied
    assert resolve_table(sdata).before is None
    assert len(scx.pp.panel_genes(sdata)) == 12
    ref = resolve_table(sdata, write=True)
    assert ref.before is not None and ref.before[2]["lock"] is sdata.tables["table"].uns["lock"]


@pytest.mark.parametrize("error", [OSError("disk full (simulated)"), KeyboardInterrupt()])
def test_failed_write_of_domains_puts_the_shapes_back_too(v3_store, monkeypatch, error):
    sdata = sd.read_zarr(v3_store)
    table = sdata.tables["table"]
    table.obs["high"] = 1
    before_shapes = set(sdata.shapes)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(_table, "_stage_and_swap", broken)
    with pytest.raises(type(error)):
        scx.tl.spatial_domains(sdata, "high", value=1, max_distance=50.0, min_cells=2, add_shapes=True)
    assert set(sdata.shapes) == before_shapes and "domain" not in table.obs


def test_store_opened_by_a_relative_path_then_left_says_so(v3_store, tmp_path, monkeypatch):
    """spatialdata keeps a relative store path as given: after a change of working directory it points nowhere, and the
    error says that (it said the store may have been moved or deleted)."""
    monkeypatch.chdir(v3_store.parent)
    sdata = sd.read_zarr(v3_store.name)
    assert not Path(sdata.path).is_absolute()
    sdata.tables["table"].obs["x"] = 1.0
    write_table(sdata, "table", elements=("obs",))  # from the folder it was opened in: works
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match=r"relative path 'synthetic.zarr'.*working directory.*elsewhere.*sdata.path"):
        write_table(sdata, "table", elements=("obs",))
    sdata.path = v3_store  # the fix the message gives
    write_table(sdata, "table", elements=("obs",))
    assert "x" in sd.read_zarr(v3_store).tables["table"].obs
