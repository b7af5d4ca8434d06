"""Rows of a CSC h5ad / zarr, backed or lazy: spatialcx's row reader vs anndata's / dask's, and ``scx.tl.predict``.

    python benchmarks/backed_csc.py [--cells 200000] [--genes 300] [--density 0.2] [--chunk 2000]

An ``.h5ad`` with integer counts stored CSC is opened with ``anndata.read_h5ad(backed="r")``. Every block of
``--chunk`` rows is read (1) with spatialcx's reader (``_matrix.iter_row_blocks``), (2) with anndata's own row slicing
(``X[start:stop]``, what spatialcx did before), and (3) from the same data stored CSR; the blocks are compared. The
same CSC matrix, also written to a ``.zarr`` store, is then opened with ``anndata.experimental.read_lazy`` (a dask
array chunked by columns, every chunk holding all the rows) and its blocks are read (4) with spatialcx's reader from
the h5ad, (5) from the zarr store, (6) for a view of every other cell, and (7) through dask (``X[start:stop]
.compute()``, what spatialcx did before for lazy tables), and (8) from the matrix in memory; all blocks are compared
with the in-memory ones. Then ``scx.tl.predict`` (confidence ``"raw"``) runs on the backed CSC and CSR files, on the
lazy CSC table and on a lazy view of every other cell. Time: one untraced run; memory: the peak of ``tracemalloc`` in
a second run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import _bench
import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse


def measure(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds of an untraced run, peak MB (10^6 bytes) of a traced run, the result)."""
    out, times, peak_mib = _bench.measure(fn)
    return times[0], peak_mib * 2**20 / 1e6, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--chunk", type=int, default=2000)
    args = p.parse_args()
    logging.getLogger("spatialcx").setLevel(logging.ERROR)

    import spatialcx as scx
    from spatialcx._matrix import iter_row_blocks

    rng = np.random.default_rng(0)
    x = sparse.random(args.cells, args.genes, density=args.density, format="csr", random_state=rng, dtype=np.float32)
    x.data = rng.poisson(3, x.nnz).astype(np.float32) + 1
    labels = rng.integers(0, 8, args.cells)
    x[:, :80] = x[:, :80].multiply(4 * (labels[:, None] == np.arange(80)[None, :] % 8) + 1).tocsr()  # markers
    x.eliminate_zeros()
    obs = pd.DataFrame(
        {"label": pd.Categorical([f"type {i}" for i in labels])}, index=[f"c{i}" for i in range(len(labels))]
    )
    var = pd.DataFrame(index=[f"G{i}" for i in range(args.genes)])
    table = ad.AnnData(x, obs=obs, var=var)
    model = scx.tl.train(table[:20_000].copy(), "label")

    with tempfile.TemporaryDirectory() as tmp:
        csr_path, csc_path = Path(tmp) / "csr.h5ad", Path(tmp) / "csc.h5ad"
        table.write_h5ad(csr_path)
        ad.AnnData(sparse.csc_matrix(x), obs=obs, var=var).write_h5ad(csc_path)
        print(
            f"{args.cells:,} cells x {args.genes} genes, {x.nnz:,} stored values, blocks of {args.chunk:,} rows, "
            "2 CPU cores"
        )
        csc, csr = ad.read_h5ad(csc_path, backed="r"), ad.read_h5ad(csr_path, backed="r")

        def digest(block: object) -> tuple[int, float]:  # blocks are compared by digest, not kept (memory)
            block = sparse.csr_matrix(block)
            return block.nnz, float(block.data @ (block.indices + 1.0))

        def spatialcx_rows() -> list:
            return [digest(b) for _, _, b in iter_row_blocks(csc.X, args.chunk)]

        def anndata_rows() -> list:
            return [digest(csc.X[s : min(s + args.chunk, args.cells)]) for s in range(0, args.cells, args.chunk)]

        def csr_rows() -> list:
            return [digest(b) for _, _, b in iter_row_blocks(csr.X, args.chunk)]

        t_new, m_new, blocks = measure(spatialcx_rows)
        t_old, m_old, old_blocks = measure(anndata_rows)
        t_csr, m_csr, csr_blocks = measure(csr_rows)
        same = blocks == old_blocks == csr_blocks
        print(f"rows of the CSC file, spatialcx reader: {t_new:6.2f} s, peak {m_new:7.1f} MB")
        print(f"rows of the CSC file, anndata slicing:  {t_old:6.2f} s, peak {m_old:7.1f} MB")
        print(f"rows of the CSR file:                   {t_csr:6.2f} s, peak {m_csr:7.1f} MB")
        print(f"ratio anndata / spatialcx: time {t_old / t_new:.1f}x, memory {m_old / m_new:.1f}x; same blocks: {same}")

        # X stays on disk; the outputs go to the backed objects' in-memory obs (copy=True would load X)
        t_pcsc, m_pcsc, _ = measure(lambda: scx.tl.predict(csc, model, chunk_size=args.chunk, confidence="raw"))
        t_pcsr, m_pcsr, _ = measure(lambda: scx.tl.predict(csr, model, chunk_size=args.chunk, confidence="raw"))
        agree = np.array_equal(csc.obs["cell_type"].to_numpy(), csr.obs["cell_type"].to_numpy())
        print(f"scx.tl.predict on the CSC file: {t_pcsc:6.2f} s, peak {m_pcsc:7.1f} MB")
        print(f"scx.tl.predict on the CSR file: {t_pcsr:6.2f} s, peak {m_pcsr:7.1f} MB; same labels: {agree}")
        same_memory = csc.obs["cell_type"].to_numpy()

        # lazily read tables (anndata.experimental.read_lazy): dask arrays chunked by columns
        zarr_path = Path(tmp) / "csc.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zarr format notice
            ad.AnnData(sparse.csc_matrix(x), obs=obs, var=var).write_zarr(zarr_path)
        lazy, lazy_zarr = ad.experimental.read_lazy(csc_path), ad.experimental.read_lazy(zarr_path)
        half = lazy[::2]
        in_memory = sparse.csc_matrix(x)

        def lazy_rows(table: ad.AnnData) -> Callable[[], list]:
            return lambda: [digest(b) for _, _, b in iter_row_blocks(table.X, args.chunk)]

        def dask_rows() -> list:
            n = lazy.n_obs
            return [digest(lazy.X[s : min(s + args.chunk, n)].compute()) for s in range(0, n, args.chunk)]

        half_blocks = [digest(x[::2][s : s + args.chunk]) for s in range(0, half.n_obs, args.chunk)]
        rows = [
            ("lazy CSC h5ad, spatialcx reader", lazy_rows(lazy), blocks),
            ("lazy CSC zarr, spatialcx reader", lazy_rows(lazy_zarr), blocks),
            ("lazy CSC h5ad, view of every other cell", lazy_rows(half), half_blocks),
            ("lazy CSC h5ad, through dask (before)", dask_rows, blocks),
            ("CSC in memory", lambda: [digest(b) for _, _, b in iter_row_blocks(in_memory, args.chunk)], blocks),
        ]
        for what, fn, want in rows:
            t, m, got = measure(fn)
            print(f"rows of the {what + ':':41s} {t:6.2f} s, peak {m:7.1f} MB; same blocks: {got == want}")

        def predict_lazy(table: ad.AnnData) -> Callable[[], ad.AnnData]:
            return lambda: scx.tl.predict(table, model, chunk_size=args.chunk, confidence="raw", copy=True)

        t_lazy, m_lazy, out = measure(predict_lazy(lazy))
        agree = np.array_equal(np.asarray(out.obs["cell_type"]), same_memory)
        print(f"scx.tl.predict on the lazy CSC table:   {t_lazy:6.2f} s, peak {m_lazy:7.1f} MB; same labels: {agree}")
        t_half, m_half, out = measure(predict_lazy(half))
        agree = np.array_equal(np.asarray(out.obs["cell_type"]), same_memory[::2])
        print(f"scx.tl.predict on a lazy view (1/2):    {t_half:6.2f} s, peak {m_half:7.1f} MB; same labels: {agree}")
        csc.file.close()
        csr.file.close()


if __name__ == "__main__":
    main()
