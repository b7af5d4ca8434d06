"""Mark low-confidence cells and rare predicted types as ``Unassigned``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spatialcx._constants import KEY_ADDED, PREDICTED_SUFFIX, UNASSIGNED

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _base_labels(adata: AnnData, key: str, source_key: str | None) -> pd.Series:
    """Labels before filtering: ``source_key``, else ``{key}_predicted`` shown by their final names, else ``key``."""
    if source_key is not None:
        if source_key not in adata.obs:
            raise KeyError(f"source_key {source_key!r} is not a column of obs; available: {list(adata.obs.columns)}.")
        return adata.obs[source_key].astype(str)
    predicted = key + PREDICTED_SUFFIX
    if predicted in adata.obs:
        params = adata.uns.get(key, {}) if isinstance(adata.uns.get(key), dict) else {}
        # lists aligned with the model's classes (labels are never used as uns keys: not valid zarr names)
        names = dict(zip(map(str, params.get("classes", [])), map(str, params.get("names", []))))
        labels = adata.obs[predicted].astype(str)
        return labels.map(lambda x: names.get(x, x)) if names else labels
    if key in adata.obs:
        return adata.obs[key].astype(str)
    raise KeyError(
        f"Neither {key!r} nor {predicted!r} is a column of obs; run `scx.tl.predict` or `scx.tl.annotate` first."
    )


def _write_labels(adata: AnnData, key: str, labels: np.ndarray, unassigned_label: str) -> None:
    cats = [c for c in pd.unique(labels) if c != unassigned_label]
    cats = sorted(cats) + ([unassigned_label] if (labels == unassigned_label).any() else [])
    adata.obs[key] = pd.Categorical(labels, categories=cats)


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
    by their final names, e.g. Cell Ontology names, as recorded in ``uns[key]["names"]``, aligned with ``uns[key]["classes"]``, by
    :func:`~spatialcx.tl.annotate`), so filtering again with another threshold starts from the unfiltered labels.

    Parameters
    ----------
    data
        The spatial data or its table.
    key
        Column written with the filtered labels.
    confidence_key
        Column with the confidence in [0, 1]; defaults to ``{key}_confidence``.
    threshold
        Cells with confidence strictly below it become ``unassigned_label``.
    unassigned_label
        Label of filtered cells.
    source_key
        Column with the labels to filter (see above).
    table_key, copy, write
        As everywhere in spatialcx.

    Returns
    -------
    The copy when ``copy=True``, else None. ``uns[key]["confidence_threshold"]`` records the threshold.
    """
    from spatialcx._table import resolve_table

    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1] (a confidence), got {threshold}.")
    confidence_key = confidence_key or f"{key}_confidence"
    ref = resolve_table(data, table_key, copy=copy)
    adata = ref.adata
    if confidence_key not in adata.obs:
        raise KeyError(
            f"Confidence column {confidence_key!r} is not in obs; run `scx.tl.predict` or `scx.tl.annotate` first."
        )
    conf = pd.to_numeric(adata.obs[confidence_key], errors="coerce").to_numpy(dtype=float)
    base = _base_labels(adata, key, source_key).to_numpy(dtype=object)
    low = ~(conf >= threshold)  # NaN confidence counts as low
    labels = np.where(low, unassigned_label, base).astype(str)
    _write_labels(adata, key, labels, unassigned_label)
    params = dict(adata.uns.get(key, {})) if isinstance(adata.uns.get(key), dict) else {}
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
    unassigned_label: str = UNASSIGNED,
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
    unassigned_label, table_key, copy, write
        As in :func:`filter_low_confidence`.

    Returns
    -------
    The copy when ``copy=True``, else None. ``uns[key]["removed_types"]`` lists the removed types.
    """
    from spatialcx._table import resolve_table

    if min_cells < 0:
        raise ValueError(f"min_cells must be >= 0, got {min_cells}.")
    ref = resolve_table(data, table_key, copy=copy)
    adata = ref.adata
    if key not in adata.obs:
        raise KeyError(f"{key!r} is not a column of obs; available: {list(adata.obs.columns)}.")
    labels = adata.obs[key].astype(str).to_numpy(dtype=object)
    counts = pd.Series(labels).value_counts()
    rare = [t for t, c in counts.items() if c < min_cells and t != unassigned_label]
    labels = np.where(np.isin(labels, rare), unassigned_label, labels).astype(str)
    _write_labels(adata, key, labels, unassigned_label)
    params = dict(adata.uns.get(key, {})) if isinstance(adata.uns.get(key), dict) else {}
    params.update({"min_cells_per_type": int(min_cells), "removed_types": sorted(rare)})
    adata.uns[key] = params
    return ref.finish(write=write, elements=("obs", "uns"))
