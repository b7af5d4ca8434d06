"""Score a whole expression matrix with a model, chunk by chunk (any backing; dask in parallel)."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from spatialcx._matrix import default_chunk_size, is_dask, iter_row_blocks, normalize_block
from spatialcx._settings import settings
from spatialcx._utils import as_str_array, progress
from spatialcx.model._model import CellTypeModel, ScoringWeights


def _score_block(
    block: Any, cols: np.ndarray, kind: str, over: str, target_sum: float, sw: ScoringWeights
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of one block of rows, and how many of the model's genes each row expresses."""
    x = normalize_block(block, cols, kind=kind, over=over, target_sum=target_sum)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    expressed = np.bincount(rows[x.data != 0], minlength=x.shape[0])  # stored zeros do not count
    return sw.score(x), expressed.astype(np.int64)


def _score_dask(
    matrix: Any, cols: np.ndarray, kind: str, over: str, target_sum: float, sw: ScoringWeights, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    import dask.array as da

    x = matrix.rechunk({0: min(chunk, matrix.shape[0]), 1: -1})
    n_classes = sw.weights.shape[1]

    def _block(b: Any) -> np.ndarray:  # the count of expressed genes travels as one more column (exact in float64)
        scores, expressed = _score_block(b, cols, kind, over, target_sum, sw)
        return np.column_stack([scores, expressed.astype(np.float64)])

    out = da.map_blocks(_block, x, dtype=np.float64, chunks=(x.chunks[0], (n_classes + 1,)), meta=np.empty((0, 0)))
    out = np.asarray(out.compute())
    return np.ascontiguousarray(out[:, :n_classes]), out[:, n_classes].astype(np.int64)


def score_matrix(
    matrix: Any,
    var_names: Any,
    model: CellTypeModel,
    *,
    kind: Literal["counts", "log1p"],
    normalize_over: Literal["genes", "all"] | None = None,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decision scores of every row of ``matrix`` (cells x ``var_names``).

    Each block of rows is read, log1p-normalized (over the model's genes found in the table, or over all genes) and
    scored on its sparse non-zeros; dask arrays are scored block-parallel with whatever scheduler is active,
    ``dask.distributed`` included.

    Returns
    -------
    ``(scores, present, expressed)``: float64 ``(n_cells, n_classes)``, the indices of the model's genes found, and
    for each cell the number of the model's genes it expresses (0: a cell without counts in those genes, whose scores
    are the model's intercepts and scaler terms alone).
    """
    over = normalize_over or model.normalize_over
    present, cols = model.match_genes(as_str_array(var_names))
    # "genes" means: library size over the model's genes that the table has
    over_block = "genes" if over == "genes" else "all"
    sw = model.scoring_weights(present)
    chunk = default_chunk_size(len(cols), chunk_size)
    if is_dask(matrix):
        scores, expressed = _score_dask(matrix, cols, kind, over_block, model.target_sum, sw, chunk)
        return scores, present, expressed
    n = matrix.shape[0]
    scores = np.empty((n, model.n_classes), dtype=np.float64)
    expressed = np.empty(n, dtype=np.int64)

    def _one(block: Any) -> tuple[np.ndarray, np.ndarray]:
        return _score_block(block, cols, kind, over_block, model.target_sum, sw)

    def _put(start: int, stop: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        scores[start:stop], expressed[start:stop] = result

    n_chunks = -(-n // chunk)
    blocks = progress(iter_row_blocks(matrix, chunk), total=n_chunks, desc="scoring cells")
    workers = max(1, min(settings.n_jobs or os.cpu_count() or 1, n_chunks))
    if workers == 1:
        for start, stop, block in blocks:
            _put(start, stop, _one(block))
        return scores, present, expressed
    # blocks are read in order by this thread (file-backed arrays are not thread-safe) and scored by a pool; numpy
    # and scipy release the GIL in the heavy loops. At most `workers` blocks are in flight: memory stays O(chunk).
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for start, stop, block in blocks:
            pending.append((start, stop, pool.submit(_one, block)))
            while len(pending) > workers:
                s0, s1, fut = pending.popleft()
                _put(s0, s1, fut.result())
        for s0, s1, fut in pending:
            _put(s0, s1, fut.result())
    return scores, present, expressed
