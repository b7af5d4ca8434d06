"""Cell Ontology mapping: index and cache, tiered matching, the truth table of real author labels, add_ontology_ids,
canonical markers and the mapping plot.

``tests/data/ontology_labels.tsv`` holds real author labels from public atlases with the CL id a curator would give
each (``cl_id``, ``unknown`` when no term fits) and other ids that are also correct (``also_accepted``: a coarser
parent, or a more specific term the label's source implies). ``split`` is ``dev`` for the labels the pattern table was
developed on and ``holdout`` for labels collected afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import spatialcx as scx
from spatialcx.ontology import _index as index_module
from spatialcx.ontology import cache_dir, load_index, load_patterns, matcher_for, resolve_index

TRUTH = Path(__file__).parent / "data" / "ontology_labels.tsv"


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    """Keep the ontology cache of these tests in a temporary folder, never in the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPATIALCX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def index():
    return load_index()


@pytest.fixture(scope="module")
def truth() -> pd.DataFrame:
    return pd.read_csv(TRUTH, sep="\t", dtype=str, keep_default_na=False)


def ids(labels, **kwargs) -> dict[str, str]:
    return scx.tl.map_labels(labels, **kwargs).to_dict()


# --------------------------------------------------------------------------------------------------------------------
# the truth table
# --------------------------------------------------------------------------------------------------------------------


def test_truth_table_is_valid(truth, index):
    assert list(truth.columns) == ["label", "cl_id", "cl_name", "also_accepted", "source", "split"]
    assert len(truth) >= 250
    assert truth["label"].str.lower().is_unique
    assert set(truth["split"]) == {"dev", "holdout"}
    for row in truth.itertuples():
        if row.cl_id == "unknown":
            assert row.cl_name == "unknown", row.label
        else:
            assert row.cl_id in index, f"{row.label}: {row.cl_id} is not a current CL term"
            assert index.name(row.cl_id) == row.cl_name, row.label
        for other in filter(None, row.also_accepted.split(";")):
            assert other in index and other != row.cl_id, row.label
    sources = truth["source"].nunique()
    assert sources >= 20
    # every wrong mapping the issue lists is in the table, with the right answer
    expected = {
        "Pancreatic beta cell": "CL:0000169",
        "delta cell": "CL:0000173",
        "alpha cell": "CL:0000171",
        "lung": "unknown",
        "Dendritic": "CL:0000451",
        "CD4+ T cells": "CL:0000624",
        "Macrophages": "CL:0000235",
        "cDC2": "CL:0002399",
        "Club (nasal)": "CL:0000158",
        "conventional dendritic cell": "CL:0000451",
        "intestinal tuft cell": "CL:0002204",
        "brush cell": "CL:0002204",
        "Cluster 3": "unknown",
        "F-0: PRG4+ CLIC5+ lining": "unknown",
    }
    table = truth.set_index("label")["cl_id"]
    assert {k: table[k] for k in expected} == expected


def _score(truth: pd.DataFrame, mapping: dict[str, str]) -> tuple[float, float, list[str]]:
    assigned = correct = mappable = covered = 0
    wrong = []
    for row in truth.itertuples():
        got = mapping[row.label]
        accepted = {row.cl_id, *filter(None, row.also_accepted.split(";"))}
        mappable += row.cl_id != "unknown"
        if got == "unknown":
            continue
        assigned += 1
        covered += row.cl_id != "unknown"
        if got in accepted:
            correct += 1
        else:
            wrong.append(f"{row.label!r} -> {got} (expected {row.cl_id})")
    return correct / assigned, covered / mappable, wrong


def test_precision_and_coverage_on_real_labels(truth):
    mapping = ids(truth["label"])
    assert all(v == "unknown" or v.startswith("CL:") for v in mapping.values())  # only CL ids come out
    precision, coverage, wrong = _score(truth, mapping)
    assert precision >= 0.98, wrong
    assert coverage >= 0.85
    holdout = truth[truth["split"] == "holdout"]
    precision_h, _, wrong_h = _score(holdout, mapping)
    assert precision_h >= 0.98, wrong_h


def test_issue_mismappings_are_fixed():
    got = ids(["Pancreatic beta cell", "delta cell", "alpha cell", "lung", "Dendritic", "Liver", "beta", "gamma"])
    assert got == {
        "Pancreatic beta cell": "CL:0000169",  # not "transit amplifying cell of colon"
        "delta cell": "CL:0000173",
        "alpha cell": "CL:0000171",  # not "CD4-positive, alpha-beta T cell" nor the retinal alpha cell
        "lung": "unknown",  # not an UBERON id
        "Dendritic": "CL:0000451",  # not a PATO id
        "Liver": "unknown",
        "beta": "CL:0000169",
        "gamma": "CL:0002275",
    }


# --------------------------------------------------------------------------------------------------------------------
# index and cache
# --------------------------------------------------------------------------------------------------------------------


def test_index_holds_every_current_cl_term(index):
    from cellxgene_ontology_guide.supported_versions import CXGSchema

    raw = CXGSchema().ontology("CL")
    current = {k for k, v in raw.items() if k.startswith("CL:") and not v["deprecated"]}
    assert len(index) == len(current) > 3000
    assert set(index.term_ids) == current
    assert index.version.startswith("v20")
    b = index.term("CL:0000236")
    assert b["label"] == "B cell" and "B-lymphocyte" in b["synonyms"]
    assert index.is_ancestor("CL:0000542", "CL:0000236")  # lymphocyte is an ancestor of B cell
    assert not index.is_ancestor("CL:0000236", "CL:0000542")
    assert all(a.startswith("CL:") for a in index.ancestors("CL:0000236"))
    # deprecated terms point to their replacement
    deprecated = [k for k, v in raw.items() if v["deprecated"] and str(v.get("replaced_by", "")) in current]
    assert deprecated
    old = deprecated[0]
    assert old not in index
    assert index.resolve(old) == (
        raw[old]["replaced_by"],
        f"{old} is deprecated, replaced by {raw[old]['replaced_by']}",
    )
    assert index.resolve("CL:9999999")[0] is None


