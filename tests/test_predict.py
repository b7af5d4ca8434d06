"""scx.tl.train / predict / transform_confidence / filters on AnnData tables of every backing."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import spatialcx as scx


def _data(n=1200, g=80, k=4, seed=0, depth=1.0):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    mu = np.random.default_rng(123).gamma(0.6, 1.5, (k, g)) * depth  # the same types in every dataset
    x = rng.poisson(mu[lab] * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)
    a = ad.AnnData(sparse.csr_matrix(x), obs=pd.DataFrame({"label": pd.Categorical([f"type {i}" for i in lab])}))
    a.obs_names = [f"c{seed}_{i}" for i in range(n)]
    a.var_names = [f"G{i}" for i in range(g)]
    return a


@pytest.fixture(scope="module")
def model():
    return scx.tl.train(_data(seed=0, depth=5), "label", genes=[f"G{i}" for i in range(70)])


def test_train_uses_panel_genes_and_records_provenance(model):
    assert model.n_features <= 70
    assert set(model.features) <= {f"G{i}" for i in range(70)}
    assert model.normalize_over == "genes"
    d = model.description
    assert d["label_key"] == "label" and d["n_shared_genes"] == 70
    assert sum(d["cells_per_type"]["n_cells"]) == 1200


def test_train_needs_a_quarter_of_the_panel_as_annotate_does(caplog):
    ref = _data(n=300, seed=1)
    panel = [f"G{i}" for i in range(20)] + [f"Other{i}" for i in range(60)]  # 20 of 80: a quarter
    with pytest.raises(
        ValueError, match=r"Only 20 of 81 panel genes.*at least 21 are needed.*pass them as the panel: genes="
    ):
        scx.tl.train(ref, "label", genes=[*panel, "Extra"])  # 20 of 81: less than a quarter
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        m = scx.tl.train(ref, "label", genes=panel)  # exactly a quarter: trained, with a warning
    assert m.n_features == 20
    assert "20 of 80 panel genes found in the reference" in caplog.text and "Other0" in caplog.text


def test_annotate_with_too_few_shared_genes_points_to_train_and_predict():
    """The hint to train on the shared genes names the functions that take them: annotate has no genes argument."""
    ref = _data(n=300, seed=1)
    query = _data(n=50, g=81, seed=2)
    query.var_names = [f"G{i}" for i in range(20)] + [f"Other{i}" for i in range(61)]  # 20 of 81: under a quarter
    with pytest.raises(ValueError, match=r"genes=\[\.\.\.\] to scx.tl.train.*then scx.tl.predict.*annotate always"):
        scx.tl.annotate(query, ref, label_keys="label", plots=False, add_ontology=False)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"method": "lbfgs"}, "Unknown training method"), ({"epochs": 0}, "epochs must be")]
)
def test_train_refuses_settings_that_cannot_train_before_reading_the_reference(monkeypatch, kwargs, match):
    import spatialcx.pp._normalization as norm

    def no_reading(*args, **kw):
        raise AssertionError("the reference was read before the settings were checked")

    monkeypatch.setattr(norm, "find_expression_source", no_reading)
    with pytest.raises(ValueError, match=match):
        scx.tl.train(_data(n=100, seed=1), "label", **kwargs)


def test_train_gene_floor_is_annotates_for_small_panels():
    ref = _data(n=300, seed=1)
    small = [f"G{i}" for i in range(6)] + [f"Other{i}" for i in range(6)]  # 6 of 12: half a small panel is enough
    assert scx.tl.train(ref, "label", genes=small).n_features == 6
    with pytest.raises(ValueError, match=r"Only 5 of 12 panel genes.*at least 6 are needed"):
        scx.tl.train(ref, "label", genes=[*small[:5], *small[6:], "Other6"])
    wide = [f"G{i}" for i in range(9)] + [f"Other{i}" for i in range(21)]  # 9 of 30: a quarter, but under 10
    with pytest.raises(ValueError, match=r"Only 9 of 30 panel genes.*at least 10 are needed"):
        scx.tl.train(ref, "label", genes=wide)


def test_train_matches_genes_case_insensitively_and_leaves_out_non_type_labels(caplog):
    ref = _data(seed=0, depth=5)
    ref.var_names = [f"GENE{i}" for i in range(ref.n_vars)]  # human-style symbols
    panel = [f"Gene{i}" for i in range(70)]  # mouse-style spelling of the same genes
    labels = ref.obs["label"].astype(str).to_numpy().copy()
    labels[:50] = "NA"
    ref.obs["label"] = labels
    with caplog.at_level("WARNING", logger="spatialcx"):
        m = scx.tl.train(ref, "label", genes=panel)
    assert list(m.features) == panel  # the panel's spelling: the model scores the spatial table by these names
    assert "NA" not in set(m.classes) and len(m.classes) == 4
    assert "50 reference cells labelled ['NA'] are left out" in caplog.text
    kept = scx.tl.train(ref, "label", genes=panel, exclude_labels=())
    assert "NA" in set(kept.classes)
    q = _data(n=300, seed=1)
    q.var_names = [f"Gene{i}" for i in range(q.n_vars)]
    scx.tl.predict(q, m)
    assert (q.obs["cell_type_predicted"].astype(str) == q.obs["label"].astype(str)).mean() > 0.9


def test_predict_refuses_duplicated_genes_empty_tables_and_fractional_chunks(model):
    q = _data(n=100, seed=2)
    q.var_names = ["G0", *q.var_names[1:-1], "G0"]
    with pytest.raises(ValueError, match=r"1 of the model's genes occur more than once in the table \(e.g. \['G0'\]"):
        scx.tl.predict(q, model)
    assert "cell_type" not in q.obs
    # a repeated name that is not a model gene is no reason to refuse (CellTypist does not either)
    ok = _data(n=100, seed=2)
    expected = scx.tl.predict(ok, model, copy=True)
    ok.var_names = [*ok.var_names[:-2], "dupX", "dupX"]  # G78, G79: not model genes (G0-G69)
    scx.tl.predict(ok, model)
    np.testing.assert_array_equal(ok.obsm["cell_type_decision_scores"], expected.obsm["cell_type_decision_scores"])
    with pytest.raises(ValueError, match="0 cells"):
        scx.tl.predict(_data(n=100, seed=2)[:0].copy(), model)
    with pytest.raises(ValueError, match="whole number"):
        scx.tl.predict(_data(n=100, seed=2), model, chunk_size=1.5)


def test_predict_on_counts_writes_columns_and_keeps_counts(model, tmp_path):
    q = _data(n=500, seed=1)
    x_before = q.X.copy()
    scx.tl.predict(q, model)
    obs = q.obs
    for col in ("cell_type", "cell_type_predicted", "cell_type_confidence", "cell_type_confidence_raw"):
        assert col in obs
    assert ((obs["cell_type_confidence"] >= 0) & (obs["cell_type_confidence"] <= 1)).all()
    assert q.obsm["cell_type_decision_scores"].shape == (500, 4)
    acc = (obs["cell_type_predicted"].astype(str) == obs["label"].astype(str)).mean()
    assert acc > 0.9
    assert (q.X != x_before).nnz == 0  # counts untouched
    uns = q.uns["cell_type"]
    assert uns["model_hash"] == model.model_hash and uns["expression_source"] == "X"
    # serialisable
    q.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    assert list(back.uns["cell_type"]["classes"]) == list(model.classes)
    assert back.uns["cell_type"]["model_description"]["label_key"] == "label"


def test_predict_normalizes_over_model_genes_like_training(model):
    """The query normalized per chunk over the model's genes equals a manual computation."""
    q = _data(n=200, seed=2)
    scx.tl.predict(q, model)
    sub = q[:, list(model.features)].copy()
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    expected = model.decision_function(sub.X, sub.var_names)
    np.testing.assert_allclose(q.obsm["cell_type_decision_scores"], expected, rtol=1e-5, atol=1e-4)


