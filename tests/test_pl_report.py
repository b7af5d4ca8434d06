"""QC plots of an annotation: marker_dotplot, deg_heatmap, validation_2d, annotation_report."""

from __future__ import annotations

import logging

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from scipy import sparse
from scipy.stats import spearmanr

import spatialcx as scx
from spatialcx.pl._markers import DOT_MAX_AREA, NO_MARKER_COLOR
from spatialcx.pl._report import REPORT_PLOTS


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def annotated():
    """The demo SpatialData annotated once (about 10 s)."""
    sdata, ref = scx.datasets.demo(n_cells=1500, n_reference_cells=3000)
    scx.tl.annotate(sdata, ref, label_keys="cell_type", plots=False)
    return sdata


@pytest.fixture
def table(annotated) -> ad.AnnData:
    """A copy of the annotated table (tests may change it)."""
    return annotated.tables["table"].copy()


def lognorm(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    """log1p(counts / library size * 1e4) of ``genes``, by hand (X holds the demo's counts)."""
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    x = x.astype(np.float64)
    lib = x.sum(axis=1, keepdims=True)
    return np.log1p(x[:, adata.var_names.get_indexer(genes)] / lib * 1e4)


def counts(adata: ad.AnnData, gene: str) -> np.ndarray:
    x = adata[:, gene].X
    return np.asarray(x.toarray() if sparse.issparse(x) else x).ravel()


def dots(fig):
    (coll,) = [c for c in fig.axes[0].collections if c.get_gid() == "dots"]
    return coll


def dot_at(fig, gene: str, row_label: str) -> tuple[float, float]:
    """(fraction, scaled colour value) of the dot of ``gene`` in the row of ``row_label``."""
    ax = fig.axes[0]
    genes = [t.get_text() for t in ax.get_xticklabels()]
    rows = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
    coll = dots(fig)
    hit = np.flatnonzero(
        (coll.get_offsets()[:, 0] == genes.index(gene)) & (coll.get_offsets()[:, 1] == rows.index(row_label))
    )
    assert hit.size == 1
    return float(coll.get_sizes()[hit[0]] / DOT_MAX_AREA), float(coll.get_array()[hit[0]])


def header_labels(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "group_label"]


def all_text(fig) -> str:
    texts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        texts += [ax.get_title(loc) for loc in ("left", "center", "right")] + [t.get_text() for t in ax.texts]
    return "\n".join(texts)


def canonical_on_panel(adata: ad.AnnData, cell_type: str) -> list[str]:
    """Canonical markers of ``cell_type``'s CL id that are on the panel, in the table's order, by hand."""
    term = adata.obs.loc[adata.obs["cell_type"] == cell_type, "cell_type_ontology_term_id"].astype(str).mode()[0]
    panel = set(adata.var_names)
    return [g for g in scx.tl.load_canonical_markers(key="id")[term] if g in panel]


# --------------------------------------------------------------------------------------------------------------------
# marker_dotplot
# --------------------------------------------------------------------------------------------------------------------


def test_marker_dotplot_structure_on_demo(annotated):
    adata = annotated.tables["table"]
    fig = scx.pl.marker_dotplot(annotated)
    ax = fig.axes[0]
    assert len(fig.axes) == 4  # dots, type header, colourbar, size legend

    expected_rows = [c for c in adata.obs["cell_type"].cat.categories if c != "Unassigned"]
    sizes = adata.obs["cell_type"].value_counts()
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{c} ({sizes[c]:,})" for c in expected_rows]

    without = [c for c in expected_rows if not canonical_on_panel(adata, c)]
    assert without == ["enterocyte"]  # its canonical markers (FABP2, APOA1, ...) are not on the demo colon panel
    # ... so it shows those of its Cell Ontology subtype in the table, colonocyte (CL:1000347)
    panel = set(adata.var_names)
    colonocyte = [g for g in scx.tl.load_canonical_markers(key="id")["CL:1000347"] if g in panel]
    assert colonocyte == ["CA1", "SLC26A3", "CEACAM7", "AQP8"]
    assert "no canonical markers" not in all_text(fig)
    assert header_labels(fig) == expected_rows

    genes = [t.get_text() for t in ax.get_xticklabels()]
    shown = {c: (colonocyte if c == "enterocyte" else canonical_on_panel(adata, c))[:5] for c in expected_rows}
    expected_genes = list(dict.fromkeys(g for c in expected_rows for g in shown[c]))
    assert genes == expected_genes
    assert genes[:2] == ["MS4A1", "CD79A"]
    assert len(dots(fig).get_offsets()) == len(expected_rows) * len(genes)


def test_marker_dotplot_values_match_hand_computation(annotated):
    adata = annotated.tables["table"]
    fig = scx.pl.marker_dotplot(annotated)
    b = (adata.obs["cell_type"] == "B cell").to_numpy()
    frac, _ = dot_at(fig, "MS4A1", "B cell")
    assert frac == pytest.approx(np.mean(counts(adata, "MS4A1")[b] > 0))
    assert frac > 0.5
    frac_t, _ = dot_at(fig, "MS4A1", "CD4-positive, alpha-beta T cell")
    assert frac_t < frac

    # colour: group mean of log1p(10k), scaled per gene over the shown types
    rows = [c for c in adata.obs["cell_type"].cat.categories if c != "Unassigned"]
    expr = lognorm(adata, ["CD68"])[:, 0]
    means = np.array([expr[(adata.obs["cell_type"] == r).to_numpy()].mean() for r in rows])
    scaled = (means - means.min()) / (means.max() - means.min())
    for r, v in zip(rows, scaled, strict=True):
        assert dot_at(fig, "CD68", r)[1] == pytest.approx(v, rel=1e-5, abs=1e-6)
    assert dot_at(fig, "CD68", "macrophage")[1] == pytest.approx(1.0)


def test_marker_dotplot_chunked_and_backed_equal(annotated, tmp_path):
    adata = annotated.tables["table"]
    full = dots(scx.pl.marker_dotplot(adata))
    chunked = dots(scx.pl.marker_dotplot(adata, chunk_size=97))  # 16 blocks
    np.testing.assert_allclose(chunked.get_sizes(), full.get_sizes())
    np.testing.assert_allclose(chunked.get_array(), full.get_array(), rtol=1e-6)

    path = tmp_path / "table.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    on_disk = dots(scx.pl.marker_dotplot(backed, chunk_size=400))
    np.testing.assert_allclose(on_disk.get_sizes(), full.get_sizes())
    np.testing.assert_allclose(on_disk.get_array(), full.get_array(), rtol=1e-6)


def test_marker_dotplot_uses_counts_not_x(table):
    """Whatever X holds, expression comes from the raw counts."""
    reference = dots(scx.pl.marker_dotplot(table))
    table.layers["counts"] = table.X.copy()
    table.X = table.X * 0 + sparse.random(*table.shape, density=0.3, format="csr", random_state=0) * 7
    moved = dots(scx.pl.marker_dotplot(table))
    np.testing.assert_allclose(moved.get_sizes(), reference.get_sizes())
    np.testing.assert_allclose(moved.get_array(), reference.get_array(), rtol=1e-6)


def test_marker_dotplot_custom_markers(table):
    markers = {"B cell": ["ms4a1", "CD79A", "NOT_A_GENE"], "my type": ["NOPE"], "macrophage": ["CD68"]}
    fig = scx.pl.marker_dotplot(table, markers=markers)
    genes = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert genes == ["MS4A1", "CD79A", "CD68"]  # panel spelling, case-insensitive match, unknown genes left out
    assert header_labels(fig) == ["B cell", "macrophage"]
    assert "no given markers on the panel: my type" in all_text(fig)
    n_rows = len(fig.axes[0].get_yticklabels())
    assert len(dots(fig).get_offsets()) == 3 * n_rows


def test_marker_dotplot_groupby_and_min_cells(table):
    fig = scx.pl.marker_dotplot(table, groupby="true_cell_type", min_cells=1)
    rows = [t.get_text().rsplit(" (", 1)[0] for t in fig.axes[0].get_yticklabels()]
    assert rows == [str(c) for c in table.obs["true_cell_type"].astype("category").cat.categories]
    assert fig.axes[0].get_ylabel() == "true_cell_type (cells)"

    sizes = table.obs["cell_type"].value_counts()
    cutoff = int(sizes.drop("Unassigned").min()) + 1
    smallest = sizes.drop("Unassigned").idxmin()
    fig = scx.pl.marker_dotplot(table, min_cells=cutoff)
    rows = [t.get_text().rsplit(" (", 1)[0] for t in fig.axes[0].get_yticklabels()]
    assert smallest not in rows
    assert f"fewer than {cutoff} cells, not shown: {smallest}" in all_text(fig)


def test_marker_dotplot_mouse_panel_lowercase(shared_data):
    """Real STARmap mouse cortex panel with lower-case symbols (aqp4, gad1): markers match case-insensitively."""
    adata = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    to_cl = {
        "Astro": "astrocyte",
        "Oligo": "oligodendrocyte",
        "VIP": "VIP GABAergic interneuron",
        "SST": "sst GABAergic interneuron",
        "Endo": "endothelial cell",
        "eL2/3": "glutamatergic neuron",
        "eL5-2": "glutamatergic neuron",
        "NA": "Unassigned",
    }
    labels = adata.obs["cell_type_author"].astype(str).map(to_cl)
    adata = adata[labels.notna().to_numpy()].copy()
    order = ["astrocyte", "oligodendrocyte", "VIP GABAergic interneuron", "sst GABAergic interneuron"]
    order += ["endothelial cell", "glutamatergic neuron", "Unassigned"]
    adata.obs["cell_type"] = pd.Categorical(labels[labels.notna()], categories=order)
    fig = scx.pl.marker_dotplot(adata)
    genes = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    # endothelial cell: of its own markers only Flt1 is on the panel
    assert genes == ["aqp4", "mog", "vip", "gad1", "gad2", "sst", "flt1", "slc17a7"]
    assert header_labels(fig) == ["astrocyte", "oligodendrocyte", "VIP GABAergic interneuron"] + [
        "sst GABAergic interneuron",
        "endothelial cell",
        "glutamatergic neuron",
    ]
    text = " ".join(all_text(fig).split())
    assert "no canonical markers" not in text
    assert "markers of a related type" not in text
    assert dot_at(fig, "flt1", "endothelial cell")[1] == pytest.approx(1.0)  # endothelial cells express flt1 most
    frac, colour = dot_at(fig, "aqp4", "astrocyte")
    astro = (adata.obs["cell_type"] == "astrocyte").to_numpy()
    assert frac == pytest.approx(np.mean(counts(adata, "aqp4")[astro] > 0))
    assert colour == pytest.approx(1.0)  # astrocytes express aqp4 most


def test_marker_dotplot_synthetic_exact_values():
    """Plain-string labels with missing values and a custom unassigned label; fractions known by construction."""
    n = 20
    x = np.zeros((4 * n, 4), dtype=np.float32)
    x[:, 3] = 10  # a housekeeping gene: every cell has counts
    x[: n * 3 // 4, 0] = 5  # 'alpha': 15 of its 20 cells express A1
    x[n : n + 4, 0] = 1  # 'beta': 4 of 20 express A1 (lower level)
    x[n : 2 * n, 1] = 3  # 'beta': all express B1
    labels = np.array(["alpha"] * n + ["beta"] * n + ["low"] * n + [None] * n, dtype=object)
    adata = ad.AnnData(
        X=sparse.csr_matrix(x),
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(4 * n)]),
        var=pd.DataFrame(index=["A1", "B1", "C1", "HK"]),
        uns={"cell_type": {"unassigned_label": "low"}},
    )
    fig = scx.pl.marker_dotplot(adata, markers={"alpha": ["a1"], "beta": ["B1", "C1"]})
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["alpha (20)", "beta (20)"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["A1", "B1", "C1"]
    assert dot_at(fig, "A1", "alpha") == pytest.approx((0.75, 1.0))
    assert dot_at(fig, "A1", "beta") == pytest.approx((0.2, 0.0))
    assert dot_at(fig, "B1", "beta") == pytest.approx((1.0, 1.0))
    assert dot_at(fig, "C1", "beta") == pytest.approx((0.0, 0.0))  # never expressed: no dot, lowest colour


def test_marker_dotplot_errors(table):
    with pytest.raises(KeyError, match=r"'labels'.*scx\.tl\.annotate"):
        scx.pl.marker_dotplot(table, key="labels")
    with pytest.raises(KeyError, match="'clusters'"):
        scx.pl.marker_dotplot(table, groupby="clusters")
    with pytest.raises(TypeError, match="must be a list of gene names"):
        scx.pl.marker_dotplot(table, markers={"B cell": 3})
    with pytest.raises(TypeError, match="must be a dict"):
        scx.pl.marker_dotplot(table, markers=["MS4A1"])
    with pytest.raises(ValueError, match="no marker gene of the given types is on the panel"):
        scx.pl.marker_dotplot(table, markers={"B cell": ["NOPE"]})
    with pytest.raises(ValueError, match="min_cells=100000"):
        scx.pl.marker_dotplot(table, min_cells=100_000)
    with pytest.raises(ValueError, match="max_genes_per_type"):
        scx.pl.marker_dotplot(table, max_genes_per_type=0)
    renamed = table.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="no marker gene of any of the 11 types is on the panel"):
        scx.pl.marker_dotplot(renamed)


