"""A million-cell slide in a SpatialData zarr store: ``scx.tl.predict`` vs ``celltypist.annotate``, one process.

    python benchmarks/slide_scale.py [--cells 1000000] [--genes 500] [--nnz 150] [--classes 20]

A synthetic Xenium-like table (integer counts, ``--nnz`` non-zeros per cell over a ``--genes`` panel, ``--classes``
types with their own marker genes) is written as the table of a SpatialData zarr store; a model is trained once on
20,000 cells of a separate reference drawn the same way (not timed). Then, each timed once and measured once more
under ``tracemalloc`` (the peak of Python-tracked allocations, numpy's and scipy's included: the extra memory on top of
what is already loaded):

1. ``spatialdata.read_zarr`` of the store (the table comes into memory);
2. ``scx.tl.predict`` on that SpatialData: normalization per chunk from the counts, exact scores, the ``calibrated``
   confidence, and the crash-safe write-back of obs / obsm / uns into the store (X is not rewritten);
3. ``scx.tl.predict`` on the same table read lazily (``anndata.experimental.read_lazy``: X is a dask array of sparse
   chunks of 1,000 rows, nothing loaded up front): what a table larger than memory goes through; and once more with
   X read in chunks of 10,000 rows (``anndata.experimental.read_elem_lazy(..., chunks=(10_000, -1))``);
4. ``celltypist.annotate`` with the same model (exported by ``to_celltypist``) on the table normalized to log1p(10k)
   in memory, as CellTypist requires (the normalization is not timed for CellTypist; it is for spatialcx).

Decision scores and labels of the three predictions are compared.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _bench import marker_counts, measure


def make_counts(n: int, g: int, nnz: int, k: int, seed: int) -> ad.AnnData:
    """Integer counts with about ``nnz`` non-zeros per cell; each type draws a tenth of its counts from 25 markers."""
    x, labels = marker_counts(
        n,
        g,
        nnz,
        k,
        rng=np.random.default_rng(seed),
        marker_rng=np.random.default_rng(12345),  # the same markers for every seed
        n_markers=25,
        marker_share=10,
        mean=0.6,
        block=100_000,
    )
    obs = pd.DataFrame({"label": pd.Categorical([f"type_{i}" for i in labels])}, index=[f"c{i}" for i in range(n)])
    obs["cell_id"] = np.arange(n)
    obs["region"] = pd.Categorical(["cells"] * n)
    adata = ad.AnnData(x, obs=obs)
    adata.var_names = [f"G{i}" for i in range(g)]
    return adata


def timed_and_traced(fn):
    """(result, seconds of a run, traced peak in MiB of a second run)."""
    out, times, peak = measure(fn)
    return out, times[0], peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--nnz", type=int, default=150)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=50_000)
    p.add_argument("--no-celltypist", action="store_true", help="skip CellTypist (it densifies the table)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("celltypist").setLevel(logging.ERROR)

    import spatialdata as sd
    from spatialdata.models import TableModel

    import spatialcx as scx

    scx.settings.verbosity = 0
    work = Path(tempfile.mkdtemp(prefix="scx_slide_"))
    try:
        t0 = time.perf_counter()
        query = make_counts(args.cells, args.genes, args.nnz, args.classes, seed=0)
        truth = query.obs["label"].astype(str).to_numpy()
        del query.obs["label"]
        reference = make_counts(20_000, args.genes, args.nnz, args.classes, seed=1)
        model = scx.tl.train(reference, "label", random_state=0)
        table = TableModel.parse(query, region="cells", region_key="region", instance_key="cell_id")
        store = work / "slide.zarr"
        sd.SpatialData(tables={"table": table}).write(store)
        del table, query
        gc.collect()
        nnz = sd.read_zarr(store)["table"].X.nnz
        print(
            f"slide: {args.cells:,} cells x {args.genes} genes, {nnz / args.cells:.0f} non-zeros per cell, "
            f"{args.classes} types; store written in {time.perf_counter() - t0:.0f} s (not timed below)"
        )

        rows = []
        _, t_read, m_read = timed_and_traced(lambda: sd.read_zarr(store))
        rows.append(("spatialdata.read_zarr (table into memory)", t_read, m_read))

        slide = sd.read_zarr(store)

        def predict_store():
            scx.tl.predict(slide, model, chunk_size=args.chunk_size)  # run twice: the second overwrites the first
            return slide

        _, t_pred, m_pred = timed_and_traced(predict_store)
        rows.append(("scx.tl.predict on the SpatialData, with write-back", t_pred, m_pred))
        scores_store = slide["table"].obsm["cell_type_decision_scores"]
        labels_store = slide["table"].obs["cell_type_predicted"].astype(str).to_numpy()
        reread = sd.read_zarr(store)["table"]
        assert (reread.obs["cell_type_predicted"].astype(str).to_numpy() == labels_store).all()
        slide = reread = None

        def predict_lazy():
            lazy = ad.experimental.read_lazy(store / "tables" / "table")
            return scx.tl.predict(lazy, model, chunk_size=args.chunk_size, copy=True)

        lazy_out, t_lazy, m_lazy = timed_and_traced(predict_lazy)
        rows.append(("scx.tl.predict on the lazily read table (dask)", t_lazy, m_lazy))
        diff_lazy = float(np.abs(lazy_out.obsm["cell_type_decision_scores"] - scores_store).max())
        same_lazy = bool((lazy_out.obs["cell_type_predicted"].astype(str).to_numpy() == labels_store).all())
        del lazy_out

        def predict_lazy_large_chunks():
            import zarr
            from anndata.experimental import read_elem_lazy

            lazy = ad.experimental.read_lazy(store / "tables" / "table")
            lazy.X = read_elem_lazy(zarr.open_group(store / "tables" / "table", mode="r")["X"], chunks=(10_000, -1))
            return scx.tl.predict(lazy, model, chunk_size=args.chunk_size, copy=True)

        lazy_out, t_lazy10, m_lazy10 = timed_and_traced(predict_lazy_large_chunks)
        rows.append(("  the same, X read in chunks of 10,000 rows", t_lazy10, m_lazy10))
        assert (lazy_out.obs["cell_type_predicted"].astype(str).to_numpy() == labels_store).all()
        del lazy_out

        accuracy = float((labels_store == truth).mean())
        print(f"accuracy of the calls against the simulated types: {accuracy:.3f}")
        print(f"lazy vs in-memory: max |score difference| {diff_lazy:.1e}, identical labels: {same_lazy}")

        if not args.no_celltypist:
            import celltypist
            import scanpy as sc

            adata = sd.read_zarr(store)["table"]
            sc.pp.normalize_total(adata, target_sum=1e4)
            sc.pp.log1p(adata)
            ct_model = model.to_celltypist()
            res, t_ct, m_ct = timed_and_traced(lambda: celltypist.annotate(adata, model=ct_model))
            rows.append(("celltypist.annotate (log1p table in memory)", t_ct, m_ct))
            theirs = res.decision_matrix.to_numpy()
            diff_ct = float(np.abs(theirs - scores_store).max())
            same_ct = bool((res.predicted_labels["predicted_labels"].astype(str).to_numpy() == labels_store).all())
            print(
                f"spatialcx vs celltypist: max |score difference| {diff_ct:.1e} (max |score| "
                f"{np.abs(theirs).max():.1f}), identical labels: {same_ct}"
            )
            del res, adata

        print(f"\n{'step':<52}{'time (s)':>10}{'peak extra memory (MB)':>25}")
        for name, t, m in rows:
            print(f"{name:<52}{t:>10.1f}{m:>25.0f}")
        if not args.no_celltypist:
            print(
                f"\ncelltypist.annotate / scx.tl.predict: {t_ct / t_pred:.1f}x the time (in memory), "
                f"{t_ct / t_lazy:.1f}x (lazy); memory {m_ct / m_pred:.1f}x / {m_ct / m_lazy:.1f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
