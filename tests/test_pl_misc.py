"""scx.pl.threshold: the pairwise scatters draw both classes, in a seeded random order."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

import spatialcx as scx
from spatialcx.pl._threshold import _HIGH, _LOW


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def classified() -> ad.AnnData:
    """Two obs features; many cells of both classes have a = 0 (a gene's dropouts), piled on the y axis."""
    rng = np.random.default_rng(0)
    n = 2000
    high = rng.random(n) < 0.4
    a = np.where(rng.random(n) < 0.5, 0.0, rng.gamma(2.0, 1.0, n) + 3 * high)
    b = rng.normal(0.0, 1.0, n) + 4 * high
    obs = pd.DataFrame({"a": a, "b": b}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32), obs=obs)
    scx.tl.classify_by_threshold(adata, ["a", "b"], metagene="mean", key_added="t")
    return adata


def _cells(fig):
    (coll,) = [c for c in fig.axes[1].collections if c.get_gid() == "cells"]
    return coll


def _is_high(coll) -> np.ndarray:
    faces = coll.get_facecolors()
    high = np.all(np.isclose(faces, to_rgba(_HIGH)), axis=1)
    low = np.all(np.isclose(faces, to_rgba(_LOW)), axis=1)
    assert np.all(high ^ low)  # every cell is one of the two colours
    return high


def test_scatter_draws_both_classes_at_their_values(classified):
    coll = _cells(scx.pl.threshold(classified, "t"))
    obs = classified.obs
    drawn = pd.DataFrame(coll.get_offsets(), columns=["a", "b"])
    drawn["high"] = _is_high(coll)
    expected = obs[["a", "b"]].assign(high=obs["t_cluster"].to_numpy() == 1)
    assert len(drawn) == len(expected)
    pd.testing.assert_frame_equal(
        drawn.sort_values(["a", "b"]).reset_index(drop=True),
        expected.sort_values(["a", "b"]).reset_index(drop=True),
        check_dtype=False,
    )
    # both classes sit on the a = 0 line: low cells there are not all drawn first, under the high ones
    on_axis = drawn["a"].to_numpy() == 0
    assert drawn["high"][on_axis].any() and (~drawn["high"][on_axis]).any()


def test_scatter_order_is_seeded_random_not_by_class(classified):
    high = _is_high(_cells(scx.pl.threshold(classified, "t", random_state=0)))
    n = high.size
    # not drawn class after class: each class is spread over the drawing order (within 5 % of its share)
    share = high.mean()
    for part in np.array_split(high, 4):
        assert abs(part.mean() - share) < 0.05
    assert not np.all(np.diff(high.astype(int)) >= 0)
    again = _is_high(_cells(scx.pl.threshold(classified, "t", random_state=0)))
    other = _is_high(_cells(scx.pl.threshold(classified, "t", random_state=1)))
    np.testing.assert_array_equal(high, again)
    assert not np.array_equal(high, other)
    assert high.sum() == other.sum() == (classified.obs["t_cluster"] == 1).sum() and n == classified.n_obs


def test_scatter_subsample_named_and_legend_counts(classified):
    fig = scx.pl.threshold(classified, "t", max_points=500)
    assert len(_cells(fig).get_offsets()) == 500
    assert fig.axes[1].get_title() == f"random 500 of {classified.n_obs:,} cells"
    n_high = int((classified.obs["t_cluster"] == 1).sum())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"low ({classified.n_obs - n_high:,})", f"high ({n_high:,})"]
