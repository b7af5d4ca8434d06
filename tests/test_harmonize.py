from __future__ import annotations

from importlib.resources import files

import numpy as np
import pandas as pd
import pytest

from spatialcx.pp._harmonize import (
    check_overlap,
    detect_species,
    is_ensembl_id,
    load_gene_table,
    looks_like_ensembl,
    match_genes,
    to_symbols,
)


def test_packaged_tables_are_compact_and_correct():
    for species in ("homo_sapiens", "mus_musculus"):
        path = files("spatialcx") / "data" / "genes" / f"{species}.csv.gz"
        assert path.is_file()
        assert len(path.read_bytes()) < 1_000_000
    human, mouse = load_gene_table("homo_sapiens"), load_gene_table("mus_musculus")
    assert len(human) > 40_000 and len(mouse) > 50_000
    assert human["ENSG00000128683"] == "GAD1" and human["ENSG00000075624"] == "ACTB"
    assert mouse["ENSMUSG00000070880"] == "Gad1" and mouse["ENSMUSG00000004366"] == "Sst"
    assert human.index.is_unique and mouse.index.is_unique
    with pytest.raises(ValueError, match="available"):
        load_gene_table("danio_rerio")


def test_ensembl_detection():
    names = ["ENSG00000128683", "ENSG00000075624.17", "ENSMUSG00000070880", "GAD1", "ENSG123"]
    assert is_ensembl_id(names).tolist() == [True, True, True, False, False]
    assert looks_like_ensembl(names) and not looks_like_ensembl(["GAD1", "ACTB", "ENSG00000128683"])
    assert detect_species(["ENSMUSG00000070880", "ENSMUSG00000004366", "ENSG00000128683"]) == "mus_musculus"
    assert detect_species(["GAD1"]) is None


def test_symbols_from_feature_name_win_over_the_table():
    ids = ["ENSG00000128683", "ENSG00000075624", "ENSG00000999999"]
    out = to_symbols(ids, feature_names=["GAD1", "ACTB-custom", np.nan])
    assert out.method == "feature_name"
    assert list(out.symbols) == ["GAD1", "ACTB-custom", "ENSG00000999999"]
    assert out.n_mapped == 2 and out.n_unmapped == 1


def test_symbols_from_the_packaged_tables_with_versions():
    human = to_symbols(["ENSG00000128683.13", "ENSG00000136750", "ENSG00000000000"])
    assert human.method == "gene_table:homo_sapiens"
    assert list(human.symbols) == ["GAD1", "GAD2", "ENSG00000000000"]
    mouse = to_symbols(["ENSMUSG00000070880", "ENSMUSG00000026787"])
    assert mouse.method == "gene_table:mus_musculus" and list(mouse.symbols) == ["Gad1", "Gad2"]


def test_duplicated_symbols_first_in_var_order_wins():
    # ENSG00000254093 and ENSG00000258724 are both PINX1 in GENCODE
    for order in (["ENSG00000254093", "ENSG00000258724"], ["ENSG00000258724", "ENSG00000254093"]):
        out = to_symbols([*order, "ENSG00000128683"])
        assert list(out.symbols) == ["PINX1", order[1], "GAD1"]
        assert out.n_duplicates == 1


def test_symbols_are_left_alone():
    out = to_symbols(["Gad1", "Sst", "Actb"])
    assert out.method == "var_names" and list(out.symbols) == ["Gad1", "Sst", "Actb"]


def test_unknown_species_without_feature_name_is_a_clear_error():
    with pytest.raises(ValueError, match="feature_name"):
        to_symbols(["ENSDARG00000000001", "ENSDARG00000000002"])


def test_match_exact_then_case_insensitive():
    m = match_genes(["GAD1", "SST", "ACTB", "XIST"], ["Gad1", "Sst", "ACTB", "Pvalb"])
    assert m.genes == ["GAD1", "SST", "ACTB"]
    assert m.columns.tolist() == [0, 1, 2]
    assert m.missing == ["XIST"] and m.n_case_insensitive == 2


def test_case_insensitive_match_skipped_when_ambiguous():
    m = match_genes(["FOO", "bar", "Baz"], ["Foo", "foo", "bar", "BAZ"])
    assert m.genes == ["bar", "Baz"]  # "FOO" could be "Foo" or "foo": not matched
    assert m.missing == ["FOO"]
    m2 = match_genes(["Foo"], ["Foo", "foo"])  # an exact match is always fine
    assert m2.columns.tolist() == [0]
    assert match_genes(["GAD1"], ["Gad1"], case_insensitive=False).genes == []


