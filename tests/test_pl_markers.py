"""scx.pl.marker_dotplot, deg_heatmap and validation_2d: titles that fit, free-text labels, cluster numbers, the order
of the rows, the unassigned label of annotate_domains, many types."""

from __future__ import annotations

import inspect
import logging
import re

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

import spatialcx as scx


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def counts(types: dict[str, list[str]], n_per: int = 60, seed: int = 0, n_background: int = 20) -> ad.AnnData:
    """Counts of the types ``{label: its marker genes}``, each type high in its own markers, plus background genes."""
    rng = np.random.default_rng(seed)
    genes = list(dict.fromkeys(g for gs in types.values() for g in gs)) + [f"BG{i}" for i in range(n_background)]
    labels = np.repeat(list(types), n_per)
    x = rng.poisson(1.0, (labels.size, len(genes))).astype(np.float32)
    for t, gs in types.items():
        cols = [genes.index(g) for g in gs]
        x[np.ix_(labels == t, cols)] += rng.poisson(12.0, ((labels == t).sum(), len(cols)))
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(labels.size)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))


def rows_and_genes(fig) -> tuple[list[str], list[str]]:
    ax = fig.axes[0]
    rows = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
    return rows, [t.get_text() for t in ax.get_xticklabels()]


def shaded(fig, row: int) -> list[str]:
    """Genes whose cells are shaded (a type's own markers) in ``row``."""
    ax = fig.axes[0]
    genes = rows_and_genes(fig)[1]
    cols = []
    for p in ax.patches:
        if isinstance(p, Rectangle) and abs(p.get_y() - (row - 0.5)) < 1e-9:
            cols += list(range(int(round(p.get_x() + 0.5)), int(round(p.get_x() + 0.5 + p.get_width()))))
    return [genes[j] for j in sorted(cols)]


def notes(fig) -> str:
    texts = [t.get_text() for a in fig.axes for t in a.texts] + [a.get_title(loc="left") for a in fig.axes]
    return " ".join(" ".join(texts).split())


