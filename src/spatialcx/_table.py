"""Resolve ``AnnData | SpatialData`` + ``table_key`` to a table, and persist table changes crash-safely.

Contract
--------
``resolve_table(data, table_key="table", *, copy=False) -> TableRef``
    ``TableRef.adata`` is the AnnData table (a deep copy when ``copy=True``), ``TableRef.sdata`` the SpatialData or
    ``None``, ``TableRef.table_key`` the key. ``TableRef.finish(*, write=True, elements=("obs", "obsm", "uns"))``
    returns the copy when ``copy=True`` (AnnData for AnnData input; for SpatialData input a new in-memory SpatialData
    that shares the other elements and holds the copied table). Otherwise it persists the given elements into the
    zarr store when the SpatialData is backed by one and ``write=True``, and returns ``None``.
``get_table(data, table_key="table") -> AnnData``
``write_table(sdata, table_key="table", *, elements=("obs", "obsm", "uns")) -> None`` (public: ``scx.io.write_table``)

How a table is written into a zarr store
----------------------------------------
A SpatialData store keeps table ``key`` as the zarr group ``<store>/tables/<key>`` (anndata's on-disk layout: one
sub-group or array per element, ``X``, ``obs``, ``obsm``, ``uns``, ...). :func:`write_table` never edits that group in
place. Holding an exclusive lock on the store directory, it

1. stages a complete new table group in ``<store>/.spatialcx/stage-<random>/<key>``: every element that is *not*
   written (``X``, ``layers``, ``raw``, ``var``, ...) is hard-linked file by file (nothing is copied or rewritten, the
   chunk files keep their inode), the group's own metadata files are copied, and the written elements
   (``obs``, ``obsm``, ``uns`` by default) are written fresh with :func:`anndata.io.write_elem` and synced to disk;
2. swaps the staged group with the live one in one atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux). Where the
   exchange is not available, the live group is renamed aside to ``<store>/.spatialcx/aside/<key>`` and the staged
   one renamed in; a crash between the two renames leaves the table aside, and the next write (of any table in that
   store) restores it before doing anything else;
3. deletes the old group (its hard links; the shared chunk files stay with the new group), removes the work
   directory, and refreshes the store's consolidated metadata when the store has it (zarr v2 ``.zmetadata``, the
   undotted ``zmetadata`` that some copies carry, or zarr v3 ``consolidated_metadata`` in the root ``zarr.json``).

An interrupted write therefore leaves either the old or the new table in place, never a partial one, and the next
write removes its leftovers. The hidden work directory holds no zarr metadata, so zarr and spatialdata do not read
it as part of the hierarchy. The store's zarr format (v2 or v3) is kept: staged groups are written in the format of
the group they replace. A table that is in memory but not yet in the store is written whole with spatialdata's table
writer into the work directory and renamed into ``tables/`` when complete. Shapes elements (the polygons of
spatial domains) are replaced the same way by :func:`write_shapes_element`: written whole into the work directory,
then exchanged with the live element (set aside in ``<store>/.spatialcx/aside-shapes/<key>`` where no exchange is
available).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anndata import AnnData

from ._settings import logger

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import zarr
    from spatialdata import SpatialData

__all__ = ["TableRef", "get_table", "resolve_table", "write_table"]

#: Hidden work directory inside a store: staging and set-aside tables live here during a write.
WORK_DIR = ".spatialcx"
#: Elements of a table that :func:`write_table` may rewrite. ``X``, ``layers`` and ``raw`` hold the expression
#: values (raw counts) and are never rewritten.
WRITABLE_ELEMENTS = ("obs", "obsm", "obsp", "uns", "var", "varm", "varp")
_EXPRESSION_ELEMENTS = ("X", "layers", "raw")
#: Keyed elements of a table whose keys a new table stores (spatialdata checks them all when it opens the store).
_TABLE_ELEMENTS = ("obs", "obsm", "obsp", "var", "varm", "varp", "uns", "layers")
_ATTRS_KEY = "spatialdata_attrs"
_LINK_KEYS = ("region", "region_key", "instance_key")
_V2_METADATA_FILES = (".zarray", ".zgroup", ".zattrs")
#: Where a shapes element replaced without an atomic exchange waits (inside the work directory) until it is removed.
_SHAPES_ASIDE = "aside-shapes"


# --------------------------------------------------------------------------------------------------------------------
# Resolving the table
# --------------------------------------------------------------------------------------------------------------------


def _is_spatialdata(data: Any) -> bool:
    """Whether ``data`` is a SpatialData object, without importing spatialdata when it was never imported."""
    sd = sys.modules.get("spatialdata")
    return sd is not None and isinstance(data, sd.SpatialData)


def _check_data(data: Any) -> None:
    if not isinstance(data, AnnData) and not _is_spatialdata(data):
        raise TypeError(
            f"Expected an AnnData or a SpatialData object, got {type(data).__module__}.{type(data).__qualname__}. "
            "Pass the cell table itself (AnnData) or the SpatialData object that holds it."
        )


def _table_from_sdata(sdata: SpatialData, table_key: str) -> AnnData:
    if not isinstance(table_key, str):
        raise TypeError(f"table_key must be a str naming a table of the SpatialData object, got {table_key!r}.")
    if table_key not in sdata.tables:
        available = sorted(sdata.tables.keys())
        if not available:
            raise KeyError(
                f"Table {table_key!r} not found: the SpatialData object has no tables. Add one with "
                f"`sdata.tables[{table_key!r}] = TableModel.parse(adata, region=..., region_key=..., instance_key=...)`."
            )
        raise KeyError(
            f"Table {table_key!r} not found in the SpatialData object. Available tables: {available}. "
            f"Pass one of them as table_key."
        )
    return sdata.tables[table_key]


@dataclass
class TableRef:
    """A resolved table and where it came from.

    Attributes
    ----------
    adata
        The AnnData table to read and modify (a deep copy when resolved with ``copy=True``).
    sdata
        The SpatialData object holding the table, or ``None`` for AnnData input.
    table_key
        Key of the table in ``sdata.tables`` (ignored for AnnData input).
    copy
        Whether ``adata`` is a copy.
    """

    adata: AnnData
    sdata: SpatialData | None
    table_key: str
    copy: bool = False
    #: obs, obsm and uns as they were when the table was resolved (backed SpatialData only): restored when writing
    #: into the store fails, so that the object in memory and the store still agree.
    before: tuple[Any, dict[str, Any], dict[str, Any]] | None = None
    #: The categories of each categorical obs column that has colours in ``uns[f"{column}_colors"]`` (scanpy's and
    #: spatialdata-plot's palettes), when the table was resolved: colours of columns whose categories change are
    #: dropped by :meth:`finish`, or they would be drawn for other categories.
    colored: dict[str, list[Any]] | None = None

    def __post_init__(self) -> None:
        if self.colored is None:
            self.colored = _colored_categories(self.adata)

    def drop_stale_colors(self) -> bool:
        """Remove ``uns[f"{column}_colors"]`` of the columns whose categories changed; whether any was removed."""
        stale = [
            column
            for column, categories in (self.colored or {}).items()
            if f"{column}_colors" in self.adata.uns
            and _colored_categories(self.adata, [column]).get(column) != categories
        ]
        for column in stale:
            del self.adata.uns[f"{column}_colors"]
        if stale:
            logger.info("the colours of %s were removed: their categories changed (plots choose new ones)", stale)
        return bool(stale)

    def snapshot(self) -> None:
        """Keep obs, obsm and uns as they are now (unless already kept), so that :meth:`restore` can put them back."""
        if self.before is None:
            self.before = (self.adata.obs.copy(), dict(self.adata.obsm), _copy_uns(self.adata.uns))

    def restore(self) -> None:
        """Put back obs, obsm and uns as they were when the snapshot was taken (a no-op without one)."""
        if self.before is None:
            return
        obs, obsm, uns = self.before
        self.adata.obs = obs
        for key in list(self.adata.obsm.keys()):
            if key not in obsm:
                del self.adata.obsm[key]
        for key, value in obsm.items():
            self.adata.obsm[key] = value
        self.adata.uns.clear()
        self.adata.uns.update(uns)

    def finish(
        self, *, write: bool = True, elements: Iterable[str] = ("obs", "obsm", "uns")
    ) -> AnnData | SpatialData | None:
        """Hand back the result of a function that changed the table.

        Parameters
        ----------
        write
            Persist the changed elements into the zarr store when the SpatialData object is backed by one. Ignored for
            copies, AnnData input and SpatialData objects held in memory only.
        elements
            The table elements that changed (see :func:`write_table`).

        Returns
        -------
        The copy (AnnData for AnnData input, otherwise a new in-memory SpatialData that shares the other elements and
        holds the copied table) when the table was resolved with ``copy=True``, else ``None``.
        """
        if self.drop_stale_colors() and "obs" in tuple(elements):
            elements = (*tuple(elements), "uns") if "uns" not in tuple(elements) else tuple(elements)
        if self.copy:
            if self.sdata is None:
                return self.adata
            from spatialdata import SpatialData

            sdata = self.sdata
            tables = {k: v for k, v in sdata.tables.items() if k != self.table_key}
            tables[self.table_key] = self.adata
            return SpatialData(
                images=dict(sdata.images),
                labels=dict(sdata.labels),
                points=dict(sdata.points),
                shapes=dict(sdata.shapes),
                tables=tables,
                attrs=dict(sdata.attrs),
            )
        if self.sdata is None:
            return None
        if self.sdata.tables.get(self.table_key) is not self.adata:
            # the caller replaced the table object (e.g. a subset): put it into the SpatialData object
            self.sdata.tables[self.table_key] = self.adata
        if write and self.sdata.path is not None:
            try:
                write_table(self.sdata, self.table_key, elements=elements)
            except BaseException as e:  # a Ctrl-C too: memory and the store must still agree
                if getattr(e, WRITTEN_ATTR, False):  # the store holds the results: memory must keep them too
                    raise
                self.restore()
                e.add_note(
                    f"The results were not written into {self.sdata.path}, and the table in memory was left as it "
                    "was. To keep results in memory only, pass write=False (or copy=True); to save them elsewhere, "
                    "write the SpatialData object to a new path (sdata.write(...))."
                )
                raise
        return None


def resolve_table(
    data: AnnData | SpatialData, table_key: str = "table", *, copy: bool = False, write: bool = False
) -> TableRef:
    """Find the table of ``data``.

    Parameters
    ----------
    data
        An AnnData table, or a SpatialData object holding the table in ``data.tables[table_key]``.
    table_key
        Key of the table in a SpatialData object; ignored for AnnData input.
    copy
        Work on a deep copy of the table and leave ``data`` untouched.
    write
        The caller will persist its changes with ``finish(write=True)``: for a SpatialData backed by a zarr store,
        obs, obsm and uns are kept aside so that a failed write can put them back.

    Returns
    -------
    A :class:`TableRef`; call its ``finish`` method when done to persist changes or get the copy.

    Raises
    ------
    TypeError
        If ``data`` is neither an AnnData nor a SpatialData object.
    KeyError
        If the SpatialData object has no table ``table_key`` (the message lists the available tables).
    """
    _check_data(data)
    if isinstance(data, AnnData):
        if copy:
            # a backed AnnData copies only to a file; the copy returned is an in-memory one
            adata = data.to_memory() if data.isbacked else _actual_copy(data)
            return TableRef(adata=adata, sdata=None, table_key=table_key, copy=True)
        if data.is_view:
            # as scanpy does: turn the view into an actual AnnData so that changes land in the object itself (a view
            # of a backed AnnData is read into memory: anndata copies those only to a file)
            data._init_as_actual(data.to_memory() if data.isbacked else _actual_copy(data))
        return TableRef(adata=data, sdata=None, table_key=table_key)
    adata = _table_from_sdata(data, table_key)
    if copy:
        return TableRef(adata=adata.copy(), sdata=data, table_key=table_key, copy=True)
    ref = TableRef(adata=adata, sdata=data, table_key=table_key)
    if write and data.path is not None:  # changes will be written into the store: keep what to restore if that fails
        ref.snapshot()
    return ref


def _actual_copy(adata: AnnData) -> AnnData:
    """``adata.copy()``; a view of a lazily read AnnData keeps its matrices on disk, read only for the view's rows.

    anndata copies such a view's X as a dask selection of the whole table's chunks; for a matrix stored CSC, chunked by
    columns, every block of rows read from it would then load whole columns (the whole matrix, for a panel).
    """
    import pandas as pd

    if adata.is_view and not isinstance(adata.obs, pd.DataFrame):  # a view of anndata.experimental.read_lazy output
        from .io._reference import lazy_subset

        try:
            sub = lazy_subset(adata._adata_ref, adata._oidx, adata._vidx)
        except Exception:  # noqa: BLE001 - anndata's private view attributes may change: copy as anndata does
            sub = None
        if sub is not None and not sub.is_view:
            return sub
    return adata.copy()


def obs_column(adata: AnnData, key: str) -> pd.Series:
    """``adata.obs[key]`` as a pandas Series, also for a table read lazily (:func:`anndata.experimental.read_lazy`).

    A lazy table's obs columns are xarray ``DataArray`` objects, which lack pandas' ``to_numpy(dtype=...)``,
    ``dropna()``, ``isna()``...; they are read into memory once here (one column, one value per cell).
    """
    import pandas as pd

    col = adata.obs[key]
    if not isinstance(col, pd.Series):
        col = col.to_pandas()
        if not isinstance(col, pd.Series):  # e.g. a 0-d or 2-d array: not an obs column we can use
            raise TypeError(f"obs[{key!r}] is a {type(col).__name__}, not a column with one value per cell.")
    return col


def check_key(value: Any, name: str = "key_added") -> str:
    """Check a name that becomes obs/obsm/uns keys: a non-empty string that zarr and h5ad can store.

    Keys are stored as zarr/HDF5 node names, where ``/`` separates groups and zarr reserves names starting with ``__``.
    """
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string (the prefix of the keys written), got {value!r}.")
    if "/" in value or value.startswith("__"):
        raise ValueError(
            f"{name}={value!r} cannot be stored in a zarr or h5ad file ('/' separates groups there and names starting "
            "with '__' are reserved); choose a name without them, e.g. 'cell_type_v2'."
        )
    return value


def _colored_categories(adata: AnnData, columns: Iterable[str] | None = None) -> dict[str, list[Any]]:
    """The categories of the categorical obs ``columns`` (default: those with ``uns[f"{column}_colors"]``)."""
    import pandas as pd

    if columns is None:
        uns_keys = list(adata.uns.keys()) if hasattr(adata.uns, "keys") else []
        columns = [k[: -len("_colors")] for k in uns_keys if isinstance(k, str) and k.endswith("_colors")]
    out: dict[str, list[Any]] = {}
    for column in columns:
        if column not in adata.obs.columns:
            continue
        try:
            values = obs_column(adata, column)
        except Exception:  # noqa: BLE001 - an obs entry that is no column: no colours of ours to keep in step
            continue
        if isinstance(values.dtype, pd.CategoricalDtype):
            out[column] = list(values.cat.categories)
    return out


def _copy_uns(uns: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``uns``; values that cannot be copied (a lock, say) are kept as they are."""
    import copy

    out = {}
    for key, value in uns.items():
        try:
            out[key] = copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - any object may refuse to be copied; keep it, it is not ours to change
            out[key] = value
    return out


