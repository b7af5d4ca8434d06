from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

#: Real public datasets live beside the project checkout (``../shared/data``); tests skip cleanly without them.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Return a path under ``../shared/data`` or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared dataset not available: {'/'.join(parts)}")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Caches (the ontology index) go to a temporary folder, never into the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPATIALCX_CACHE_DIR", str(tmp_path_factory.mktemp("spatialcx_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def shared_data():
    """Factory fixture: ``shared_data("starmap_mpfc", "starmap_mpfc.h5ad")``."""
    return shared_path


@pytest.fixture(scope="session")
def xenium_bone_marrow():
    """The real Xenium bone marrow (84,518 cells x 477 genes) with its graph-based clusters in obs['cluster'].

    Read once per session: tests take a ``.copy()`` before writing into it.
    """
    import pandas as pd
    import scanpy as sc

    folder = shared_path("xenium_bonemarrow")
    adata = sc.read_10x_h5(folder / "cell_feature_matrix.h5", gex_only=True)
    clusters = pd.read_parquet(folder / "cell_clusters_graphclust.parquet")["cluster"]
    adata.obs["cluster"] = pd.Categorical(clusters.reindex(adata.obs_names).astype("string"))
    return adata


@pytest.fixture
def home_and_work(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """``(home, work)``: two empty folders, ``$HOME`` set to the first and the working folder to the second."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home, work


def _top_clusters(adata, gene: str, n: int = 1) -> list[str]:
    """The ``n`` clusters of ``obs["cluster"]`` with the most counts of ``gene`` per cell, highest first."""
    import numpy as np
    import pandas as pd

    counts = pd.Series(np.asarray(adata[:, gene].X.todense()).ravel(), index=adata.obs_names)
    return list(counts.groupby(adata.obs["cluster"], observed=True).mean().nlargest(n).index)


@pytest.fixture(scope="session")
def top_clusters():
    """Function fixture: ``top_clusters(adata, "CTSG", n=2)``, the clusters with the most counts of a gene per cell."""
    return _top_clusters


@pytest.fixture
def merfish_store(tmp_path) -> Path:
    """A writable copy of the real MERFISH SpatialData store (older zarr v2 layout), in ``tmp_path``."""
    import os
    import shutil

    src = shared_path("merfish_visp_spatialdata", "merfish.zarr")
    dst = tmp_path / "merfish.zarr"
    shutil.copytree(src, dst)
    for dirpath, _, filenames in os.walk(dst):  # writable whatever the permissions of the shared copy
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return dst