def test_cache_is_written_atomically_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    built = load_index(cache=cache, refresh=True)
    files = list((cache / "ontology").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and built.version in files[0].name
    payload = json.loads(files[0].read_text())
    assert payload["format"] == index_module.INDEX_FORMAT and len(payload["terms"]) >= len(built)

    # a fresh process reads the cache instead of building: building now fails, loading still works
    index_module._MEMORY.clear()
    monkeypatch.setattr(index_module, "build_index", lambda *a, **k: pytest.fail("rebuilt despite the cache"))
    again = load_index(cache=cache)
    assert len(again) == len(built) and again.name("CL:0000084") == "T cell"
    monkeypatch.undo()

    # a damaged cache is rebuilt
    index_module._MEMORY.clear()
    files[0].write_text("{not json")
    rebuilt = load_index(cache=cache)
    assert len(rebuilt) == len(built)
    assert json.loads(files[0].read_text())["version"] == built.version
    assert [p.name for p in (cache / "ontology").iterdir()] == [files[0].name]  # no temporary files left


def test_unwritable_cache_falls_back_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    index_module._MEMORY.clear()
    idx = load_index(cache=blocker / "sub")  # the cache folder cannot be created under a file
    assert len(idx) > 3000
    assert load_index(cache=blocker / "sub") is idx  # kept in memory


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATIALCX_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SPATIALCX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "spatialcx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "spatialcx"


def test_import_is_cheap():
    code = "import sys, spatialcx; print('cellxgene_ontology_guide' in sys.modules, 'spatialcx.ontology._match' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# --------------------------------------------------------------------------------------------------------------------
# tiers, patterns, scores
# --------------------------------------------------------------------------------------------------------------------


def test_tiers_scores_and_notes():
    m = scx.tl.map_labels(
        ["B cell", "Histiocytes", "cDC1", "Mono", "CD4+ T cells", "Alveolar Mph CCL3+ activated", "Lamp5 Lhx6", "xyz"]
    )
    t = m.table.set_index("input_label")
    assert list(m.table.columns) == [
        "input_label",
        "ontology_term_id",
        "ontology_label",
        "tier",
        "score",
        "matched",
        "note",
    ]
    assert (t.loc["B cell", ["ontology_term_id", "tier", "score"]].tolist()) == ["CL:0000236", 1, 1.0]
    assert (t.loc["Histiocytes", ["ontology_term_id", "tier", "score"]].tolist()) == ["CL:0000235", 1, 0.95]
    assert (t.loc["cDC1", ["ontology_term_id", "tier"]].tolist()) == ["CL:0002394", 0]
    assert (t.loc["Mono", ["ontology_term_id", "tier"]].tolist()) == ["CL:0000576", 0]
    assert (t.loc["CD4+ T cells", ["ontology_term_id", "tier", "score"]].tolist()) == ["CL:0000624", 2, 0.85]
    fallback = t.loc["Alveolar Mph CCL3+ activated"]
    assert fallback["ontology_term_id"] == "CL:4033041" and fallback["tier"] == 2
    assert "fell back to parent term" in fallback["note"] and 0.5 < fallback["score"] < 0.85
    assert (t.loc["Lamp5 Lhx6", ["ontology_term_id", "tier"]].tolist()) == ["CL:4042013", 3]
    assert (t.loc["xyz", ["ontology_term_id", "ontology_label", "tier"]].tolist()) == ["unknown", "unknown", -1]
    assert t["ontology_label"]["B cell"] == "B cell"


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("Tregs", "CL:0000815"),
        ("T-regs", "CL:0000815"),
        ("CD4 T", "CL:0000624"),
        ("CD8 T cells", "CL:0000625"),
        ("cDC1", "CL:0002394"),
        ("cDC2", "CL:0002399"),
        ("DC2", "CL:0002399"),  # not CL's historical synonym of plasmacytoid DC
        ("pDC", "CL:0000784"),
        ("NK", "CL:0000623"),
        ("Mono", "CL:0000576"),
        ("Macro", "CL:0000235"),
        ("Fibro", "CL:0000057"),
        ("Endo", "CL:0000115"),
        ("Peri", "CL:0000669"),
        ("SMC", "CL:0000192"),
        ("Mast", "CL:0000097"),
        ("Plasma", "CL:0000786"),
        ("B", "CL:0000236"),
        ("EpiT", "CL:0000066"),
        ("Macrophages", "CL:0000235"),
        ("CD14+ monocytes", "CL:0001054"),
        ("CD8-positive T cells", "CL:0000625"),
        ("γδ T cells", "CL:0000798"),
        ("Naïve B cells", "CL:0000788"),
        ("Haematopoietic stem cells", "CL:0000037"),
        ("L2/3 IT", "CL:4030059"),
        ("Ex_L2/3_IT", "CL:4030059"),  # an excitatory prefix before a cortical-layer type
        ("Exc L5 ET", "CL:4023041"),
        ("Inh_Pvalb", "CL:4023018"),  # an inhibitory prefix before an interneuron subclass
        ("Inh Sst", "CL:4023017"),
        ("Exc", "CL:0000679"),
        ("Inh neurons", "CL:0000617"),
        ("Tip cells", "CL:0000704"),  # endothelial tip cell, not CL's Drosophila "tip cell" (CL:0000423)
        ("Cap cells", "CL:0002144"),  # capillary endothelial cell, not CL's Drosophila "cap cell" (CL:0000676)
        ("CL:0000423", "CL:0000423"),  # the blocked name's term stays reachable by its id
        ("Lymphatic endothelial cells", "CL:0002138"),  # "lymph" never matches "mph"
        ("lymph", "unknown"),
        ("Endometrial stromal cells", "CL:0002255"),  # "endo" only as a whole word
        ("Endocrine cells", "CL:0000163"),
        ("Plasmacytoid dendritic cells", "CL:0000784"),  # "plasma" only as a whole word
        ("Mononuclear phagocytes", "CL:0000113"),
        ("Macrophages_2", "CL:0000235"),
        ("Type 1 helper T cells", "CL:0000545"),
        ("CL:0000236", "CL:0000236"),
        ("CL_0000236", "CL:0000236"),
        ("CL:9999999", "unknown"),
        ("Doublets", "unknown"),
        ("low quality", "unknown"),
        ("", "unknown"),
        # abbreviations of brain atlases, also in the plural
        ("Micro", "CL:0000129"),
        ("Micro/Macro", "CL:0000235"),  # microglia and macrophages: their common term
        ("Micro-PVM", "CL:0000878"),
        ("PVM", "CL:0000881"),
        ("Oligos", "CL:0000128"),
        ("Astros", "CL:0000127"),
        ("Monos", "CL:0000576"),
        ("MSNs", "CL:1001474"),
        ("D1 MSN", "CL:4023026"),  # not the indirect-pathway (D2) neuron
        ("D2 MSN", "CL:4023029"),
        # CD16+ monocytes are non-classical whatever the word order (CL's "CD16+ monocyte" is a CD14+ monocyte)
        ("CD16+ Monocytes", "CL:0002396"),
        ("Mono CD16", "CL:0002396"),
        ("CD14-CD16+ Mono", "CL:0002396"),
        ("CD14+CD16+ monocytes", "CL:0002397"),
        ("Langerhans", "CL:0000453"),
    ],
)
def test_patterns_and_boundaries(label, expected):
    m = matcher_for(resolve_index(None)).match(label)
    assert (m.term_id or "unknown") == expected, m


