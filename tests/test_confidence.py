"""Confidence methods, their calibration and the evaluation metrics, on synthetic and real (STARmap) data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.special import expit, log_softmax

import spatialcx as scx
from spatialcx.model._calibration import column_standardise, fit_calibration
from spatialcx.tl._confidence import CONFIDENCE_METHODS, confidence_with_params

CAL3 = {"negative_median": [-3.0, -2.0, -2.5], "softmax_temperature": 0.8}


def _shift_pair(n_types=4, *, seed=0, n_ref=120, n_query=900, leave_out=None, n_markers=20, lfc=1.5):
    """A scRNA-seq-like reference and a spatial-like query: panel subset, 5x lower depth, per-gene bias."""
    rng = np.random.default_rng(seed)
    n_genes, n_panel = 300, 120
    base = np.log(rng.gamma(0.4, 1.0, n_genes) + 1e-3)
    effect = np.zeros((n_types, n_genes))
    for t in range(n_types):
        effect[t, rng.choice(n_genes, n_markers, replace=False)] = rng.normal(lfc, 0.5, n_markers)
    prof = np.exp(base + effect)
    prof /= prof.sum(axis=1, keepdims=True)

    def draw(lab, genes, depth, bias):
        mu = prof[lab][:, genes] * bias * (depth * rng.lognormal(0, 0.4, len(lab)))[:, None]
        return sparse.csr_matrix(rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(np.float32))

    ref_lab = np.repeat(np.arange(n_types), n_ref)
    if leave_out is not None:
        ref_lab = ref_lab[ref_lab != leave_out]
    ref = ad.AnnData(draw(ref_lab, np.arange(n_genes), 2000.0, 1.0))
    ref.obs["label"] = pd.Categorical([f"T{t}" for t in ref_lab])
    ref.var_names = [f"g{i}" for i in range(n_genes)]
    ref.obs_names = [f"r{i}" for i in range(ref.n_obs)]
    panel = np.sort(rng.choice(n_genes, n_panel, replace=False))
    q_lab = rng.integers(0, n_types, n_query)
    query = ad.AnnData(draw(q_lab, panel, 400.0, np.exp(rng.normal(0, 0.5, n_panel))))
    query.obs["label"] = pd.Categorical([f"T{t}" for t in q_lab])
    query.var_names = [f"g{i}" for i in panel]
    query.obs_names = [f"q{i}" for i in range(query.n_obs)]
    return ref, query


def _kept_accuracy(query: ad.AnnData, truth_key: str, confidence: np.ndarray, threshold: float = 0.8) -> float:
    """Share of right calls among the labelled cells whose confidence is at or above the threshold."""
    truth = query.obs[truth_key].astype(str).to_numpy()
    right = truth == query.obs["cell_type_predicted"].astype(str).to_numpy()
    kept = (confidence >= threshold) & (truth != "NA")
    return float(right[kept].mean())


@pytest.fixture(scope="module")
def shifted():
    ref, query = _shift_pair()
    model = scx.tl.train(ref, "label", genes=query.var_names, random_state=0)
    scx.tl.predict(query, model)
    return model, query


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("method", CONFIDENCE_METHODS)
def test_range_and_not_constant_for_two_classes(method):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 2, 600) + np.where(rng.random(600) < 0.4, 2.0, -2.0)
    binary = np.column_stack([-w, w])  # a binary model: one score per class, mirror images
    cal = {"negative_median": [-2.0, -2.0], "softmax_temperature": 1.0}
    c = scx.tl.transform_confidence(binary, method, calibration=cal)
    assert c.shape == (600,) and c.dtype == np.float64
    assert np.isfinite(c).all() and (c >= 0).all() and (c <= 1).all()
    if method == "cell_zscore":
        # the published per-cell z-score: every cell gets sigmoid(1) with 2 classes
        np.testing.assert_allclose(c, expit(1.0))
    else:
        assert np.unique(np.round(c, 6)).size > 50
    many = rng.normal(-3, 1.5, (400, 3))
    many[np.arange(400), rng.integers(0, 3, 400)] += 5
    c3 = scx.tl.transform_confidence(many, method, calibration=CAL3)
    assert (c3 >= 0).all() and (c3 <= 1).all() and np.unique(np.round(c3, 6)).size > 50


def test_cell_zscore_baseline_is_bounded_and_blind_to_unseen_cells():
    rng = np.random.default_rng(2)
    k = 8
    s = rng.normal(size=(500, k))
    c = scx.tl.transform_confidence(s, "cell_zscore")
    assert c.max() <= expit(np.sqrt(k - 1)) + 1e-12 and c.min() >= 0.5
    # "none of these": every score negative, yet the per-cell z-score stays high
    unseen = rng.normal(-6, 0.3, (200, k))
    assert np.median(scx.tl.transform_confidence(unseen, "cell_zscore")) > 0.8


@pytest.mark.parametrize("method", [m for m in CONFIDENCE_METHODS if m != "cell_zscore"])
def test_clear_winner_above_tie(method):
    rng = np.random.default_rng(3)
    n, k = 600, 3
    lab = rng.integers(0, k, n)
    s = rng.normal(-3, 0.7, (n, k))
    s[np.arange(n), lab] += 5
    # appended: two cells tied between classes 0 and 1, and two clear class-0 / class-1 winners
    s = np.vstack([s, [[1.0, 1.0, -3.0], [1.5, 1.5, -3.0], [3.0, -3.0, -3.0], [-3.0, 3.0, -3.0]]])
    c = scx.tl.transform_confidence(s, method, calibration=CAL3)
    assert min(c[-2:]) > max(c[-4:-2])


@pytest.mark.parametrize("method", CONFIDENCE_METHODS)
def test_deterministic(method):
    s = np.random.default_rng(4).normal(size=(300, 5))
    cal = {"negative_median": [-1.0] * 5, "softmax_temperature": 0.5}
    a, pa = confidence_with_params(s, method, calibration=cal)
    b, pb = confidence_with_params(s.copy(), method, calibration=cal)
    np.testing.assert_array_equal(a, b)
    assert pa == pb


def test_chunked_equals_unchunked(shifted):
    model, query = shifted
    a = query.copy()
    b = query.copy()
    scx.tl.predict(a, model, chunk_size=37)
    scx.tl.predict(b, model, chunk_size=100_000)
    np.testing.assert_array_equal(a.obs["cell_type_confidence"], b.obs["cell_type_confidence"])
    np.testing.assert_array_equal(a.obs["cell_type_confidence"], query.obs["cell_type_confidence"])
    assert a.uns["cell_type"]["confidence_params"] == b.uns["cell_type"]["confidence_params"]


# ---------------------------------------------------------------------------------------------- behaviour on data
def test_platform_shift_calibrated_beats_baselines(shifted):
    model, query = shifted
    table = scx.tl.evaluate_confidence(query, "label", methods=CONFIDENCE_METHODS, calibration=model)
    auroc = table["auroc"]
    assert auroc["calibrated"] > max(auroc["raw"], auroc["cell_zscore"])
    stored = scx.tl.evaluate_confidence(query, "label")
    assert stored.index.tolist() == ["calibrated"]
    assert stored.loc["calibrated", "auroc"] == pytest.approx(auroc["calibrated"], abs=1e-3)
    assert table.loc["calibrated", "correct_kept"] > 0.8
    # threshold semantics: the calls kept at 0.8 are right at least 80 % of the time
    assert _kept_accuracy(query, "label", query.obs["cell_type_confidence"].to_numpy()) >= 0.8
    # the shift of each class: where the query's cells not called that class sit, minus where the reference's sat
    params = query.uns["cell_type"]["confidence_params"]
    scores = query.obsm["cell_type_decision_scores"].astype(np.float64)
    best = scores.argmax(axis=1)
    for k in range(model.n_classes):
        expected = np.median(scores[best != k, k]) - model.calibration["negative_median"][k]
        assert params["score_shift"][k] == pytest.approx(expected, abs=1e-4)


def test_unseen_type_falls_below_threshold():
    """A distinct type missing from the reference is flagged; the per-cell z-score flags fewer of its cells."""
    ref, query = _shift_pair(n_types=6, seed=0, leave_out=0, n_markers=40, lfc=2.0)
    model = scx.tl.train(ref, "label", genes=query.var_names, random_state=0)
    assert "T0" not in model.classes
    scx.tl.predict(query, model)
    table = scx.tl.evaluate_confidence(query, "label", methods=["calibrated", "cell_zscore"], calibration=model)
    assert table.loc["calibrated", "n_unseen"] == (query.obs["label"] == "T0").sum()
    assert table.loc["calibrated", "unseen_below"] >= 0.6
    assert table.loc["calibrated", "correct_kept"] >= 0.8
    assert table.loc["cell_zscore", "unseen_below"] < table.loc["calibrated", "unseen_below"] - 0.2


def test_two_types_are_not_all_unassigned():
    ref, query = _shift_pair(n_types=2, seed=6)
    model = scx.tl.train(ref, "label", genes=query.var_names, random_state=0)
    scx.tl.predict(query, model)
    conf = query.obs["cell_type_confidence"].to_numpy()
    assert np.unique(np.round(conf, 5)).size > 100
    scx.tl.filter_low_confidence(query, threshold=0.8)
    assigned = (query.obs["cell_type"] != "Unassigned").mean()
    assert 0.5 < assigned < 1.0


def test_starmap_section_held_out(shared_data):
    """Real data: train on two STARmap sections, predict the third; author labels as truth, NA left out."""
    adata = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    sections = sorted(adata.obs["section"].unique())
    label = adata.obs["cell_type_author"].astype(str)
    ref = adata[(adata.obs["section"] != sections[-1]) & (label != "NA")].copy()
    query = adata[adata.obs["section"] == sections[-1]].copy()
    model = scx.tl.train(ref, "cell_type_author", genes=query.var_names, random_state=0)
    scx.tl.predict(query, model)
    table = scx.tl.evaluate_confidence(query, "cell_type_author", methods=CONFIDENCE_METHODS, calibration=model)
    assert table["n_cells"].iloc[0] == (query.obs["cell_type_author"] != "NA").sum()
    assert table.loc["calibrated", "auroc"] >= 0.80
    assert table.loc["calibrated", "auroc"] > max(table.loc["raw", "auroc"], table.loc["cell_zscore", "auroc"])
    assert table.loc["calibrated", "wrong_removed"] > table.loc["raw", "wrong_removed"]
    # threshold semantics: the calls kept at 0.8 are right at least 80 % of the time (all calls: 70 %); the per-cell
    # z-score keeps almost every call, so its kept calls are barely more accurate than all calls
    scores = query.obsm["cell_type_decision_scores"]
    kept_accuracy = {
        m: _kept_accuracy(query, "cell_type_author", scx.tl.transform_confidence(scores, m, calibration=model))
        for m in ("calibrated", "cell_zscore")
    }
    accuracy = table.loc["calibrated", "accuracy"]
    assert kept_accuracy["calibrated"] >= max(0.8, accuracy + 0.1)
    assert kept_accuracy["cell_zscore"] < min(0.8, kept_accuracy["calibrated"] - 0.1)


# ---------------------------------------------------------------------------------------------- calibration and model
def test_fit_calibration_values():
    rng = np.random.default_rng(7)
    classes = np.array(["a", "b", "c"])
    labels = classes[rng.integers(0, 3, 300)]
    s = rng.normal(size=(300, 3))
    s[labels == "b", 1] += 3
    cal = fit_calibration(s, labels, classes)
    for k, c in enumerate(classes):
        assert cal["negative_median"][k] == pytest.approx(np.median(s[labels != c, k]))
    z = column_standardise(s)
    idx = np.searchsorted(classes, labels)

    def nll(t):
        return -log_softmax(z / t, axis=1)[np.arange(300), idx].mean()

    t = cal["softmax_temperature"]
    assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05))
    assert json.loads(json.dumps(cal)) == cal
    with pytest.raises(ValueError, match="not classes"):
        fit_calibration(s, np.where(labels == "a", "zzz", labels), classes)
    with pytest.raises(ValueError, match="shape"):
        fit_calibration(s[:, :2], labels, classes)
    with pytest.raises(ValueError, match="two cell types"):
        fit_calibration(s, np.full(300, "a"), classes)


def test_model_carries_calibration_through_save_load(shifted, tmp_path):
    model, _ = shifted
    cal = model.calibration
    assert cal is not None and len(cal["negative_median"]) == model.n_classes and cal["n_cells"] == 480
    back = scx.CellTypeModel.load(model.save(tmp_path / "m.npz"))
    assert back.calibration == cal and back.model_hash == model.model_hash
    # the calibration is part of the identity of the model
    other = scx.CellTypeModel.load(tmp_path / "m.npz")
    other.calibration = {**cal, "softmax_temperature": cal["softmax_temperature"] * 2}
    assert other.model_hash != model.model_hash
    # a model without calibration (imported from CellTypist) keeps format 1 and loses nothing
    bare = _as_genuine_celltypist(model)
    assert bare.calibration is None
    path = bare.save(tmp_path / "bare.npz")
    with np.load(path) as npz:
        meta = json.loads(str(npz["meta"]))
    assert meta["format_version"] == 1 and "calibration" not in meta
    assert scx.CellTypeModel.load(path).model_hash == bare.model_hash
    with pytest.raises(ValueError, match="negative_median"):
        scx.CellTypeModel(
            features=model.features,
            classes=model.classes,
            coef=model.coef,
            intercept=model.intercept,
            scaler_mean=model.scaler_mean,
            scaler_scale=model.scaler_scale,
            calibration={"negative_median": [0.0], "softmax_temperature": 1.0},
        )


def test_uns_records_method_and_parameters_and_round_trips(shifted, tmp_path):
    _, query = shifted
    uns = query.uns["cell_type"]
    assert uns["confidence_method"] == "calibrated"
    params = uns["confidence_params"]
    assert params["reference_calibration"] is True and params["calibration_source"] == "training cells"
    assert len(params["reference_negative_median"]) == len(uns["classes"])
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad").uns["cell_type"]["confidence_params"]
    np.testing.assert_allclose(back["score_shift"], params["score_shift"])
    query.write_zarr(tmp_path / "q.zarr")
    back = ad.read_zarr(tmp_path / "q.zarr").uns["cell_type"]["confidence_params"]
    np.testing.assert_allclose(back["reference_negative_median"], params["reference_negative_median"])


def test_evaluation_works_on_a_table_read_back_from_zarr(shifted, tmp_path):
    """String arrays in uns come back from zarr as numpy's StringDType, which ``.astype(str)`` cannot cast."""
    model, query = shifted
    query.write_zarr(tmp_path / "q.zarr")
    back = ad.read_zarr(tmp_path / "q.zarr")
    expected = scx.tl.evaluate_confidence(query, "label", methods=["calibrated", "raw"], calibration=model)
    got = scx.tl.evaluate_confidence(back, "label", methods=["calibrated", "raw"], calibration=model)
    pd.testing.assert_frame_equal(got, expected, atol=1e-6)
    classes = back.uns["cell_type"]["classes"]
    table = scx.tl.compare_confidence_methods(
        back.obsm["cell_type_decision_scores"], classes, back.obs["label"], methods=["raw"]
    )
    assert table.loc["raw", "accuracy"] == pytest.approx(expected.loc["raw", "accuracy"])


