"""The packaged canonical marker sets: audited against the Cell Ontology and the gene tables; cases fixed on real data."""

from __future__ import annotations

import json
from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatialcx as scx

PROLIFERATION = {"MKI67", "TOP2A", "PCNA", "CDK1", "CCNB1", "CCNB2", "CENPF", "UBE2C", "BIRC5", "TYMS", "CDC20"}
PROLIFERATION |= {f"MCM{i}" for i in range(2, 8)}
HOUSEKEEPING = {"ACTB", "ACTG1", "GAPDH", "B2M", "MALAT1", "NEAT1", "EEF1A1", "TPT1", "UBB", "UBC", "PPIA", "RPLP0"}
HOUSEKEEPING |= {"HPRT1", "TBP", "TUBA1B", "TUBB", "FTL", "FTH1", "TMSB4X", "TMSB10"}
GENERIC_PREFIXES = ("RPL", "RPS", "MRPL", "MRPS", "MT-")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    text = (resources.files("spatialcx") / "data" / "canonical_markers.json").read_text(encoding="utf-8")
    return json.loads(text)["cell_types"]


@pytest.fixture(scope="module")
def gene_tables() -> dict[str, set[str]]:
    folder = resources.files("spatialcx") / "data" / "genes"
    return {
        species: set(pd.read_csv(folder / f"{file}.csv.gz")["gene_name"])
        for species, file in (("human", "homo_sapiens"), ("mouse", "mus_musculus"))
    }


# --------------------------------------------------------------------------------------------------------------------
# Audit of the packaged table


def test_every_cl_id_is_a_current_term_named_as_its_set(records):
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    cl = OntologyParser()
    problems = {}
    for r in records:
        term, name = r["ontology_term_id"], r["name"]
        if not cl.is_valid_term_id(term, "CL"):
            problems[term] = f"{name!r}: not a Cell Ontology term"
        elif cl.is_term_deprecated(term):
            problems[term] = f"{name!r}: obsolete"
        elif cl.get_term_label(term) != name:
            problems[term] = f"{name!r}, but the Cell Ontology names it {cl.get_term_label(term)!r}"
    assert problems == {}
    ids, names = [r["ontology_term_id"] for r in records], [r["name"] for r in records]
    assert len(set(ids)) == len(ids) and len(set(names)) == len(names)


def test_no_gene_twice_in_a_set_and_every_symbol_a_gene_of_its_species(records, gene_tables):
    for r in records:
        lists = {
            "human": r["markers"],
            "mouse": r.get("mouse") or [g[:1].upper() + g[1:].lower() for g in r["markers"]],
        }
        for species, genes in lists.items():
            assert len(set(genes)) == len(genes), (r["name"], species, genes)
            assert all(g == g.strip() and g for g in genes), (r["name"], genes)
            assert set(genes) <= gene_tables[species], (r["name"], species, set(genes) - gene_tables[species])


def test_no_housekeeping_ribosomal_or_proliferation_gene_marks_a_type(records):
    """MKI67 in the plasmablast set named any cycling cell (of any lineage) a plasmablast."""
    for r in records:
        generic = {g for g in r["markers"] if g in HOUSEKEEPING or g.startswith(GENERIC_PREFIXES)}
        assert not generic, (r["name"], generic)
        cycling = set(r["markers"]) & PROLIFERATION
        if r["name"] == "transit amplifying cell":  # defined by proliferation: cycling *epithelial* cells
            assert cycling and {"EPCAM", "CDH1"} <= set(r["markers"]) - cycling
        else:
            assert not cycling, (r["name"], cycling)


def test_the_sets_fixed_after_review():
    human, mouse = scx.tl.load_canonical_markers(), scx.tl.load_canonical_markers(species="mouse")
    assert "MKI67" not in human["plasmablast"] and "TNFRSF17" in human["plasmablast"]
    # VCAN (versican) is made by fibroblasts and other stroma as much as by monocytes; CCR2 marks classical ones
    assert "VCAN" not in human["classical monocyte"] and "CCR2" in human["classical monocyte"]
    assert "Ccr2" in mouse["classical monocyte"]
    assert "FLT1" in human["endothelial cell"] and "Flt1" in mouse["endothelial cell"]
    # granulocyte maturation in the marrow: azurophil (primary) then specific (secondary) granule proteins
    by_id = scx.tl.load_canonical_markers(key="id", tissue="bone marrow")
    assert by_id["CL:0000564"] == ["MPO", "ELANE", "AZU1", "PRTN3", "CTSG"]  # neutrophilic promyelocyte
    assert by_id["CL:0000580"][:3] == ["LTF", "CAMP", "LCN2"]  # neutrophilic myelocyte
    assert mouse["neutrophilic promyelocyte"] == ["Mpo", "Elane", "Prtn3", "Ctsg"]  # the mouse has no Azu1
    assert {"Ltf", "Camp", "Ngp"} <= set(mouse["neutrophilic myelocyte"])
    assert "MMP9" in human["neutrophil"]  # gelatinase (tertiary) granules: band and segmented neutrophils
    brain = scx.tl.load_canonical_markers(tissue="brain")
    assert "neutrophilic promyelocyte" not in brain and "neutrophilic myelocyte" not in brain


