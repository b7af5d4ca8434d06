"""Speed and accuracy of ``scx.tl.classify_by_threshold`` on synthetic count data with a known truth.

    python benchmarks/threshold.py [--cells 1000000] [--genes 50] [--repeats 3] [--threads 2]

Speed: one table of ``--cells`` cells x ``--genes`` genes (sparse raw counts), classified on 3 markers (no plot),
for each method and metagene; the best of ``--repeats`` runs is reported. The time covers everything the function
does: reading the three genes from the counts (log1p of counts per 10k over all genes), the metagene, the split and
writing the keys. The Gaussian mixture is fitted on a seeded subsample of at most 50,000 cells and every cell is then
scored with the fitted parameters. Memory: the peak of Python allocations (tracemalloc, which sees numpy's
buffers) during one more run of each method, next to the size of the sparse matrix: it stays a few bytes per cell
and feature read, whatever the number of genes, because only the markers' columns are taken from each block of rows.

Accuracy: the fraction of cells whose class equals the truth, on
- ``three_markers``: 15 % of cells express three markers together, the others have ambient counts;
- ``zero_inflated``: one marker, 20 % positive cells, ~77 % of all cells with zero counts;
- ``balanced``: three markers, 45 % positive cells;
- ``one_population``: an obs feature drawn from one Gaussian (no positive population): ``gmm`` refuses to split it
  (the two fitted Gaussians make a single mode), ``ks`` finds no minority and says so.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc


def make_counts(n: int, *, genes: int = 50, markers: int = 3, frac: float = 0.15, noise: float = 0.05, seed: int = 0):
    """AnnData of raw counts: ``markers`` marker genes high (negative binomial, mean 8) in a ``frac`` of the cells."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    truth = rng.random(n) < frac
    size = rng.lognormal(0.0, 0.4, n).astype(np.float32)
    other = genes - markers
    # background genes: a few counts per cell, sparse
    nnz = 12
    rows = np.repeat(np.arange(n), nnz)
    cols = rng.integers(0, other, n * nnz) + markers
    vals = rng.poisson(2.0 * np.repeat(size, nnz)) + 1
    bg = sparse.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, genes))
    mean = np.where(truth, 8.0, noise).astype(np.float32) * size
    mk = np.column_stack([rng.poisson(rng.gamma(2.0, mean / 2.0)) for _ in range(markers)]).astype(np.float32)
    m = sparse.csr_matrix(
        (mk.ravel(), (np.repeat(np.arange(n), markers), np.tile(np.arange(markers), n))), shape=bg.shape
    )
    x = (bg + m).tocsr()
    x.eliminate_zeros()
    names = [f"MARKER{i}" for i in range(markers)] + [f"GENE{i}" for i in range(other)]
    adata = ad.AnnData(x, var=pd.DataFrame(index=names), obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)))
    return adata, truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP threads (set before numpy is imported)")
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np

    import spatialcx as scx

    markers = ["MARKER0", "MARKER1", "MARKER2"]
    print(f"cores available: {len(os.sched_getaffinity(0))}, threads: {args.threads}")

    print(f"\n== speed: {args.cells:,} cells x {args.genes} genes, 3 markers, no plot (best of {args.repeats}) ==")
    adata, truth = make_counts(args.cells, genes=args.genes)
    scx.tl.classify_by_threshold(adata[:20_000].copy(), markers)  # warm-up: imports
    for method in ("gmm", "ks"):
        for metagene in ("shifted_geometric_mean", "mean", "pc1"):
            best = np.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                scx.tl.classify_by_threshold(adata, markers, method=method, metagene=metagene, key_added="bench")
                best = min(best, time.perf_counter() - t0)
            acc = float((adata.obs["bench_cluster"].to_numpy() == truth).mean())
            print(f"{method:4s} {metagene:23s} {best:6.2f} s   accuracy {acc:.4f}")
    x = adata.X
    print(f"sparse matrix: {(x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 1e6:,.0f} MB")
    for method in ("gmm", "ks"):
        tracemalloc.start()
        scx.tl.classify_by_threshold(adata, markers, method=method, key_added="bench")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{method:4s} peak allocated during the call: {peak / 1e6:,.0f} MB")

    print("\n== accuracy on synthetic truth (200,000 cells) ==")
    cases = {
        "three_markers": ({"markers": 3, "frac": 0.15}, markers),
        "zero_inflated": ({"markers": 1, "frac": 0.20}, ["MARKER0"]),
        "balanced": ({"markers": 3, "frac": 0.45}, markers),
    }
    print(f"{'case':15s} {'truth high':>10s} {'gmm':>8s} {'ks':>8s}")
    for name, (kw, feats) in cases.items():
        adata, truth = make_counts(200_000, genes=args.genes, seed=1, **kw)
        accs = []
        for method in ("gmm", "ks"):
            scx.tl.classify_by_threshold(adata, feats, method=method, key_added="acc")
            accs.append(float((adata.obs["acc_cluster"].to_numpy() == truth).mean()))
        print(f"{name:15s} {truth.mean():10.3f} {accs[0]:8.4f} {accs[1]:8.4f}")
    import anndata as ad
    import pandas as pd

    x = np.random.default_rng(1).normal(5.0, 1.0, 200_000)
    one = ad.AnnData(obs=pd.DataFrame({"f": x}, index=pd.RangeIndex(x.size).astype(str)))
    try:
        scx.tl.classify_by_threshold(one, "f", method="gmm", key_added="acc")
        gmm = f"{one.uns['acc']['fraction_high']:.3f} high"
    except ValueError:
        gmm = "refused"
    scx.tl.classify_by_threshold(one, "f", method="ks", key_added="acc")
    print(f"{'one_population':15s} {0.0:10.3f} {gmm:>8s} {one.uns['acc']['fit']['side']:>8s}")


if __name__ == "__main__":
    main()
