"""Cell Ontology ids for free-text labels: :func:`map_labels`, :func:`add_ontology_ids`, :class:`OntologyMapping`.

Matching is offline: the Cell Ontology comes from ``cellxgene-ontology-guide`` and is cached on first use (see
``spatialcx.ontology``); how labels are matched, tier by tier, is described in ``docs/ontology.md``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from spatialcx._constants import ONTOLOGY_ID_SUFFIX, ONTOLOGY_SUFFIX, UNKNOWN_ONTOLOGY_ID
from spatialcx._settings import logger

if TYPE_CHECKING:
    from collections.abc import Iterable

    from anndata import AnnData
    from spatialdata import SpatialData

    from spatialcx.ontology import OntologyIndex

#: Matches scoring below this are reported as ``unknown``.
DEFAULT_MIN_SCORE = 0.5
TABLE_COLUMNS = ("input_label", "ontology_term_id", "ontology_label", "tier", "score", "matched", "note")
TIER_NAMES = {-1: "unmapped", 0: "pattern", 1: "exact", 2: "token", 3: "similarity"}


@dataclass
class OntologyMapping:
    """The result of mapping labels to the Cell Ontology.

    Attributes
    ----------
    table
        One row per distinct input label: ``input_label``, ``ontology_term_id`` (a CL id or ``"unknown"``),
        ``ontology_label`` (the CL name or ``"unknown"``), ``tier`` (0 pattern table or user index, 1 exact, 2 tokens,
        3 similarity, -1 unmapped), ``score`` (0-1), ``matched`` (the ontology name that matched) and ``note`` (how
        the match was found, e.g. "fell back to parent term", or why there is none).
    ontology_version
        The Cell Ontology release used.
    min_score
        Matches scoring below it were turned into ``unknown``.
    data
        The copy made by :func:`add_ontology_ids` with ``copy=True`` (AnnData or SpatialData), else ``None``.
    """

    table: pd.DataFrame
    ontology_version: str
    min_score: float
    data: AnnData | SpatialData | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        n = len(self.table)
        mapped = n - len(self.unmapped)
        return (
            f"OntologyMapping({n} labels: {mapped} mapped, {n - mapped} unknown, {len(self.collisions)} CL ids shared "
            f"by several labels; Cell Ontology {self.ontology_version}, min_score={self.min_score})"
        )

    @property
    def unmapped(self) -> list[str]:
        """Input labels that map to ``unknown``."""
        t = self.table
        return t.loc[t["ontology_term_id"] == UNKNOWN_ONTOLOGY_ID, "input_label"].tolist()

    @property
    def collisions(self) -> dict[str, list[str]]:
        """``{CL id: [labels]}`` for the CL ids that two or more distinct input labels map to."""
        t = self.table[self.table["ontology_term_id"] != UNKNOWN_ONTOLOGY_ID]
        groups = t.groupby("ontology_term_id", sort=True)["input_label"].agg(list)
        return {str(k): [str(x) for x in v] for k, v in groups.items() if len(v) > 1}

    def to_dict(self) -> dict[str, str]:
        """``{input label: CL id or "unknown"}``."""
        return dict(zip(self.table["input_label"], self.table["ontology_term_id"], strict=True))

    def names(self) -> dict[str, str]:
        """``{input label: CL name or "unknown"}``."""
        return dict(zip(self.table["input_label"], self.table["ontology_label"], strict=True))

    def summary(self) -> dict[str, Any]:
        """A summary made of str/int/float/lists/dicts only, fit for ``.uns`` (h5ad and zarr round-trip)."""
        t = self.table
        collisions = self.collisions
        return {
            "ontology": "CL",
            "ontology_version": str(self.ontology_version),
            "min_score": float(self.min_score),
            "n_labels": int(len(t)),
            "n_mapped": int(len(t) - len(self.unmapped)),
            "unmapped": [str(x) for x in self.unmapped],
            "collisions": {
                "ontology_term_id": list(collisions),
                "input_labels": [" | ".join(v) for v in collisions.values()],
            },
            "mapping": {
                "input_label": [str(x) for x in t["input_label"]],
                "ontology_term_id": [str(x) for x in t["ontology_term_id"]],
                "ontology_label": [str(x) for x in t["ontology_label"]],
                "tier": [int(x) for x in t["tier"]],
                "score": [float(x) for x in t["score"]],
                "note": [str(x) for x in t["note"]],
            },
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table: ``.csv``, ``.tsv`` or ``.json`` (the JSON also holds the summary: unmapped, collisions).

        Parameters
        ----------
        path
            The file; its suffix chooses the format (``.csv``, ``.tsv`` or ``.json``).

        Returns
        -------
        The path written.
        """
        p = Path(path).expanduser()
        suffix = p.suffix.lower()
        if suffix not in (".csv", ".tsv", ".json"):
            raise ValueError(
                f"Cannot save an ontology mapping as {str(p)!r}: the suffix {suffix!r} is not supported. Use .csv, "
                ".tsv or .json."
            )
        p.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".json":
            payload = self.summary()
            payload["table"] = json.loads(self.table.to_json(orient="records"))
            p.write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
        else:
            self.table.to_csv(p, sep="," if suffix == ".csv" else "\t", index=False)
        return p