def test_chunked_equals_unchunked_and_dask(model):
    import dask.array as da

    q = _data(n=700, seed=3)
    a, b = q.copy(), q.copy()
    scx.tl.predict(a, model, chunk_size=64)
    scx.tl.predict(b, model, chunk_size=100_000)
    np.testing.assert_array_equal(a.obsm["cell_type_decision_scores"], b.obsm["cell_type_decision_scores"])
    np.testing.assert_array_equal(a.obs["cell_type_confidence"], b.obs["cell_type_confidence"])
    d = q.copy()
    d.X = da.from_array(q.X.toarray(), chunks=(100, -1))
    scx.tl.predict(d, model, chunk_size=128)
    np.testing.assert_allclose(d.obsm["cell_type_decision_scores"], a.obsm["cell_type_decision_scores"], rtol=1e-6)


def test_cells_without_counts_get_confidence_zero(model, caplog):
    """No counts in the model's genes: CellTypist's label, confidence 0, and no weight in the dataset statistics."""
    import dask.array as da

    q = _data(n=500, seed=6)
    x = q.X.toarray()
    empty = np.zeros(q.n_obs, dtype=bool)
    empty[[3, 77, 250]] = True
    x[empty] = 0
    x[5, :70] = 0  # counts only in genes the model does not have
    x[5, 75] = 3
    empty[5] = True
    q.X = sparse.csr_matrix(x)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(q, model, chunk_size=64)
    conf = q.obs["cell_type_confidence"].to_numpy()
    assert (conf[empty] == 0).all() and (conf[~empty] > 0).all()
    assert q.uns["cell_type"]["confidence_params"]["n_cells_without_counts"] == 4
    n_genes = q.obs["cell_type_n_genes"].to_numpy()
    assert (n_genes[empty] == 0).all() and (n_genes[~empty] > 0).all()
    assert n_genes[10] == np.count_nonzero(x[10, [int(g[1:]) for g in model.features]])
    # recomputing the method from the stored scores gives what predict stored
    stored = scx.tl.evaluate_confidence(q, "label")
    again = scx.tl.evaluate_confidence(q, "label", methods=["calibrated"], calibration=model)
    pd.testing.assert_frame_equal(stored, again, rtol=1e-5)
    np.testing.assert_allclose(
        scx.tl.transform_confidence(q.obsm["cell_type_decision_scores"], calibration=model, without_counts=empty),
        conf,
        rtol=1e-5,
    )
    assert "4 of 500 cells have no counts in the model's genes" in caplog.text
    # the others' confidence is what they get without the empty cells in the dataset
    rest = q[~empty].copy()
    scx.tl.predict(rest, model)
    np.testing.assert_allclose(conf[~empty], rest.obs["cell_type_confidence"].to_numpy(), rtol=1e-6)
    # CellTypist's label and probability are kept; the raw probability is not 0
    assert (q.obs["cell_type_confidence_raw"].to_numpy()[empty] > 0).all()
    scx.tl.filter_low_confidence(q, threshold=0.01)
    assert (q.obs["cell_type"][empty] == "Unassigned").all()
    d = q.copy()  # the dask path finds the same cells
    d.X = da.from_array(x, chunks=(128, -1))
    scx.tl.predict(d, model)
    np.testing.assert_array_equal(d.obs["cell_type_confidence"].to_numpy()[empty], 0)
    np.testing.assert_allclose(d.obs["cell_type_confidence"].to_numpy(), conf, rtol=1e-6)
    none = _data(n=100, seed=7)
    x = none.X.toarray()
    x[:, :70] = 0
    x[:, 75] = 2  # every cell has counts, none in the model's genes
    none.X = sparse.csr_matrix(x)
    with pytest.raises(ValueError, match="None of the 100 cells has counts in the model's"):
        scx.tl.predict(none, model)
    assert "cell_type" not in none.obs


def test_predict_on_backed_h5ad_and_layers(model, tmp_path):
    q = _data(n=300, seed=4)
    ref = q.copy()
    scx.tl.predict(ref, model)
    # counts in a layer, log1p in X
    lay = q.copy()
    lay.layers["counts"] = lay.X.copy()
    sc.pp.normalize_total(lay, target_sum=1e4)
    sc.pp.log1p(lay)
    scx.tl.predict(lay, model)
    assert lay.uns["cell_type"]["expression_source"] == "layers['counts']"
    np.testing.assert_allclose(lay.obsm["cell_type_decision_scores"], ref.obsm["cell_type_decision_scores"])
    q.write_h5ad(tmp_path / "q.h5ad")
    backed = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    scx.tl.predict(backed, model, chunk_size=50)  # X stays on disk; outputs go to the in-memory obs/obsm
    assert backed.isbacked
    np.testing.assert_allclose(
        backed.obsm["cell_type_decision_scores"], ref.obsm["cell_type_decision_scores"], rtol=1e-6
    )
    # copy=True on a backed table: an in-memory copy, the backed one untouched
    fresh = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    out = scx.tl.predict(fresh, model, copy=True)
    assert not out.isbacked and fresh.isbacked and "cell_type" not in fresh.obs
    assert (out.obs["cell_type"].astype(str) == ref.obs["cell_type"].astype(str)).all()
    filtered = scx.tl.filter_low_confidence(out, threshold=float(np.median(out.obs["cell_type_confidence"])), copy=True)
    assert (filtered.obs["cell_type"] == "Unassigned").any() and "Unassigned" not in out.obs["cell_type"].astype(str)


def test_predict_reads_log1p_from_raw_when_x_is_scaled(model):
    """scanpy's layout (log1p frozen in raw, X a scaled gene subset) predicts as the counts do."""
    q = _data(n=300, seed=4)
    ref = q.copy()
    scx.tl.predict(ref, model)
    sc.pp.normalize_total(q, target_sum=1e4)
    sc.pp.log1p(q)
    q.raw = q
    q = q[:, :40].copy()
    sc.pp.scale(q)
    scx.tl.predict(q, model)
    assert q.uns["cell_type"]["expression_source"] == "raw.X"
    np.testing.assert_allclose(
        q.obsm["cell_type_decision_scores"], ref.obsm["cell_type_decision_scores"], rtol=1e-5, atol=1e-5
    )
    assert (q.obs["cell_type"].astype(str) == ref.obs["cell_type"].astype(str)).all()


