"""Time and peak memory of ``scx.tl.score_signatures`` and ``scx.tl.annotate_domains`` against the reference tools.

    python benchmarks/signatures.py [--cells 200000] [--genes 300] [--sets 50] [--groups 50]

- ``score_signatures`` (50 marker sets of 4 genes on a sparse count table) against ``scanpy.tl.score_genes`` called
  once per set on the same log1p(10k) data (scanpy's score: the set's mean minus the mean of control genes, another
  quantity; compared for cost only).
- ``annotate_domains`` (every group against the rest, every signature) against ``scipy.stats.mannwhitneyu`` called
  once per group on the same scores, as the statistics are defined; the AUCs and p-values are compared.
- ``score_signatures(smooth=True)`` (the whole call), and its smoothing step alone against squidpy's
  k-nearest-neighbour graph with the same average on the same scores (when squidpy is installed; compared).

Time: one untraced run; memory: the peak of ``tracemalloc`` in a second run (``_bench.measure``), on top of the
table already in memory.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from _bench import marker_counts, measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--sets", type=int, default=50)
    p.add_argument("--groups", type=int, default=50)
    p.add_argument("--no-reference", action="store_true", help="skip the reference tools (slow at a million cells)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("spatialcx").setLevel(logging.ERROR)

    import scanpy as sc
    from scipy.stats import mannwhitneyu

    import spatialcx as scx

    rng = np.random.default_rng(0)
    x, labels = marker_counts(
        args.cells, args.genes, 30, 10, rng=rng, n_markers=25, marker_share=10, mean=0.6, block=100_000
    )
    genes = [f"G{i}" for i in range(args.genes)]
    table = ad.AnnData(x, var=pd.DataFrame(index=genes))
    table.obs_names = [f"c{i}" for i in range(args.cells)]
    sets = {f"set{k}": [genes[j] for j in rng.choice(args.genes, 4, replace=False)] for k in range(args.sets)}
    print(f"{args.cells:,} cells x {args.genes} genes ({x.nnz / args.cells:.0f} non-zeros per cell), {args.sets} sets")

    _, t, m = measure(lambda: scx.tl.score_signatures(table, sets))
    print(f"scx.tl.score_signatures:              {t[0]:7.2f} s, peak {m:7.0f} MB")
    if not args.no_reference:
        logged = table.copy()
        sc.pp.normalize_total(logged, target_sum=1e4)
        sc.pp.log1p(logged)

        def scanpy_scores() -> None:
            for name, g in sets.items():
                sc.tl.score_genes(logged, g, score_name=name, random_state=0)

        _, t_ref, m_ref = measure(scanpy_scores)
        print(f"scanpy.tl.score_genes, once per set:  {t_ref[0]:7.2f} s, peak {m_ref:7.0f} MB (log1p table given)")
        print(f"ratio scanpy / spatialcx: time {t_ref[0] / t[0]:.1f}x, memory {m_ref / m:.1f}x")

    groups = rng.integers(0, args.groups, args.cells)
    table.obs["domain"] = pd.Categorical([f"d{g}" for g in groups])
    _, t, m = measure(lambda: scx.tl.annotate_domains(table, "domain"))
    print(f"\nscx.tl.annotate_domains ({args.groups} groups): {t[0]:7.2f} s, peak {m:7.0f} MB")
    if not args.no_reference:
        scores = np.asarray(table.obsm["signature"], dtype=np.float64)
        codes = table.obs["domain"].cat.codes.to_numpy()

        def scipy_tests() -> tuple[np.ndarray, np.ndarray]:
            auc, pval = [], []
            for g in range(len(table.obs["domain"].cat.categories)):
                inside = codes == g
                res = mannwhitneyu(scores[inside], scores[~inside], axis=0, method="asymptotic")
                auc.append(res.statistic / (inside.sum() * (~inside).sum()))
                pval.append(res.pvalue)
            return np.asarray(auc), np.asarray(pval)

        (auc_ref, p_ref), t_ref, m_ref = measure(scipy_tests)
        print(f"scipy mannwhitneyu, once per group:   {t_ref[0]:7.2f} s, peak {m_ref:7.0f} MB")
        print(f"ratio scipy / spatialcx: time {t_ref[0] / t[0]:.1f}x, memory {m_ref / m:.1f}x")
        stats = pd.DataFrame(table.uns["domain_annotation"]["stats"])
        ours_auc = stats["auc"].to_numpy().reshape(auc_ref.shape)
        ours_p = stats["pvalue"].to_numpy().reshape(p_ref.shape)
        print(
            f"max |AUC difference| {np.abs(ours_auc - auc_ref).max():.1e}, "
            f"max |p-value difference| {np.abs(ours_p - p_ref).max():.1e}"
        )

    # smoothing over the 10 nearest cells (cells spread uniformly, about 10 apart)
    from spatialcx.tl._signatures import _smooth

    coords = rng.uniform(0, 10.0 * np.sqrt(args.cells), (args.cells, 2))
    table.obsm["spatial"] = coords
    _, t, m = measure(lambda: scx.tl.score_signatures(table, sets, smooth=True, key_added="smoothed"))
    print(f"\nscx.tl.score_signatures(smooth=True):  {t[0]:7.2f} s, peak {m:7.0f} MB (scoring included)")
    raw = np.asarray(table.obsm["signature"], dtype=np.float64)
    ours, t, m = measure(lambda: _smooth(raw, coords, n_neighbors=10, source="obsm['spatial']"))
    print(f"the smoothing step alone:              {t[0]:7.2f} s, peak {m:7.0f} MB")
    if not args.no_reference:
        try:
            import squidpy as sq
        except ImportError:
            print("squidpy is not installed: no reference for the neighbour graph")
            return
        import scipy.sparse as sp

        logging.getLogger("spatialdata._logging").setLevel(logging.WARNING)  # squidpy's line per graph

        def squidpy_smooth() -> np.ndarray:
            tmp = ad.AnnData(obs=pd.DataFrame(index=table.obs_names), obsm={"spatial": coords})
            conn, _ = sq.gr.spatial_neighbors_knn(tmp, n_neighs=10, copy=True)
            w = sp.csr_matrix(conn, dtype=np.float64)
            w.data[:] = 1.0
            w = w + sp.identity(args.cells, format="csr")
            return (sp.diags(1.0 / np.asarray(w.sum(axis=1)).ravel()) @ w) @ raw

        ref, t_ref, m_ref = measure(squidpy_smooth)
        print(f"squidpy knn graph + the same average: {t_ref[0]:7.2f} s, peak {m_ref:7.0f} MB")
        diff = np.abs(np.asarray(ours, dtype=np.float64) - ref).max()
        print(
            f"ratio squidpy / spatialcx: time {t_ref[0] / t[0]:.1f}x, memory {m_ref / m:.1f}x; max |difference| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
