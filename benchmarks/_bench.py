"""Helpers shared by the benchmark scripts: a synthetic sparse count generator, and time + peak memory of a call."""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import sparse


def marker_counts(
    n: int,
    g: int,
    nnz: int,
    k: int,
    *,
    rng: np.random.Generator,
    marker_rng: np.random.Generator | None = None,
    n_markers: int,
    marker_share: int,
    mean: float,
    block: int | None = None,
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Integer counts (float32 CSR) with about ``nnz`` non-zeros per cell, and each cell's type (0 .. ``k`` - 1).

    Each type has ``n_markers`` marker genes (drawn with ``marker_rng``, else with ``rng`` after the types); a cell
    draws ``nnz // marker_share`` of its non-zeros from its type's markers and the rest from all genes; the values
    are 1 + Poisson(``mean``). Rows are made ``block`` at a time (all at once by default), which bounds the
    generator's own memory.
    """
    if k * n_markers > g:
        raise ValueError(f"{k} types x {n_markers} markers need at least {k * n_markers} genes, got {g}.")
    labels = rng.integers(0, k, n)
    markers = (rng if marker_rng is None else marker_rng).permutation(g)[: k * n_markers].reshape(k, n_markers)
    n_mark = nnz // marker_share
    parts = []
    for start in range(0, n, block or max(n, 1)):
        lab = labels[start : start + (block or n)]
        m = lab.size
        cols = np.concatenate(
            [
                markers[lab][np.arange(m)[:, None], rng.integers(0, n_markers, (m, n_mark))],
                rng.integers(0, g, (m, nnz - n_mark)),
            ],
            axis=1,
        )
        rows = np.repeat(np.arange(m), nnz)
        vals = rng.poisson(mean, m * nnz).astype(np.float32) + 1
        part = sparse.csr_matrix((vals, (rows, cols.ravel())), shape=(m, g))
        part.sum_duplicates()
        parts.append(part)
    x = parts[0] if len(parts) == 1 else sparse.vstack(parts, format="csr")
    return x, labels


def measure(
    fn: Callable[..., Any], make_input: Callable[[], Any] | None = None, *, repeats: int = 1
) -> tuple[Any, list[float], float]:
    """``(result, seconds of each of the ``repeats`` runs, peak MiB of one more run)``; the result is the last run's.

    ``fn`` is called with a fresh ``make_input()`` each time, or without arguments; the input is made before the clock
    starts and before tracing, so neither counts it. Time and memory come from separate runs: ``tracemalloc`` (the peak
    of Python-tracked allocations, numpy's and scipy's included: the extra memory the call needs on top of what is
    already loaded) slows allocation-heavy code.
    """

    def args() -> tuple[Any, ...]:
        return () if make_input is None else (make_input(),)

    times, out = [], None
    for _ in range(repeats):
        out = None  # the previous result is freed before the next run
        given = args()
        gc.collect()
        t0 = time.perf_counter()
        out = fn(*given)
        times.append(time.perf_counter() - t0)
    out = given = None
    given = args()
    gc.collect()
    tracemalloc.start()
    try:
        out = fn(*given)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, times, peak / 2**20
