"""Cell types exported by 10x Genomics pipelines (Space Ranger / Xenium ``cell_types.csv``, clusters, Loupe exports)."""

from __future__ import annotations

import io
import lzma
import re
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.errors import ParserError, ParserWarning

from .._constants import UNKNOWN_ONTOLOGY_ID
from .._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Canonical column -> accepted spellings (compared lower-case, spaces and dashes as underscores).
#:
#: What the real files hold (see tests/test_tenx.py for the sources):
#:
#: - Cell Ranger / Space Ranger 10x Cloud ``cell_types/10x_Cloud/cell_types.csv``: ``barcode``, ``coarse_cell_type``,
#:   ``fine_cell_type``, then (added by the pipeline's low-UMI step) ``coarse_cell_type_unfiltered`` and ``umi_count``;
#:   cells under 100 UMIs get the coarse label ``Low UMI Barcode``. Some 10x Cloud exports add ``cell_count_in_model``.
#: - Pan-Human Azimuth ``cell_types/Azimuth/cell_types.csv``: ``barcode``, ``broad_cell_type``, ``coarse_cell_type``,
#:   ``fine_cell_type``, ``full_hierarchical_labels``, ``final_level_softmax_prob``, ``coarse_cell_type_unfiltered``,
#:   ``umi_count``; panhumanpy itself writes ``azimuth_broad`` / ``azimuth_medium`` / ``azimuth_fine`` and
#:   ``final_level_confidence``.
#: - Xenium Explorer cell groups: ``cell_id``, ``group`` (and ``color``).
#: - Cell Ranger / Space Ranger / Xenium Ranger ``analysis/clustering/*/clusters.csv``: ``Barcode``, ``Cluster``.
#: - Loupe Browser category exports: ``Barcode`` and one column named after the category (e.g. ``Graph-based``).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "barcode": ("barcode", "barcodes", "cell_id", "cell_barcode", "cellid", "cell"),
    "broad_cell_type": ("broad_cell_type", "azimuth_broad", "broad"),
    "coarse_cell_type": ("coarse_cell_type", "azimuth_medium", "medium_cell_type", "coarse"),
    "fine_cell_type": ("fine_cell_type", "azimuth_fine", "fine", "group", "cluster"),
    "coarse_cell_type_unfiltered": ("coarse_cell_type_unfiltered",),
    "hierarchy": ("azimuth_hierarchy", "hierarchy", "full_hierarchical_labels", "full_hierarchy"),
    "softmax_probability": (
        "softmax_probability",
        "final_level_softmax_prob",
        "final_level_confidence",
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
    "coarse_cell_type_unfiltered": "coarse_unfiltered",
    "hierarchy": "hierarchy",
    "softmax_probability": "probability",
    "umi_count": "umi_count",
    "cell_count_in_model": "cell_count_in_model",
}