def test_predict_errors_leave_table_unchanged(model):
    q = _data(n=100, seed=5)
    q.var_names = [f"other{i}" for i in range(q.n_vars)]
    before = q.obs.copy()
    with pytest.raises(ValueError, match="genes"):
        scx.tl.predict(q, model)
    pd.testing.assert_frame_equal(q.obs, before)
    assert "cell_type" not in q.uns
    # log1p-CPM data without raw counts
    cpm = _data(n=100, seed=6)
    sc.pp.normalize_total(cpm, target_sum=1e6)
    sc.pp.log1p(cpm)
    with pytest.raises(ValueError, match="(?i)cpm|counts"):
        scx.tl.predict(cpm, model)
    assert "cell_type" not in cpm.obs
    # negative values (scaled data)
    neg = _data(n=100, seed=7)
    sc.pp.log1p(neg)
    sc.pp.scale(neg)
    with pytest.raises(ValueError, match="(?i)negative"):
        scx.tl.predict(neg, model)
    with pytest.raises(TypeError):
        scx.tl.predict(q, object())


def test_train_errors():
    ref = _data()
    with pytest.raises(KeyError, match="not_there"):
        scx.tl.train(ref, "not_there")
    single = ref.copy()
    single.obs["label"] = "only type"
    with pytest.raises(ValueError, match="single cell type"):
        scx.tl.train(single, "label")
    with pytest.raises(ValueError, match="panel"):
        scx.tl.train(ref, "label", genes=["NOPE1", "NOPE2"])


def test_transform_confidence_properties():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(1000, 2))
    for method in ("raw", "zscore"):
        c = scx.tl.transform_confidence(s, method)
        assert c.shape == (1000,) and (c >= 0).all() and (c <= 1).all()
        assert np.unique(np.round(c, 6)).size > 10  # not constant for 2 classes
    # dataset-level z-score: a clear winner beats a tie
    s = np.array([[5.0, -5.0], [0.1, 0.0], [-3.0, 3.0], [0.0, 0.1]])
    c = scx.tl.transform_confidence(s, "zscore")
    assert c[0] > c[1] and c[2] > c[3]
    # shifted scores (platform shift): raw collapses, zscore does not
    shifted = rng.normal(size=(500, 5)) - 8
    shifted[np.arange(500), rng.integers(0, 5, 500)] += 4
    assert np.median(scx.tl.transform_confidence(shifted, "raw")) < 0.05
    assert np.median(scx.tl.transform_confidence(shifted, "zscore")) > 0.5
    with pytest.raises(ValueError, match="Unknown confidence"):
        scx.tl.transform_confidence(s, "nope")
    with pytest.raises(ValueError, match="2 classes"):
        scx.tl.transform_confidence(np.ones((3, 1)))


def test_filters(model):
    q = _data(n=400, seed=8)
    scx.tl.predict(q, model)
    conf = q.obs["cell_type_confidence"].to_numpy()
    scx.tl.filter_low_confidence(q, threshold=0.8)
    low = conf < 0.8
    assert (q.obs["cell_type"][low] == "Unassigned").all()
    assert (q.obs["cell_type"][~low].astype(str) == q.obs["cell_type_predicted"][~low].astype(str)).all()
    # refiltering with a lower threshold restores cells (starts from the unfiltered predictions)
    scx.tl.filter_low_confidence(q, threshold=0.0)
    assert (q.obs["cell_type"] != "Unassigned").all()
    assert q.uns["cell_type"]["confidence_threshold"] == 0.0
    counts = q.obs["cell_type"].value_counts()
    rare = counts.index[-1]
    out = scx.tl.filter_low_count_types(q, min_cells=int(counts.min()) + 1, copy=True)
    assert (out.obs["cell_type"][q.obs["cell_type"] == rare] == "Unassigned").all()
    assert rare in out.uns["cell_type"]["removed_types"]
    assert "Unassigned" not in q.obs["cell_type"].astype(str).unique()  # copy left q alone
    with pytest.raises(ValueError, match="threshold"):
        scx.tl.filter_low_confidence(q, threshold=2)


def test_filters_keep_ontology_ids_with_the_final_label(model):
    """CELLxGENE: a cell without a cell type has `unknown` as its CL id; refiltering restores the class's id."""
    q = _data(n=400, seed=8)
    scx.tl.predict(q, model)
    classes = [str(c) for c in q.uns["cell_type"]["classes"]]
    class_ids = [f"CL:{i:07d}" for i in range(len(classes))]
    q.uns["cell_type"]["ontology_term_ids"] = class_ids  # as scx.tl.annotate records them
    by_class = dict(zip(classes, class_ids, strict=True))
    q.obs["cell_type_ontology_term_id"] = pd.Categorical(q.obs["cell_type_predicted"].astype(str).map(by_class))
    q.obs["cell_type_ontology_label"] = q.obs["cell_type_predicted"].astype(str)
    conf = q.obs["cell_type_confidence"].to_numpy()
    expected = q.obs["cell_type_predicted"].astype(str).map(by_class).to_numpy()
    for threshold in (0.9, 0.5, 0.0):
        scx.tl.filter_low_confidence(q, threshold=threshold)
        low = conf < threshold
        ids = q.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
        assert (ids[low] == "unknown").all()
        assert (ids[~low] == expected[~low]).all()
        assert (q.obs["cell_type_ontology_label"].astype(str) == q.obs["cell_type_predicted"].astype(str)).all()
    assert low.sum() == 0 and (conf < 0.9).any()
    rare = q.obs["cell_type"].value_counts().index[-1]
    scx.tl.filter_low_count_types(q, min_cells=int(q.obs["cell_type"].value_counts().min()) + 1)
    removed = (q.obs["cell_type_predicted"].astype(str) == rare).to_numpy()
    assert (q.obs["cell_type_ontology_term_id"].astype(str).to_numpy()[removed] == "unknown").all()


def test_refiltering_restores_ids_mapped_by_add_ontology_ids(model):
    """Without annotate's per-class ids, the ids of the labels come from add_ontology_ids's mapping."""
    q = _data(n=400, seed=8)
    scx.tl.predict(q, model)
    names = {f"type {i}": n for i, n in enumerate(["T cell", "B cell", "macrophage", "fibroblast"])}
    q.obs["cell_type"] = pd.Categorical(q.obs["cell_type_predicted"].astype(str).map(names))
    scx.tl.add_ontology_ids(q, "cell_type")
    full = q.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    assert (full != "unknown").all()
    q.uns["cell_type"]["names"] = [names[c] for c in q.uns["cell_type"]["classes"]]
    scx.tl.filter_low_confidence(q, threshold=0.95)
    low = q.obs["cell_type_confidence"].to_numpy() < 0.95
    assert low.any() and (q.obs["cell_type_ontology_term_id"].astype(str).to_numpy()[low] == "unknown").all()
    scx.tl.filter_low_confidence(q, threshold=0.0)
    assert (q.obs["cell_type_ontology_term_id"].astype(str).to_numpy() == full).all()