def test_cl_ids_in_any_common_spelling_are_taken_as_such():
    spellings = ["cl:0000236", "Cl_0000236", "CL0000236", "http://purl.obolibrary.org/obo/CL_0000236", "obo:CL_0000236"]
    t = scx.tl.map_labels([*spellings, "CL:9999999", "CL:0000236 B cells"]).table.set_index("input_label")
    assert t.loc[spellings, "ontology_term_id"].tolist() == ["CL:0000236"] * len(spellings)
    assert (t.loc[spellings, "tier"] == 1).all() and (t.loc[spellings, "note"] == "Cell Ontology id").all()
    assert t.loc["CL:9999999", "ontology_term_id"] == "unknown"
    assert t.loc["CL:0000236 B cells", "note"] != "Cell Ontology id"  # an id inside a longer label is no id


def test_exact_cl_names_win_over_words_that_reject_a_label():
    """'hybrid' marks a doublet-like cluster, but CL has cell types with the word: their exact names are kept."""
    got = ids(
        [
            "D1/D2-hybrid medium spiny neuron",
            "Hybrid osteochondral skeletal cells",
            "epithelial debris of Malassez",  # a CL synonym of "epithelial cell of Malassez"
            "T/B hybrid",
            "Hybrid",
            "Debris",
        ]
    )
    assert got == {
        "D1/D2-hybrid medium spiny neuron": "CL:4030050",
        "Hybrid osteochondral skeletal cells": "CL:0020028",
        "epithelial debris of Malassez": "CL:0002166",
        "T/B hybrid": "unknown",
        "Hybrid": "unknown",
        "Debris": "unknown",
    }


def test_abbreviations_the_ontology_uses_for_other_cells_are_flagged(caplog):
    """'EC' reads as endothelial cell (the pattern table's rule), but CL also names 'type EC enteroendocrine cell'
    (enterochromaffin): the reading is kept and the other one shown, in the note, the match and a warning."""
    matcher = matcher_for(resolve_index(None))
    ec = matcher.match("EC cells")
    assert ec.term_id == "CL:0000115" and "CL:0000577" in ec.alternatives
    assert matcher.match("Th").alternatives  # T helper, or the ontology's TH (tyrosine hydroxylase) neurons
    assert matcher.match("Endo").alternatives == matcher.match("OPC").alternatives == ()  # no other reading in CL
    with caplog.at_level("WARNING", logger="spatialcx"):
        m = scx.tl.map_labels(["EC cells", "Arterial ECs", "Endo", "Astro"])
    t = m.table.set_index("input_label")
    assert t.loc["EC cells", "ontology_term_id"] == "CL:0000115"
    assert t.loc["Arterial ECs", "ontology_term_id"] == "CL:1000413"
    for label in ("EC cells", "Arterial ECs"):
        note = t.loc[label, "note"]
        assert "read 'EC' as 'endothelial cell'" in note and "type EC enteroendocrine cell (CL:0000577)" in note
    assert "Cell Ontology also uses" not in t.loc["Endo", "note"] + t.loc["Astro", "note"]
    assert "2 label(s) use an abbreviation" in caplog.text and "'EC cells' -> CL:0000115" in caplog.text
    assert "index={label: CL id}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spatialcx"):  # the user's own reading wins, and nothing is flagged
        m = scx.tl.map_labels(["EC cells"], index={"EC cells": "CL:0000577"})
    assert m.to_dict() == {"EC cells": "CL:0000577"} and "abbreviation" not in caplog.text


def test_negative_markers_glued_to_the_next_marker_stay_negative():
    normalize = load_patterns().normalizer
    assert normalize("CD4-CD8- T") == "cd4- cd8- t"
    assert normalize("CD14-CD16+ Mono") == "cd14- cd16+ mono"
    assert normalize("Lin-CD34+") == "lin- cd34+"
    assert normalize("HLA-DR+ cells") == "hla dr+ cell"  # a hyphen inside a marker name is not a sign
    got = ids(["CD4-CD8- T", "CD3-CD56+ NK", "CD4+CD8+ T"])
    assert got["CD4-CD8- T"] == "CL:0002489"  # double negative, never "CD4-positive, alpha-beta T cell"
    assert got["CD3-CD56+ NK"] == "CL:0000623"
    assert got["CD4+CD8+ T"] != "CL:0000624"


def test_ambiguous_abbreviations_stay_unknown():
    # LC is Langerhans, luminal or locus coeruleus cells: blocked as a synonym, and so also with "cell" added
    assert ids(["LC", "LC cells", "PC", "Langerhans cells"]) == {
        "LC": "unknown",
        "LC cells": "unknown",
        "PC": "unknown",
        "Langerhans cells": "CL:0000453",
    }


def test_fall_back_ignores_a_term_when_left_over_words_name_another_cell_type():
    # "Th" (tyrosine hydroxylase) reads as "T helper", but Pvalb and Sst name interneurons: not a helper T cell
    t = scx.tl.map_labels(["Pvalb Th Sst", "Sst Th", "Th", "Alveolar Mph CCL3+ activated"]).table.set_index(
        "input_label"
    )
    assert t.loc["Pvalb Th Sst", "ontology_term_id"] == "unknown"
    assert t.loc["Sst Th", "ontology_term_id"] == "unknown"
    assert t.loc["Th", "ontology_term_id"] == "CL:0000912"
    assert t.loc["Alveolar Mph CCL3+ activated", "ontology_term_id"] == "CL:4033041"  # states still fall back


def test_marker_genes_in_cluster_names_cost_little():
    """Allen-style cluster names ("Class Gene"): the gene is a marker, not a word that may change the cell type."""
    labels = ["Astro Aqp4", "Oligo Opalin", "Endo Cldn5", "Microglia Tmem119", "Macrophage Lyve1", "Astro frobnicated"]
    t = scx.tl.map_labels(labels).table.set_index("input_label")
    expected = ["CL:0000127", "CL:0000128", "CL:0000115", "CL:0000129", "CL:0000235"]
    assert t.loc[labels[:5], "ontology_term_id"].tolist() == expected
    assert (t.loc[labels[:5], "score"] > 0.7).all()
    # a word that is neither a gene nor in the ontology still weighs double: below min_score, unknown
    assert t.loc["Astro frobnicated", "ontology_term_id"] == "unknown"


