"""Resolve local paths and remote URIs (``file://``, ``http(s)://``, ``gs://``, ``s3://``, ...) to local files."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .._settings import logger

#: fsspec protocols that are local: nothing is downloaded or cached.
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
#: Optional extras that provide fsspec filesystems, by protocol.
_PROTOCOL_EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}
#: Files larger than this get a sampled fingerprint instead of a full sha256 (see :func:`fingerprint`).
FULL_HASH_MAX_BYTES = 1 << 30
_SAMPLE_BYTES = 8 << 20
_CACHE_ENV = "SPATIALCX_CACHE_DIR"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Temporary downloads unchanged for this long (seconds) were left by a killed process and are removed.
STALE_TEMPORARY_SECONDS = 24 * 3600


def default_cache_dir() -> Path:
    """Return the cache folder for downloaded references.

    ``$SPATIALCX_CACHE_DIR`` when set, otherwise the user's cache folder (``platformdirs.user_cache_dir``, e.g.
    ``~/.cache/spatialcx`` on Linux).
    """
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("spatialcx"))


def split_protocol(uri: str | os.PathLike) -> tuple[str | None, str]:
    """Split ``uri`` into ``(protocol, rest)``; ``protocol`` is ``None`` for a plain path."""
    text = os.fspath(uri)
    if "://" not in text:
        return None, text
    protocol, rest = text.split("://", 1)
    return protocol.lower(), rest


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names something that must be fetched (anything but a plain path or ``file://``)."""
    protocol, _ = split_protocol(uri)
    return protocol is not None and protocol not in _LOCAL_PROTOCOLS


def get_filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """Return ``(fsspec filesystem, path)`` for ``uri``, with an ImportError naming the extra when it is missing."""
    import fsspec
    from fsspec.registry import known_implementations, registry

    protocol, _ = split_protocol(uri)
    if (
        protocol is not None
        and "::" not in protocol
        and protocol not in registry
        and protocol not in known_implementations
    ):
        hint = (
            f" {protocol}:// sources are downloaded with scx.io.acquire_reference(source, output) first; read the "
            "file it returns."
            if protocol in ("cellxgene", "synapse")
            else ""
        )
        raise ValueError(
            f"Unknown URI protocol {protocol!r} in {uri!r}: fsspec has no filesystem for it. Use a local path or a "
            f"file://, http(s)://, gs:// or s3:// URI.{hint}"
        )
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as e:
        extra = _PROTOCOL_EXTRAS.get(protocol or "")
        hint = (
            f"Install it with `pip install 'spatialcx[{extra}]'`."
            if extra
            else "Install the fsspec implementation for this protocol."
        )
        raise ImportError(
            f"Reading {protocol}:// URIs needs an optional dependency that is missing ({e}). {hint}"
        ) from e
    return fs, path


def _local_path(uri: str) -> Path:
    """The path of a ``file://`` (or ``local://``) URI.

    Percent-escapes are decoded (``Path.as_uri()`` writes them) when the host is empty or ``localhost``; a path with a
    literal ``%`` that exists as written is kept as written.
    """
    from urllib.parse import unquote, urlsplit

    import fsspec.implementations.local as local

    _, rest = split_protocol(uri)
    as_written = Path(local.make_path_posix(rest)).expanduser()
    parts = urlsplit("file://" + rest)
    if parts.netloc not in ("", "localhost") or as_written.exists():  # file://relative/path: fsspec's reading
        return as_written
    return Path(unquote(parts.path)).expanduser()


def _endpoint(storage_options: dict[str, Any] | None) -> str | None:
    """The endpoint that ``storage_options`` point the filesystem at (S3-compatible stores), if any."""
    options = storage_options or {}
    client = options.get("client_kwargs")
    endpoint = options.get("endpoint_url") or (client.get("endpoint_url") if isinstance(client, dict) else None)
    return str(endpoint) if endpoint else None


