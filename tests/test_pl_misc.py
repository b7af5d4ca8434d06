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


# --------------------------------------------------------------------------------------------------------------------
# marker_dotplot: combined labels; deg_heatmap: adjusted p-value filter


def typed_counts(seed=0, n_per=150):
    """Counts of three types, each with two marker genes (canonical symbols), plus background genes."""
    rng = np.random.default_rng(seed)
    types = ["B cell", "T cell", "macrophage"]
    genes = ["MS4A1", "CD79A", "CD3E", "CD3D", "CD68", "CD163"] + [f"BG{i}" for i in range(24)]
    labels = np.repeat(types, n_per)
    x = rng.poisson(2.0, (labels.size, len(genes))).astype(np.float32)
    for k, t in enumerate(types):
        x[labels == t, 2 * k : 2 * k + 2] += rng.poisson(15.0, ((labels == t).sum(), 2))
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(labels.size)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))


def _shaded_columns(fig, row):
    from matplotlib.patches import Rectangle

    ax = fig.axes[0]
    cols = []
    for p in ax.patches:
        if isinstance(p, Rectangle) and abs(p.get_y() - (row - 0.5)) < 1e-9:
            cols += list(range(int(round(p.get_x() + 0.5)), int(round(p.get_x() + 0.5 + p.get_width()))))
    return sorted(cols)


def test_marker_dotplot_splits_combined_labels():
    adata = typed_counts()
    domain = adata.obs["cell_type"].astype(str).replace({"B cell": "B cell/T cell", "T cell": "B cell/T cell"})
    adata.obs["domain"] = pd.Categorical(domain)
    fig = scx.pl.marker_dotplot(adata, groupby="domain")
    ax = fig.axes[0]
    genes = [t.get_text() for t in ax.get_xticklabels()]
    # before: "no canonical markers on the panel: B cell/T cell"; now the markers of B cells and of T cells
    assert {"MS4A1", "CD79A", "CD3E", "CD3D"} <= set(genes) and {"CD68", "CD163"} <= set(genes)
    rows = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
    combined = rows.index("B cell/T cell")
    assert [genes[j] for j in _shaded_columns(fig, combined)] == [
        g for g in genes if g in {"MS4A1", "CD79A", "CD3E", "CD3D"}
    ]
    notes = [t.get_text() for a in fig.axes for t in a.texts] + [a.get_title(loc="left") for a in fig.axes]
    assert not any("no canonical markers" in n for n in notes)


def test_marker_dotplot_combined_label_with_given_markers_shades_each_part():
    adata = typed_counts()
    adata.obs["domain"] = pd.Categorical(adata.obs["cell_type"].astype(str).replace({"T cell": "B cell/T cell"}))
    markers = {"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"], "macrophage": ["CD68"]}
    fig = scx.pl.marker_dotplot(adata, groupby="domain", markers=markers)
    ax = fig.axes[0]
    genes = [t.get_text() for t in ax.get_xticklabels()]
    rows = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
    shaded = [genes[j] for j in _shaded_columns(fig, rows.index("B cell/T cell"))]
    assert shaded == ["MS4A1", "CD79A", "CD3E", "CD3D"]


def test_marker_dotplot_splits_combined_labels_at_the_separator_annotate_domains_used():
    adata = typed_counts()
    adata.obs["cluster"] = pd.Categorical(adata.obs["cell_type"].astype(str).replace({"B cell": "BT", "T cell": "BT"}))
    sets = {"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"], "macrophage": ["CD68", "CD163"]}
    scx.tl.score_signatures(adata, sets)
    scx.tl.annotate_domains(adata, "cluster", sep=" + ", key_added="domain", closeness=0.9)
    assert set(adata.obs["domain"]) == {"B cell + T cell", "macrophage"}
    fig = scx.pl.marker_dotplot(adata, groupby="domain")
    ax = fig.axes[0]
    genes = [t.get_text() for t in ax.get_xticklabels()]
    rows = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
    # before: the label was split at "/" only, so "B cell + T cell" had no canonical markers
    shaded = [genes[j] for j in _shaded_columns(fig, rows.index("B cell + T cell"))]
    assert set(shaded) == {"MS4A1", "CD79A", "CD3E", "CD3D"}
    notes = [t.get_text() for a in fig.axes for t in a.texts] + [a.get_title(loc="left") for a in fig.axes]
    assert not any("no canonical markers" in n for n in notes)


