"""Time and peak memory (max RSS of the process) of ``scx.pl.confidence`` on a slide of many cells drawn as points.

    python benchmarks/plot_points.py [--cells 1000000] [--shapes] [--out confidence.png]

The cells lie on a jittered 10 µm grid with random types and confidences, as centroids in ``obsm["spatial"]`` of an
AnnData, or (``--shapes``) as circles of a shapes element that the table annotates (above 100,000 cells they are
drawn as points too); the figure is drawn and saved (dpi 80), to ``--out`` when given. The time leaves out the
imports of the first call (a warm-up on 200 cells). Run it on an older checkout
(``PYTHONPATH=<old>/src``) to compare; max RSS includes the slide itself (one process per run).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")


def make_table(n: int, seed: int = 0) -> ad.AnnData:
    """``n`` cells of three types on a jittered grid; confidence depends on the type, so the map has structure."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n)) + 1
    xy = np.stack(np.divmod(np.arange(n), side), 1).astype(float) * 10 + rng.uniform(0, 2, (n, 2))
    types = rng.choice(["A", "B", "C"], n)
    mean = pd.Series({"A": 0.9, "B": 0.7, "C": 0.4})[types].to_numpy()
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(["cells"] * n),
            "cell_id": np.arange(n),
            "cell_type": pd.Categorical(types),
            "cell_type_confidence": np.clip(mean + rng.normal(0, 0.15, n), 0, 1).astype(np.float32),
        },
        index=[str(i) for i in range(n)],
    )
    return ad.AnnData(obs=obs, obsm={"spatial": xy})


def make_slide(table: ad.AnnData):
    """The table in a SpatialData object, annotating circles of 6 µm at its centroids."""
    import geopandas as gpd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    xy = table.obsm["spatial"]
    circles = gpd.GeoDataFrame(
        {"radius": np.full(table.n_obs, 3.0)}, geometry=shapely.points(xy), index=np.arange(table.n_obs)
    )
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")
    return SpatialData(shapes={"cells": ShapesModel.parse(circles)}, tables={"table": table})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--shapes", action="store_true", help="circles of a shapes element instead of obsm centroids")
    p.add_argument("--out", default=None, help="keep the PNG there")
    args = p.parse_args()
    import spatialcx as scx

    data = make_table(args.cells)
    what = "centroid"
    if args.shapes:
        data, what = make_slide(data), "circle"
    warm = make_table(200)  # the first call imports matplotlib and spatialdata (seconds): not timed
    scx.pl.confidence(make_slide(warm) if args.shapes else warm).savefig(tempfile.TemporaryFile(), dpi=80)
    start = time.perf_counter()
    fig = scx.pl.confidence(data)
    with tempfile.TemporaryDirectory() as folder:
        fig.savefig(args.out or Path(folder) / "confidence.png", dpi=80)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"scx.pl.confidence, {args.cells:,} {what} cells, drawn and saved: {seconds:.1f} s, max RSS {rss:,.0f} MB")


if __name__ == "__main__":
    main()