def test_refiltering_after_mapping_filtered_labels_restores_ids_and_names(model):
    """add_ontology_ids on already filtered labels: a lower threshold brings back the id and the name of each cell."""
    q = _data(n=400, seed=8)
    scx.tl.predict(q, model)
    names = {f"type {i}": n for i, n in enumerate(["T cell", "B cell", "macrophage", "fibroblast"])}
    q.obs["cell_type_predicted"] = pd.Categorical(q.obs["cell_type_predicted"].astype(str).map(names))
    scx.tl.filter_low_confidence(q, threshold=0.95)
    low = q.obs["cell_type_confidence"].to_numpy() < 0.95
    scx.tl.add_ontology_ids(q, "cell_type")  # Unassigned cells: "unknown" id and name
    assert low.any() and (q.obs["cell_type_ontology_label"].astype(str).to_numpy()[low] == "unknown").all()
    scx.tl.filter_low_confidence(q, threshold=0.0)
    expected = scx.tl.map_labels(list(names.values())).table.set_index("input_label")
    predicted = q.obs["cell_type_predicted"].astype(str)
    assert (q.obs["cell_type_ontology_term_id"].astype(str) == predicted.map(expected["ontology_term_id"])).all()
    assert (q.obs["cell_type_ontology_label"].astype(str) == predicted.map(expected["ontology_label"])).all()
    scx.tl.filter_low_confidence(q, threshold=0.95)  # names stay unfiltered, ids do not
    assert (q.obs["cell_type_ontology_label"].astype(str) == predicted.map(expected["ontology_label"])).all()
    assert (q.obs["cell_type_ontology_term_id"].astype(str).to_numpy()[low] == "unknown").all()


def test_predicting_again_drops_the_ontology_columns_of_the_earlier_labels(model, caplog):
    q = _data(n=300, seed=4)
    scx.tl.predict(q, model)
    scx.tl.filter_low_confidence(q, threshold=0.0)
    q.obs["cell_type"] = pd.Categorical(q.obs["cell_type"].astype(str).str.replace("type ", "T cell "))
    scx.tl.add_ontology_ids(q, "cell_type")
    assert "cell_type_ontology" in q.uns and "cell_type_ontology_term_id" in q.obs
    scx.tl.predict(q, model)  # new labels: the ids and names of the old ones must not stay
    assert "cell_type_ontology_term_id" not in q.obs and "cell_type_ontology_label" not in q.obs
    assert "cell_type_ontology" not in q.uns
    scx.tl.filter_low_confidence(q, threshold=0.5)
    assert "cell_type_ontology_term_id" not in q.obs
    # ids mapped for another column under the default names: removed too, with a warning that says how to keep them
    q.obs["author"] = pd.Categorical(["T cell"] * q.n_obs)
    scx.tl.add_ontology_ids(q, "author")
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(q, model)
    assert "cell_type_ontology_term_id" not in q.obs
    assert "add_ontology_ids wrote them for obs['author']" in caplog.text and "author_ontology_term_id" in caplog.text


def test_train_says_when_every_label_was_excluded():
    ref = _data(n=200, seed=1)
    ref.obs["label"] = "Unknown"
    with pytest.raises(ValueError, match="exclude_labels"):
        scx.tl.train(ref, "label", genes=[f"G{i}" for i in range(70)])
    with pytest.raises(ValueError, match="exclude_labels"):  # None is the default list, as in a YAML config
        scx.tl.train(ref, "label", genes=[f"G{i}" for i in range(70)], exclude_labels=None)


def test_an_invalid_settings_chunk_size_is_an_error(model, monkeypatch):
    q = _data(n=50, seed=2)
    monkeypatch.setattr(scx.settings, "chunk_size", 0)
    with pytest.raises(ValueError, match=r"scx.settings.chunk_size must be a positive whole number"):
        scx.tl.predict(q, model)
    assert "cell_type" not in q.obs


def test_n_jobs_minus_one_means_every_core(model, monkeypatch):
    """As in scikit-learn and scanpy: -1 every core, -2 all but one (it was one thread)."""
    import os

    from spatialcx._settings import n_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [n_workers(n, 100) for n in (None, -1, -2, 3, 1)] == [8, 8, 7, 3, 1]
    assert n_workers(-1, 2) == 2 and n_workers(-20, 100) == 1
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_jobs must be None or a non-zero whole number"):
            n_workers(bad, 10)
    q = _data(n=300, seed=2)
    expected = scx.tl.predict(q, model, copy=True).obsm["cell_type_decision_scores"]
    monkeypatch.setattr(scx.settings, "n_jobs", -1)
    monkeypatch.setattr(scx.settings, "chunk_size", 50)
    np.testing.assert_array_equal(scx.tl.predict(q, model, copy=True).obsm["cell_type_decision_scores"], expected)


def test_filters_keep_missing_labels_missing_and_check_the_confidence(model):
    q = _data(n=300, seed=3)
    scx.tl.predict(q, model)
    scx.tl.filter_low_confidence(q, threshold=0.0)
    labels = q.obs["cell_type"].astype(object)
    labels.iloc[:3] = np.nan
    q.obs["cell_type"] = pd.Categorical(labels)
    scx.tl.filter_low_count_types(q, min_cells=2)
    assert q.obs["cell_type"].isna().sum() == 3 and "nan" not in q.obs["cell_type"].cat.categories
    q.obs["author"] = pd.Categorical(labels)
    scx.tl.filter_low_confidence(q, threshold=0.0, source_key="author")
    assert q.obs["cell_type"].isna().sum() == 3 and "nan" not in q.obs["cell_type"].cat.categories
    before = q.obs["cell_type"].copy()
    for bad, match in (("high", "not numbers"), (q.obs["cell_type_confidence"] * 100, "outside")):
        r = q.copy()
        r.obs["cell_type_confidence"] = bad
        with pytest.raises(ValueError, match=match):
            scx.tl.filter_low_confidence(r)
        pd.testing.assert_series_equal(r.obs["cell_type"], before)  # nothing written


