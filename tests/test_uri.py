from __future__ import annotations

import hashlib
import importlib
import os
import uuid
from pathlib import Path

import anndata as ad
import fsspec
import numpy as np
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

import spatialcx as scx
from spatialcx.io import _uri
from spatialcx.io._uri import fingerprint

FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")  # the module (``fsspec.registry`` is the mapping)


def _small_adata(n: int = 20) -> ad.AnnData:
    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(1.0, (n, 5)).astype(np.float32))
    a.obs["cell_type"] = ["x", "y"] * (n // 2)
    return a


@pytest.fixture
def memfs():
    """A fresh in-memory fsspec filesystem, emptied afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex}"
    fs.mkdir(root)
    yield fs, root
    fs.rm(root, recursive=True)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """Register a local folder as the ``gs://`` filesystem (no network, no gcsfs needed)."""
    bucket_root = tmp_path / "gcs"
    bucket_root.mkdir()

    class LocalGCS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(bucket_root), fs=LocalFileSystem())

    LocalGCS.clear_instance_cache()
    monkeypatch.setitem(FSSPEC_REGISTRY._registry, "gs", LocalGCS)
    return bucket_root


def test_local_paths_are_returned_unchanged(tmp_path):
    f = tmp_path / "ref.h5ad"
    f.write_bytes(b"x")
    assert scx.io.resolve_uri(f) == f
    assert scx.io.resolve_uri(str(f)) == f
    assert scx.io.resolve_uri(f"file://{f}") == f
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scx.io.resolve_uri(tmp_path / "missing.h5ad")
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        scx.io.resolve_uri(f"file://{tmp_path}/missing.h5ad")


def test_file_uris_percent_encoded_and_localhost(tmp_path):
    folder = tmp_path / "dir with space"
    folder.mkdir()
    f = folder / "my ref é.h5ad"
    f.write_bytes(b"x")
    assert scx.io.resolve_uri(f.as_uri()) == f  # file:///.../dir%20with%20space/my%20ref%20%C3%A9.h5ad
    assert scx.io.resolve_uri(f"file://{f}") == f  # not encoded
    assert scx.io.resolve_uri(f"file://localhost{f.as_uri()[len('file://') :]}") == f
    literal = tmp_path / "100%20done.h5ad"  # a name with a literal escape sequence, as written
    literal.write_bytes(b"y")
    assert scx.io.resolve_uri(f"file://{literal}") == literal


def test_http_folder_is_refused_clearly(tmp_path, monkeypatch):
    """Over http(s) a folder cannot be listed: a clear error, nothing left in the cache."""
    site = tmp_path / "site"
    _small_adata().write_zarr(site / "ref.zarr")
    _small_adata().write_h5ad(site / "ref.h5ad")

    class LocalHTTP(DirFileSystem):
        protocol = ("http", "https")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(site), fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):  # http://host/a/b -> a/b, under the site folder
            path = str(path)
            return path.split("://", 1)[1].partition("/")[2] if "://" in path else path

    LocalHTTP.clear_instance_cache()
    monkeypatch.setitem(FSSPEC_REGISTRY._registry, "http", LocalHTTP)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="web page .* or a folder .* served over http://"):
        scx.io.resolve_uri("http://example.org/ref.zarr", cache_dir=cache)
    assert not (cache / "references").exists() or not any((cache / "references").iterdir())
    assert ad.read_h5ad(scx.io.resolve_uri("http://example.org/ref.h5ad", cache_dir=cache)).n_obs == 20


def test_remote_file_is_cached_and_reused(tmp_path, memfs):
    fs, root = memfs
    local = tmp_path / "src.h5ad"
    _small_adata().write_h5ad(local)
    fs.put_file(str(local), f"{root}/ref.h5ad")
    uri = f"memory://{root}/ref.h5ad"
    cache = tmp_path / "cache"

    path = scx.io.resolve_uri(uri, cache_dir=cache)
    assert path.is_relative_to(cache) and path.name == "ref.h5ad"
    assert path.read_bytes() == local.read_bytes()
    assert ad.read_h5ad(path).n_obs == 20

    fs.pipe(f"{root}/ref.h5ad", b"changed")  # the cached copy is re-used ...
    assert scx.io.resolve_uri(uri, cache_dir=cache).read_bytes() == local.read_bytes()
    assert scx.io.resolve_uri(uri, cache_dir=cache, force=True).read_bytes() == b"changed"  # ... unless force
    assert not [p for p in path.parent.iterdir() if p.name != "ref.h5ad"]  # no temporary files left


