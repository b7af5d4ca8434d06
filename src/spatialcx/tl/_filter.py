"""Mark low-confidence cells and rare predicted types as ``Unassigned``."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spatialcx._constants import (
    DEFAULT_EXCLUDE_LABELS,
    KEY_ADDED,
    PREDICTED_SUFFIX,
    UNASSIGNED,
    UNKNOWN_ONTOLOGY_ID,
    output_keys,
)
from spatialcx._settings import logger
from spatialcx._table import obs_column
from spatialcx._utils import label_text

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Keys of ``uns[key]`` that record :func:`filter_low_count_types`: the smallest type kept, and the types removed.
COUNT_FILTER_KEYS = ("min_cells_per_type", "removed_types")


def _labels(values: pd.Series) -> np.ndarray:
    """Labels as an object array of ``str``, missing values kept as ``None`` (never the string ``"nan"``)."""
    return label_text(values)


def _base_labels(adata: AnnData, key: str, source_key: str | None) -> np.ndarray:
    """Labels before filtering: ``source_key``, else ``{key}_predicted`` shown by their final names, else ``key``."""
    if source_key is not None:
        if source_key not in adata.obs:
            raise KeyError(f"source_key {source_key!r} is not a column of obs; available: {list(adata.obs.columns)}.")
        return _labels(obs_column(adata, source_key))
    predicted = key + PREDICTED_SUFFIX
    if predicted in adata.obs:
        names = _class_lists(adata, key, "names")
        labels = _labels(obs_column(adata, predicted))
        return _lookup(labels, names, labels) if names else labels
    if key in adata.obs:
        return _labels(obs_column(adata, key))
    raise KeyError(
        f"Neither {key!r} nor {predicted!r} is a column of obs; run `scx.tl.predict` or `scx.tl.annotate` first."
    )


def _class_lists(adata: AnnData, key: str, field: str) -> dict[str, str]:
    """``{class: value}`` from ``uns[key]["classes"]`` and the aligned list ``uns[key][field]`` (empty if absent).

    (Labels are never used as uns keys: they are not always valid zarr names.)
    """
    params = adata.uns.get(key)
    if not isinstance(params, Mapping):
        return {}
    classes, values = list(params.get("classes", [])), list(params.get(field, []))
    if not classes or len(classes) != len(values):
        return {}
    return {str(c): str(v) for c, v in zip(classes, values, strict=True)}


def _check_unassigned_label(unassigned_label: object, adata: AnnData | None, key: str) -> str:
    """``unassigned_label`` if it is a non-empty str that names none of the model's cell types in ``adata.uns[key]``.

    A class that is not a cell type (one of :data:`~spatialcx._constants.DEFAULT_EXCLUDE_LABELS`, such as
    ``Unassigned`` in an imported model) may share the label: its cells have no type either. ``adata=None``: the labels
    do not come from the model, so its classes are not checked.
    """
    if not isinstance(unassigned_label, str):
        raise TypeError(
            f"unassigned_label must be a str (the label of the cells filtered out, e.g. 'Unassigned'), got "
            f"{unassigned_label!r}."
        )
    if not unassigned_label.strip():
        raise ValueError(f"unassigned_label must be a label for the cells filtered out, got {unassigned_label!r}.")
    params = adata.uns.get(key) if adata is not None else None
    for field in ("classes", "names"):  # the model's classes, and the final names annotate gave them
        values = params.get(field) if isinstance(params, Mapping) else None
        if values is None or unassigned_label in DEFAULT_EXCLUDE_LABELS:
            continue
        if unassigned_label in {str(v) for v in np.asarray(values, dtype=object).ravel()}:
            raise ValueError(
                f"unassigned_label {unassigned_label!r} is one of the model's cell types (uns[{key!r}][{field!r}]): "
                "the cells of that type and the cells filtered out could not be told apart. Pass another label, "
                "e.g. unassigned_label='Low confidence'."
            )
    return unassigned_label


def _write_labels(adata: AnnData, key: str, labels: np.ndarray, unassigned_label: str) -> None:
    present = [c for c in pd.unique(labels) if c is not None and c != unassigned_label]
    cats = sorted(present) + ([unassigned_label] if (labels == unassigned_label).any() else [])
    adata.obs[key] = pd.Categorical(labels, categories=cats)


def _ontology_columns(
    adata: AnnData, key: str, labels: np.ndarray, base: np.ndarray, unassigned: np.ndarray, *, from_predictions: bool
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The CL ids that go with the filtered ``labels``, and the CL names that go with the unfiltered ``base`` labels.

    Only when ``obs[{key}_ontology_term_id]`` exists (else ``None``). Unassigned cells get the id ``unknown``
    (CELLxGENE). The other cells get the id of their label, so that filtering again with another threshold restores
    them: with ``from_predictions``, from the per-class ids that :func:`~spatialcx.tl.annotate` records
    (``uns[key]["ontology_term_ids"]``, aligned with the classes); otherwise from the mapping
    :func:`~spatialcx.tl.add_ontology_ids` records (``uns[f"{key}_ontology"]``) and from the label/id pairs in the
    table; a label found in neither keeps the id it has. ``{key}_ontology_label`` names every cell's unfiltered label
    (the names ``None`` when the table has no such column, or when ``annotate``'s unfiltered names are kept).
    """
    keys = output_keys(key)
    if keys["ontology_id"] not in adata.obs:
        return None
    current = _labels(obs_column(adata, keys["ontology_id"]))
    current[pd.isna(current)] = UNKNOWN_ONTOLOGY_ID
    has_names = keys["ontology_label"] in adata.obs
    class_ids = _class_lists(adata, key, "ontology_term_ids") if from_predictions else {}
    if class_ids and keys["predicted"] in adata.obs:
        predicted = _labels(obs_column(adata, keys["predicted"]))
        ids = _lookup(predicted, class_ids, np.full(len(predicted), UNKNOWN_ONTOLOGY_ID, dtype=object))
        ids[unassigned] = UNKNOWN_ONTOLOGY_ID
        return ids, None  # annotate's names are already unfiltered
    terms = _recorded_terms(adata, key)
    if key in adata.obs:  # label/id(/name) triples of the cells that have an id now
        old_names = _labels(obs_column(adata, keys["ontology_label"])) if has_names else np.full(len(current), None)
        pairs = pd.DataFrame({"label": _labels(obs_column(adata, key)), "id": current, "name": old_names})
        pairs = pairs.dropna(subset=["label", "id"])
        pairs = pairs[pairs["id"] != UNKNOWN_ONTOLOGY_ID].drop_duplicates("label")
        for label, term, name in zip(pairs["label"], pairs["id"], pairs["name"], strict=True):
            terms.setdefault(label, (term, name))
    ids = current.copy()
    names = _labels(obs_column(adata, keys["ontology_label"])) if has_names else None
    if terms:
        ids = _lookup(labels, {k: v[0] for k, v in terms.items()}, ids)
        if names is not None:
            known = {k: v[1] for k, v in terms.items() if v[1] is not None}
            names = _lookup(base, known, names)
    ids[unassigned] = UNKNOWN_ONTOLOGY_ID
    return ids, names