def test_train_on_a_lazy_reference_equals_in_memory(tmp_path):
    """A lazily read reference (obs columns are xarray there) trains the same model as in memory."""
    ref = _data(n=400, seed=11)
    ref.write_zarr(tmp_path / "ref.zarr")
    genes = [f"G{i}" for i in range(70)]
    expected = scx.tl.train(ref, "label", genes=genes).model_hash
    lazy = ad.experimental.read_lazy(tmp_path / "ref.zarr")
    assert scx.tl.train(lazy, "label", genes=genes).model_hash == expected
    handle = scx.io.read_reference(tmp_path / "ref.zarr", label_key="label")
    assert scx.tl.train(handle, "label", genes=genes).model_hash == expected


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_predict_on_a_lazy_csc_table_reads_rows_from_the_file(model, tmp_path, suffix):
    """anndata's lazy CSC array holds every row in each chunk: scoring it through dask would load whole columns (the
    whole table); its blocks of rows are read from the file instead, and nothing is computed through dask."""
    import dask

    def no_dask_compute(*args, **kwargs):
        raise AssertionError("computed through dask")

    q = _data(n=900, seed=9)
    eager = q.copy()
    scx.tl.predict(eager, model)
    q.X = sparse.csc_matrix(q.X)
    path = tmp_path / f"q{suffix}"
    q.write_h5ad(path) if suffix == ".h5ad" else q.write_zarr(path)
    lazy = ad.experimental.read_lazy(path)
    with dask.config.set(scheduler=no_dask_compute):
        out = scx.tl.predict(lazy, model, chunk_size=200, copy=True)
    np.testing.assert_allclose(out.obsm["cell_type_decision_scores"], eager.obsm["cell_type_decision_scores"])
    predicted = out.obs["cell_type_predicted"]
    predicted = predicted.compute() if hasattr(predicted, "compute") else predicted
    assert (np.asarray(predicted) == eager.obs["cell_type_predicted"].to_numpy()).all()


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
@pytest.mark.parametrize("copy", [True, False])
def test_predict_on_a_view_of_a_lazy_csc_table_reads_rows_from_the_file(model, tmp_path, suffix, copy):
    """A view of a lazy CSC table (every other cell, some genes) is predicted from the file too: the view's copy (for
    copy=True, or the view made actual for copy=False) keeps the matrix on disk, not a dask selection of whole columns."""
    import dask

    from spatialcx._matrix import _stored_csc

    def no_dask_compute(*args, **kwargs):
        raise AssertionError("computed through dask")

    q = _data(n=900, seed=9)
    rows, genes = slice(1, None, 2), np.sort(np.random.default_rng(1).choice(q.n_vars, q.n_vars - 3, replace=False))
    eager = q[rows, genes].copy()
    scx.tl.predict(eager, model)
    q.X = sparse.csc_matrix(q.X)
    path = tmp_path / f"q{suffix}"
    q.write_h5ad(path) if suffix == ".h5ad" else q.write_zarr(path)
    view = ad.experimental.read_lazy(path)[rows, genes]
    with dask.config.set(scheduler=no_dask_compute):
        out = scx.tl.predict(view, model, chunk_size=200, copy=copy)
    out = view if out is None else out
    assert not out.is_view and _stored_csc(out.X) is not None  # before: a dask selection reading whole columns
    np.testing.assert_allclose(out.obsm["cell_type_decision_scores"], eager.obsm["cell_type_decision_scores"])
    predicted = out.obs["cell_type_predicted"]
    predicted = predicted.compute() if hasattr(predicted, "compute") else predicted
    assert (np.asarray(predicted) == eager.obs["cell_type_predicted"].to_numpy()).all()
    assert list(out.obs_names) == list(eager.obs_names) and list(out.var_names) == list(eager.var_names)


def test_predict_lazy_zarr_table_on_dask_distributed(model, tmp_path):
    """A lazily read zarr table (dask array of sparse chunks) scored on a dask.distributed cluster (worker processes)."""
    from distributed import Client, LocalCluster

    q = _data(n=900, seed=9)
    eager = q.copy()
    scx.tl.predict(eager, model)
    q.write_zarr(tmp_path / "q.zarr")
    lazy = ad.experimental.read_lazy(tmp_path / "q.zarr")
    assert type(lazy.X).__module__.startswith("dask")
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        out = scx.tl.predict(lazy, model, chunk_size=200, copy=True)
    np.testing.assert_allclose(out.obsm["cell_type_decision_scores"], eager.obsm["cell_type_decision_scores"])
    assert (out.obs["cell_type_predicted"].to_numpy() == eager.obs["cell_type_predicted"].to_numpy()).all()


def _sampled_rows(adata):
    """The rows that the normalization detection samples (a bad value elsewhere is only met while scoring)."""
    from spatialcx.pp._normalization import _sample_row_indices

    return set(_sample_row_indices(adata.n_obs, adata.n_vars, 0).tolist())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -3.0])
@pytest.mark.parametrize("backing", ["csr", "dense", "dask"])
def test_predict_names_an_invalid_count_met_while_scoring(model, bad, backing):
    """A NaN, infinite or negative count in a row the detection did not sample: a clear error, nothing written."""
    import dask.array as da

    q = _data(n=3000, seed=12)
    row = next(r for r in range(2000, 3000) if r not in _sampled_rows(q))
    x = q.X.tolil()
    x[row, 3] = bad
    x = sparse.csr_matrix(x)
    q.X = x.toarray() if backing == "dense" else x
    if backing == "dask":
        q.X = da.from_array(x.toarray(), chunks=(500, -1))
    with pytest.raises(ValueError, match=r"The table's X holds values that are not finite and non-negative") as e:
        scx.tl.predict(q, model, chunk_size=700)
    assert f"{bad} in row {row:,} (the cell's 0-based position), column 3 " in str(e.value)
    assert "cell_type" not in q.obs and "cell_type" not in q.uns
    with pytest.raises(ValueError, match=r"The reference's X holds values that are not finite"):
        scx.tl.train(q, "label", genes=[f"G{i}" for i in range(70)], chunk_size=700)


def test_predict_sums_duplicated_entries_of_a_sparse_table(model):
    """A CSR table storing a cell's gene as several entries (not canonical) scores as the matrix it holds (their sum)."""
    q = _data(n=400, seed=13)
    expected = scx.tl.predict(q, model, copy=True)
    x = sparse.csr_matrix(q.X)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    split = x.data >= 2  # each such count stored as two entries: floor(v / 2) and the rest
    data = np.concatenate([x.data - np.where(split, np.floor(x.data / 2), 0), np.floor(x.data[split] / 2)])
    r, c = np.concatenate([rows, rows[split]]), np.concatenate([x.indices, x.indices[split]])
    order = np.argsort(r, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=x.shape[0]))])
    q.X = sparse.csr_matrix((data[order], c[order], indptr), shape=x.shape)
    assert not q.X.has_canonical_format and abs(q.X - x).max() == 0
    scx.tl.predict(q, model)
    np.testing.assert_allclose(
        q.obsm["cell_type_decision_scores"], expected.obsm["cell_type_decision_scores"], rtol=1e-6, atol=1e-6
    )
    assert (q.obs["cell_type"] == expected.obs["cell_type"]).all()


def test_predict_refuses_an_unknown_normalize_over(model):
    q = _data(n=100, seed=14)
    with pytest.raises(ValueError, match=r"normalize_over must be 'genes'.*got 'total'"):
        scx.tl.predict(q, model, normalize_over="total")
    assert "cell_type" not in q.obs