def read_10x_cell_types(path: str | Path) -> pd.DataFrame:
    """Read a 10x ``cell_types.csv`` (Cell Ranger / Space Ranger cell type annotation), clusters or cell groups.

    The flavours recognised: Pan-Human Azimuth (broad, coarse and fine cell types, hierarchy, softmax probability,
    UMI count), 10x Cloud (coarse and fine cell types, unfiltered coarse type, UMI count, ``cell_count_in_model`` in
    some versions), Xenium Explorer cell groups (``cell_id``, ``group``), the clusters of Cell Ranger / Space Ranger /
    Xenium Ranger (``analysis/clustering/*/clusters.csv``: ``Barcode``, ``Cluster``) and Loupe Browser category exports
    (``Barcode`` and one column named after the category). Column names are normalised to ``broad_cell_type``,
    ``coarse_cell_type``, ``fine_cell_type`` (a Xenium Explorer ``group``, a ``Cluster``, or the one label column of a
    Loupe export), ``coarse_cell_type_unfiltered``, ``hierarchy``, ``softmax_probability``, ``umi_count``,
    ``cell_count_in_model`` (and ``ontology_term_id`` when the file has CL ids); other columns are kept as they are.

    Parameters
    ----------
    path
        The CSV (optionally gzipped; comma-, tab- or semicolon-separated); a folder holding one ``cell_types.csv``
        (directly or below, e.g. in an ``Azimuth`` / ``10x_Cloud`` subfolder) or, without one, one ``clusters.csv``
        (e.g. an ``analysis/clustering/gene_expression_graphclust`` folder); or a ``.zip`` / ``.tar(.gz)`` archive (such
        as Xenium's ``analysis.tar.gz``) holding one such file, found the same way.

    Returns
    -------
    A frame indexed by barcode / cell id (``str``, surrounding spaces removed, index name ``"barcode"``) with label
    columns as strings and numeric columns as numbers. ``df.attrs["source"]`` is ``"azimuth"``, ``"10x_cloud"``,
    ``"xenium_explorer"``, ``"10x_clusters"``, ``"loupe"`` or ``"unknown"``, ``df.attrs["file"]`` the file name (an
    archive member as ``archive/member``) and ``df.attrs["label_column"]`` the file's name of the column read as
    ``fine_cell_type`` (absent when there is none).

    Raises
    ------
    FileNotFoundError
        No such file, or no / several ``cell_types.csv`` (or, without one, ``clusters.csv``) in the folder or archive.
    ValueError
        Not a readable CSV (binary content, text that is not UTF-8, a truncated or damaged ``.gz``, a row with more
        fields than the header), a header without rows, no barcode column, no cell type column, duplicated barcodes,
        or non-numeric values in a numeric column.
    """
    path = _find_csv(Path(path).expanduser())
    name = path.name
    where = repr(str(path))  # errors name the file in full: a folder or an archive may hold several of that name
    try:
        member = _archive_member(path)
        source: Path | io.BytesIO = path
        if member is not None:  # a CSV inside a zip / tar archive
            name = f"{path.name}/{member[0]}"
            where = f"{member[0]!r} in the archive {str(path)!r}"
            source = io.BytesIO(member[1])
        compression, sep = _sniff(source, path.suffix if member is None else Path(member[0]).suffix)
        with warnings.catch_warnings():
            # rows with more (non-empty) fields than the header: an error rather than fields dropped in silence
            warnings.simplefilter("error", ParserWarning)
            raw = pd.read_csv(
                source,
                sep=sep,
                compression=compression,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                encoding="utf-8",
                index_col=False,  # never take the barcodes as an index (and the labels as barcodes) on ragged rows
            )
    except pd.errors.EmptyDataError as e:
        raise ValueError(
            f"{where} is empty; expected a header with a barcode and cell type columns, and a row per cell. Pass the "
            "file the 10x pipeline or Xenium Explorer wrote (copying or downloading it again if it was cut short)."
        ) from e
    except (PermissionError, FileNotFoundError):  # unreadable, or no / several candidate files in an archive
        raise
    except (
        UnicodeDecodeError,
        EOFError,
        OSError,
        zlib.error,
        lzma.LZMAError,
        zipfile.BadZipFile,
        tarfile.TarError,
        ParserError,
        ParserWarning,
    ) as e:
        fix = (
            "Pass the cell_types.csv (UTF-8 text, optionally gzipped) written by Cell Ranger / Space Ranger, copying "
            "or downloading it again if it was cut short."
        )
        if isinstance(e, UnicodeDecodeError):
            why = "its content is not UTF-8 text (a binary file, or text in another encoding?)"
        elif isinstance(e, ParserError | ParserWarning):
            why = (
                "a row has more fields than the header (a label holding the delimiter without quotes?), or the "
                "content is not CSV (a binary file?)"
            )
            fix = 'Quote the fields that hold the delimiter ("T cell, CD4"), or pass a CSV written by the 10x tools.'
        else:  # EOFError, zlib / lzma / zip errors, gzip.BadGzipFile (an OSError)
            why = "the file is truncated or damaged (an interrupted download or copy?)"
        raise ValueError(
            f"{where} is not a readable 10x cell_types CSV: {why}; {type(e).__name__}: {str(e).strip()}. {fix}"
        ) from e
    rename = _canonical_columns(raw.columns)
    loupe = False
    if "barcode" in rename.values() and not any(level in rename.values() for level in LEVELS):
        others = [c for c in raw.columns if c not in rename and _norm(c) != "color"]
        if len(others) == 1:  # a Loupe Browser export: Barcode and one column named after the category
            rename[others[0]] = "fine_cell_type"
            loupe = True
    df = raw.rename(columns=rename)
    if "barcode" not in df.columns:
        raise ValueError(
            f"{where} has no barcode / cell id column (columns: {list(raw.columns)}); expected one of "
            f"{list(COLUMN_ALIASES['barcode'])}. Rename the column that holds the barcodes / cell ids to 'barcode'."
        )
    if not any(level in df.columns for level in LEVELS):
        raise ValueError(
            f"{where} has no cell type column (columns: {list(raw.columns)}); expected at least one of "
            f"{list(LEVELS)} (or the Azimuth names azimuth_broad / azimuth_medium / azimuth_fine, or a Xenium "
            "Explorer 'group', a clusters.csv 'Cluster', or a Loupe Browser export's one category column)."
        )
    if df.shape[0] == 0:
        raise ValueError(
            f"{where} has a header ({list(raw.columns)}) but no rows: no cell was annotated. Was the annotation "
            "run cut short, or did it fail (see the pipeline's log / web summary)?"
        )
    df["barcode"] = df["barcode"].str.strip().replace("", np.nan)
    for col in set(rename.values()) - {"barcode", *_NUMERIC}:  # "a-1, T cell" (a space after the comma): "T cell"
        codes, labels = pd.factorize(df[col])  # strip each distinct label once, not each row's
        labels = pd.Series(labels, dtype=object).str.strip().replace("", np.nan).to_numpy(dtype=object)
        df[col] = np.append(labels, np.nan)[codes]
    if df["barcode"].isna().any():
        missing = df.index[df["barcode"].isna()]
        raise ValueError(
            f"{where} has {missing.size} row(s) without a barcode / cell id (e.g. data row {int(missing[0]) + 1}): "
            "their labels cannot be given to any cell. Remove those rows, or fill in their ids."
        )
    dup = df["barcode"][df["barcode"].duplicated()].unique()
    if dup.size:
        hint = (
            " It has a sample_name column (an aggregated all_cell_types.csv?): write one sample's rows to a CSV of "
            "their own and pass that."
            if "sample_name" in df.columns
            else " Is it a concatenation of several samples? Split it per sample."
        )
        raise ValueError(
            f"{where} lists {dup.size} barcode(s) more than once (e.g. {list(dup[:3])}); each cell must appear "
            f"once.{hint}"
        )
    for col in _NUMERIC:
        if col in df.columns:
            num = pd.to_numeric(df[col], errors="coerce")
            bad = num.isna() & df[col].notna()
            if bad.any():
                file_col = next(c for c, canonical in rename.items() if canonical == col)
                raise ValueError(
                    f"{where}: column {file_col!r} (read as {col!r}) has {int(bad.sum())} non-numeric value(s) such as "
                    f"{df.loc[bad, col].iloc[0]!r}; it must hold numbers. Fix those values, or rename the column if it "
                    "is not the 10x one of that name."
                )
            df[col] = num
    df = df.set_index("barcode")
    df.index = df.index.astype(str)
    df.index.name = "barcode"
    df.attrs["source"] = "loupe" if loupe else _source(Path(name) if member else path, df.columns, raw.columns)
    df.attrs["file"] = name
    label_column = next((c for c, canonical in rename.items() if canonical == "fine_cell_type"), None)
    if label_column is not None:
        df.attrs["label_column"] = str(label_column)
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
        obs column holding the ids of the CSV. By default the ids that pair the most cells among the table's instance
        key (``uns["spatialdata_attrs"]["instance_key"]``), ``obs["cell_id"]``, ``obs["barcode"]`` and ``obs_names``,
        in that order of preference on a tie (a warning names a rival that pairs cells differently). Ids are compared
        as text (bytes decoded, ``1.0`` as ``1``); a ``-1``-style suffix is ignored when that is needed to match,
        unless two table ids that differ only by it (``AAAC-1``, ``AAAC-2``: two samples) would share one file row.
        Visium HD cell ids ``cellid_000000042-1`` then also match the bare number ``42`` that tables built from Space
        Ranger's ``cell_segmentations.geojson`` hold.
    add_ontology
        Add CL ids (:func:`spatialcx.tl.map_labels`), unless the file has them: of each cell's finest label that a term
        fits, so a cell with the fine label "Fine Not Confidently Annotated" and the coarse label "T cell" gets the T
        cell id; cells 10x filtered out ("Low UMI Barcode") get ``"unknown"``.
    copy
        Return a copy instead of writing into ``data``.
    write
        Persist the new keys into the zarr store when ``data`` is a backed SpatialData.

    Returns
    -------
    ``None``, or a copy of ``data`` when ``copy=True``. Writes obs columns ``{key_added}_broad``,
    ``{key_added}_coarse``, ``{key_added}_fine``, ``{key_added}_coarse_unfiltered``, ``{key_added}_hierarchy``
    (categorical; cluster numbers in numeric order), ``{key_added}_probability``, ``{key_added}_umi_count``,
    ``{key_added}_cell_count_in_model`` (float; those present in the file; missing for cells not in it),
    ``{key_added}_ontology_term_id`` and
    ``{key_added}_ontology_label`` (CL id and name of the finest level, ``"unknown"`` where no term fits; with
    ``add_ontology``, or the ids of the file), and ``uns[key_added]`` (source, file name, ids matched by, level used
    for the CL ids, matching counts, columns written). Columns that an earlier call with the same ``key_added`` wrote
    and this one does not are removed; replacing an obs column it did not write is logged as a warning. Fewer than
    half of the table's cells in the file, table cells that share an id (and so one file row), and a file without any
    label are logged as warnings.

    Raises
    ------
    KeyError
        ``id_key`` is not an obs column.
    ValueError
        No cell of the file matches the table (the message shows the ids tried), or a frame passed as ``path`` is not
        one :func:`read_10x_cell_types` returns.
    """
    from .._table import check_key, resolve_table

    check_key(key_added)
    df = path if isinstance(path, pd.DataFrame) else read_10x_cell_types(path)
    if isinstance(path, pd.DataFrame):
        if df.index.name != "barcode" or not any(lvl in df.columns for lvl in LEVELS):
            raise ValueError(
                "A frame passed as path must be the output of read_10x_cell_types (indexed by barcode, with cell type "
                "columns)."
            )
        dup = df.index[df.index.duplicated()].unique()
        if dup.size:
            raise ValueError(
                f"The frame passed as path lists {dup.size} barcode(s) more than once (e.g. {list(dup[:3])}); each "
                "cell must appear once (keep one sample's rows)."
            )

    ref = resolve_table(data, table_key, copy=copy, write=write)
    adata = ref.adata
    id_source, pos = _match_ids(adata, df, id_key)
    matched = pos >= 0
    n_matched = int(matched.sum())
    hits = np.bincount(pos[matched], minlength=df.shape[0])
    n_file_unmatched = int(df.shape[0] - np.count_nonzero(hits))
    file_name = df.attrs.get("file", "the file")
    n_shared = int(hits[hits > 1].sum())
    if n_shared:  # one file cell given to several table cells: ids repeated in the table, e.g. of several samples
        shared = pd.unique(df.index.to_numpy()[np.flatnonzero(hits > 1)])
        logger.warning(
            "add_10x_cell_types: %d table cells share their id (matched by %s) with another table cell and got the "
            "same row of %s (%d file cells, e.g. %s). Are cells of several samples concatenated in the table? Annotate "
            "one sample's cells at a time, or pass id_key= an obs column whose ids are unique.",
            n_shared,
            id_source,
            file_name,
            shared.size,
            list(shared[:3]),
        )
    if n_matched < 0.5 * adata.n_obs:
        logger.warning(
            "add_10x_cell_types: only %d of %d table cells (%.0f%%) are in %s (matched by %s); the others get missing "
            "values. %d of the file's %d cells are not in the table. Is the file from another sample or section? "
            "Pass id_key= to match by another obs column.",
            n_matched,
            adata.n_obs,
            100 * n_matched / max(adata.n_obs, 1),
            file_name,
            id_source,
            n_file_unmatched,
            df.shape[0],
        )
    elif n_file_unmatched:
        logger.info("add_10x_cell_types: %d cells of %s are not in the table.", n_file_unmatched, file_name)

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
            new_cols[f"{key_added}_{short}"] = _labels_categorical(vals)

    levels = [lvl for lvl in LEVELS if lvl in df.columns]
    if all(new_cols[f"{key_added}_{_OUT_NAMES[lvl]}"].isna().all() for lvl in levels):
        logger.warning(
            "add_10x_cell_types: none of the %d matched cells has a label in %s (columns %s are empty): all cells get "
            "missing values. Was the file exported before the cells were grouped?",
            n_matched,
            file_name,
            [df.attrs.get("label_column", lvl) if lvl == "fine_cell_type" else lvl for lvl in levels],
        )
    onto_level = levels[-1]
    onto_key = f"{key_added}_ontology_term_id"
    onto_source = None
    if "ontology_term_id" in df.columns:
        vals = np.where(matched, df["ontology_term_id"].to_numpy()[take].astype(object), None)
        new_cols[onto_key] = pd.Categorical(pd.Series(vals, dtype=object).where(lambda s: s.notna(), np.nan))
        onto_source = "file"
    elif add_ontology:
        ids, names, per_level = _ontology_ids([new_cols[f"{key_added}_{_OUT_NAMES[lvl]}"] for lvl in levels], levels)
        new_cols[onto_key] = ids
        new_cols[f"{key_added}_ontology_label"] = names
        onto_source = "spatialcx.tl.map_labels"

    previous = _previous_columns(adata, key_added)
    foreign = [k for k in new_cols if k in adata.obs.columns and k not in previous]
    if foreign:
        logger.warning(
            "add_10x_cell_types: replacing the obs column(s) %s, which an earlier add_10x_cell_types(key_added=%r) did "
            "not write; pass another key_added to keep them.",
            foreign,
            key_added,
        )
    stale = [k for k in previous if k not in new_cols and k in adata.obs.columns]
    if stale:  # written by an earlier call with this key_added from another file: they would not match the new ones
        adata.obs.drop(columns=stale, inplace=True)
    for k, v in new_cols.items():
        adata.obs[k] = v
    params: dict[str, Any] = {
        "function": "add_10x_cell_types",
        "source": df.attrs.get("source", "unknown"),
        "file": df.attrs.get("file", ""),
        "id_source": id_source,
        "levels": levels,
        "columns": list(new_cols),
        "label_column": df.attrs.get("label_column", ""),
        "n_file_cells": int(df.shape[0]),
        "n_table_cells": int(adata.n_obs),
        "n_matched": n_matched,
        "n_file_cells_not_in_table": n_file_unmatched,
    }
    if onto_source is not None:
        params["ontology_level"] = onto_level if onto_source != "file" else "file"
        params["ontology_source"] = onto_source
    if onto_source == "spatialcx.tl.map_labels":
        params["ontology_cells_per_level"] = per_level
    adata.uns[key_added] = params
    logger.info("add_10x_cell_types: %d of %d table cells annotated from %s.", n_matched, adata.n_obs, params["file"])
    return ref.finish(write=write, elements=("obs", "uns"))


# --------------------------------------------------------------------------------------------------------------------


#: File names looked for in a folder or an archive: cell types first; clusters only when there are none.
_CELL_TYPE_NAMES = ("cell_types.csv", "cell_types.csv.gz")
_CLUSTER_NAMES = ("clusters.csv", "clusters.csv.gz")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _pick(names: list[str], where: str, how: str) -> str:
    """The one ``cell_types.csv`` among ``names`` (paths), else the one ``clusters.csv``; a clear error otherwise."""
    for wanted in (_CELL_TYPE_NAMES, _CLUSTER_NAMES):
        found = sorted(n for n in names if n.rsplit("/", 1)[-1] in wanted)
        if len(found) == 1:
            return found[0]
        if found:
            raise FileNotFoundError(
                f"Several {wanted[0]} in {where} ({found}); {how} (e.g. the Azimuth or the 10x_Cloud cell types, or "
                "the gene_expression_graphclust clusters)."
            )
    raise FileNotFoundError(
        f"No cell_types.csv or clusters.csv in {where}; pass the CSV itself (a Xenium Explorer cell groups or Loupe "
        "Browser export is a CSV of any name)."
    )


def _find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass a cell_types.csv or its folder.")
    names = [p.relative_to(path).as_posix() for p in path.rglob("*.csv*") if p.is_file()]
    if not any(n.rsplit("/", 1)[-1] in _CELL_TYPE_NAMES + _CLUSTER_NAMES for n in names):
        # e.g. a Xenium output folder: its clusters are inside analysis.tar.gz (*.zarr.zip are zarr stores, not CSVs)
        archives = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file()
            and (p.name.lower().endswith(_TAR_SUFFIXES) or (p.suffix.lower() == ".zip" and ".zarr" not in p.name))
        )
        if archives:
            raise FileNotFoundError(
                f"No cell_types.csv or clusters.csv in {str(path)!r}, only inside archives ({archives}). Extract the "
                "one with the cell types or clusters (a Xenium output's are in analysis.tar.gz) and pass the CSV you "
                "want, e.g. analysis/clustering/gene_expression_graphclust/clusters.csv, or pass an archive that holds "
                "one such CSV."
            )
    return path / _pick(names, f"{path.name!r}", "pass the one you want")


def _archive_member(path: Path) -> tuple[str, bytes] | None:
    """``(member name, content)`` of the CSV in a zip / tar archive; ``None`` for a plain file.

    The archive's only file, or its one ``cell_types.csv`` (else its one ``clusters.csv``).
    """
    lower = path.name.lower()
    how = "extract it (e.g. with unzip or tar) and pass the file you want"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [i.filename for i in z.infolist() if not i.is_dir()]
            member = names[0] if len(names) == 1 else _pick(names, f"the archive {path.name!r}", how)
            return member, z.read(member)
    if lower.endswith(_TAR_SUFFIXES):
        with tarfile.open(path) as t:
            files = {m.name: m for m in t.getmembers() if m.isfile()}
            member = next(iter(files)) if len(files) == 1 else _pick(list(files), f"the archive {path.name!r}", how)
            f = t.extractfile(files[member])
            assert f is not None  # a regular file
            return member, f.read()
    return None


_GZIP_MAGIC = b"\x1f\x8b"
#: Labels with which 10x marks a cell it filtered out (10x Cloud low-UMI cells keep their fine label).
_FILTERED_RE = re.compile(r"(?i)\blow[ _]umi\b")


def _sniff(source: Path | io.BytesIO, suffix: str) -> tuple[str, str]:
    """The compression (gzip by content, else from the name) and the delimiter (``,``, tab or ``;``) of ``source``."""
    import gzip

    f = open(source, "rb") if isinstance(source, Path) else source  # closed in the finally below
    try:
        gzipped = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        compression = "gzip" if gzipped else "infer"
        if not gzipped and suffix.lower() in (".gz", ".bz2", ".xz", ".zip", ".zst", ".tar", ".tgz"):
            # compressed otherwise (pandas decompresses it), or a .gz that is not gzip (damaged)
            return compression, ","
        if gzipped:
            with gzip.GzipFile(fileobj=f) as g:  # closing it leaves f open
                head = g.readline(65_536)
        else:
            head = f.readline(65_536)
    finally:
        if isinstance(source, Path):
            f.close()
        else:
            source.seek(0)
    text = head.decode("utf-8", errors="replace")
    counts = {d: text.count(d) for d in (",", "\t", ";")}
    sep = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    return compression, sep


_AZIMUTH_COLUMNS = {"broad_cell_type", "hierarchy", "softmax_probability"}


def _source(path: Path, columns: pd.Index, raw_columns: pd.Index) -> str:
    """Which pipeline wrote the file: the folder 10x names it after, else its columns."""
    folders = {p.lower() for p in path.parts[-3:-1]}
    if "azimuth" in folders:
        return "azimuth"
    if "10x_cloud" in folders:
        return "10x_cloud"
    if _AZIMUTH_COLUMNS & set(columns):
        return "azimuth"
    if {"cell_count_in_model", "coarse_cell_type_unfiltered", "umi_count"} & set(columns):
        return "10x_cloud"
    normed = {_norm(c) for c in raw_columns}
    if "group" in normed and "fine_cell_type" in columns:
        return "xenium_explorer"
    if "cluster" in normed and "fine_cell_type" in columns:
        return "10x_clusters"
    return "unknown"


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
    """Ids without a ``-1``-style suffix, and Visium HD's ``cellid_000000042-1`` as ``42``.

    Space Ranger names segmented cells ``cellid_<zero-padded number>-1`` in its matrices and outputs, while the
    polygons in ``cell_segmentations.geojson`` (and tables built from them) carry the bare number. String methods rather
    than regular expressions: this runs over every id of the table and the file.
    """
    return pd.Index(np.array([_strip_one(x) for x in ids.astype(str)], dtype=object))


def _strip_one(x: str) -> str:
    head, dash, tail = x.rpartition("-")
    if dash and tail.isdecimal():
        x = head
    if x.startswith("cellid_") and x[7:].isdecimal():
        x = x[7:].lstrip("0") or "0"
    return x


def _as_ids(values: Any) -> pd.Index:
    """Ids as comparable strings: bytes decoded, whole floats without ``.0`` (1.0 -> "1"), outer spaces removed.

    Missing ids (``NaN``, ``None``) become ``"<NA>"`` / ``"nan"`` / ``"None"``, which no file barcode is.
    """
    s = pd.Series(np.asarray(values, dtype=object) if not isinstance(values, pd.Series) else values).reset_index(
        drop=True
    )
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(s.cat.categories.dtype if s.notna().all() else object)
    if s.dtype.kind == "f" and bool((s.dropna() % 1 == 0).all()):  # integer ids, float once a missing one crept in
        s = s.astype("Int64")
    elif s.dtype == object and pd.api.types.infer_dtype(s, skipna=True) != "string":
        s = s.map(lambda v: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v)
    return pd.Index(s.astype(str).str.strip())


def _id_candidates(adata: AnnData, id_key: str | None) -> dict[str, pd.Index]:
    """Table ids to try, most specific first: the instance key of a SpatialData table, id columns, then obs_names."""
    from .._table import obs_column

    if id_key is not None:
        if id_key not in adata.obs.columns:
            raise KeyError(f"obs has no column {id_key!r} (id_key). Columns: {list(adata.obs.columns)[:20]}.")
        return {f"obs[{id_key!r}]": _as_ids(obs_column(adata, id_key))}
    attrs = adata.uns.get("spatialdata_attrs")
    instance_key = attrs.get("instance_key") if isinstance(attrs, dict) else None
    columns = [instance_key] if isinstance(instance_key, str) else []
    columns += ["cell_id", "barcode", "barcodes", "cell_barcode"]
    out = {f"obs[{c!r}]": _as_ids(obs_column(adata, c)) for c in dict.fromkeys(columns) if c in adata.obs.columns}
    out["obs_names"] = _as_ids(adata.obs_names)
    return out


def _conflict(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two pairings send a cell to two different file rows."""
    both = (a >= 0) & (b >= 0)
    return bool((a[both] != b[both]).any())