def test_brain_and_marrow_abbreviations():
    t = scx.tl.map_labels(["DG granule cells", "CMP", "DG"]).table.set_index("input_label")
    assert t.loc["DG granule cells", "ontology_term_id"] == "CL:2000089"  # dentate gyrus granule cell
    assert t.loc["CMP", "ontology_term_id"] == "CL:0000049"  # common myeloid progenitor
    assert t.loc["DG", "ontology_term_id"] == "unknown"  # a region, not a cell type


def test_marginal_zone_b_cells_map_to_b_cell():
    # CL has marginal zone B cells of spleen and of lymph node only: a label naming neither is a B cell, not unknown
    t = scx.tl.map_labels(["MZ B cells", "Marginal zone B cells"]).table.set_index("input_label")
    assert t["ontology_term_id"].tolist() == ["CL:0000236", "CL:0000236"]
    assert t.loc["MZ B cells", "score"] == t.loc["Marginal zone B cells", "score"] > 0.5


def test_tissue_structures_are_not_cell_types():
    """A label whose last word names a structure ("follicle", "zone", "vessels") is a place, not the cell its first
    word names: the fall-back to that cell is not taken."""
    labels = [
        "Lymphoid follicle",
        "Lymphoid follicle cells",
        "Erythroid island",
        "T cell zone",
        "B zone",
        "Blood vessels",
    ]
    t = scx.tl.map_labels(labels).table.set_index("input_label")
    assert t.loc[labels, "ontology_term_id"].tolist() == ["unknown"] * len(labels)
    # a last word that only qualifies (a state, an adjective, a cluster number, a taxon) still falls back
    kept = {
        "Basal resting": "CL:0000646",
        "Goblet (nasal)": "CL:0000160",
        "TA.Early": "CL:0009010",
        "Fibroblast II": "CL:0000057",
        "B lymph": "CL:0000236",
        "Lymphatic EC mature": "CL:0002138",
        "Mature stromal cell of ovarian medullas": "CL:0002132",
        "Activated pvalb GABAergic interneuron (Homo sapiens)": "CL:4023018",
    }
    assert ids(list(kept)) == kept


def test_marker_prefix_does_not_turn_a_named_cell_into_a_t_cell():
    # "CD8+" implies a T cell only when the label names no cell; "chief cell of stomach" names one
    got = ids(["CD8+ chief cell of stomach", "CD4+ striated cell of salivary gland", "CD4 Naive"])
    assert got == {
        "CD8+ chief cell of stomach": "unknown",
        "CD4+ striated cell of salivary gland": "unknown",
        "CD4 Naive": "CL:0000895",
    }


def test_similarity_does_not_add_an_organ():
    # "kidney blood vessel cell" holds both words, but so do blood vessel cells of other organs
    assert ids(["Blood vessel cells"]) == {"Blood vessel cells": "unknown"}
    # the one term that holds all the label's words may name its organ
    assert ids(["Foveolar cells"]) == {"Foveolar cells": "CL:0002179"}


def test_interstitial_macrophages_map_to_macrophage():
    # CL's only interstitial macrophage is the lung's: without the organ in the label, the parent term
    t = scx.tl.map_labels(["Interstitial macrophages", "Interstitial Mph", "Lung interstitial macrophages"]).table
    assert t["ontology_term_id"].tolist() == ["CL:0000235", "CL:0000235", "CL:4033043"]
    assert (t["score"] >= 0.9).all()


def test_precursor_prefixes_are_kept(index):
    """A precursor is not the cell it becomes: "Pre-"/"Pro-" are never dropped to fall back to the mature type."""
    got = ids(
        ["Pre-adipocytes", "Pro-erythroblasts", "Pro-monocytes", "Pre-osteoblasts", "Pre-pDC", "Pro-megakaryocytes",
         "Pre-cDC", "Pre-T", "Pro-B", "Pre-B", "Large pre-B"]
    )  # fmt: skip
    assert got == {
        "Pre-adipocytes": "CL:0002334",  # preadipocyte, not adipocyte
        "Pro-erythroblasts": "CL:0000547",  # proerythroblast, not erythroblast
        "Pro-monocytes": "CL:0000559",  # promonocyte, not monocyte
        "Pre-osteoblasts": "CL:0007010",  # preosteoblast, not osteoblast
        "Pre-pDC": "unknown",  # not plasmacytoid dendritic cell
        "Pro-megakaryocytes": "unknown",  # not megakaryocyte
        "Pre-cDC": "unknown",  # not (conventional) dendritic cell
        "Pre-T": "unknown",  # not T cell
        "Pro-B": "CL:0000826",
        "Pre-B": "CL:0000817",
        "Large pre-B": "CL:0000817",
    }
    assert index.name("CL:0002334") == "preadipocyte" and index.name("CL:0000547") == "proerythroblast"


def test_effector_memory_t_cells_are_memory_t_cells(index):
    """CL's effector memory T cells are memory T cells, not "effector T cell" (which is not their ancestor)."""
    got = ids(["Tem", "TEM", "Effector memory T cells", "CD8 TEM", "CD4 TEM", "Tcm", "Effector T"])
    assert got == {
        "Tem": "CL:0000813",
        "TEM": "CL:0000813",
        "Effector memory T cells": "CL:0000813",
        "CD8 TEM": "CL:0000913",
        "CD4 TEM": "CL:0000905",
        "Tcm": "CL:0000813",
        "Effector T": "CL:0000911",
    }
    for specific in ("CL:0000913", "CL:0000905"):
        assert index.is_ancestor("CL:0000813", specific) and not index.is_ancestor("CL:0000911", specific)


def test_collecting_duct_cells_are_kidney_collecting_duct_cells(index):
    # not "duct epithelial cell", which is no ancestor of the kidney collecting duct cell
    got = ids(["Collecting duct cells", "Collecting duct", "Collecting duct principal cells"])
    assert got == dict.fromkeys(got, "CL:1001225")
    assert not index.is_ancestor("CL:0000068", "CL:1001225")


