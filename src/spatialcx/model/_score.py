"""Score a whole expression matrix with a model, chunk by chunk (any backing; dask in parallel)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from scipy import sparse

from spatialcx._matrix import _stored_csc, default_chunk_size, is_dask, iter_row_blocks, normalize_block
from spatialcx._settings import n_workers, settings
from spatialcx._utils import as_str_array, progress
from spatialcx.model._model import CellTypeModel, ScoringWeights


def _score_block(
    block: Any,
    cols: np.ndarray,
    kind: str,
    over: str,
    target_sum: float,
    sw: ScoringWeights,
    start: int = 0,
    where: str = "The expression matrix",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score one block of rows (the first being row ``start``).

    Returns the scores, how many of the model's genes each cell expresses, and for each of those genes how many
    cells reach the clip.
    """
    x = sparse.csr_matrix(
        normalize_block(block, cols, kind=kind, over=over, target_sum=target_sum, row_offset=start, where=where)
    )
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    expressed = np.bincount(rows[x.data != 0], minlength=x.shape[0])  # stored zeros do not count
    return sw.score(x), expressed.astype(np.int64), sw.at_clip(x)


def _score_dask(
    matrix: Any,
    cols: np.ndarray,
    kind: str,
    over: str,
    target_sum: float,
    sw: ScoringWeights,
    chunk: int,
    where: str = "The expression matrix",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import dask
    import dask.array as da

    x = matrix.rechunk({0: min(chunk, matrix.shape[0]), 1: -1})
    n_classes, n_genes = sw.weights.shape[1], sw.weights.shape[0]

    def _block(b: Any, block_info: dict | None = None) -> np.ndarray:
        start = block_info[0]["array-location"][0][0] if block_info else 0
        scores, expressed, _ = _score_block(b, cols, kind, over, target_sum, sw, start, where)
        # the count of expressed genes travels as one more column (exact in float64)
        return np.column_stack([scores, expressed.astype(np.float64)])

    def _clipped(b: Any, block_info: dict | None = None) -> np.ndarray:
        start = block_info[0]["array-location"][0][0] if block_info else 0
        return _score_block(b, cols, kind, over, target_sum, sw, start, where)[2][None, :]

    out = da.map_blocks(_block, x, dtype=np.float64, chunks=(x.chunks[0], (n_classes + 1,)), meta=np.empty((0, 0)))
    # one row of counts per block, summed: the blocks are read once for both (one graph)
    per_block = da.map_blocks(
        _clipped, x, dtype=np.int64, chunks=((1,) * len(x.chunks[0]), (n_genes,)), meta=np.empty((0, 0), np.int64)
    )
    out, at_clip = dask.compute(out, per_block.sum(axis=0))
    out = np.asarray(out)
    return np.ascontiguousarray(out[:, :n_classes]), out[:, n_classes].astype(np.int64), np.asarray(at_clip, np.int64)


def is_sparse_matrix(matrix: Any) -> bool:
    """Whether ``matrix`` is sparse: scipy sparse, anndata's backed CSR / CSC, or a dask array of sparse chunks."""
    if sparse.issparse(matrix) or getattr(matrix, "format", None) in ("csr", "csc"):
        return True
    return is_dask(matrix) and sparse.issparse(getattr(matrix, "_meta", None))


def scoring_chunk_size(matrix: Any, n_model_genes: int, chunk_size: int | None = None) -> int:
    """Rows scored at a time: ``chunk_size``, else the default, smaller for wide dense tables.

    A block of a dense table holds every column (``matrix.shape[1]``), so the default is bounded by its width; a
    sparse block holds only its non-zeros, bounded by the ``n_model_genes`` columns kept.
    """
    width = n_model_genes if is_sparse_matrix(matrix) else max(int(matrix.shape[1]), n_model_genes)
    return default_chunk_size(width, chunk_size)


def check_normalize_over(normalize_over: Any) -> None:
    """A ValueError unless ``normalize_over`` is ``None``, ``"genes"`` or ``"all"``."""
    if normalize_over is not None and normalize_over not in ("genes", "all"):
        raise ValueError(
            f"normalize_over must be 'genes' (library size over the model's genes), 'all' (over every gene of the "
            f"table, CellTypist's convention) or None (the model's own, here), got {normalize_over!r}."
        )


def score_matrix(
    matrix: Any,
    var_names: Any,
    model: CellTypeModel,
    *,
    kind: Literal["counts", "log1p"],
    normalize_over: Literal["genes", "all"] | None = None,
    chunk_size: int | None = None,
    where: str = "The expression matrix",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decision scores of every row of ``matrix`` (cells x ``var_names``).

    Each block of rows is read, log1p-normalized (over the model's genes found in the table, or over all genes) and
    scored on its sparse non-zeros; dask arrays are scored block-parallel with whatever scheduler is active,
    ``dask.distributed`` included, except a lazily read CSC matrix (its dask chunks hold every row, so a block of rows
    would load whole columns): its blocks of rows are read straight from the file, in this process.

    ``where`` names the matrix in error messages (``"layers['counts']"``).

    Returns
    -------
    ``(scores, present, expressed, at_clip)``: float64 ``(n_cells, n_classes)``, the indices of the model's genes
    found, for each cell the number of the model's genes it expresses (0: a cell without counts in those genes, whose
    scores are the model's intercepts and scaler terms alone), and for each gene of ``present`` the number of cells
    whose scaled value reaches the clip (in training, at most ``1 / clip**2`` of the cells can: Chebyshev).
    """
    check_normalize_over(normalize_over)
    # "genes" means: library size over the model's genes that the table has
    over = normalize_over or model.normalize_over
    present, cols = model.match_genes(as_str_array(var_names))
    sw = model.scoring_weights(present)
    chunk = scoring_chunk_size(matrix, len(cols), chunk_size)
    if is_dask(matrix) and _stored_csc(matrix) is None:  # a lazy CSC matrix on disk: read by rows below instead
        scores, expressed, at_clip = _score_dask(matrix, cols, kind, over, model.target_sum, sw, chunk, where)
        return scores, present, expressed, at_clip
    n = matrix.shape[0]
    scores = np.empty((n, model.n_classes), dtype=np.float64)
    expressed = np.empty(n, dtype=np.int64)
    at_clip = np.zeros(len(present), dtype=np.int64)

    def _one(block: Any, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _score_block(block, cols, kind, over, model.target_sum, sw, start, where)

    def _put(start: int, stop: int, result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        scores[start:stop], expressed[start:stop] = result[0], result[1]
        at_clip[:] += result[2]  # blocks are put one at a time, by this thread

    n_chunks = -(-n // chunk)
    blocks = progress(iter_row_blocks(matrix, chunk), total=n_chunks, desc="scoring cells")
    workers = n_workers(settings.n_jobs, n_chunks)
    if workers == 1:
        for start, stop, block in blocks:
            _put(start, stop, _one(block, start))
        return scores, present, expressed, at_clip
    # blocks are read in order by this thread (file-backed arrays are not thread-safe) and scored by a pool; numpy
    # and scipy release the GIL in the heavy loops. At most `workers` blocks are in flight: memory stays O(chunk).
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for start, stop, block in blocks:
            pending.append((start, stop, pool.submit(_one, block, start)))
            while len(pending) > workers:
                s0, s1, fut = pending.popleft()
                _put(s0, s1, fut.result())
        for s0, s1, fut in pending:
            _put(s0, s1, fut.result())
    return scores, present, expressed, at_clip
