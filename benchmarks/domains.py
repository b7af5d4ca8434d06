"""Time and peak memory of ``scx.tl.spatial_domains`` on a large synthetic slide, and of its small-domain step.

    python benchmarks/domains.py [--cells 1000000] [--sections 2]

Cells are laid uniformly over ``--sections`` sections of 10 mm x 10 mm (about 10 µm apart); the selected cells are
those inside 400 random blobs plus 3 % scattered singletons, so that the radius graph (30 µm, the Xenium default)
gives large domains and thousands of small ones to merge or drop. A warm-up call on a small slide does the imports
before the clock starts (an older checkout imports squidpy there, 10-16 s, which is not the function's cost). The
small-domain step (merging each small domain into the nearest large one within ``merge_distance``) is timed on its
own by wrapping the private function that does it. Run the script on an older checkout (``PYTHONPATH=<old>/src``) to
compare.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from _bench import measure


def make_slide(n: int, sections: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 10_000, (n, 2))
    section = rng.integers(0, sections, n)
    centres = rng.uniform(0, 10_000, (400, 2))
    radii = rng.uniform(100, 400, 400)
    inside = np.zeros(n, dtype=bool)
    for c, r in zip(centres, radii):
        inside |= ((xy - c) ** 2).sum(axis=1) < r**2
    selected = inside | (rng.random(n) < 0.03)
    obs = pd.DataFrame(
        {"selected": selected, "section": pd.Categorical(section.astype(str))}, index=np.arange(n).astype(str)
    )
    return ad.AnnData(obs=obs, obsm={"spatial": xy})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--sections", type=int, default=2)
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    import spatialcx as scx
    from spatialcx.tl import _domains

    logging.getLogger("spatialcx").setLevel(logging.ERROR)  # after the import, which sets the level

    def run(table: ad.AnnData) -> ad.AnnData:
        scx.tl.spatial_domains(table, "selected", platform="xenium", library_key="section", min_cells=20)
        return table

    run(make_slide(20_000, args.sections, seed=1))  # warm-up: imports
    adata = make_slide(args.cells, args.sections)
    n_sel = int(adata.obs["selected"].sum())
    print(f"{args.cells:,} cells in {args.sections} sections, {n_sel:,} selected ({os.cpu_count()} cores)")

    small_step = []
    original = _domains._handle_small

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        small_step.append(time.perf_counter() - t0)
        return out

    _domains._handle_small = timed

    out, times, peak = measure(run, adata.copy)
    u = out.uns["domain"]
    print(
        f"spatial_domains: {times[0]:.1f} s, peak {peak:,.0f} MiB; {u['n_domains']:,} domains, "
        f"{u['n_small_merged']:,} small merged, {u['n_small_dropped']:,} dropped"
    )
    print(f"of which the small-domain step: {small_step[0]:.2f} s")


if __name__ == "__main__":
    main()
