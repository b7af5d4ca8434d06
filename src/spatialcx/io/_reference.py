"""Lazy reading of labelled references: labels first, then only the chosen rows and genes, in bounded blocks."""

from __future__ import annotations

import hashlib
import numbers
import os
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import DEFAULT_EXCLUDE_LABELS, READ_UNS_KEY, label_list
from .._matrix import STORED_CSC, _axis_positions, _lazy_csc_origin, _stored_csc, _StoredCSC
from .._settings import logger
from .._utils import label_text
from ._uri import fingerprint, resolve_uri

if TYPE_CHECKING:
    from ..pp._harmonize import GeneSymbols

#: Largest number of stored values read from disk in one piece (bounds memory while reading).
BLOCK_ELEMS = 8_000_000
#: Neighbouring rows whose stored values are closer than this are read in one piece instead of two.
GAP_ELEMS = 16_384
#: Labels that are missing values written out as text (``astype(str)`` of NaN and ``pd.NA``; ``"None"`` is one of
#: the default ``exclude_labels``, which ``exclude_labels=()`` keeps).
MISSING_AS_TEXT = frozenset({"", "nan", "NaN", "<NA>"})

ReferenceLike = AnnData | str | os.PathLike


# --------------------------------------------------------------------------------------------------------------------
# Readers: (sorted rows, columns in any order) -> CSR float32
# --------------------------------------------------------------------------------------------------------------------
def _minor_map(selected: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int32 if len(selected) < 2**31 else np.int64)
    out[selected] = np.arange(len(selected), dtype=out.dtype)
    return out


class _DiskCompressed:
    """A CSR or CSC matrix stored as anndata's ``data`` / ``indices`` / ``indptr`` arrays (HDF5 or zarr).

    Only the part of ``indptr`` that spans the rows asked for is read, so that reading a block of rows of a file with
    millions of cells does not read its whole ``indptr``.
    """

    def __init__(self, group: Any, fmt: str, shape: tuple[int, int]):
        self.data = group["data"]
        self.indices = group["indices"]
        self._indptr = group["indptr"]
        self.fmt = fmt
        self.shape = shape

    def _gather(
        self, majors: np.ndarray, minor_map: np.ndarray | None, n_minor: int, dtype: Any = np.float32
    ) -> sp.csr_matrix:
        """Rows ``majors`` (sorted) of the major axis, minor axis remapped by ``minor_map`` (-1 drops; None: kept).

        Neighbouring rows are read in one contiguous piece (at most :data:`BLOCK_ELEMS` values, gaps of at most
        :data:`GAP_ELEMS` values of rows not asked for); only the values of the wanted rows and columns are kept, as
        ``dtype``.
        """
        n = len(majors)
        if n == 0:
            return sp.csr_matrix((0, n_minor), dtype=dtype)
        lo = int(majors[0])
        span = np.asarray(self._indptr[lo : int(majors[-1]) + 2], dtype=np.int64)
        starts = span[majors - lo]
        ends = span[majors - lo + 1]
        out_rows: list[np.ndarray] = []
        out_cols: list[np.ndarray] = []
        out_vals: list[np.ndarray] = []
        i = 0
        while i < n:
            seg_start, end = int(starts[i]), int(ends[i])
            j = i + 1
            while j < n and starts[j] - end <= GAP_ELEMS and ends[j] - seg_start <= BLOCK_ELEMS:
                end = int(ends[j])
                j += 1
            lens = ends[i:j] - starts[i:j]
            total = int(lens.sum())
            if total:
                row_of = np.repeat(np.arange(i, j, dtype=np.int64), lens)
                seg_indices = np.asarray(self.indices[seg_start:end])
                # positions of the wanted rows' values in the piece (None: all of it; rows not asked for lie between)
                local = None
                if total != end - seg_start:
                    local = np.repeat(starts[i:j] - seg_start - (np.cumsum(lens) - lens), lens) + np.arange(total)
                minor = seg_indices if local is None else seg_indices[local]
                if minor_map is not None:
                    minor = minor_map[minor]
                    keep = minor >= 0
                    row_of, minor = row_of[keep], minor[keep]
                    local = np.flatnonzero(keep) if local is None else local[keep]
                if row_of.size:
                    seg_data = np.asarray(self.data[seg_start:end])
                    out_rows.append(row_of)
                    out_cols.append(minor)
                    out_vals.append((seg_data if local is None else seg_data[local]).astype(dtype, copy=False))
            i = j
        rows = np.concatenate(out_rows) if out_rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(out_cols) if out_cols else np.zeros(0, dtype=np.int32)
        vals = np.concatenate(out_vals) if out_vals else np.zeros(0, dtype=dtype)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
        m = sp.csr_matrix((vals, cols, indptr), shape=(n, n_minor))
        m.sort_indices()
        return m

    def read(self, rows: np.ndarray, cols: np.ndarray, dtype: Any = np.float32) -> sp.csr_matrix:
        """Rows ``rows`` (sorted) x columns ``cols`` (any order, no repeats) as CSR ``dtype``."""
        n_rows, n_cols = self.shape
        if self.fmt == "csr":
            every = len(cols) == n_cols and np.array_equal(cols, np.arange(n_cols))  # nothing to drop or reorder
            return self._gather(rows, None if every else _minor_map(cols, n_cols), len(cols), dtype)
        order = np.argsort(cols, kind="stable")
        sub = self._gather(cols[order], _minor_map(rows, n_rows), len(rows), dtype)  # (cols x rows), sorted cols
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return sp.csr_matrix(sub[inverse].T)