def test_on_and_off_retinal_cells_are_told_apart():
    # "ON" is a word of these names, not a preposition: a label without it is not the ON subtype
    got = ids(["Midget ganglion cells", "Parasol ganglion cells", "ON bipolar cells", "OFF midget ganglion cells"])
    assert got == {
        "Midget ganglion cells": "unknown",  # was "ON midget ganglion cell"
        "Parasol ganglion cells": "unknown",  # was "ON parasol ganglion cell"
        "ON bipolar cells": "CL:0000749",
        "OFF midget ganglion cells": "CL:4033047",
    }


@pytest.mark.parametrize("values", [["0", "1", "2", "0"], [1, 2, 3, 1], [1.0, 2.0, np.nan, 1.0]])
def test_cluster_numbers_as_labels_are_named_in_a_warning(values, caplog):
    adata = AnnData(np.zeros((4, 1)))
    adata.obs["leiden"] = pd.Categorical(values) if isinstance(values[0], str) else values
    with caplog.at_level("WARNING", logger="spatialcx"):
        scx.tl.add_ontology_ids(adata, "leiden")
    assert set(adata.obs["cell_type_ontology_term_id"].dropna()) == {"unknown"}
    assert "labels are numbers" in caplog.text and "annotate_domains" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spatialcx"):
        scx.tl.map_labels(["0", "T cells"])  # one real name among numbers: no warning
    assert "labels are numbers" not in caplog.text


def test_fine_terms_fall_through_to_their_parent():
    m = scx.tl.map_labels(
        ["conventional dendritic cell", "intestinal tuft cell", "brush cell", "intestinal brush cell"]
    )
    t = m.table.set_index("input_label")
    assert t.loc["conventional dendritic cell", "ontology_term_id"] == "CL:0000451"
    assert "coarsened" in t.loc["conventional dendritic cell", "note"]
    assert set(t.loc[["intestinal tuft cell", "brush cell", "intestinal brush cell"], "ontology_term_id"]) == {
        "CL:0002204"
    }
    fine = ids(["conventional dendritic cell", "intestinal tuft cell"], coarsen=False)
    assert fine == {"conventional dendritic cell": "CL:0000990", "intestinal tuft cell": "CL:0019032"}


def test_pattern_table_is_consistent(index):
    patterns = load_patterns()
    matcher = matcher_for(index)
    for alias in patterns.aliases:
        assert alias.term_id in index, alias
        for name in alias.names:
            hits = {e.term_id for e in matcher.exact_index.get(matcher.normalize(name), [])}
            assert hits <= {alias.term_id}, f"alias {name!r} -> {alias.term_id} contradicts the ontology: {hits}"
    for term_id, (parent, _) in patterns.coarsen.items():
        assert term_id in index and index.is_ancestor(parent, term_id)
    for term_id, name in patterns.blocked_synonyms:  # a synonym, or the label of an invertebrate term
        term = index.term(term_id)
        assert name in term["synonyms"] or name == term["label"], (term_id, name)
    assert all(" " not in k for k in patterns.abbreviations)
    # every word the abbreviations expand to and every rewrite output is made of words the ontology knows
    vocabulary = {t for name, _, _ in index.names for t in name.split()}
    for expansion in patterns.abbreviations.values():
        assert set(matcher.normalize(expansion).split()) <= vocabulary | {"immune", "proliferating"}, expansion


def test_joined_labels_map_to_their_common_term():
    got = ids(["NK/T", "Mono/Mac", "Fibroblasts/Endothelial", "HSC/MPP", "B & plasma", "Mast/Tumor"])
    assert got["NK/T"] == "CL:0000542"  # lymphocyte
    assert got["Mono/Mac"] == "CL:0000113"  # mononuclear phagocyte
    assert got["Fibroblasts/Endothelial"] == "unknown"  # nothing specific in common
    assert got["HSC/MPP"] == "CL:0008001"
    assert got["B & plasma"] == "CL:0000945"  # lymphocyte of B lineage
    assert got["Mast/Tumor"] == "unknown"


def test_min_score_and_input_checks():
    m = scx.tl.map_labels(["Peribronchial fibroblasts", "Fibroblasts", None, np.nan, "Fibroblasts"], min_score=0.8)
    t = m.table.set_index("input_label")
    assert list(t.index) == ["Peribronchial fibroblasts", "Fibroblasts"]  # duplicates once, missing skipped
    assert t.loc["Fibroblasts", "ontology_term_id"] == "CL:0000057"
    assert t.loc["Peribronchial fibroblasts", "ontology_term_id"] == "unknown"
    assert "min_score" in t.loc["Peribronchial fibroblasts", "note"]
    assert ids(["Peribronchial fibroblasts"])["Peribronchial fibroblasts"] == "CL:0000057"  # default 0.5
    assert ids(pd.Categorical(["T cells", "B cells", "T cells"])) == {"T cells": "CL:0000084", "B cells": "CL:0000236"}
    with pytest.raises(TypeError, match="wrap a single label"):
        scx.tl.map_labels("T cells")
    with pytest.raises(ValueError, match="one-dimensional"):
        scx.tl.map_labels(np.array([["T cells", "B cells"]]))
    with pytest.raises(TypeError, match="DataFrame"):
        scx.tl.map_labels(pd.DataFrame({"T cells": [1]}))
    with pytest.raises(ValueError, match=r"min_score must be in \[0, 1\]"):
        scx.tl.map_labels(["T cells"], min_score=1.5)


def test_collisions_unmapped_and_save(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="spatialcx"):
        m = scx.tl.map_labels(["CD4 T", "CD4+ T cells", "Cluster 3", "B cells"])
    assert m.collisions == {"CL:0000624": ["CD4 T", "CD4+ T cells"]}
    assert "shared by several distinct labels" in caplog.text
    assert m.unmapped == ["Cluster 3"]
    assert len(m) == 4 and "2 mapped" not in repr(m) and "3 mapped" in repr(m)
    summary = m.summary()
    assert summary["n_mapped"] == 3 and summary["collisions"]["ontology_term_id"] == ["CL:0000624"]
    json.dumps(summary)

    csv = pd.read_csv(m.save(tmp_path / "m.csv"), keep_default_na=False)
    pd.testing.assert_frame_equal(csv, m.table, check_dtype=False)
    tsv = pd.read_csv(m.save(tmp_path / "out" / "m.tsv"), sep="\t", keep_default_na=False)
    assert tsv["ontology_term_id"].tolist() == m.table["ontology_term_id"].tolist()
    js = json.loads(m.save(tmp_path / "m.json").read_text())
    assert js["unmapped"] == ["Cluster 3"] and len(js["table"]) == 4
    with pytest.raises(ValueError, match="suffix"):
        m.save(tmp_path / "m.xlsx")