def test_marker_dotplot_uses_related_types_when_a_type_has_no_marker_on_the_panel():
    """A broad type gets its subtypes' markers (enterocyte on a colon panel: colonocyte's), a fine type without an
    entry its closest ancestor's (CD14-positive monocyte: monocyte's)."""
    rng = np.random.default_rng(0)
    types = ["enterocyte", "CD14-positive monocyte", "B cell"]
    genes = ["CA1", "SLC26A3", "CD14", "FCN1", "MS4A1", "CD79A"] + [f"BG{i}" for i in range(10)]
    labels = np.repeat(types, 100)
    x = rng.poisson(1.0, (labels.size, len(genes))).astype(np.float32)
    for k, t in enumerate(types):
        x[labels == t, 2 * k : 2 * k + 2] += rng.poisson(12.0, ((labels == t).sum(), 2))
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(labels.size)])
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))
    fig = scx.pl.marker_dotplot(adata)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    rows = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
    # before: "no canonical markers on the panel: CD14-positive monocyte, enterocyte"
    assert [shown[j] for j in _shaded_columns(fig, rows.index("enterocyte"))] == ["CA1", "SLC26A3"]
    assert [shown[j] for j in _shaded_columns(fig, rows.index("CD14-positive monocyte"))] == ["CD14", "FCN1"]
    notes = [t.get_text() for a in fig.axes for t in a.texts] + [a.get_title(loc="left") for a in fig.axes]
    assert not any("no canonical markers" in n for n in notes)


def test_deg_heatmap_shows_only_genes_below_the_adjusted_p_value():
    import scanpy as sc

    adata = typed_counts()
    fig = scx.pl.deg_heatmap(adata, n_genes=5)
    genes = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    # before: 5 genes per type (15), background genes included; each type has two real markers
    assert sorted(genes) == sorted(["MS4A1", "CD79A", "CD3E", "CD3D", "CD68", "CD163"])
    assert fig.axes[0].images[0].get_array().shape == (3, 6)
    # what the filter keeps is exactly what scanpy calls significant and up-regulated
    tmp = adata.copy()
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    sc.tl.rank_genes_groups(tmp, "cell_type", method="wilcoxon")
    df = sc.get.rank_genes_groups_df(tmp, None)
    sig = df[(df.pvals_adj < 0.05) & (df.logfoldchanges > 0) & (df.scores > 0)]
    assert set(sig.names) == set(genes)
    # pval_cutoff=None: the old behaviour, n_genes best-ranked per type
    fig = scx.pl.deg_heatmap(adata, n_genes=5, pval_cutoff=None)
    assert fig.axes[0].images[0].get_array().shape[1] > 6
    with pytest.raises(ValueError, match="pval_cutoff"):
        scx.pl.deg_heatmap(adata, pval_cutoff=0)


def test_deg_heatmap_leaves_out_a_one_cell_type_even_with_min_cells_1():
    adata = typed_counts()
    labels = adata.obs["cell_type"].cat.add_categories(["lonely cell"])
    labels.iloc[0] = "lonely cell"
    adata.obs["cell_type"] = labels
    # before: scanpy's "Could not calculate statistics for groups lonely cell since they only contain one sample"
    fig = scx.pl.deg_heatmap(adata, min_cells=1)
    rows = [t.get_text().rsplit(" (", 1)[0] for t in fig.axes[0].get_yticklabels()]
    assert rows == ["B cell", "T cell", "macrophage"]
    notes = [" ".join(a.get_title(loc="left").split()) for a in fig.axes]
    assert any("lonely cell (1)" in n and "fewer than 2 cells" in n for n in notes), notes


def test_deg_heatmap_of_many_types_does_not_flood_pandas_warnings(tmp_path):
    """30 types: scanpy's rank_genes_groups made pandas warn about frame fragmentation for each of them."""
    import warnings

    rng = np.random.default_rng(0)
    n_types, n_genes = 30, 60
    labels = rng.integers(0, n_types, 1500)
    x = rng.poisson(rng.gamma(1.0, 1.0, (n_types, n_genes))[labels] * 3).astype(np.float32)
    names = [f"a long cell type name, subtype {i}" for i in range(n_types)]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([names[i] for i in labels])}, index=[f"c{i}" for i in range(len(labels))]
    )
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    before = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        fig = scx.pl.deg_heatmap(adata, pval_cutoff=None, save=tmp_path / "deg.png")
    assert (tmp_path / "deg.png").stat().st_size > 0
    assert fig.axes[0].images[0].get_array().shape[0] == n_types
    # nothing written into the user's table
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert not adata.uns and not adata.layers and (adata.X != before.X).sum() == 0


def _inside_figure(fig, artist) -> bool:
    renderer = fig.canvas.get_renderer()
    box, frame = artist.get_window_extent(renderer), fig.bbox
    return box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y0 >= frame.y0 - 1 and box.y1 <= frame.y1 + 1