def _match_ids(adata: AnnData, df: pd.DataFrame, id_key: str | None) -> tuple[str, np.ndarray]:
    """Pair the table's cells with the file's rows; returns (which ids matched, the file row of each cell or -1).

    Each candidate id source is tried as it is, then, unless one of them pairs every table cell or every file row that
    way, with a ``-1``-style suffix removed on both sides (unless that makes two different table ids, e.g. ``AAAC-1``
    and ``AAAC-2`` of two samples, share one file row). The one pairing the most cells wins; on a tie the more specific
    source (an id column before ``obs_names``) wins, and a tie or a near-tie with a different pairing is reported.
    """
    file_ids = _as_ids(df.index)
    file_stripped: pd.Index | None = None
    tried: list[tuple[int, str, np.ndarray]] = []
    collisions: list[str] = []
    candidates = _id_candidates(adata, id_key)
    exact = {name: file_ids.get_indexer(ids) for name, ids in candidates.items()}
    # ids that pair every table cell, or every file row, as they are: ignoring the suffix is not needed (it could only
    # pair more cells by giving a file row to a second table id, e.g. AAAC-2 the row of AAAC-1, which is refused)
    explained = any(
        (pos >= 0).all() or np.count_nonzero(np.bincount(pos[pos >= 0], minlength=len(file_ids))) == len(file_ids)
        for pos in exact.values()
    )
    for name, ids in candidates.items():
        pos = exact[name]
        tried.append((int((pos >= 0).sum()), name, pos))
        if explained:
            continue
        if file_stripped is None:  # only when needed: a Python loop over the file's ids
            file_stripped = _strip_suffix(file_ids)
        if not file_stripped.is_unique:
            continue
        # an id equal to a file id keeps that row without its suffix too (the stripped file ids are unique): only the
        # ids not paired as they are go through the (Python) suffix loop
        miss = np.flatnonzero(pos < 0)
        pos = pos.copy()
        pos[miss] = file_stripped.get_indexer(_strip_suffix(ids[miss]))
        hit = pos >= 0
        sel = hit & (np.bincount(pos[hit], minlength=len(file_ids)) > 1)[np.maximum(pos, 0)]  # rows hit twice or more
        pairs = pd.DataFrame({"id": np.asarray(ids)[sel], "pos": pos[sel]}).drop_duplicates()
        shared = pairs[pairs["pos"].duplicated(keep=False)]
        if not shared.empty:
            row = shared["pos"].iloc[0]
            same = sorted(shared.loc[shared["pos"] == row, "id"])[:3]
            collisions.append(f"{name} (e.g. {same} would all get the row of {file_ids[row]!r})")
            continue
        tried.append((int(hit.sum()), f"{name} (suffix ignored)", pos))
    best = max(tried, key=lambda t: t[0])  # max keeps the first of equals: the more specific source
    n, name, pos = best
    if n == 0:
        examples = "; ".join(f"{k} such as {list(v[:3])}" for k, v in candidates.items())
        note = (
            " Ignoring the '-1'-style suffix would pair several table cells with one file cell: "
            f"{'; '.join(collisions)}"
            " (cells of several samples? annotate one sample's cells at a time)."
            if collisions
            else ""
        )
        raise ValueError(
            f"None of the {df.shape[0]} cells of the file match the {adata.n_obs} cells of the table (file ids such as "
            f"{list(file_ids[:3])}; table ids tried: {examples}).{note} Pass id_key= the obs column holding the 10x "
            "barcodes / cell ids."
        )
    rivals = [t for t in tried if t[0] >= 0.5 * n and _conflict(t[2], pos)]
    if rivals:
        logger.warning(
            "add_10x_cell_types: matched the file by %s (%d cells), but %s pairs %d cells differently; pass id_key= "
            "to choose the ids to match by.",
            name,
            n,
            rivals[0][1],
            rivals[0][0],
        )
    return name, pos


