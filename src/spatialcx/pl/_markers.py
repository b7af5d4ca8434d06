"""Marker-gene QC plots: ``scx.pl.marker_dotplot`` and ``scx.pl.validation_2d``.

Both check predicted cell types against marker genes that the classifier never saw as such: the canonical markers
of each type's Cell Ontology term (:func:`spatialcx.tl.load_canonical_markers`), restricted to the panel, or a
user's own marker sets, read as :func:`spatialcx.tl.score_signatures` reads them (a dict, a file, a table).
Expression is ``log1p(counts / library size * 1e4)`` computed from the raw counts a block of cells at a time
(whatever ``X`` holds), so memory stays bounded on tables of millions of cells: the dot plot keeps per-type sums
only, the validation plot one score per cell.
"""

from __future__ import annotations

import functools
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._constants import CONFIDENCE_SUFFIX, ONTOLOGY_ID_SUFFIX, PREDICTED_SUFFIX, UNASSIGNED, UNKNOWN_ONTOLOGY_ID
from .._settings import logger
from .._table import obs_column
from .._utils import label_codes, progress
from . import _utils

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["marker_dotplot", "validation_2d"]

_WRITERS = "`scx.tl.annotate` or `scx.tl.predict`"
#: Marker area (points²) of a dot for a gene expressed in every cell of a type.
DOT_MAX_AREA = 180.0
#: Colours of the validation scatter: confident and marker-backed, confident without marker counts, below threshold.
BACKED_COLOR, NO_MARKER_COLOR, LOW_COLOR = "#1f77b4", "#d62728", "#9e9e9e"
#: Colour of the threshold line.
THRESHOLD_COLOR = "#ff2d55"


# --------------------------------------------------------------------------------------------------------------------
# Labels and arguments
# --------------------------------------------------------------------------------------------------------------------


def check_label_column(adata: AnnData, column: str, *, fn: str, what: str = "cell-type labels") -> None:
    """Raise a KeyError that names the writers when ``column`` is not in ``adata.obs``."""
    if not isinstance(column, str):
        raise TypeError(f"{fn}: the label column must be a str naming an obs column, got {column!r}.")
    if column not in adata.obs.columns:
        cols = ", ".join(map(repr, adata.obs.columns)) or "none"
        raise KeyError(
            f"{fn}: obs has no column {column!r} with {what}. It is written by {_WRITERS}; run one of them first or "
            f"pass the right column name. obs columns: {cols}."
        )


#: A label that is a number ("3", "-1", "0.5"): sorted by its value.
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d*)?")
_DIGITS_RE = re.compile(r"(\d+)")


def natural_key(label: Any) -> tuple:
    """Sort key that orders numbers by value: ``"2"`` before ``"10"``, ``"type 2"`` before ``"type 10"``.

    Labels that are numbers come first, by value; the others are compared piece by piece, runs of digits as numbers.
    """
    text = str(label)
    if _NUMBER_RE.fullmatch(text.strip()):
        return (0, float(text), text)
    parts = _DIGITS_RE.split(text)  # text, digits, text, ...: the same kind at the same position in any two labels
    return (1, tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text)


def as_categorical(labels: pd.Series) -> pd.Categorical:
    """``labels`` as a Categorical, nulls missing, groups in the order a reader expects.

    A categorical column keeps its category order, unless that order is the plain text order pandas gives by default
    (``"1", "10", "2"``) and numbers in the labels read otherwise: then, as for any other column, the labels are
    sorted with :func:`natural_key` (``"1", "2", "10"``; ``"type 2"`` before ``"type 10"``). Whole-number floats (a
    column of cluster ids with NaN) are shown as integers (``"3"``, not ``"3.0"``).
    """
    if isinstance(labels.dtype, pd.CategoricalDtype):
        cat = labels.array
        names = [str(c) for c in cat.categories]
        if not cat.ordered and names == sorted(names):
            natural = sorted(range(len(names)), key=lambda i: natural_key(names[i]))
            if natural != list(range(len(names))):
                cat = cat.reorder_categories(cat.categories[natural])
        return cat
    codes, names = label_codes(labels)  # whole-number floats (cluster ids with NaN) read "3"
    categories = sorted(set(names), key=natural_key)  # two values may read alike (1 and "1" in an object column)
    position = {name: i for i, name in enumerate(categories)}
    remap = np.array([position[name] for name in names] + [-1], dtype=np.int64)
    return pd.Categorical.from_codes(remap[codes], categories=categories)


def group_codes(
    labels: pd.Series, *, min_cells: int, exclude: Sequence[str] = (UNASSIGNED,)
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, int]]:
    """Number the groups of ``labels`` that have at least ``min_cells`` cells (vectorized, fine for millions).

    Returns
    -------
    ``(groups, codes, sizes, too_small)``: the kept groups in category order (as strings), a code per cell (-1 for
    cells of no kept group), the number of cells of each kept group, and ``{group: n_cells}`` of the groups dropped
    for having fewer than ``min_cells`` cells (empty categories are not reported).
    """
    cat = as_categorical(labels)
    cats = [str(c) for c in cat.categories]
    base = np.asarray(cat.codes, dtype=np.int64)
    counts = np.bincount(base[base >= 0], minlength=len(cats))
    allowed = np.array([c not in set(exclude) for c in cats], dtype=bool)
    keep = allowed & (counts >= min_cells)
    too_small = {c: int(n) for c, n, ok, k in zip(cats, counts, allowed, keep, strict=True) if ok and not k and n}
    remap = np.full(len(cats) + 1, -1, dtype=np.int64)
    remap[1:][keep] = np.arange(int(keep.sum()))
    codes = remap[base + 1]
    groups = [c for c, k in zip(cats, keep, strict=True) if k]
    return groups, codes, counts[keep].astype(np.int64), too_small


#: Most groups named in an error or a note (a numeric column passed as labels has a group per cell).
MAX_NAMED = 20


def name_counts(counts: Mapping[str, int], limit: int = MAX_NAMED) -> str:
    """``"a (3), b (2)"``: the first ``limit`` groups of ``counts`` with their sizes, and how many more there are."""
    named = ", ".join(f"{k} ({v:,})" for k, v in list(counts.items())[:limit])
    return named + (f" and {len(counts) - limit:,} more" if len(counts) > limit else "")


def largest_groups(
    groups: list[str], codes: np.ndarray, sizes: np.ndarray, max_types: int, *, fn: str
) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """The ``max_types`` largest groups, in their order (ties: the earlier one), renumbered; how many are left out.

    The cells of the groups left out get code -1; their names are logged.
    """
    if len(groups) <= max_types:
        return groups, codes, sizes, 0
    by_size = np.argsort(-sizes, kind="stable")
    keep, drop = np.sort(by_size[:max_types]), np.sort(by_size[max_types:])
    logger.warning(
        "%s: %d types, more than max_types=%d: the %d smaller ones are not shown: %s. Pass a larger max_types to show "
        "them, or plot a subset of the table.",
        fn,
        len(groups),
        max_types,
        drop.size,
        name_counts({groups[i]: int(sizes[i]) for i in drop}),
    )
    remap = np.full(len(groups) + 1, -1, dtype=np.int64)
    remap[1:][keep] = np.arange(keep.size)
    return [groups[i] for i in keep], remap[codes + 1], sizes[keep], int(drop.size)