def test_deg_heatmap_title_fits_a_narrow_figure(tmp_path):
    # 6 genes make a 6-inch figure; the default title (about 11 inches on one line) ran off both sides of it
    fig = scx.pl.deg_heatmap(typed_counts(), save=tmp_path / "deg.png")
    fig.canvas.draw()
    title = fig._suptitle
    assert "Top 5 DE genes per type" in title.get_text() and "\n" in title.get_text()
    assert _inside_figure(fig, title)
    # a title given by the user is kept as it is
    fig = scx.pl.deg_heatmap(typed_counts(), title="my title")
    assert fig._suptitle.get_text() == "my title"


def _mapping_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "input_label": ["B cells", "T cells CD4+", "weird cluster 12"],
            "ontology_term_id": ["CL:0000236", "CL:0000624", "unknown"],
            "ontology_label": ["B cell", "CD4-positive, alpha-beta T cell", "unknown"],
            "tier": [1, 2, -1],
            "score": [1.0, 0.85, 0.0],
        }
    )


@pytest.mark.parametrize("own_axes", [False, True])
def test_ontology_mapping_explains_the_min_score_line(own_axes):
    # the dashed line at min_score had no key: a reader could not tell what it was
    from types import SimpleNamespace

    from matplotlib.lines import Line2D

    mapping = SimpleNamespace(table=_mapping_table(), min_score=0.6)
    ax = plt.subplots()[1] if own_axes else None
    fig = scx.pl.ontology_mapping(mapping, ax=ax)
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(line.get_xdata(), [0.6, 0.6])
    legend = ax.get_legend() if own_axes else fig.legends[0]
    keyed = [h for h in legend.legend_handles if isinstance(h, Line2D) and h.get_linestyle() == "--"]
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(keyed) == 1 and any("min_score 0.6" in t for t in texts), texts
    # a mapping without min_score draws no line and no key for it
    fig = scx.pl.ontology_mapping(_mapping_table())
    assert not [ln for ln in fig.axes[0].lines if ln.get_linestyle() == "--"]
    assert not any("min_score" in t.get_text() for t in fig.legends[0].get_texts())


def test_threshold_figure_is_closed_unless_show_and_saved_atomically(classified, tmp_path):
    """Like every scx.pl function: closed in pyplot unless show=True; a bad suffix is refused before writing."""
    fig = scx.pl.threshold(classified, "t", save=tmp_path / "new" / "t.pdf")
    assert (tmp_path / "new" / "t.pdf").is_file() and plt.get_fignums() == []  # was left open
    fig = scx.pl.threshold(classified, "t", show=True)
    assert plt.get_fignums() == [fig.number]
    plt.close("all")
    with pytest.raises(ValueError, match=r"suffix '\.txt' is not a figure format"):
        scx.pl.threshold(classified, "t", save=tmp_path / "t.txt")
    assert not (tmp_path / "t.txt").exists() and plt.get_fignums() == []  # the figure was left open
    with pytest.raises(TypeError, match="threshold: show must be True or False"):
        scx.pl.threshold(classified, "t", show=None)


def test_ontology_mapping_long_labels_differing_at_their_end_stay_distinct():
    # long author labels that differ only at the end were all cut to the same text: the rows could not be told apart
    names = [f"a very long cell type name from a reference atlas, subtype number {i}" for i in range(12)]
    table = pd.DataFrame(
        {
            "input_label": [*names, "B cells"],
            "ontology_term_id": ["unknown"] * 12 + ["CL:0000236"],
            "ontology_label": ["unknown"] * 12 + ["B cell"],
            "tier": [-1] * 12 + [1],
            "score": [0.1] * 12 + [1.0],
        }
    )
    fig = scx.pl.ontology_mapping(table, sort="input")
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(set(shown)) == len(shown) == 13
    assert "B cells" in shown
    for i in range(12):  # each keeps its start and its end
        (row,) = [s for s in shown if s.endswith(f"subtype number {i}")]
        assert row.startswith("a very long") and "\u2026" in row and len(row) <= 40


def test_ontology_mapping_max_labels_bounds_the_rows_when_most_labels_are_unknown():
    # before: "the unknowns are always kept", so 300 unknown cluster names drew 300 rows whatever max_labels said
    n = 300
    table = pd.DataFrame(
        {
            "input_label": [f"{i:03d} L2/3 IT CTX Glut" for i in range(n)] + ["Astrocytes", "Microglia"],
            "ontology_term_id": ["unknown"] * n + ["CL:0000127", "CL:0000129"],
            "ontology_label": ["unknown"] * n + ["astrocyte", "microglial cell"],
            "tier": [-1] * n + [1, 0],
            "score": [0.1] * n + [1.0, 0.9],
        }
    )
    fig = scx.pl.ontology_mapping(table, max_labels=20)
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(shown) == 20 and fig.get_figheight() < 10
    assert shown == [f"{i:03d} L2/3 IT CTX Glut" for i in range(20)]  # unknowns first, in the table's order
    assert fig.axes[0].get_title() == "Cell Ontology mapping: 2 of 302 labels mapped, 300 unknown (showing 20)"
    # room left: the unknowns, then the mapped labels in the sort order, which is kept
    table = table.iloc[[*range(5), n, n + 1]]
    fig = scx.pl.ontology_mapping(table, max_labels=6, sort="input")
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert shown == [f"{i:03d} L2/3 IT CTX Glut" for i in range(5)] + ["Astrocytes"]