def _lookup(labels: np.ndarray, table: dict[str, str], default: np.ndarray) -> np.ndarray:
    """``table[label]`` for the labels found in ``table``, ``default`` elsewhere."""
    mapped = pd.Series(labels, dtype=object).map(table).to_numpy(dtype=object)
    found = ~pd.isna(mapped)
    out = default.copy()
    out[found] = mapped[found]
    return out


def _recorded_terms(adata: AnnData, key: str) -> dict[str, tuple[str, str | None]]:
    """``{label: (CL id, CL name)}`` from the mapping kept in ``uns`` (``spatialcx.tl._ontology.stored_mapping``)."""
    from spatialcx.tl._ontology import stored_mapping

    found = stored_mapping(adata, key)
    table = found[1] if found is not None else None
    if not isinstance(table, Mapping) or "input_label" not in table or "ontology_term_id" not in table:
        return {}
    labels, ids = list(table["input_label"]), list(table["ontology_term_id"])
    names = list(table["ontology_label"]) if "ontology_label" in table else [None] * len(ids)
    if not len(labels) == len(ids) == len(names):
        return {}
    return {
        str(a): (str(b), None if c is None else str(c))
        for a, b, c in zip(labels, ids, names, strict=True)
        if str(b) != UNKNOWN_ONTOLOGY_ID
    }