def test_marker_dotplot_save(table, tmp_path):
    path = tmp_path / "sub" / "dots.pdf"
    scx.pl.marker_dotplot(table, save=path)
    assert path.read_bytes()[:5] == b"%PDF-"


# --------------------------------------------------------------------------------------------------------------------
# deg_heatmap
# --------------------------------------------------------------------------------------------------------------------


def test_deg_heatmap_on_demo(annotated):
    adata = annotated.tables["table"]
    before_uns, before_obs = set(adata.uns), list(adata.obs.columns)
    before_x = adata.X.copy()
    fig = scx.pl.deg_heatmap(annotated, n_genes=4)
    assert len(fig.axes) == 3  # heatmap, type header, colourbar
    ax = fig.axes[0]
    types = [c for c in adata.obs["cell_type"].cat.categories if c != "Unassigned"]
    assert [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()] == types
    genes = [t.get_text() for t in ax.get_xticklabels()]
    assert len(genes) == 4 * len(types) and len(set(genes)) == len(genes)
    z = ax.images[0].get_array()
    assert z.shape == (len(types), len(genes))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-9)

    b_genes = genes[4 * types.index("B cell") : 4 * types.index("B cell") + 4]
    assert {"MS4A1", "CD79A"} & set(b_genes)
    assert header_labels(fig) == types
    mac = genes[4 * types.index("macrophage") : 4 * types.index("macrophage") + 4]
    assert set(mac) <= {"CD68", "C1QA", "C1QB", "C1QC", "CD163", "MRC1", "CD14", "LYZ"}
    # each type's own genes are highest in that type
    for i, t in enumerate(types):
        own = genes[4 * i : 4 * i + 4]
        assert (z[i, [genes.index(g) for g in own]] == z[:, [genes.index(g) for g in own]].max(axis=0)).all(), t

    # z-scores of the per-type means, by hand (no group is subsampled at max_cells_per_group=2000)
    expr = lognorm(adata, genes)
    means = np.array([expr[(adata.obs["cell_type"] == t).to_numpy()].mean(axis=0) for t in types])
    np.testing.assert_allclose(z, (means - means.mean(0)) / means.std(0), rtol=1e-4, atol=1e-4)

    # nothing written into the table
    assert set(adata.uns) == before_uns and list(adata.obs.columns) == before_obs
    assert (adata.X != before_x).nnz == 0