def test_predict_on_a_wide_dense_table_reads_blocks_bounded_by_its_width(model):
    """A dense block holds every gene of the table, so a wide dense table is read a few rows at a time."""
    q = _data(n=300, seed=15)
    pad = np.zeros((300, 40_000), dtype=np.float32)
    wide = ad.AnnData(np.hstack([q.X.toarray(), pad]), obs=q.obs[[]])
    wide.var_names = [*q.var_names, *(f"pad{i}" for i in range(40_000))]
    scx.tl.predict(wide, model)
    # 1,000 rows (the least) of 40,080 genes, not the default 50,000 rows (16 GB of float64)
    assert wide.uns["cell_type"]["chunk_size"] == 1000
    scx.tl.predict(q, model)
    np.testing.assert_array_equal(wide.obsm["cell_type_decision_scores"], q.obsm["cell_type_decision_scores"])


def test_train_ignores_repeated_reference_genes_outside_the_panel():
    ref = _data(n=300, seed=16)
    panel = [f"G{i}" for i in range(60)]
    expected = scx.tl.train(ref, "label", genes=panel).model_hash
    ref.var_names = [*ref.var_names[:-2], "Repeated", "Repeated"]  # G78, G79: not in the panel
    assert scx.tl.train(ref, "label", genes=panel).model_hash == expected
    with pytest.raises(ValueError, match=r"The reference has duplicated gene names \(1, e.g. \['Repeated'\]\)"):
        scx.tl.train(ref, "label", genes=[*panel, "Repeated"])


def test_no_shared_genes_error_says_where_the_model_genes_are(model):
    q = _data(n=100, seed=17)
    q.var["symbol"] = q.var_names.astype(str)
    q.var_names = [f"ENSMUSG{i:011d}" for i in range(q.n_vars)]
    with pytest.raises(ValueError, match=r"var\['symbol'\] holds 70 of them: name the genes by it"):
        scx.tl.predict(q, model)
    q.var = q.var.drop(columns="symbol")
    with pytest.raises(ValueError, match="The table's genes are Ensembl ids and the model's are gene symbols"):
        scx.tl.predict(q, model)
    # the same genes in another case (a mouse panel's Aqp4 against a model's aqp4): counted and explained
    q = _data(n=100, seed=17)
    q.var_names = [g.lower() for g in q.var_names.astype(str)]
    with pytest.raises(ValueError, match=r"Only 0 of .* 70 of the model's genes are in the table when case is ignored"):
        scx.tl.predict(q, model)


def test_model_descriptions_put_in_uns_stay_storable(model, tmp_path):
    """A model's free description (JSON) is recorded in uns: it must write to h5ad and zarr whatever it holds.

    Lists of dicts and lists holding None do not write to h5ad, '/' in a key does not write to zarr, ragged lists and
    integers beyond 64 bits to neither; such values are kept as their JSON text (and '/' in keys becomes '_').
    """
    import dataclasses

    description = {
        "datasets": [{"id": "a", "cells": 10}, {"id": "b", "cells": 20}],
        "seeds": [1, None],
        "train/test": 0.2,
        "big": 2**70,
        "ragged": [[1, 2], [3]],
        "nested": {"ok": [1, 2], "skipped": None, "deeper": {"k/v": ["x", None]}},
        "plain": ["a", "b"],
    }
    described = dataclasses.replace(model, description=description)
    q = _data(n=200, seed=5)
    scx.tl.predict(q, described)
    stored = q.uns["cell_type"]["model_description"]
    assert stored["datasets"] == '[{"id": "a", "cells": 10}, {"id": "b", "cells": 20}]'
    assert stored["seeds"] == "[1, null]" and stored["ragged"] == "[[1, 2], [3]]" and stored["big"] == str(2**70)
    assert stored["train_test"] == 0.2 and stored["plain"] == ["a", "b"]
    assert stored["nested"] == {"ok": [1, 2], "deeper": {"k_v": '["x", null]'}}
    q.write_h5ad(tmp_path / "q.h5ad")
    q.write_zarr(tmp_path / "q.zarr")
    for back in (ad.read_h5ad(tmp_path / "q.h5ad"), ad.read_zarr(tmp_path / "q.zarr")):
        assert back.uns["cell_type"]["model_description"]["datasets"] == stored["datasets"]


def test_predict_warns_before_replacing_the_datas_own_cell_type_columns(model, caplog):
    # a CELLxGENE-style table comes with its authors' cell_type and CL ids: replacing them is said, not silent
    q = _data(n=200, seed=5)
    q.obs["cell_type"] = pd.Categorical(["B cell"] * q.n_obs)
    q.obs["cell_type_ontology_term_id"] = pd.Categorical(["CL:0000236"] * q.n_obs)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(q, model)
    assert "['cell_type', 'cell_type_ontology_term_id'] hold values that no spatialcx prediction wrote" in caplog.text
    assert "key_added='cell_type_spatialcx'" in caplog.text
    assert set(q.obs["cell_type"].astype(str)) <= set(model.classes)
    # predicting again replaces spatialcx's own columns: nothing to warn about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(q, model)
    assert "no spatialcx prediction wrote" not in caplog.text
    # another key_added leaves the data's columns alone, silently
    fresh = _data(n=200, seed=5)
    fresh.obs["cell_type"] = pd.Categorical(["B cell"] * fresh.n_obs)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(fresh, model, key_added="cell_type_scx")
    assert "no spatialcx prediction wrote" not in caplog.text and (fresh.obs["cell_type"] == "B cell").all()


def test_predict_on_a_lazy_table_that_has_cell_ontology_columns(model, tmp_path):
    """A lazily read table with CL columns (a CELLxGENE table, an earlier annotation): the stale ids are removed."""
    q = _data(n=300, seed=12)
    eager = q.copy()
    scx.tl.predict(eager, model)
    q.obs["cell_type"] = pd.Categorical(["T cell"] * q.n_obs)
    q.obs["cell_type_ontology_term_id"] = pd.Categorical(["CL:0000084"] * q.n_obs)
    q.write_zarr(tmp_path / "q.zarr")
    lazy = ad.experimental.read_lazy(tmp_path / "q.zarr")
    scx.tl.predict(lazy, model)
    assert "cell_type_ontology_term_id" not in lazy.obs.columns
    assert "label" in lazy.obs.columns
    obs = lazy.obs.to_memory()
    assert (obs.index == eager.obs_names).all()
    assert (obs["cell_type"].astype(str) == eager.obs["cell_type"].astype(str)).all()
    np.testing.assert_allclose(lazy.obsm["cell_type_decision_scores"], eager.obsm["cell_type_decision_scores"])


