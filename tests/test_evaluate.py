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