def unassigned_label(adata: AnnData, key: str) -> str:
    """The label of filtered cells: ``uns[key]["unassigned_label"]`` when recorded, else ``"Unassigned"``."""
    params = adata.uns.get(key)
    label = params.get("unassigned_label") if isinstance(params, Mapping) else None
    return str(label) if label is not None else UNASSIGNED


def _unassigned_labels(adata: AnnData, key: str, column: str) -> tuple[str, ...]:
    """Labels of cells without a type in ``obs[column]``.

    ``key``'s (:func:`unassigned_label`) and, for a column of :func:`spatialcx.tl.annotate_domains`, the
    ``unassigned`` label it recorded in ``uns[column]``.
    """
    out = [unassigned_label(adata, key)]
    params = adata.uns.get(column) if column != key else None
    if isinstance(params, Mapping) and "labels" in params and isinstance(params.get("unassigned"), str):
        out.append(params["unassigned"])
    return tuple(dict.fromkeys(out))


def predicted_labels(adata: AnnData, key: str) -> tuple[pd.Series, str]:
    """Labels before confidence filtering: ``{key}_predicted`` shown by its final names, else ``key``.

    ``{key}_predicted`` holds the model's classes; ``uns[key]["classes"]`` and ``uns[key]["names"]`` (aligned lists,
    written by :func:`spatialcx.tl.annotate`) give the name each class is shown by in ``key``.
    """
    predicted = f"{key}{PREDICTED_SUFFIX}"
    if predicted not in adata.obs.columns:
        return obs_column(adata, key), key
    from ..tl._filter import _class_lists

    labels = obs_column(adata, predicted)
    mapping = _class_lists(adata, key, "names")  # the one reader of uns[key]["classes"] / ["names"]
    if mapping:
        cat = as_categorical(labels)
        renamed = [mapping.get(str(c), str(c)) for c in cat.categories]
        if renamed != [str(c) for c in cat.categories]:
            unique = list(dict.fromkeys(renamed))
            where = np.array([unique.index(n) for n in renamed] + [-1], dtype=np.int64)
            codes = where[np.asarray(cat.codes, dtype=np.int64)]  # code -1 (missing) picks the last entry, -1
            labels = pd.Series(pd.Categorical.from_codes(codes, categories=unique), index=labels.index)
    return labels, predicted


def check_positive_int(value: Any, name: str, *, fn: str, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise when it is not an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


def resolve_threshold(adata: AnnData, key: str, threshold: float | None, *, fn: str) -> float:
    """``threshold``, or the one recorded in ``uns[key]["confidence_threshold"]``, or 0.8."""
    if threshold is None:
        params = adata.uns.get(key)
        recorded = params.get("confidence_threshold") if isinstance(params, Mapping) else None
        threshold = float(recorded) if recorded is not None else 0.8
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= float(threshold) <= 1:
        raise ValueError(
            f"{fn}: threshold must be a confidence in [0, 1] (e.g. 0.8) or None to use the one recorded by "
            f"scx.tl.annotate in uns[{key!r}]['confidence_threshold'], got {threshold!r}."
        )
    return float(threshold)


# --------------------------------------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MarkerSets:
    """Marker genes matched to the panel.

    Attributes
    ----------
    genes
        ``{type: [panel genes]}``, spelled as in the panel, for the types with at least one marker on the panel.
    missing
        Types for which no marker gene is on the panel (or none is known).
    source
        ``"canonical"`` or ``"user"``.
    related
        ``{type: CL names}`` of the types whose markers stand in for a type none of whose own is on the panel.
    matched
        ``{label: CL name}`` of the labels that are not CL names (``"Astro"``, ``"Endo"``) and were matched to a Cell
        Ontology term (:func:`spatialcx.tl.map_labels`) to find their canonical markers.
    known
        Whether any type was found in the canonical table at all (by CL id, CL name or matched label); ``False``
        means the labels name no cell type (e.g. cluster numbers), rather than that the panel lacks their markers.
    """

    genes: dict[str, list[str]]
    missing: list[str] = field(default_factory=list)
    source: str = "canonical"
    related: dict[str, str] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)
    known: bool = True


def _panel_lookup(var_names: Sequence[str]) -> dict[str, str]:
    """Upper-cased gene name -> the panel's own spelling (the first one when two differ only by case)."""
    lookup: dict[str, str] = {}
    for g in map(str, var_names):
        lookup.setdefault(g.upper(), g)
    return lookup


def _on_panel(genes: Sequence[str], lookup: Mapping[str, str]) -> list[str]:
    """Genes found in the panel (case-insensitively, so Gad1 matches GAD1), spelled as in the panel, once each."""
    found = (lookup.get(str(g).upper()) for g in genes)
    return list(dict.fromkeys(g for g in found if g is not None))


#: Separator of the combined labels of :func:`spatialcx.tl.annotate_domains` (e.g. ``"B cell/T cell"``).
COMBINED_LABEL_SEP = "/"


def label_parts(label: str, sep: str = COMBINED_LABEL_SEP) -> list[str]:
    """The types of a combined label (``"B cell/T cell"`` -> ``["B cell", "T cell"]``); ``[label]`` otherwise."""
    parts = [p.strip() for p in str(label).split(sep)]
    parts = [p for p in parts if p]
    return parts if len(parts) > 1 else [str(label)]


def combined_label_sep(adata: AnnData, column: str) -> str:
    """The separator of ``obs[column]``'s combined labels (``"/"`` unless recorded otherwise).

    :func:`spatialcx.tl.annotate_domains` records its ``sep`` in ``uns[column]``.
    """
    params = adata.uns.get(column)
    sep = params.get("sep") if isinstance(params, Mapping) and "labels" in params else None
    return sep if isinstance(sep, str) and sep else COMBINED_LABEL_SEP