# --------------------------------------------------------------------------------------------------------------------
# user index
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "tsv", "json", "json_records", "dict", "frame"])
def test_user_index_extends_the_ontology(tmp_path, kind):
    entries = {"F-0: PRG4+ CLIC5+ lining": "CL:0002301", "Cluster 3": "CL:0000057"}
    frame = pd.DataFrame({"label": list(entries), "ontology_term_id": list(entries.values()), "comment": ["a", "b"]})
    if kind in ("csv", "tsv"):
        index = tmp_path / f"mine.{kind}"
        frame.to_csv(index, sep="," if kind == "csv" else "\t", index=False)
    elif kind == "json":
        index = tmp_path / "mine.json"
        index.write_text(json.dumps(entries))
    elif kind == "json_records":
        index = tmp_path / "mine.json"
        index.write_text(frame.drop(columns="comment").to_json(orient="records"))
    elif kind == "dict":
        index = entries
    else:
        index = frame
    m = scx.tl.map_labels(["F-0: PRG4+ CLIC5+ lining", "cluster 3", "T cells"], index=index)
    t = m.table.set_index("input_label")
    assert t.loc["F-0: PRG4+ CLIC5+ lining", "ontology_term_id"] == "CL:0002301"
    assert t.loc["cluster 3", "ontology_term_id"] == "CL:0000057"  # user entries win, even over the reject list
    assert t.loc["cluster 3", "tier"] == 0 and t.loc["cluster 3", "score"] == 1.0
    assert "user index" in t.loc["cluster 3", "note"]
    assert t.loc["T cells", "ontology_term_id"] == "CL:0000084"  # the ontology is still there


def test_user_index_errors(tmp_path, index):
    deprecated = next(k for k in index._terms if index._terms[k]["deprecated"] and index.resolve(k)[0])
    with pytest.raises(ValueError, match="not a Cell Ontology id"):
        scx.tl.map_labels(["x"], index={"x": "UBERON:0002048"})
    with pytest.raises(ValueError, match="deprecated, replaced by"):
        scx.tl.map_labels(["x"], index={"x": deprecated})
    with pytest.raises(ValueError, match="conflicts with"):
        scx.tl.map_labels(["x"], index={"My cells": "CL:0000084", "my_cells": "CL:0000236"})
    bad = tmp_path / "bad.csv"
    bad.write_text("name,id\nx,CL:0000084\n")
    with pytest.raises(ValueError, match="lacks the column"):
        scx.tl.map_labels(["x"], index=bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scx.tl.map_labels(["x"], index=tmp_path / "missing.tsv")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="suffix"):
        scx.tl.map_labels(["x"], index=tmp_path / "x.xlsx")
    with pytest.raises(TypeError, match="index must be"):
        scx.tl.map_labels(["x"], index=42)


# --------------------------------------------------------------------------------------------------------------------
# add_ontology_ids
# --------------------------------------------------------------------------------------------------------------------


def _adata(labels) -> AnnData:
    n = len(labels)
    return AnnData(
        X=np.zeros((n, 3), dtype=np.float32),
        obs=pd.DataFrame({"author": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n)]),
    )


LABELS = ["CD4+ T cells", "CD4+ T cells", "Macrophages", "Cluster 3", None, "CD4 T", "cDC2"]


def test_add_ontology_ids_anndata(tmp_path):
    adata = _adata(LABELS)
    before = adata.obs["author"].copy()
    mapping = scx.tl.add_ontology_ids(adata, "author")
    assert isinstance(mapping, scx.tl.OntologyMapping) and mapping.data is None
    obs = adata.obs
    assert isinstance(obs["cell_type_ontology_term_id"].dtype, pd.CategoricalDtype)
    assert isinstance(obs["cell_type_ontology_label"].dtype, pd.CategoricalDtype)
    assert obs["cell_type_ontology_term_id"].tolist() == [
        "CL:0000624", "CL:0000624", "CL:0000235", "unknown", "unknown", "CL:0000624", "CL:0002399",
    ]  # fmt: skip
    assert obs["cell_type_ontology_label"].tolist()[:4] == [
        "CD4-positive, alpha-beta T cell", "CD4-positive, alpha-beta T cell", "macrophage", "unknown",
    ]  # fmt: skip
    pd.testing.assert_series_equal(obs["author"], before)  # the labels themselves are untouched
    assert mapping.collisions == {"CL:0000624": ["CD4+ T cells", "CD4 T"]}  # reported, not merged
    uns = adata.uns["cell_type_ontology"]
    assert uns["unmapped"] == ["Cluster 3"] and uns["params"]["source_key"] == "author"
    adata.write_h5ad(tmp_path / "a.h5ad")
    from anndata import read_h5ad

    back = read_h5ad(tmp_path / "a.h5ad")
    assert list(back.uns["cell_type_ontology"]["mapping"]["input_label"]) == mapping.table["input_label"].tolist()
    assert back.obs["cell_type_ontology_term_id"].tolist() == obs["cell_type_ontology_term_id"].tolist()


def test_add_ontology_ids_copy_keys_and_skip_if_exists():
    adata = _adata(LABELS)
    mapping = scx.tl.add_ontology_ids(adata, "author", target_key="ct_ontology_term_id", copy=True)
    assert "ct_ontology_term_id" not in adata.obs and not adata.uns
    copy = mapping.data
    assert copy is not adata and {"ct_ontology_term_id", "ct_ontology_label"} <= set(copy.obs)
    assert "ct_ontology" in copy.uns

    # keep existing valid CL ids, named by the ontology (not by the stale or hand-written names there); map the rest
    adata.obs["cell_type_ontology_term_id"] = [
        "CL:0000084",
        "not-an-id",
        "unknown",
        "CL:0000236",
        None,
        "CL:0000084",
        "",
    ]
    adata.obs["cell_type_ontology_label"] = ["my T", "", "", "", None, None, ""]
    scx.tl.add_ontology_ids(adata, "author", skip_if_exists=True)
    assert adata.obs["cell_type_ontology_term_id"].tolist() == [
        "CL:0000084", "CL:0000624", "CL:0000235", "CL:0000236", "unknown", "CL:0000084", "CL:0002399",
    ]  # fmt: skip
    assert adata.obs["cell_type_ontology_label"].tolist()[:4] == [
        "T cell", "CD4-positive, alpha-beta T cell", "macrophage", "B cell",
    ]  # fmt: skip
    assert "my T" not in adata.obs["cell_type_ontology_label"].cat.categories
    assert adata.uns["cell_type_ontology"]["params"]["n_cells_kept"] == 3
    scx.tl.add_ontology_ids(adata, "author")  # without skip_if_exists: everything is mapped again
    assert adata.obs["cell_type_ontology_term_id"].tolist()[0] == "CL:0000624"