def test_interrupted_download_is_never_taken_as_complete(tmp_path, memfs, monkeypatch):
    fs, root = memfs
    fs.pipe(f"{root}/ref.h5ad", b"0123456789" * 1000)
    uri = f"memory://{root}/ref.h5ad"
    cls = type(fs)
    real_get_file = cls.get_file

    def broken(self, rpath, lpath, **kwargs):
        Path(lpath).write_bytes(b"01234")  # half written, then the connection drops
        raise ConnectionError("connection reset")

    monkeypatch.setattr(cls, "get_file", broken)
    with pytest.raises(ConnectionError):
        scx.io.resolve_uri(uri, cache_dir=tmp_path)
    cached = _uri._cache_path(uri, tmp_path)
    assert not cached.exists()
    assert not list(cached.parent.glob("*"))  # the partial file was removed

    def short(self, rpath, lpath, **kwargs):
        Path(lpath).write_bytes(b"01234")  # returns without error but short

    monkeypatch.setattr(cls, "get_file", short)
    with pytest.raises(OSError, match="Incomplete download"):
        scx.io.resolve_uri(uri, cache_dir=tmp_path)
    assert not cached.exists()

    monkeypatch.setattr(cls, "get_file", real_get_file)
    assert scx.io.resolve_uri(uri, cache_dir=tmp_path).read_bytes() == b"0123456789" * 1000


def test_remote_zarr_folder(tmp_path, memfs):
    fs, root = memfs
    store = tmp_path / "src.zarr"
    _small_adata().write_zarr(store)
    fs.put(str(store), f"{root}/ref.zarr", recursive=True)
    path = scx.io.resolve_uri(f"memory://{root}/ref.zarr", cache_dir=tmp_path / "cache")
    assert path.is_dir() and path.name == "ref.zarr"
    back = ad.read_zarr(path)
    assert back.n_obs == 20 and list(back.obs["cell_type"][:2]) == ["x", "y"]


def test_gs_uri_through_fsspec(tmp_path, fake_gcs):
    (fake_gcs / "bucket").mkdir()
    _small_adata(10).write_h5ad(fake_gcs / "bucket" / "lung.h5ad")
    path = scx.io.resolve_uri("gs://bucket/lung.h5ad", cache_dir=tmp_path / "cache")
    assert ad.read_h5ad(path).n_obs == 10
    with pytest.raises(FileNotFoundError, match="gs://bucket/nope.h5ad"):
        scx.io.resolve_uri("gs://bucket/nope.h5ad", cache_dir=tmp_path / "cache")


def test_missing_optional_filesystem_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.delitem(FSSPEC_REGISTRY._registry, "gs", raising=False)
    monkeypatch.setitem(
        FSSPEC_REGISTRY.known_implementations,
        "gs",
        {"class": "spatialcx_no_such_module.GCSFileSystem", "err": "Please install gcsfs to access Google Storage"},
    )
    with pytest.raises(ImportError, match=r"spatialcx\[gcs\]"):
        scx.io.resolve_uri("gs://bucket/ref.h5ad", cache_dir=tmp_path)


def test_unknown_protocol(tmp_path):
    with pytest.raises(ValueError, match="Unknown URI protocol"):
        scx.io.resolve_uri("nosuchproto://x/ref.h5ad", cache_dir=tmp_path)