def _canonical_tables() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Canonical markers keyed by CL id and by lower-cased CL name; human and mouse symbols together."""
    from spatialcx.tl import load_canonical_markers

    by_id = {k: list(v) for k, v in load_canonical_markers(species="human", key="id").items()}
    for k, v in load_canonical_markers(species="mouse", key="id").items():
        by_id[k] = list(dict.fromkeys([*by_id.get(k, []), *v]))
    names = load_canonical_markers(species="human", key="name")
    ids = list(load_canonical_markers(species="human", key="id"))
    by_name = {name.lower(): by_id[i] for name, i in zip(names, ids, strict=True)}
    return by_id, by_name


def _group_term_ids(adata: AnnData, key: str, codes: np.ndarray, n_groups: int) -> list[str | None]:
    """The most common CL id of each group's cells (``{key}_ontology_term_id``), ``None`` without one."""
    column = f"{key}{ONTOLOGY_ID_SUFFIX}"
    out: list[str | None] = [None] * n_groups
    if column not in adata.obs.columns or n_groups == 0:
        return out
    ids = as_categorical(obs_column(adata, column))
    terms = [str(c) for c in ids.categories]
    id_codes = np.asarray(ids.codes, dtype=np.int64)
    ok = (codes >= 0) & (id_codes >= 0)
    if not ok.any() or not terms:
        return out
    table = np.bincount(codes[ok] * len(terms) + id_codes[ok], minlength=n_groups * len(terms))
    table = table.reshape(n_groups, len(terms))
    table[:, [t == UNKNOWN_ONTOLOGY_ID for t in terms]] = 0
    for g in range(n_groups):
        if table[g].max() > 0:
            out[g] = terms[int(table[g].argmax())]
    return out


def _check_markers_arg(markers: Any, fn: str) -> dict[str, list[str]]:
    """A user's ``markers`` as ``{type: [genes]}``, read as :func:`spatialcx.tl.score_signatures` reads them.

    The same dict, file or table gives the same sets to the signatures and to the plots; errors start with ``fn``.
    The one rule of the plots: a set with no gene is kept (empty), so the type is named as one without markers.
    """
    from ..tl._signatures import _load_markers

    return _load_markers(markers, fn=fn, allow_empty=True)


def resolve_markers(
    adata: AnnData,
    var_names: Sequence[str],
    groups: Sequence[str],
    codes: np.ndarray,
    *,
    key: str,
    markers: Mapping[str, Sequence[str]] | str | os.PathLike[str] | pd.DataFrame | None,
    max_genes_per_type: int | None,
    fn: str,
    sep: str = COMBINED_LABEL_SEP,
) -> MarkerSets:
    """Match marker genes to the panel for each of ``groups`` (canonical) or for each type of ``markers`` (user).

    Canonical markers of a group are those of its cells' most common CL id (``{key}_ontology_term_id``), else of the
    CL name equal to the group's label (case-insensitive), else, for a combined label of
    :func:`spatialcx.tl.annotate_domains` (``"B cell/T cell"``, parts split at ``sep``), those of each of its parts
    (each part's first ``max_genes_per_type``, in the order of the parts), else of the CL term that
    :func:`spatialcx.tl.map_labels` matches to the label or part (``"Astro"``, ``"Endo"``; cluster numbers are not
    matched). A type none of whose own markers is on the
    panel, or that has no entry in the table, takes those of its subtypes in the Cell Ontology ("enterocyte" on a
    colon panel: colonocyte), else of its closest ancestor in the table ("CD14-positive monocyte": monocyte). Genes
    are matched to ``var_names`` case-insensitively and kept in the table's order of markers; at most
    ``max_genes_per_type`` per type for canonical markers.
    """
    lookup = _panel_lookup(var_names)
    if markers is not None:
        user = _check_markers_arg(markers, fn)
        genes = {t: _on_panel(g, lookup) for t, g in user.items()}
        missing = [t for t, g in genes.items() if not g]
        dropped = {t: [g for g in gs if g.upper() not in lookup] for t, gs in user.items()}
        dropped = {t: gs for t, gs in dropped.items() if gs}
        if dropped:
            logger.info("%s: marker genes not on the panel, left out: %s", fn, dropped)
        return MarkerSets({t: g for t, g in genes.items() if g}, missing, "user")

    by_id, by_name = _canonical_tables()
    term_ids = _group_term_ids(adata, key, codes, len(groups))
    # labels that are neither a CL id's group nor a CL name ("Astro", "Endo", a combined label's parts): matched to
    # the Cell Ontology as scx.tl.add_ontology_ids would
    unnamed = []
    for group, term in zip(groups, term_ids, strict=True):
        parts = label_parts(group, sep)
        if term is None and str(group).lower() not in by_name:
            unnamed += [p for p in parts if p.lower() not in by_name and _id_of_name(p) is None]
    matched_ids = _match_labels(unnamed)
    found: dict[str, list[str]] = {}
    missing: list[str] = []
    related: dict[str, str] = {}
    matched: dict[str, str] = {}
    any_known = False

    def markers_of(label: str) -> tuple[list[str] | None, str | None]:
        """Canonical markers of a label by CL name, else by its matched CL id; and the label's CL id."""
        term = _id_of_name(label)
        if term is None and label in matched_ids:
            term = matched_ids[label]
            matched[label] = _ontology()[0].name(term)
        return by_name.get(label.lower(), by_id.get(term) if term is not None else None), term

    for group, term in zip(groups, term_ids, strict=True):
        known = by_id.get(term) if term is not None else None
        if known is None:
            known = by_name.get(str(group).lower())
        parts = label_parts(group, sep)
        if known is None and len(parts) > 1:  # a combined label: the markers of each part
            per_part = []
            for p in parts:
                genes, part_term = markers_of(p)
                any_known |= genes is not None or part_term is not None
                per_part.append(_on_panel(genes or [], lookup)[:max_genes_per_type])
            panel = list(dict.fromkeys(g for genes in per_part for g in genes))
        else:
            if known is None and term is None:
                known, term = markers_of(str(group))
            term = term if term is not None else _id_of_name(str(group))
            any_known |= known is not None or term is not None
            panel = _on_panel(known or [], lookup)[:max_genes_per_type]
            if not panel and term is not None:  # none on the panel: a more specific, else the closest broader type
                panel, source = _related_markers(term, by_id, lookup, max_genes_per_type)
                if panel:
                    related[group] = source
        if panel:
            found[group] = panel
        else:
            missing.append(group)
    if matched:
        logger.info(
            "%s: labels matched to Cell Ontology terms for their canonical markers: %s",
            fn,
            "; ".join(f"{g} -> {n}" for g, n in matched.items()),
        )
    if related:
        logger.info(
            "%s: markers of related types (none of the type's own is on the panel): %s",
            fn,
            "; ".join(f"{g} <- {s}" for g, s in related.items()),
        )
    return MarkerSets(found, missing, "canonical", related, matched, any_known)


def _match_labels(labels: Sequence[str]) -> dict[str, str]:
    """``{label: CL id}`` of the labels that :func:`spatialcx.tl.map_labels` matches (cluster numbers are skipped)."""
    from ..tl._ontology import _NUMBER_RE, map_labels

    labels = list(dict.fromkeys(str(label) for label in labels if not _NUMBER_RE.fullmatch(str(label).strip())))
    if not labels:
        return {}

    mapping = map_labels(labels).to_dict()
    return {label: term for label, term in mapping.items() if term != UNKNOWN_ONTOLOGY_ID and term in _ontology()[0]}


@functools.lru_cache(maxsize=1)
def _ontology() -> tuple[Any, dict[str, str]]:
    """The packaged Cell Ontology index and ``{lower-cased name: id}`` of its current terms."""
    from spatialcx.ontology import resolve_index

    index = resolve_index(None)
    return index, {index.name(t).lower(): t for t in reversed(index.term_ids)}