def test_deg_heatmap_subsample_is_seeded(table):
    def genes(**kw):
        fig = scx.pl.deg_heatmap(table, n_genes=3, max_cells_per_group=30, **kw)
        assert "subsampled" in fig._suptitle.get_text()
        return [t.get_text() for t in fig.axes[0].get_xticklabels()], fig.axes[0].images[0].get_array()

    g1, z1 = genes(random_state=0)
    g2, z2 = genes(random_state=0)
    g3, z3 = genes(random_state=1)
    assert g1 == g2 and np.array_equal(z1, z2)
    assert g1 != g3 or not np.allclose(z1, z3)


def test_deg_heatmap_errors(table):
    with pytest.raises(ValueError, match="method must be one of"):
        scx.pl.deg_heatmap(table, method="magic")
    with pytest.raises(KeyError, match="scx.tl.annotate"):
        scx.pl.deg_heatmap(table, key="missing")
    one = table[table.obs["cell_type"] == "B cell"].copy()
    with pytest.raises(ValueError, match="at least two types"):
        scx.pl.deg_heatmap(one)


# --------------------------------------------------------------------------------------------------------------------
# validation_2d
# --------------------------------------------------------------------------------------------------------------------


def _panel_stats(ax) -> str:
    (text,) = [t.get_text() for t in ax.texts if t.get_gid() == "stats"]
    return text