def test_default_cache_dir_can_be_overridden(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALCX_CACHE_DIR", str(tmp_path / "mycache"))
    assert _uri.default_cache_dir() == tmp_path / "mycache"
    monkeypatch.delenv("SPATIALCX_CACHE_DIR")
    assert "spatialcx" in str(_uri.default_cache_dir())


def test_fingerprints(tmp_path, monkeypatch):
    f = tmp_path / "a.bin"
    data = np.random.default_rng(0).bytes(3 << 20)
    f.write_bytes(data)
    assert fingerprint(f) == "sha256:" + hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(_uri, "FULL_HASH_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(_uri, "_SAMPLE_BYTES", 1 << 16)
    sampled = fingerprint(f)
    assert sampled.startswith("sha256-sampled:")
    mid = bytearray(data)
    mid[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(mid))
    assert fingerprint(f) != sampled  # a change in a sampled block is seen
    store = tmp_path / "s.zarr"
    _small_adata().write_zarr(store)
    tree = fingerprint(store)
    assert tree.startswith("sha256-tree:") and fingerprint(store) == tree


def test_fingerprint_of_an_unchanged_file_is_read_once(tmp_path, monkeypatch):
    f = tmp_path / "a.bin"
    f.write_bytes(b"a" * 1000)
    first = fingerprint(f)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert fingerprint(f) == first and not opened  # cached: same path, size, mtime, inode
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # touched: hashed again
    assert fingerprint(f) == first and opened
    f.write_bytes(b"b" * 1000)
    assert fingerprint(f) == "sha256:" + hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_download_finished_meanwhile_by_another_process_is_kept(tmp_path, memfs, monkeypatch):
    """Two processes fetching the same URI: the second to finish keeps the first one's copy (it may be in use)."""
    fs, root = memfs
    fs.pipe(f"{root}/ref.h5ad", b"remote bytes")
    uri = f"memory://{root}/ref.h5ad"
    dest = _uri._cache_path(uri, tmp_path)
    cls = type(fs)
    real_get_file = cls.get_file

    inodes = []

    def racing(self, rpath, lpath, **kwargs):
        dest.write_bytes(b"remote bytes")  # the other process renames its finished copy into place meanwhile
        inodes.append(dest.stat().st_ino)
        return real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(cls, "get_file", racing)
    path = scx.io.resolve_uri(uri, cache_dir=tmp_path)
    assert path == dest and path.read_bytes() == b"remote bytes"
    assert [dest.stat().st_ino] == inodes and [p.name for p in dest.parent.iterdir()] == ["ref.h5ad"]
    monkeypatch.setattr(cls, "get_file", real_get_file)
    fs.pipe(f"{root}/ref.h5ad", b"new remote bytes")
    assert scx.io.resolve_uri(uri, cache_dir=tmp_path, force=True).read_bytes() == b"new remote bytes"  # force replaces
    assert [p.name for p in dest.parent.iterdir()] == ["ref.h5ad"]


def test_h5ad_url_over_http_is_not_probed_as_a_folder(tmp_path, monkeypatch):
    """fsspec's http isdir reads the response and looks for links in it: an .h5ad URL is a file, whatever it holds."""
    site = tmp_path / "site"
    site.mkdir()
    _small_adata().write_h5ad(site / "ref.h5ad")

    class LinkyHTTP(DirFileSystem):
        protocol = ("http", "https")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(site), fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):  # https://host/a/b?query -> a/b, under the site folder
            path = str(path).split("?", 1)[0]
            return path.split("://", 1)[1].partition("/")[2] if "://" in path else path

        def isdir(self, path):  # what fsspec answers when it finds link-like bytes in a binary body
            return True

    LinkyHTTP.clear_instance_cache()
    monkeypatch.setitem(FSSPEC_REGISTRY._registry, "https", LinkyHTTP)
    path = scx.io.resolve_uri("https://example.org/ref.h5ad?download=1", cache_dir=tmp_path / "cache")
    assert path.name == "ref.h5ad" and ad.read_h5ad(path).n_obs == 20


def test_hdf5_url_without_h5ad_name_is_cached_as_h5ad(tmp_path, memfs):
    """e.g. https://figshare.com/ndownloader/files/<id>: read_reference tells .h5ad from .zarr by the name."""
    fs, root = memfs
    local = tmp_path / "src.h5ad"
    _small_adata().write_h5ad(local)
    fs.put_file(str(local), f"{root}/files/12345")
    fs.pipe(f"{root}/files/notes", b"plain text")
    uri = f"memory://{root}/files/12345"
    cache = tmp_path / "cache"
    path = scx.io.resolve_uri(uri, cache_dir=cache)
    assert path.name == "12345.h5ad" and path.read_bytes() == local.read_bytes()
    fs.pipe(f"{root}/files/12345", b"changed")
    assert scx.io.resolve_uri(uri, cache_dir=cache) == path  # the cached copy is found under its new name
    lazy = scx.io.read_reference(uri, label_key="cell_type", cache_dir=cache)
    assert lazy.n_obs == 20
    other = scx.io.resolve_uri(f"memory://{root}/files/notes", cache_dir=cache)
    assert other.name == "notes"  # not HDF5: the name is kept
    forced = scx.io.resolve_uri(uri, cache_dir=cache, force=True)  # no longer HDF5: back to the plain name
    assert forced.name == "12345" and forced.read_bytes() == b"changed" and not path.exists()


def test_temporaries_left_by_a_killed_download_are_removed(tmp_path, memfs):
    fs, root = memfs
    fs.pipe(f"{root}/ref.h5ad", b"0123456789")
    uri = f"memory://{root}/ref.h5ad"
    dest = _uri._cache_path(uri, tmp_path)
    dest.parent.mkdir(parents=True)
    stale, live = dest.with_name(".ref.h5ad.part-dead"), dest.with_name(".ref.h5ad.part-live")
    stale_dir = dest.with_name(".ref.h5ad.part-deaddir")
    for p in (stale, live):
        p.write_bytes(b"01234")
    (stale_dir / "X").mkdir(parents=True)
    (stale_dir / "X" / "0").write_bytes(b"0")
    old = os.stat(stale).st_mtime - 2 * _uri.STALE_TEMPORARY_SECONDS
    for p in (stale, stale_dir / "X" / "0", stale_dir / "X", stale_dir):
        os.utime(p, (old, old))
    assert scx.io.resolve_uri(uri, cache_dir=tmp_path).read_bytes() == b"0123456789"
    assert sorted(p.name for p in dest.parent.iterdir()) == [".ref.h5ad.part-live", "ref.h5ad"]  # in use elsewhere


def test_empty_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="path is empty"):
        scx.io.resolve_uri("")


