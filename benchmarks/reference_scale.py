"""References at scale: ``combine_references`` + ``subsample_balanced`` on a 400,000 x 30,000 h5ad.

    python benchmarks/reference_scale.py [--cells 400000] [--genes 30000] [--panel 300] [--max-cells-per-ref 100000]
        [--input path|backed|lazy]

Builds (once, cached under ``benchmarks/.cache/``) a synthetic h5ad with raw integer counts in a CSR ``X`` and 20
labelled cell types of very different sizes, written chunk by chunk so the generator stays in bounded memory. Then,
in a fresh process, runs ``scx.pp.combine_references`` to a panel of ``--panel`` genes (the reference given as its
path, as an AnnData opened with ``backed="r"``, or as the lazy AnnData of ``scx.io.read_reference`` with all genes,
``--input``) and ``scx.pp.subsample_balanced`` on the result, and prints the wall time and the peak resident memory
of that process (``VmHWM``: everything the process held, Python and native, at its peak, imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

CACHE = Path(__file__).resolve().parent / ".cache"
N_TYPES = 20
CHUNK = 10_000
MEAN_READS = 1_500


def _type_sizes(n_cells: int) -> np.ndarray:
    """20 types from ~25% of the cells down to ~0.25%."""
    w = np.geomspace(100, 1, N_TYPES)
    sizes = np.floor(w / w.sum() * n_cells).astype(np.int64)
    sizes[0] += n_cells - sizes.sum()
    return sizes


def _profiles(n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """Per-type gene probabilities: a shared skewed baseline plus 30 marker genes per type, 20x up."""
    base = rng.lognormal(mean=0.0, sigma=1.5, size=n_genes)
    profiles = np.tile(base, (N_TYPES, 1))
    markers = rng.permutation(n_genes)[: N_TYPES * 30].reshape(N_TYPES, 30)
    for t in range(N_TYPES):
        profiles[t, markers[t]] *= 20
    return np.cumsum(profiles / profiles.sum(axis=1, keepdims=True), axis=1)


def build(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> None:
    """Write the synthetic reference chunk by chunk (anndata's on-disk format, appended with ``sparse_dataset``)."""
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    cdf = _profiles(n_genes, rng)
    labels = np.repeat(np.arange(N_TYPES), _type_sizes(n_cells))
    rng.shuffle(labels)
    tmp = path.with_name(path.name + ".part")
    t0 = time.perf_counter()
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        for start in range(0, n_cells, CHUNK):
            lab = labels[start : start + CHUNK]
            n = len(lab)
            reads = rng.poisson(MEAN_READS * rng.lognormal(0, 0.4, n)).astype(np.int64) + 50
            row_parts, col_parts = [], []
            for t in np.unique(lab):
                cells = np.flatnonzero(lab == t)
                r = np.repeat(cells, reads[cells])
                row_parts.append(r)
                col_parts.append(np.minimum(np.searchsorted(cdf[t], rng.random(r.size)), n_genes - 1))
            key = np.concatenate(row_parts) * n_genes + np.concatenate(col_parts)
            key, counts = np.unique(key, return_counts=True)
            rows, cols = np.divmod(key, n_genes)
            x = sp.csr_matrix(
                (
                    counts.astype(np.float32),
                    cols.astype(np.int32),
                    np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]),
                ),
                shape=(n, n_genes),
            )
            if start == 0:
                write_elem(f, "X", x, dataset_kwargs={"chunks": (1 << 18,)})
            else:
                sparse_dataset(f["X"]).append(x)
            if start // CHUNK % 10 == 0:
                print(f"  built {start + n:,} / {n_cells:,} cells ({time.perf_counter() - t0:.0f} s)", flush=True)
        names = [f"GENE{i:05d}" for i in range(n_genes)]
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([f"type_{t:02d}" for t in labels])},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=names))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    os.replace(tmp, path)
    a = ad.read_h5ad(path, backed="r")
    print(
        f"built {path.name}: {a.n_obs:,} x {a.n_vars:,}, {a.X.group['data'].shape[0]:,} non-zeros, "
        f"{path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s"
    )
    a.file.close()