def _id_of_name(name: str) -> str | None:
    """The CL id whose name is ``name`` (case-insensitive), from the packaged ontology; ``None`` otherwise."""
    return _ontology()[1].get(name.lower())


def _related_markers(
    term: str, by_id: Mapping[str, list[str]], lookup: Mapping[str, str], max_genes: int | None
) -> tuple[list[str], str]:
    """Panel markers of the canonical types below ``term`` in the Cell Ontology, else of the closest one above it.

    A broad label ("enterocyte" on a colon panel) is checked with the markers of its subtypes in the table
    (colonocyte); a fine label without an entry ("CD14-positive monocyte") with those of its closest ancestor in the
    table (monocyte). Returns the genes and the CL names they come from.
    """
    index = _ontology()[0]
    if term not in index:
        return [], ""
    below = {t: _on_panel(by_id[t], lookup) for t in by_id if t != term and t in index and index.is_ancestor(term, t)}
    below = {t: genes for t, genes in below.items() if genes}
    if below:
        genes = list(dict.fromkeys(g for panel in below.values() for g in panel))
        return genes[:max_genes], ", ".join(index.name(t) for t in below)
    above = [t for t in index.ancestors(term) if t in by_id and _on_panel(by_id[t], lookup)]
    if not above:
        return [], ""
    closest = max(above, key=lambda t: len(index.ancestors(t)))  # the most specific ancestor with panel markers
    return _on_panel(by_id[closest], lookup)[:max_genes], index.name(closest)


def _columns(marker_sets: MarkerSets) -> tuple[list[str], list[str]]:
    """Gene columns grouped by type, each gene once (under the first type listing it), and each column's type."""
    genes: list[str] = []
    owners: list[str] = []
    seen: set[str] = set()
    for t, gs in marker_sets.genes.items():
        for g in gs:
            if g not in seen:
                seen.add(g)
                genes.append(g)
                owners.append(t)
    return genes, owners


def _runs(columns: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, width)`` of each run of consecutive column positions (``columns`` sorted)."""
    runs: list[tuple[int, int]] = []
    for j in columns:
        if runs and runs[-1][0] + runs[-1][1] == j:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((j, 1))
    return runs


def _no_markers_text(marker_sets: MarkerSets) -> list[str]:
    """Notes naming the types without markers, and those shown with a related type's (empty when there are none)."""
    notes = []
    if marker_sets.related:
        notes.append(
            "markers of a related type (none of its own on the panel): "
            + "; ".join(f"{t}: {names}" for t, names in marker_sets.related.items())
        )
    if marker_sets.matched:
        notes.append(
            "labels read as Cell Ontology terms: " + "; ".join(f"{t} = {n}" for t, n in marker_sets.matched.items())
        )
    if marker_sets.missing:
        canonical = marker_sets.source == "canonical"
        what = "no canonical markers on the panel" if canonical else "no given markers on the panel"
        notes.append(f"{what}: " + ", ".join(marker_sets.missing))
    return notes


def wrap_notes(notes: Sequence[str], width_in: float, fontsize: float) -> str:
    """Join ``notes`` into lines that fit ``width_in`` inches at ``fontsize`` (names are never split)."""
    chars = max(30, int(width_in * 72 / (fontsize * 0.55)))
    return "\n".join(textwrap.fill(n, width=chars, break_on_hyphens=False, break_long_words=False) for n in notes if n)


# --------------------------------------------------------------------------------------------------------------------
# Chunked expression statistics
# --------------------------------------------------------------------------------------------------------------------


