"""``scx.tl.load_canonical_markers``: the packaged marker genes of common cell types, keyed by Cell Ontology."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

MARKERS_FILE = "canonical_markers.json"
_CL_ID_RE = re.compile(r"CL:\d{7}")
#: Names of the two species (case, spaces and punctuation ignored): common and Latin names, their short forms
#: (Ensembl's "hsapiens", Bioconductor's "Hs" / "Mm", KEGG's "hsa" / "mmu") and the NCBI taxon ids of CELLxGENE's
#: ``organism_ontology_term_id``.
_SPECIES = {
    **dict.fromkeys(
        ["human", "homosapiens", "hsapiens", "hs", "hsa", "hsap", "ncbitaxon9606", "9606"],
        "human",
    ),
    **dict.fromkeys(
        ["mouse", "musmusculus", "mmusculus", "mm", "mmu", "mmus", "ncbitaxon10090", "10090"],
        "mouse",
    ),
}


def _read(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], str]:
    if path is None:
        resource = resources.files("spatialcx") / "data" / MARKERS_FILE
        where = f"the packaged {MARKERS_FILE}"
        if not resource.is_file():
            raise FileNotFoundError(
                f"{where} is missing from the installed spatialcx package; reinstall spatialcx "
                "(`pip install --force-reinstall spatialcx`)."
            )
        text = resource.read_text(encoding="utf-8")
    else:
        p = Path(path).expanduser()
        where = str(p)
        if not p.is_file():
            raise FileNotFoundError(f"Marker file {where!r} does not exist.")
        text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"Marker file {where!r} is empty: it should hold a JSON object with a 'cell_types' list.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"Marker file {where!r} is not valid JSON ({e}).") from None
    return data, where


def _gene_list(value: Any, field: str, name: str, where: str) -> list[str]:
    """The symbols of one record's ``field``: stripped, empty ones and repeats left out, in the file's order."""
    if isinstance(value, str) or not isinstance(value, list):
        hint = (
            f'write "{field}": [{json.dumps(value)}] for a single gene (a string would be read letter by letter)'
            if isinstance(value, str)
            else "write a JSON list of gene symbols"
        )
        raise ValueError(
            f"Marker file {where!r}: {field!r} of {name!r} is {type(value).__name__} {value!r}, not a list of gene "
            f"symbols; {hint}."
        )
    bad = [g for g in value if not isinstance(g, str)]
    if bad:
        raise ValueError(
            f"Marker file {where!r}: {field!r} of {name!r} holds {', '.join(map(repr, bad))}, not gene symbols; "
            "list each gene as a string and leave out empty values."
        )
    return list(dict.fromkeys(g.strip() for g in value if g.strip()))


def _species(species: Any) -> Literal["human", "mouse"]:
    """``"human"`` or ``"mouse"`` for any of their names in ``_SPECIES`` (``"Homo sapiens"``, ``"mmus"``, ...)."""
    found = _SPECIES.get(re.sub(r"[^0-9a-z]+", "", species.lower())) if isinstance(species, str) else None
    if found is None:
        raise ValueError(
            f"species must be 'human' or 'mouse' (or a name of either, e.g. 'Homo sapiens', 'Mus musculus', 'mmus', "
            f"'NCBITaxon:10090'), got {species!r}. The packaged markers are HGNC (human) and MGI (mouse) symbols; "
            "for another species, pass path= a marker file of its own symbols."
        )
    return found  # type: ignore[return-value]


def _normal_tissue(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _tissue_groups(
    tissue: str | Sequence[str], data: dict[str, Any], where: str
) -> tuple[set[str], dict[str, list[str]]]:
    """The tissue groups that ``tissue`` (names or aliases, case and punctuation ignored) stands for."""
    groups = data.get("tissue_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(
            f"Marker file {where!r} has no 'tissue_groups' object, so markers cannot be selected by tissue; "
            "pass tissue=None or add {'group': [aliases]} and 'tissues' lists to the file."
        )
    alias = {}
    for group, names in groups.items():
        for name in [group, *(names or [])]:
            alias[_normal_tissue(name)] = str(group)
    wanted = [tissue] if isinstance(tissue, str) else list(tissue)
    if not wanted or not all(isinstance(t, str) for t in wanted):
        raise TypeError(f"tissue must be a tissue name or a list of names, got {tissue!r}.")
    found, unknown = set(), []
    for t in wanted:
        group = alias.get(_normal_tissue(t))
        if group is None:
            unknown.append(t)
        else:
            found.add(group)
    if unknown:
        raise ValueError(
            f"Unknown tissue {', '.join(map(repr, unknown))} for the canonical markers. Known tissues: "
            f"{', '.join(sorted(groups))} (and their aliases, e.g. 'brain', 'colon', 'bone marrow'); pass "
            "tissue=None to keep every cell type."
        )
    return found, groups


def load_canonical_markers(
    *,
    species: Literal["human", "mouse"] | str = "human",
    key: Literal["name", "id"] = "name",
    tissue: str | Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> dict[str, list[str]]:
    """Return canonical marker genes of common cell types, keyed by Cell Ontology name or id.

    The packaged table (``spatialcx/data/canonical_markers.json``) lists textbook markers of more than 100 cell types
    (immune, stromal, vascular, epithelial, neural, ...), each under its CL id and CL name. Use it to check an
    annotation, e.g. with :func:`spatialcx.tl.score_signatures` or a dot plot, restricted to the genes of the panel.
    Pass ``tissue`` to leave out the types of other organs (on a brain section, ``SST`` should not name a domain
    "pancreatic D cell"): types found in any tissue (immune, vascular, stromal) are always kept.

    Parameters
    ----------
    species
        ``"human"`` (HGNC symbols) or ``"mouse"`` (MGI symbols: the human symbol in title case unless the table gives
        the mouse genes explicitly). Other names of the two are accepted, case and punctuation ignored: ``"Homo
        sapiens"``, ``"hsapiens"``, ``"hsa"``, ``"Mus musculus"``, ``"mmus"``, ``"mmu"``, and the NCBI taxon ids of
        CELLxGENE's ``organism_ontology_term_id`` (``"NCBITaxon:9606"``, ``"NCBITaxon:10090"``).
    key
        Key the result by CL ``"name"`` (e.g. ``"T cell"``) or CL ``"id"`` (``"CL:0000084"``).
    tissue
        Keep only the cell types found in this tissue (or these tissues): the types the table lists for it, and those
        found in any tissue. One of the table's tissue groups (``"nervous system"``, ``"eye"``, ``"lung"``,
        ``"intestine"``, ``"stomach"``, ``"liver"``, ``"pancreas"``, ``"kidney"``, ``"heart"``, ``"skeletal muscle"``,
        ``"lymphoid organ"``, ``"bone marrow"``, ``"skin"``, ``"breast"``, ``"testis"``) or one of their aliases
        (``"brain"``, ``"hippocampus"``, ``"colon"``, ``"lymph node"``, ...; case and punctuation are ignored).
        ``None`` keeps every type.
    path
        Read another file with the same layout instead of the packaged one.

    Returns
    -------
    ``{cell type: [genes]}`` in the order of the table; each gene once, surrounding spaces removed.

    Raises
    ------
    FileNotFoundError
        The file is missing.
    ValueError
        ``species`` is not a name of human or mouse; the file is empty, not JSON, or lists no cell type with markers;
        a record's ``markers`` (or ``mouse``) is not a list of gene symbols; ``tissue`` is not a known tissue.

    Examples
    --------
    >>> markers = scx.tl.load_canonical_markers(species="mouse", tissue="brain")  # doctest: +SKIP
    >>> scx.tl.score_signatures(sdata, markers)  # doctest: +SKIP
    """
    species = _species(species)
    if key not in ("name", "id"):
        raise ValueError(f"key must be 'name' or 'id', got {key!r}.")
    data, where = _read(path)
    entries = data.get("cell_types") if isinstance(data, dict) else None
    if not entries:
        raise ValueError(
            f"Marker file {where!r} lists no cell types: it needs a non-empty 'cell_types' list of "
            "{'ontology_term_id', 'name', 'markers'} records."
        )
    keep_groups, groups = _tissue_groups(tissue, data, where) if tissue is not None else (None, {})
    out: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        try:
            term_id, name, genes = str(entry["ontology_term_id"]), str(entry["name"]), entry["markers"]
        except (KeyError, TypeError):
            raise ValueError(
                f"Marker file {where!r}: record {i} ({entry!r}) needs 'ontology_term_id', 'name' and 'markers'."
            ) from None
        if not _CL_ID_RE.fullmatch(term_id):
            raise ValueError(f"Marker file {where!r}: {name!r} has the id {term_id!r}, which is not a CL id.")
        if keep_groups is not None:
            found_in = entry.get("tissues") or []
            if isinstance(found_in, str) or not all(t in groups for t in found_in):
                raise ValueError(
                    f"Marker file {where!r}: {name!r} lists the tissues {found_in!r}; each must be one of its "
                    f"'tissue_groups' ({', '.join(groups)})."
                )
            if found_in and not keep_groups.intersection(found_in):
                continue
        genes = _gene_list(genes, "markers", name, where)
        if species == "mouse":
            mouse = entry.get("mouse")
            if mouse:
                genes = _gene_list(mouse, "mouse", name, where)
            else:
                genes = list(dict.fromkeys(g[:1].upper() + g[1:].lower() for g in genes))
        if not genes:
            raise ValueError(f"Marker file {where!r}: {name!r} ({term_id}) has no marker genes.")
        k = name if key == "name" else term_id
        if k in out:
            raise ValueError(f"Marker file {where!r} lists {k!r} twice.")
        out[k] = genes
    return out
