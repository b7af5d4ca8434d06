"""confidence_metrics and evaluate_confidence: label sets, excluded labels, and the tables they read."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatialcx as scx

TRUTH = ["a", "a", "b", "b", "NA", "c", "c"]
PRED = ["a", "a", "b", "a", "a", "a", "b"]
CONF = [0.9, 0.7, 0.85, 0.75, 0.1, 0.5, 0.95]


def _same(x: dict, y: dict) -> bool:
    return all((np.isnan(x[k]) and np.isnan(y[k])) or x[k] == pytest.approx(y[k]) for k in x)


def test_known_classes_may_be_any_collection():
    """A set of classes (e.g. set(model.classes)) means the same as a list: not every cell an unseen type."""
    expected = scx.tl.confidence_metrics(TRUTH, PRED, CONF, known_classes=["a", "b"])
    assert expected["n_cells"] == 4 and expected["n_unseen"] == 2
    for classes in ({"a", "b"}, ("b", "a"), np.array(["a", "b"]), pd.Index(["a", "b"]), {"a": 0, "b": 1}.keys()):
        assert _same(scx.tl.confidence_metrics(TRUTH, PRED, CONF, known_classes=classes), expected)


def test_exclude_labels_as_one_string_or_none():
    """exclude_labels="NA" is one label (not the letters N and A); None is the default list, as in a YAML config."""
    truth = ["N", "A", "NA", "b"]
    pred = ["N", "b", "b", "b"]
    conf = [0.9, 0.2, 0.4, 0.9]
    one = scx.tl.confidence_metrics(truth, pred, conf, exclude_labels="NA")
    assert one["n_cells"] == 3 and one["accuracy"] == pytest.approx(2 / 3)
    default = scx.tl.confidence_metrics(truth, pred, conf)
    assert _same(scx.tl.confidence_metrics(truth, pred, conf, exclude_labels=None), default)
    assert default["n_cells"] == 3  # "NA" is in the default list


def test_missing_and_excluded_truth_left_out():
    truth = pd.Series(["a", np.nan, "b", "NA", "Unknown"], dtype="category")
    m = scx.tl.confidence_metrics(truth, ["a", "b", "b", "a", "a"], [0.9, 0.1, 0.5, 0.2, 0.3])
    assert m["n_cells"] == 2 and m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert np.isnan(m["auroc"])  # one class only (every call right): no AUROC
    only_wrong = scx.tl.confidence_metrics(["a", "a"], ["b", "b"], [0.9, 0.1])
    assert only_wrong["accuracy"] == 0.0 and np.isnan(only_wrong["auroc"]) and only_wrong["wrong_removed"] == 0.5
    empty = scx.tl.confidence_metrics([], [], [])
    assert empty["n_cells"] == 0 and np.isnan(empty["accuracy"])


def test_macro_f1_counts_labels_of_truth_or_predictions():
    """A type predicted but absent from the truth counts with F1 0 (scikit-learn's macro average over both sets)."""
    m = scx.tl.confidence_metrics(["a", "a", "b", "b"], ["a", "a", "b", "z"], [0.9] * 4)
    # a: 1; b: precision 1, recall 1/2 -> 2/3; z: 0
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_label_sets_with_nothing_in_common_are_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        m = scx.tl.confidence_metrics(["x", "y"], ["a", "b"], [0.9, 0.2])
    assert m["accuracy"] == 0.0 and "no label in common" in caplog.text and "'x'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        m = scx.tl.confidence_metrics(["x", "y"], ["a", "b"], [0.9, 0.2], known_classes=["a", "b"])
    assert m["n_cells"] == 0 and m["n_unseen"] == 2 and np.isnan(m["accuracy"])
    assert "none of the 2 labelled cells has a true label among the model's 2 classes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        scx.tl.confidence_metrics(TRUTH, PRED, CONF, known_classes=["a", "b"])
    assert caplog.text == ""


def test_nan_confidence_error_says_where():
    with pytest.raises(ValueError, match=r"1 of 3 value\(s\) do not \(the first, at position 1, is nan\)"):
        scx.tl.confidence_metrics(["a", "b", "b"], ["a", "b", "b"], [0.9, np.nan, 0.5])


def _predicted_table() -> ad.AnnData:
    rng = np.random.default_rng(0)
    n = 40
    truth = rng.choice(["a", "b", "NA"], n)
    pred = np.where(rng.random(n) < 0.8, truth, "a")
    pred[pred == "NA"] = "b"
    obs = pd.DataFrame(
        {
            "author": pd.Categorical(truth),
            "cell_type_predicted": pd.Categorical(pred),
            "cell_type_confidence": rng.random(n).astype(np.float32),
            "cell_type_n_genes": np.full(n, 5, dtype=np.int32),
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(np.zeros((n, 2), dtype=np.float32), obs=obs)
    adata.obsm["cell_type_decision_scores"] = rng.normal(size=(n, 2))
    adata.uns["cell_type"] = {"classes": ["a", "b"], "confidence_method": "calibrated"}
    return adata


def test_evaluate_reads_a_lazy_table(tmp_path):
    """A table read with anndata.experimental.read_lazy (obs columns are xarray there) gives the same figures."""
    adata = _predicted_table()
    adata.write_zarr(tmp_path / "t.zarr")
    expected = scx.tl.evaluate_confidence(adata, "author")
    lazy = ad.experimental.read_lazy(tmp_path / "t.zarr")
    pd.testing.assert_frame_equal(scx.tl.evaluate_confidence(lazy, "author"), expected)
    pd.testing.assert_frame_equal(
        scx.tl.evaluate_confidence(lazy, "author", methods=["raw"]),
        scx.tl.evaluate_confidence(adata, "author", methods=["raw"]),
    )


def test_evaluate_leaves_a_view_a_view():
    adata = _predicted_table()
    view = adata[adata.obs["author"] != "NA"]
    table = scx.tl.evaluate_confidence(view, "author")
    assert view.is_view
    assert table.loc["calibrated", "n_cells"] == (adata.obs["author"] != "NA").sum()


def _noisy_calls(n: int, seed: int = 0) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """True labels (with missing and NA cells), predictions (with a type absent from the truth) and confidence."""
    rng = np.random.default_rng(seed)
    types = np.array([f"t{i}" for i in range(8)])
    truth = pd.Series(types[rng.integers(0, 8, n)], dtype=object)
    truth[rng.random(n) < 0.05] = np.nan
    truth[rng.random(n) < 0.05] = "NA"
    right = rng.random(n) < 0.7
    pred = np.where(
        right, truth.fillna("t0").to_numpy(dtype=str), np.append(types, "only_predicted")[rng.integers(0, 9, n)]
    )
    conf = np.clip(np.where(right, 0.7, 0.4) + rng.normal(0, 0.2, n), 0, 1)
    return pd.Series(pd.Categorical(truth)), pred, conf


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    truth, pred, conf = _noisy_calls(3000)
    m = scx.tl.confidence_metrics(truth, pred, conf, threshold=0.5)
    keep = truth.notna().to_numpy() & (truth.astype(str) != "NA").to_numpy()
    y, p, c = truth.astype(str).to_numpy()[keep], pred[keep], conf[keep]
    assert m["n_cells"] == keep.sum()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert m["auroc"] == pytest.approx(roc_auc_score(y == p, c))
    assert m["correct_kept"] == pytest.approx((c[y == p] >= 0.5).mean())
    assert m["wrong_removed"] == pytest.approx((c[y != p] < 0.5).mean())


def test_label_checks_do_not_compare_every_pair_of_cells(monkeypatch):
    """np.isin compares str/object arrays pair by pair (cells x cells): hours for a slide of a million cells."""
    pairwise = []
    isin = np.isin

    def spy(element, test_elements, *args, **kwargs):
        a, b = np.asarray(element), np.asarray(test_elements)
        if a.dtype.kind in "OUT" and a.size * b.size > 1e6:
            pairwise.append((a.size, b.size))
        return isin(element, test_elements, *args, **kwargs)

    monkeypatch.setattr(np, "isin", spy)
    truth, pred, conf = _noisy_calls(5000)
    m = scx.tl.confidence_metrics(truth, pred, conf, known_classes=[f"t{i}" for i in range(8)])
    assert pairwise == [] and m["n_cells"] > 4000


def test_input_shapes_and_threshold_type_are_checked():
    with pytest.raises(
        ValueError, match=r"confidence must hold one value per cell \(a 1-D sequence\), got an array of shape \(2, 2\)"
    ):
        scx.tl.confidence_metrics(["a", "b"], ["a", "b"], [[0.9, 0.1], [0.2, 0.8]])  # decision scores by mistake
    with pytest.raises(ValueError, match=r"truth must hold one value per cell"):
        scx.tl.confidence_metrics("a", "a", 0.5)
    for bad in ("0.8", None):
        with pytest.raises(TypeError, match="threshold must be a number"):
            scx.tl.confidence_metrics(["a"], ["a"], [0.5], threshold=bad)


def test_compare_methods_one_method_as_str_and_softmax_asked_without_calibration():
    scores = np.random.default_rng(1).normal(size=(30, 2))
    truth = np.array(["a", "b"])[scores.argmax(axis=1)]
    one = scx.tl.compare_confidence_methods(scores, ["a", "b"], truth, methods="raw")
    assert one.index.tolist() == ["raw"] and one.loc["raw", "accuracy"] == 1.0
    with pytest.raises(ValueError, match="calibration"):  # was an empty table
        scx.tl.compare_confidence_methods(scores, ["a", "b"], truth, methods=["softmax"])
    assert "softmax" not in scx.tl.compare_confidence_methods(scores, ["a", "b"], truth).index  # default: skipped


def test_cluster_ids_stored_as_floats_match_predictions():
    """Integer truth with a missing value is stored as floats: "3.0" never equalled the prediction "3"."""
    truth = pd.Series([1, 2, None, 3, 1, 2], dtype=float)
    predicted = ["1", "2", "3", "3", "1", "1"]
    got = scx.tl.confidence_metrics(truth, predicted, [0.9, 0.9, 0.9, 0.9, 0.5, 0.4], known_classes=["1", "2", "3"])
    assert got["n_cells"] == 5 and got["accuracy"] == pytest.approx(0.8)  # before: 0.0, every call wrong
    assert got["n_unseen"] == 0
    again = scx.tl.confidence_metrics(truth.to_numpy(), np.array(predicted, dtype=object), [0.9] * 6)
    assert again["accuracy"] == pytest.approx(0.8)