_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")


def _distinct_labels(labels: Iterable[Any]) -> list[str]:
    if isinstance(labels, str | bytes):
        raise TypeError(
            f"labels must be a list of labels, got the string {labels!r}: wrap a single label in a list, e.g. "
            f"map_labels([{labels!r}])."
        )
    if isinstance(labels, np.ndarray) and labels.ndim != 1:
        raise ValueError(
            f"labels must be one-dimensional (one label per entry), got an array of shape {labels.shape}: pass a "
            "column, e.g. labels[:, 0], or labels.ravel()."
        )
    if isinstance(labels, pd.DataFrame):
        raise TypeError(
            "labels must be a list, array, Series or Categorical of labels, got a DataFrame: pass a column."
        )
    if isinstance(labels, pd.Categorical | pd.Series | pd.Index | np.ndarray):
        values = pd.Series(np.asarray(labels, dtype=object))
    else:
        try:
            values = pd.Series(list(labels), dtype=object)
        except TypeError:
            raise TypeError(f"labels must be an iterable of labels, got {type(labels).__name__}.") from None
    values = values[values.notna()]
    return list(dict.fromkeys(str(v) for v in values))


def _check_min_score(min_score: float | None) -> float:
    if min_score is None:
        return DEFAULT_MIN_SCORE
    try:
        value = float(min_score)
    except (TypeError, ValueError):
        raise TypeError(f"min_score must be a number in [0, 1], got {min_score!r}.") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {value}: scores of matches lie in [0, 1].")
    return value