def test_filesystem_errors_are_not_reported_as_unknown_protocol(tmp_path, monkeypatch):
    class Picky(LocalFileSystem):
        protocol = ("picky",)

        def __init__(self, *args, **kwargs):
            raise ValueError("region must be one of eu, us")

    monkeypatch.setitem(FSSPEC_REGISTRY._registry, "picky", Picky)
    with pytest.raises(ValueError, match="region must be one of") as err:
        scx.io.resolve_uri("picky://bucket/ref.h5ad", cache_dir=tmp_path)
    assert "Unknown URI protocol" not in str(err.value)
    with pytest.raises(ValueError, match=r"Unknown URI protocol 'cellxgene'.*acquire_reference"):
        scx.io.resolve_uri("cellxgene://lung_covid", cache_dir=tmp_path)


def test_each_endpoint_gets_its_own_cache_entry(tmp_path, memfs):
    # the same bucket path on two S3-compatible endpoints names two objects; credentials do not change which one
    fs, root = memfs
    fs.pipe(f"{root}/ref.h5ad", b"first endpoint")
    uri, cache = f"memory://{root}/ref.h5ad", tmp_path / "cache"
    first = scx.io.resolve_uri(uri, cache_dir=cache, storage_options={"endpoint_url": "https://a.example.org"})
    fs.pipe(f"{root}/ref.h5ad", b"second endpoint")
    second = scx.io.resolve_uri(
        uri, cache_dir=cache, storage_options={"client_kwargs": {"endpoint_url": "https://b.example.org"}}
    )
    assert first != second
    assert first.read_bytes() == b"first endpoint" and second.read_bytes() == b"second endpoint"
    same = scx.io.resolve_uri(
        uri, cache_dir=cache, storage_options={"endpoint_url": "https://a.example.org", "key": "k", "secret": "s"}
    )
    assert same == first and same.read_bytes() == b"first endpoint"


class NoCredentialsError(Exception):
    """Stands in for ``botocore.exceptions.NoCredentialsError``: names neither the URI nor the fix."""


def test_remote_access_errors_name_the_uri_and_the_fix(tmp_path, fake_gcs, monkeypatch):
    (fake_gcs / "bucket").mkdir()
    _small_adata(10).write_h5ad(fake_gcs / "bucket" / "lung.h5ad")
    cls = type(fsspec.filesystem("gs"))
    real_exists, real_get_file = cls.exists, cls.get_file
    cache = tmp_path / "cache"

    def no_credentials(self, *args, **kwargs):
        raise NoCredentialsError("Unable to locate credentials")

    monkeypatch.setattr(cls, "exists", no_credentials)
    with pytest.raises(OSError, match=r"Looking up 'gs://bucket/lung.h5ad' failed .*Unable to locate credentials") as e:
        scx.io.resolve_uri("gs://bucket/lung.h5ad", cache_dir=cache)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(e.value) and "'token': 'anon'" in str(e.value)
    assert isinstance(e.value.__cause__, NoCredentialsError)

    def forbidden(self, *args, **kwargs):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(cls, "exists", forbidden)
    with pytest.raises(PermissionError, match=r"gs://bucket/lung.h5ad.*403 Forbidden.*public bucket"):
        scx.io.resolve_uri("gs://bucket/lung.h5ad", cache_dir=cache)

    monkeypatch.setattr(cls, "exists", real_exists)
    monkeypatch.setattr(cls, "get_file", no_credentials)
    with pytest.raises(OSError, match=r"Downloading 'gs://bucket/lung.h5ad' failed .*Nothing was cached"):
        scx.io.resolve_uri("gs://bucket/lung.h5ad", cache_dir=cache)
    assert not (cache / "references").exists() or not any((cache / "references").iterdir())
    monkeypatch.setattr(cls, "get_file", real_get_file)
    assert ad.read_h5ad(scx.io.resolve_uri("gs://bucket/lung.h5ad", cache_dir=cache)).n_obs == 10