def test_validation_2d_on_demo(annotated):
    adata = annotated.tables["table"]
    fig = scx.pl.validation_2d(annotated)
    predicted = adata.obs["cell_type_predicted"].astype(str)
    sizes = predicted.value_counts()
    sizes = sizes[sizes >= 10]
    with_markers = list(sizes.index)  # enterocyte: the markers of its subtype colonocyte (CA1, SLC26A3, ...)
    assert len(fig.axes) == len(with_markers)
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.rsplit(" (", 1)[0] for t in titles] == sorted(with_markers, key=lambda t: (-sizes[t], t))
    assert "no canonical markers" not in fig._suptitle.get_text()
    enterocyte = fig.axes[[t.rsplit(" (", 1)[0] for t in titles].index("enterocyte")]
    assert enterocyte.get_xlabel() == "mean log1p of CA1, SLC26A3, CEACAM7, AQP8"
    assert "enterocyte: colonocyte" in " ".join(fig._suptitle.get_text().split())

    threshold = adata.uns["cell_type"]["confidence_threshold"]
    conf = adata.obs["cell_type_confidence"].to_numpy(dtype=float)
    ax = fig.axes[[t.rsplit(" (", 1)[0] for t in titles].index("B cell")]
    (line,) = [ln for ln in ax.lines if ln.get_gid() == "threshold"]
    assert np.allclose(line.get_ydata(), threshold)

    b = (predicted == "B cell").to_numpy()
    markers = canonical_on_panel(adata, "B cell")
    score = lognorm(adata, markers).mean(axis=1)[b]
    rho = spearmanr(score, conf[b]).statistic
    silent = np.mean((conf[b] >= threshold) & (score <= 0))
    assert _panel_stats(ax) == f"Spearman ρ = {rho:.2f} · confident w/o markers {silent:.1%}"
    (cells,) = [c for c in ax.collections if c.get_gid() == "cells"]
    assert len(cells.get_offsets()) == b.sum()
    np.testing.assert_allclose(np.sort(cells.get_offsets()[:, 0]), np.sort(score), rtol=1e-5, atol=1e-6)
    assert ax.get_xlabel() == "mean log1p of " + ", ".join(markers)