# --------------------------------------------------------------------------------------------------------------------
# Marker files of the user's own


@pytest.mark.parametrize("field", ["markers", "mouse"])
def test_a_single_string_is_refused_not_read_letter_by_letter(tmp_path, field):
    """``"markers": "CD3E"`` gave the set ['C', 'D', '3', 'E']."""
    record = {"ontology_term_id": "CL:0000084", "name": "T cell", "markers": ["CD3E"], field: "CD3E"}
    path = tmp_path / "markers.json"
    path.write_text(json.dumps({"cell_types": [record]}))
    with pytest.raises(ValueError, match=rf"'{field}' of 'T cell' is str 'CD3E', not a list.*\[\"CD3E\"\]"):
        scx.tl.load_canonical_markers(path=path, species="mouse" if field == "mouse" else "human")


def test_a_file_s_gene_lists_are_cleaned_and_checked(tmp_path):
    """null was the gene "None" (human) or a TypeError (mouse); spaces and repeats were kept."""
    record = {"ontology_term_id": "CL:0000236", "name": "B cell", "markers": [" MS4A1 ", "CD19", "MS4A1", ""]}
    path = tmp_path / "markers.json"
    path.write_text(json.dumps({"cell_types": [record]}))
    assert scx.tl.load_canonical_markers(path=path) == {"B cell": ["MS4A1", "CD19"]}
    assert scx.tl.load_canonical_markers(path=path, species="mouse") == {"B cell": ["Ms4a1", "Cd19"]}
    record["markers"].append(None)
    path.write_text(json.dumps({"cell_types": [record]}))
    for species in ("human", "mouse"):
        with pytest.raises(ValueError, match="'markers' of 'B cell' holds None, not gene symbols"):
            scx.tl.load_canonical_markers(path=path, species=species)
    record["markers"] = {"MS4A1": 1}
    path.write_text(json.dumps({"cell_types": [record]}))
    with pytest.raises(ValueError, match="is dict .*; write a JSON list of gene symbols"):
        scx.tl.load_canonical_markers(path=path)


# --------------------------------------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="module")
def bone_marrow_domains(xenium_bone_marrow):
    """Xenium bone marrow (84,518 cells x 477 genes): graph clusters, their counts, and their names from the markers."""
    adata = xenium_bone_marrow.copy()
    scx.tl.score_signatures(adata, scx.tl.load_canonical_markers(tissue="bone marrow"))
    scx.tl.annotate_domains(adata, "cluster", key_added="domain")
    labels = dict(zip(adata.uns["domain"]["groups"], adata.uns["domain"]["labels"], strict=True))
    return adata, labels


def test_bone_marrow_granulocyte_precursors_are_named_by_their_stage(bone_marrow_domains, top_clusters):
    """The CTSG-high (azurophil granule) cluster, which is also the NKG7-highest, was named "natural killer cell";
    the OLFM4-high (specific granule) cluster and the MMP9-high (gelatinase granule) mature clusters are now told
    apart."""
    adata, labels = bone_marrow_domains
    (promyelocytes,) = top_clusters(adata, "CTSG")
    assert top_clusters(adata, "NKG7") == [promyelocytes]
    assert labels[promyelocytes] == "neutrophilic promyelocyte"
    assert not any("natural killer cell" in labels[c].split("/") for c in top_clusters(adata, "NKG7", n=2))
    (myelocytes,) = top_clusters(adata, "OLFM4")
    assert labels[myelocytes] == "neutrophilic myelocyte"
    mature = top_clusters(adata, "MMP9", n=2)
    assert [labels[c] for c in mature] == ["neutrophil", "neutrophil"]  # both were "Unassigned"


def test_bone_marrow_cycling_and_stromal_clusters_are_not_plasmablasts_or_monocytes(bone_marrow_domains, top_clusters):
    """MKI67 named the cycling cluster "plasmablast"; VCAN named the CXCL12-high stromal cluster "classical monocyte/
    fibroblast"."""
    adata, labels = bone_marrow_domains
    (cycling,) = top_clusters(adata, "MKI67")
    assert "plasmablast" not in labels[cycling]
    (plasma,) = top_clusters(adata, "SDC1")
    assert labels[plasma] == "plasma cell"
    stroma, monocytes = top_clusters(adata, "VCAN", n=2)
    assert top_clusters(adata, "CXCL12") == [stroma]
    assert labels[stroma] == "fibroblast"
    assert "classical monocyte" in labels[monocytes].split("/")
    # per cell: the share of MKI67-positive cells whose top signature is "plasmablast" (20 % before)
    names = np.asarray(adata.uns["signature"]["names"])
    top = names[adata.obsm["signature"].argmax(axis=1)]
    cycling_cells = np.asarray(adata[:, "MKI67"].X.todense()).ravel() > 0
    assert (top[cycling_cells] == "plasmablast").mean() < 0.05