def test_no_shared_genes_error_finds_the_gene_names_of_a_lazy_table(model, tmp_path):
    """A lazily read table named by Ensembl ids (as CELLxGENE's) with symbols in a var column: the error names it."""
    q = _data(n=50, seed=13)
    q.var["feature_name"] = pd.Categorical(q.var_names)
    q.var_names = [f"ENSG{i:011d}" for i in range(q.n_vars)]
    q.write_zarr(tmp_path / "q.zarr")
    lazy = ad.experimental.read_lazy(tmp_path / "q.zarr")
    with pytest.raises(ValueError, match=r"var\['feature_name'\] holds 70 of them"):
        scx.tl.predict(lazy, model)
    assert "cell_type" not in lazy.obs.columns


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_iter": 0}, "max_iter must be a positive whole number"),  # sklearn only warns: an untrained model
        ({"max_iter": 2.5}, "max_iter must be a positive whole number"),
        ({"min_genes": 0}, "min_genes must be a whole number of at least 1"),
        ({"min_genes": "10"}, "min_genes must be a whole number of at least 1"),
        ({"balance_cell_type": "yes"}, "balance_cell_type must be True or False"),
        ({"balance_cell_type": "no", "method": "minibatch"}, "balance_cell_type must be True or False"),  # balanced
        ({"C": 0}, "C must be a positive number"),
        ({"C": float("nan")}, "C must be a positive number"),
        ({"alpha": 0, "method": "sgd"}, "alpha must be a positive finite number"),
        ({"alpha": -1.0}, "alpha must be a positive finite number"),
        ({"n_jobs": 0}, "n_jobs must be None"),
        ({"random_state": "seed"}, "random_state must be a non-negative whole number"),
        ({"chunk_size": 0}, "chunk_size must be a positive whole number"),
    ],
)
def test_train_refuses_untrainable_settings_before_reading_labels_or_expression(monkeypatch, kwargs, match):
    """These trained an unfitted model (max_iter=0), balanced on "no", or failed in scikit-learn once the data were
    read; min_genes=0 asked for fewer than one shared gene."""
    import spatialcx._table as table
    import spatialcx.pp._normalization as norm

    def no_reading(*args, **kw):
        raise AssertionError("the reference was read before the settings were checked")

    monkeypatch.setattr(norm, "find_expression_source", no_reading)
    monkeypatch.setattr(table, "obs_column", no_reading)
    with pytest.raises(ValueError, match=match):
        scx.tl.train(_data(n=100, seed=1), "label", genes=[f"G{i}" for i in range(70)], **kwargs)


def test_train_reads_labels_as_combine_references_does():
    """Missing labels written out as text ("nan", after ``astype(str)``), empty labels and surrounding whitespace made
    classes of their own ("nan", "type 1 " beside "type 1"); whole numbers stored as floats were named "1.0"."""
    ref = _data(n=400, seed=20)
    genes = [f"G{i}" for i in range(70)]
    labels = ref.obs["label"].astype(str).to_numpy().copy()
    missing = np.zeros(ref.n_obs, dtype=bool)
    missing[:12] = True
    expected_ref = ref[~missing].copy()
    expected = scx.tl.train(expected_ref, "label", genes=genes)
    messy = labels.astype(object)
    messy[:6], messy[6:9], messy[9:12] = "nan", "", "<NA>"
    messy[20:40] = [f"{v} " for v in messy[20:40]]  # trailing spaces
    ref.obs["label"] = pd.Categorical(messy)
    model = scx.tl.train(ref, "label", genes=genes)
    assert model.classes.tolist() == expected.classes.tolist() == ["type 0", "type 1", "type 2", "type 3"]
    assert model.model_hash == expected.model_hash
    assert model.description["n_cells_unlabelled"] == 12 and sum(model.description["cells_per_type"]["n_cells"]) == 388
    # numeric cluster labels with missing values (a float column): "0", not "0.0", as combine_references names them
    ref.obs["cluster"] = pd.Series(labels, index=ref.obs_names).str[-1].astype(float).where(~missing)
    assert scx.tl.train(ref, "cluster", genes=genes).classes.tolist() == ["0", "1", "2", "3"]


def test_train_records_the_settings_that_shaped_the_model():
    """balance_cell_type, batch_size and epochs were not recorded (two different models had the same description), a
    max_iter that mini-batch training does not use was, and the cells left out by exclude_labels were not."""
    ref = _data(n=300, seed=21)
    labels = ref.obs["label"].astype(str).to_numpy().copy()
    labels[:7] = "Doublet"
    ref.obs["label"] = labels
    genes = [f"G{i}" for i in range(70)]
    balanced = scx.tl.train(
        ref, "label", genes=genes, method="minibatch", epochs=2, batch_size=50, balance_cell_type=True
    )
    d = balanced.description
    assert (d["method"], d["method_requested"], d["batch_size"], d["epochs"]) == ("minibatch", "minibatch", 50, 2)
    assert d["balance_cell_type"] is True and "max_iter" not in d and d["clip"] == 10.0
    assert d["excluded_labels"] == {"labels": ["Doublet"], "n_cells": [7]} and d["n_cells_unlabelled"] == 0
    plain = scx.tl.train(ref, "label", genes=genes, method="minibatch", epochs=2, batch_size=50)
    assert plain.description["balance_cell_type"] is False and plain.model_hash != balanced.model_hash
    auto = scx.tl.train(ref, "label", genes=genes, max_iter=30).description
    assert (auto["method"], auto["method_requested"], auto["max_iter"]) == ("logreg", "auto", 30)
    assert "batch_size" not in auto and "balance_cell_type" not in auto


def test_train_on_real_labels_saved_as_text_keeps_missing_labels_out(shared_data):
    """The real hypothalamus reference with some labels missing, saved after ``obs[key].astype(str)`` (a common way to
    make a column writable): the missing labels came back as a trained class "nan"."""
    ref = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad"))
    query = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "merfish_query.h5ad"))
    labels = ref.obs["cell_type_author"].astype(object).to_numpy().copy()
    labels[np.random.default_rng(0).choice(ref.n_obs, 60, replace=False)] = np.nan
    ref.obs["cell_type_author"] = pd.Categorical(labels)
    kw = {"genes": query, "method": "minibatch", "epochs": 2}
    expected = scx.tl.train(ref, "cell_type_author", **kw)
    ref.obs["cell_type_author"] = ref.obs["cell_type_author"].astype(str)
    assert (ref.obs["cell_type_author"] == "nan").sum() == 60
    model = scx.tl.train(ref, "cell_type_author", **kw)
    assert "nan" not in model.classes and model.n_classes == 13  # 14 author types less "Ambiguous" (excluded)
    assert model.model_hash == expected.model_hash


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": "zscor"}, r"Unknown confidence method 'zscor'"),
        ({"min_gene_fraction": "half"}, r"min_gene_fraction must be a number in \[0, 1\].*got 'half'"),
        ({"min_gene_fraction": True}, r"min_gene_fraction must be a number in \[0, 1\].*got True"),
        ({"chunk_size": 0}, r"chunk_size must be a positive whole number"),
    ],
)
def test_predict_checks_its_settings_before_reading_the_table(model, monkeypatch, kwargs, match):
    """A misspelt confidence method was refused only after every cell was scored (12.6 s on 1,000,000 cells); a
    min_gene_fraction that is not a number gave Python's comparison TypeError, and True was taken for 100%."""
    import spatialcx.pp._normalization as norm

    def no_reading(*args, **kw):
        raise AssertionError("the table was read before the settings were checked")

    monkeypatch.setattr(norm, "find_expression_source", no_reading)
    query = _data(n=50, seed=30)
    with pytest.raises(ValueError, match=match):
        scx.tl.predict(query, model, **kwargs)
    assert "cell_type" not in query.obs