def test_validation_2d_flags_confident_cells_without_markers(table):
    """With a wrong marker (a T-cell gene for B cells), confident B cells lack marker counts: the red corner."""
    fig = scx.pl.validation_2d(
        table, markers={"B cell": ["CD3E"], "macrophage": ["CD68"]}, threshold=0.5, max_points_per_type=50
    )
    assert [ax.get_title().rsplit(" (", 1)[0] for ax in fig.axes] == ["B cell", "macrophage"]
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.lines if ln.get_gid() == "threshold"]
    assert np.allclose(line.get_ydata(), 0.5)
    b = (table.obs["cell_type_predicted"] == "B cell").to_numpy()
    conf = table.obs["cell_type_confidence"].to_numpy(dtype=float)[b]
    no_cd3e = counts(table, "CD3E")[b] == 0
    silent = np.mean((conf >= 0.5) & no_cd3e)
    assert silent > 0.5
    assert f"confident w/o markers {silent:.1%}" in _panel_stats(ax)
    (cells,) = [c for c in ax.collections if c.get_gid() == "cells"]
    assert len(cells.get_offsets()) == 50  # subsampled drawing
    red = np.all(np.isclose(cells.get_facecolors()[:, :3], to_rgba(NO_MARKER_COLOR)[:3]), axis=1)
    assert 0 < red.sum() < 50
    others = [t for t in table.obs["cell_type_predicted"].astype(str).unique() if t not in ("B cell", "macrophage")]
    suptitle = " ".join(fig._suptitle.get_text().split())
    assert "no given markers on the panel" in suptitle
    assert all(t in suptitle for t in others)


