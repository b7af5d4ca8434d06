"""Time and peak memory of ``scx.tl.predict`` vs ``celltypist.annotate`` on the same model and input, one process.

    python benchmarks/predict_vs_celltypist.py [--cells 100000] [--genes 2000] [--nnz 200] [--classes 20] [--dense]

Both tools score the same log1p(10k)-normalized sparse matrix (``--dense``: the same values in a dense float32
array, as some tools write tables) with the same model (trained once, not timed).
Each call runs twice on a fresh copy of the input: once timed (best of ``--repeats``), once under ``tracemalloc`` for
the peak of Python-tracked allocations (numpy and scipy report theirs), i.e. the extra memory each tool needs on top
of the input; tracing slows allocation-heavy code, so time and memory are not measured in the same run. Decision
scores are compared as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from _bench import marker_counts, measure
from scipy import sparse


def make_query(n: int, g: int, nnz: int, k: int, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """Sparse log1p(10k) data with ~``nnz`` non-zeros per cell and ``k`` classes with their own marker genes."""
    x, labels = marker_counts(n, g, nnz, k, rng=np.random.default_rng(seed), n_markers=50, marker_share=4, mean=1.5)
    lib = np.asarray(x.sum(axis=1)).ravel()
    x = sparse.csr_matrix(sparse.diags(1e4 / lib) @ x).astype(np.float32)
    x.data = np.log1p(x.data)
    adata = ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    adata.var_names = [f"G{i}" for i in range(g)]
    return adata, np.array([f"type_{i}" for i in labels])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--nnz", type=int, default=200)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--train-cells", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense", action="store_true", help="score a dense float32 table instead of a sparse one")
    p.add_argument("--model-genes", type=int, default=0, help="train on the first N genes only (0: all)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="rows per block for spatialcx (0: its default)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("celltypist").setLevel(logging.ERROR)

    import celltypist

    import spatialcx as scx
    from spatialcx.model._train import fit_model

    query, labels = make_query(args.cells, args.genes, args.nnz, args.classes)
    nt = args.train_cells
    g = args.model_genes or args.genes
    model = fit_model(query.X[:nt, :g], labels[:nt], query.var_names[:g], method="sgd", random_state=0)
    # CellTypist's convention (library size over all genes): the export then scores as celltypist.annotate expects
    model = dataclasses.replace(model, normalize_over="all")
    ct_model = model.to_celltypist()
    if args.dense:
        query.X = query.X.toarray()
    nnz = np.count_nonzero(query.X) if args.dense else query.X.nnz
    nbytes = query.X.nbytes if args.dense else query.X.data.nbytes * 2
    print(
        f"query: {query.n_obs:,} cells x {query.n_vars:,} genes ({'dense' if args.dense else 'sparse'}), "
        f"{nnz / query.n_obs:.0f} non-zeros per cell, {model.n_classes} classes, model on {model.n_features:,} genes; "
        f"input matrix {nbytes / 2**20:.0f} MB"
    )

    results = {}

    def run_scx(q):
        scx.tl.predict(q, model, normalize_over="all", chunk_size=args.chunk_size or None)
        results["scx"] = q
        return q

    _, t_scx, m_scx = measure(run_scx, query.copy, repeats=args.repeats)
    q_scx = results["scx"]
    res, t_ct, m_ct = measure(lambda q: celltypist.annotate(q, model=ct_model), query.copy, repeats=args.repeats)

    ours = q_scx.obsm["cell_type_decision_scores"].astype(np.float64)
    theirs = res.decision_matrix.to_numpy()
    max_abs = float(np.abs(ours - theirs).max())
    same = bool(
        (
            q_scx.obs["cell_type_predicted"].astype(str).to_numpy()
            == res.predicted_labels["predicted_labels"].astype(str).to_numpy()
        ).all()
    )
    warm_scx, warm_ct = min(t_scx[1:] or t_scx), min(t_ct[1:] or t_ct)
    print(f"{'tool':<22}{'first call (s)':>16}{'repeated call (s)':>19}{'peak extra memory (MB)':>25}")
    print(f"{'spatialcx.tl.predict':<22}{t_scx[0]:>16.2f}{warm_scx:>19.2f}{m_scx:>25.0f}")
    print(f"{'celltypist.annotate':<22}{t_ct[0]:>16.2f}{warm_ct:>19.2f}{m_ct:>25.0f}")
    print(
        f"speed-up: {t_ct[0] / t_scx[0]:.1f}x on the first call, {warm_ct / warm_scx:.1f}x on repeated calls; "
        f"memory ratio (spatialcx / celltypist): {m_scx / m_ct:.3f}"
    )
    print(
        f"decision scores: max |diff| = {max_abs:.2e} (float32 storage; max |score| = {np.abs(theirs).max():.1f}); "
        f"identical labels: {same}"
    )


if __name__ == "__main__":
    main()