def panel_of(n_genes: int, n_panel: int, seed: int = 0) -> list[str]:
    """Half markers of the types (as a real panel would), half random genes."""
    rng = np.random.default_rng(seed)
    _ = rng.lognormal(mean=0.0, sigma=1.5, size=n_genes)  # same draws as _profiles
    markers = rng.permutation(n_genes)[: N_TYPES * 30]
    others = np.setdiff1d(np.arange(n_genes), markers)
    pick = np.concatenate(
        [markers[: n_panel // 2], np.random.default_rng(1).choice(others, n_panel - n_panel // 2, replace=False)]
    )
    return [f"GENE{i:05d}" for i in pick]


def peak_rss_mib() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` would include the parent's before exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(path: Path, n_genes: int, n_panel: int, max_cells_per_ref: int | None, given_as: str = "path") -> dict:
    """The measured part (run in a fresh process)."""
    import anndata as ad

    import spatialcx as scx

    genes = panel_of(n_genes, n_panel)
    t0 = time.perf_counter()
    if given_as == "backed":
        reference = ad.read_h5ad(path, backed="r")
    elif given_as == "lazy":
        reference = scx.io.read_reference(path, label_key="cell_type", max_cells=max_cells_per_ref)
    else:
        reference = path
    combined = scx.pp.combine_references([reference], "cell_type", genes=genes, max_cells_per_ref=max_cells_per_ref)
    t1 = time.perf_counter()
    balanced = scx.pp.subsample_balanced(combined, "original_label", max_cells_per_type=5000)
    t2 = time.perf_counter()
    return {
        "combine_s": round(t1 - t0, 1),
        "subsample_s": round(t2 - t1, 1),
        "total_s": round(t2 - t0, 1),
        "peak_rss_mib": round(peak_rss_mib()),
        "cpu_s": round(sum(getattr(resource.getrusage(resource.RUSAGE_SELF), k) for k in ("ru_utime", "ru_stime")), 1),
        "combined": [combined.n_obs, combined.n_vars, int(combined.layers["counts"].nnz)],
        "balanced": [balanced.n_obs, balanced.n_vars],
        "types": int(balanced.obs["original_label"].nunique()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=400_000)
    p.add_argument("--genes", type=int, default=30_000)
    p.add_argument("--panel", type=int, default=300)
    p.add_argument("--max-cells-per-ref", type=int, default=100_000, help="0 for no cap")
    p.add_argument("--input", choices=["path", "backed", "lazy"], default="path", help="how the reference is given")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    path = CACHE / f"reference_{args.cells}x{args.genes}.h5ad"
    cap = args.max_cells_per_ref or None
    if args.child:
        print(json.dumps(run(path, args.genes, args.panel, cap, args.input)))
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        build(path, args.cells, args.genes)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--cells",
        str(args.cells),
        "--genes",
        str(args.genes),
        "--panel",
        str(args.panel),
        "--max-cells-per-ref",
        str(args.max_cells_per_ref),
        "--input",
        args.input,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"reference: {path.name} ({path.stat().st_size / 2**30:.2f} GiB), panel {args.panel} genes, "
        f"given as {args.input}, max_cells_per_ref={cap}, CPUs available: {len(os.sched_getaffinity(0))}"
    )
    print(
        f"combine_references: {res['combine_s']} s -> {res['combined'][0]:,} cells x {res['combined'][1]} genes "
        f"({res['combined'][2]:,} non-zeros)"
    )
    print(f"subsample_balanced: {res['subsample_s']} s -> {res['balanced'][0]:,} cells, {res['types']} types")
    print(
        f"total {res['total_s']} s wall (process incl. imports {wall:.1f} s wall, {res['cpu_s']} s CPU), "
        f"peak RSS {res['peak_rss_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
