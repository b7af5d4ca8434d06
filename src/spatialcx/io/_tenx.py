"""Cell types exported by 10x Genomics pipelines (Space Ranger / Xenium ``cell_types.csv``)."""

from __future__ import annotations

import lzma
import re
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.errors import ParserError

from .._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Canonical column -> accepted spellings (compared lower-case, spaces and dashes as underscores).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "barcode": ("barcode", "barcodes", "cell_id", "cell_barcode", "cellid", "cell"),
    "broad_cell_type": ("broad_cell_type", "azimuth_broad", "broad"),
    "coarse_cell_type": ("coarse_cell_type", "azimuth_medium", "medium_cell_type", "coarse"),
    "fine_cell_type": ("fine_cell_type", "azimuth_fine", "fine"),
    "hierarchy": ("azimuth_hierarchy", "hierarchy", "full_hierarchical_labels", "full_hierarchy"),
    "softmax_probability": (
        "softmax_probability",
        "final_level_softmax_prob",
        "softmax_prob",
        "azimuth_softmax_probability",
        "probability",
        "confidence",
    ),
    "umi_count": ("umi_count", "umi_counts", "umis", "total_umis", "total_umi", "n_umi", "ncount_rna"),
    "cell_count_in_model": ("cell_count_in_model",),
    "ontology_term_id": ("cell_type_ontology_term_id", "ontology_term_id", "cl_id", "cl_term_id", "cell_ontology_id"),
}
#: Label levels, coarse to fine.
LEVELS: tuple[str, ...] = ("broad_cell_type", "coarse_cell_type", "fine_cell_type")
_NUMERIC = ("softmax_probability", "umi_count", "cell_count_in_model")
_OUT_NAMES = {
    "broad_cell_type": "broad",
    "coarse_cell_type": "coarse",
    "fine_cell_type": "fine",
    "hierarchy": "hierarchy",
    "softmax_probability": "probability",
    "umi_count": "umi_count",
    "cell_count_in_model": "cell_count_in_model",
}