def map_labels(
    labels: Iterable[Any],
    *,
    index: OntologyIndex | str | os.PathLike[str] | dict[str, str] | pd.DataFrame | None = None,
    min_score: float | None = DEFAULT_MIN_SCORE,
    coarsen: bool = True,
) -> OntologyMapping:
    """Map free-text cell-type labels to Cell Ontology (CL) ids, offline.

    Every distinct label goes through the tiers in order (see ``docs/ontology.md``): a user index, tier 1 exact CL
    label or synonym, tier 0 the pattern table (abbreviations, plurals, ``+``/``-positive``, ``CD4 T``, ``Tregs``,
    ``cDC1``...), tier 2 the label's words in any order or a fall-back to the parent term the label's words name,
    tier 3 word overlap. Only CL ids come out; a label whose best match scores below ``min_score`` maps to
    ``"unknown"``. A label read through an abbreviation that the Cell Ontology also uses for other cell types (``EC``:
    endothelial cell, but also "type EC enteroendocrine cell") keeps the pattern table's reading; its ``note`` names
    the other terms and a warning lists such labels (pass ``index={label: CL id}`` to choose another reading).

    Parameters
    ----------
    labels
        The labels (list, array, Series or Categorical); missing values are skipped, duplicates mapped once.
    index
        ``None`` for the Cell Ontology shipped with ``cellxgene-ontology-guide``; or user entries that extend it and
        win over everything else: a CSV/TSV file with the columns ``label`` and ``ontology_term_id``, a JSON file
        ``{label: CL id}``, a dict or a DataFrame; or an index already built (``spatialcx.ontology.load_index()``).
    min_score
        Matches scoring below it map to ``"unknown"`` (exact matches score 0.95-1, pattern matches 0.9-0.95, same
        words in another order 0.85, fall-backs to a parent term and similarity matches less).
    coarsen
        Map terms that a spatial panel cannot tell from their parent (e.g. "conventional dendritic cell",
        "intestinal tuft cell", listed in the pattern table) to that parent, with a note.

    Returns
    -------
    An :class:`OntologyMapping`; its ``table`` has one row per distinct label.

    Examples
    --------
    >>> import spatialcx as scx
    >>> m = scx.tl.map_labels(["CD4+ T cells", "Macrophages", "cDC2", "Cluster 3"])
    >>> m.to_dict()["CD4+ T cells"]
    'CL:0000624'
    """
    from spatialcx.ontology import matcher_for, resolve_index
    from spatialcx.ontology._patterns import load_patterns

    threshold = _check_min_score(min_score)
    distinct = _distinct_labels(labels)
    idx = resolve_index(index)
    matcher = matcher_for(idx)
    coarse = load_patterns().coarsen if coarsen else {}
    rows = []
    ambiguous = []
    for label in distinct:
        m = matcher.match(label)
        term, tier, score, note = m.term_id, m.tier, m.score, m.note
        if term is not None and score < threshold:
            note = f"best match {term} ({idx.name(term)}) scores {score:.2f} < min_score {threshold}"
            term, tier = None, -1
        if term is not None and term in coarse:
            parent, why = coarse[term]
            note = "; ".join(n for n in (note, f"coarsened: {why}") if n)
            term = parent
        if term is None:
            rows.append((label, UNKNOWN_ONTOLOGY_ID, UNKNOWN_ONTOLOGY_ID, -1, round(score, 3), "", note))
        else:
            rows.append((label, term, idx.name(term), int(tier), round(score, 3), m.matched, note))
            if m.alternatives:
                ambiguous.append((label, term, m.alternatives))
    numeric = [label for label in distinct if _NUMBER_RE.fullmatch(label.strip())]
    if numeric and len(numeric) == len(distinct):
        logger.warning(
            "The labels are numbers (%s), not cell-type names: they all map to %r. Cluster ids need names first, "
            "e.g. from scx.tl.annotate_domains (marker genes) or obs[key].cat.rename_categories({...}).",
            ", ".join(repr(x) for x in numeric[:5]) + (", ..." if len(numeric) > 5 else ""),
            UNKNOWN_ONTOLOGY_ID,
        )
    if ambiguous:
        shown = "; ".join(
            f"{label!r} -> {term} ({idx.name(term)}), not {', '.join(f'{a} ({idx.name(a)})' for a in alts[:2])}"
            + (f" or {len(alts) - 2} more" if len(alts) > 2 else "")
            for label, term, alts in ambiguous[:5]
        )
        more = f"; and {len(ambiguous) - 5} more" if len(ambiguous) > 5 else ""
        logger.warning(
            "%d label(s) use an abbreviation that the Cell Ontology also uses for other cell types; they were read as "
            "the pattern table reads them (see the 'note' column of the mapping): %s%s. If a label means another "
            "type, say so with index={label: CL id}.",
            len(ambiguous),
            shown,
            more,
        )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["tier"] = table["tier"].astype(int)
    table["score"] = table["score"].astype(float)
    mapping = OntologyMapping(table=table, ontology_version=idx.version, min_score=threshold)
    collisions = mapping.collisions
    if collisions:
        shown = "; ".join(
            f"{', '.join(repr(g) for g in group)} -> {term} ({idx.name(term)})"
            for term, group in list(collisions.items())[:5]
        )
        more = f"; and {len(collisions) - 5} more" if len(collisions) > 5 else ""
        logger.warning(
            "%d CL id(s) are shared by several distinct labels (kept apart, not merged; see mapping.collisions): %s%s",
            len(collisions),
            shown,
            more,
        )
    return mapping


def _label_key(target_key: str, label_key: str | None) -> str:
    if label_key is not None:
        return label_key
    if target_key.endswith("_term_id"):
        return target_key[: -len("_term_id")] + "_label"
    return target_key + "_label"