def test_flt1_names_the_starmap_endothelial_cells(shared_data):
    """No other endothelial marker is on the STARmap panel: with the brain's markers its endothelial cells were
    "Unassigned" and the Car4 of capillaries (high in layer 2/3 neurons too) was the only endothelial gene."""
    adata = ad.read_h5ad(shared_data("starmap_mpfc", "starmap_mpfc.h5ad"))
    scx.tl.score_signatures(adata, scx.tl.load_canonical_markers(species="mouse", tissue="brain"))
    scx.tl.annotate_domains(adata, "cell_type_author", key_added="domain")
    labels = dict(zip(adata.uns["domain"]["groups"], adata.uns["domain"]["labels"], strict=True))
    assert labels["Endo"] == "endothelial cell"
    assert labels["Smc"] == "endothelial cell"  # the authors' vascular (Flt1-high) cluster


def test_opalin_and_ermn_name_the_hypothalamus_oligodendrocytes(shared_data):
    """Imaging panels of the brain carry Opalin and Ermn rather than Mbp or Plp1: the hypothalamus panel (134 genes)
    has neither of the classic markers, and its mature oligodendrocytes were "Unassigned"."""
    adata = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad"))
    scx.tl.score_signatures(adata, scx.tl.load_canonical_markers(species="mouse", tissue="brain"))
    scx.tl.annotate_domains(adata, "cell_type_author", key_added="domain")
    labels = dict(zip(adata.uns["domain"]["groups"], adata.uns["domain"]["labels"], strict=True))
    assert labels["Mature oligodendrocyte"] == "oligodendrocyte"
    assert labels["Excitatory"] == "glutamatergic neuron" and labels["Astrocytes"] == "astrocyte"


@pytest.mark.parametrize(
    ("name", "species"),
    [
        ("Homo sapiens", "human"),
        ("HUMAN", "human"),
        ("hsapiens", "human"),
        ("NCBITaxon:9606", "human"),
        ("Mus musculus", "mouse"),
        ("mus_musculus", "mouse"),
        ("mmus", "mouse"),
        ("NCBITaxon:10090", "mouse"),
    ],
)
def test_other_names_of_the_species_are_accepted(name, species):
    """``"Homo sapiens"`` (CELLxGENE's organism), ``"mmus"`` or a taxon id were refused as unknown species."""
    assert scx.tl.load_canonical_markers(species=name) == scx.tl.load_canonical_markers(species=species)


@pytest.mark.parametrize("name", ["rat", "Rattus norvegicus", "", None])
def test_another_species_is_refused_with_the_way_out(name):
    with pytest.raises(ValueError, match=r"species must be 'human' or 'mouse' .*got .*pass path= a marker file"):
        scx.tl.load_canonical_markers(species=name)


def test_mouse_cdc2_markers_are_neither_pan_myeloid_nor_neuronal():
    """Itgam (CD11b: monocytes, macrophages, microglia) and Sirpa (myeloid cells and neurons) made the mouse
    "CD1c-positive myeloid dendritic cell" set score in brain microglia and neurons."""
    mouse = scx.tl.load_canonical_markers(species="mouse", tissue="brain")
    cdc2 = mouse["CD1c-positive myeloid dendritic cell"]
    assert not {"Itgam", "Sirpa"} & set(cdc2)
    assert {"Cd209a", "Clec4a4", "Mgl2"} <= set(cdc2)


def test_hypothalamus_endothelial_cells_and_microglia_are_named(shared_data):
    """No generic endothelial or microglia marker is on the hypothalamus panel: its endothelial cells (Slco1a4-high)
    were named "pericyte" (Rgs5) and its microglia (Selplg-high) were "Unassigned"."""
    adata = ad.read_h5ad(shared_data("hypothalamus_merfish_pair", "reference_scrna.h5ad"))
    markers = scx.tl.load_canonical_markers(species="mouse", tissue="brain")
    assert "Slco1a4" in markers["brain microvascular endothelial cell"] and "Selplg" in markers["microglial cell"]
    scx.tl.score_signatures(adata, markers)
    scx.tl.annotate_domains(adata, "cell_type_author", key_added="domain")
    labels = dict(zip(adata.uns["domain"]["groups"], adata.uns["domain"]["labels"], strict=True))
    assert labels["Endothelial"] == "brain microvascular endothelial cell"
    assert labels["Microglia"] == "microglial cell"
    assert labels["Mural"].split("/")[0] == "pericyte"
    human = scx.tl.load_canonical_markers(tissue="brain")["brain microvascular endothelial cell"]
    assert human == ["CLDN5", "SLC2A1", "MFSD2A", "SLCO1A2"]
    assert "brain microvascular endothelial cell" not in scx.tl.load_canonical_markers(tissue="liver")