def read_10x_cell_types(path: str | Path) -> pd.DataFrame:
    """Read a 10x ``cell_types.csv`` (Space Ranger, Xenium, Cell Ranger cell type annotation).

    Both flavours are recognised: Pan-Human Azimuth (broad, coarse and fine cell types, hierarchy, softmax
    probability, UMI count) and 10x Cloud (coarse and fine cell types, ``cell_count_in_model``). Column names are
    normalised to ``broad_cell_type``, ``coarse_cell_type``, ``fine_cell_type``, ``hierarchy``,
    ``softmax_probability``, ``umi_count``, ``cell_count_in_model`` (and ``ontology_term_id`` when the file has CL
    ids); other columns are kept as they are.

    Parameters
    ----------
    path
        The CSV (optionally gzipped), or a ``cell_types`` folder holding one ``cell_types.csv`` (directly or in an
        ``Azimuth`` / ``10x_Cloud`` subfolder).

    Returns
    -------
    A frame indexed by barcode / cell id (``str``, index name ``"barcode"``) with label columns as strings and
    numeric columns as numbers. ``df.attrs["source"]`` is ``"azimuth"``, ``"10x_cloud"`` or ``"unknown"`` and
    ``df.attrs["file"]`` the file name.

    Raises
    ------
    FileNotFoundError
        No such file, or no / several ``cell_types.csv`` in the folder.
    ValueError
        Not a readable CSV (binary content, text that is not UTF-8, a truncated or damaged ``.gz``), no barcode
        column, no cell type column, duplicated barcodes, or non-numeric values in a numeric column.
    """
    path = _find_csv(Path(path))
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"{path.name} is empty; expected a header with a barcode and cell type columns.") from e
    except PermissionError:
        raise
    except (UnicodeDecodeError, EOFError, OSError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, ParserError) as e:
        if isinstance(e, UnicodeDecodeError):
            why = "its content is not UTF-8 text (a binary file, or text in another encoding?)"
        elif isinstance(e, ParserError):
            why = "its content cannot be parsed as CSV (a binary file?)"
        else:  # EOFError, zlib / lzma / zip errors, gzip.BadGzipFile (an OSError)
            why = "the file is truncated or damaged (an interrupted download or copy?)"
        raise ValueError(
            f"{str(path)!r} is not a readable 10x cell_types CSV: {why}; {type(e).__name__}: {e}. Pass the "
            "cell_types.csv (UTF-8 text, optionally gzipped) written by Space Ranger / Xenium Ranger, copying or "
            "downloading it again if it was cut short."
        ) from e
    rename = _canonical_columns(raw.columns)
    df = raw.rename(columns=rename)
    if "barcode" not in df.columns:
        raise ValueError(
            f"{path.name} has no barcode / cell id column (columns: {list(raw.columns)}); expected one of "
            f"{list(COLUMN_ALIASES['barcode'])}."
        )
    if not any(level in df.columns for level in LEVELS):
        raise ValueError(
            f"{path.name} has no cell type column (columns: {list(raw.columns)}); expected at least one of "
            f"{list(LEVELS)} (or the Azimuth names azimuth_broad / azimuth_medium / azimuth_fine)."
        )
    if df["barcode"].isna().any():
        raise ValueError(f"{path.name} has {int(df['barcode'].isna().sum())} row(s) without a barcode.")
    dup = df["barcode"][df["barcode"].duplicated()].unique()
    if dup.size:
        raise ValueError(
            f"{path.name} lists {dup.size} barcode(s) more than once (e.g. {list(dup[:3])}); each cell must appear "
            "once. Is it a concatenation of several samples?"
        )
    for col in _NUMERIC:
        if col in df.columns:
            num = pd.to_numeric(df[col], errors="coerce")
            bad = num.isna() & df[col].notna()
            if bad.any():
                raise ValueError(
                    f"{path.name}: column {col!r} has non-numeric values such as {df.loc[bad, col].iloc[0]!r}."
                )
            df[col] = num
    df = df.set_index("barcode")
    df.index = df.index.astype(str)
    df.index.name = "barcode"
    if {"hierarchy", "softmax_probability", "broad_cell_type", "umi_count"} & set(df.columns):
        source = "azimuth"
    elif "cell_count_in_model" in df.columns:
        source = "10x_cloud"
    else:
        source = "unknown"
    df.attrs["source"] = source
    df.attrs["file"] = path.name
    return df