def add_ontology_ids(
    data: AnnData | SpatialData,
    source_key: str,
    *,
    target_key: str = "cell_type_ontology_term_id",
    label_key: str | None = None,
    skip_if_exists: bool = False,
    index: OntologyIndex | str | os.PathLike[str] | dict[str, str] | pd.DataFrame | None = None,
    min_score: float | None = None,
    table_key: str = "table",
    copy: bool = False,
    write: bool = True,
) -> OntologyMapping:
    """Add Cell Ontology ids and names for the labels in ``obs[source_key]`` (CELLxGENE columns).

    The labels are mapped with :func:`map_labels`. Cells get ``obs[target_key]`` (a CL id, or ``"unknown"`` when no
    term fits, the CELLxGENE rule) and ``obs[label_key]`` (the CL name, or ``"unknown"``), both categorical; the
    labels in ``obs[source_key]`` are not changed. Two distinct labels that map to the same CL id are reported (a
    warning and ``mapping.collisions``), never merged.

    Parameters
    ----------
    data
        An AnnData table or a SpatialData object holding it.
    source_key
        obs column with the free-text labels.
    target_key
        obs column for the CL ids.
    label_key
        obs column for the CL names; default ``target_key`` with ``_term_id`` replaced by ``_label``
        (``cell_type_ontology_label``).
    skip_if_exists
        Keep the ids already in ``obs[target_key]`` where they are current CL ids (``obs[label_key]`` gets their
        canonical CL names); map only the other cells.
    index
        The Cell Ontology index or user entries that extend it; see :func:`map_labels`. A user file is a CSV/TSV
        with the columns ``label`` and ``ontology_term_id``, or a JSON object ``{label: CL id}``.
    min_score
        Matches scoring below it map to ``"unknown"`` (default 0.5).
    table_key
        Key of the table in a SpatialData object.
    copy
        Leave ``data`` untouched and work on a copy; the copy is returned as ``mapping.data``.
    write
        When ``data`` is a SpatialData object backed by a zarr store, write the changed ``obs`` and ``uns`` into it
        (crash-safely).

    Returns
    -------
    The :class:`OntologyMapping` (always, so that the table of matches is at hand); with ``copy=True`` the modified
    copy is ``mapping.data``. The summary (ontology version, unmapped labels, collisions, the mapping table) is
    stored in ``uns[f"{base}_ontology"]`` where ``base`` is ``target_key`` without ``_ontology_term_id``
    (``uns["cell_type_ontology"]`` by default).

    Examples
    --------
    >>> mapping = scx.tl.add_ontology_ids(adata, "author_cell_type")  # doctest: +SKIP
    >>> mapping.unmapped  # doctest: +SKIP
    ['Cluster 3']
    >>> mapping.save("ontology_mapping.csv")  # doctest: +SKIP
    """
    from spatialcx._table import obs_column, resolve_table
    from spatialcx.ontology import resolve_index

    for name, key in (("source_key", source_key), ("target_key", target_key), ("label_key", label_key)):
        if (not isinstance(key, str) or not key) and not (name == "label_key" and key is None):
            raise TypeError(f"{name} must be a non-empty string, got {key!r}.")
    label_key = _label_key(target_key, label_key)
    if len({source_key, target_key, label_key}) < 3:
        raise ValueError(
            f"source_key ({source_key!r}), target_key ({target_key!r}) and label_key ({label_key!r}) must be three "
            "different obs columns: the labels would be overwritten."
        )
    threshold = _check_min_score(min_score)
    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    if source_key not in adata.obs.columns:
        raise KeyError(
            f"obs has no column {source_key!r} with labels to map; available columns: {list(adata.obs.columns)}."
        )
    idx = resolve_index(index)
    codes, labels = _factorize(obs_column(adata, source_key))  # also a lazily read table's column

    keep = np.zeros(adata.n_obs, dtype=bool)
    old_id_codes = old_ids = None
    if skip_if_exists and target_key in adata.obs.columns:
        # per distinct value, not per cell: which old ids are current CL terms
        old_id_codes, old_ids = _factorize(obs_column(adata, target_key))
        valid = np.array([v in idx for v in old_ids] + [False], dtype=bool)
        keep = valid[old_id_codes]
    elif target_key in adata.obs.columns:
        logger.info("Overwriting obs[%r] (pass skip_if_exists=True to keep the CL ids already there).", target_key)

    needed = np.sort(pd.unique(codes[~keep & (codes >= 0)]))
    mapping = map_labels([labels[c] for c in needed], index=idx, min_score=threshold)
    ids_by_label = mapping.to_dict()
    names_by_label = mapping.names()

    unknown = UNKNOWN_ONTOLOGY_ID
    # one (id, name) pair per distinct label, the trailing pair for cells without a label (code -1)
    pair_ids = [ids_by_label.get(label, unknown) for label in labels] + [unknown]
    pair_names = [names_by_label.get(label, unknown) for label in labels] + [unknown]
    pair_of_cell = np.where(codes >= 0, codes, len(labels))
    if keep.any():
        # cells that keep their id: one more pair per distinct old id, named by the ontology (the CELLxGENE label
        # column holds the canonical CL name of the id, never a name written earlier or by hand)
        inverse, kept = pd.factorize(old_id_codes[keep])  # type: ignore[index]
        for code in kept.tolist():
            pair_ids.append(old_ids[code])  # type: ignore[index]
            pair_names.append(idx.name(old_ids[code]))  # type: ignore[index]
        pair_of_cell[keep] = len(labels) + 1 + inverse
    ids = _categorical(pair_ids, pair_of_cell)
    names = _categorical(pair_names, pair_of_cell)

    # all computed: write
    adata.obs[target_key] = ids
    adata.obs[label_key] = names
    base = target_key[: -len(ONTOLOGY_ID_SUFFIX)] if target_key.endswith(ONTOLOGY_ID_SUFFIX) else target_key
    summary = mapping.summary()
    summary["params"] = {
        "source_key": source_key,
        "target_key": target_key,
        "label_key": label_key,
        "skip_if_exists": bool(skip_if_exists),
        "min_score": float(threshold),
        "n_cells_kept": int(keep.sum()),
        "user_entries": int(len(idx.entries)),
    }
    adata.uns[f"{base}{ONTOLOGY_SUFFIX}"] = summary
    out = ref.finish(write=write, elements=("obs", "uns"))
    if copy:
        mapping.data = out
    return mapping