def test_validation_2d_max_types_and_errors(table):
    fig = scx.pl.validation_2d(table, max_types=3)
    assert len(fig.axes) == 3
    assert "smaller types not shown (max_types=3)" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match=r"threshold must be a confidence in \[0, 1\]"):
        scx.pl.validation_2d(table, threshold=1.5)
    with pytest.raises(KeyError, match="'cell_type_conf'"):
        scx.pl.validation_2d(table, confidence_key="cell_type_conf")
    with pytest.raises(ValueError, match="none of the .* predicted types has a marker gene on the panel"):
        scx.pl.validation_2d(table, markers={"unrelated": ["CD68"]})
    no_conf = table.copy()
    del no_conf.obs["cell_type_confidence"]
    with pytest.raises(KeyError, match="scx.tl.annotate"):
        scx.pl.validation_2d(no_conf)


# --------------------------------------------------------------------------------------------------------------------
# annotation_report
# --------------------------------------------------------------------------------------------------------------------


def test_annotation_report_writes_every_plot(annotated, tmp_path):
    out = tmp_path / "qc"
    report = scx.pl.annotation_report(annotated, plots_dir=out, formats=("png", "pdf"))
    assert list(report) == list(REPORT_PLOTS)
    for name, entry in report.items():
        assert entry["error"] is None, (name, entry["error"])
        assert [p.name for p in entry["paths"]] == [f"{name}.png", f"{name}.pdf"]
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert entry["figure"] is not None
    assert plt.get_fignums() == []  # closed unless show=True
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{f}" for n in REPORT_PLOTS for f in ("png", "pdf"))
    # the ontology mapping was rebuilt from uns: one row per class
    n_classes = len(annotated.tables["table"].uns["cell_type"]["classes"])
    assert len(report["ontology_mapping"]["figure"].axes[0].get_yticklabels()) == n_classes


def test_annotation_report_reports_failures_without_raising(table, caplog):
    table.var_names = [f"gene{i}" for i in range(table.n_vars)]  # no canonical marker is on this panel
    del table.uns["cell_type"]["ontology_mapping"]
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        report = scx.pl.annotation_report(table, show=True)
    assert report["confidence"]["error"] is None  # centroids in obsm["spatial"]
    assert report["deg_heatmap"]["error"] is None
    for name in ("ontology_mapping", "marker_dotplot", "validation_2d"):
        assert report[name]["figure"] is None
        assert report[name]["paths"] == []
        assert name in caplog.text
    assert "no ontology mapping" in report["ontology_mapping"]["error"].lower()
    assert "is on the panel" in report["marker_dotplot"]["error"]
    assert "marker gene on the panel" in report["validation_2d"]["error"]
    assert len(plt.get_fignums()) == 2  # show=True keeps the drawn figures open


def test_annotation_report_removes_the_files_of_a_plot_it_could_not_draw_again(table, tmp_path, caplog):
    """A plot drawn by an earlier report and failing now must not leave its old file looking current."""
    out = tmp_path / "qc"
    first = scx.pl.annotation_report(table, plots_dir=out, formats=("png", "pdf"))
    assert first["ontology_mapping"]["error"] is None and (out / "ontology_mapping.pdf").is_file()
    del table.uns["cell_type"]["ontology_mapping"]
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        again = scx.pl.annotation_report(table, plots_dir=out, formats=("png", "pdf"))
    assert again["ontology_mapping"]["error"] is not None
    assert not (out / "ontology_mapping.png").exists() and not (out / "ontology_mapping.pdf").exists()
    assert "drawn by an earlier report" in caplog.text
    assert (out / "confidence.png").is_file() and again["confidence"]["error"] is None  # the others are kept