def test_title_is_wrapped_to_fit_the_figure():
    """A long label column made a one-line title wider than the figure, cut off on both sides."""
    adata = counts({"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]})
    adata.obs["leiden_res_1_annotation"] = adata.obs["cell_type"]
    fig = scx.pl.marker_dotplot(adata, groupby="leiden_res_1_annotation")
    fig.canvas.draw()
    title = fig.get_suptitle()
    assert "obs['leiden_res_1_annotation']" in title.replace("\n", " ")
    box = fig._suptitle.get_window_extent()
    width = fig.get_figwidth() * fig.dpi
    assert box.x0 >= 0 and box.x1 <= width, (box.x0, box.x1, width)
    # a given title is wrapped too, and its words are kept
    long = "Canonical marker genes of every annotated spatial domain of the bone marrow section, scored per cluster"
    fig = scx.pl.marker_dotplot(adata, title=long)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.get_figwidth() * fig.dpi
    assert fig.get_suptitle().replace("\n", " ") == long


def test_free_text_labels_are_read_as_cell_ontology_terms(caplog):
    """Author labels ("Astro", "Oligo", "Macrophages") are no CL names: before, the plot said that no marker of any
    type was on the panel, blaming the gene names."""
    adata = counts({"Astro": ["GFAP", "AQP4"], "Oligo": ["MBP", "MOG"], "Macrophages": ["CD68", "CD163"]})
    with caplog.at_level("INFO", logger="spatialcx"):
        fig = scx.pl.marker_dotplot(adata)
    rows, _ = rows_and_genes(fig)
    assert shaded(fig, rows.index("Astro")) == ["GFAP", "AQP4"]
    assert shaded(fig, rows.index("Oligo")) == ["MBP", "MOG"]
    assert shaded(fig, rows.index("Macrophages")) == ["CD68", "CD163"]
    text = notes(fig)
    assert "Astro = astrocyte" in text and "Oligo = oligodendrocyte" in text and "no canonical markers" not in text
    assert "Astro -> astrocyte" in caplog.text
    # the parts of a combined label are read the same way
    adata.obs["domain"] = pd.Categorical(adata.obs["cell_type"].astype(str).replace({"Oligo": "Astro/Oligo"}))
    fig = scx.pl.marker_dotplot(adata, groupby="domain")
    rows, _ = rows_and_genes(fig)
    assert shaded(fig, rows.index("Astro/Oligo")) == ["GFAP", "AQP4", "MBP", "MOG"]


def test_cluster_numbers_get_an_error_that_says_to_name_them():
    """Cluster ids got "no marker gene of any of the 2 types is on the panel ... a panel named by Ensembl ids needs
    symbols", which sends the user after the gene names when the labels are the problem."""
    adata = counts({"0": ["MS4A1", "CD79A"], "1": ["CD3E", "CD3D"]})
    with pytest.raises(
        ValueError, match=r"none of the 2 groups of obs\['cell_type'\] \('0', '1'\) names a cell type"
    ) as e:
        scx.pl.marker_dotplot(adata)
    assert "scx.tl.annotate_domains" in str(e.value) and "Ensembl" not in str(e.value)
    # markers given by the user are still plotted whatever the labels
    fig = scx.pl.marker_dotplot(adata, markers={"0": ["MS4A1"], "1": ["CD3E"]})
    assert rows_and_genes(fig) == (["0", "1"], ["MS4A1", "CD3E"])


def test_the_unassigned_label_of_annotate_domains_is_left_out_and_counted():
    """annotate_domains(unassigned="no signature") labels: the dot plot showed them as a type without markers."""
    adata = counts({"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"], "mixed": []}, n_background=10)
    adata.obs["cluster"] = adata.obs["cell_type"]
    scx.tl.score_signatures(adata, {"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]})
    scx.tl.annotate_domains(adata, "cluster", unassigned="no signature", key_added="domain")
    assert (adata.obs["domain"] == "no signature").sum() == 60
    fig = scx.pl.marker_dotplot(adata, groupby="domain")
    rows, _ = rows_and_genes(fig)
    assert rows == ["B cell", "T cell"]
    assert "60 'Unassigned' / 'no signature' cells not shown" in notes(fig)
    assert "no canonical markers" not in notes(fig) and "without a label" not in notes(fig)
    # cells without a group (NaN) are counted too; unused categories are not rows
    adata.obs["domain"] = adata.obs["domain"].cat.add_categories(["unused"])
    adata.obs.loc[adata.obs_names[:7], "domain"] = np.nan
    fig = scx.pl.marker_dotplot(adata, groupby="domain")
    assert rows_and_genes(fig)[0] == ["B cell", "T cell"]
    assert "7 cells without a label (NaN) not shown" in notes(fig)


def test_marker_sets_may_be_sets_shown_in_alphabetical_order():
    """A set of genes was refused with the advice to wrap the set in a list ("markers={'T cell': [{'CD3D', ...}]}")."""
    adata = counts({"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]})
    fig = scx.pl.marker_dotplot(adata, markers={"T cell": {"CD3E", "CD3D"}, "B cell": frozenset({"MS4A1", "CD79A"})})
    assert rows_and_genes(fig)[1] == ["CD3D", "CD3E", "CD79A", "MS4A1"]
    with pytest.raises(
        TypeError, match=r"^marker_dotplot: markers\['T cell'\] must be a list of gene names.*got int 3\.$"
    ):
        scx.pl.marker_dotplot(adata, markers={"T cell": 3})


MARKER_INPUTS = (
    "dict",
    "yaml",
    "json nested",
    "csv long",
    "csv comma-joined",
    "tsv wide",
    "frame long",
    "frame wide",
    "series",
    "comma strings",
    "blanks and NaN",
)


def marker_inputs(tmp_path) -> dict[str, object]:
    """One marker set pair, B cell (MS4A1, CD79A) and T cell (CD3E, CD3D), in each form a user may have it."""
    import json

    import yaml

    sets = {"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(sets, sort_keys=False))
    (tmp_path / "m.json").write_text(json.dumps({k: {"genes": v, "cl_id": "CL:0"} for k, v in sets.items()}))
    long = pd.DataFrame([(k, g) for k, v in sets.items() for g in v], columns=["cell_type", "gene"])
    long.to_csv(tmp_path / "long.csv", index=False)
    pd.DataFrame({"cell_type": list(sets), "markers": ["MS4A1, CD79A", "CD3E;CD3D"]}).to_csv(
        tmp_path / "joined.csv", index=False
    )
    wide = pd.DataFrame({"B cell": ["MS4A1", "CD79A", np.nan], "T cell": ["CD3E", " CD3D", "CD3E"]})
    wide.to_csv(tmp_path / "wide.tsv", sep="\t", index=False)
    return {
        "dict": sets,
        "yaml": tmp_path / "m.yaml",
        "json nested": str(tmp_path / "m.json"),
        "csv long": tmp_path / "long.csv",
        "csv comma-joined": tmp_path / "joined.csv",
        "tsv wide": tmp_path / "wide.tsv",
        "frame long": long,
        "frame wide": wide,
        "series": pd.Series(sets),
        "comma strings": {"B cell": "MS4A1, CD79A", "T cell": "CD3E,CD3D"},
        "blanks and NaN": {"B cell": [" MS4A1", np.nan, "", "CD79A "], "T cell": ["CD3E", None, "CD3D", "CD3E"]},
    }


@pytest.mark.parametrize("form", MARKER_INPUTS)
def test_plots_read_marker_sets_as_the_signatures_do(tmp_path, form):
    """score_signatures read files, tables, nested dicts and comma-separated strings; the plots refused all of them
    ("markers must be a dict"), and silently lost genes written with a space ("MS4A1 ") or kept NaN as a gene."""
    adata = counts({"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]}, n_per=20, n_background=5)
    adata.obs["cell_type_confidence"] = np.linspace(0.0, 1.0, adata.n_obs)
    markers = marker_inputs(tmp_path)[form]
    scx.tl.score_signatures(adata, markers, key_added="sig")
    u = adata.uns["sig"]
    scored = {k: v.split(",") for k, v in zip(u["names"], u["genes"], strict=True)}
    assert scored == {"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]}
    fig = scx.pl.marker_dotplot(adata, markers=markers)
    assert rows_and_genes(fig)[1] == [g for v in scored.values() for g in v]
    fig = scx.pl.validation_2d(adata, markers=markers)
    xlabels = {ax.get_title().rsplit(" (", 1)[0]: ax.get_xlabel() for ax in fig.axes}
    assert xlabels == {k: "mean log1p of " + ", ".join(v) for k, v in scored.items()}


@pytest.mark.parametrize("fn", ["marker_dotplot", "validation_2d"])
def test_bad_marker_sets_get_the_errors_of_the_signatures_naming_the_plot(tmp_path, fn):
    adata = counts({"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]})
    adata.obs["cell_type_confidence"] = 0.9
    plot = getattr(scx.pl, fn)
    bad = [
        (["MS4A1"], TypeError, "markers must be a dict mapping cell type names to gene lists"),
        ({}, ValueError, "markers is empty"),
        ({1: ["MS4A1"], "1": ["CD3E"]}, ValueError, "Two marker sets are both named '1'"),
        ({"B cell": {"cl_id": "CL:0000236"}}, ValueError, "Marker set 'B cell' is a mapping without a gene list"),
        (tmp_path / "nope.yaml", FileNotFoundError, "is read as the path of a marker file, and there is no such"),
        (pd.DataFrame({"cell_type": ["B cell"]}), ValueError, "A marker table needs a cell type column and a gene"),
    ]
    for markers, error, message in bad:
        with pytest.raises(error, match=rf"^{fn}: .*{re.escape(message)}"):
            plot(adata, markers=markers)
        with pytest.raises(error, match=re.escape(message)):
            scx.tl.score_signatures(adata, markers)
    # the one rule of the plots: a set without genes is a type without markers, not an error
    fig = scx.pl.marker_dotplot(adata, markers={"B cell": ["MS4A1"], "T cell": []})
    assert rows_and_genes(fig)[1] == ["MS4A1"] and "no given markers on the panel: T cell" in notes(fig)
    with pytest.raises(ValueError, match="Marker set 'T cell' has no genes"):
        scx.tl.score_signatures(adata, {"B cell": ["MS4A1"], "T cell": []})


def test_plots_read_a_view_without_changing_it():
    """A plot only reads the table: a view of it (one slide of several, the confident cells) stays a view, not a copy
    of the whole table made into the caller's object."""
    adata = counts({"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]})
    adata.obs["cell_type_confidence"] = np.linspace(0.0, 1.0, adata.n_obs)
    view = adata[adata.obs["cell_type_confidence"] > 0.1]
    markers = {"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E", "CD3D"]}
    fig = scx.pl.marker_dotplot(view, markers=markers)
    assert rows_and_genes(fig)[1] == ["MS4A1", "CD79A", "CD3E", "CD3D"]
    scx.pl.validation_2d(view, markers=markers)
    assert view.is_view and list(view.obs.columns) == ["cell_type", "cell_type_confidence"]


def clusters(sizes: dict[str, int], n_genes: int = 30, seed: int = 0) -> ad.AnnData:
    """Counts of clusters ``{label: n_cells}`` (string labels), each cluster with its own expression profile."""
    rng = np.random.default_rng(seed)
    names = list(sizes)
    which = np.repeat(np.arange(len(names)), list(sizes.values()))
    profiles = rng.gamma(0.5, 1.0, (len(names), n_genes))
    x = rng.poisson(profiles[which] * 4).astype(np.float32)
    obs = pd.DataFrame({"cluster": np.asarray(names, dtype=object)[which]}, index=[f"c{i}" for i in range(which.size)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))


def test_cluster_numbers_are_rows_in_numeric_order():
    """Cluster numbers sorted as text: rows "1", "10", "11", "2", ... in deg_heatmap and marker_dotplot."""
    adata = clusters({str(i): 20 for i in [3, 10, 1, 2, 11]})
    numeric = ["1", "2", "3", "10", "11"]
    markers = {str(i): [f"G{i}"] for i in [1, 2, 3, 10, 11]}
    obs = adata.obs
    columns = {
        "str": obs["cluster"],
        "int": obs["cluster"].astype(int),
        "float with NaN": obs["cluster"].astype(float).where(np.arange(adata.n_obs) % 20 != 0),  # shown as "3"
        "categorical, pandas' text order": obs["cluster"].astype("category"),
        "string dtype": obs["cluster"].astype("string"),
    }
    for what, column in columns.items():
        adata.obs["label"] = column
        assert rows_and_genes(scx.pl.marker_dotplot(adata, key="label", markers=markers))[0] == numeric, what
    adata.obs["label"] = columns["categorical, pandas' text order"]
    assert rows_and_genes(scx.pl.deg_heatmap(adata, key="label", pval_cutoff=None))[0] == numeric
    # an order the user set is kept
    order = ["11", "3", "1", "10", "2"]
    adata.obs["label"] = pd.Categorical(obs["cluster"], categories=order)
    assert rows_and_genes(scx.pl.deg_heatmap(adata, key="label", pval_cutoff=None))[0] == order
    assert rows_and_genes(scx.pl.marker_dotplot(adata, key="label", markers=markers))[0] == order
    # numbers inside names too, and names after numbers
    adata.obs["label"] = obs["cluster"].map(lambda c: f"type {c}" if c != "3" else "B cell")
    markers = {f"type {c}": [f"G{c}"] for c in [1, 2, 10, 11]}
    expected = ["B cell", "type 1", "type 2", "type 10", "type 11"]
    assert rows_and_genes(scx.pl.marker_dotplot(adata, key="label", markers=markers))[0] == expected


def test_validation_2d_panels_of_types_of_equal_size_in_numeric_order():
    adata = clusters({"10": 30, "2": 30, "1": 50})
    adata.obs["cluster_confidence"] = np.linspace(0.0, 1.0, adata.n_obs)
    fig = scx.pl.validation_2d(adata, key="cluster", markers={c: ["G0", "G1"] for c in ["1", "2", "10"]})
    # largest first, then (before: "10" before "2", as text) in the order of the labels
    assert [ax.get_title().rsplit(" (", 1)[0] for ax in fig.axes] == ["1", "2", "10"]


def test_deg_heatmap_max_types_shows_the_largest_types(caplog):
    """Hundreds of clusters drew a heatmap of hundreds of rows (and five times as many columns), slowly."""
    assert inspect.signature(scx.pl.deg_heatmap).parameters["max_types"].default == 60  # references are unaffected
    adata = clusters({"10": 80, "2": 30, "1": 60, "7": 20, "3": 50, "11": 40, "4": 5, "12": 3})
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        fig = scx.pl.deg_heatmap(adata, key="cluster", max_types=4, pval_cutoff=None)
    # the four largest, in the order of the labels
    assert rows_and_genes(fig)[0] == ["1", "3", "10", "11"]
    image = fig.axes[0].images[0].get_array()
    assert image.shape[0] == 4 and image.shape[1] == len(rows_and_genes(fig)[1])
    assert set(header_owners(fig)) <= {"1", "3", "10", "11"}
    text = notes(fig)
    assert "2 smaller types not shown (max_types=4)" in text
    assert "fewer than 10 cells, not tested: 4 (5), 12 (3)" in text
    assert "6 types, more than max_types=4: the 2 smaller ones are not shown: 2 (30), 7 (20)" in caplog.text
    # no note and no warning when every type is shown
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        fig = scx.pl.deg_heatmap(adata, key="cluster", max_types=6, pval_cutoff=None)
    assert len(rows_and_genes(fig)[0]) == 6 and "max_types" not in notes(fig) and not caplog.text
    with pytest.raises(ValueError, match=r"max_types must be an integer of at least 2, got 1"):
        scx.pl.deg_heatmap(adata, key="cluster", max_types=1)


def test_marker_dotplot_max_types_shows_the_largest_groups(caplog):
    """Hundreds of named groups drew a dot plot of hundreds of rows; the largest max_types are shown."""
    assert inspect.signature(scx.pl.marker_dotplot).parameters["max_types"].default == 60
    adata = clusters({"10": 80, "2": 30, "1": 60, "7": 20, "3": 50, "11": 40})
    markers = {name: [f"G{i}"] for i, name in enumerate(["10", "2", "1", "7", "3", "11"])}
    with caplog.at_level(logging.WARNING, logger="spatialcx"):
        fig = scx.pl.marker_dotplot(adata, key="cluster", markers=markers, max_types=4)
    rows, genes = rows_and_genes(fig)
    assert rows == ["1", "3", "10", "11"]  # before: all six rows
    assert genes == ["G0", "G1", "G2", "G3", "G4", "G5"]  # marker sets given are all shown, in their order
    assert "2 smaller groups not shown (max_types=4)" in notes(fig)
    assert "6 types, more than max_types=4: the 2 smaller ones are not shown: 2 (30), 7 (20)" in caplog.text


def header_owners(fig) -> list[str]:
    return [t.get_text() for a in fig.axes for t in a.texts if t.get_gid() == "group_label"]


def test_deg_heatmap_repeated_gene_names_get_a_clear_error():
    """Two genes of one name failed inside pandas: "Reindexing only valid with uniquely valued Index objects"."""
    adata = clusters({"a": 20, "b": 20})
    adata.var_names = ["G0", "G0", *adata.var_names[2:]]
    with pytest.raises(
        ValueError, match=r"^deg_heatmap: the gene names of X repeat \(1, e\.g\. \['G0'\]\).*make_unique"
    ):
        scx.pl.deg_heatmap(adata, key="cluster")


@pytest.mark.parametrize("fn", ["deg_heatmap", "marker_dotplot", "validation_2d"])
def test_a_numeric_column_as_labels_gets_a_short_error(fn):
    """A column of numbers passed as the labels (a group per cell) put every value into the error: megabytes of it at
    a million cells."""
    adata = clusters({"a": 300, "b": 300})
    adata.obs["score"] = np.random.default_rng(0).random(adata.n_obs)
    adata.obs["score_confidence"] = 0.9
    with pytest.raises(ValueError, match=r"score.*\(1\), .* and 580 more\. Lower min_cells") as e:
        getattr(scx.pl, fn)(adata, key="score", markers={"a": ["G0"]}) if fn != "deg_heatmap" else scx.pl.deg_heatmap(
            adata, key="score"
        )
    assert len(str(e.value)) < 1200


def test_validation_2d_type_without_marker_counts_gets_a_plain_axis():
    """A type whose markers have no count in any cell got an x axis from 0 to 0.001, ticks 0.0000 ... 0.0010."""
    adata = clusters({"a": 30, "b": 30})
    adata.X[:, 0] = 0
    adata.obs["cluster_confidence"] = np.tile(np.linspace(0.0, 1.0, 30), 2)  # 6 of each type's 30 cells >= 0.8
    fig = scx.pl.validation_2d(adata, key="cluster", markers={"a": ["G0"], "b": ["G1"]})
    axes = {ax.get_title().rsplit(" (", 1)[0]: ax for ax in fig.axes}
    assert axes["a"].get_xlim() == pytest.approx((-0.04, 1.04))
    assert "confident w/o markers 20.0%" in " ".join(t.get_text() for t in axes["a"].texts)
    xmax = float(np.log1p(adata.X[:, 1] / adata.X.sum(axis=1) * 1e4).max())
    assert axes["b"].get_xlim() == pytest.approx((-0.04 * xmax, 1.04 * xmax))