def _factorize(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """``(codes, distinct values as str)`` of an obs column in order of appearance, code -1 for missing values."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # from the category codes: no per-cell strings
        categories = values.cat.categories
        codes = values.cat.codes.to_numpy().astype(np.int64)
        used = pd.unique(codes)  # in order of appearance (hashing, no sort of the cells)
        used = used[used >= 0]
        remap = np.full(len(categories) + 1, -1, dtype=np.int64)  # the last slot takes code -1
        remap[used] = np.arange(len(used))
        return remap[codes], [str(categories[i]) for i in used]
    codes, uniques = pd.factorize(values.astype(object), sort=False)
    return codes, [str(u) for u in uniques]


def _categorical(values: list[str], which: np.ndarray) -> pd.Categorical:
    """``values[which]`` as a categorical, built from one code per distinct value rather than per cell."""
    categories, codes = np.unique(np.asarray(values, dtype=object), return_inverse=True)
    return pd.Categorical.from_codes(codes.ravel()[which], categories=pd.Index(categories.tolist(), dtype=object))


def stored_mapping(adata: AnnData, key: str) -> tuple[str, Mapping[str, Any], float | None] | None:
    """``(where, columns, min_score)`` of the mapping kept in ``uns``, or ``None`` when there is none.

    :func:`spatialcx.tl.annotate` keeps it in ``uns[key]["ontology_mapping"]``; :func:`spatialcx.tl.add_ontology_ids`
    in the summary ``uns[f"{key}_ontology"]["mapping"]`` (``key`` is the base of its ``target_key``).
    """
    params = adata.uns.get(key)
    stored = params.get("ontology_mapping") if isinstance(params, Mapping) else None
    if stored is not None and len(stored):
        return f"uns[{key!r}]['ontology_mapping']", stored, None
    summary = adata.uns.get(f"{key}{ONTOLOGY_SUFFIX}")
    stored = summary.get("mapping") if isinstance(summary, Mapping) else None
    if stored is not None and len(stored):
        min_score = summary.get("min_score")
        return f"uns[{key + ONTOLOGY_SUFFIX!r}]['mapping']", stored, None if min_score is None else float(min_score)
    return None