def _expression_blocks(adata: AnnData, genes: Sequence[str], chunk_size: int | None, desc: str):
    """Yield ``(start, stop, csr)``: log1p(10k) of ``genes`` (library size over all genes), a block of cells at once."""
    from .._matrix import default_chunk_size, gene_indices, iter_row_blocks, normalize_block
    from ..pp._normalization import find_expression_source

    src = find_expression_source(adata)
    cols = gene_indices(src.var_names, list(genes))
    chunk = default_chunk_size(src.matrix.shape[1], chunk_size)
    n_blocks = -(-src.matrix.shape[0] // chunk)
    for start, stop, block in progress(iter_row_blocks(src.matrix, chunk), total=n_blocks, desc=desc):
        yield start, stop, normalize_block(block, cols, kind=src.kind, over="all")


def expression_source_genes(adata: AnnData) -> pd.Index:
    """Gene names of the matrix expression is computed from (``raw.var_names`` when the counts are in ``raw``)."""
    from ..pp._normalization import find_expression_source

    return find_expression_source(adata).var_names


def group_expression_stats(
    adata: AnnData, codes: np.ndarray, n_groups: int, genes: Sequence[str], *, chunk_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean log1p(10k) expression and fraction of cells expressing, computed block by block.

    Parameters
    ----------
    adata
        The table.
    codes
        Group of each cell (0 to ``n_groups - 1``), -1 for cells left out.
    n_groups
        Number of groups.
    genes
        Genes of the expression source.
    chunk_size
        Cells per block; memory is O(``chunk_size`` x ``len(genes)``).

    Returns
    -------
    ``(means, fractions)``, both ``n_groups x len(genes)`` float64.
    """
    sums = np.zeros((n_groups, len(genes)))
    expressing = np.zeros((n_groups, len(genes)))
    for start, stop, x in _expression_blocks(adata, genes, chunk_size, "marker expression"):
        c = codes[start:stop]
        rows = np.flatnonzero(c >= 0)
        if rows.size == 0:
            continue
        member = sparse.csr_matrix((np.ones(rows.size), (c[rows], rows)), shape=(n_groups, stop - start))
        sums += np.asarray((member @ x).todense())
        nonzero = x.copy()
        nonzero.data = (nonzero.data > 0).astype(np.float64)
        expressing += np.asarray((member @ nonzero).todense())
    n = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, sums / n, np.nan), np.where(n > 0, expressing / n, np.nan)


def cell_marker_scores(
    adata: AnnData, codes: np.ndarray, marker_genes: Sequence[Sequence[str]], *, chunk_size: int | None = None
) -> np.ndarray:
    """Each cell's mean log1p(10k) expression of the markers of its own group, computed block by block.

    Parameters
    ----------
    adata
        The table.
    codes
        Group of each cell, -1 for none.
    marker_genes
        Genes of each group (an empty list for a group without markers).
    chunk_size
        Cells per block.

    Returns
    -------
    One float per cell; NaN for cells of no group or of a group without markers.
    """
    genes = list(dict.fromkeys(g for gs in marker_genes for g in gs))
    out = np.full(len(codes), np.nan)
    if not genes:
        return out
    position = {g: i for i, g in enumerate(genes)}
    weights = np.zeros((len(genes), len(marker_genes)))
    for k, gs in enumerate(marker_genes):
        for g in dict.fromkeys(gs):
            weights[position[g], k] = 1.0 / len(set(gs))
    has_markers = np.array([len(gs) > 0 for gs in marker_genes] + [False])
    for start, stop, x in _expression_blocks(adata, genes, chunk_size, "marker scores"):
        c = codes[start:stop]
        scores = np.asarray(x @ weights)
        ok = (c >= 0) & has_markers[c]
        out[start:stop][ok] = scores[np.flatnonzero(ok), c[ok]]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------------------------------


def draw_group_header(ax: Axes, owners: Sequence[str], *, fontsize: float = 8) -> list[tuple[str, int, int]]:
    """Brackets over consecutive columns of the same type, with the type's name above, in a header axes.

    The header shares its x axis with the plot below; brackets and labels are placed in points from the header's
    bottom edge, so they sit just above the plot whatever the header's height.

    Returns the spans ``(type, first column, last column)``.
    """
    from matplotlib.lines import TICKDOWN
    from matplotlib.transforms import blended_transform_factory, offset_copy

    spans: list[tuple[str, int, int]] = []
    for j, owner in enumerate(owners):
        if spans and spans[-1][0] == owner and spans[-1][2] == j - 1:
            spans[-1] = (owner, spans[-1][1], j)
        else:
            spans.append((owner, j, j))
    base = blended_transform_factory(ax.transData, ax.transAxes)
    bracket = offset_copy(base, fig=ax.figure, y=BRACKET_PT, units="points")
    for owner, a, b in spans:
        ax.plot(
            [a - 0.4, b + 0.4],
            [0, 0],
            transform=bracket,
            color="black",
            lw=0.9,
            marker=TICKDOWN,
            markersize=BRACKET_PT - 1,
            clip_on=False,
        )
        ax.annotate(
            owner,
            xy=((a + b) / 2, 0),
            xycoords=base,
            xytext=(0, BRACKET_PT + 3),
            textcoords="offset points",
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=fontsize,
            gid="group_label",
            annotation_clip=False,
        )
    ax.set_ylim(0, 1)
    ax.axis("off")
    return spans


#: Height of the brackets over column groups, in points.
BRACKET_PT = 6


def fit_text(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped at spaces into lines no wider than ``width_in`` inches at ``fontsize`` (measured, not guessed).

    Existing line breaks are kept; a single word wider than the width stays whole.
    """
    lines: list[str] = []
    for para in str(text).split("\n"):
        wide = text_inches([para], fontsize)
        if wide <= width_in or " " not in para.strip():
            lines.append(para)
            continue
        chars = max(10, int(len(para) * width_in / wide))
        lines.extend(textwrap.wrap(para, width=chars, break_on_hyphens=False, break_long_words=False) or [""])
    return "\n".join(lines)


def text_inches(labels: Sequence[str], fontsize: float) -> float:
    """Width, in inches, of the longest of ``labels`` drawn at ``fontsize`` in the default font."""
    if not labels:
        return 0.0
    longest = sorted(map(str, labels), key=len)[-5:]
    try:  # the font's advance widths: as exact as the glyph outlines' extents and ~50 times faster to get
        from matplotlib.font_manager import FontProperties
        from matplotlib.textpath import TextToPath

        prop, measure = FontProperties(size=fontsize), TextToPath()
        return max(measure.get_text_width_height_descent(s, prop, ismath=False)[0] for s in longest) / 72
    except Exception:  # noqa: BLE001 - an estimate is good enough for a layout
        return max(map(len, longest)) * fontsize * 0.5 / 72


def _header_height(labels: Sequence[str], fontsize: float = 8) -> float:
    """Inches needed above a plot by rotated group labels and their brackets."""
    return float(np.clip(text_inches(labels, fontsize) + (BRACKET_PT + 8) / 72, 0.4, 3.5))


def _label_width(labels: Sequence[str], fontsize: float = 9) -> float:
    """Inches taken by tick labels (the longest of ``labels``) beside a plot."""
    return float(np.clip(text_inches(labels, fontsize) + 0.5, 0.8, 5.0))


# --------------------------------------------------------------------------------------------------------------------
# marker_dotplot
# --------------------------------------------------------------------------------------------------------------------


def marker_dotplot(
    data: AnnData | SpatialData,
    *,
    key: str = "cell_type",
    markers: Mapping[str, Sequence[str]] | str | os.PathLike[str] | pd.DataFrame | None = None,
    groupby: str | None = None,
    max_genes_per_type: int = 5,
    max_types: int = 60,
    min_cells: int = 10,
    table_key: str = "table",
    chunk_size: int | None = None,
    cmap: str = "Reds",
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    dpi: int = 150,
    show: bool = False,
) -> Figure:
    """Dot plot of marker genes (columns, grouped by the type they mark) across predicted cell types (rows).

    A dot's size is the fraction of the type's cells with at least one count of the gene; its colour the mean
    log1p(10k) expression, scaled per gene from 0 (lowest type) to 1 (highest type). The cells where a type meets
    its own markers are shaded, so a good annotation reads as a staircase of large dark dots. Expression comes from
    the raw counts, normalized a block of cells at a time, so the plot works on tables of millions of cells with
    memory bounded by ``chunk_size``.

    Parameters
    ----------
    data
        AnnData table or SpatialData object holding it.
    key
        obs column with the cell-type labels (written by :func:`spatialcx.tl.annotate`). Its CL ids
        (``{key}_ontology_term_id``) select the canonical markers.
    markers
        Marker sets to show instead of the canonical markers, in any form :func:`spatialcx.tl.score_signatures`
        reads: a dict ``{cell type: [genes]}``, the path of a YAML / JSON file holding one, a table (a DataFrame, or
        the path of a CSV / TSV file) either long (a ``cell_type`` and a ``gene`` column) or wide (one column of genes
        per type), values that are dicts with a ``"genes"`` list or strings of comma-separated genes. Blanks, missing
        values (NaN, None) and repeats are skipped; a set of genes is taken in alphabetical order. All of each set's
        panel genes are shown, in the given order; genes are matched to the panel case-insensitively. A type with no
        gene (an empty list) is named as a type without markers.
    groupby
        obs column whose groups are the rows; default ``key``. ``"Unassigned"`` cells (and those of the
        ``unassigned`` label that :func:`spatialcx.tl.annotate_domains` recorded for ``groupby``) are left out and
        counted in a note. With the canonical markers, each group's markers are those of its cells' most common CL id
        in ``{key}_ontology_term_id``, else of the CL name equal to the group's label, else, for a combined label of
        :func:`spatialcx.tl.annotate_domains` (``"B cell/T cell"``), of each of its parts, else of the Cell Ontology
        term that :func:`spatialcx.tl.map_labels` finds for the label (``"Astro"``: astrocyte; named in a note). A
        type without markers of its own on the panel shows those of its subtypes in the Cell Ontology, else of its
        closest ancestor in the marker table (logged).
    max_genes_per_type
        Most canonical markers shown per type (the first ones on the panel, in the order of the marker table).
    max_types
        Most groups (rows): the largest ones, in the order of the column's categories. The others are left out
        (with their canonical markers), counted in a note and named in a logged warning; hundreds of fine clusters
        would make an unreadable figure.
    min_cells
        Groups with fewer cells are not shown (they are named in the title).
    table_key
        Name of the table in ``data.tables`` (SpatialData only).
    chunk_size
        Cells normalized at once; ``None`` uses ``scx.settings.chunk_size``.
    cmap
        Colormap of the scaled mean expression.
    title
        Figure title; default names the label column and lists the types without markers.
    save
        Write the figure there (format from the suffix, e.g. ``.png`` or ``.pdf``); parent folders are created.
    dpi
        Resolution of the saved figure.
    show
        Also leave the figure open in pyplot (for a loop or :func:`matplotlib.pyplot.show`); by default it is closed
        in pyplot and returned, which a notebook shows once, as the cell's result.

    Returns
    -------
    The figure. Its axes are the dots (rows: groups, columns: genes; dots are one scatter whose offsets are
    ``(column, row)``), the type header above, the colourbar and the size legend.

    Raises
    ------
    KeyError
        ``key`` or ``groupby`` is not an obs column, or ``table_key`` is not a table.
    ValueError
        No group has ``min_cells`` cells, no group names a cell type of the canonical table (e.g. cluster numbers),
        no marker gene of any type is on the panel, or ``markers`` is empty or names two sets alike.
    TypeError
        ``markers`` is not a dict of gene lists, a marker file or a marker table.
    FileNotFoundError
        ``markers`` is a path and no such file exists.

    Examples
    --------
    >>> fig = scx.pl.marker_dotplot(sdata, save="plots/markers.png")  # doctest: +SKIP
    >>> fig = scx.pl.marker_dotplot(adata, markers={"B cell": ["MS4A1", "CD79A"], "T cell": ["CD3E"]})  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    fn = "marker_dotplot"
    show = _utils.check_show(show, fn)
    adata, _ = _utils.split_data(data, table_key)
    column = key if groupby is None else groupby
    check_label_column(adata, column, fn=fn, what="cell-type labels" if groupby is None else "groups")
    if groupby is not None and key not in adata.obs.columns:
        logger.info("%s: obs has no %r column; canonical markers are looked up by group name.", fn, key)
    min_cells = check_positive_int(min_cells, "min_cells", fn=fn)
    max_genes_per_type = check_positive_int(max_genes_per_type, "max_genes_per_type", fn=fn)
    max_types = check_positive_int(max_types, "max_types", fn=fn)

    exclude = _unassigned_labels(adata, key, column)
    labels = obs_column(adata, column)
    groups, codes, sizes, too_small = group_codes(labels, min_cells=min_cells, exclude=exclude)
    if not groups:
        raise ValueError(
            f"{fn}: no group of obs[{column!r}] has at least min_cells={min_cells} cells (besides "
            f"{', '.join(map(repr, exclude))}); groups found: {name_counts(too_small) or 'none'}. Lower min_cells or "
            "check the labels."
        )
    groups, codes, sizes, n_left_out = largest_groups(groups, codes, sizes, max_types, fn=fn)
    n_unassigned, n_unlabelled = int(labels.isin(exclude).sum()), int(labels.isna().sum())
    panel = expression_source_genes(adata)
    sep = combined_label_sep(adata, column)
    marker_sets = resolve_markers(
        adata, panel, groups, codes, key=key, markers=markers, max_genes_per_type=max_genes_per_type, fn=fn, sep=sep
    )
    genes, owners = _columns(marker_sets)
    if not genes and not marker_sets.known:
        shown = ", ".join(map(repr, groups[:8])) + (", ..." if len(groups) > 8 else "")
        raise ValueError(
            f"{fn}: none of the {len(groups)} groups of obs[{column!r}] ({shown}) names a cell type of the canonical "
            f"marker table: they have no CL id in obs[{key + ONTOLOGY_ID_SUFFIX!r}], are not Cell Ontology names, "
            "and the Cell Ontology matcher recognises none of them. Name the groups first (cluster numbers: "
            "scx.tl.score_signatures + scx.tl.annotate_domains; free-text labels: scx.tl.add_ontology_ids), or pass "
            "markers={type: [panel genes]}."
        )
    if not genes:
        where = "the given types" if markers is not None else f"any of the {len(groups)} types"
        raise ValueError(
            f"{fn}: no marker gene of {where} is on the panel ({len(panel)} genes, e.g. {list(panel[:5])}), so there "
            "is nothing to plot. Pass markers={type: [panel genes]}; canonical markers are gene symbols, so a panel "
            "named by Ensembl ids needs symbols as var_names."
        )
    means, fractions = group_expression_stats(adata, codes, len(groups), genes, chunk_size=chunk_size)
    low, high = means.min(axis=0), means.max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(high > low, (means - low) / (high - low), 0.0)

    # ---- figure ----
    n_rows, n_cols = len(groups), len(genes)
    row_labels = [f"{g} ({n:,})" for g, n in zip(groups, sizes, strict=True)]
    header_h = _header_height(owners)
    gene_h = text_inches(genes, 9) + 0.2
    dots_w, dots_h = max(0.3 * n_cols, 1.5), max(0.3 * n_rows, 1.2)
    left_w, legend_w = _label_width(row_labels), 1.5
    fig_w = max(left_w + dots_w + legend_w + 0.4, 6.0)
    notes = _no_markers_text(marker_sets)
    if n_left_out:
        notes.append(f"{n_left_out} smaller groups not shown (max_types={max_types})")
    if too_small:
        notes.append(f"fewer than {min_cells} cells, not shown: {name_counts(too_small)}")
    if n_unassigned:
        notes.append(f"{n_unassigned:,} {' / '.join(map(repr, exclude))} cells not shown")
    if n_unlabelled:
        notes.append(f"{n_unlabelled:,} cells without a label (NaN) not shown")
    note = wrap_notes(notes, dots_w + legend_w, 8)
    if title is None:
        title = f"Marker genes per type in obs[{column!r}]" + (
            " (canonical markers on the panel)" if marker_sets.source == "canonical" else ""
        )
    title = fit_text(title, fig_w - 0.3, 11)  # wrapped to the figure's width: a long title is never cut off
    title_h = 0.25 + 0.2 * (title.count("\n") + 1) + (0.16 * (note.count("\n") + 1) if note else 0.0)
    fig_h = title_h + header_h + dots_h + gene_h + 0.2
    fig = plt.figure(figsize=(fig_w, max(fig_h, 3.5)), layout="constrained")
    try:
        grid = fig.add_gridspec(2, 2, height_ratios=[header_h, dots_h], width_ratios=[dots_w, legend_w], hspace=0.0)
        ax = fig.add_subplot(grid[1, 0])
        header = fig.add_subplot(grid[0, 0], sharex=ax)
        side = grid[1, 1].subgridspec(2, 1, height_ratios=[1, 1.3])
        cax = fig.add_subplot(side[0])
        sax = fig.add_subplot(side[1])

        # shade each type's own markers (for a combined label "A/B", the markers of A and of B)
        for i, g in enumerate(groups):
            own = set(marker_sets.genes.get(g, []))
            for part in label_parts(g, sep) if not own else []:
                own.update(marker_sets.genes.get(part, []))
            for start, width in _runs([j for j, gene in enumerate(genes) if gene in own]):
                ax.add_patch(
                    Rectangle((start - 0.5, i - 0.5), width, 1, facecolor="#e8eef7", edgecolor="none", zorder=0)
                )
        xx, yy = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
        norm = Normalize(0, 1)
        dots = ax.scatter(
            xx.ravel(),
            yy.ravel(),
            s=fractions.ravel() * DOT_MAX_AREA,
            c=scaled.ravel(),
            cmap=cmap,
            norm=norm,
            edgecolors="#555555",
            linewidths=0.4,
            zorder=2,
            gid="dots",
        )
        ax.set_xlim(-0.6, n_cols - 0.4)
        ax.set_ylim(n_rows - 0.4, -0.6)
        ax.set_xticks(np.arange(n_cols), genes, rotation=90, fontsize=9)
        ax.set_yticks(np.arange(n_rows), row_labels, fontsize=9)
        ax.set_ylabel(f"{column} (cells)")
        ax.tick_params(length=2)
        ax.grid(False)
        ax.set_axisbelow(True)
        draw_group_header(header, owners)
        header.tick_params(labelbottom=False)

        cbar = fig.colorbar(dots, cax=cax)
        cbar.set_label("mean log1p(10k)\nscaled per gene", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        cax.set_box_aspect(4)
        shares = [0.2, 0.4, 0.6, 0.8, 1.0]
        sax.scatter(
            np.zeros(len(shares)),
            np.arange(len(shares)),
            s=np.array(shares) * DOT_MAX_AREA,
            color="#9e9e9e",
            edgecolors="#555555",
            linewidths=0.4,
        )
        for k, share in enumerate(shares):
            sax.text(0.6, k, f"{share:.0%}", va="center", fontsize=8)
        sax.set_xlim(-0.8, 2.2)
        sax.set_ylim(-0.8, len(shares) - 0.2)
        sax.set_title("cells expressing", fontsize=8)
        sax.axis("off")

        fig.suptitle(title, fontsize=11)
        if note:
            header.set_title(note, fontsize=8, color="#c62828", loc="left", gid="notes")
        if save is not None:
            _utils.save_figure(fig, save, dpi=dpi)
    except BaseException:
        plt.close(fig)
        raise
    return _utils.hand_over(fig, show)


# --------------------------------------------------------------------------------------------------------------------
# validation_2d
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TypeValidation:
    """Marker evidence of one predicted type (what one panel of :func:`validation_2d` shows)."""

    name: str
    n_cells: int
    markers: list[str]
    spearman: float
    share_confident_without_markers: float
    share_below_threshold: float


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


def validation_2d(
    data: AnnData | SpatialData,
    *,
    key: str = "cell_type",
    markers: Mapping[str, Sequence[str]] | str | os.PathLike[str] | pd.DataFrame | None = None,
    threshold: float | None = None,
    confidence_key: str | None = None,
    table_key: str = "table",
    max_types: int = 16,
    min_cells: int = 10,
    max_genes_per_type: int = 5,
    min_marker_score: float = 0.0,
    max_points_per_type: int = 2000,
    chunk_size: int | None = None,
    random_state: int = 0,
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    dpi: int = 150,
    show: bool = False,
) -> Figure:
    """Check the calls against marker evidence: each cell's marker score for its predicted type vs its confidence.

    One panel per predicted type (the ``max_types`` largest, largest first). x: the cell's mean log1p(10k)
    expression of the type's markers (canonical markers of its CL id on the panel, or ``markers``); y: the cell's
    confidence, with the threshold as a line. Each panel's title gives the Spearman correlation of the two and the
    share of the type's cells that are confident (at or above the threshold) but express none of the markers
    (score ``<= min_marker_score``, drawn red): calls the markers do not back. Cells below the threshold are grey.
    Cells are grouped by the prediction before filtering (``{key}_predicted``), so filtered cells stay with their
    type.

    Parameters
    ----------
    data
        AnnData table or SpatialData object holding it.
    key
        Label column written by :func:`spatialcx.tl.annotate` / :func:`spatialcx.tl.predict`.
    markers
        Marker sets instead of the canonical markers, in any form :func:`spatialcx.tl.score_signatures` reads (a dict
        ``{cell type: [genes]}``, a YAML / JSON / CSV / TSV file, a DataFrame; see :func:`marker_dotplot`); types
        not in it, or with no gene on the panel, are listed as without markers.
    threshold
        Confidence threshold; ``None`` uses ``uns[key]["confidence_threshold"]`` (else 0.8).
    confidence_key
        obs column with the confidence; default ``{key}_confidence``.
    table_key
        Name of the table in ``data.tables`` (SpatialData only).
    max_types
        Most panels (the largest types).
    min_cells
        Types with fewer cells get no panel.
    max_genes_per_type
        Most canonical markers per type (the first ones on the panel).
    min_marker_score
        Cells whose score is at most this count as expressing no marker (default: no count of any marker).
    max_points_per_type
        Most cells drawn per panel (a seeded random subset); the statistics use every cell.
    chunk_size
        Cells normalized at once; ``None`` uses ``scx.settings.chunk_size``.
    random_state
        Seed of the subset drawn.
    title
        Figure title; default names the label column, and says when its classes are shown by their Cell Ontology
        names (``uns[key]["names"]``, as in ``obs[key]``).
    save
        Write the figure there (format from the suffix); parent folders are created.
    dpi
        Resolution of the saved figure.
    show
        Also leave the figure open in pyplot (for a loop or :func:`matplotlib.pyplot.show`); by default it is closed
        in pyplot and returned, which a notebook shows once, as the cell's result.

    Returns
    -------
    The figure, one axes per type, largest type first (unused grid cells removed); each panel's cells are its
    first collection and the threshold its dashed line.

    Raises
    ------
    KeyError
        ``key`` or the confidence column is missing.
    ValueError
        No type has ``min_cells`` cells, no type has a marker on the panel, or a bad argument (e.g. two marker sets
        of the same name).
    TypeError
        ``markers`` is not a dict of gene lists, a marker file or a marker table.
    FileNotFoundError
        ``markers`` is a path and no such file exists.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fn = "validation_2d"
    show = _utils.check_show(show, fn)
    adata, _ = _utils.split_data(data, table_key)
    check_label_column(adata, key, fn=fn)
    confidence_key = f"{key}{CONFIDENCE_SUFFIX}" if confidence_key is None else confidence_key
    check_label_column(adata, confidence_key, fn=fn, what="confidence")
    raw_conf = obs_column(adata, confidence_key)
    if not (pd.api.types.is_numeric_dtype(raw_conf) and not pd.api.types.is_bool_dtype(raw_conf)):
        raise TypeError(f"{fn}: obs[{confidence_key!r}] must hold numbers in [0, 1], found dtype {raw_conf.dtype}.")
    threshold = resolve_threshold(adata, key, threshold, fn=fn)
    max_types = check_positive_int(max_types, "max_types", fn=fn)
    min_cells = check_positive_int(min_cells, "min_cells", fn=fn)
    max_genes_per_type = check_positive_int(max_genes_per_type, "max_genes_per_type", fn=fn)
    max_points_per_type = check_positive_int(max_points_per_type, "max_points_per_type", fn=fn)
    if isinstance(min_marker_score, bool) or not isinstance(min_marker_score, Real) or min_marker_score < 0:
        raise ValueError(f"{fn}: min_marker_score must be a number >= 0, got {min_marker_score!r}.")

    labels, label_key = predicted_labels(adata, key)
    # The predicted classes are shown by their final names (Cell Ontology names, see predicted_labels): say so.
    shown_by_names = label_key != key and set(map(str, as_categorical(labels).categories)) != set(
        map(str, as_categorical(obs_column(adata, label_key)).categories)
    )
    renamed = ", shown by Cell Ontology name" if shown_by_names else ""
    conf = raw_conf.to_numpy(dtype=float, na_value=np.nan)
    groups, codes, sizes, too_small = group_codes(labels, min_cells=min_cells, exclude=(unassigned_label(adata, key),))
    if not groups:
        raise ValueError(
            f"{fn}: no type in obs[{label_key!r}] has at least min_cells={min_cells} cells; types found: "
            f"{name_counts(too_small) or 'none'}. Lower min_cells."
        )
    panel = expression_source_genes(adata)
    marker_sets = resolve_markers(
        adata, panel, groups, codes, key=key, markers=markers, max_genes_per_type=max_genes_per_type, fn=fn
    )
    if markers is not None:
        missing = [g for g in groups if g not in marker_sets.genes]
        marker_sets = MarkerSets({g: marker_sets.genes[g] for g in groups if g in marker_sets.genes}, missing, "user")
    with_markers = [g for g in groups if g in marker_sets.genes]
    if not with_markers:
        raise ValueError(
            f"{fn}: none of the {len(groups)} predicted types has a marker gene on the panel "
            f"({', '.join(groups[:8])}{', ...' if len(groups) > 8 else ''}), so marker evidence cannot be shown. "
            "Pass markers={type: [panel genes]}."
        )
    order = sorted(with_markers, key=lambda g: (-int(sizes[groups.index(g)]), groups.index(g)))
    shown = order[:max_types]
    scores = cell_marker_scores(adata, codes, [marker_sets.genes.get(g, []) for g in groups], chunk_size=chunk_size)

    rng = np.random.default_rng(random_state)
    stats: list[TypeValidation] = []
    n = len(shown)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    longest = max(len(g) for g in shown)
    panel_w = max(float(np.clip(0.075 * longest + 0.6, 3.0, 4.2)), 7.0 / ncols)
    fig_w = panel_w * ncols
    notes = _no_markers_text(marker_sets)
    if len(order) > max_types:
        notes.append(f"{len(order) - max_types} smaller types not shown (max_types={max_types})")
    if too_small:
        notes.append(f"fewer than {min_cells} cells: " + name_counts(too_small))
    note = wrap_notes(notes, fig_w, 9)
    if title is None:
        title = wrap_notes(
            [f"Marker evidence vs confidence per predicted type (obs[{label_key!r}]{renamed})"], fig_w, 10
        )
    fig_h = 3.0 * nrows + 1.0 + 0.17 * title.count("\n") + (0.16 * (note.count("\n") + 1) if note else 0.0)
    fig = plt.figure(figsize=(fig_w, fig_h), layout="constrained")
    try:
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for ax in axes.ravel()[n:]:
            ax.remove()
        for ax, g in zip(axes.ravel(), shown, strict=False):
            members = np.flatnonzero(codes == groups.index(g))
            x, y = scores[members], conf[members]
            confident = y >= threshold
            silent = confident & (x <= min_marker_score)
            stat = TypeValidation(
                name=g,
                n_cells=int(members.size),
                markers=list(marker_sets.genes[g]),
                spearman=_spearman(x, y),
                share_confident_without_markers=float(silent.mean()),
                share_below_threshold=float(np.mean(~confident)),
            )
            stats.append(stat)
            drawn = np.arange(members.size)
            if drawn.size > max_points_per_type:
                drawn = np.sort(rng.choice(drawn, size=max_points_per_type, replace=False))
            colour = np.where(~confident[drawn], LOW_COLOR, np.where(silent[drawn], NO_MARKER_COLOR, BACKED_COLOR))
            ax.scatter(x[drawn], y[drawn], c=colour, s=7, alpha=0.6, linewidths=0, rasterized=True, gid="cells")
            ax.axhline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.1, gid="threshold")
            rho = "n/a" if np.isnan(stat.spearman) else f"{stat.spearman:.2f}"
            name = textwrap.shorten(g, width=int(panel_w * 11), placeholder="…")
            ax.set_title(f"{name} ({stat.n_cells:,} cells)", fontsize=9, pad=14)
            ax.text(
                0.5,
                1.01,
                f"Spearman ρ = {rho} · confident w/o markers {stat.share_confident_without_markers:.1%}",
                transform=ax.transAxes,
                ha="center",
                va="bottom",
                fontsize=7.5,
                color="#424242",
                gid="stats",
            )
            marker_text = textwrap.shorten(", ".join(stat.markers), width=int(panel_w * 13), placeholder=" …")
            ax.set_xlabel(f"mean log1p of {marker_text}", fontsize=7.5)
            xmax = float(np.nanmax(x)) if np.isfinite(x).any() else 0.0
            xmax = xmax if xmax > 0 else 1.0  # no marker count in any cell: a plain 0-1 axis, not 0-0.001
            ax.set_xlim(-0.04 * xmax, xmax * 1.04)
            ax.set_ylim(-0.03, 1.03)
            ax.tick_params(labelsize=7)
        for ax in axes[:, 0]:
            ax.set_ylabel(confidence_key, fontsize=8)

        handles = [
            Line2D([], [], marker="o", ls="", color=BACKED_COLOR, label="confident, markers expressed"),
            Line2D([], [], marker="o", ls="", color=NO_MARKER_COLOR, label="confident, no marker counts"),
            Line2D([], [], marker="o", ls="", color=LOW_COLOR, label="below threshold"),
            Line2D([], [], ls="--", color=THRESHOLD_COLOR, label=f"threshold {threshold:g}"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=4 if fig_w >= 9 else 2, fontsize=8, frameon=False)
        fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=9.5 if note else 10)
        if save is not None:
            _utils.save_figure(fig, save, dpi=dpi)
    except BaseException:
        plt.close(fig)
        raise
    return _utils.hand_over(fig, show)
