"""scx.tl.annotate end to end: the demo, a real SpatialData store, the real scRNA-seq -> MERFISH pair, the CLI."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatialcx as scx
from spatialcx.cli import main as cli_main


@pytest.fixture(scope="module")
def demo_small():
    return scx.datasets.demo(n_cells=1500, n_reference_cells=3000, random_state=0)


def test_annotate_demo_writes_cellxgene_columns_and_store(demo_small, tmp_path):
    import spatialdata as sd

    sdata, reference = demo_small
    store = tmp_path / "demo.zarr"
    sdata.write(store)
    sdata = sd.read_zarr(store)
    x_before = sdata.tables["table"].X.copy()
    scx.tl.annotate(
        sdata, reference, label_keys="cell_type", tissue="colon", model_out=tmp_path / "m.npz", plots_dir=tmp_path / "p"
    )
    table = sd.read_zarr(store).tables["table"]  # persisted
    obs = table.obs
    for key in (
        "cell_type",
        "cell_type_predicted",
        "cell_type_confidence",
        "cell_type_confidence_raw",
        "cell_type_ontology_term_id",
        "cell_type_ontology_label",
    ):
        assert key in obs, key
    assert table.obsm["cell_type_decision_scores"].shape[0] == table.n_obs
    acc = (obs["cell_type_predicted"].astype(str) == obs["true_cell_type"].astype(str)).mean()
    assert acc >= 0.9
    # ontology: demo labels are exact CL names; the id goes with the final label (CELLxGENE: `unknown` when the cell
    # has no cell type), the ontology label stays unfiltered
    assigned = (obs["cell_type"] != "Unassigned").to_numpy()
    ids = obs["cell_type_ontology_term_id"].astype(str)
    assert 0 < (~assigned).sum() and ids[assigned].str.startswith("CL:").all() and (ids[~assigned] == "unknown").all()
    assert (obs["cell_type_ontology_label"].astype(str) != "unknown").all()
    assert (
        obs.loc[obs["cell_type"] != "Unassigned", "cell_type"].astype(str)
        == obs.loc[obs["cell_type"] != "Unassigned", "cell_type_ontology_label"].astype(str)
    ).all()
    low = obs["cell_type_confidence"] < 0.8
    assert (obs.loc[low, "cell_type"] == "Unassigned").all()
    uns = table.uns["cell_type"]
    assert uns["tissue"] == "colon" and len(uns["model_hash"]) == 64
    prov = uns["references"]["ref0"]
    assert prov["label_key"] == "cell_type" and prov["n_cells"] == reference.n_obs
    assert sum(prov["cells_used"]["n_cells"]) == uns["model_description"]["n_cells"]
    assert scx.CellTypeModel.load(tmp_path / "m.npz").model_hash == uns["model_hash"]
    assert (tmp_path / "p" / "confidence.png").stat().st_size > 10_000
    assert (table.X != x_before).nnz == 0  # counts unchanged
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "cells" and attrs["instance_key"] == "instance_id"


def test_annotate_copy_leaves_input_and_errors_leave_store(demo_small, tmp_path):
    import spatialdata as sd

    sdata, reference = demo_small
    out = scx.tl.annotate(sdata, reference, label_keys="cell_type", plots=False, copy=True)
    assert "cell_type" not in sdata.tables["table"].obs
    assert "cell_type" in out.tables["table"].obs
    store = tmp_path / "s.zarr"
    sdata.write(store)
    backed = sd.read_zarr(store)
    with pytest.raises(KeyError, match="not_a_column"):
        scx.tl.annotate(backed, reference, label_keys="not_a_column")
    with pytest.raises(KeyError, match="tables"):
        scx.tl.annotate(backed, reference, label_keys="cell_type", table_key="nope")
    single = reference[reference.obs["cell_type"] == "B cell"].copy()
    with pytest.raises(ValueError, match="(?i)single|one cell type|at least two"):
        scx.tl.annotate(backed, single, label_keys="cell_type")
    other_genes = reference.copy()
    other_genes.var_names = [f"X{i}" for i in range(other_genes.n_vars)]
    with pytest.raises(ValueError, match="(?i)gene"):
        scx.tl.annotate(backed, other_genes, label_keys="cell_type")
    assert "cell_type" not in sd.read_zarr(store).tables["table"].obs


def test_annotate_real_merfish_store(merfish_store):
    """Annotate the real MERFISH store from a reference built from it; write back; reopen."""
    import scanpy as sc
    import spatialdata as sd
    from sklearn.cluster import KMeans

    store = merfish_store
    sdata = sd.read_zarr(store)
    table = sdata.tables["table"]
    x_before = table.X.copy()
    # a labelled reference from the slide itself: clusters of log1p-normalized expression
    ref = ad.AnnData(table.X.copy(), var=pd.DataFrame(index=table.var_names))
    norm = ref.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=20, random_state=0)
    labels = KMeans(6, n_init=4, random_state=0).fit_predict(norm.obsm["X_pca"])
    ref.obs["cluster"] = [f"Cluster {i}" for i in labels]
    scx.tl.annotate(sdata, ref, label_keys="cluster", plots=False)
    back = sd.read_zarr(store)
    t = back.tables["table"]
    assert (t.obs["cell_type_predicted"].astype(str).to_numpy() == ref.obs["cluster"].to_numpy()).mean() > 0.85
    # labels that do not map keep their own name, with the CELLxGENE "unknown" id
    assert set(t.obs["cell_type_ontology_term_id"].astype(str)) == {"unknown"}
    assigned = t.obs["cell_type"].astype(str) != "Unassigned"
    assert t.obs.loc[assigned, "cell_type"].astype(str).str.startswith("Cluster ").all()
    np.testing.assert_array_equal(
        np.asarray(t.X.todense() if hasattr(t.X, "todense") else t.X),
        np.asarray(x_before.todense() if hasattr(x_before, "todense") else x_before),
    )
    assert t.uns["spatialdata_attrs"]["region"] == "cells"
    assert set(t.obs["cell_id"]) <= set(back.shapes["cells"].index)
    assert "rasterized" in back.images and "anatomical" in back.shapes


def test_annotate_real_scrna_to_merfish_pair(shared_data):
    """Real scRNA-seq reference -> real MERFISH query (mouse hypothalamus)."""
    ref = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad"))
    query = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "merfish_query.h5ad"))
    # held-out accuracy on the reference itself (author labels are the truth)
    rng = np.random.default_rng(0)
    test = rng.random(ref.n_obs) < 0.25
    model = scx.tl.train(ref[~test].copy(), "cell_type_author", genes=query)
    held = ref[test].copy()
    scx.tl.predict(held, model)
    keep = ~held.obs["cell_type_author"].isin(["Ambiguous", "Unstable"])
    acc = (held.obs["cell_type_predicted"].astype(str) == held.obs["cell_type_author"].astype(str))[keep].mean()
    assert acc > 0.7  # 12 real types incl. three oligodendrocyte stages, 134 genes (chance: 0.08)
    # the MERFISH query through the one-shot pipeline
    scx.tl.annotate(query, ref, label_keys="cell_type_author", plots=False)
    obs = query.obs
    assert obs["cell_type_confidence"].between(0, 1).all()
    assert obs["cell_type_predicted"].nunique() >= 8  # the slide's diversity, not one collapsed class
    assert 0.2 < (obs["cell_type"] == "Unassigned").mean() < 0.8
    assigned = obs["cell_type"] != "Unassigned"
    assert (obs.loc[~assigned, "cell_type_ontology_term_id"] == "unknown").all()
    ids = dict(
        zip(obs["cell_type_predicted"][assigned].astype(str), obs["cell_type_ontology_term_id"][assigned].astype(str))
    )
    assert ids.get("Astrocytes", "CL:0000127") == "CL:0000127"
    assert ids.get("Microglia", "CL:0000129") == "CL:0000129"


def test_cli_demo(tmp_path, capsys):
    rc = cli_main(["demo", "--out", str(tmp_path / "out"), "--n-cells", "1200", "--min-accuracy", "0.9"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "accuracy (all cells, before filtering): 0.9" in out
    assert (tmp_path / "out" / "demo.zarr").is_dir()
    assert (tmp_path / "out" / "model.npz").is_file()
    import spatialdata as sd

    provenance = sd.read_zarr(tmp_path / "out" / "demo.zarr").tables["table"].uns["cell_type"]["references"]
    assert provenance["ref0"]["name"] == "demo_reference"  # named in messages and provenance


def test_cli_annotate(demo_small, tmp_path, capsys):
    import spatialdata as sd

    sdata, reference = demo_small
    store = tmp_path / "s.zarr"
    sdata.write(store)
    reference.write_h5ad(tmp_path / "ref.h5ad")
    rc = cli_main(["annotate", str(store), "-r", f"{tmp_path / 'ref.h5ad'}::cell_type"])
    assert rc == 0
    assert "annotated 1,500 cells" in capsys.readouterr().out
    assert "cell_type_ontology_term_id" in sd.read_zarr(store).tables["table"].obs
    assert cli_main(["annotate", str(store), "-r", str(tmp_path / "ref.h5ad")]) == 2


def test_colliding_labels_are_not_merged_in_cell_type():
    from spatialcx.tl._annotate import ontology_names

    final, ids, cl_names, mapping = ontology_names(["CD4+ T cells", "CD4 T", "Macrophages"])
    assert ids[0] == ids[1] == "CL:0000624"
    assert final == ["CD4+ T cells", "CD4 T", "macrophage"]  # shared id: own labels kept; unique id: CL name
    assert cl_names[:2] == ["CD4-positive, alpha-beta T cell"] * 2
    assert "CL:0000624" in mapping.collisions


@pytest.mark.parametrize("kind", ["log1p_cpm", "negative"])
def test_unusable_store_values_raise_and_leave_store_unchanged(demo_small, tmp_path, kind):
    """log1p-CPM data without raw counts, or scaled data with negative values: a clear error, the store untouched."""
    import scanpy as sc
    import spatialdata as sd

    sdata, reference = demo_small
    table = sdata.tables["table"].copy()
    sc.pp.normalize_total(table, target_sum=1e6 if kind == "log1p_cpm" else 1e4)
    sc.pp.log1p(table)
    if kind == "negative":
        sc.pp.scale(table, zero_center=True)
    bad = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": table})
    store = tmp_path / "bad.zarr"
    bad.write(store)
    before = {p.relative_to(store): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="(?i)cpm" if kind == "log1p_cpm" else "(?i)negative"):
        scx.tl.annotate(sd.read_zarr(store), reference, label_keys="cell_type")
    after = {p.relative_to(store): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert before == after


def test_bad_output_paths_fail_before_anything_is_written(demo_small, tmp_path):
    sdata, reference = demo_small
    table = sdata.tables["table"]
    columns, uns = list(table.obs.columns), set(table.uns)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "m.v2.npz").mkdir()
    for kwargs, match in (
        ({"model_out": a_file / "m.npz"}, "model_out"),
        ({"model_out": tmp_path / "m.v2"}, "is a folder"),  # model.save writes m.v2.npz: a folder here
        ({"plots_dir": a_file}, "plots_dir"),
        ({"key_added": "cell/type"}, "key_added"),
    ):
        with pytest.raises(ValueError, match=match):
            scx.tl.annotate(sdata, reference, label_keys="cell_type", **kwargs)
        assert list(table.obs.columns) == columns and set(table.uns) == uns
    with pytest.raises(ValueError, match="plots_dir"):
        scx.tl.classify_by_threshold(sdata, ["CD19"], plot=True, plots_dir=a_file / "x")
    assert list(table.obs.columns) == columns
    with pytest.raises(ValueError, match="key_added"):
        scx.tl.predict(sdata, scx.tl.train(reference, "cell_type", genes=table), key_added="a/b")
    assert list(table.obs.columns) == columns


def test_bad_caps_and_balance_fail_before_the_references_are_read(tmp_path):
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    missing = tmp_path / "not_read.h5ad"  # reading it would fail with another error
    for kwargs, match in (
        ({"max_cells_per_type": 0}, "max_cells_per_type must be a positive integer"),
        ({"max_cells_per_ref": 2.5}, "max_cells_per_ref must be a positive integer"),
        ({"balance": "fair"}, "balance must be 'proportional' or 'equal'"),
    ):
        with pytest.raises(ValueError, match=match):
            scx.tl.annotate(adata, missing, label_keys="cell_type", **kwargs)


def test_annotate_without_caps_and_without_coordinates(tmp_path):
    """``max_cells_per_type=None`` (no cap) is recorded as absent; an AnnData without coordinates still gets the
    confidence plot (per type), and the input stays as it was with ``copy=True``."""
    sdata, reference = scx.datasets.demo(n_cells=300, n_reference_cells=700, n_genes=150, n_reference_genes=300)
    table = sdata.tables["table"].copy()
    del table.obsm["spatial"]
    before = table.copy()
    out = scx.tl.annotate(
        table,
        reference,
        label_keys="cell_type",
        max_cells_per_type=None,
        max_cells_per_ref=None,
        add_ontology=False,
        plots_dir=tmp_path / "qc",
        copy=True,
    )
    assert "max_cells_per_type" not in out.uns["cell_type"] and "max_cells_per_ref" not in out.uns["cell_type"]
    assert out.uns["cell_type"]["balance"] == "proportional"
    assert (tmp_path / "qc" / "confidence.png").stat().st_size > 10_000
    assert list(table.obs.columns) == list(before.obs.columns) and set(table.uns) == set(before.uns)
    assert set(table.obsm) == set(before.obsm)
    out.write_h5ad(tmp_path / "out.h5ad")  # uns stays serialisable
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["cell_type"]["random_state"] == 0


def _predicted_table() -> ad.AnnData:
    """Predictions as annotate writes them: 30 A, 8 B and 3 C cells, with per-class CL ids."""
    labels = np.array(["A"] * 30 + ["B"] * 8 + ["C"] * 3)
    conf = np.tile([0.95, 0.9, 0.5], len(labels) // 3 + 1)[: len(labels)]
    obs = pd.DataFrame(
        {"cell_type_predicted": pd.Categorical(labels), "cell_type_confidence": conf},
        index=[f"c{i}" for i in range(len(labels))],
    )
    adata = ad.AnnData(np.zeros((len(labels), 1), dtype=np.float32), obs=obs)
    adata.obs["cell_type_ontology_term_id"] = pd.Categorical(
        pd.Series(labels).map({"A": "CL:1", "B": "CL:2", "C": "CL:3"}).to_numpy()
    )
    adata.uns["cell_type"] = {"classes": ["A", "B", "C"], "ontology_term_ids": ["CL:1", "CL:2", "CL:3"]}
    return adata


def test_filters_are_idempotent_and_their_records_match_the_labels():
    adata = _predicted_table()
    scx.tl.filter_low_confidence(adata, threshold=0.8)
    confident = adata.obs["cell_type"].astype(str).copy()
    assert (confident == "Unassigned").sum() == 13  # every third cell (confidence 0.5)

    scx.tl.filter_low_count_types(adata, min_cells=5)  # B has 6 confident cells, C 2
    assert adata.uns["cell_type"]["removed_types"] == ["C"] and adata.uns["cell_type"]["min_cells_per_type"] == 5
    scx.tl.filter_low_count_types(adata, min_cells=10)  # B (6) goes too; C stays removed and recorded
    labels = adata.obs["cell_type"].astype(str).copy()
    assert set(labels) == {"A", "Unassigned"}
    assert adata.uns["cell_type"]["removed_types"] == ["B", "C"] and adata.uns["cell_type"]["min_cells_per_type"] == 10
    scx.tl.filter_low_count_types(adata, min_cells=10)  # again: same labels, same record
    assert (adata.obs["cell_type"].astype(str) == labels).all()
    assert adata.uns["cell_type"]["removed_types"] == ["B", "C"] and adata.uns["cell_type"]["min_cells_per_type"] == 10
    ids = adata.obs["cell_type_ontology_term_id"].astype(str)
    assert set(ids[labels == "Unassigned"]) == {"unknown"} and set(ids[labels == "A"]) == {"CL:1"}

    # filtering by confidence starts again from the predictions: the rare types come back, and their record goes
    scx.tl.filter_low_confidence(adata, threshold=0.8)
    assert (adata.obs["cell_type"].astype(str) == confident).all()
    assert "removed_types" not in adata.uns["cell_type"] and "min_cells_per_type" not in adata.uns["cell_type"]
    assert adata.uns["cell_type"]["confidence_threshold"] == 0.8 and adata.uns["cell_type"]["n_unassigned"] == 13
    scx.tl.filter_low_confidence(adata, threshold=0.8)
    assert (adata.obs["cell_type"].astype(str) == confident).all()
    assert set(adata.obs["cell_type_ontology_term_id"].astype(str)[confident == "B"]) == {"CL:2"}


@pytest.fixture(scope="module")
def demo_tiny():
    """A small demo slide and reference: each annotate call on it takes a few seconds."""
    return scx.datasets.demo(n_cells=300, n_reference_cells=700, n_genes=150, n_reference_genes=300, random_state=0)


def _annotated_keys(table: ad.AnnData) -> tuple[list[str], list[str], list[str]]:
    return list(table.obs.columns), sorted(table.obsm), sorted(table.uns)


def test_references_as_a_mapping_keep_their_names(demo_tiny):
    """``{source name: reference}``, as combine_references takes it: the names are the sources, not file paths."""
    sdata, reference = demo_tiny
    table = sdata.tables["table"].copy()
    half = reference.n_obs // 2
    refs = {"atlas A": reference[:half].copy(), "atlas B": reference[half:].copy()}
    out = scx.tl.annotate(
        table, refs, label_keys={"atlas A": "cell_type", "atlas B": "cell_type"}, plots=False, copy=True
    )
    prov = out.uns["cell_type"]["references"]
    assert [prov[k]["name"] for k in sorted(prov)] == ["atlas A", "atlas B"]
    assert [prov[k]["n_cells"] for k in sorted(prov)] == [half, reference.n_obs - half]
    assert (out.obs["cell_type_predicted"].astype(str) == out.obs["true_cell_type"].astype(str)).mean() > 0.8
    with pytest.raises(ValueError, match=r"names no label column for the references \['atlas B'\]"):
        scx.tl.annotate(table, refs, label_keys={"atlas A": "cell_type"}, plots=False)
    with pytest.raises(ValueError, match="references must be a mapping with the same names"):
        scx.tl.annotate(table, list(refs.values()), label_keys={"atlas A": "cell_type"}, plots=False)
    with pytest.raises(ValueError, match="mapping of references is empty"):
        scx.tl.annotate(table, {}, label_keys="cell_type", plots=False)
    assert "cell_type" not in table.obs


def test_failed_store_write_keeps_the_earlier_model_file(demo_tiny, tmp_path, monkeypatch):
    """A run that fails to write into the store leaves model_out (named by the earlier results) as it was."""
    import spatialdata as sd

    from spatialcx import _table

    sdata, reference = demo_tiny
    store = tmp_path / "s.zarr"
    sdata.write(store)
    backed = sd.read_zarr(store)
    model = tmp_path / "models" / "m.npz"
    scx.tl.annotate(backed, reference, label_keys="cell_type", plots=False, model_out=model)
    first = model.read_bytes()
    recorded = sd.read_zarr(store).tables["table"].uns["cell_type"]
    assert recorded["model_path"] == str(model)
    assert recorded["model_hash"] == scx.CellTypeModel.load(model).model_hash
    keys = _annotated_keys(backed.tables["table"])

    def no_space(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(_table, "write_table", no_space)
    new_dir = tmp_path / "new" / "deeper"
    for target in (model, new_dir / "m.npz"):
        with pytest.raises(OSError, match="No space left"):
            scx.tl.annotate(
                backed, reference, label_keys="cell_type", plots=False, model_out=target, train_kwargs={"C": 0.05}
            )
        assert model.read_bytes() == first  # the earlier model, which the store names, is still there
        assert sorted(p.name for p in model.parent.iterdir()) == ["m.npz"]  # no temporary file left
        assert not (tmp_path / "new").exists()  # folders made for the model are removed again
        assert _annotated_keys(backed.tables["table"]) == keys
        assert backed.tables["table"].uns["cell_type"]["model_hash"] == recorded["model_hash"]


def test_a_failure_while_writing_the_results_leaves_the_table_as_it_was(demo_tiny, monkeypatch):
    """In memory too: an error after the first column is written puts back obs, obsm and uns of an earlier run."""
    from spatialcx.tl import _filter

    sdata, reference = demo_tiny
    table = sdata.tables["table"].copy()
    scx.tl.annotate(table, reference, label_keys="cell_type", plots=False, confidence_threshold=0.5)
    obs, scores, uns = table.obs.copy(), table.obsm["cell_type_decision_scores"].copy(), dict(table.uns["cell_type"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_filter, "filter_low_confidence", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scx.tl.annotate(table, reference, label_keys="cell_type", plots=False, add_ontology=False, random_state=1)
    pd.testing.assert_frame_equal(table.obs, obs)
    np.testing.assert_array_equal(table.obsm["cell_type_decision_scores"], scores)
    assert table.uns["cell_type"]["random_state"] == 0 and table.uns["cell_type"]["model_hash"] == uns["model_hash"]
    assert table.uns["cell_type"]["confidence_threshold"] == 0.5

    fresh = sdata.tables["table"].copy()
    keys = _annotated_keys(fresh)
    with pytest.raises(KeyboardInterrupt):
        scx.tl.annotate(fresh, reference, label_keys="cell_type", plots=False)
    assert _annotated_keys(fresh) == keys


def test_model_out_expands_the_home_folder(demo_tiny, tmp_path, monkeypatch):
    sdata, reference = demo_tiny
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    table = sdata.tables["table"].copy()
    scx.tl.annotate(table, reference, label_keys="cell_type", plots=False, model_out="~/models/colon")
    assert (home / "models" / "colon.npz").is_file()
    assert list(work.iterdir()) == []  # no folder named "~" in the working folder
    assert table.uns["cell_type"]["model_path"] == str(home / "models" / "colon.npz")


def test_a_relative_model_out_is_recorded_as_an_absolute_path(demo_tiny, tmp_path, monkeypatch):
    """The table (and its store) may be opened from another working folder: the path it records must still hold."""
    sdata, reference = demo_tiny
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    table = sdata.tables["table"].copy()
    scx.tl.annotate(table, reference, label_keys="cell_type", plots=False, add_ontology=False, model_out="m")
    recorded = table.uns["cell_type"]["model_path"]
    assert recorded == str(tmp_path / "run" / "m.npz")
    monkeypatch.chdir(tmp_path)
    assert scx.CellTypeModel.load(recorded).model_hash == table.uns["cell_type"]["model_hash"]


def test_target_proportions_are_read_first_and_recorded(demo_tiny, tmp_path):
    sdata, reference = demo_tiny
    table = sdata.tables["table"].copy()
    not_read = tmp_path / "not_read.h5ad"  # reading it first would fail with another error
    with pytest.raises(FileNotFoundError, match="target_proportions file"):
        scx.tl.annotate(table, not_read, label_keys="cell_type", target_proportions=tmp_path / "props.csv")
    with pytest.raises(ValueError, match="Proportion of 'B cell'.* between 0 and 1"):
        scx.tl.annotate(table, not_read, label_keys="cell_type", target_proportions={"B cell": 2})
    (tmp_path / "props.csv").write_text("cell_type,proportion\nB cell,0.25\nfibroblast,0.05\n")
    scx.tl.annotate(table, reference, label_keys="cell_type", plots=False, target_proportions=tmp_path / "props.csv")
    params = table.uns["cell_type"]
    assert params["target_proportions"] == {"cell_types": ["B cell", "fibroblast"], "proportions": [0.25, 0.05]}
    used = params["model_description"]["cells_per_type"]
    n_b = dict(zip(used["labels"], used["n_cells"]))["B cell"]
    assert n_b == (reference.obs["cell_type"] == "B cell").sum()  # every B cell (fewer than a quarter are there)
    table.write_h5ad(tmp_path / "t.h5ad")  # the record is storable
    back = ad.read_h5ad(tmp_path / "t.h5ad").uns["cell_type"]["target_proportions"]
    assert list(back["cell_types"]) == ["B cell", "fibroblast"]


def test_bad_argument_types_fail_before_the_references_are_read(tmp_path):
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    missing = tmp_path / "not_read.h5ad"
    for kwargs, error, match in (
        ({"confidence_threshold": "0.5"}, TypeError, "confidence_threshold must be a number in"),
        ({"random_state": None}, TypeError, "random_state must be a non-negative integer seed"),
        ({"random_state": -1}, ValueError, "random_state must be a non-negative integer seed"),
        ({"tissue": None}, TypeError, "tissue must be a string"),
        ({"train_kwargs": {"genes": ["A"]}}, ValueError, r"train_kwargs sets \['genes'\], which annotate sets"),
        ({"train_kwargs": {"c": 0.5}}, ValueError, r"train_kwargs names \['c'\], which are not options"),
        # training settings that cannot train: refused before the references are read, not after
        ({"train_kwargs": {"method": "fast"}}, ValueError, "train_kwargs: Unknown training method 'fast'"),
        ({"train_kwargs": {"epochs": 0}}, ValueError, "train_kwargs: epochs must be a positive whole number"),
        ({"train_kwargs": {"C": -1}}, ValueError, "train_kwargs: C must be a positive number"),
        ({"train_kwargs": {"C": "0.5"}}, ValueError, "train_kwargs: C must be a positive number"),
        ({"train_kwargs": {"alpha": float("nan")}}, ValueError, "train_kwargs: alpha must be a positive finite number"),
        ({"train_kwargs": {"alpha": 0}}, ValueError, "train_kwargs: alpha must be a positive finite number"),
        ({"train_kwargs": {"n_jobs": "all"}}, ValueError, "train_kwargs: n_jobs must be None .* or a non-zero whole"),
        ({"train_kwargs": {"max_iter": 0}}, ValueError, "train_kwargs: max_iter must be a positive whole number"),
        ({"train_kwargs": {"balance_cell_type": "no"}}, ValueError, "train_kwargs: balance_cell_type must be True"),
        ({"train_kwargs": {"min_genes": 0}}, ValueError, "train_kwargs: min_genes must be a whole number of at least"),
        ({"label_keys": None}, TypeError, "label_keys must name the label column of the references"),
        ({"label_keys": [3]}, TypeError, r"label_keys must be obs column names .*got 3 in \[3\]"),
        ({"label_keys": ""}, ValueError, "label_keys must be obs column names"),
    ):
        with pytest.raises(error, match=match):
            scx.tl.annotate(adata, missing, **{"label_keys": "cell_type", **kwargs})
    with pytest.raises(TypeError, match=r"references must be a labelled AnnData.*got NoneType"):
        scx.tl.annotate(adata, None, label_keys="cell_type")


def test_a_reference_type_named_unassigned_is_refused(demo_tiny):
    sdata, reference = demo_tiny
    table = sdata.tables["table"].copy()
    reference = reference.copy()
    reference.obs["cell_type"] = reference.obs["cell_type"].astype(str).replace({"B cell": "Unassigned"})
    keys = _annotated_keys(table)
    with pytest.raises(ValueError, match="'Unassigned', which is the label annotate gives cells below"):
        scx.tl.annotate(table, reference, label_keys="cell_type", exclude_labels=[], plots=False)
    assert _annotated_keys(table) == keys


def test_replacing_columns_that_spatialcx_did_not_write_is_warned(demo_tiny, caplog):
    """A query with its own cell_type (a CELLxGENE dataset, say): the replacement is announced, with the way out."""
    import logging

    sdata, reference = demo_tiny
    table = sdata.tables["table"].copy()
    table.obs["cell_type"] = table.obs["true_cell_type"].astype(str)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.annotate(table, reference, label_keys="cell_type", plots=False)
    assert caplog.text.count("obs columns ['cell_type'] hold values that no spatialcx prediction wrote") == 1
    assert "key_added='cell_type_spatialcx'" in caplog.text  # said once, before training, not again when written
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):  # again: an earlier run's columns, replaced silently
        scx.tl.annotate(table, reference, label_keys="cell_type", plots=False)
    assert "no spatialcx prediction wrote" not in caplog.text
