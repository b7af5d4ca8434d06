"""Chunked access to expression matrices of any backing (numpy, scipy sparse, dask, anndata backed/h5py).

Everything here reads a matrix a block of rows at a time, so memory stays O(chunk), not O(dataset).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from ._constants import TARGET_SUM
from ._settings import settings

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
    if is_dask(x):
        block = x[start:stop].compute()
        return read_rows(block, 0, block.shape[0])
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
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        yield start, stop, read_rows(x, start, stop)


def normalize_block(
    block: np.ndarray | sparse.spmatrix,
    cols: np.ndarray,
    *,
    kind: Literal["counts", "log1p"],
    over: NormalizeOver = "genes",
    target_sum: float = TARGET_SUM,
) -> sparse.csr_matrix:
    """Log1p-normalize one block of rows and keep the columns ``cols``.

    Parameters
    ----------
    block
        Rows of the expression source: raw counts (``kind="counts"``) or log1p(10k) values (``kind="log1p"``).
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

    Returns
    -------
    CSR float64 matrix ``log1p(x / library_size * target_sum)`` of shape ``(n_rows, len(cols))``.
    """
    given = block.data if sparse.issparse(block) else block
    block = sparse.csr_matrix(block, dtype=np.float64)  # no copy when it already is float64 CSR
    if kind == "log1p" and over == "all":
        return _own(_take_columns(block, cols), given)
    if kind == "log1p" or over == "genes":
        block = _own(_take_columns(block, cols), given)
        if kind == "log1p":
            np.expm1(block.data, out=block.data)
        lib = np.asarray(block.sum(axis=1)).ravel()
    else:  # counts, library size over all columns
        lib = np.asarray(block.sum(axis=1)).ravel()
        block = _own(_take_columns(block, cols), given)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(lib > 0, target_sum / lib, 0.0)
    block.data *= np.repeat(scale, np.diff(block.indptr))
    np.log1p(block.data, out=block.data)
    block.eliminate_zeros()
    return block


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
    """Positions of ``genes`` in ``var_names``; a KeyError names the missing genes."""
    index = check_unique_genes(var_names, what=what)
    pos = index.get_indexer(list(genes))
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

    Returns
    -------
    Dense float32 array of shape ``(n_cells, len(genes))``.
    """
    from .pp._normalization import find_expression_source

    src = find_expression_source(adata)
    cols = gene_indices(src.var_names, list(genes))
    chunk = default_chunk_size(src.matrix.shape[1], chunk_size)
    out = np.empty((src.matrix.shape[0], len(cols)), dtype=np.float32)
    for start, stop, block in iter_row_blocks(src.matrix, chunk):
        out[start:stop] = normalize_block(block, cols, kind=src.kind, over=over, target_sum=target_sum).toarray()
    return out