def _labels_categorical(values: pd.Series) -> pd.Categorical:
    """Labels as a categorical; cluster numbers (``1``, ``2``, ``10``) in numeric rather than text order."""
    cat = pd.Categorical(values)
    numbers = pd.to_numeric(pd.Series(cat.categories), errors="coerce")
    if len(numbers) > 1 and numbers.notna().all():
        cat = cat.reorder_categories(cat.categories[np.argsort(numbers.to_numpy(), kind="stable")])
    return cat


def _previous_columns(adata: AnnData, key_added: str) -> list[str]:
    """Obs columns that an earlier :func:`add_10x_cell_types` with this ``key_added`` wrote (per its ``uns`` entry)."""
    prev = adata.uns.get(key_added)
    if not isinstance(prev, dict) or "id_source" not in prev or "n_file_cells" not in prev:
        return []
    cols = prev.get("columns")
    return [str(c) for c in cols] if cols is not None and not isinstance(cols, str) else []


def _ontology_ids(
    columns: list[pd.Categorical], levels: list[str]
) -> tuple[pd.Categorical, pd.Categorical, dict[str, int]]:
    """CL ids and names of each cell's finest label that a term fits (:func:`spatialcx.tl.map_labels`).

    ``columns`` holds the labels of ``levels`` (coarse to fine). A cell whose fine label fits no term ("Fine Not
    Confidently Annotated", "Unassigned") takes the id of its coarse label, then of its broad one; a cell that 10x
    filtered out ("Low UMI Barcode" at any level) is ``"unknown"``, as is one that no level fits (the CELLxGENE rule).
    Cells without a label get missing values. Also returns the number of cells that took their id from each level.
    """
    from ..tl import map_labels

    cats = [pd.Categorical(c) for c in columns]
    distinct = pd.unique(np.concatenate([np.asarray(c.categories, dtype=object).astype(str) for c in cats]))
    mapping = map_labels(list(distinct))
    ids_of, names_of = mapping.to_dict(), mapping.names()
    n = len(cats[0])
    ids = np.full(n, UNKNOWN_ONTOLOGY_ID, dtype=object)
    names = np.full(n, UNKNOWN_ONTOLOGY_ID, dtype=object)
    source = np.full(n, -1)
    filtered = np.zeros(n, dtype=bool)
    for k, labels in enumerate(cats):  # coarse to fine: a finer level that fits overwrites; per category, not cell
        text = np.asarray(labels.categories, dtype=object).astype(str)
        codes = labels.codes
        has = codes >= 0
        filtered |= has & np.append(pd.Series(text).str.contains(_FILTERED_RE).to_numpy(), False)[codes]
        term = np.array([ids_of.get(t, UNKNOWN_ONTOLOGY_ID) for t in text] + [UNKNOWN_ONTOLOGY_ID], dtype=object)
        name = np.array([names_of.get(t, UNKNOWN_ONTOLOGY_ID) for t in text] + [UNKNOWN_ONTOLOGY_ID], dtype=object)
        fits = has & (term[codes] != UNKNOWN_ONTOLOGY_ID)
        ids[fits], names[fits], source[fits] = term[codes[fits]], name[codes[fits]], k
    ids[filtered], names[filtered], source[filtered] = UNKNOWN_ONTOLOGY_ID, UNKNOWN_ONTOLOGY_ID, -1
    labelled = np.any([c.codes >= 0 for c in cats], axis=0)
    ids[~labelled], names[~labelled] = np.nan, np.nan
    per_level = {lvl: int((source == k).sum()) for k, lvl in enumerate(levels)}
    per_level["unknown"] = int((labelled & (source < 0)).sum())
    return pd.Categorical(ids), pd.Categorical(names), per_level