def test_annotation_report_invalid_arguments_raise_first(table, tmp_path):
    out = tmp_path / "qc"
    with pytest.raises(KeyError, match="'labels'"):
        scx.pl.annotation_report(table, key="labels", plots_dir=out)
    with pytest.raises(ValueError, match="formats must name figure formats"):
        scx.pl.annotation_report(table, plots_dir=out, formats=("png", "docx"))
    with pytest.raises(ValueError, match=r"threshold must be a confidence in \[0, 1\]"):
        scx.pl.annotation_report(table, plots_dir=out, threshold=-0.1)
    for dpi in (0, -72, float("nan"), True, "150"):  # refused once, before any plot is drawn
        with pytest.raises(ValueError, match="annotation_report: dpi must be a positive number"):
            scx.pl.annotation_report(table, plots_dir=out, dpi=dpi)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        scx.pl.annotation_report(table, plots_dir=tmp_path / "file")
    assert not out.exists() and plt.get_fignums() == []


def test_annotation_report_mapping_argument(table):
    mapping = scx.tl.map_labels(["B cell", "T cell", "weird blob"])
    report = scx.pl.annotation_report(table, mapping=mapping, show=True)
    fig = report["ontology_mapping"]["figure"]
    assert len(fig.axes[0].get_yticklabels()) == 3


def test_annotation_report_uses_mapping_of_add_ontology_ids():
    """predict -> filter_low_confidence -> add_ontology_ids keeps the mapping in uns['cell_type_ontology']."""
    sdata, ref = scx.datasets.demo(n_cells=600, n_reference_cells=1500)
    scx.tl.predict(sdata, scx.tl.train(ref, "cell_type", genes=sdata))
    scx.tl.filter_low_confidence(sdata)
    mapping = scx.tl.add_ontology_ids(sdata, "cell_type_predicted")
    adata = sdata.tables["table"]
    assert "ontology_mapping" not in adata.uns["cell_type"]
    report = scx.pl.annotation_report(sdata, show=False)
    assert report["ontology_mapping"]["error"] is None
    fig = report["ontology_mapping"]["figure"]
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.get_yticklabels()) == sorted(mapping.table["input_label"])
    # the min_score recorded in the summary is drawn as the dashed line
    assert [ln.get_xdata()[0] for ln in ax.lines] == [adata.uns["cell_type_ontology"]["min_score"]]


def test_annotation_report_mapping_from_h5ad_round_trip(table, tmp_path):
    del table.uns["cell_type"]["ontology_mapping"]
    scx.tl.add_ontology_ids(table, "cell_type_predicted")
    table.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    report = scx.pl.annotation_report(back, show=False)
    assert report["ontology_mapping"]["error"] is None
    labels = [t.get_text() for t in report["ontology_mapping"]["figure"].axes[0].get_yticklabels()]
    assert sorted(labels) == sorted(table.obs["cell_type_predicted"].astype(str).unique())


def test_annotation_report_no_mapping_names_both_places(table):
    del table.uns["cell_type"]["ontology_mapping"]
    report = scx.pl.annotation_report(table, show=False)
    error = report["ontology_mapping"]["error"]
    assert "uns['cell_type']['ontology_mapping']" in error
    assert "uns['cell_type_ontology']['mapping']" in error
    assert "scx.tl.add_ontology_ids" in error


def test_annotation_report_shows_figures_when_nothing_is_saved(table, tmp_path):
    """show=None (default): figures stay open (displayed by matplotlib) without plots_dir, closed when saved."""
    report = scx.pl.annotation_report(table)
    drawn = [r["figure"] for r in report.values() if r["figure"] is not None]
    assert len(drawn) == len(REPORT_PLOTS)
    assert sorted(plt.get_fignums()) == sorted(f.number for f in drawn)
    assert all(r["paths"] == [] for r in report.values())
    plt.close("all")

    scx.pl.annotation_report(table, plots_dir=tmp_path / "qc")
    assert plt.get_fignums() == []
    assert len(list((tmp_path / "qc").glob("*.png"))) == len(REPORT_PLOTS)

    # explicit values keep their meaning
    report = scx.pl.annotation_report(table, show=False)
    assert plt.get_fignums() == [] and all(r["figure"] is not None for r in report.values())
    scx.pl.annotation_report(table, plots_dir=tmp_path / "qc2", show=True)
    assert len(plt.get_fignums()) == len(REPORT_PLOTS)
    plt.close("all")

    with pytest.raises(TypeError, match="show must be True, False or None"):
        scx.pl.annotation_report(table, show="yes")
    assert plt.get_fignums() == []