def add_10x_cell_types(
    data: AnnData | SpatialData,
    path: str | Path | pd.DataFrame,
    *,
    table_key: str = "table",
    key_added: str = "10x",
    id_key: str | None = None,
    add_ontology: bool = True,
    copy: bool = False,
    write: bool = True,
) -> AnnData | SpatialData | None:
    """Join a 10x ``cell_types.csv`` to the table by barcode / cell id, with Cell Ontology ids.

    Parameters
    ----------
    data
        AnnData, or SpatialData holding the table ``table_key``.
    path
        The CSV or ``cell_types`` folder (see :func:`read_10x_cell_types`), or the frame it returns.
    table_key
        Table to use when ``data`` is SpatialData.
    key_added
        Prefix of the new obs columns and ``uns`` key.
    id_key
        obs column holding the ids of the CSV; by default the one of ``obs_names``, ``obs["cell_id"]`` and
        ``obs["barcode"]`` that matches the most rows (a ``-1``-style suffix is ignored when that is needed to match).
    add_ontology
        Add CL ids of the finest level (:func:`spatialcx.tl.add_ontology_ids`), unless the file has them.
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys into the zarr store when ``data`` is a backed SpatialData.

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes obs columns ``{key_added}_broad``,
    ``{key_added}_coarse``, ``{key_added}_fine`` (categorical), ``{key_added}_hierarchy``,
    ``{key_added}_probability``, ``{key_added}_umi_count``, ``{key_added}_cell_count_in_model`` (those present in the
    file; missing for cells not in it), ``{key_added}_ontology_term_id`` and ``{key_added}_ontology_label`` (CL id and
    name of the finest level, ``"unknown"`` where no term fits; with ``add_ontology``, or the ids of the file), and
    ``uns[key_added]`` (source, file name, level used for the CL ids, matching counts).

    Raises
    ------
    KeyError
        ``id_key`` is not an obs column.
    ValueError
        No cell of the file matches the table.
    """
    from .._table import check_key, resolve_table

    check_key(key_added)
    df = path if isinstance(path, pd.DataFrame) else read_10x_cell_types(path)
    if isinstance(path, pd.DataFrame) and (df.index.name != "barcode" or not any(lvl in df.columns for lvl in LEVELS)):
        raise ValueError(
            "A frame passed as path must be the output of read_10x_cell_types (indexed by barcode, with cell type "
            "columns)."
        )

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    id_source, table_ids, file_ids = _match_ids(adata, df, id_key)
    pos = pd.Index(file_ids).get_indexer(table_ids)
    matched = pos >= 0
    n_matched = int(matched.sum())
    if n_matched == 0:
        raise ValueError(
            f"None of the {df.shape[0]} cells of the file match the {adata.n_obs} cells of the table (table ids "
            f"such as {list(map(str, table_ids[:3]))}, file ids such as {list(df.index[:3])}). Pass id_key= the obs "
            "column holding the 10x barcodes / cell ids."
        )
    if n_matched < 0.5 * adata.n_obs:
        logger.warning(
            "add_10x_cell_types: only %d of %d table cells are in %s.", n_matched, adata.n_obs, df.attrs.get("file")
        )
    n_file_unmatched = int(df.shape[0] - np.unique(pos[matched]).size)
    if n_file_unmatched:
        logger.info("add_10x_cell_types: %d cells of the file are not in the table.", n_file_unmatched)

    new_cols: dict[str, Any] = {}
    take = np.where(matched, pos, 0)
    for col, short in _OUT_NAMES.items():
        if col not in df.columns:
            continue
        vals = df[col].to_numpy()[take]
        if col in _NUMERIC:
            out = np.where(matched, vals.astype(np.float64), np.nan)
            new_cols[f"{key_added}_{short}"] = out
        else:
            vals = np.where(matched, vals.astype(object), None)
            vals = pd.Series(vals, dtype=object).where(lambda s: s.notna(), np.nan)
            new_cols[f"{key_added}_{short}"] = pd.Categorical(vals)

    levels = [lvl for lvl in LEVELS if lvl in df.columns]
    onto_level = levels[-1]
    onto_key = f"{key_added}_ontology_term_id"
    onto_source = None
    if "ontology_term_id" in df.columns:
        vals = np.where(matched, df["ontology_term_id"].to_numpy()[take].astype(object), None)
        new_cols[onto_key] = pd.Categorical(pd.Series(vals, dtype=object).where(lambda s: s.notna(), np.nan))
        onto_source = "file"
    elif add_ontology:
        ids, names = _ontology_ids(new_cols[f"{key_added}_{_OUT_NAMES[onto_level]}"], adata.obs_names)
        new_cols[onto_key] = ids
        new_cols[f"{key_added}_ontology_label"] = names
        onto_source = "spatialcx.tl.add_ontology_ids"

    for k, v in new_cols.items():
        adata.obs[k] = v
    params: dict[str, Any] = {
        "source": df.attrs.get("source", "unknown"),
        "file": df.attrs.get("file", ""),
        "id_source": id_source,
        "levels": levels,
        "columns": list(new_cols),
        "n_file_cells": int(df.shape[0]),
        "n_table_cells": int(adata.n_obs),
        "n_matched": n_matched,
    }
    if onto_source is not None:
        params["ontology_level"] = onto_level if onto_source != "file" else "file"
        params["ontology_source"] = onto_source
    adata.uns[key_added] = params
    logger.info("add_10x_cell_types: %d of %d table cells annotated from %s.", n_matched, adata.n_obs, params["file"])
    return ref.finish(write=write, elements=("obs", "uns"))


