"""Score a whole expression matrix with a model, chunk by chunk (any backing; dask in parallel)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from spatialcx._matrix import default_chunk_size, is_dask, iter_row_blocks, normalize_block
from spatialcx._utils import progress
from spatialcx.model._model import CellTypeModel, ScoringWeights


def _score_dask(
    matrix: Any, cols: np.ndarray, kind: str, over: str, target_sum: float, sw: ScoringWeights, chunk: int
) -> np.ndarray:
    import dask.array as da

    x = matrix.rechunk({0: min(chunk, matrix.shape[0]), 1: -1})
    n_classes = sw.weights.shape[1]

    def _block(b: Any) -> np.ndarray:
        return sw.score(normalize_block(b, cols, kind=kind, over=over, target_sum=target_sum))

    scores = da.map_blocks(_block, x, dtype=np.float64, chunks=(x.chunks[0], (n_classes,)), meta=np.empty((0, 0)))
    return np.asarray(scores.compute())


def score_matrix(
    matrix: Any,
    var_names: Any,
    model: CellTypeModel,
    *,
    kind: Literal["counts", "log1p"],
    normalize_over: Literal["genes", "all"] | None = None,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decision scores of every row of ``matrix`` (cells x ``var_names``).

    Each block of rows is read, log1p-normalized (over the model's genes found in the table, or over all genes) and
    scored on its sparse non-zeros; dask arrays are scored block-parallel with whatever scheduler is active,
    ``dask.distributed`` included.

    Returns
    -------
    ``(scores, present)``: float64 ``(n_cells, n_classes)`` and the indices of the model's genes found.
    """
    over = normalize_over or model.normalize_over
    present, cols = model.match_genes(np.asarray(var_names).astype(str))
    # "genes" means: library size over the model's genes that the table has
    over_block = "genes" if over == "genes" else "all"
    sw = model.scoring_weights(present)
    chunk = default_chunk_size(len(cols), chunk_size)
    if is_dask(matrix):
        return _score_dask(matrix, cols, kind, over_block, model.target_sum, sw, chunk), present
    n = matrix.shape[0]
    scores = np.empty((n, model.n_classes), dtype=np.float64)
    blocks = iter_row_blocks(matrix, chunk)
    for start, stop, block in progress(blocks, total=-(-n // chunk), desc="scoring cells"):
        scores[start:stop] = sw.score(
            normalize_block(block, cols, kind=kind, over=over_block, target_sum=model.target_sum)
        )
    return scores, present