def test_annotation_report_docstring_has_no_private_link():
    doc = scx.pl.annotation_report.__doc__
    assert "REPORT_PLOTS" not in doc
    assert all(f"``{name}``" in doc for name in REPORT_PLOTS)


def test_validation_2d_title_says_when_classes_are_shown_by_cl_names(table):
    fig = scx.pl.validation_2d(table, max_types=2)
    assert "shown by Cell Ontology name" not in fig._suptitle.get_text()  # the demo's classes are CL names

    # classes with their own names (as in a reference), shown by CL names through uns["cell_type"]["names"]
    alias = {"B cell": "B cells", "fibroblast": "Fibroblasts", "goblet cell": "Goblet"}
    params = table.uns["cell_type"]
    params["names"] = list(params["classes"])
    params["classes"] = [alias.get(c, c) for c in params["classes"]]
    predicted = table.obs["cell_type_predicted"]
    table.obs["cell_type_predicted"] = predicted.cat.rename_categories(lambda c: alias.get(c, c))
    fig = scx.pl.validation_2d(table, max_types=2)
    title = " ".join(fig._suptitle.get_text().split())
    assert "per predicted type (obs['cell_type_predicted'], shown by Cell Ontology name)" in title
    sizes = predicted.astype(str).value_counts()
    largest = sorted(sizes.index, key=lambda t: (-sizes[t], t))[:2]
    assert [ax.get_title().rsplit(" (", 1)[0] for ax in fig.axes] == largest  # panels by CL name


def test_annotation_report_on_a_table_without_coordinates(table, tmp_path, caplog):
    """The confidence plot is still drawn (the strips per type) when the cells have no coordinates."""
    del table.obsm["spatial"]
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        report = scx.pl.annotation_report(table, plots_dir=tmp_path)
    entry = report["confidence"]
    assert entry["error"] is None and entry["paths"] == [tmp_path / "confidence.png"]
    assert len(entry["figure"].axes) == 1 and entry["figure"].axes[0].get_ylabel() == "cell_type_confidence"
    assert "per cell type only" in caplog.text


def _mapping_of(data):
    from spatialcx.pl._report import _mapping_table

    return _mapping_table(data.tables["table"], "cell_type", None)


#: Each plotting function, called on the annotated demo.
_PLOTS = {
    "confidence": lambda data, **kw: scx.pl.confidence(data, **kw),
    "marker_dotplot": lambda data, **kw: scx.pl.marker_dotplot(data, **kw),
    "deg_heatmap": lambda data, **kw: scx.pl.deg_heatmap(data, **kw),
    "validation_2d": lambda data, **kw: scx.pl.validation_2d(data, **kw),
    "ontology_mapping": lambda data, **kw: scx.pl.ontology_mapping(_mapping_of(data), **kw),
}


@pytest.mark.parametrize("name", list(_PLOTS))
def test_returned_figures_are_closed_in_pyplot_unless_show(annotated, name, tmp_path):
    """A figure returned as a notebook cell's result was shown twice: as the result and by pyplot, which kept it open.

    Closed in pyplot, it is shown once (as the result); it still draws and saves. ``show=True`` keeps it open.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    plot = _PLOTS[name]
    fig = plot(annotated)
    assert plt.get_fignums() == []  # was [1]: left open, so displayed again after the cell
    assert isinstance(fig.canvas, FigureCanvasAgg)  # drawable as before (pyplot leaves a canvas whose draw is a no-op)
    fig.canvas.draw()
    assert np.asarray(fig.canvas.buffer_rgba()).shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000

    saved = plot(annotated, save=tmp_path / "sub" / "saved.pdf")
    assert (tmp_path / "sub" / "saved.pdf").is_file() and saved is not fig and plt.get_fignums() == []
    shown = plot(annotated, show=True)
    assert plt.get_fignums() == [shown.number]
    with pytest.raises(TypeError, match=f"{name}: show must be True or False"):
        plot(annotated, show="yes")
    assert plt.get_fignums() == [shown.number]


def test_ontology_mapping_into_given_axes_is_left_open(annotated):
    """With ax=, the figure is the caller's: it is neither closed nor replaced."""
    fig, ax = plt.subplots()
    assert scx.pl.ontology_mapping(_mapping_of(annotated), ax=ax) is fig
    assert plt.get_fignums() == [fig.number]
