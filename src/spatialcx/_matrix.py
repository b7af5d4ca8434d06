"""Chunked access to expression matrices of any backing (numpy, scipy sparse, dask, anndata backed/h5py).

Everything here reads a matrix a block of rows at a time, so memory stays O(chunk), not O(dataset).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from ._constants import TARGET_SUM
from ._settings import logger, settings

if TYPE_CHECKING:
    from anndata import AnnData

NormalizeOver = Literal["all", "genes"]


def is_dask(x: Any) -> bool:
    """Whether ``x`` is a dask array (without importing dask when it is not loaded)."""
    return type(x).__module__.startswith("dask.")


def default_chunk_size(n_cols: int, chunk_size: int | None = None) -> int:
    """Number of rows per block: ``chunk_size`` or the package default, smaller for very wide dense matrices."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive whole number of cells (e.g. 10_000), got {chunk_size!r}.")
        return int(chunk_size)
    default = settings.chunk_size
    if isinstance(default, bool) or not isinstance(default, int | np.integer) or default < 1:
        raise ValueError(
            f"scx.settings.chunk_size must be a positive whole number of cells (default 50_000), got {default!r}."
        )
    # keep a dense float64 block of the selected columns under ~256 MB
    return int(max(1_000, min(int(default), 2**25 // max(n_cols, 1))))


def read_rows(x: Any, start: int, stop: int) -> np.ndarray | sparse.csr_matrix:
    """Read rows ``start:stop`` of ``x`` into memory as a CSR matrix or a dense array.

    Rows of an in-memory CSR matrix come back as a view that shares its arrays (no copy): callers must not modify
    the values in place (:func:`normalize_block` copies before it does).
    """
    if isinstance(x, np.ndarray):
        return x[start:stop]
    if isinstance(x, sparse.csr_matrix | sparse.csr_array):
        a, b = int(x.indptr[start]), int(x.indptr[stop])
        return sparse.csr_matrix(
            (x.data[a:b], x.indices[a:b], x.indptr[start : stop + 1] - a), shape=(stop - start, x.shape[1])
        )
    if sparse.issparse(x):
        block = x[start:stop]
        return block.tocsr() if not isinstance(block, sparse.csr_matrix) else block
    stored = _stored_csc(x)
    if stored is not None:  # a lazy array over a CSC matrix on disk: its dask chunks hold every row
        if stop <= start:
            return sparse.csr_matrix((0, x.shape[1]), dtype=x.dtype)
        with stored.open() as reader:
            return next(stored.blocks(reader, start, stop, stop - start))[2]
    if is_dask(x):
        block = x[start:stop].compute()
        return read_rows(block, 0, block.shape[0])
    if _is_backed_csc(x):
        return _BackedCSCRows(x, read_ahead=False).rows(start, stop)
    # anndata backed sparse datasets, h5py / zarr arrays, anndata's lazy arrays
    block = x[start:stop]
    if hasattr(block, "compute"):
        block = block.compute()
    if sparse.issparse(block):
        return sparse.csr_matrix(block)
    return np.asarray(block)


def iter_row_blocks(x: Any, chunk_size: int) -> Iterator[tuple[int, int, np.ndarray | sparse.csr_matrix]]:
    """Yield ``(start, stop, block)`` over the rows of ``x``, ``chunk_size`` rows at a time."""
    n = x.shape[0]
    if sparse.issparse(x) and not isinstance(x, sparse.csr_matrix | sparse.csr_array):
        # row slicing of CSC/COO is slow; convert once (the matrix is already in memory)
        x = sparse.csr_matrix(x)
    stored = _stored_csc(x)
    if stored is not None:  # a lazy array over a CSC matrix on disk: its dask chunks hold every row
        with stored.open(read_ahead=True) as csc:
            yield from stored.blocks(csc, 0, n, chunk_size)
        return
    reader = _BackedCSCRows(x, read_ahead=True) if _is_backed_csc(x) else None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        yield start, stop, reader.rows(start, stop) if reader is not None else read_rows(x, start, stop)


# --------------------------------------------------------------------------------------------------------------------
# Rows of a CSC matrix on disk
# --------------------------------------------------------------------------------------------------------------------
#: Most stored values of a CSC matrix on disk read in one piece (bounds memory while reading).
_CSC_BLOCK = 1 << 20
#: About how many stored values of a CSC matrix on disk are read ahead when blocks of rows are read in order (at
#: least 256 per column, so that the cost of a read stays small against the values it brings).
_CSC_AHEAD = 1 << 19
#: Neighbouring pieces of columns closer than this many stored values are read in one piece instead of two.
_CSC_GAP = 4096
#: About how many stored values a window holds when it is read by a pass over the matrix (read ahead; see
#: :class:`_BackedCSCRows`): each pass decodes the whole matrix, so a window holds many blocks.
_CSC_PASS = 1 << 21


def _is_backed_csc(x: Any) -> bool:
    """Whether ``x`` is a CSC matrix stored as ``data`` / ``indices`` / ``indptr`` arrays (anndata backed)."""
    return not sparse.issparse(x) and getattr(x, "format", None) == "csc" and hasattr(x, "group")


class _BackedCSCRows:
    """Blocks of rows of a CSC matrix on disk, in memory O(block + window + :data:`_CSC_BLOCK`).

    anndata reads the whole matrix to slice rows of a backed CSC matrix. Here ``indptr`` is read once, and when the
    rows within each column are sorted (checked once, reading ``indices`` a piece at a time), each column keeps a
    cursor: a window of rows is read as the next stored values of each column (neighbouring columns in one piece),
    and the blocks of rows asked for in order are cut from it, so all blocks together read the matrix about once.
    With ``read_ahead`` a window is a whole number of blocks holding about :data:`_CSC_AHEAD` stored values, or 256
    per column if more (fewer reads); without, it is the block asked for. Otherwise (rows not sorted within a
    column, or a block that does not start where the previous one stopped) the columns are read a batch at a time
    and the rows wanted are kept: one pass over the matrix per block, in bounded memory all the same.

    In compressed chunked storage (zarr, compressed HDF5) every read decodes whole chunks, so reading each column's
    piece of a window on its own would decode the matrix many times per window. There, and when the rows are not
    sorted within a column, blocks asked for in order with ``read_ahead`` are cut from windows of about
    :data:`_CSC_PASS` stored values (at least the block), each read by one pass over the columns in large pieces.
    """

    def __init__(self, x: Any, *, read_ahead: bool):
        group = x.group
        self.data = group["data"]
        self.indices = group["indices"]
        self.indptr = np.asarray(group["indptr"][...], dtype=np.int64)
        self.shape = (int(x.shape[0]), int(x.shape[1]))
        self.read_ahead = read_ahead
        self._sorted: bool | None = None
        self._compressed = _small_reads_decode_chunks(self.data) or _small_reads_decode_chunks(self.indices)
        self._pos = self.indptr[:-1].copy()  # per column: its first stored value of a row >= self._next
        self._window: sparse.csr_matrix | None = None  # rows self._w0:self._next
        self._w0 = self._next = 0
        self._at = 0  # where the last block asked for stopped

    def rows(self, start: int, stop: int) -> sparse.csr_matrix:
        """Rows ``start:stop`` as CSR, with the stored dtype."""
        if stop <= start:
            return sparse.csr_matrix((0, self.shape[1]), dtype=self.data.dtype)
        if start == self._at:
            if self._sorted is None and not (self.read_ahead and self._compressed):
                self._sorted = self._rows_sorted()
            by_pass = self.read_ahead and (self._compressed or not self._sorted)  # windows read by passes
            if by_pass or self._sorted:
                pieces = []
                while start < stop:
                    if start >= self._next:  # the window is used up: read the next one
                        size = stop - start
                        if self.read_ahead:
                            ahead = _CSC_PASS if by_pass else max(_CSC_AHEAD, 256 * self.shape[1])
                            size *= max(1, ahead * self.shape[0] // max(int(self.indptr[-1]), 1) // size)
                        end = min(start + size, self.shape[0])
                        self._window = None
                        if by_pass:
                            self._window, self._next = self._scan(start, end), end
                        else:
                            self._window = self._next_rows(start, end)
                        self._w0 = start
                    end = min(stop, self._next)
                    pieces.append(self._window[start - self._w0 : end - self._w0])  # a copy: frees the window
                    start = end
                self._at = stop
                return pieces[0] if len(pieces) == 1 else sparse.vstack(pieces, format="csr")
        return self._scan(start, stop)

    def _csr(self, n_rows: int, counts: np.ndarray, rows: np.ndarray, data: np.ndarray) -> sparse.csr_matrix:
        """CSR of ``n_rows`` rows from their stored values in column order (``counts`` per column, rows from 0)."""
        indptr = np.concatenate([[0], np.cumsum(counts)])
        rows = rows.astype(np.int32 if n_rows < 2**31 else np.int64)
        return sparse.csc_matrix((data, rows, indptr), shape=(n_rows, self.shape[1])).tocsr()

    def _rows_sorted(self) -> bool:
        """Whether the row indices increase within every column (``indices`` read a piece at a time)."""
        nnz, last = int(self.indptr[-1]), None
        for a in range(0, nnz, _CSC_BLOCK):
            r = np.asarray(self.indices[a : min(a + _CSC_BLOCK, nnz)])
            down = np.flatnonzero(r[1:] < r[:-1]) + (a + 1)
            if last is not None and r[0] < last:
                down = np.concatenate([[a], down])
            if down.size and not np.isin(down, self.indptr).all():  # a decrease that does not start a column
                return False
            last = r[-1]
        return True

    def _next_rows(self, start: int, stop: int) -> sparse.csr_matrix:
        """Rows ``start:stop``, ``start`` being where the cursors are; moves them to ``stop``."""
        n_rows = self.shape[0]
        pos, ends = self._pos, self.indptr[1:]
        left = ends - pos
        if stop >= n_rows:
            want = left.copy()
        else:  # guess each column's count a bit above its share, then read more for the columns it fell short for
            want = np.minimum(left, np.ceil(left * (1.25 * (stop - start) / (n_rows - start))).astype(np.int64) + 32)
        counts = np.zeros(self.shape[1], dtype=np.int64)
        cols = np.flatnonzero(left > 0)
        lo = pos[cols]
        row_parts, rounds = [], []
        while cols.size:
            hi = np.minimum(ends[cols], lo + want[cols])  # hi > lo
            vals = _read_spans(self.indices, lo, hi)
            below = vals < stop  # sorted within a column: its rows < stop come first
            got = np.add.reduceat(below, np.cumsum(hi - lo) - (hi - lo), dtype=np.int64)
            row_parts.append(vals[below])
            rounds.append((cols, got))
            counts[cols] += got
            more = (got == hi - lo) & (hi < ends[cols])
            cols, lo = cols[more], hi[more]
            want[cols] *= 2
        rows = np.concatenate(row_parts) if row_parts else np.zeros(0, dtype=np.int64)
        if len(rounds) > 1:  # later rounds read more rows of columns seen before: put them in column order
            rows = rows[np.argsort(np.concatenate([np.repeat(c, g) for c, g in rounds]), kind="stable")]
        has = np.flatnonzero(counts)
        data = _read_spans(self.data, pos[has], pos[has] + counts[has])
        self._pos = pos + counts
        self._next = stop
        return self._csr(stop - start, counts, rows - start, data)

    def _scan(self, start: int, stop: int) -> sparse.csr_matrix:
        """Rows ``start:stop``, reading the columns a batch of at most :data:`_CSC_BLOCK` stored values at a time."""
        return self.select(np.arange(start, stop))

    def select(self, rows: np.ndarray) -> sparse.csr_matrix:
        """The sorted, unique ``rows`` (in that order), in one pass over the matrix.

        The columns are read a batch of at most :data:`_CSC_BLOCK` stored values at a time: memory O(batch + rows).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= self.shape[0]):
            raise ValueError("rows must be sorted, unique and within the matrix")
        indptr, n_cols = self.indptr, self.shape[1]
        counts = np.zeros(n_cols, dtype=np.int64)
        row_parts, data_parts = [], []
        contiguous = rows.size == 0 or int(rows[-1]) - int(rows[0]) + 1 == rows.size
        first = int(rows[0]) if rows.size else 0
        position = None
        if not contiguous:  # position of each row of the matrix among those selected, -1 when not selected
            position = np.full(self.shape[0], -1, dtype=np.int32 if rows.size < 2**31 else np.int64)
            position[rows] = np.arange(rows.size)
        c0 = 0
        while c0 < n_cols and rows.size:
            c1 = int(np.searchsorted(indptr, indptr[c0] + _CSC_BLOCK, side="right")) - 1
            c1 = min(max(c1, c0 + 1), n_cols)
            a, b = int(indptr[c0]), int(indptr[c1])
            if b > a:
                r = np.asarray(self.indices[a:b])
                if position is None:  # a range of rows: position = row - first row
                    new = r - first
                    keep = np.flatnonzero((new >= 0) & (new < rows.size))
                else:
                    new = position[r]
                    keep = np.flatnonzero(new >= 0)
                if keep.size:
                    lo, hi = int(keep[0]), int(keep[-1]) + 1
                    row_parts.append(new[keep])
                    data_parts.append(np.asarray(self.data[a + lo : a + hi])[keep - lo])
                    counts += np.bincount(np.searchsorted(indptr, a + keep, side="right") - 1, minlength=n_cols)
            c0 = c1
        new_rows = np.concatenate(row_parts) if row_parts else np.zeros(0, dtype=np.int64)
        data = np.concatenate(data_parts) if data_parts else np.zeros(0, dtype=self.data.dtype)
        return self._csr(rows.size, counts, new_rows, data)


def _small_reads_decode_chunks(array: Any) -> bool:
    """Whether every read of ``array`` decodes whole chunks (zarr; HDF5 with a compression or other filter)."""
    if type(array).__module__.startswith("zarr"):
        return True
    return getattr(array, "compression", None) is not None or bool(getattr(array, "_filters", None))


def _read_spans(array: Any, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``concatenate([array[l:h] for l, h in zip(lo, hi)])`` for increasing, non-overlapping spans of a 1-D array.

    Spans closer than :data:`_CSC_GAP` values are read in one piece of at most :data:`_CSC_BLOCK` values (or one span),
    as long as the piece holds no more values between its spans than in them.
    """
    pieces = []
    n, i = len(lo), 0
    while i < n:
        a, b = int(lo[i]), int(hi[i])
        inside = b - a
        j = i + 1
        while j < n and lo[j] - b <= _CSC_GAP and hi[j] - a <= _CSC_BLOCK:
            gaps = int(lo[j]) - a - inside  # values between spans read so far, and before span j
            if gaps > inside + int(hi[j] - lo[j]):
                break
            inside += int(hi[j] - lo[j])
            b = int(hi[j])
            j += 1
        if b > a:
            piece = np.asarray(array[a:b])
            if j - i > 1 and int((hi[i:j] - lo[i:j]).sum()) < b - a:  # values between the spans were read too: drop
                lengths = np.empty(2 * (j - i) - 1, dtype=np.int64)
                lengths[0::2] = hi[i:j] - lo[i:j]
                lengths[1::2] = lo[i + 1 : j] - hi[i : j - 1]
                piece = piece[np.repeat(np.arange(lengths.size) % 2 == 0, lengths)]
            pieces.append(piece)
        i = j
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=array.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Lazy arrays over a CSC matrix on disk (anndata.experimental.read_lazy, and AnnData views of them)
# --------------------------------------------------------------------------------------------------------------------
class _CSCGroup:
    """A CSC matrix's ``data`` / ``indices`` / ``indptr`` group, as :class:`_BackedCSCRows` reads it."""

    format = "csc"

    def __init__(self, group: Any, shape: tuple[int, int]):
        self.group = group
        self.shape = shape


class _StoredCSC:
    """Rows ``rows`` x columns ``cols`` (positions; ``None``: all, in order) of a CSC matrix in an HDF5 or zarr store.

    ``where`` is the HDF5 file's path (opened anew by :meth:`open`) or anndata's dataset of a zarr group; ``elem`` is
    the matrix's name in the file; ``shape`` the stored matrix's.
    """

    def __init__(self, where: Any, elem: str, shape: tuple[int, int], rows: np.ndarray | None, cols: np.ndarray | None):
        self.where, self.elem, self.shape = where, elem, shape
        self.rows, self.cols = rows, cols
        self._sorted = rows is None or bool((np.diff(rows) > 0).all())

    def subset(self, rows: np.ndarray | None, cols: np.ndarray | None) -> _StoredCSC:
        """Rows ``rows`` x columns ``cols`` (positions in this array, any order; ``None``: all) of this array."""
        new_rows = self.rows if rows is None else (rows if self.rows is None else self.rows[rows])
        new_cols = self.cols if cols is None else (cols if self.cols is None else self.cols[cols])
        return _StoredCSC(self.where, self.elem, self.shape, new_rows, new_cols)

    @contextmanager
    def group(self) -> Iterator[Any]:
        """The stored matrix's group (an HDF5 file stays open until the block ends)."""
        if isinstance(self.where, str | os.PathLike):
            if Path(self.where).is_dir():
                import zarr

                yield zarr.open_group(os.fspath(self.where), mode="r")[self.elem]
                return
            import h5py

            with h5py.File(self.where, "r") as f:
                yield f[self.elem]
            return
        from anndata.abc import CSCDataset, CSRDataset

        if isinstance(self.where, CSCDataset | CSRDataset):  # anndata's dataset of a zarr group
            yield self.where.group
        else:  # an open zarr group: the matrix's, or the file's
            yield self.where[self.elem] if self.elem else self.where

    @contextmanager
    def open(self, *, read_ahead: bool = False) -> Iterator[_BackedCSCRows]:
        """A reader of the stored matrix's rows (an HDF5 file stays open until the block ends)."""
        with self.group() as group:
            yield _BackedCSCRows(_CSCGroup(group, self.shape), read_ahead=read_ahead)

    def blocks(
        self, reader: _BackedCSCRows, start: int, stop: int, chunk_size: int
    ) -> Iterator[tuple[int, int, sparse.csr_matrix]]:
        """``(start, stop, block)`` over the rows ``start:stop`` of the array, ``chunk_size`` rows at a time, as CSR.

        All the rows (the usual case) are read with the reader's cursors; rows in increasing order (a view) are cut
        from windows of ``chunk_size`` stored rows read in order from the first (the stored matrix is read about once
        in all); rows in any other order are read a block at a time, each by a pass over the stored matrix.
        """
        for a in range(start, stop, chunk_size):
            b = min(a + chunk_size, stop)
            if self.rows is None:
                block = reader.rows(a, b)
            elif self._sorted:
                block = self._in_order(reader, self.rows[a:b], chunk_size)
            else:
                unique, inverse = np.unique(self.rows[a:b], return_inverse=True)
                block = reader.select(unique)[inverse]
            yield a, b, self._columns(block)

    def take(self, reader: _BackedCSCRows, rows: np.ndarray) -> sparse.csr_matrix:
        """Rows ``rows`` (positions in the array, any order) as CSR, in one pass over the stored matrix."""
        rows = np.asarray(rows, dtype=np.int64)
        stored = rows if self.rows is None else self.rows[rows]
        unique, inverse = np.unique(stored, return_inverse=True)
        block = reader.select(unique)
        if not (unique.size == stored.size and np.array_equal(unique, stored)):
            block = block[inverse]
        return self._columns(block)

    def _columns(self, block: sparse.csr_matrix) -> sparse.csr_matrix:
        return block if self.cols is None else block[:, self.cols].tocsr()

    def _in_order(self, reader: _BackedCSCRows, wanted: np.ndarray, window: int) -> sparse.csr_matrix:
        """The stored rows ``wanted`` (increasing), read from the reader's cursors on, ``window`` rows at a time."""
        if not wanted.size:
            return sparse.csr_matrix((0, self.shape[1]), dtype=reader.data.dtype)
        if int(wanted[0]) < reader._at:  # behind the cursors: one pass over the matrix
            return reader.select(wanted)
        pieces = []
        a, end = reader._at, int(wanted[-1]) + 1
        while a < end:
            b = min(a + window, end)
            i, j = np.searchsorted(wanted, [a, b])
            block = reader.rows(a, b)  # read even without a row wanted: it moves the cursors on
            if j > i:
                pieces.append(block[wanted[i:j] - a])
            a = b
        return pieces[0] if len(pieces) == 1 else sparse.vstack(pieces, format="csr")


def rows_on_disk(x: Any, rows: np.ndarray) -> sparse.csr_matrix | None:
    """Rows ``rows`` (positions, any order) of a CSC matrix on disk as CSR, in one pass over it; else ``None``.

    For anndata's backed CSC datasets and lazy arrays over CSC matrices (and views of them), whose own row
    selection reads the whole matrix (anndata's backed slicing) or whole columns (dask chunks holding every row).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if _is_backed_csc(x):
        unique, inverse = np.unique(rows, return_inverse=True)
        out = _BackedCSCRows(x, read_ahead=False).select(unique)
        return out if unique.size == rows.size and np.array_equal(unique, rows) else out[inverse]
    stored = _stored_csc(x)
    if stored is None:
        return None
    with stored.open() as reader:
        return stored.take(reader, rows)


#: Lazy arrays over CSC matrices on disk made by spatialcx itself (a reference's rows and genes), by dask name.
STORED_CSC: weakref.WeakValueDictionary[str, _StoredCSC] = weakref.WeakValueDictionary()


def _axis_positions(index: Any, n: int) -> np.ndarray | None:
    """Positions an AnnData view's index (slice, integers, booleans) selects on an axis of length ``n``; None: all."""
    if isinstance(index, slice):
        pos = np.arange(n)[index]
    else:
        arr = np.atleast_1d(np.asarray(index))
        pos = np.flatnonzero(arr) if arr.dtype == bool else np.where(arr < 0, arr + n, arr).astype(np.int64)
    return None if pos.size == n and np.array_equal(pos, np.arange(n)) else pos


def _lazy_csc_origin(x: Any) -> _StoredCSC | None:
    """The CSC matrix on disk that ``x`` reads, when ``x`` is a dask array of :func:`anndata.experimental.read_lazy`.

    Such an array has a single layer of tasks that call anndata's chunk reader on the file (h5ad: its path and the
    matrix's name) or on the matrix's dataset (zarr).
    """
    layers = x.dask.layers
    if len(layers) != 1:
        return None
    func = next(iter(layers.values())).indices[0][0]
    if getattr(getattr(func, "func", None), "__name__", "") != "make_dask_chunk" or len(func.args) != 2:
        return None
    from anndata.abc import CSCDataset

    where, elem = func.args
    shape = tuple(int(s) for s in x.shape)
    if isinstance(where, CSCDataset):
        group = where.group
        encoding, stored, dtype = group.attrs.get("encoding-type"), tuple(where.shape), where.group["data"].dtype
    elif isinstance(where, str | os.PathLike) and not Path(where).is_dir():
        import h5py

        with h5py.File(where, "r") as f:
            group = f[elem]
            encoding, stored, dtype = group.attrs.get("encoding-type"), tuple(group.attrs["shape"]), group["data"].dtype
    else:
        return None
    encoding = encoding.decode() if isinstance(encoding, bytes) else encoding
    if encoding != "csc_matrix" or tuple(int(s) for s in stored) != shape or np.dtype(dtype) != x.dtype:
        return None
    return _StoredCSC(where, str(elem), shape, None, None)


def _stored_csc(x: Any) -> _StoredCSC | None:
    """Where ``x`` reads from, when it is a lazy array over a CSC matrix on disk (or an AnnData view of one).

    anndata's lazy reader chunks a CSC matrix by columns only, so each chunk holds every row: reading a block of rows
    through dask would load whole columns, the whole matrix when it is narrow. Those arrays, and the X / layers of
    views of a lazily read AnnData, are read straight from the file instead. Anything else computed from them is
    read through dask as it is (``None``).
    """
    if not is_dask(x) and not hasattr(x, "_view_args"):
        return None
    if not hasattr(x, "dask") or len(getattr(x, "shape", ())) != 2:
        return None
    try:
        found = STORED_CSC.get(x.name) or _lazy_csc_origin(x)
        if found is not None:
            return found
        ref = getattr(x, "_view_args", None)  # X or layers[key] of a view of a lazily read AnnData
        if ref is None or ref.attrname not in ("X", "layers") or len(ref.keys) != (ref.attrname == "layers"):
            return None
        view = ref.parent
        base = view._adata_ref
        full = base.X if ref.attrname == "X" else base.layers[ref.keys[0]]
        if full is None or not hasattr(full, "dask"):
            return None
        found = STORED_CSC.get(full.name) or _lazy_csc_origin(full)
        if found is None:
            return None
        from anndata._core.index import _subset

        if _subset(full, (view._oidx, view._vidx)).name != x.name:  # not (or no longer) the view's subset
            return None
        return found.subset(_axis_positions(view._oidx, full.shape[0]), _axis_positions(view._vidx, full.shape[1]))
    except Exception as e:  # noqa: BLE001 - dask or anndata internals changed: read through dask instead
        logger.debug("Not reading %s straight from disk: %s", getattr(x, "name", "the array"), e)
        return None


def normalize_block(
    block: np.ndarray | sparse.spmatrix,
    cols: np.ndarray,
    *,
    kind: Literal["counts", "log1p"],
    over: NormalizeOver = "genes",
    target_sum: float = TARGET_SUM,
    row_offset: int = 0,
    where: str = "The expression matrix",
) -> sparse.csr_matrix:
    """Log1p-normalize one block of rows and keep the columns ``cols``.

    Parameters
    ----------
    block
        Rows of the expression source: raw counts (``kind="counts"``) or log1p(10k) values (``kind="log1p"``).
        Sparse blocks may hold duplicated entries (they are summed, as scipy and scanpy do); dense blocks are never
        converted whole, only their columns ``cols``.
    cols
        Column indices to keep, in the order wanted.
    kind
        What ``block`` holds.
    over
        ``"genes"``: the library size is the sum over ``cols`` only (spatialcx's convention for panel models, so
        reference and query are normalized over the same genes); ``"all"``: over every column of ``block``
        (CellTypist's convention).
    target_sum
        Counts per cell after normalization.
    row_offset, where
        Position of the block's first row in the table and what the table is (``"layers['counts']"``), for the
        error message.

    Returns
    -------
    CSR float64 matrix ``log1p(x / library_size * target_sum)`` of shape ``(n_rows, len(cols))``.

    Raises
    ------
    ValueError
        When a value used is NaN or infinite, or a count is negative: the message names the first such cell.
    """
    cols = np.asarray(cols, dtype=np.intp)
    check = _ValueCheck(kind, row_offset, where)
    lib = None
    if sparse.issparse(block):
        given = block.data
        block = sparse.csr_matrix(block, dtype=np.float64)  # no copy when it already is float64 CSR
        if not block.has_canonical_format:  # log1p and the clip are not additive: duplicated entries are summed first
            block = _own(block, given)
            block.sum_duplicates()
        if kind == "counts" and over == "all":
            check.sparse(block)
            lib = np.asarray(block.sum(axis=1)).ravel()
        block = _own(_take_columns(block, cols), given)
    else:
        dense = np.asarray(block)
        if kind == "counts" and over == "all":
            lib = dense.sum(axis=1, dtype=np.float64)
            check.dense(dense, lib)
        if not (len(cols) == dense.shape[1] and np.array_equal(cols, np.arange(dense.shape[1]))):
            dense = dense[:, cols]  # only the columns used are made sparse, never the whole block
        block = sparse.csr_matrix(dense, dtype=np.float64)
    check.sparse(block, cols)
    if kind == "log1p" and over == "all":
        return block
    if kind == "log1p":
        np.expm1(block.data, out=block.data)
    if lib is None:  # library size over the columns kept
        lib = np.asarray(block.sum(axis=1)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(lib > 0, target_sum / lib, 0.0)
    block.data *= np.repeat(scale, np.diff(block.indptr))
    np.log1p(block.data, out=block.data)
    block.eliminate_zeros()
    return block


class _ValueCheck:
    """Checks that the values normalized are finite (and, for counts, non-negative); else a ValueError naming a cell."""

    def __init__(self, kind: str, row_offset: int, where: str):
        self.counts = kind == "counts"
        self.row_offset = int(row_offset)
        self.where = where

    def _bad(self, values: np.ndarray) -> np.ndarray:
        ok = np.isfinite(values)
        if self.counts:
            ok &= values >= 0
        return ~ok

    def sparse(self, block: sparse.csr_matrix, cols: np.ndarray | None = None) -> None:
        data = block.data
        if np.isfinite(data).all() and (not self.counts or not data.size or data.min() >= 0):
            return
        bad = np.flatnonzero(self._bad(data))
        first = int(bad[0])
        row = int(np.searchsorted(block.indptr, first, side="right") - 1)
        col = int(block.indices[first])
        self._raise(len(bad), data[first], row, int(cols[col]) if cols is not None else col, block.shape[0])

    def dense(self, dense: np.ndarray, lib: np.ndarray) -> None:
        if np.isfinite(lib).all() and (not self.counts or not dense.size or dense.min() >= 0):
            return
        bad = self._bad(dense)
        row, col = (int(i) for i in np.argwhere(bad)[0])
        self._raise(int(bad.sum()), dense[row, col], row, col, dense.shape[0])

    def _raise(self, n_bad: int, value: Any, row: int, col: int, n_rows: int) -> None:
        what = "raw counts" if self.counts else "log1p-normalized values"
        need = "finite and non-negative" if self.counts else "finite"
        value = value.item() if isinstance(value, np.generic) else value
        first, last = self.row_offset, self.row_offset + n_rows - 1
        raise ValueError(
            f"{self.where} holds values that are not {need}: e.g. {value} in row {self.row_offset + row:,} (the "
            f"cell's 0-based position), column {col:,} ({n_bad:,} such values in rows {first:,} to {last:,}). They "
            f"are read as {what}, which must be {need}: such a cell cannot be normalized or scored. Correct those "
            "values (e.g. NaN to 0 with `np.nan_to_num`) or drop the cells that hold them, or put clean raw counts in "
            "`adata.layers['counts']`."
        )


def _take_columns(block: sparse.csr_matrix, cols: np.ndarray) -> sparse.csr_matrix:
    """``block[:, cols]``, without the copy when ``cols`` is every column in order (the usual panel case)."""
    if len(cols) == block.shape[1] and np.array_equal(cols, np.arange(block.shape[1])):
        return block
    return block[:, cols].tocsr()


def _own(block: sparse.csr_matrix, given: Any) -> sparse.csr_matrix:
    """``block``, copied if its values are still the caller's array (they are modified in place next)."""
    return block.copy() if np.shares_memory(block.data, given) else block


def check_unique_genes(var_names: pd.Index | Sequence[str], *, what: str = "table") -> pd.Index:
    """``var_names`` as an Index; a ValueError names duplicated gene names (a gene could match several columns)."""
    index = pd.Index(var_names)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()
        raise ValueError(
            f"The {what} has duplicated gene names ({len(dup)}, e.g. {list(dup[:5])}), so a gene could match several "
            "columns. Make them unique first, e.g. with `adata.var_names_make_unique()`."
        )
    return index


def gene_indices(var_names: pd.Index | Sequence[str], genes: Sequence[str], *, what: str = "table") -> np.ndarray:
    """Positions of ``genes`` in ``var_names``; a KeyError names the missing genes.

    Names repeated in ``var_names`` are an error (naming them) only when ``genes`` asks for one of them: which
    column would be meant? Repeated names of other genes are not read, so they do not matter.
    """
    index = pd.Index(var_names)
    genes = list(genes)
    if not index.is_unique:
        repeated = index[index.duplicated(keep=False)]
        check_unique_genes(repeated[repeated.isin(genes)], what=what)
        single = np.flatnonzero(~index.duplicated(keep=False))
        pos = index[single].get_indexer(genes)
        pos = np.where(pos >= 0, single[np.maximum(pos, 0)], -1) if single.size else np.full(len(genes), -1)
    else:
        pos = index.get_indexer(genes)
    if (pos < 0).any():
        missing = [g for g, p in zip(genes, pos) if p < 0]
        raise KeyError(
            f"{len(missing)} requested genes are not in the {what} (e.g. {missing[:10]}). "
            f"Available genes include {list(index[:5])}; check the spelling and species (symbols vs Ensembl ids)."
        )
    return pos


def normalized_expression(
    adata: AnnData,
    genes: Sequence[str],
    *,
    target_sum: float = TARGET_SUM,
    over: NormalizeOver = "all",
    chunk_size: int | None = None,
    source: Any = None,
) -> np.ndarray:
    """Log1p-normalized expression of a few genes, computed chunk by chunk from the raw counts.

    The raw counts are located by :func:`spatialcx.pp.normalization_status` (``layers["counts"]``, ...,
    ``X``); a table whose ``X`` is verified log1p(10k) data is used as it is.

    Parameters
    ----------
    adata
        The table.
    genes
        Gene names (``var_names``).
    target_sum
        Counts per cell after normalization.
    over
        Library size over all genes of the table (``"all"``, scanpy's ``normalize_total``) or over ``genes`` only.
    chunk_size
        Cells per block.
    source
        The expression source :func:`spatialcx.pp._normalization.find_expression_source` found for ``adata``, when
        the caller needs it too (e.g. to record where the values came from); found here otherwise.

    Returns
    -------
    Dense float32 array of shape ``(n_cells, len(genes))``.
    """
    from .pp._normalization import find_expression_source

    src = find_expression_source(adata) if source is None else source
    cols = gene_indices(src.var_names, list(genes))
    chunk = default_chunk_size(src.matrix.shape[1], chunk_size)
    out = np.empty((src.matrix.shape[0], len(cols)), dtype=np.float32)
    for start, stop, block in iter_row_blocks(src.matrix, chunk):
        out[start:stop] = normalize_block(block, cols, kind=src.kind, over=over, target_sum=target_sum).toarray()
    return out
