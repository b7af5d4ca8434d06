"""Time and peak memory (max RSS of the process) of ``scx.pl.confidence`` on a slide of many polygon cells.

    python benchmarks/plot_polygons.py [--cells 1000000]

The cells are squares of 6 µm on a 10 µm grid, in a shapes element that the table annotates, with random types and
confidences; the figure is drawn and saved (dpi 80). Above 100,000 polygons the map keeps each polygon as its
centroid and area instead of reading every vertex. Run it on an older checkout (``PYTHONPATH=<old>/src``) to compare;
max RSS includes the slide itself (one process per run).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import anndata as ad
import geopandas as gpd
import matplotlib
import numpy as np
import pandas as pd
import shapely

matplotlib.use("Agg")


def make_slide(n: int, seed: int = 0):
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n)) + 1
    xy = np.stack(np.divmod(np.arange(n), side), 1).astype(float) * 10 + rng.uniform(0, 2, (n, 2))
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + 6, xy[:, 1] + 6), index=np.arange(n))
    )
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(["cells"] * n),
            "cell_id": np.arange(n),
            "cell_type": pd.Categorical(rng.choice(["A", "B", "C"], n)),
            "cell_type_confidence": rng.uniform(0, 1, n).astype(np.float32),
        },
        index=[str(i) for i in range(n)],
    )
    table = TableModel.parse(ad.AnnData(obs=obs), region="cells", region_key="region", instance_key="cell_id")
    return SpatialData(shapes={"cells": shapes}, tables={"table": table})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    args = p.parse_args()
    import spatialcx as scx

    sdata = make_slide(args.cells)
    start = time.perf_counter()
    fig = scx.pl.confidence(sdata)
    with tempfile.TemporaryDirectory() as folder:
        fig.savefig(Path(folder) / "confidence.png", dpi=80)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"scx.pl.confidence, {args.cells:,} polygon cells, drawn and saved: {seconds:.1f} s, max RSS {rss:,.0f} MB")


if __name__ == "__main__":
    main()