def _cache_path(uri: str, cache_dir: Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Cache location of ``uri``: a folder named by the hash of the URI (and endpoint) holding its base name.

    The same bucket path on two endpoints (``storage_options={"endpoint_url": ...}``) names two objects, so the
    endpoint is hashed too; credentials are not, since they change who may read an object, not which object it is.
    """
    endpoint = _endpoint(storage_options)
    key = uri if endpoint is None else f"{uri}\nendpoint={endpoint}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    _, rest = split_protocol(uri)
    name = rest.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "reference"
    return cache_dir / "references" / digest / name


def _h5ad_name(dest: Path) -> Path:
    """``dest`` with ``.h5ad`` appended: the cached name of an HDF5 file whose URL does not end in ``.h5ad``."""
    return dest.with_name(dest.name + ".h5ad")


def _cached(dest: Path) -> Path | None:
    """The finished cached copy for the cache path ``dest``, or ``None``."""
    for path in (dest, _h5ad_name(dest)):
        if path.exists():
            return path
    return None


def _is_hdf5(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file (its signature at offset 0, 512, 1024 or 2048)."""
    with open(path, "rb") as fh:
        for offset in (0, 512, 1024, 2048):
            fh.seek(offset)
            if fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _last_change(path: Path) -> float:
    """Newest modification time of ``path`` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove temporary downloads in ``folder`` left by a process that was killed (unchanged for a day)."""
    now = time.time()
    for path in [*folder.glob(".*.part-*"), *folder.glob(".*.old-*")]:
        with contextlib.suppress(OSError):
            if now - _last_change(path) > STALE_TEMPORARY_SECONDS:
                logger.info("Removing %s, left by an interrupted download.", path)
                _remove(path)


def _atomic_download(fs, rpath: str, dest: Path, *, is_dir: bool, replace: bool = False) -> Path:
    """Download ``rpath`` through a temporary sibling of ``dest`` that is renamed into place only when complete.

    Returns the cached path: ``dest``, or ``dest`` + ``.h5ad`` for an HDF5 file whose name lacks the suffix (readers
    tell .h5ad files from .zarr stores by it). When another process finished the same download meanwhile, its copy
    is kept (and returned) unless ``replace``; a file is replaced in one atomic rename, so readers never miss it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest.parent)
    tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex}")
    try:
        if is_dir:
            fs.get(rpath.rstrip("/") + "/", str(tmp), recursive=True)
        else:
            fs.get_file(rpath, str(tmp))
            expected = fs.info(rpath).get("size")
            got = tmp.stat().st_size
            if expected is not None and int(expected) != got:
                raise _IncompleteDownloadError(
                    f"Incomplete download of {rpath!r}: got {got} bytes, the remote file has {expected}. "
                    "Nothing was cached; run again (the download restarts)."
                )
        final = dest
        if not is_dir and not dest.name.lower().endswith(".h5ad") and _is_hdf5(tmp):
            final = _h5ad_name(dest)
        current = _cached(dest)
        if current is not None and not replace:  # another process finished first: its copy may be in use
            return current
        if final.exists() and (is_dir or final.is_dir()):  # a folder cannot be renamed over: move the old aside
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)  # atomic, also over an existing file
        for other in (dest, _h5ad_name(dest)):
            if other != final:
                _remove(other)
        return final
    finally:
        _remove(tmp)
        if _cached(dest) is None:  # a failed first download leaves no empty cache folder
            with contextlib.suppress(OSError):
                dest.parent.rmdir()


class _IncompleteDownloadError(OSError):
    """A download that ended without error but short: its message already says what happened and what to do."""


def _access_hint(protocol: str | None) -> str:
    """How to give a remote filesystem of ``protocol`` access (credentials, public buckets)."""
    if protocol in ("s3", "s3a"):
        return (
            "Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws (or "
            "storage_options={'key': ..., 'secret': ...}); for a public bucket pass storage_options={'anon': True}."
        )
    if protocol in ("gs", "gcs"):
        return (
            "Credentials come from GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login` (or "
            "storage_options={'token': ...}); for a public bucket pass storage_options={'token': 'anon'}."
        )
    return "Check the URI, the network connection and the credentials (storage_options)."


def remote_error(uri: str, action: str, error: BaseException, note: str = "") -> Exception:
    """``error``, raised by a remote filesystem during ``action`` on ``uri``, as an error naming the URI and the fix.

    Filesystem libraries raise their own errors (``botocore``'s ``NoCredentialsError``, ``aiohttp``'s connection
    errors, ...) that name neither the URI nor what to do. Built-in exception types are kept (``PermissionError``
    stays a ``PermissionError``); others become the nearest built-in ``OSError``. Chain it with ``from error``.
    """
    protocol, _ = split_protocol(uri)
    message = f"{action} {uri!r} failed with {type(error).__name__}: {error}. {note}{_access_hint(protocol)}"
    if type(error).__module__ == "builtins":
        try:
            return type(error)(message)
        except TypeError:  # a built-in type with a constructor of its own
            pass
    for cls in (FileNotFoundError, PermissionError, ConnectionError, TimeoutError):
        if isinstance(error, cls):
            return cls(message)
    return OSError(message)


def _remote_is_dir(fs, rpath: str, protocol: str) -> bool:
    """Whether the remote ``rpath`` is a folder.

    Over http(s) an ``.h5ad`` (or ``.h5``) URL is a file: fsspec's ``isdir`` there fetches the whole response when the
    server sends no content type, and takes it for a folder when link-like text turns up in the bytes.
    """
    if protocol in ("http", "https") and rpath.split("?", 1)[0].lower().endswith((".h5ad", ".h5")):
        return False
    return bool(fs.isdir(rpath))


def resolve_uri(
    uri: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Return a local path for a reference given as a path or a URI, downloading remote ones into a cache.

    Parameters
    ----------
    uri
        A local path (``~`` is expanded; relative paths are taken from the working folder), ``file://`` URI, or any
        fsspec URI: ``http(s)://``, ``gs://`` (needs the ``gcs`` extra, ``gcsfs``), ``s3://`` (needs the ``s3``
        extra, ``s3fs``). Files (``.h5ad``) and folders (AnnData ``.zarr`` stores) are supported. Credentials come
        from the environment as the filesystem library reads them (``GOOGLE_APPLICATION_CREDENTIALS``,
        ``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE``, ...) or from ``storage_options``. A ``file://`` URI may be
        percent-encoded (as ``Path.as_uri()`` writes it). Folders are not supported over ``http(s)://``, which cannot
        list them: give an ``.h5ad`` URL there.
    cache_dir
        Where downloads are kept. Defaults to ``$SPATIALCX_CACHE_DIR`` when that environment variable is set, else
        the user's cache folder for spatialcx (``platformdirs.user_cache_dir("spatialcx")``, e.g.
        ``~/.cache/spatialcx`` on Linux).
    force
        Download again even when the cache holds a copy.
    storage_options
        Extra keyword arguments for the fsspec filesystem (e.g. ``{"anon": True}`` for public S3 buckets). An
        ``endpoint_url`` (top level or in ``client_kwargs``) gets a cache entry of its own; credentials do not.

    Returns
    -------
    The local path. Local inputs are returned as they are (never copied); remote ones are cached under
    ``cache_dir/references/<hash of the URI>/<file name>`` and re-used unless ``force=True``. The whole URI is hashed,
    query string included, so URLs that differ only by their query are cached apart. An HDF5 file whose URL does
    not end in ``.h5ad`` (e.g. ``https://figshare.com/ndownloader/files/<id>``) is cached as ``<name>.h5ad``.
    Downloads go to a temporary name and are renamed into place only when complete, so an interrupted download is
    never taken for a cached copy (temporary files left by a killed process are removed a day later); processes
    downloading the same URI at once each get a complete copy.

    Raises
    ------
    FileNotFoundError
        When a local path or remote object does not exist.
    OSError
        When the remote filesystem cannot be reached or refuses access (missing credentials, network errors), or a
        download ends short; the message names the URI and how to give access. Built-in error types raised by the
        filesystem (``PermissionError``, ``ConnectionError``, ...) are kept.
    ImportError
        When the protocol needs an optional extra that is not installed.
    ValueError
        When ``uri`` is empty, its protocol is unknown, or it names a folder over ``http(s)://``.
    """
    text = os.fspath(uri)
    if not text.strip():
        raise ValueError(
            "The reference path is empty. Give the path of an .h5ad file or AnnData .zarr folder, or a URI "
            "(file://, https://, gs://, s3://)."
        )
    protocol, rest = split_protocol(text)
    if protocol is None or protocol in _LOCAL_PROTOCOLS:
        path = _local_path(text) if protocol is not None else Path(rest).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Reference {text!r} does not exist (looked for {str(path.absolute())!r}). Check the path, or give "
                "a remote URI (gs://, s3://, https://)."
            )
        return path

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = _cache_path(text, cache, storage_options)
    cached = _cached(dest)
    if cached is not None and not force:
        logger.info("Using cached copy of %s", text)
        return cached
    fs, rpath = get_filesystem(text, storage_options)
    try:
        exists = fs.exists(rpath)
        is_dir = exists and _remote_is_dir(fs, rpath, protocol)
    except Exception as e:  # credentials, network, ...: say which URI and how to fix it
        raise remote_error(text, "Looking up", e) from e
    if not exists:
        raise FileNotFoundError(
            f"Remote reference {text!r} does not exist (or is not readable with these credentials). Check the URI. "
            f"{_access_hint(protocol)}"
        )
    if is_dir and protocol in ("http", "https"):
        raise ValueError(
            f"{text!r} answers with a page of links, not a file: a web page (such as a dataset's landing page) or a "
            f"folder (a zarr store) served over {protocol}://, which cannot list the files in a folder reliably, so it "
            "cannot be downloaded whole. Give the download URL of the .h5ad file itself, a gs:// or s3:// URI of the "
            "store, or download the store and pass its local path."
        )
    logger.info("Downloading %s to %s", text, dest)
    try:
        return _atomic_download(fs, rpath, dest, is_dir=is_dir, replace=force)
    except _IncompleteDownloadError:
        raise
    except Exception as e:  # nothing was cached: the next call downloads again
        raise remote_error(text, "Downloading", e, "Nothing was cached; run again to retry. ") from e


