from __future__ import annotations

import importlib
import os
import shutil
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import fsspec
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

import spatialcx as scx

FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")
IDS = ["ENSG00000128683", "ENSG00000136750", "ENSG00000157005", "ENSG00000075624", "ENSG00000198851"]
SYMBOLS = ["GAD1", "GAD2", "SST", "ACTB", "CD3E"]


def cxg_like(sizes: dict[str, int], seed: int = 0) -> ad.AnnData:
    """A CELLxGENE-style reference: Ensembl var names, feature_name, counts, cell_type."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(list(sizes), list(sizes.values()))
    a = ad.AnnData(
        sp.csr_matrix(rng.poisson(2.0, (len(labels), 5)).astype(np.float32) + 1),
        obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame({"feature_name": SYMBOLS}, index=IDS),
    )
    return a


@pytest.fixture
def fake_census(tmp_path, monkeypatch):
    """A stand-in ``cellxgene_census`` module: no network."""
    source = tmp_path / "census_source.h5ad"
    cxg_like({"T cell": 300, "B cell": 60, "pericyte": 12}).write_h5ad(source)
    census_cells = cxg_like({"alveolar macrophage": 500, "AT2 cell": 80, "ionocyte": 5}, seed=1)
    census_cells.obs["soma_joinid"] = np.arange(1000, 1000 + census_cells.n_obs)
    calls: dict[str, list] = {"download": [], "open": [], "get_obs": [], "get_anndata": []}
    mod = types.ModuleType("cellxgene_census")

    @contextmanager
    def open_soma(census_version="stable"):
        calls["open"].append(census_version)
        yield "census-handle"

    def download_source_h5ad(dataset_id, to_path, *, census_version="stable", progress_bar=True):
        calls["download"].append((dataset_id, census_version))
        shutil.copyfile(source, to_path)

    def get_obs(census, organism, *, value_filter=None, column_names=None):
        calls["get_obs"].append((census, organism, value_filter, column_names))
        return census_cells.obs[["soma_joinid", "cell_type"]].reset_index(drop=True)

    def get_anndata(census, organism, obs_coords=None, obs_column_names=None, **kwargs):
        calls["get_anndata"].append((organism, np.asarray(obs_coords), obs_column_names))
        rows = np.flatnonzero(np.isin(census_cells.obs["soma_joinid"], obs_coords))
        out = census_cells[rows].copy()
        out.var = pd.DataFrame({"feature_id": IDS, "feature_name": SYMBOLS}, index=[str(i) for i in range(5)])
        return out

    mod.open_soma, mod.download_source_h5ad, mod.get_obs, mod.get_anndata = (
        open_soma,
        download_source_h5ad,
        get_obs,
        get_anndata,
    )
    monkeypatch.setitem(sys.modules, "cellxgene_census", mod)
    return calls


@pytest.fixture
def fake_synapse(tmp_path, monkeypatch):
    calls: dict[str, list] = {"login": [], "get": []}
    source = tmp_path / "syn_source.h5ad"
    cxg_like({"hepatocyte": 40, "Kupffer cell": 20}, seed=2).write_h5ad(source)

    class Synapse:
        def login(self, **kwargs):
            calls["login"].append(kwargs)

        def get(self, entity, downloadLocation=None):
            calls["get"].append(entity)
            dest = f"{downloadLocation}/liver.h5ad"
            os.makedirs(downloadLocation, exist_ok=True)
            shutil.copyfile(source, dest)
            return types.SimpleNamespace(path=dest)

    mod = types.ModuleType("synapseclient")
    mod.Synapse = Synapse
    monkeypatch.setitem(sys.modules, "synapseclient", mod)
    return calls


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    root = tmp_path / "gcs"
    root.mkdir()

    class LocalGCS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem())

    LocalGCS.clear_instance_cache()
    monkeypatch.setitem(FSSPEC_REGISTRY._registry, "gs", LocalGCS)
    return root


def test_list_datasets():
    df = scx.io.list_datasets()
    assert {"human_lung_cell_atlas", "healthy_human_liver", "colon_immune_niches", "lung_covid"} <= set(df.index)
    assert df.loc["human_lung_cell_atlas", "dataset_id"] == "066943a2-fdac-4b29-b348-40cede398e4e"
    assert df["dataset_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}").all()
    assert (df["label_key"] == "cell_type").all() and (df["uri"] == "cellxgene://" + df.index).all()


def test_predefined_dataset_download_and_reuse(tmp_path, fake_census):
    out = scx.io.acquire_reference("cellxgene://human_lung_cell_atlas", tmp_path / "refs", census_version="2025-01-30")
    assert out == f"{tmp_path}/refs/human_lung_cell_atlas.h5ad"
    assert fake_census["download"] == [("066943a2-fdac-4b29-b348-40cede398e4e", "2025-01-30")]
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 372
    info = adata.uns["spatialcx_acquisition"]
    assert info["dataset_id"] == "066943a2-fdac-4b29-b348-40cede398e4e" and info["census_version"] == "2025-01-30"
    assert [p.name for p in (tmp_path / "refs").iterdir()] == ["human_lung_cell_atlas.h5ad"]  # nothing half-written

    scx.io.acquire_reference("cellxgene://human_lung_cell_atlas", tmp_path / "refs", census_version="2025-01-30")
    assert len(fake_census["download"]) == 1  # re-used
    with pytest.raises(FileExistsError, match="census_version: '2025-01-30' there, 'stable' asked for"):
        scx.io.acquire_reference("cellxgene://human_lung_cell_atlas", tmp_path / "refs")
    assert len(fake_census["download"]) == 1
    scx.io.acquire_reference("cellxgene://human_lung_cell_atlas", tmp_path / "refs", force=True)
    assert len(fake_census["download"]) == 2


def test_forced_acquisition_through_a_symlink_replaces_the_linked_file(tmp_path, fake_census):
    """An output that is a link to a file on another disk stays a link; the file it points to is replaced."""
    big_disk = tmp_path / "big"
    big_disk.mkdir()
    (big_disk / "lung.h5ad").write_bytes(b"old")
    refs = tmp_path / "refs"
    refs.mkdir()
    link = refs / "lung.h5ad"
    link.symlink_to(big_disk / "lung.h5ad")
    scx.io.acquire_reference("cellxgene://human_lung_cell_atlas", link, force=True)
    assert link.is_symlink() and link.resolve() == (big_disk / "lung.h5ad").resolve()
    assert ad.read_h5ad(link).n_obs == 372
    assert sorted(p.name for p in refs.iterdir()) == ["lung.h5ad"] and sorted(os.listdir(big_disk)) == ["lung.h5ad"]


def test_predefined_dataset_with_max_cells(tmp_path, fake_census):
    out = scx.io.acquire_reference("cellxgene://lung_covid", tmp_path / "covid.h5ad", max_cells=100)
    adata = ad.read_h5ad(out)
    counts = adata.obs["cell_type"].value_counts()
    assert adata.n_obs == 100 and counts["pericyte"] == 12  # rare types whole, largest capped first
    assert adata.uns["spatialcx_acquisition"]["n_cells_kept"] == 100
    assert "spatialcx_reference" not in adata.uns
    whole = ad.read_h5ad(scx.io.acquire_reference("cellxgene://lung_covid", tmp_path / "whole.h5ad"))
    assert list(adata.var_names) == list(whole.var_names)  # the file's own index (Ensembl ids), as downloaded
    assert list(adata.var["feature_name"]) == list(whole.var["feature_name"])


def test_existing_output_under_home_is_reused(tmp_path, fake_census, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    first = scx.io.acquire_reference("cellxgene://lung_covid", "~/refs/covid.h5ad")
    again = scx.io.acquire_reference("cellxgene://lung_covid", "~/refs/covid.h5ad")
    assert Path(first).expanduser() == tmp_path / "refs" / "covid.h5ad" and Path(again).expanduser().is_file()
    assert len(fake_census["download"]) == 1  # the second call found the file


def test_subsampling_a_downloaded_file_keeps_every_label(tmp_path):
    """What is a cell type is decided at training: acquiring keeps 'Unknown' cells, as the Census path does."""
    from spatialcx.io._acquire import _subsample_file

    rng = np.random.default_rng(0)
    labels = np.repeat(["Unknown", "type 0", "type 1", "type 2"], 100)
    ref = ad.AnnData(
        sp.csr_matrix(rng.poisson(1, (400, 5)).astype(np.float32)), obs=pd.DataFrame({"cell_type": labels})
    )
    ref.obs_names = [f"c{i}" for i in range(400)]
    ref.write_h5ad(tmp_path / "in.h5ad")
    assert _subsample_file(tmp_path / "in.h5ad", "cell_type", 200, 0, tmp_path / "out.h5ad") == 200
    counts = ad.read_h5ad(tmp_path / "out.h5ad").obs["cell_type"].value_counts()
    assert counts["Unknown"] == 50 and len(counts) == 4


def test_census_query_downloads_only_the_chosen_cells(tmp_path, fake_census):
    out = scx.io.acquire_reference(
        "cellxgene://?tissue=lung&disease=normal,COVID-19&organism=Homo sapiens", tmp_path / "q/", max_cells=50
    )
    assert out.endswith("q/cellxgene_query.h5ad")
    ((_, organism, value_filter, _),) = fake_census["get_obs"]
    assert organism == "Homo sapiens"
    assert value_filter == (
        "is_primary_data == True and (tissue in ['lung'] or tissue_general in ['lung']) and "
        "disease in ['normal', 'COVID-19']"
    )
    ((_, coords, _),) = fake_census["get_anndata"]
    assert len(coords) == 50 and (np.diff(coords) > 0).all()
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 50 and adata.obs["cell_type"].value_counts()["ionocyte"] == 5
    assert list(adata.var_names) == IDS and adata.uns["spatialcx_acquisition"]["n_cells_matching"] == 585
    # the stored reference works as it is: Ensembl ids mapped to symbols through feature_name
    combined = scx.pp.combine_references(out, "cell_type", genes=["CD3E", "SST"], min_cells_per_type=1)
    assert list(combined.var_names) == ["CD3E", "SST"] and combined.n_obs == 50


def test_census_query_errors(tmp_path, fake_census):
    with pytest.raises(ValueError, match="Unknown CELLxGENE query keys \\['colour'\\]"):
        scx.io.acquire_reference("cellxgene://?colour=blue", tmp_path / "x.h5ad")
    with pytest.raises(ValueError, match="at least one filter"):
        scx.io.acquire_reference("cellxgene://?organism=Homo sapiens", tmp_path / "x.h5ad")


def test_synapse_to_a_bucket(tmp_path, fake_synapse, fake_gcs, monkeypatch):
    monkeypatch.setenv("SYNAPSE_AUTH_TOKEN", "token-from-env")
    out = scx.io.acquire_reference("synapse://syn12345", "gs://bucket/refs/", max_cells=30)
    assert out == "gs://bucket/refs/syn12345.h5ad"
    assert fake_synapse["login"] == [{"authToken": "token-from-env", "silent": True}]
    assert fake_synapse["get"] == ["syn12345"]
    stored = fake_gcs / "bucket" / "refs" / "syn12345.h5ad"
    adata = ad.read_h5ad(stored)
    assert adata.n_obs == 30 and adata.uns["spatialcx_acquisition"]["synapse_id"] == "syn12345"
    # and read back through the same URI
    lazy = scx.io.read_reference(out, label_key="cell_type", cache_dir=tmp_path / "cache")
    assert lazy.n_obs == 30 and list(lazy.var_names) == SYMBOLS
    scx.io.acquire_reference("synapse://syn12345", "gs://bucket/refs/", max_cells=30)
    assert len(fake_synapse["get"]) == 1  # already in the bucket
    with pytest.raises(FileExistsError, match="max_cells: 30 there, -1 asked for"):
        scx.io.acquire_reference("synapse://syn12345", "gs://bucket/refs/")  # the whole file is not what is there


def test_synapse_without_token_uses_the_config(tmp_path, fake_synapse, monkeypatch):
    monkeypatch.delenv("SYNAPSE_AUTH_TOKEN", raising=False)
    scx.io.acquire_reference("synapse://syn7", tmp_path)
    assert fake_synapse["login"] == [{"silent": True}]
    assert (tmp_path / "syn7.h5ad").is_file()


@pytest.mark.parametrize(
    ("module", "extra", "source"),
    [("cellxgene_census", "census", "cellxgene://lung_covid"), ("synapseclient", "synapse", "synapse://syn1")],
)
def test_missing_extras_are_named(tmp_path, monkeypatch, module, extra, source):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"spatialcx\[{extra}\]"):
        scx.io.acquire_reference(source, tmp_path / "x.h5ad")
    assert not (tmp_path / "x.h5ad").exists()


@pytest.mark.parametrize(
    ("source", "output", "match"),
    [
        ("https://example.org/ref.h5ad", "x.h5ad", "Unsupported source"),
        ("cellxgene://no_such_dataset", "x.h5ad", "Unknown CELLxGENE dataset 'no_such_dataset'"),
        ("synapse://abc", "x.h5ad", "Bad Synapse id"),
        ("cellxgene://lung_covid", "x.csv", "must be an .h5ad file or a folder"),
    ],
)
def test_bad_sources(tmp_path, source, output, match):
    with pytest.raises(ValueError, match=match):
        scx.io.acquire_reference(source, tmp_path / output)


def test_gs_output_without_gcsfs_names_the_extra(tmp_path, fake_census, monkeypatch):
    monkeypatch.delitem(FSSPEC_REGISTRY._registry, "gs", raising=False)
    monkeypatch.setitem(
        FSSPEC_REGISTRY.known_implementations,
        "gs",
        {"class": "spatialcx_no_such_module.GCSFileSystem", "err": "Please install gcsfs"},
    )
    with pytest.raises(ImportError, match=r"spatialcx\[gcs\]"):
        scx.io.acquire_reference("cellxgene://lung_covid", "gs://bucket/covid.h5ad")
    fsspec.filesystem("file")  # the registry is still usable


def test_an_existing_output_is_reused_only_when_it_holds_what_is_asked_for(tmp_path, fake_census):
    first = scx.io.acquire_reference("cellxgene://?tissue=lung&disease=normal", tmp_path / "q/", max_cells=50)
    again = scx.io.acquire_reference("cellxgene://?disease=normal&tissue=lung", tmp_path / "q/", max_cells=50)
    assert again == first and len(fake_census["get_anndata"]) == 1  # the same query, written in another order
    with pytest.raises(FileExistsError, match=r"holds another reference .*tissue in \['lung'\]"):
        scx.io.acquire_reference("cellxgene://?tissue=liver&disease=normal", tmp_path / "q/", max_cells=50)
    with pytest.raises(FileExistsError, match="random_state: 0 there, 1 asked for"):
        scx.io.acquire_reference(
            "cellxgene://?tissue=lung&disease=normal", tmp_path / "q/", max_cells=50, random_state=1
        )
    assert len(fake_census["get_anndata"]) == 1
    assert ad.read_h5ad(first).uns["spatialcx_acquisition"]["value_filter"].count("lung") == 2  # left alone
    mine = tmp_path / "mine.h5ad"
    cxg_like({"T cell": 3}).write_h5ad(mine)
    before = mine.read_bytes()
    with pytest.raises(FileExistsError, match="not written by acquire_reference"):
        scx.io.acquire_reference("cellxgene://lung_covid", mine)
    assert mine.read_bytes() == before and not fake_census["download"]
    scx.io.acquire_reference("cellxgene://lung_covid", mine, force=True)
    assert ad.read_h5ad(mine).n_obs == 372


def test_query_values_with_commas_quotes_and_repeated_keys(tmp_path, fake_census):
    import ast

    from spatialcx.io._acquire import _census_filter

    source = (
        "cellxgene://?cell_type=CD4-positive, alpha-beta T cell&cell_type=B cell&tissue=Peyer's patch"
        "&disease=normal,COVID-19&organism=Mus musculus"
    )
    scx.io.acquire_reference(source, tmp_path / "q.h5ad")
    ((_, organism, value_filter, _),) = fake_census["get_obs"]
    assert organism == "Mus musculus"
    assert value_filter == (
        'is_primary_data == True and (tissue in ["Peyer\'s patch"] or tissue_general in ["Peyer\'s patch"]) and '
        "disease in ['normal', 'COVID-19'] and cell_type in ['CD4-positive, alpha-beta T cell', 'B cell']"
    )
    # tiledbsoma parses value filters with Python's ast: every value comes back as it was given
    constants = [n.value for n in ast.walk(ast.parse(value_filter)) if isinstance(n, ast.Constant)]
    assert {"Peyer's patch", "normal", "COVID-19", "CD4-positive, alpha-beta T cell", "B cell"} <= set(constants)
    tricky, _ = _census_filter([("cell_type", "a 'b' \"c\" \\ d")])
    assert "a 'b' \"c\" \\ d" in [n.value for n in ast.walk(ast.parse(tricky)) if isinstance(n, ast.Constant)]
    with pytest.raises(ValueError, match="one organism"):
        _census_filter([("tissue", "lung"), ("organism", "Homo sapiens,Mus musculus")])


def test_census_draw_does_not_depend_on_the_order_rows_come_back_in(tmp_path, fake_census, monkeypatch):
    mod = sys.modules["cellxgene_census"]
    real_get_obs = mod.get_obs
    seeds = iter(range(10))

    def shuffled(*args, **kwargs):  # SOMA reads need not return rows in the same order twice
        obs = real_get_obs(*args, **kwargs)
        return obs.sample(frac=1.0, random_state=next(seeds)).reset_index(drop=True)

    monkeypatch.setattr(mod, "get_obs", shuffled)
    for i in range(2):
        scx.io.acquire_reference("cellxgene://?tissue=lung", tmp_path / f"q{i}.h5ad", max_cells=40)
    first, second = (coords for _, coords, _ in fake_census["get_anndata"])
    assert len(first) == 40 and first.tolist() == second.tolist()


def test_unknown_dataset_id_is_a_clear_error(tmp_path, fake_census, monkeypatch):
    def unknown(dataset_id, to_path, *, census_version="stable", progress_bar=True):
        raise KeyError("Unknown dataset_id")  # what cellxgene_census raises

    monkeypatch.setattr(sys.modules["cellxgene_census"], "download_source_h5ad", unknown)
    uid = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ValueError, match=f"has no dataset '{uid}'.*census_version"):
        scx.io.acquire_reference(f"cellxgene://{uid}", tmp_path / "refs/")
    assert not any((tmp_path / "refs").iterdir())  # nothing half-written


def test_synapse_entity_that_is_not_a_file(tmp_path, fake_synapse, monkeypatch):
    class Folder:
        pass

    monkeypatch.setattr(
        sys.modules["synapseclient"].Synapse, "get", lambda self, entity, downloadLocation=None: Folder()
    )
    with pytest.raises(ValueError, match="syn99 is a Folder .*not a file"):
        scx.io.acquire_reference("synapse://syn99", tmp_path / "refs")
    assert not any((tmp_path / "refs").iterdir())


def test_percent_encoded_file_uri_output(tmp_path, fake_census):
    target = tmp_path / "my refs" / "covid.h5ad"
    out = scx.io.acquire_reference("cellxgene://lung_covid", target.as_uri())
    assert target.is_file() and not (tmp_path / "my%20refs").exists()
    assert scx.io.read_reference(out, label_key="cell_type").n_obs == 372
    scx.io.acquire_reference("cellxgene://lung_covid", target.as_uri())  # found: re-used
    assert len(fake_census["download"]) == 1


def test_dataset_id_in_upper_case_is_the_census_id(tmp_path, fake_census):
    # census dataset ids are lower case; one pasted in upper case names the same dataset (and the same file)
    upper = "066943A2-FDAC-4B29-B348-40CEDE398E4E"
    out = scx.io.acquire_reference(f"cellxgene://{upper}", tmp_path / "refs")
    assert fake_census["download"] == [(upper.lower(), "stable")]
    assert out == f"{tmp_path}/refs/{upper.lower()}.h5ad"
    assert scx.io.acquire_reference(f"cellxgene://{upper.lower()}", tmp_path / "refs") == out
    assert len(fake_census["download"]) == 1  # re-used


class NoCredentialsError(Exception):
    """Stands in for ``botocore.exceptions.NoCredentialsError``: names neither the URI nor the fix."""


def test_remote_output_is_checked_before_anything_is_downloaded(tmp_path, fake_census, fake_gcs, monkeypatch):
    cls = type(fsspec.filesystem("gs"))

    def no_credentials(self, *args, **kwargs):
        raise NoCredentialsError("Unable to locate credentials")

    monkeypatch.setattr(cls, "exists", no_credentials)
    with pytest.raises(OSError, match=r"Looking up the output 'gs://bucket/covid.h5ad' failed .*credentials"):
        scx.io.acquire_reference("cellxgene://lung_covid", "gs://bucket/covid.h5ad", force=True)
    monkeypatch.delitem(FSSPEC_REGISTRY._registry, "gs")
    monkeypatch.setitem(
        FSSPEC_REGISTRY.known_implementations,
        "gs",
        {"class": "spatialcx_no_such_module.GCSFileSystem", "err": "Please install gcsfs"},
    )
    with pytest.raises(ImportError, match=r"spatialcx\[gcs\]"):
        scx.io.acquire_reference("cellxgene://lung_covid", "gs://bucket/covid.h5ad", force=True)
    assert not fake_census["download"]  # neither error came after a download


def test_existing_output_folder_with_a_dot_given_with_tilde_or_as_file_uri(home_and_work, fake_census):
    home, _ = home_and_work
    (home / "refs.v1").mkdir()
    out = scx.io.acquire_reference("cellxgene://lung_covid", "~/refs.v1")
    assert out == "~/refs.v1/lung_covid.h5ad" and (home / "refs.v1" / "lung_covid.h5ad").is_file()
    uri = scx.io.acquire_reference("cellxgene://lung_covid", (home / "refs.v1").as_uri())
    assert uri == (home / "refs.v1" / "lung_covid.h5ad").as_uri() and len(fake_census["download"]) == 1  # re-used


def test_census_query_of_millions_of_cells_needs_max_cells(tmp_path, fake_census, monkeypatch):
    from spatialcx.io import _acquire

    monkeypatch.setattr(_acquire, "CENSUS_MAX_CELLS_UNCAPPED", 500)  # the stand-in Census matches 585 cells
    with pytest.raises(ValueError, match=r"matches 585 Homo sapiens cells, more than 500.*max_cells=585"):
        scx.io.acquire_reference("cellxgene://?tissue=lung", tmp_path / "q.h5ad")
    assert not fake_census["get_anndata"] and not (tmp_path / "q.h5ad").exists()
    assert (
        ad.read_h5ad(scx.io.acquire_reference("cellxgene://?tissue=lung", tmp_path / "q.h5ad", max_cells=585)).n_obs
        == 585
    )


def test_census_query_without_cells_says_how_values_are_spelled(tmp_path, fake_census, monkeypatch):
    monkeypatch.setattr(
        sys.modules["cellxgene_census"], "get_obs", lambda *a, **k: pd.DataFrame({"soma_joinid": [], "cell_type": []})
    )
    with pytest.raises(ValueError, match=r"no Homo sapiens cells for .*'Lung'.*matched exactly.*tissue=lung"):
        scx.io.acquire_reference("cellxgene://?tissue=Lung", tmp_path / "q.h5ad")
    assert not (tmp_path / "q.h5ad").exists()


def test_synapse_without_credentials_says_where_they_go(tmp_path, fake_synapse, monkeypatch):
    class SynapseAuthenticationError(Exception):
        pass

    class SynapseNoCredentialsError(SynapseAuthenticationError):  # what synapseclient raises
        pass

    def login(self, **kwargs):
        raise SynapseNoCredentialsError("No credentials provided.")

    monkeypatch.delenv("SYNAPSE_AUTH_TOKEN", raising=False)
    monkeypatch.setattr(sys.modules["synapseclient"].Synapse, "login", login)
    with pytest.raises(PermissionError, match=r"syn7: SYNAPSE_AUTH_TOKEN is not set .*PersonalAccessTokens"):
        scx.io.acquire_reference("synapse://syn7", tmp_path / "refs")
    assert not fake_synapse["get"] and not any((tmp_path / "refs").iterdir())
    monkeypatch.setenv("SYNAPSE_AUTH_TOKEN", "expired")
    with pytest.raises(PermissionError, match="the token in SYNAPSE_AUTH_TOKEN was refused"):
        scx.io.acquire_reference("synapse://syn7", tmp_path / "refs")

    def offline(self, **kwargs):
        raise ConnectionError("Synapse is unreachable")

    monkeypatch.setattr(sys.modules["synapseclient"].Synapse, "login", offline)
    with pytest.raises(ConnectionError, match="unreachable"):  # not a credentials problem: left as it is
        scx.io.acquire_reference("synapse://syn7", tmp_path / "refs")


def test_partial_downloads_left_by_a_killed_acquisition_are_removed(tmp_path, fake_census):
    from spatialcx.io import _uri

    refs = tmp_path / "refs"
    stale, live = refs / ".spatialcx-acquire-dead", refs / ".spatialcx-acquire-live"
    for folder in (stale, live):
        (folder / "download").mkdir(parents=True)
        (folder / "download" / "source.h5ad").write_bytes(b"half a download")
    old = os.stat(stale).st_mtime - 2 * _uri.STALE_TEMPORARY_SECONDS
    for p in (stale / "download" / "source.h5ad", stale / "download", stale):
        os.utime(p, (old, old))
    scx.io.acquire_reference("cellxgene://lung_covid", refs)
    assert sorted(p.name for p in refs.iterdir()) == [".spatialcx-acquire-live", "lung_covid.h5ad"]  # may be running