def _as_genuine_celltypist(model):
    """The model as a CellTypist model made by CellTypist would import (no spatialcx record: no calibration)."""
    ct = model.to_celltypist()
    del ct.description["spatialcx"]
    return scx.CellTypeModel.from_celltypist(ct)


def test_without_calibration(shifted):
    model, query = shifted
    bare = _as_genuine_celltypist(model)
    bare.normalize_over = "genes"
    q = query.copy()
    scx.tl.predict(q, bare)
    params = q.uns["cell_type"]["confidence_params"]
    assert params["reference_calibration"] is False and "within_slope" in params
    # without the reference, the within-dataset model still sees through the platform shift
    table = scx.tl.evaluate_confidence(q, "label", methods=["calibrated", "raw"])
    assert table.loc["calibrated", "auroc"] > table.loc["raw", "auroc"]
    assert "softmax" not in table.index
    with pytest.raises(ValueError, match="calibration"):
        scx.tl.transform_confidence(q.obsm["cell_type_decision_scores"], "softmax")
    with pytest.raises(ValueError, match="calibration"):
        scx.tl.predict(q, bare, confidence="softmax")


def test_confidence_errors():
    s = np.random.default_rng(8).normal(size=(20, 3))
    with pytest.raises(ValueError, match="Unknown confidence"):
        scx.tl.transform_confidence(s, "nope")
    with pytest.raises(ValueError, match="2 classes"):
        scx.tl.transform_confidence(s[:, :1])
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        scx.tl.transform_confidence(bad)
    with pytest.raises(ValueError, match="3 classes"):
        scx.tl.transform_confidence(s, calibration={"negative_median": [0.0, 0.0], "softmax_temperature": 1.0})
    with pytest.raises(ValueError, match="positive"):
        scx.tl.transform_confidence(s, calibration={"negative_median": [0.0] * 3, "softmax_temperature": -1.0})