class _DiskDense:
    """A dense 2-D array on disk (h5py or zarr), read in blocks of rows."""

    def __init__(self, array: Any):
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)

    def read(self, rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
        step = max(1, BLOCK_ELEMS // max(self.shape[1], 1))
        pieces = []
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            lo, hi = int(block[0]), int(block[-1]) + 1
            if hi - lo <= 2 * len(block):
                values = np.asarray(self.array[lo:hi])[block - lo]
            elif hasattr(self.array, "get_orthogonal_selection"):
                values = np.asarray(self.array.get_orthogonal_selection((block, slice(None))))
            else:
                values = np.asarray(self.array[block])
            pieces.append(sp.csr_matrix(values[:, cols].astype(np.float32, copy=False)))
        return sp.vstack(pieces, format="csr") if pieces else sp.csr_matrix((0, len(cols)), dtype=np.float32)


class _InMemory:
    """Any other matrix: scipy sparse, numpy, dask, anndata backed datasets; read in blocks of rows."""

    def __init__(self, matrix: Any):
        self.matrix = matrix
        self.shape = tuple(int(s) for s in matrix.shape)

    def read(self, rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
        m = self.matrix
        if sp.issparse(m) and m.format == "csc":
            return sp.csr_matrix(m[:, cols][rows], dtype=np.float32)
        if sp.issparse(m) and m.format != "csr":
            m = sp.csr_matrix(m)
        sparse_blocks = sp.issparse(m) or sp.issparse(getattr(m, "_meta", None))  # scipy, or dask of scipy chunks
        step = 50_000 if sparse_blocks else max(1, BLOCK_ELEMS // max(self.shape[1], 1))
        pieces = []
        for start in range(0, len(rows), step):
            block = m[rows[start : start + step]]
            block = block[:, cols]
            if hasattr(block, "compute"):  # dask: the columns are selected before computing, not whole rows
                block = block.compute()
            pieces.append(sp.csr_matrix(block, dtype=np.float32))
        return sp.vstack(pieces, format="csr") if pieces else sp.csr_matrix((0, len(cols)), dtype=np.float32)


def _matrix_reader(matrix: Any) -> Callable[[np.ndarray, np.ndarray], sp.csr_matrix]:
    """Best reader for ``matrix``: on-disk arrays are read directly, the rest through :class:`_InMemory`."""
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(matrix, CSRDataset | CSCDataset):
        fmt = "csr" if isinstance(matrix, CSRDataset) else "csc"
        return _DiskCompressed(matrix.group, fmt, tuple(matrix.shape)).read
    source = _sparse_source(matrix)
    if source is not None:  # a lazy array over an on-disk CSR matrix: read the file directly
        return source.read
    stored = _stored_csc(matrix)
    if stored is not None:  # a lazy array (or view) over an on-disk CSC matrix: its dask chunks hold every row
        return partial(_read_stored_csc, stored)
    if _is_disk_array(matrix) and len(matrix.shape) == 2:
        return _DiskDense(matrix).read
    return _InMemory(matrix).read


def _read_stored_csc(stored: _StoredCSC, rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` (sorted) x columns ``cols`` (any order) of a lazy array over a CSC matrix on disk, as CSR float32.

    Only the columns asked for are read from the file, whole (as for a CSC file opened by its path).
    """
    src_rows = rows if stored.rows is None else stored.rows[rows]
    src_cols = cols if stored.cols is None else stored.cols[cols]
    row_set, row_of = np.unique(src_rows, return_inverse=True)  # a view may hold rows or genes out of order, or twice
    col_set, col_of = np.unique(src_cols, return_inverse=True)
    with stored.group() as group:
        out = _DiskCompressed(group, "csc", stored.shape).read(row_set, col_set)
    return out[row_of][:, col_of]


def _is_disk_array(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith("h5py") or mod.startswith("zarr")


# --------------------------------------------------------------------------------------------------------------------
# Lazy (dask) arrays over on-disk CSR matrices: rows and genes chosen before anything is read
# --------------------------------------------------------------------------------------------------------------------
#: Lazy arrays made by :meth:`_SparseSource.to_dask`, by dask name, so that readers can go to the file directly.
_DASK_SOURCES: weakref.WeakValueDictionary[str, _SparseSource] = weakref.WeakValueDictionary()
#: Stored values per chunk of those arrays (about; anndata's lazy reader holds 1,000 rows of any width) ...
CHUNK_ELEMS = 2_000_000
#: ... with at least this many rows ...
MIN_CHUNK_ROWS = 1_000
#: ... and at most this many.
MAX_CHUNK_ROWS = 50_000


@dataclass(eq=False)
class _SparseSource:
    """Rows ``rows`` x columns ``cols`` (on-disk positions; ``None``: all) of a CSR or CSC matrix in a file.

    ``store`` is the path of an HDF5 file or zarr folder (opened anew by every task, so any dask scheduler works,
    ``dask.distributed`` included), or an open zarr group; ``elem`` is the matrix's group inside it; ``fmt`` is how
    the matrix is stored (``"csr"`` or ``"csc"``).
    """

    store: Any
    elem: str
    shape: tuple[int, int]
    dtype: np.dtype
    nnz: int
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    fmt: str = "csr"

    @property
    def out_shape(self) -> tuple[int, int]:
        return (
            self.shape[0] if self.rows is None else len(self.rows),
            self.shape[1] if self.cols is None else len(self.cols),
        )

    def subset(self, rows: np.ndarray | None, cols: np.ndarray | None) -> _SparseSource:
        """Rows ``rows`` (sorted, no repeats) x columns ``cols`` (any order, no repeats) of this source."""
        new_rows = self.rows if rows is None else (rows if self.rows is None else self.rows[rows])
        new_cols = self.cols if cols is None else (cols if self.cols is None else self.cols[cols])
        return _SparseSource(self.store, self.elem, self.shape, self.dtype, self.nnz, new_rows, new_cols, self.fmt)

    def read(self, rows: np.ndarray, cols: np.ndarray | None = None, dtype: Any = np.float32) -> sp.csr_matrix:
        """Rows ``rows`` (positions in this source, sorted) x ``cols`` (positions, any order; ``None``: all)."""
        src_rows = rows if self.rows is None else self.rows[rows]
        if cols is None:
            src_cols = np.arange(self.shape[1]) if self.cols is None else self.cols
        else:
            src_cols = cols if self.cols is None else self.cols[cols]
        group, close = self._open()
        try:
            return _DiskCompressed(group, self.fmt, self.shape).read(src_rows, src_cols, dtype)
        finally:
            close()

    def _open(self) -> tuple[Any, Callable[[], None]]:
        if not isinstance(self.store, str | os.PathLike):
            return self.store, lambda: None
        if Path(self.store).is_dir():
            import zarr

            return zarr.open_group(str(self.store), mode="r")[self.elem], lambda: None
        import h5py

        f = h5py.File(self.store, "r")
        return f[self.elem], f.close

    def to_dask(self) -> Any:
        """A dask array of this source: computing it reads only its rows and keeps only its columns.

        A CSR matrix is chunked by rows, chunks holding about :data:`CHUNK_ELEMS` stored values of the output (between
        :data:`MIN_CHUNK_ROWS` and :data:`MAX_CHUNK_ROWS` rows). A CSC matrix is chunked by columns (every chunk holds
        all the rows), each chunk reading whole columns of the file that hold about :data:`CHUNK_ELEMS` stored values
        (at least one column); :mod:`spatialcx` reads its blocks of rows straight from the file.
        """
        import dask.array as da
        from dask.base import tokenize

        n_rows, n_cols = self.out_shape
        if self.fmt == "csc":
            per_col = self.nnz / max(self.shape[1], 1)
            step = int(max(1, CHUNK_ELEMS // max(per_col, 1.0)))
            chunks = ((n_rows,), tuple(min(step, n_cols - s) for s in range(0, n_cols, step)) or (0,))
        else:
            per_row = self.nnz / max(self.shape[0], 1) * n_cols / max(self.shape[1], 1)
            step = int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, CHUNK_ELEMS // max(per_row, 1.0))))
            chunks = (tuple(min(step, n_rows - s) for s in range(0, n_rows, step)) or (0,), (n_cols,))
        token = tokenize(str(self.store), self.elem, self.rows, self.cols, self.dtype)
        meta = (sp.csc_matrix if self.fmt == "csc" else sp.csr_matrix)((0, 0), dtype=self.dtype)
        out = da.map_blocks(
            _read_sparse_chunk, self, name=f"spatialcx-{self.fmt}-{token}", dtype=self.dtype, chunks=chunks, meta=meta
        )
        _DASK_SOURCES[out.name] = self
        if self.fmt == "csc":  # blocks of rows are read from the file by spatialcx._matrix
            self._stored = _StoredCSC(self.store, self.elem, self.shape, self.rows, self.cols)
            STORED_CSC[out.name] = self._stored
        return out


def _read_sparse_chunk(source: _SparseSource, block_info: Mapping[Any, Any] | None = None) -> sp.csr_matrix:
    """One chunk of :meth:`_SparseSource.to_dask` (in the file's dtype)."""
    (start, stop), (c0, c1) = block_info[None]["array-location"]
    if source.fmt == "csc":
        return sp.csc_matrix(source.read(np.arange(start, stop), np.arange(c0, c1), dtype=source.dtype))
    return source.read(np.arange(start, stop), None, dtype=source.dtype)


def _sparse_source(matrix: Any) -> _SparseSource | None:
    """Where a dask array reads from, when it is a whole on-disk CSR or CSC matrix as it was opened, else ``None``.

    Knows the arrays made by :meth:`_SparseSource.to_dask` and those of :func:`anndata.experimental.read_lazy` (one
    task per block of rows read from the file's CSR group, or per block of columns of a CSC group); anything computed
    from them is not recognised, and is read through dask as it is.
    """
    name = getattr(matrix, "name", None)
    if not isinstance(name, str) or not hasattr(matrix, "dask"):
        return None
    found = _DASK_SOURCES.get(name)
    if found is not None:
        return found
    try:  # an array of anndata's lazy reader: its only layer calls anndata's chunk reader on the file's group
        from anndata.abc import CSRDataset

        csc = _lazy_csc_origin(matrix)
        if csc is not None:
            with csc.group() as group:
                nnz = int(group["data"].shape[0])
            if isinstance(csc.where, str | os.PathLike):
                return _SparseSource(os.fspath(csc.where), csc.elem, csc.shape, np.dtype(matrix.dtype), nnz, fmt="csc")
            return _SparseSource(csc.where.group, "", csc.shape, np.dtype(matrix.dtype), nnz, fmt="csc")
        layers = matrix.dask.layers
        if len(layers) != 1 or len(matrix.chunks[1]) != 1:
            return None
        func = next(iter(layers.values())).indices[0][0]
        if getattr(getattr(func, "func", None), "__name__", "") != "make_dask_chunk" or len(func.args) != 2:
            return None
        where, elem = func.args
        if isinstance(where, CSRDataset):
            group = where.group
        elif isinstance(where, str | os.PathLike) and not Path(where).is_dir():
            import h5py

            with h5py.File(where, "r") as f:
                group = f[elem]
                if _encoding(group) != "csr_matrix":
                    return None
                shape = tuple(int(s) for s in _attr(group, "shape"))
                dtype, nnz = group["data"].dtype, int(group["data"].shape[0])
            if shape != tuple(matrix.shape) or dtype != matrix.dtype:
                return None
            return _SparseSource(os.fspath(where), str(elem), shape, np.dtype(dtype), nnz)
        else:
            return None
        shape = tuple(int(s) for s in where.shape)
        if shape != tuple(matrix.shape) or group["data"].dtype != matrix.dtype:
            return None
        return _SparseSource(group, "", shape, np.dtype(group["data"].dtype), int(group["data"].shape[0]))
    except Exception as e:  # noqa: BLE001 - dask or anndata internals changed: read through dask instead
        logger.debug("Not reading %s straight from disk: %s", name, e)
        return None


def _positions(index: Any, n: int) -> np.ndarray | None:
    """Positions selected by ``index`` (slice, integers, booleans) of an axis of length ``n``; ``None``: all.

    A TypeError for anything else (names, say), which :func:`lazy_subset` leaves to anndata.
    """
    if index is None:
        return None
    if not isinstance(index, slice) and (kind := np.asarray(index).dtype.kind) not in "iub":
        raise TypeError(f"positions expected, got values of kind {kind!r}")
    return _axis_positions(index, n)


def lazy_subset(adata: AnnData, rows: Any = None, cols: Any = None) -> AnnData:
    """``adata[rows, cols]`` of a lazy AnnData (:func:`anndata.experimental.read_lazy`), nothing read yet.

    X and the layers that are on-disk CSR matrices become dask arrays that read only the chosen rows (neighbouring
    ones in one piece) and keep only the chosen genes, in chunks of bounded size; anndata's own subsetting reads
    every block of 1,000 rows that holds a chosen cell with all its genes. On-disk CSC matrices become dask arrays
    that read only the chosen genes' columns and keep only the chosen rows; anndata's reads every column of each
    block of 1,000 columns that holds a chosen gene, with all its rows. Everything else is subset by anndata.
    Other AnnData (in memory, backed, views), rows out of order or repeated, repeated genes: plain ``adata[rows,
    cols]``.
    """
    sub = adata[rows] if cols is None else adata[rows, cols]
    if adata.is_view or isinstance(adata.obs, pd.DataFrame):
        return sub
    try:
        r = _positions(rows, adata.n_obs)
        c = _positions(cols, adata.n_vars)
    except TypeError:
        return sub
    if (r is not None and len(r) > 1 and not (np.diff(r) > 0).all()) or (c is not None and len(np.unique(c)) != len(c)):
        return sub
    arrays = {"X": adata.X, **{("layers", k): v for k, v in adata.layers.items()}}
    fast = {}
    for key, arr in arrays.items():
        source = _sparse_source(arr)
        if source is not None:
            fast[key] = source.subset(r, c).to_dask()
    if not fast:
        return sub
    return AnnData(
        X=fast.get("X", sub.X),
        obs=sub.obs,
        var=sub.var,
        uns=dict(sub.uns),
        obsm=dict(sub.obsm),
        varm=dict(sub.varm),
        obsp=dict(sub.obsp),
        varp=dict(sub.varp),
        layers={k: fast.get(("layers", k), v) for k, v in sub.layers.items()},
        raw=sub.raw,
    )


# --------------------------------------------------------------------------------------------------------------------
# Opening a reference
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceHandle:
    """An opened reference: its labels and names in memory, its expression on disk (or wherever it lives).

    Internal to spatialcx; produced by :func:`open_reference`.
    """

    name: str
    uri: str
    checksum: str
    label_key: str
    labels: pd.Series
    obs_names: pd.Index
    var_names: pd.Index
    feature_names: pd.Series | None
    kind: str
    where: str
    reader: Callable[[np.ndarray, np.ndarray], sp.csr_matrix]
    _close: list[Callable[[], None]] = field(default_factory=list)

    @property
    def n_obs(self) -> int:
        """Number of cells in the reference."""
        return len(self.obs_names)

    def symbols(self) -> GeneSymbols:
        """Gene symbols of the expression source's var (see :func:`spatialcx.pp._harmonize.to_symbols`)."""
        from ..pp._harmonize import to_symbols

        return to_symbols(self.var_names, feature_names=self.feature_names)

    def read(self, rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
        """Expression of ``rows`` (positions, any order) x ``cols`` (positions, any order) as CSR float32."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        if len(sorted_rows) and (np.diff(sorted_rows) == 0).any():
            raise ValueError("rows must not repeat.")
        out = self.reader(sorted_rows, cols)
        if not np.array_equal(order, np.arange(len(order))):
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            out = out[inverse]
        return out

    def close(self) -> None:
        """Close the files opened for this reference."""
        while self._close:
            self._close.pop()()

    def __enter__(self) -> ReferenceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attr(elem: Any, key: str, default: Any = None) -> Any:
    value = elem.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _encoding(elem: Any) -> str:
    enc = _attr(elem, "encoding-type", "") or ""
    if not enc and _attr(elem, "h5sparse_format"):
        enc = f"{_attr(elem, 'h5sparse_format')}_matrix"
    return str(enc)


def _open_store(path: Path) -> tuple[Any, Callable[[], None]]:
    if path.is_dir():
        import zarr

        try:
            group = zarr.open_group(str(path), mode="r")
        except FileNotFoundError as e:  # zarr's GroupNotFoundError: no zarr group there (an empty or other folder)
            raise ValueError(
                f"{str(path)!r} is a folder but not an AnnData .zarr store (no zarr group in it: {e}). References must "
                "be AnnData .h5ad files or AnnData .zarr folders (written by adata.write_zarr)."
            ) from e
        if "obs" not in group and "tables" in group:  # a SpatialData store: its tables are AnnData groups inside
            tables = sorted(group["tables"].group_keys()) if hasattr(group["tables"], "group_keys") else []
            inside = [str(path / "tables" / t) for t in tables]
            raise ValueError(
                f"{str(path)!r} is a SpatialData store, not an AnnData one: a reference is a labelled AnnData. Pass "
                "its table (sdata.tables[...]) or the table's own folder"
                + (f", e.g. {inside[0]!r}" if inside else "")
                + "."
            )
        if "obs" not in group:
            raise ValueError(
                f"{str(path)!r} is a zarr store but not an AnnData .zarr store: it has no 'obs' (it holds "
                f"{sorted(group.keys())[:10]}). References must be AnnData .h5ad files or AnnData .zarr folders "
                "(written by adata.write_zarr)."
            )
        return group, lambda: None
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(
            f"Cannot open reference {str(path)!r} as an .h5ad (HDF5) file ({e}). References must be AnnData .h5ad "
            "files or AnnData .zarr folders."
        ) from e
    if "obs" not in f:
        keys = sorted(f.keys())[:10]
        f.close()
        raise ValueError(
            f"{str(path)!r} is an HDF5 file but not an AnnData .h5ad file: it has no 'obs' (it holds {keys}). A 10x "
            "Genomics .h5 matrix (e.g. cell_feature_matrix.h5) is read with scanpy.read_10x_h5; add the cell-type "
            "labels to its obs, write it with adata.write_h5ad and pass that file (or pass the AnnData itself to "
            "scx.tl.train / scx.pp.combine_references)."
        )
    return f, f.close


def _read_feature_names(df_group: Any) -> pd.Series | None:
    """``var["feature_name"]`` of a var group (CELLxGENE's symbols beside Ensembl ids), or None."""
    if "feature_name" not in _df_columns(df_group):
        return None
    return _read_column(df_group, "feature_name").astype(object)


def _read_index(df_group: Any) -> pd.Index:
    from anndata.io import read_elem

    key = _attr(df_group, "_index", "_index")
    return pd.Index(np.asarray(read_elem(df_group[key])).astype(object).astype(str))


def _df_columns(df_group: Any) -> list[str]:
    order = _attr(df_group, "column-order", [])
    return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]


def _read_column(df_group: Any, key: str) -> pd.Series:
    from anndata.io import read_elem

    values = read_elem(df_group[key])
    if isinstance(values, np.ndarray) and values.dtype.kind not in "biufcSUO":  # e.g. numpy's StringDType
        values = values.astype(object)
    return pd.Series(values)


def _disk_matrix(elem: Any) -> tuple[Any, Any]:
    """Return ``(object for AnnData / normalization detection, reader)`` for an on-disk matrix element."""
    enc = _encoding(elem)
    if enc in ("csr_matrix", "csc_matrix"):
        from anndata.io import sparse_dataset

        ds = sparse_dataset(elem)
        return ds, _DiskCompressed(elem, enc[:3], tuple(ds.shape)).read
    if hasattr(elem, "shape") and len(elem.shape) == 2:
        return elem, _DiskDense(elem).read
    raise ValueError(f"Unsupported matrix encoding {enc!r} at {getattr(elem, 'name', elem)!r}.")


def _backed_view(store: Any) -> tuple[AnnData, dict[int, tuple[str, Any]]]:
    """An AnnData whose X / layers / raw.X are the on-disk matrices (nothing read), plus their readers by id."""
    from anndata.io import read_elem

    readers: dict[int, tuple[str, Any]] = {}
    obs_names = _read_index(store["obs"])
    var_names = _read_index(store["var"])
    var = pd.DataFrame(index=var_names)
    if "feature_name" in _df_columns(store["var"]):
        var["feature_name"] = _read_column(store["var"], "feature_name").astype(object).to_numpy()
    X = None
    if "X" in store:
        X, reader = _disk_matrix(store["X"])
        readers[id(X)] = ("X", reader)
    layers = {}
    if "layers" in store:
        for key in store["layers"]:
            try:
                layers[key], reader = _disk_matrix(store["layers"][key])
            except ValueError:
                continue
            readers[id(layers[key])] = (f"layers[{key!r}]", reader)
    uns: dict[str, Any] = {}
    if "uns" in store:
        for key in ("log1p",):
            if key in store["uns"]:
                try:
                    uns[key] = read_elem(store["uns"][key])
                except Exception as e:  # noqa: BLE001 - an odd uns entry must not stop reading the expression
                    logger.debug("Could not read uns[%r]: %s", key, e)
    adata = AnnData(X=X, obs=pd.DataFrame(index=obs_names), var=var, layers=layers, uns=uns)
    if "raw" in store and "X" in store["raw"]:
        raw_x, reader = _disk_matrix(store["raw"]["X"])
        raw_var = pd.DataFrame(index=_read_index(store["raw"]["var"]))
        if "feature_name" in _df_columns(store["raw"]["var"]):
            raw_var["feature_name"] = _read_column(store["raw"]["var"], "feature_name").astype(object).to_numpy()
        adata.raw = AnnData(X=raw_x, obs=pd.DataFrame(index=obs_names), var=raw_var)
        readers[id(adata.raw.X)] = ("raw.X", reader)
    return adata, readers


def _where_from_text(where: str) -> str | None:
    """Normalise a ``where`` description (``"layers['counts']"``, ``"layers/counts"``, ``"raw.X"``, ``"X"``)."""
    text = str(where).strip()
    if re.fullmatch(r"(adata\.)?X", text):
        return "X"
    if re.fullmatch(r"(adata\.)?raw[./]X", text):
        return "raw.X"
    m = re.fullmatch(r"(adata\.)?layers(?:\[['\"](.+)['\"]\]|/(.+))", text)
    if m:
        return f"layers[{(m.group(2) or m.group(3))!r}]"
    return None


def _find_source(adata: AnnData) -> Any:
    from ..pp._normalization import find_expression_source

    return find_expression_source(adata)


def _columns(df: Any) -> list[str]:
    """Column names of a DataFrame or of a lazily read one (``Dataset2D``)."""
    return list(df.columns) if hasattr(df, "columns") else list(getattr(df, "keys", list)())


def _feature_names_for(adata: AnnData, var_names: pd.Index) -> pd.Series | None:
    """``feature_name`` aligned with ``var_names``, from var or raw.var (matched by id when needed).

    A var whose names are symbols already and whose ids are in ``var["feature_id"]`` (as :func:`read_reference`
    leaves an Ensembl-indexed file, and CELLxGENE Census writes) maps those ids to its names.
    """
    candidates = [adata.var]
    if adata.raw is not None:
        candidates.insert(0, adata.raw.var)
    for var in candidates:
        cols = _columns(var)
        options = []  # (ids, symbols)
        if "feature_name" in cols:
            options.append((np.asarray(var.index), np.asarray(var["feature_name"])))
        if "feature_id" in cols:
            options.append((np.asarray(var["feature_id"]), np.asarray(var.index)))
        for ids, names in options:
            values = pd.Series(names.astype(object), index=pd.Index(ids))
            if values.index.equals(var_names):
                return values.reset_index(drop=True)
            if values.index.is_unique and values.index.isin(var_names).any():
                return values.reindex(var_names).reset_index(drop=True)
    return None


def _labels_of(adata: AnnData, label_key: str) -> pd.Series:
    cols = list(adata.obs.columns) if hasattr(adata.obs, "columns") else list(adata.obs.keys())
    if label_key not in cols:
        raise KeyError(f"label_key {label_key!r} is not an obs column of the reference; available: {cols}.")
    col = adata.obs[label_key]
    if isinstance(col, pd.Series):
        return col.reset_index(drop=True).astype(object)
    return pd.Series(np.asarray(col.to_numpy() if hasattr(col, "to_numpy") else col, dtype=object))


def _content_fingerprint(adata: AnnData, labels: pd.Series) -> str:
    h = hashlib.sha256()
    h.update(f"{adata.n_obs}x{adata.n_vars}\0".encode())
    for values in (np.asarray(adata.obs_names), np.asarray(adata.var_names), labels.astype(str).to_numpy()):
        h.update("\0".join(map(str, values)).encode())
    return "sha256-names:" + h.hexdigest()


def open_reference(
    reference: ReferenceLike,
    label_key: str,
    *,
    name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ReferenceHandle:
    """Open a reference for reading: labels and names now, expression later through :meth:`ReferenceHandle.read`.

    ``reference`` may be an AnnData (in memory, backed or lazy), a local path (``.h5ad`` or AnnData ``.zarr``) or a
    URI (see :func:`spatialcx.io.resolve_uri`). For files, only the label column and the obs/var names are read; the
    raw counts (or verified log1p data) are located with :func:`spatialcx.pp._normalization.find_expression_source`
    on an AnnData whose matrices are the on-disk arrays, and later read block by block.
    """
    if isinstance(reference, AnnData):
        return _open_anndata(reference, label_key, name=name)
    uri = os.fspath(reference)
    path = resolve_uri(uri, cache_dir=cache_dir, storage_options=storage_options)
    store, close = _open_store(path)
    try:
        obs = store["obs"]
        if _encoding(obs) != "dataframe":
            close()
            from anndata import read_h5ad

            logger.info("%s uses an old on-disk format; opening it in backed mode.", uri)
            adata = read_h5ad(path, backed="r")
            handle = _open_anndata(adata, label_key, name=name or _stem(path))
            handle.uri, handle.checksum = uri, fingerprint(path)
            handle._close.append(lambda: adata.file.close())
            return handle
        columns = _df_columns(obs)
        if label_key not in columns:
            raise KeyError(f"label_key {label_key!r} is not an obs column of {uri!r}; available: {columns}.")
        labels = _read_column(obs, label_key).astype(object)
        view, readers = _backed_view(store)
        source = _find_source(view)
        where = readers.get(id(source.matrix))
        if where is None:
            path_in_store = _where_from_text(getattr(source, "where", ""))
            found = [w for w in readers.values() if w[0] == path_in_store]
            where = found[0] if found else (str(getattr(source, "where", "")), _matrix_reader(source.matrix))
        var_names = pd.Index(np.asarray(source.var_names).astype(str))
        return ReferenceHandle(
            name=name or _stem(path),
            uri=uri,
            checksum=fingerprint(path),
            label_key=label_key,
            labels=labels,
            obs_names=view.obs_names,
            var_names=var_names,
            feature_names=_feature_names_for(view, var_names),
            kind=str(source.kind),
            where=where[0],
            reader=where[1],
            _close=[close],
        )
    except BaseException:
        close()
        raise


def _open_anndata(adata: AnnData, label_key: str, *, name: str | None) -> ReferenceHandle:
    labels = _labels_of(adata, label_key)
    source = _find_source(adata)
    var_names = pd.Index(np.asarray(source.var_names).astype(str))
    info = adata.uns.get(READ_UNS_KEY, None) if hasattr(adata.uns, "get") else None
    info = info if isinstance(info, Mapping) else {}
    if info.get("uri"):
        uri, checksum = str(info["uri"]), str(info.get("checksum", ""))
    elif adata.isbacked and adata.filename is not None:
        uri, checksum = str(adata.filename), fingerprint(adata.filename)
    else:
        uri, checksum = "", _content_fingerprint(adata, labels)
    return ReferenceHandle(
        name=name or str(info.get("name", "")) or "ref",
        uri=uri,
        checksum=checksum,
        label_key=label_key,
        labels=labels,
        obs_names=pd.Index(np.asarray(adata.obs_names).astype(str)),
        var_names=var_names,
        feature_names=_feature_names_for(adata, var_names),
        kind=str(source.kind),
        where=str(getattr(source, "where", "")),
        reader=_matrix_reader(source.matrix),
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".h5ad", ".zarr", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "ref"
    return path.stem or "ref"


# --------------------------------------------------------------------------------------------------------------------
# Public: read_reference
# --------------------------------------------------------------------------------------------------------------------
def clean_labels(labels: pd.Series, name: str) -> pd.Series:
    """Labels as strings without surrounding whitespace; empty and missing-as-text labels are missing (``None``).

    Empty means ``""`` or ``" "``; missing values written out as text by ``astype(str)`` are ``"nan"``, ``"NaN"`` and
    ``"<NA>"`` (:data:`MISSING_AS_TEXT`), missing whatever ``exclude_labels`` says.

    ``"T cell "`` and ``"T cell"`` are one type, and ``" Unknown"`` is excluded as ``"Unknown"`` is; whole numbers
    held as floats (``3.0``, a numeric column with missing values) become ``"3"``. Works on the distinct values only,
    so it stays cheap for millions of cells.
    """
    codes, raw = pd.factorize(label_text(labels.astype(object)), use_na_sentinel=True)  # "3", not "3.0"
    stripped = np.array([None if u.strip() in MISSING_AS_TEXT else u.strip() or None for u in raw], dtype=object)
    changed = [(r, c) for r, c in zip(raw, stripped) if r != c]
    if changed:
        n = np.bincount(codes[codes >= 0], minlength=len(raw))
        n_empty = sum(int(n[i]) for i, c in enumerate(stripped) if c is None)
        renamed = [(r, c) for r, c in changed if c is not None]
        parts = [f"{n_empty} cells with an empty or missing label ('', 'nan', '<NA>') are left out"] if n_empty else []
        if renamed:
            more = f" (and {len(renamed) - 5} more)" if len(renamed) > 5 else ""
            parts.append(
                "labels with surrounding whitespace are stripped: "
                + ", ".join(f"{r!r} -> {c!r}" for r, c in renamed[:5])
                + more
            )
        logger.warning("reference %r: %s.", name, "; ".join(parts))
    out = np.full(len(codes), None, dtype=object)
    has = codes >= 0
    out[has] = stripped[codes[has]]
    return pd.Series(out, index=labels.index, name=labels.name, dtype=object)


def choose_cells(
    labels: pd.Series, max_cells: int | None, *, rng: np.random.Generator, valid: np.ndarray | None = None
) -> np.ndarray:
    """Positions of the cells to keep, chosen from labels alone.

    At most ``max_cells`` cells with a label (and ``valid``), capping the largest types first (water filling, see
    :func:`spatialcx.pp._balance.cap_to_total`) so that rare types are kept whole; cells are drawn uniformly at random
    within each type. Returns sorted positions.
    """
    from ..pp._balance import cap_to_total

    mask = labels.notna().to_numpy()
    if valid is not None:
        mask &= valid
    pos = np.flatnonzero(mask)
    if max_cells is None or len(pos) <= max_cells:
        return pos
    # labels are grouped by their text (1 and "1" are one type); only the distinct values are turned into text, so
    # millions of cells (a CELLxGENE Census query) are not converted one by one
    codes, uniques = pd.factorize(labels.iloc[pos], sort=False)
    text_codes, names = pd.factorize(np.asarray(uniques, dtype=object).astype(str), sort=True)
    codes = text_codes[codes]
    sizes = np.bincount(codes, minlength=len(names))
    keep_n = cap_to_total(pd.Series(sizes, index=pd.Index(names)), int(max_cells))
    by_type = np.split(pos[np.argsort(codes, kind="stable")], np.cumsum(sizes)[:-1])  # each type's cells, in order
    chosen = []
    for t, members in zip(names, by_type, strict=True):
        k = int(keep_n[t])
        chosen.append(members if k >= len(members) else rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def read_reference(
    uri: str | os.PathLike,
    *,
    label_key: str,
    genes: Sequence[str] | None = None,
    max_cells: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    random_state: int = 0,
    storage_options: dict[str, Any] | None = None,
    exclude_labels: Sequence[str] | None = DEFAULT_EXCLUDE_LABELS,
) -> AnnData:
    """Open a labelled reference lazily, keeping only the cells and genes asked for.

    Parameters
    ----------
    uri
        Local path or URI of an ``.h5ad`` file or AnnData ``.zarr`` store (see :func:`resolve_uri`; remote ones are
        downloaded once into the cache).
    label_key
        obs column with the cell-type labels.
    genes
        Keep only these genes (e.g. the spatial panel) in X, in this order, named as given: a list (or other
        sequence) of names, not a single string. ``raw``, when present, keeps all its genes: genes that X lacks (X
        subset to highly variable genes) are still read from its counts by :func:`~spatialcx.tl.train` and
        :func:`~spatialcx.pp.combine_references` (a warning says how many); genes in neither are named in a warning.
        Ensembl-indexed references are mapped to symbols (``var["feature_name"]`` or the packaged human / mouse
        tables) and matched case-insensitively where unambiguous. ``None`` keeps every gene, renamed to symbols when
        the reference is Ensembl-indexed.
    max_cells
        Keep at most this many labelled cells (at least 1), chosen from the labels alone: the largest types are
        capped first so that rare types stay whole; cells are drawn at random within a type; labels in
        ``exclude_labels`` are not drawn. ``None`` keeps every cell.
    cache_dir
        Cache folder for remote URIs.
    random_state
        Seed of the cell draw.
    storage_options
        Passed to the fsspec filesystem of a remote URI.
    exclude_labels
        Labels that are not cell types (default ``scx.pp.DEFAULT_EXCLUDE_LABELS``; ``None`` is the
        default too): with ``max_cells``, their cells are not drawn, so they do not take up the budget (training
        leaves them out anyway). Without ``max_cells`` every cell is kept.

    Returns
    -------
    A lazy AnnData (:func:`anndata.experimental.read_lazy`): obs and var are lazy frames and X / layers are dask
    arrays read from disk only when computed (``.to_memory()`` loads the selection). raw, when present, is left as
    it is. ``uns["spatialcx_reference"]`` records the URI, checksum, label key, the number of cells in the file,
    how gene names were mapped, and how the file's ``X`` is normalized over all its genes (``x_state``, see
    :func:`spatialcx.pp.normalization_status`; ``x_log1p_target_sum``: its median ``expm1`` row sum when it is log1p
    of normalized counts, else -1). With ``genes``, a reference holding only log1p(10k) data in ``X`` stays usable
    for :func:`~spatialcx.tl.train` and :func:`~spatialcx.pp.combine_references` through that record, although the
    row sums of a gene subset no longer show it. For a file, keep the returned object alive while reading from it.

    Raises
    ------
    TypeError
        When ``uri`` is an AnnData object, ``genes`` is a single string, or ``max_cells`` is not a number.
    ValueError
        When ``uri`` is not an AnnData file or store, ``max_cells`` is below 1 or NaN, ``genes`` is empty, none of
        ``genes`` is in the reference (X or raw), or (with ``max_cells``) no cell has a label that is not in
        ``exclude_labels``.
    KeyError
        When ``label_key`` is not an obs column.
    """
    from anndata.experimental import read_lazy

    from ..pp._harmonize import match_genes, to_symbols
    from ..pp._normalization import file_log1p_target_sum

    if isinstance(uri, AnnData):
        backed = f" (it is backed by {str(uri.filename)!r}: pass that path to read it lazily)" if uri.isbacked else ""
        raise TypeError(
            f"read_reference reads a reference from a file or URI, but got an AnnData object{backed}. An AnnData is a "
            "reference already: pass it to scx.tl.train or scx.pp.combine_references as it is (adata[:, genes] "
            "keeps only some genes)."
        )
    if isinstance(genes, str):
        raise TypeError(f"genes must be a list of gene names, not a single string; pass genes=[{genes!r}].")
    if genes is not None and len(genes) == 0:
        raise ValueError("genes is empty: give the genes to keep (e.g. scx.pp.panel_genes(sdata)), or None for all.")
    if max_cells is not None and (isinstance(max_cells, bool) or not isinstance(max_cells, numbers.Real)):
        raise TypeError(f"max_cells must be a number of cells or None, got {type(max_cells).__name__} {max_cells!r}.")
    if max_cells is not None and np.isnan(max_cells):
        raise ValueError("max_cells is NaN: give a number of cells (e.g. 100_000), or None to keep every cell.")
    if max_cells is not None and max_cells < 1:
        raise ValueError(
            f"max_cells must be >= 1 or None (None keeps every labelled cell), got {max_cells}; a reference without "
            "cells cannot train a model."
        )
    path = resolve_uri(uri, cache_dir=cache_dir, storage_options=storage_options)
    store, close = _open_store(path)
    try:
        obs = store["obs"]
        columns = _df_columns(obs)
        if label_key not in columns:
            raise KeyError(f"label_key {label_key!r} is not an obs column of {os.fspath(uri)!r}; available: {columns}.")
        labels = _read_column(obs, label_key).astype(object)
        var_names = _read_index(store["var"])
        feature = _read_feature_names(store["var"])
        raw_var = store["raw"]["var"] if "raw" in store and "var" in store["raw"] else None
        raw_names = _read_index(raw_var) if raw_var is not None and genes is not None else None
        raw_feature = _read_feature_names(raw_var) if raw_names is not None else None
        x_check = _file_x_state(store, random_state)
    finally:
        close()
    symbols = to_symbols(var_names, feature_names=feature)
    n_only_raw = 0
    if genes is not None:
        genes = list(genes)
        unique_genes = list(dict.fromkeys(genes))
        if len(unique_genes) < len(genes):  # a gene twice would be read as a missing one, and X has each gene once
            repeated = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
            logger.warning(
                "%s: %d genes are asked for more than once (e.g. %s); each is kept once.",
                os.fspath(uri),
                len(repeated),
                ", ".join(map(repr, repeated[:5])),
            )
            genes = unique_genes
        match = match_genes(list(genes), symbols.symbols, ids=var_names)
        absent = list(match.missing)
        if raw_names is not None and match.missing:  # X may be a gene subset (e.g. highly variable genes) of raw
            raw_symbols = to_symbols(raw_names, feature_names=raw_feature).symbols
            in_raw = match_genes(list(match.missing), raw_symbols, ids=raw_names)
            n_only_raw, absent = in_raw.n_found, list(in_raw.missing)
        if match.n_found == 0 and n_only_raw == 0:
            raise ValueError(
                f"None of the {len(genes)} genes asked for is in {os.fspath(uri)!r} (e.g. {list(genes)[:5]}; the "
                f"reference has e.g. {list(symbols.symbols[:5])}). Check the species and gene naming."
            )
        logger.info("%s: %d of %d genes found.", os.fspath(uri), match.n_found, len(genes))
        if match.repeated:  # as combine_references says: which of the columns is meant?
            logger.warning(
                "%s: %d of the genes asked for are var names held more than once (e.g. %s); the first entry of each "
                "is used and the others are left out. Make var names unique (adata.var_names_make_unique()) or sum "
                "the repeated entries first if they are the same gene.",
                os.fspath(uri),
                len(match.repeated),
                list(match.repeated[:5]),
            )
        if absent:
            more = f" and {len(absent) - 10} more" if len(absent) > 10 else ""
            logger.warning(
                "%s: %d of the %d genes asked for are not in the reference and are left out: %s%s. Check their names "
                "(symbols or Ensembl ids of the reference's species).",
                os.fspath(uri),
                len(absent),
                len(genes),
                ", ".join(map(repr, absent[:10])),
                more,
            )
        if n_only_raw:
            logger.warning(
                "%s: %d of the genes asked for are in raw but not in X (X holds %d genes, raw %d). X keeps the %d "
                "found in it; raw keeps every gene, and scx.tl.train / scx.pp.combine_references read the raw counts "
                "of all of them.",
                os.fspath(uri),
                n_only_raw,
                len(var_names),
                len(raw_names),
                match.n_found,
            )
        cols, new_names = match.columns, pd.Index(match.genes)
    else:
        cols, new_names = np.arange(len(var_names)), symbols.symbols
    excluded = label_list(exclude_labels)
    if max_cells is None:
        rows = slice(None)
    else:
        clean = clean_labels(labels, _stem(path))  # " Unknown" is "Unknown"; empty labels are no labels
        not_excluded = ~clean.isin(excluded).to_numpy()
        rows = choose_cells(clean, max_cells, rng=np.random.default_rng(random_state), valid=not_excluded)
        if len(rows) == 0:
            n_missing = int(clean.isna().sum())
            raise ValueError(
                f"No cell of {os.fspath(uri)!r} can be drawn for max_cells: of its {len(clean):,} cells, {n_missing:,} "
                f"have no label in obs[{label_key!r}] and the other {len(clean) - n_missing:,} have a label in "
                f"exclude_labels (e.g. {list(pd.unique(clean.dropna()))[:5]}), which are not cell types. A reference "
                "without cells cannot train a model: check label_key, or pass exclude_labels=() to keep every label."
            )

    if path.is_dir():
        lazy = read_lazy(str(path))
    else:  # an HDF5 file, whatever its name: read_lazy picks the format from an .h5ad suffix
        import h5py

        lazy = read_lazy(h5py.File(path, "r"))
    if max_cells is not None or genes is not None:
        lazy = lazy_subset(lazy, rows, cols)
    ids = np.asarray(var_names)[np.asarray(cols)].astype(str)
    lazy.var_names = pd.Index(np.asarray(new_names).astype(str))
    if not np.array_equal(ids, np.asarray(lazy.var_names)) and "feature_id" not in _columns(lazy.var):
        # the ids renamed to symbols stay beside them (CELLxGENE's column name): raw, named by id, is read through them
        lazy.var["feature_id"] = ids
    lazy.uns[READ_UNS_KEY] = {
        "uri": os.fspath(uri),
        "name": _stem(path),
        "checksum": fingerprint(path),
        "label_key": label_key,
        "n_cells_file": int(len(labels)),
        "gene_names": symbols.method,
        "n_genes_requested": -1 if genes is None else len(genes),
        "n_genes_found": int(len(cols)),
        "n_genes_only_in_raw": int(n_only_raw),
        "random_state": int(random_state),
        "exclude_labels": list(excluded) if max_cells is not None else [],
        "x_state": str(x_check.get("state", "unknown")),
        "x_log1p_target_sum": file_log1p_target_sum(x_check),
    }
    return lazy


def _file_x_state(store: Any, random_state: int) -> dict[str, Any]:
    """How the file's ``X`` is normalized, over all its genes, from a seeded sample of rows (nothing else is read).

    Recorded by :func:`read_reference` because a gene subset of log1p(10k) data no longer shows it (its row sums are
    smaller): :func:`spatialcx.pp.normalization_status` then accepts the subset as log1p(10k) data.
    """
    from ..pp._normalization import classify_matrix

    if "X" not in store:
        return {"state": "unknown", "reason": "the file has no X"}
    try:
        matrix, _ = _disk_matrix(store["X"])
        return classify_matrix(matrix, random_state)
    except (ValueError, KeyError, TypeError) as e:  # an odd X must not stop reading the labels and names
        logger.debug("Could not classify X: %s", e)
        return {"state": "unknown", "reason": str(e)}