def get_table(data: AnnData | SpatialData, table_key: str = "table") -> AnnData:
    """Return the table of ``data`` to read from (the AnnData itself, or ``data.tables[table_key]``).

    Nothing is copied and nothing changes: a view stays a view (of an in-memory or a backed AnnData) and a backed
    AnnData stays backed. Functions that change the table use :func:`resolve_table` instead, which turns a view into an
    actual AnnData first.

    Parameters
    ----------
    data
        An AnnData table, or a SpatialData object.
    table_key
        Key of the table in a SpatialData object; ignored for AnnData input.

    Returns
    -------
    The table as it is, not a copy.

    Raises
    ------
    TypeError
        If ``data`` is neither an AnnData nor a SpatialData object.
    KeyError
        If the SpatialData object has no table ``table_key`` (the message lists the available tables).
    """
    _check_data(data)
    if isinstance(data, AnnData):
        return data
    return _table_from_sdata(data, table_key)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def write_table(
    sdata: SpatialData, table_key: str = "table", *, elements: Iterable[str] | str = ("obs", "obsm", "uns")
) -> None:
    """Persist changed elements of a table into the zarr store backing ``sdata``, crash-safely.

    Only the given elements are written. ``X``, ``layers``, ``raw`` and every element not named are never rewritten:
    their files are kept as they are (hard links). The new table replaces the old one in one atomic step, so an
    interrupted write leaves the previous table readable; leftovers of an interrupted write are cleaned up (and a
    table set aside is restored) by the next write to the same store. Consolidated metadata is refreshed when the
    store has it, and the store's zarr format (v2 or v3) is kept. A table that is not yet in the store is written
    whole (with spatialdata's writer). Into a table already in the store, a text column (in ``obs``, ``var`` or a data
    frame in ``obsm``/``varm``) with missing values is written as a categorical, so that they are read back as missing
    rather than as the text ``'None'`` or ``'nan'``; the table in memory keeps its columns as they are.

    Writes into one store run one at a time (an advisory lock), but each writes the table as it is in memory: when
    two processes change the same table, the later write replaces the earlier one's changes (reload the store first).
    A reader that opens the store during the swap may fail or see a mix of the two versions.

    Parameters
    ----------
    sdata
        A SpatialData object backed by a local zarr store (``sdata.path``).
    table_key
        Key of the table in ``sdata.tables``.
    elements
        Table elements to write, any of ``"obs"``, ``"obsm"``, ``"obsp"``, ``"uns"``, ``"var"``, ``"varm"``,
        ``"varp"``.

    Raises
    ------
    TypeError
        If ``sdata`` is not a SpatialData object.
    KeyError
        If there is no table ``table_key``.
    ValueError
        If ``sdata`` is not backed by a zarr store, the store is not local, ``elements`` names something that cannot
        be written, the table no longer matches the one in the store (cells, genes, or the layout of a sparse X: a
        different table with the same names), its link to the spatial elements (``uns["spatialdata_attrs"]``) is
        broken or changed without writing both ``obs`` and ``uns``, or ``.uns`` holds a value that cannot be
        serialised.
        Nothing in the store is changed in these cases.

    Examples
    --------
    >>> sdata = spatialdata.read_zarr("sample.zarr")  # doctest: +SKIP
    >>> sdata.tables["table"].obs["cluster"] = labels  # doctest: +SKIP
    >>> scx.io.write_table(sdata, "table", elements=("obs",))  # doctest: +SKIP
    """
    if not _is_spatialdata(sdata):
        raise TypeError(
            f"write_table needs a SpatialData object backed by a zarr store, got "
            f"{type(sdata).__module__}.{type(sdata).__qualname__}. An AnnData is written with `adata.write_zarr(path)` "
            "or `adata.write_h5ad(path)`."
        )
    adata = _table_from_sdata(sdata, table_key)
    elements = _check_elements(elements)
    store = _local_store_path(sdata)
    new_table = not (store / "tables" / table_key).is_dir()  # written whole: every element's keys are stored
    _check_names(adata, table_key, _TABLE_ELEMENTS if new_table else elements)
    _check_link(adata, table_key)
    with warnings.catch_warnings():
        # zarr's notice about a future default (autosharding) is not actionable here
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        _check_uns_serialisable(adata, table_key, store)  # also when uns is not written: a new table is written whole
        _write_locked(store, adata, table_key, elements)