def test_tiny_datasets_do_not_fail():
    for n in (1, 2, 3):
        s = np.random.default_rng(n).normal(size=(n, 3))
        for method in CONFIDENCE_METHODS:
            c = scx.tl.transform_confidence(s, method, calibration=CAL3)
            assert c.shape == (n,) and ((c >= 0) & (c <= 1)).all()
    tie = np.zeros((4, 3))
    np.testing.assert_allclose(scx.tl.transform_confidence(tie, "calibrated"), 0.5)


# ---------------------------------------------------------------------------------------------- metrics
def test_confidence_metrics_by_hand():
    truth = ["a", "a", "b", "b", "NA", "c", "c"]
    pred = ["a", "a", "b", "a", "a", "a", "b"]
    conf = [0.9, 0.7, 0.85, 0.75, 0.1, 0.5, 0.95]
    m = scx.tl.confidence_metrics(truth, pred, conf, known_classes=["a", "b"], threshold=0.8)
    # known cells: 4 (NA excluded, c unseen); 3 correct (0.9, 0.7, 0.85), 1 wrong (0.75)
    assert m["n_cells"] == 4 and m["n_unseen"] == 2
    assert m["accuracy"] == pytest.approx(0.75)
    # F1: a: precision 2/3, recall 1 -> 0.8; b: precision 1, recall 1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["auroc"] == pytest.approx(2 / 3)  # 2 of 3 (correct, wrong) pairs ordered
    assert m["correct_kept"] == pytest.approx(2 / 3) and m["wrong_removed"] == 1.0
    assert m["unseen_below"] == pytest.approx(0.5)
    every = scx.tl.confidence_metrics(["a", "b"], ["a", "b"], [0.9, 0.2])
    assert np.isnan(every["auroc"]) and np.isnan(every["wrong_removed"]) and np.isnan(every["unseen_below"])
    with pytest.raises(ValueError, match="one value per cell"):
        scx.tl.confidence_metrics(["a"], ["a", "b"], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scx.tl.confidence_metrics(["a"], ["a"], [1.5])


def test_evaluate_confidence_errors(shifted):
    _, query = shifted
    with pytest.raises(KeyError, match="nope"):
        scx.tl.evaluate_confidence(query, "nope")
    bare = ad.AnnData(np.zeros((3, 2)), obs=pd.DataFrame({"label": ["a", "b", "a"]}, index=["x", "y", "z"]))
    with pytest.raises(KeyError, match="predict"):
        scx.tl.evaluate_confidence(bare, "label")
    q = query.copy()
    del q.obsm["cell_type_decision_scores"]
    with pytest.raises(KeyError, match="decision scores"):
        scx.tl.evaluate_confidence(q, "label", methods=["raw"])
    before = query.obs.copy()
    scx.tl.evaluate_confidence(query, "label", methods=["raw", "zscore"])
    pd.testing.assert_frame_equal(query.obs, before)


@pytest.mark.parametrize("n_classes", [2, 3, 8])
def test_discriminant_posterior_in_blocks_equals_scikit_learn(n_classes, monkeypatch):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from spatialcx.tl import _confidence

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 3000)
    s = rng.normal(0, 1, (3000, n_classes))
    s[np.arange(3000), labels] += 2.5
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(s, labels)
    col = np.searchsorted(lda.classes_, labels)
    expected = lda.predict_proba(s)[np.arange(3000), col]
    monkeypatch.setattr(_confidence, "POSTERIOR_BLOCK", 700)  # blocks of uneven size, the last one short
    np.testing.assert_allclose(_confidence._posterior_of(lda, s, col), expected, rtol=0, atol=1e-12)