def _check_confidence(adata: AnnData, confidence_key: str) -> np.ndarray:
    values = obs_column(adata, confidence_key)  # (a lazy table's obs columns are xarray arrays)
    conf = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    unreadable = np.isnan(conf) & ~pd.isna(values).to_numpy()
    if unreadable.any():
        bad = values[unreadable].iloc[0]
        raise ValueError(
            f"obs[{confidence_key!r}] holds {int(unreadable.sum())} value(s) that are not numbers (e.g. {bad!r}); "
            "the confidence must be numeric, in [0, 1]."
        )
    finite = conf[~np.isnan(conf)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(
            f"obs[{confidence_key!r}] ranges from {finite.min():g} to {finite.max():g}, outside [0, 1]; a confidence "
            "in percent must be divided by 100 first."
        )
    return conf


def _write_terms(adata: AnnData, key: str, terms: tuple[np.ndarray, np.ndarray | None] | None) -> None:
    if terms is None:
        return
    keys = output_keys(key)
    adata.obs[keys["ontology_id"]] = pd.Categorical(terms[0])
    if terms[1] is not None:
        adata.obs[keys["ontology_label"]] = pd.Categorical(terms[1])


def filter_low_confidence(
    data: AnnData | SpatialData,
    *,
    key: str = KEY_ADDED,
    confidence_key: str | None = None,
    threshold: float = 0.8,
    unassigned_label: str = UNASSIGNED,
    source_key: str | None = None,
    table_key: str = "table",
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Label cells whose confidence is below ``threshold`` as ``Unassigned``.

    The labels before filtering are taken from ``source_key`` when given; otherwise from ``{key}_predicted`` (shown
    by their final names, e.g. Cell Ontology names, as recorded in ``uns[key]["names"]``, aligned with
    ``uns[key]["classes"]``, by :func:`~spatialcx.tl.annotate`), so filtering again with another threshold starts from
    the unfiltered labels.

    Parameters
    ----------
    data
        The spatial data or its table.
    key
        Column written with the filtered labels.
    confidence_key
        Column with the confidence in [0, 1]; defaults to ``{key}_confidence``.
    threshold
        Cells with confidence strictly below it (or missing) become ``unassigned_label``.
    unassigned_label
        Label of filtered cells: a str that names none of the model's cell types (``uns[key]["classes"]``).
    source_key
        Column with the labels to filter (see above).
    table_key, copy, write
        As everywhere in spatialcx.

    Returns
    -------
    The copy when ``copy=True``, else None. ``uns[key]["confidence_threshold"]`` records the threshold and
    ``uns[key]["n_unassigned"]`` the number of cells that became ``unassigned_label``; a record of
    :func:`filter_low_count_types` is dropped, as the types it removed are restored. When the table
    has ``{key}_ontology_term_id`` (as :func:`~spatialcx.tl.annotate` writes it), filtered cells get ``unknown`` there,
    as the CELLxGENE schema asks of cells without a cell type; the others get the id of their label (from the per-class
    ids ``annotate`` records, or the mapping ``add_ontology_ids`` records), so filtering again with a lower threshold
    restores them.
    ``{key}_ontology_label`` stays unfiltered: it names every cell's label before filtering (for a mapping made by
    ``add_ontology_ids`` on filtered labels, the names of the cells it restores come back too). Missing labels stay
    missing, whatever the confidence (a cell without a label has no call to filter).

    Raises
    ------
    TypeError
        When the threshold is not a number, or ``unassigned_label`` is not a str.
    ValueError
        When the threshold is not in [0, 1], the confidence column holds values that are not numbers or lie
        outside [0, 1] (a percentage, say), or ``unassigned_label`` is empty or names one of the model's cell types.
    """
    from spatialcx._table import resolve_table

    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold must be a number in [0, 1] (a confidence), got {threshold!r}.")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1] (a confidence), got {threshold}.")
    confidence_key = confidence_key or f"{key}_confidence"
    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    if confidence_key not in adata.obs:
        raise KeyError(
            f"Confidence column {confidence_key!r} is not in obs; run `scx.tl.predict` or `scx.tl.annotate` first."
        )
    conf = _check_confidence(adata, confidence_key)
    from_predictions = source_key is None or source_key == key + PREDICTED_SUFFIX
    unassigned_label = _check_unassigned_label(unassigned_label, adata if from_predictions else None, key)
    base = _base_labels(adata, key, source_key)
    # NaN confidence counts as low; a cell without a label has no call to filter: it stays missing
    low = ~(conf >= threshold) & ~pd.isna(base)
    labels = np.where(low, unassigned_label, base)
    terms = _ontology_columns(adata, key, labels, base, labels == unassigned_label, from_predictions=from_predictions)
    # all computed: write
    _write_labels(adata, key, labels, unassigned_label)
    _write_terms(adata, key, terms)
    params = dict(adata.uns.get(key, {})) if isinstance(adata.uns.get(key), dict) else {}
    # the labels start again from the unfiltered ones: a removal by filter_low_count_types is undone, so its record goes
    undone = [str(t) for t in params.pop(COUNT_FILTER_KEYS[1], [])]
    params.pop(COUNT_FILTER_KEYS[0], None)
    if undone:
        logger.info(
            "filter_low_confidence: the rare types removed by filter_low_count_types (%s) are restored; run it again "
            "to remove rare types.",
            ", ".join(undone),
        )
    params.update(
        {
            "confidence_threshold": float(threshold),
            "confidence_key": confidence_key,
            "unassigned_label": unassigned_label,
            "n_unassigned": int(low.sum()),
        }
    )
    adata.uns[key] = params
    return ref.finish(write=write, elements=("obs", "uns"))


def filter_low_count_types(
    data: AnnData | SpatialData,
    *,
    key: str = KEY_ADDED,
    min_cells: int = 10,
    unassigned_label: str | None = None,
    table_key: str = "table",
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Label cells of types with fewer than ``min_cells`` cells in ``key`` as ``Unassigned``.

    Rare predicted types on a slide are often spurious calls; this removes them after confidence filtering.

    Parameters
    ----------
    data
        The spatial data or its table.
    key
        Label column to filter in place.
    min_cells
        Types with fewer cells become ``unassigned_label``.
    unassigned_label
        Label of removed cells; cells that already carry it are not a type. ``None``: the label
        :func:`filter_low_confidence` recorded in ``uns[key]["unassigned_label"]``, else ``"Unassigned"``, so that one
        label names every unassigned cell.
    table_key, copy, write
        As in :func:`filter_low_confidence`.

    Returns
    -------
    The copy when ``copy=True``, else None. ``uns[key]["n_unassigned"]`` counts the cells labelled
    ``unassigned_label`` (those of the confidence filter included). ``uns[key]["removed_types"]`` lists the removed
    types, those of earlier calls included (filtering again is idempotent), ``uns[key]["min_cells_per_type"]`` the
    largest ``min_cells`` still in effect, and ``uns[key]["unassigned_label"]`` the label their cells got. Cells of removed types get
    ``unknown`` in ``{key}_ontology_term_id`` when the table has that column; missing labels stay missing and do not
    count as a type. :func:`filter_low_confidence` starts again from the unfiltered labels: it restores the removed
    types and drops this record.

    Raises
    ------
    TypeError
        When ``min_cells`` is not a whole number or ``unassigned_label`` not a str.
    ValueError
        When ``min_cells`` is negative, or ``unassigned_label`` is empty or names one of the model's cell types
        (``uns[key]["classes"]``): rare cells would merge into that type.
    """
    from spatialcx._table import resolve_table
    from spatialcx._utils import whole_number

    min_cells = whole_number(min_cells, "min_cells", minimum=0)
    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    if key not in adata.obs:
        raise KeyError(f"{key!r} is not a column of obs; available: {list(adata.obs.columns)}.")
    if unassigned_label is None:
        recorded = adata.uns[key].get("unassigned_label") if isinstance(adata.uns.get(key), Mapping) else None
        unassigned_label = UNASSIGNED if recorded is None else str(recorded)
    unassigned_label = _check_unassigned_label(unassigned_label, adata, key)
    base = _labels(obs_column(adata, key))
    counts = pd.Series(base).value_counts()  # missing labels are not a type
    rare = [str(t) for t, c in counts.items() if c < min_cells and t != unassigned_label]
    labels = np.where(pd.Series(base).isin(rare).to_numpy(), unassigned_label, base)
    terms = _ontology_columns(adata, key, labels, base, labels == unassigned_label, from_predictions=False)
    params = dict(adata.uns.get(key, {})) if isinstance(adata.uns.get(key), dict) else {}
    # types an earlier call removed stay removed (they have no cell left): the record keeps them, and the larger minimum
    earlier = [str(t) for t in params.get(COUNT_FILTER_KEYS[1], []) if str(t) not in counts.index]
    effective = max(int(min_cells), int(params.get(COUNT_FILTER_KEYS[0], 0))) if earlier else int(min_cells)
    # all computed: write
    _write_labels(adata, key, labels, unassigned_label)
    _write_terms(adata, key, terms)
    params.update(
        {
            COUNT_FILTER_KEYS[0]: effective,
            COUNT_FILTER_KEYS[1]: sorted({*rare, *earlier}),
            "unassigned_label": unassigned_label,
            "n_unassigned": int((labels == unassigned_label).sum()),  # the low-confidence cells and the rare types'
        }
    )
    adata.uns[key] = params
    return ref.finish(write=write, elements=("obs", "uns"))