def _write_locked(store: Path, adata: AnnData, table_key: str, elements: tuple[str, ...]) -> None:
    with _store_lock(store):
        _recover(store)
        live = store / "tables" / table_key
        if not live.is_dir():
            _write_new_table(store, adata, table_key)
            _after_write(lambda: _refresh_consolidated(store))
            logger.info(f"Wrote the new table {table_key!r} whole into {store}.")
            return
        if not elements:
            return
        _check_matches_disk(live, adata, table_key, elements)
        _stage_and_swap(store, live, adata, table_key, elements)
        _after_write(lambda: _refresh_consolidated(store))
    logger.info(f"Wrote {', '.join(elements)} of table {table_key!r} into {store}.")


def _check_elements(elements: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(elements, str):
        elements = (elements,)
    out: list[str] = []
    for name in elements:
        if name in _EXPRESSION_ELEMENTS:
            raise ValueError(
                f"elements contains {name!r}: write_table never rewrites X, layers or raw (they hold the expression "
                "values and raw counts). To store a table with changed expression values, write the SpatialData object "
                "to a new store with `sdata.write(new_path)`."
            )
        if name not in WRITABLE_ELEMENTS:
            raise ValueError(
                f"elements contains {name!r}, which is not a table element; use any of {WRITABLE_ELEMENTS}."
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _local_store_path(sdata: SpatialData) -> Path:
    path = sdata.path
    if path is None:
        raise ValueError(
            "The SpatialData object is not backed by a zarr store (sdata.path is None), so there is nothing to write "
            "the table into. Write the whole object first with `sdata.write(path)`; later changes to its table can "
            "then be written with write_table."
        )
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(
            f"The SpatialData object is backed by the remote store {text!r}. Tables are written crash-safely by "
            "swapping directories atomically, which object stores do not support. Write the object to a local store "
            "with `sdata.write(local_path)`, or copy the store to local disk, write there and upload the result."
        )
    store = Path(text.removeprefix("file://"))
    if not store.is_dir() and not store.is_absolute():
        raise ValueError(
            f"The SpatialData object's zarr store is given by the relative path {text!r} (as it was opened), which "
            f"points to no store from the current working directory, {os.getcwd()} (did the working directory change "
            "since?). Set the store's absolute path, `sdata.path = '/absolute/path/to/store.zarr'`, then write again."
        )
    if not store.is_dir():
        raise ValueError(
            f"The zarr store of the SpatialData object, {store}, does not exist or is not a directory (it may have been "
            "moved or deleted). Write the object again with `sdata.write(path)`."
        )
    return store


def instance_positions(shapes_index: Any, instance_ids: Any) -> np.ndarray:
    """Positions of ``instance_ids`` in ``shapes_index`` (-1 when absent), matching ids as strings if types differ."""
    import numpy as np
    import pandas as pd

    index = pd.Index(shapes_index)
    ids = pd.Index(instance_ids)
    if not index.is_unique:
        raise ValueError(
            "The shapes element's index has repeated values, so table rows cannot be matched to single shapes. "
            "Give each shape a unique index (its instance id)."
        )
    pos = index.get_indexer(ids)
    if (pos < 0).all() and len(ids):
        pos = index.astype(str).get_indexer(ids.astype(str))
    return np.asarray(pos)


def _check_names(adata: AnnData, table_key: str, elements: Iterable[str]) -> None:
    """Refuse keys that spatialdata cannot read back, before anything is written.

    spatialdata checks the keys of a table's obs, var, obsm, ... (str, only letters, digits, ``_``, ``-``, ``.``,
    unique whatever the case) when it opens a store: one bad key in the store and ``spatialdata.read_zarr`` refuses the
    whole store.
    """
    try:
        from spatialdata._core.validation import check_valid_dataframe_column_name, check_valid_name
    except ImportError:  # a spatialdata without these checks does not refuse such keys when it reads either
        return
    problems: list[str] = []
    for name in elements:
        check = check_valid_dataframe_column_name if name in ("obs", "var") else check_valid_name
        seen: dict[str, str] = {}
        for key in getattr(adata, name).keys():
            if not isinstance(key, str):
                problems.append(f"{name}[{key!r}]: the key is of type {type(key).__name__}, not str")
                continue
            try:
                check(key)
            except (ValueError, TypeError) as e:
                problems.append(f"{name}[{key!r}]: {str(e).rstrip('.')}")
            other = seen.setdefault(key.lower(), key)
            if other != key:
                problems.append(f"{name}[{key!r}]: differs from {name}[{other!r}] only in case")
    if problems:
        listed = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(
            f"Table {table_key!r} cannot be written: {listed}. spatialdata refuses to open a store whose tables hold "
            "such keys. Rename them (e.g. `table.obs = table.obs.rename(columns={'cell type': 'cell_type'})`), or "
            "let `spatialdata.sanitize_table(table)` rename them all, then write again. Nothing was written."
        )


def _check_link(adata: AnnData, table_key: str) -> None:
    """Validate the table's link to its spatial elements as spatialdata does before writing."""
    if _ATTRS_KEY not in adata.uns:
        return
    from spatialdata.models import TableModel

    attrs = adata.uns[_ATTRS_KEY]
    keys = (attrs.get("region_key"), attrs.get("instance_key")) if isinstance(attrs, Mapping) else ()
    columns = [k for k in dict.fromkeys(keys) if isinstance(k, str) and k in adata.obs]
    try:
        # the link alone (its uns entry and the columns it names): the other keys are checked by _check_names
        TableModel().validate(AnnData(obs=adata.obs[columns], uns={_ATTRS_KEY: attrs}))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"Table {table_key!r} cannot be written: its link to the spatial elements (uns['{_ATTRS_KEY}'] with "
            f"region, region_key, instance_key) is inconsistent: {e} Restore the region and instance columns in obs, "
            "or set the link again with `sdata.set_table_annotates_spatialelement(...)`. Nothing was written."
        ) from e


def _write_elem(group: zarr.Group, key: str, value: Any) -> None:
    """Write one element with anndata's writer (looked up at call time)."""
    try:
        import anndata.io as adio

        writer = adio.write_elem
    except (ImportError, AttributeError):  # anndata < 0.11
        from anndata.experimental import write_elem as writer
    writer(group, key, value)


def _element_value(adata: AnnData, name: str) -> Any:
    if name in ("obs", "var"):
        return _storable_frame(getattr(adata, name))
    value = dict(getattr(adata, name))
    if name in ("obsm", "varm"):
        return {k: _storable_frame(v) if _is_frame(v) else v for k, v in value.items()}
    return value


def _is_frame(value: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(value, pd.DataFrame)


def _storable_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each text column that has missing values as a categorical, so that they stay missing on disk.

    anndata writes an ``object`` column of strings as text, a missing value included: ``None`` and ``NaN`` would be read
    back as the strings ``'None'`` and ``'nan'``. A categorical keeps them missing (as ``anndata.AnnData.write_zarr``
    stores repeated strings). ``df`` itself is not changed.
    """
    import pandas as pd

    converted = {}
    for key, col in df.items():
        if col.dtype != object or not col.isna().any():
            continue
        if pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty"):
            converted[key] = pd.Categorical(col)
    if not converted:
        return df
    out = df.copy(deep=False)
    for key, values in converted.items():
        out[key] = values
    return out


def _memory_group(zarr_format: int) -> zarr.Group:
    import zarr

    return zarr.open_group(store=zarr.storage.MemoryStore(), mode="w", zarr_format=zarr_format)


def _check_uns_serialisable(adata: AnnData, table_key: str, store: Path) -> None:
    """Write ``uns`` into memory first: a value that cannot be stored raises here, before the store is touched."""
    fmt = _zarr_format(store)
    try:
        _write_elem(_memory_group(fmt), "uns", dict(adata.uns))
    except Exception as e:
        where, value = _find_unwritable(adata.uns, [], fmt)
        location = "uns" + "".join(f"[{k!r}]" for k in where)
        raise ValueError(
            f"Table {table_key!r} cannot be written: {location} holds a {type(value).__module__}."
            f"{type(value).__qualname__}, which cannot be stored in a zarr or h5ad file ({e}). Keep only str, int, "
            "float, bool, lists, dicts (with str keys), arrays and data frames in .uns: convert the value (e.g. "
            f"with str()) or remove it. Nothing was written to {store}."
        ) from e


def _find_unwritable(value: Any, where: list[Any], fmt: int) -> tuple[list[Any], Any]:
    """Locate the first value below ``value`` that anndata cannot write."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return [*where, k], k
            try:
                _write_elem(_memory_group(fmt), "x", v)
            except Exception:  # noqa: BLE001
                return _find_unwritable(v, [*where, k], fmt)
    return where, value


def _zarr_format(group_dir: Path) -> int:
    if (group_dir / "zarr.json").is_file():
        return 3
    if (group_dir / ".zgroup").is_file():
        return 2
    raise ValueError(
        f"{group_dir} is not a zarr group (neither zarr.json nor .zgroup found), so it is not a SpatialData zarr "
        "store. Write the SpatialData object with `sdata.write(path)`."
    )


def _read_elem(node: Any) -> Any:
    """Read one element with anndata's reader (looked up at call time)."""
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(node)


def _read_index(group: zarr.Group) -> Any:
    """Read the index array of a data frame group (obs or var) without reading its columns."""
    return _read_elem(group[group.attrs["_index"]])


def _check_matches_disk(live: Path, adata: AnnData, table_key: str, elements: tuple[str, ...]) -> None:
    """Refuse to write elements that would not match the expression matrix and link kept on disk."""
    import numpy as np
    import zarr

    group = zarr.open_group(str(live), mode="r", use_consolidated=False)
    for axis, names in (("obs", adata.obs_names), ("var", adata.var_names)):
        if axis not in group:
            continue
        on_disk = np.asarray(_read_index(group[axis])).astype(object)
        in_memory = np.asarray(names).astype(object)
        if on_disk.shape != in_memory.shape or not np.array_equal(on_disk, in_memory):
            what = "cells (obs_names)" if axis == "obs" else "genes (var_names)"
            raise ValueError(
                f"Table {table_key!r} in memory has {in_memory.size} {what} that differ from the {on_disk.size} in the "
                f"store (subset, reordered or renamed). Writing only {', '.join(elements)} would no longer match X kept "
                "in the store. Write the SpatialData object to a new store with `sdata.write(new_path)` instead. "
                "Nothing was written."
            )
    _check_same_matrix(group, adata, table_key, elements)
    linked = any(group.attrs.get(k) is not None for k in _LINK_KEYS)
    if "uns" in elements and linked and _ATTRS_KEY not in adata.uns:
        raise ValueError(
            f"Table {table_key!r} in the store annotates {group.attrs.get('region')!r}, but uns['{_ATTRS_KEY}'] was "
            "removed in memory; writing uns would break the link between the table and its shapes. Restore it with "
            "`sdata.set_table_annotates_spatialelement(...)` (or TableModel.parse) before writing. Nothing was written."
        )
    # The link lives in uns (mirrored in the group's attributes) and names obs columns: when it changed in memory,
    # obs and uns must be written together, or the store would hold the new obs with the old link (or the reverse),
    # a table spatialdata refuses to read.
    on_disk = _link_on_disk(group)
    in_memory = _normal_link(adata.uns.get(_ATTRS_KEY)) if _ATTRS_KEY in adata.uns else None
    missing = [name for name in ("obs", "uns") if name not in elements]
    if on_disk != in_memory and ("obs" in elements or "uns" in elements) and missing:
        raise ValueError(
            f"The link of table {table_key!r} to its spatial elements changed in memory (in the store: {on_disk}; in "
            f"memory: {in_memory}). The link is in uns and names obs columns, so writing "
            f"{' and '.join(n for n in ('obs', 'uns') if n in elements)} without {' and '.join(missing)} would leave "
            f"a table that spatialdata cannot read. Write both: `scx.io.write_table(sdata, {table_key!r}, "
            f"elements={tuple(sorted({*elements, 'obs', 'uns'}))})`. Nothing was written."
        )


def _check_same_matrix(group: zarr.Group, adata: AnnData, table_key: str, elements: tuple[str, ...]) -> None:
    """Refuse a table whose sparse X is laid out unlike the one in the store: it holds other cells.

    Cell and gene names alone do not tell two tables apart when both are named by position (``'0'``, ``'1'``, ...).
    The layout of a sparse X (which values each row, or column, stores) does, at the cost of reading one array of
    ``n_obs + 1`` integers. Normalising or log-transforming X in memory keeps the layout, and an X recomputed from the
    stored counts (``layers`` or ``raw``, as :func:`spatialcx.pp.ensure_normalized` does) has theirs. Dense matrices
    and other formats are not compared.
    """
    import numpy as np
    import scipy.sparse as sp

    X = adata.X
    if "X" not in group or not sp.issparse(X) or X.format not in ("csr", "csc"):
        return

    def same_layout(node: Any) -> bool | None:
        """Whether the sparse matrix stored at ``node`` has X's layout; None when it is not comparable."""
        if node.attrs.get("encoding-type") != f"{X.format}_matrix" or "indptr" not in node or "data" not in node:
            return None
        return node["data"].shape[0] == X.nnz and np.array_equal(node["indptr"][...], X.indptr)

    stored = group["X"]
    same = same_layout(stored)
    if same is None or same:
        return
    sources = [group["layers"][k] for k in group["layers"]] if "layers" in group else []
    if "raw" in group and "X" in group["raw"]:
        sources.append(group["raw"]["X"])
    if any(same_layout(node) for node in sources):
        return
    n_stored = stored["data"].shape[0]
    axis = "row" if X.format == "csr" else "column"
    counts = f"{X.nnz} values in memory, {n_stored} in the store" if n_stored != X.nnz else f"{n_stored} values each"
    raise ValueError(
        f"Table {table_key!r} in memory has the cells and genes of the one in the store, but its expression matrix X "
        f"stores values in other places ({counts}, spread over the {axis}s differently), so it is most likely a "
        "different table put in place of the one read from the store. Writing only "
        f"{', '.join(elements)} would pair its annotations with the X kept in the store. Add it under a new key "
        "(`sdata.tables['other'] = table`, then `scx.io.write_table(sdata, 'other')`), or write the SpatialData "
        "object to a new store with `sdata.write(new_path)`. Nothing was written."
    )


def _normal_link(attrs: Any) -> dict[str, Any] | None:
    """``region`` (sorted list of str), ``region_key``, ``instance_key`` of a link; None when there is none."""
    if not isinstance(attrs, Mapping) or all(attrs.get(k) is None for k in _LINK_KEYS):
        return None
    region = _json_value(attrs.get("region"))
    regions = sorted(str(r) for r in ([region] if isinstance(region, str) or region is None else list(region)))
    return {
        "region": regions,
        "region_key": _json_value(attrs.get("region_key")),
        "instance_key": _json_value(attrs.get("instance_key")),
    }


def _link_on_disk(group: zarr.Group) -> dict[str, Any] | None:
    """The table's link as stored: ``uns['spatialdata_attrs']`` (what spatialdata reads), else the group attributes."""
    if "uns" in group and _ATTRS_KEY in group["uns"]:
        return _normal_link(_read_elem(group["uns"][_ATTRS_KEY]))
    return _normal_link(dict(group.attrs))


# --------------------------------------------------------------------------------------------------------------------
# Staging, swapping, recovery
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _store_lock(store: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the store directory (POSIX); writers of one store run one at a time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows has no flock
        yield
        return
    fd = os.open(store, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _recover(store: Path) -> None:
    """Restore a table left aside by an interrupted write and remove every other leftover of interrupted writes."""
    work = store / WORK_DIR
    if not work.is_dir():
        return
    restored = False
    for aside, kind in ((work / "aside", "tables"), (work / _SHAPES_ASIDE, "shapes")):
        if not aside.is_dir():
            continue
        for entry in sorted(aside.iterdir()):
            live = store / kind / entry.name
            if not live.exists():
                os.rename(entry, live)
                _fsync_dir(live.parent)
                restored = True
                logger.warning(f"Restored {kind} element {entry.name!r} of {store} left aside by an interrupted write.")
    shutil.rmtree(work)
    _fsync_dir(store)
    logger.info(f"Removed leftovers of an interrupted write in {store}{' (element restored)' if restored else ''}.")
    # a write may have been interrupted after its swap but before the consolidated metadata was refreshed
    _refresh_consolidated(store)


def _new_stage(store: Path) -> Path:
    stage = store / WORK_DIR / f"stage-{uuid.uuid4().hex}"
    try:
        stage.mkdir(parents=True)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        how = (
            "remount it read-write" if e.errno == errno.EROFS else "make it writable (e.g. `chmod -R u+w` on the store)"
        )
        raise type(e)(  # PermissionError for EACCES/EPERM, OSError for a read-only file system
            e.errno,
            f"Cannot write into the zarr store {store}: creating its work directory {e.filename} failed "
            f"({e.strerror}); the store (or the file system) is read-only for this user. Nothing in the store was "
            f"changed. To keep the results in the store, {how}, or write the SpatialData object to a new store with "
            "`sdata.write(new_path)`",
        ) from e
    return stage


def _cleanup(store: Path, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    work = store / WORK_DIR
    for directory in (work / "aside", work / _SHAPES_ASIDE, work):
        with contextlib.suppress(OSError):  # only when empty: a table set aside must stay until it is restored
            directory.rmdir()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file system without hard links: copying keeps the write correct, just slower
        shutil.copy2(src, dst)


def _stage_table(live: Path, staged: Path, adata: AnnData, elements: tuple[str, ...]) -> None:
    """Build the new table group at ``staged``: unchanged elements hard-linked, ``elements`` written fresh."""
    import zarr

    staged.mkdir()
    for entry in os.scandir(live):
        target = staged / entry.name
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in elements:
                shutil.copytree(entry.path, target, copy_function=_link_or_copy)
        elif not entry.name.endswith(".partial"):
            shutil.copy2(entry.path, target)  # the group's own small metadata files: copied, so edits stay local
    group = zarr.open_group(str(staged), mode="r+", use_consolidated=False)
    for name in elements:
        try:
            _write_elem(group, name, _element_value(adata, name))
        except Exception as e:
            if type(e).__name__ == "IORegistryError":  # anndata has no writer for a value's type (its note names it)
                e.add_note(
                    f"anndata cannot store the value of {name} named above in a zarr store. Convert it to numbers, "
                    f"bool, str or a categorical (e.g. `table.{name}[key] = table.{name}[key].astype(str)` for "
                    "dates), or remove it."
                )
            raise
    if "uns" in elements and _ATTRS_KEY in adata.uns:
        # spatialdata mirrors the link in the table group's attributes; keep them equal to the new uns
        attrs = adata.uns[_ATTRS_KEY]
        group.attrs.update({k: _json_value(attrs.get(k)) for k in _LINK_KEYS})
    _refresh_consolidated(staged)
    for name in elements:
        _fsync_tree(staged / name)
    _fsync_tree(staged, recursive=False)


def _json_value(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _stage_and_swap(store: Path, live: Path, adata: AnnData, table_key: str, elements: tuple[str, ...]) -> None:
    stage = _new_stage(store)
    staged = stage / table_key
    try:
        _stage_table(live, staged, adata, elements)
    except BaseException as e:
        _cleanup(store, stage)
        if isinstance(e, Exception):
            e.add_note(f"Table {table_key!r} in {store} was left unchanged.")
        raise
    try:
        _swap(staged, live, store / WORK_DIR / "aside" / table_key)
    except BaseException:
        _cleanup(store, stage)
        raise
    # after the swap the stage holds the old table: its links go, shared chunks stay
    _after_write(lambda: _cleanup(store, stage))


#: Set on an exception raised after the new table was already in place in the store (only tidying up failed).
WRITTEN_ATTR = "spatialcx_table_written"


def _after_write(step: Any) -> None:
    """Run a tidying step that comes after the new table is in the store; a failure says the table was written."""
    try:
        step()
    except BaseException as e:  # a Ctrl-C while tidying up too: the new table is in the store
        setattr(e, WRITTEN_ATTR, True)
        e.add_note("The new element is in the store; only the tidying up after writing it failed.")
        raise


def _swap(staged: Path, live: Path, aside: Path) -> None:
    """Put ``staged`` in place of ``live``; afterwards ``staged`` holds the old table or is gone."""
    if _exchange(staged, live):
        # the new element is in place from here on: a failure to flush says so (the caller keeps its results)
        _after_write(lambda: (_fsync_dir(live.parent), _fsync_dir(staged.parent)))
        return
    aside.parent.mkdir(parents=True, exist_ok=True)
    _set_aside(live, aside)
    try:
        _move_in(staged, live)
    except BaseException:
        if not live.exists():
            os.rename(aside, live)  # put the old table back at once; if this fails too, the next write restores it
        raise
    _after_write(lambda: (_fsync_dir(live.parent), shutil.rmtree(aside)))  # a leftover aside goes with the next write


def _set_aside(live: Path, aside: Path) -> None:
    os.rename(live, aside)


def _move_in(staged: Path, live: Path) -> None:
    os.rename(staged, live)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two directories; ``False`` when the platform or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        logger.debug(f"renameat2(RENAME_EXCHANGE) not supported here ({os.strerror(err)}); renaming in two steps.")
        return False
    raise OSError(err, f"Could not exchange {a} and {b}: {os.strerror(err)}")


def _write_new_table(store: Path, adata: AnnData, table_key: str) -> None:
    """Write a table that is not in the store yet, whole, with spatialdata's table writer, then rename it in."""
    import zarr
    from spatialdata._io import write_table as sd_write_table
    from spatialdata._io.format import TablesFormatV01, TablesFormatV02

    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    fmt = root.metadata.zarr_format
    stage = _new_stage(store)
    try:
        stage_group = zarr.open_group(str(stage), mode="w", zarr_format=fmt)
        element_format = TablesFormatV01() if fmt == 2 else TablesFormatV02()
        sd_write_table(table=adata, group=stage_group, name=table_key, element_format=element_format)
        _fsync_tree(stage / table_key)
        root.require_group("tables")
        _move_in(stage / table_key, store / "tables" / table_key)
        _after_write(lambda: _fsync_dir(store / "tables"))
    except BaseException:
        _cleanup(store, stage)
        raise
    _after_write(lambda: _cleanup(store, stage))


def write_shapes_element(sdata: SpatialData, shapes_key: str) -> None:
    """Write the shapes element ``shapes_key`` of ``sdata`` into its zarr store, crash-safely, replacing an old one.

    The element is written whole with spatialdata's writer (in the store's container format) into the work
    directory, then exchanged atomically with the element in the store (or renamed in when there is none), as tables
    are by :func:`write_table`; an interrupted write leaves the previous element readable, and the next write to the
    store removes the leftovers (restoring an element set aside where no atomic exchange is available). Nothing else
    in the store is touched; its consolidated metadata is refreshed.
    """
    import zarr
    from spatialdata._io.format import SpatialDataContainerFormats, _parse_formats

    if shapes_key not in sdata.shapes:
        raise KeyError(f"There is no shapes element {shapes_key!r}; the SpatialData holds {list(sdata.shapes)}.")
    store = _local_store_path(sdata)
    with _store_lock(store), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        _recover(store)
        root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
        version = (root.attrs.get(_ATTRS_KEY) or {}).get("version")
        container = SpatialDataContainerFormats.get(str(version)) if version is not None else None
        stage = _new_stage(store)
        try:
            staging_root = stage / "root.zarr"
            zarr.create_group(str(staging_root), zarr_format=root.metadata.zarr_format)
            sdata._write_element(  # spatialdata's own element writer, aimed at the staging root
                element=sdata.shapes[shapes_key],
                zarr_container_path=staging_root,
                element_type="shapes",
                element_name=shapes_key,
                overwrite=False,
                parsed_formats=_parse_formats(container),
            )
            staged = staging_root / "shapes" / shapes_key
            _fsync_tree(staged)
            root.require_group("shapes")
            live = store / "shapes" / shapes_key
            if live.exists():
                _swap(staged, live, store / WORK_DIR / _SHAPES_ASIDE / shapes_key)
            else:
                _move_in(staged, live)
                _fsync_dir(live.parent)
        except BaseException as e:
            _cleanup(store, stage)
            if isinstance(e, Exception) and not getattr(e, WRITTEN_ATTR, False):
                e.add_note(f"The shapes element {shapes_key!r} in {store} was left as it was.")
            raise
        _after_write(lambda: (_cleanup(store, stage), _refresh_consolidated(store)))
    logger.info(f"Wrote the shapes element {shapes_key!r} into {store}.")


def remove_shapes_element(sdata: SpatialData, shapes_key: str) -> bool:
    """Remove the shapes element ``shapes_key`` from the zarr store of ``sdata``, crash-safely.

    The element is first dropped from the store's consolidated metadata (rewritten atomically), then its folder is
    moved into the work directory and deleted: at every moment the store reads, with or without the element, and
    never lists an element whose files are gone. The in-memory ``sdata`` is not changed. Returns whether there was an
    element to remove.
    """
    store = _local_store_path(sdata)
    with _store_lock(store), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        _recover(store)
        live = store / "shapes" / shapes_key
        if not live.exists():
            return False
        stage = _new_stage(store)  # first: a store that cannot be written to is refused before anything changes
        try:
            _drop_from_consolidated(store, f"shapes/{shapes_key}")
            os.rename(live, stage / shapes_key)
        except BaseException:
            _cleanup(store, stage)
            raise
        _fsync_dir(live.parent)
        _cleanup(store, stage)
        _refresh_consolidated(store)
    logger.info(f"Removed the shapes element {shapes_key!r} from {store}.")
    return True


# --------------------------------------------------------------------------------------------------------------------
# Consolidated metadata and durability
# --------------------------------------------------------------------------------------------------------------------


def _drop_from_consolidated(group_dir: Path, node: str) -> None:
    """Remove ``node`` and everything under it from every consolidated metadata of the group, each rewritten atomically."""
    prefix = node.rstrip("/") + "/"

    def keep(key: str) -> bool:
        return key != node and not key.startswith(prefix)

    v3 = group_dir / "zarr.json"
    if v3.is_file():
        meta = json.loads(v3.read_text())
        consolidated = meta.get("consolidated_metadata")
        if isinstance(consolidated, dict) and isinstance(consolidated.get("metadata"), dict):
            consolidated["metadata"] = {k: v for k, v in consolidated["metadata"].items() if keep(k)}
            _write_json_atomic(v3, meta)
        return
    for name in (".zmetadata", "zmetadata"):
        path = group_dir / name
        if path.is_file():
            meta = json.loads(path.read_text())
            meta["metadata"] = {k: v for k, v in meta.get("metadata", {}).items() if keep(k)}
            _write_json_atomic(path, meta, indent=4, sort_keys=True)


def _refresh_consolidated(group_dir: Path) -> None:
    """Re-consolidate the metadata of the group at ``group_dir`` in every form it already has, and only those."""
    import warnings

    import zarr

    v3 = group_dir / "zarr.json"
    if v3.is_file():
        if json.loads(v3.read_text()).get("consolidated_metadata") is not None:
            with warnings.catch_warnings():  # parquet files (shapes, points) are not zarr nodes; that is expected
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(zarr.storage.LocalStore(str(group_dir)), zarr_format=3)
        return
    if (group_dir / ".zmetadata").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(zarr.storage.LocalStore(str(group_dir)), zarr_format=2)
    if (group_dir / "zmetadata").is_file():
        _write_v2_consolidated(group_dir, group_dir / "zmetadata")


def _v2_consolidated(group_dir: Path) -> dict[str, Any]:
    """Zarr v2 consolidated metadata of ``group_dir`` as zarr-python 2 wrote it (every .zarray/.zgroup/.zattrs)."""
    metadata: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(group_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(group_dir)
        for name in sorted(filenames):
            if name in _V2_METADATA_FILES:
                key = (rel / name).as_posix()
                metadata[key] = json.loads((Path(dirpath) / name).read_text())
    return {"metadata": metadata, "zarr_consolidated_format": 1}


def _write_v2_consolidated(group_dir: Path, target: Path) -> None:
    _write_json_atomic(target, _v2_consolidated(group_dir), indent=4, sort_keys=True)


def _write_json_atomic(target: Path, value: Any, **dump_kwargs: Any) -> None:
    """Write JSON to a temporary file beside ``target``, flush it to disk, then rename it over ``target``."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, **dump_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path, *, recursive: bool = True) -> None:
    """Flush the files and directories under ``path`` to disk, so that a swap never exposes unwritten data."""
    if not path.exists() or not hasattr(os, "O_DIRECTORY"):
        return
    if path.is_file():
        _fsync_file(path)
        return
    walker = os.walk(path) if recursive else [(str(path), [], [e.name for e in os.scandir(path) if e.is_file()])]
    for dirpath, _, filenames in walker:
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