def test_predict_warning_names_the_missing_genes_and_those_in_another_case(model, caplog):
    """The warning about missing model genes gave their number only: not which, nor that ten of them were in the table
    spelt in another case (matched exactly, they were scored at their training mean)."""
    query = _data(n=200, seed=31)
    query = query[:, [f"G{i}" for i in range(80) if not 10 <= i < 15]].copy()  # G10 .. G14 missing
    query.var_names = [g.lower() if int(g[1:]) < 10 else g for g in query.var_names]  # G0 .. G9 as g0 .. g9
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(query, model)
    assert "15 of the model's 70 genes are missing from the table (e.g. ['G0', 'G1', 'G2', 'G3', 'G4'])" in caplog.text
    assert "10 of them are in the table under another case (e.g. the model's 'G0' is the table's 'g0')" in caplog.text
    assert query.uns["cell_type"]["n_genes_used"] == 55
    caplog.clear()
    only_missing = _data(n=200, seed=31)[:, [f"G{i}" for i in range(80) if not 10 <= i < 15]].copy()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(only_missing, model)
    assert "5 of the model's 70 genes are missing from the table (e.g. ['G10', 'G11'" in caplog.text
    assert "another case" not in caplog.text


def _cellxgene_style(tmp_path):
    """A reference laid out as CELLxGENE writes it: Ensembl ids, ``var["feature_name"]``, log1p X, counts in raw."""
    counts = _data(n=600, g=30, seed=40)
    symbols = list(counts.var_names)
    ids = pd.Index([f"ENSG{i:011d}" for i in range(counts.n_vars)], name="gene_ids")
    adata = counts.copy()
    adata.var_names = ids
    adata.var["feature_name"] = pd.Categorical(symbols)
    adata.raw = adata.copy()  # raw.var: the ids only (feature_name lives in var)
    del adata.raw.var["feature_name"]
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    path = tmp_path / "cxg.h5ad"
    adata.write_h5ad(path)
    return counts, adata, path


def test_train_matches_a_panel_to_a_cellxgene_style_reference(tmp_path):
    """The panel's symbols reach the Ensembl-named counts of raw through var["feature_name"], whether the reference is
    in memory, read lazily with read_reference (X renamed to symbols, raw still by id) or given as a path. Before,
    none of the panel genes was found ("Only 0 of 4 panel genes"), a lazy one without genes= failed with a KeyError,
    and a path was an AttributeError."""
    counts, adata, path = _cellxgene_style(tmp_path)
    panel = ["G3", "G0", "g1", "G5", "G7", "G9"]  # "g1": the panel's own spelling, matched case-insensitively
    expected = scx.tl.train(counts, "label", genes=panel)  # the same counts named by symbols
    lazy = scx.io.read_reference(path, label_key="label")
    for reference in (adata, lazy, path, str(path)):
        model = scx.tl.train(reference, "label", genes=panel)
        assert list(model.features) == panel
        np.testing.assert_allclose(model.coef, expected.coef, rtol=1e-5, atol=1e-6)
    whole = scx.tl.train(lazy, "label")  # X's genes (symbols), read from raw by id
    assert list(whole.features) == list(counts.var_names)
    np.testing.assert_allclose(whole.coef, scx.tl.train(counts, "label").coef, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="reference must be an AnnData or the path"):
        scx.tl.train(42, "label")


def test_colours_of_columns_whose_categories_change_are_dropped(model, tmp_path):
    """scanpy / spatialdata-plot keep a palette per categorical column in uns[f"{column}_colors"]: after a prediction
    with other classes, the old palette was kept and drawn for the new categories (one colour each, by position)."""
    query = _data(n=300, seed=50)
    scx.tl.predict(query, model)
    n = len(query.obs["cell_type"].cat.categories)
    query.obs["batch"] = pd.Categorical(["a", "b"] * 150)
    query.uns["cell_type_colors"] = np.array(["#000000"] * n, dtype=object)
    query.uns["batch_colors"] = np.array(["#111111", "#222222"], dtype=object)
    scx.tl.predict(query, model)  # the same classes: the palette still fits
    assert list(query.uns["cell_type_colors"]) == ["#000000"] * n
    reference = _data(n=600, seed=51, depth=5)
    reference = reference[reference.obs["label"].isin(["type 0", "type 1"])].copy()
    two = scx.tl.train(reference, "label", genes=[f"G{i}" for i in range(70)])
    scx.tl.predict(query, two)  # other classes: the palette would colour them by position
    assert "cell_type_colors" not in query.uns and "cell_type_predicted_colors" not in query.uns
    assert list(query.uns["batch_colors"]) == ["#111111", "#222222"]  # a column left alone keeps its colours
    query.write_h5ad(tmp_path / "q.h5ad")


def test_genes_that_put_the_query_at_the_clip_are_named(caplog):
    """A gene the reference detects in a few cells but the query expresses widely puts the query's cells at the clip
    (10 spreads above the training mean) and pulls every call towards the types that expressed it: named now, also
    when the table is a dask array (the counts of the blocks are summed)."""
    import dask.array as da

    reference = _data(n=800, g=20, seed=60, depth=5)
    x = reference.X.toarray()
    x[:, 0] = 0
    x[:3, 0] = 5  # G0: in 3 reference cells
    reference.X = sparse.csr_matrix(x)
    model = scx.tl.train(reference, "label")
    query = _data(n=400, g=20, seed=61, depth=5)
    q = query.X.toarray()
    q[:, 0] = 0
    q[:300, 0] = 5  # G0 in 75 % of the query's cells
    query.X = sparse.csr_matrix(q)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(query, model)
    assert "1 of the model's genes put more than 5 % of the cells at the clip" in caplog.text
    assert "G0 (75% of cells)" in caplog.text
    assert query.uns["cell_type"]["genes_at_clip"] == {"genes": ["G0"], "share": [0.75]}
    lazy = ad.AnnData(da.from_array(query.X, chunks=(100, 20)), obs=query.obs[[]], var=query.var)
    scx.tl.predict(lazy, model, chunk_size=100)
    assert lazy.uns["cell_type"]["genes_at_clip"] == {"genes": ["G0"], "share": [0.75]}
    np.testing.assert_array_equal(lazy.obs["cell_type_predicted"], query.obs["cell_type_predicted"])
    caplog.clear()
    plain = _data(n=400, g=20, seed=62, depth=5)
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.predict(plain, scx.tl.train(_data(n=800, g=20, seed=63, depth=5), "label"))
    assert "at the clip" not in caplog.text and "genes_at_clip" not in plain.uns["cell_type"]