def test_add_ontology_ids_errors():
    adata = _adata(LABELS)
    with pytest.raises(KeyError, match="no column 'nope'"):
        scx.tl.add_ontology_ids(adata, "nope")
    with pytest.raises(ValueError, match="three different obs columns"):
        scx.tl.add_ontology_ids(adata, "author", target_key="author")
    with pytest.raises(ValueError, match="min_score"):
        scx.tl.add_ontology_ids(adata, "author", min_score=-1)
    with pytest.raises(TypeError, match="target_key must be a non-empty string, got None"):
        scx.tl.add_ontology_ids(adata, "author", target_key=None)
    with pytest.raises(TypeError, match="label_key must be a non-empty string"):
        scx.tl.add_ontology_ids(adata, "author", label_key=3)
    assert "cell_type_ontology_term_id" not in adata.obs  # nothing half-written


def test_add_ontology_ids_works_per_distinct_value(monkeypatch):
    """Many cells, few labels: the index is asked once per distinct label / old id, never once per cell."""
    from spatialcx.ontology import OntologyIndex

    rng = np.random.default_rng(0)
    labels = np.array(["CD4+ T cells", "Macrophages", "Cluster 3", "cDC2", "Oligos"], dtype=object)
    n = 20_000
    adata = _adata(labels[rng.integers(0, len(labels), n)])
    adata.obs["author"] = adata.obs["author"].cat.add_categories(["never used"])
    old = np.array(["CL:0000084", "unknown", "CL:0000236", "not-an-id"], dtype=object)[rng.integers(0, 4, n)]
    adata.obs["cell_type_ontology_term_id"] = pd.Categorical(old)
    adata.obs["cell_type_ontology_label"] = pd.Categorical(np.where(old == "CL:0000084", "my T", None))
    calls = {"contains": 0, "name": 0}
    contains, name = OntologyIndex.__contains__, OntologyIndex.name

    def counting_contains(self, term_id):
        calls["contains"] += 1
        return contains(self, term_id)

    def counting_name(self, term_id):
        calls["name"] += 1
        return name(self, term_id)

    monkeypatch.setattr(OntologyIndex, "__contains__", counting_contains)
    monkeypatch.setattr(OntologyIndex, "name", counting_name)
    mapping = scx.tl.add_ontology_ids(adata, "author", skip_if_exists=True)
    assert calls["contains"] < 50 and calls["name"] < 50
    assert "never used" not in mapping.table["input_label"].tolist()
    obs = adata.obs
    got = obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    names = obs["cell_type_ontology_label"].astype(str).to_numpy()
    expected = pd.Series(obs["author"].astype(str)).map(mapping.to_dict()).to_numpy()
    kept = np.isin(old, ["CL:0000084", "CL:0000236"])
    assert (got[kept] == old[kept]).all() and (got[~kept] == expected[~kept]).all()
    assert (names[old == "CL:0000084"] == "T cell").all() and (names[old == "CL:0000236"] == "B cell").all()
    assert set(names[~kept]) <= {"CD4-positive, alpha-beta T cell", "macrophage", "unknown", "oligodendrocyte",
                                 "CD1c-positive myeloid dendritic cell"}  # fmt: skip
    assert isinstance(obs["cell_type_ontology_term_id"].dtype, pd.CategoricalDtype)
    assert mapping.table["input_label"].tolist() == list(dict.fromkeys(obs["author"].astype(str)))  # first seen


def test_add_ontology_ids_spatialdata_store(tmp_path):
    from spatialdata import SpatialData, read_zarr
    from spatialdata.models import TableModel

    adata = _adata(LABELS)
    adata.obs["region"] = pd.Categorical(["cells"] * adata.n_obs)
    adata.obs["instance_id"] = np.arange(adata.n_obs)
    table = TableModel.parse(adata, region="cells", region_key="region", instance_key="instance_id")
    sdata = SpatialData(tables={"table": table})
    store = tmp_path / "s.zarr"
    sdata.write(store)
    sdata = read_zarr(store)
    scx.tl.add_ontology_ids(sdata, "author", table_key="table")
    assert sdata.tables["table"].obs["cell_type_ontology_term_id"].tolist()[2] == "CL:0000235"
    back = read_zarr(store)
    assert back.tables["table"].obs["cell_type_ontology_term_id"].tolist() == (
        sdata.tables["table"].obs["cell_type_ontology_term_id"].tolist()
    )
    assert back.tables["table"].uns["cell_type_ontology"]["unmapped"] == ["Cluster 3"]
    assert back.tables["table"].uns["spatialdata_attrs"]["region"] == "cells"  # the link to the shapes is kept


def test_add_ontology_ids_on_real_author_labels(shared_data):
    from anndata import read_h5ad

    adata = read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    mapping = scx.tl.add_ontology_ids(adata, "cell_type_author")
    by_label = mapping.to_dict()
    assert by_label["Astro"] == "CL:0000127"
    assert by_label["Oligo"] == "CL:0000128"
    assert by_label["Endo"] == "CL:0000115"
    assert by_label["Smc"] == "CL:0000192"
    assert by_label["VIP"] == "CL:4023016"
    assert by_label["SST"] == "CL:4023017"
    for label in ("eL2/3", "eL5-2", "eL5-3", "eL6-1", "eL6-2"):  # excitatory neurons of a layer (STARmap's names)
        assert by_label[label] == "CL:0000679"
    for label in ("L5-1", "Lhx6", "NPY", "Reln"):  # kept as they are, with "unknown"
        assert by_label.get(label, "unknown") == "unknown"
    assert "NA" not in by_label or by_label["NA"] == "unknown"
    ids_ = adata.obs["cell_type_ontology_term_id"]
    astro = (adata.obs["cell_type_author"] == "Astro").to_numpy()
    assert (ids_[astro] == "CL:0000127").all() and astro.sum() == 240
    excitatory = adata.obs["cell_type_author"].astype(str).str.startswith("eL").to_numpy()
    assert (ids_[excitatory] == "CL:0000679").all() and excitatory.sum() == 1826