# --------------------------------------------------------------------------------------------------------------------
# Red edges of low-confidence cells too small to be outlined
# --------------------------------------------------------------------------------------------------------------------


def _circles_sdata(n: int = 400, radius: float = 0.4):
    """Circles on a 20 x 20 grid, so small on the map (about 2 points across) that an edge would cover their colour."""
    import geopandas as gpd
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0)), -1).reshape(-1, 2)[:n] * 5
    shapes = ShapesModel.parse(gpd.GeoDataFrame({"radius": np.full(n, radius)}, geometry=gpd.points_from_xy(*xy.T)))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["B cell", "T cell"], n)),
            "cell_type_confidence": rng.uniform(0, 1, n),
            "region": pd.Categorical(["cells"] * n),
            "cell_id": np.arange(n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    table = TableModel.parse(
        ad.AnnData(np.zeros((n, 1), np.float32), obs=obs), region="cells", region_key="region", instance_key="cell_id"
    )
    return SpatialData(shapes={"cells": shapes}, tables={"table": table})


def test_small_circles_below_the_threshold_keep_their_colour():
    # Circles 1.5-2.5 points across got a red edge of a fifth of their diameter: crowded, they came out red all over.
    # They are drawn as points now, which keep their colour only, like the scatter of centroids.
    from spatialcx.pl import _utils
    from spatialcx.pl._confidence import MIN_OUTLINED_POINTS

    sdata = _circles_sdata(radius=0.3)
    ax = scx.pl.confidence(sdata, threshold=0.5).axes[0]
    low = [c for c in ax.collections if c.get_label().startswith("low-confidence")]
    assert len(low) == 1 and len(low[0].get_offsets()) == int((sdata["table"].obs["cell_type_confidence"] < 0.5).sum())
    np.testing.assert_array_equal(low[0].get_linewidths(), 0.0)
    assert 1.5 < np.sqrt(low[0].get_sizes()).max() < MIN_OUTLINED_POINTS  # drawn as circles, with an edge, before
    assert "under the red mark of the colour bar" in ax.get_title()
    assert _utils.MIN_SHAPE_POINTS == MIN_OUTLINED_POINTS  # shapes drawn as shapes are wide enough to outline


def test_many_tiny_points_get_no_red_ring_as_the_scatter_gets_no_edge(monkeypatch):
    # Above MAX_SCATTER_POINTS, low-confidence points narrower than MIN_OUTLINED_POINTS got a red ring around groups of
    # them, while the same points drawn as a scatter get no edge: both paths now draw no outline.
    from spatialcx.pl import _utils
    from spatialcx.pl._confidence import LOW_COLOR, MIN_OUTLINED_POINTS

    monkeypatch.setattr(_utils, "MAX_SCATTER_POINTS", 50)
    rng = np.random.default_rng(1)
    n = 300
    adata = ad.AnnData(
        np.zeros((n, 1), np.float32),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(rng.choice(["B", "T"], n)), "cell_type_confidence": rng.uniform(0, 1, n)},
            index=[f"c{i}" for i in range(n)],
        ),
        obsm={"spatial": rng.uniform(0, 100, (n, 2))},
    )
    red = np.asarray(to_rgba(LOW_COLOR)[:3], dtype=np.float32)
    for width, ringed in ((MIN_OUTLINED_POINTS * 0.8, False), (MIN_OUTLINED_POINTS * 1.2, True)):
        ax = scx.pl.confidence(adata, threshold=0.5, point_size=width**2).axes[0]
        low = [im for im in ax.get_images() if im.get_label().startswith("low-confidence")]
        assert len(low) == 1
        rgba = np.asarray(low[0].get_array())
        n_red = int(np.all(np.isclose(rgba[..., :3], red), axis=-1)[rgba[..., 3] > 0].sum())
        assert (n_red > 0) == ringed
        # the title says what is drawn (it said "red outline" over the image either way)
        assert ("red outline" in ax.get_title()) == ringed
        assert ("under the red mark of the colour bar" in ax.get_title()) == (not ringed)
        plt.close("all")