def fingerprint(path: str | os.PathLike) -> str:
    """Checksum of a local reference for provenance.

    Files up to :data:`FULL_HASH_MAX_BYTES` (1 GiB) get ``"sha256:<hex>"`` of the whole file. Larger files get
    ``"sha256-sampled:<hex>"``: the sha256 of the file size and three 8 MiB blocks (start, middle, end), which
    changes whenever the file is rewritten with different content or size, at a fixed cost. Folders (zarr stores) get
    ``"sha256-tree:<hex>"`` over the sorted relative paths and sizes of all files plus the content of the small
    metadata files (``.zattrs``, ``.zarray``, ``.zgroup``, ``zarr.json``, ...).
    """
    path = Path(path)
    if path.is_file():  # the same file, unchanged since it was last hashed in this process: no second read
        st = path.stat()
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
        return _file_fingerprint(*key, FULL_HASH_MAX_BYTES, _SAMPLE_BYTES)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            size = f.stat().st_size
            h.update(f"{rel}\0{size}\0".encode())
            if f.name.startswith(".z") or f.name == "zarr.json":
                h.update(f.read_bytes())
        return "sha256-tree:" + h.hexdigest()
    raise FileNotFoundError(f"{str(path)!r} does not exist.")


@functools.lru_cache(maxsize=64)
def _file_fingerprint(path: str, size: int, mtime_ns: int, inode: int, full_max: int, sample: int) -> str:
    """:func:`fingerprint` of a file, cached by path, size, modification time and inode (and the two sizes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= full_max:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        for offset in (0, size // 2, max(size - sample, 0)):
            fh.seek(offset)
            h.update(fh.read(sample))
    return "sha256-sampled:" + h.hexdigest()