# --------------------------------------------------------------------------------------------------------------------


def _find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass a cell_types.csv or its folder.")
    found = sorted(
        p for p in path.rglob("cell_types.csv*") if p.is_file() and p.name in ("cell_types.csv", "cell_types.csv.gz")
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"No cell_types.csv under {path.name!r}; pass the CSV itself.")
    raise FileNotFoundError(
        f"Several cell_types.csv under {path.name!r} ({[str(p.relative_to(path)) for p in found]}); pass the one "
        "you want (e.g. the Azimuth or the 10x_Cloud one)."
    )


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _canonical_columns(columns: pd.Index) -> dict[str, str]:
    rename: dict[str, str] = {}
    normed = {c: _norm(c) for c in columns}
    for canonical, aliases in COLUMN_ALIASES.items():
        for alias in aliases:  # aliases in priority order
            hit = next((c for c, n in normed.items() if n == alias and c not in rename), None)
            if hit is not None:
                rename[hit] = canonical
                break
    return rename


def _strip_suffix(ids: pd.Index) -> pd.Index:
    return pd.Index(ids.astype(str).str.replace(r"-\d+$", "", regex=True))


def _match_ids(adata: AnnData, df: pd.DataFrame, id_key: str | None) -> tuple[str, pd.Index, pd.Index]:
    """Pick the table ids that match the file best; returns (where they come from, table ids, file ids)."""
    file_ids = pd.Index(df.index.astype(str))
    if id_key is not None:
        if id_key not in adata.obs.columns:
            raise KeyError(f"obs has no column {id_key!r} (id_key). Columns: {list(adata.obs.columns)[:20]}.")
        candidates = {f"obs[{id_key!r}]": pd.Index(adata.obs[id_key].astype(str))}
    else:
        candidates = {"obs_names": pd.Index(adata.obs_names.astype(str))}
        for col in ("cell_id", "barcode", "barcodes", "cell_barcode"):
            if col in adata.obs.columns:
                candidates[f"obs[{col!r}]"] = pd.Index(adata.obs[col].astype(str))
    best: tuple[int, str, pd.Index, pd.Index] | None = None
    for name, ids in candidates.items():
        for strip in (False, True):
            t, f = (_strip_suffix(ids), _strip_suffix(file_ids)) if strip else (ids, file_ids)
            if strip and not f.is_unique:
                continue
            n = int(t.isin(f).sum())
            label = name + (" (suffix ignored)" if strip else "")
            if best is None or n > best[0]:
                best = (n, label, t, f)
    assert best is not None
    return best[1], best[2], best[3]


def _ontology_ids(labels: pd.Categorical, index: pd.Index) -> tuple[pd.Categorical, pd.Categorical]:
    """CL ids and names of ``labels`` (:func:`spatialcx.tl.add_ontology_ids`), on a scratch table (nothing half-written).

    Cells without a label get missing values; labels that no term fits get ``"unknown"`` (the CELLxGENE rule).
    """
    from anndata import AnnData

    from ..tl import add_ontology_ids

    labels = pd.Series(labels, index=pd.Index(index.astype(str)))
    known = labels.notna().to_numpy()
    scratch = AnnData(obs=pd.DataFrame({"label": pd.Categorical(labels[known].astype(str))}, index=labels.index[known]))
    add_ontology_ids(scratch, "label", target_key="ontology_term_id", label_key="ontology_label")
    out = []
    for col in ("ontology_term_id", "ontology_label"):
        vals = np.full(labels.size, np.nan, dtype=object)
        vals[known] = scratch.obs[col].astype(str).to_numpy()
        out.append(pd.Categorical(vals))
    return out[0], out[1]