def test_panel_of_ensembl_ids_matches_reference_ids():
    m = match_genes(
        ["ENSG00000128683", "ENSG00000075624.2"], ["GAD1", "ACTB"], ids=["ENSG00000075624.9", "ENSG00000128683"]
    )
    assert m.genes == ["ENSG00000128683", "ENSG00000075624.2"]
    assert m.columns.tolist() == [1, 0]


def test_repeated_reference_names_use_the_first():
    m = match_genes(["A", "B"], pd.Index(["B", "A", "A"]))
    assert m.columns.tolist() == [1, 0]


def test_overlap_check():
    check_overlap(100, {"ref": 30}, 30)  # 25 % is enough
    with pytest.raises(ValueError, match=r"Only 5 of 100 panel genes.*ref: 5/100.*same species"):
        check_overlap(100, {"ref": 5}, 5, missing_example=["GAD1"])
    check_overlap(4, {"ref": 2}, 2)  # small panels need half of their genes
    with pytest.raises(ValueError, match="at least 2"):
        check_overlap(4, {"ref": 1}, 1)
    check_overlap(40, {"ref": 10}, 10)  # ... larger ones 10 genes and a quarter of the panel
    with pytest.raises(ValueError, match="at least 10"):
        check_overlap(40, {"ref": 9, "other": 30}, 9)


def test_mixed_symbol_and_id_lists_keep_symbols_unique():
    """An id never takes a symbol another var entry already carries, whichever comes first."""
    for names in (["GAD1", "ENSG00000128683", "ENSG00000075624"], ["ENSG00000128683", "ENSG00000075624", "GAD1"]):
        out = to_symbols(names)
        assert out.symbols.is_unique
        assert list(out.symbols) == [
            {"GAD1": "GAD1", "ENSG00000128683": "ENSG00000128683"}.get(n, "ACTB") for n in names
        ]
        assert out.n_mapped == 1 and out.n_duplicates == 1
    # through feature_name: the plain "ACTB" entry keeps its name, the id whose feature_name is ACTB keeps its id
    out = to_symbols(["ENSG00000128683", "ENSG00000075624", "ACTB"], feature_names=["GAD1", "ACTB", "ACTB"])
    assert list(out.symbols) == ["GAD1", "ENSG00000075624", "ACTB"] and out.n_duplicates == 1


def test_ids_without_a_symbol_are_reported(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="spatialcx"):
        out = to_symbols(["ENSG00000128683", "ENSG00000000000", "ENSG00000000001.3"])
    assert out.n_unmapped == 2
    assert "2 of 3 Ensembl ids have no gene symbol" in caplog.text and "ENSG00000000000" in caplog.text


def test_gencode_par_y_ids():
    names = ["ENSG00000182378.14", "ENSG00000182378.14_PAR_Y", "ENSG00000128683"]
    assert is_ensembl_id(names).all()
    out = to_symbols(names)
    assert list(out.symbols) == ["PLCXD1", "ENSG00000182378.14_PAR_Y", "GAD1"] and out.n_duplicates == 1


def test_exact_matches_win_whatever_the_panel_order():
    m = match_genes(["gad1", "GAD1"], ["GAD1"])
    assert m.genes == ["GAD1"] and m.columns.tolist() == [0] and m.missing == ["gad1"]
    assert m.n_case_insensitive == 0
    m = match_genes(["sst", "GAD1", "Gad1"], ["GAD1", "SST"])
    assert m.genes == ["sst", "GAD1"] and m.columns.tolist() == [1, 0] and m.n_case_insensitive == 1


def test_repeated_names_of_found_genes_are_reported():
    m = match_genes(["A", "B", "C"], pd.Index(["B", "A", "A", "c", "c"]))
    assert m.genes == ["A", "B", "C"] and m.columns.tolist() == [1, 0, 3] and m.repeated == ["A", "C"]
    assert match_genes(["A"], ["A", "B"]).repeated == []
    ids = match_genes(["ENSG00000128683"], ["GAD1", "GAD1"], ids=["ENSG00000128683.1", "ENSG00000128683.2"])
    assert ids.columns.tolist() == [0] and ids.repeated == ["ENSG00000128683"]


def test_panel_of_ensembl_ids_ignores_versions_without_ids():
    """A panel and a reference both indexed by Ensembl ids of other GENCODE releases, matched without ``ids``."""
    m = match_genes(
        ["ENSG00000141510.16", "ENSG00000012048", "ENSG00000000003.1"], ["ENSG00000012048.23", "ENSG00000141510.15"]
    )
    assert m.genes == ["ENSG00000141510.16", "ENSG00000012048"]
    assert m.columns.tolist() == [1, 0]
    assert m.missing == ["ENSG00000000003.1"]