def test_unmappable_classes_keep_their_names():
    """The annotate pipeline maps the model's classes after prediction: unmapped classes keep their own label."""
    from spatialcx.tl._annotate import ontology_names

    final, term_ids, cl_names, mapping = ontology_names(
        ["Cluster 3", "F-0: PRG4+ CLIC5+ lining", "CD4 T", "Macrophages"]
    )
    assert final[:2] == ["Cluster 3", "F-0: PRG4+ CLIC5+ lining"] and term_ids[:2] == ["unknown", "unknown"]
    assert term_ids[2:] == ["CL:0000624", "CL:0000235"]
    assert mapping.unmapped == ["Cluster 3", "F-0: PRG4+ CLIC5+ lining"]


# --------------------------------------------------------------------------------------------------------------------
# canonical markers
# --------------------------------------------------------------------------------------------------------------------


def test_canonical_markers(index):
    by_name = scx.tl.load_canonical_markers()
    by_id = scx.tl.load_canonical_markers(key="id")
    assert len(by_name) == len(by_id) >= 60
    for (name, genes), (tid, genes_again) in zip(by_name.items(), by_id.items(), strict=True):
        assert tid in index and index.name(tid) == name
        assert genes == genes_again and genes and all(g == g.upper() for g in genes)
    assert "CD3E" in by_name["T cell"] and "MS4A1" in by_name["B cell"]
    mouse = scx.tl.load_canonical_markers(species="mouse")
    assert mouse["T cell"][:2] == ["Cd3d", "Cd3e"]
    assert mouse["natural killer cell"][0] == "Nkg7" and "Gnly" not in mouse["natural killer cell"]  # no mouse GNLY
    # every symbol is a gene of the packaged gene tables
    data = Path(scx.__file__).parent / "data" / "genes"
    human = set(pd.read_csv(data / "homo_sapiens.csv.gz")["gene_name"])
    mouse_genes = set(pd.read_csv(data / "mus_musculus.csv.gz")["gene_name"])
    assert {g for genes in by_name.values() for g in genes} <= human
    assert {g for genes in mouse.values() for g in genes} <= mouse_genes


def test_canonical_markers_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        scx.tl.load_canonical_markers(path=tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        scx.tl.load_canonical_markers(path=empty)
    empty.write_text('{"cell_types": []}')
    with pytest.raises(ValueError, match="lists no cell types"):
        scx.tl.load_canonical_markers(path=empty)
    empty.write_text('{"cell_types": [{"ontology_term_id": "CL:0000084", "name": "T cell", "markers": []}]}')
    with pytest.raises(ValueError, match="no marker genes"):
        scx.tl.load_canonical_markers(path=empty)
    with pytest.raises(ValueError, match="species"):
        scx.tl.load_canonical_markers(species="rat")


# --------------------------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------------------------


def test_ontology_mapping_plot(tmp_path):
    import matplotlib.pyplot as plt

    m = scx.tl.map_labels(["CD4+ T cells", "CD4 T", "Macrophages", "Cluster 3", "lung", "cDC2", "Alveolar Mph CCL3+"])
    fig = scx.pl.ontology_mapping(m, save=tmp_path / "plots" / "ontology.png")
    assert (tmp_path / "plots" / "ontology.png").stat().st_size > 1000
    ax, right = fig.axes[0], fig.axes[1]
    inputs = [t.get_text() for t in ax.get_yticklabels()]
    names = [t.get_text() for t in right.get_yticklabels()]
    assert sorted(inputs) == sorted(m.table["input_label"])
    assert names[inputs.index("Cluster 3")] == "unknown"
    assert right.get_yticklabels()[inputs.index("lung")].get_color() == "#C62828"
    assert names[inputs.index("CD4 T")].endswith("(CL:0000624) *")  # shared by two labels
    assert "5 of 7 labels mapped" in ax.get_title()
    plt.close(fig)

    fig = scx.pl.ontology_mapping(m.table, sort="input", max_labels=3, show_ids=False)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 3 and {"Cluster 3", "lung"} <= set(labels)  # unknowns are always shown
    plt.close(fig)
    long = "A very long author label for the cells of cluster 12 in the atlas of the study"
    fig = scx.pl.ontology_mapping(scx.tl.map_labels(["CD56bright NK", long]))
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert long not in shown and any(x.endswith("\u2026") and long.startswith(x[:-1]) for x in shown)
    fig.canvas.draw()
    assert fig.axes[0].get_position().width * fig.get_figwidth() > 3  # the bars keep 3+ inches beside the text
    plt.close(fig)
    with pytest.raises(TypeError, match="OntologyMapping"):
        scx.pl.ontology_mapping(["CD4 T"])
    with pytest.raises(ValueError, match="sort"):
        scx.pl.ontology_mapping(m, sort="random")


def test_benchmark_label_generator_is_deterministic():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from ontology_mapping import distinct_labels
    finally:
        sys.path.pop(0)
    a = distinct_labels(700, seed=0)
    assert len(a) == len(set(a)) == 700 and a == distinct_labels(700, seed=0)
    assert os.environ["SPATIALCX_CACHE_DIR"] != str(Path.home() / ".cache" / "spatialcx")


def test_add_ontology_ids_on_a_lazily_read_table(tmp_path):
    """A table read with anndata.experimental.read_lazy (obs columns are xarray arrays, without pandas' .cat)."""
    from anndata.experimental import read_lazy

    obs = pd.DataFrame(
        {"lab": pd.Categorical(["T cell", "B cell", "T cell", "Astro"]), "lab2": ["T cell", "B cell", "x", "Astro"]},
        index=list("abcd"),
    )
    AnnData(np.ones((4, 2)), obs=obs).write_h5ad(tmp_path / "t.h5ad")
    lazy = read_lazy(tmp_path / "t.h5ad")
    scx.tl.add_ontology_ids(lazy, "lab")  # was: 'DataArray' object has no attribute 'cat'
    assert list(np.asarray(lazy.obs["cell_type_ontology_term_id"])) == ["CL:0000084", "CL:0000236", "CL:0000084",
                                                                         "CL:0000127"]  # fmt: skip
    scx.tl.add_ontology_ids(lazy, "lab2", target_key="x_ontology_term_id")
    scx.tl.add_ontology_ids(lazy, "lab2", target_key="x_ontology_term_id", skip_if_exists=True)
    assert list(np.asarray(lazy.obs["x_ontology_term_id"])) == ["CL:0000084", "CL:0000236", "unknown", "CL:0000127"]
