"""Acquire references: predefined CELLxGENE datasets, CELLxGENE Census queries and Synapse files."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd

from .._settings import logger
from .._utils import import_optional, write_atomically
from . import _uri
from ._uri import _local_path, get_filesystem, is_remote, remote_error, split_protocol

#: Predefined CELLxGENE datasets for ``acquire_reference("cellxgene://<key>", ...)``. ``dataset_id`` is the
#: CELLxGENE dataset id (stable across versions) that ``cellxgene_census.download_source_h5ad`` takes; all have raw
#: counts and CELLxGENE's ``obs["cell_type"]`` labels.
CELLXGENE_DATASETS: dict[str, dict[str, Any]] = {
    "human_lung_cell_atlas": {
        "dataset_id": "066943a2-fdac-4b29-b348-40cede398e4e",
        "title": "An integrated cell atlas of the human lung in health and disease (HLCA core)",
        "organism": "Homo sapiens",
        "tissue": "lung",
        "disease": "normal",
        "label_key": "cell_type",
        "citation": "Sikkema et al. (2023) Nat Med, doi:10.1038/s41591-023-02327-2",
    },
    "healthy_human_liver": {
        "dataset_id": "4f88c1be-5156-463d-b64d-a3a3a8e0da6d",
        "title": "Cell types from scRNA-seq and snRNA-seq of healthy human liver",
        "organism": "Homo sapiens",
        "tissue": "liver",
        "disease": "normal",
        "label_key": "cell_type",
        "citation": "",
    },
    "colon_immune_niches": {
        "dataset_id": "2872f4b0-b171-46e2-abc6-befcf6de6306",
        "title": "Distinct microbial and immune niches of the human colon",
        "organism": "Homo sapiens",
        "tissue": "colon",
        "disease": "normal",
        "label_key": "cell_type",
        "citation": "James et al. (2020) Nat Immunol, doi:10.1038/s41590-020-0602-z",
    },
    "lung_covid": {
        "dataset_id": "d8da613f-e681-4c69-b463-e94f5e66847f",
        "title": "A molecular single-cell lung atlas of lethal COVID-19",
        "organism": "Homo sapiens",
        "tissue": "lung",
        "disease": "COVID-19",
        "label_key": "cell_type",
        "citation": "Melms et al. (2021) Nature, doi:10.1038/s41586-021-03569-1",
    },
}

#: Query keys accepted in ``cellxgene://?key=value&...`` (CELLxGENE Census obs columns). ``tissue`` matches either
#: ``tissue`` or ``tissue_general``; ``organism`` picks the Census organism. Several values: repeat the key, or
#: separate them by commas (a comma followed by a space is part of a name: ``CD4-positive, alpha-beta T cell``).
CENSUS_QUERY_KEYS = (
    "tissue",
    "tissue_general",
    "disease",
    "cell_type",
    "assay",
    "sex",
    "development_stage",
    "self_reported_ethnicity",
    "suspension_type",
    "dataset_id",
)
#: obs columns fetched from the Census.
CENSUS_OBS_COLUMNS = (
    "cell_type",
    "cell_type_ontology_term_id",
    "tissue",
    "tissue_general",
    "disease",
    "assay",
    "dataset_id",
    "donor_id",
)
#: A Census query matching more cells than this is refused without ``max_cells``: the cells are held in memory
#: at once (all genes), which takes tens of GB for a million cells.
CENSUS_MAX_CELLS_UNCAPPED = 1_000_000
#: Key in ``.uns`` of an acquired reference (what was asked for and where it came from).
ACQUIRE_UNS_KEY = "spatialcx_acquisition"
_TMP_PREFIX = ".spatialcx-acquire-"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SYNAPSE_ID = re.compile(r"^syn\d+(\.\d+)?$")


def list_datasets() -> pd.DataFrame:
    """The predefined CELLxGENE datasets, one row per ``cellxgene://<key>``.

    Returns
    -------
    A DataFrame indexed by ``key`` with ``dataset_id``, ``title``, ``organism``, ``tissue``, ``disease``,
    ``label_key``, ``citation`` and ``uri`` (what to pass to :func:`acquire_reference`).
    """
    df = pd.DataFrame.from_dict(CELLXGENE_DATASETS, orient="index")
    df.index.name = "key"
    df["uri"] = [f"cellxgene://{k}" for k in df.index]
    return df


def _output_target(output: str | os.PathLike, default_name: str) -> str:
    """The file to write: ``output`` itself when it ends in ``.h5ad``, else ``output/<default_name>`` (a folder)."""
    text = os.fspath(output)
    name = text.rstrip("/").rsplit("/", 1)[-1]
    if text.lower().endswith(".h5ad"):
        return text
    if text.endswith("/") or "." not in name or (not is_remote(text) and _local_target(text).is_dir()):
        return text.rstrip("/") + "/" + default_name
    raise ValueError(
        f"output {text!r} must be an .h5ad file or a folder (a name without suffix, or ending in '/'), local or a "
        "gs:// / s3:// URI."
    )


def _local_target(target: str) -> Path:
    """The local path of a plain path or ``file://`` URI target (percent-escapes decoded, as resolve_uri reads it)."""
    return _local_path(target) if split_protocol(target)[0] is not None else Path(target).expanduser()


def _exists(target: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``target`` exists; for a remote one this also checks that its filesystem is installed and reachable."""
    if not is_remote(target):
        return _local_target(target).exists()
    fs, path = get_filesystem(target, storage_options)
    try:
        return bool(fs.exists(path))
    except Exception as e:  # credentials, network, ...: say which output and how to fix it
        raise remote_error(target, "Looking up the output", e, "Nothing was acquired. ") from e


def _recorded(target: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``uns["spatialcx_acquisition"]`` of an existing output (read without loading it), or ``None``."""
    import h5py
    from anndata.io import read_elem

    def read(f) -> dict[str, Any] | None:
        uns = f.get("uns")
        if uns is None or ACQUIRE_UNS_KEY not in uns:
            return None
        return dict(read_elem(uns[ACQUIRE_UNS_KEY]))

    try:
        if not is_remote(target):
            with h5py.File(_local_target(target), "r") as f:
                return read(f)
        fs, path = get_filesystem(target, storage_options)
        with fs.open(path, "rb") as fh, h5py.File(fh, "r") as f:
            return read(f)
    except OSError:  # not an HDF5 file (or a folder)
        return None


def _check_reusable(target: str, wanted: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    """Raise FileExistsError unless the existing ``target`` was acquired from what is asked for now."""
    recorded = _recorded(target, storage_options)
    if recorded is None:
        raise FileExistsError(
            f"{target!r} exists but was not written by acquire_reference (it has no uns[{ACQUIRE_UNS_KEY!r}]), so it "
            "is neither re-used nor replaced. Pass force=True to replace it, or choose another output."
        )
    differ = {
        key: (recorded.get(key), value)
        for key, value in wanted.items()
        if str(recorded.get(key, "<none>")) != str(value)
    }
    if differ:
        what = "; ".join(f"{key}: {old!r} there, {new!r} asked for" for key, (old, new) in differ.items())
        raise FileExistsError(
            f"{target!r} exists and holds another reference (from {recorded.get('source')!r}; {what}). It is not "
            "replaced: pass force=True to replace it, or choose another output."
        )


def _store(local: Path, target: str, storage_options: dict[str, Any] | None) -> None:
    """Move a finished local file to ``target`` (atomic rename locally, one object upload remotely)."""
    if is_remote(target):
        fs, path = get_filesystem(target, storage_options)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        try:
            fs.put_file(str(local), path)
        except Exception as e:
            raise remote_error(target, "Uploading the reference to", e) from e
        return
    dest = _local_target(target)
    if dest.is_symlink():  # a link to a file elsewhere (a larger disk, say) keeps pointing there, to the new file
        dest = Path(os.path.realpath(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if local.parent == dest.parent or local.parent.parent == dest.parent:
        os.replace(local, dest)  # same folder tree, same filesystem: atomic
        return
    write_atomically(dest, lambda tmp: shutil.copyfile(local, tmp))


def _remove_stale_acquisitions(folder: Path) -> None:
    """Remove temporary folders in ``folder`` left by an acquisition that was killed (unchanged for a day)."""
    now = time.time()
    for path in folder.glob(f"{_TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - _uri._last_change(path) > _uri.STALE_TEMPORARY_SECONDS:
                logger.info("Removing %s, left by an interrupted acquisition.", path)
                _uri._remove(path)


def _mark(path: Path, info: dict[str, Any]) -> None:
    """Record where an .h5ad came from in its ``uns`` without rewriting the file."""
    import h5py
    from anndata.io import write_elem

    with h5py.File(path, "r+") as f:
        uns = f.require_group("uns")
        if ACQUIRE_UNS_KEY in uns:
            del uns[ACQUIRE_UNS_KEY]
        if "encoding-type" not in uns.attrs:
            uns.attrs["encoding-type"] = "dict"
            uns.attrs["encoding-version"] = "0.1.0"
        write_elem(uns, ACQUIRE_UNS_KEY, info)


def _subsample_file(path: Path, label_key: str | None, max_cells: int, random_state: int, out: Path) -> int:
    """Write at most ``max_cells`` cells of ``path`` to ``out`` (types capped largest first); return the count."""
    import anndata as ad

    from ._reference import _read_index, read_reference

    if label_key is None:
        adata = ad.read_h5ad(path, backed="r")
        try:
            n = adata.n_obs
            rows = np.sort(np.random.default_rng(random_state).choice(n, size=min(n, max_cells), replace=False))
            adata[rows].to_memory().write_h5ad(out)
        finally:
            adata.file.close()
        return len(rows)
    # every label is kept, as on the Census path: what is a cell type is decided at training (exclude_labels)
    lazy = read_reference(path, label_key=label_key, max_cells=max_cells, random_state=random_state, exclude_labels=())
    try:
        mem = lazy.to_memory()
    finally:
        if getattr(lazy, "file", None) is not None and hasattr(lazy.file, "close"):
            lazy.file.close()
    mem.uns.pop("spatialcx_reference", None)
    # read_reference names genes by symbol; the subsample keeps the file's own var index (e.g. Ensembl ids), as the
    # whole download and raw do
    import h5py

    with h5py.File(path, "r") as f:
        mem.var_names = _read_index(f["var"])
    mem.write_h5ad(out)
    return mem.n_obs


def _split_values(raw: str) -> list[str]:
    """Comma-separated values; a comma followed by a space is part of a name (``CD4-positive, alpha-beta T cell``)."""
    return [v.strip() for v in re.split(r",(?!\s)", raw) if v.strip()]


def _soma_literal(value: str) -> str:
    """``value`` as a string literal of the SOMA ``value_filter`` syntax.

    tiledbsoma parses filters with Python's ``ast``, so Python's literal syntax holds: ``'lung'``, ``"Peyer's patch"``.
    """
    return repr(str(value))


def _census_filter(pairs: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """SOMA value filter and organism from the ``(key, value)`` pairs of a ``cellxgene://?...`` query."""
    query: dict[str, list[str]] = {}
    for key, raw in pairs:
        values = _split_values(raw)
        if not values:
            raise ValueError(f"Bad value {raw!r} for {key!r} in the CELLxGENE query: it is empty.")
        known = query.setdefault(key, [])
        known.extend(v for v in values if v not in known)
    organisms = query.pop("organism", ["Homo sapiens"])
    if len(organisms) != 1:
        raise ValueError(f"A CELLxGENE query takes one organism, got {organisms}.")
    unknown = sorted(set(query) - set(CENSUS_QUERY_KEYS))
    if unknown:
        raise ValueError(f"Unknown CELLxGENE query keys {unknown}; allowed: {list(CENSUS_QUERY_KEYS)} and 'organism'.")
    if not query:
        raise ValueError(
            "A cellxgene:// query needs at least one filter, e.g. cellxgene://?tissue=lung&disease=normal."
        )
    parts = ["is_primary_data == True"]
    for key in sorted(query, key=CENSUS_QUERY_KEYS.index):  # the same filter whatever the order in the URI
        values = query[key]
        quoted = "[" + ", ".join(_soma_literal(v) for v in values) + "]"
        if key == "tissue":
            parts.append(f"(tissue in {quoted} or tissue_general in {quoted})")
        else:
            parts.append(f"{key} in {quoted}")
    return " and ".join(parts), organisms[0]


def _acquire_census_query(
    value_filter: str, organism: str, tmp: Path, *, max_cells: int | None, census_version: str, random_state: int
) -> dict[str, Any]:
    from ._reference import choose_cells

    census_mod = import_optional("cellxgene_census", "census")
    columns = list(CENSUS_OBS_COLUMNS)
    with census_mod.open_soma(census_version=census_version) as census:
        obs = census_mod.get_obs(census, organism, value_filter=value_filter, column_names=["soma_joinid", "cell_type"])
        if len(obs) == 0:
            raise ValueError(
                f"The CELLxGENE Census ({census_version}) has no {organism} cells for {value_filter!r}. Values are "
                "matched exactly, as CELLxGENE spells them (lower case names such as tissue=lung, disease=normal, "
                "cell_type=B cell); check them on https://cellxgene.cziscience.com or with cellxgene_census.get_obs."
            )
        if max_cells is None and len(obs) > CENSUS_MAX_CELLS_UNCAPPED:
            raise ValueError(
                f"The CELLxGENE Census query {value_filter!r} matches {len(obs):,} {organism} cells, more than "
                f"{CENSUS_MAX_CELLS_UNCAPPED:,}: downloading all of them holds them in memory at once (tens of GB), "
                "and training uses at most max_cells_per_ref (100,000 by default) per reference anyway. Pass "
                f"max_cells=100_000 (rare types are kept whole), narrow the query, or pass max_cells={len(obs)} to "
                "download every cell."
            )
        # SOMA reads need not return rows in the same order twice: the seeded draw is made in soma_joinid order
        obs = obs.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
        rows = choose_cells(obs["cell_type"].astype(object), max_cells, rng=np.random.default_rng(random_state))
        coords = np.sort(obs["soma_joinid"].to_numpy()[rows]).astype(np.int64)
        logger.info("CELLxGENE Census: %d of %d matching cells.", len(coords), len(obs))
        adata = census_mod.get_anndata(census, organism, obs_coords=coords, obs_column_names=columns)
    if "feature_id" in adata.var.columns:
        adata.var_names = adata.var["feature_id"].astype(str).to_numpy()
    adata.write_h5ad(tmp)
    return {"n_cells_matching": int(len(obs))}


def _download_dataset(dataset_id: str, to_path: Path, census_version: str) -> None:
    census_mod = import_optional("cellxgene_census", "census")
    try:
        census_mod.download_source_h5ad(dataset_id, to_path=str(to_path), census_version=census_version)
    except KeyError as e:  # cellxgene_census: KeyError("Unknown dataset_id")
        raise ValueError(
            f"The CELLxGENE Census {census_version!r} has no dataset {dataset_id!r} ({e}). Check the id on "
            "https://cellxgene.cziscience.com/datasets, or pick another census_version (a dataset joins the Census "
            "some time after it is published)."
        ) from e


def _acquire_synapse(syn_id: str, tmp_dir: Path) -> Path:
    synapseclient = import_optional("synapseclient", "synapse")
    syn = synapseclient.Synapse()
    token = os.environ.get("SYNAPSE_AUTH_TOKEN")
    try:
        if token:
            syn.login(authToken=token, silent=True)
        else:
            syn.login(silent=True)  # ~/.synapseConfig or cached credentials
    except Exception as e:
        # synapseclient's SynapseNoCredentialsError / SynapseAuthenticationError say neither where credentials go
        # nor how to get them; its other errors (network, ...) are left as they are
        if not any(cls.__name__ == "SynapseAuthenticationError" for cls in type(e).__mro__):
            raise
        found = (
            "the token in SYNAPSE_AUTH_TOKEN was refused"
            if token
            else "SYNAPSE_AUTH_TOKEN is not set and ~/.synapseConfig holds no credentials"
        )
        raise PermissionError(
            f"Could not log in to Synapse to download {syn_id}: {found} ({type(e).__name__}: {e}). Create a personal "
            "access token (with download permission) at https://www.synapse.org/#!PersonalAccessTokens: and set "
            "SYNAPSE_AUTH_TOKEN to it, or write it to ~/.synapseConfig as `authtoken = <token>` under [authentication]."
        ) from e
    entity = syn.get(syn_id, downloadLocation=str(tmp_dir))
    if getattr(entity, "path", None) is None:
        raise ValueError(
            f"Synapse entity {syn_id} is a {type(entity).__name__} (e.g. a folder or table), not a file; give the "
            "synapse:// id of an .h5ad file."
        )
    path = Path(entity.path)
    if not path.name.lower().endswith(".h5ad"):
        raise ValueError(
            f"Synapse entity {syn_id} is {path.name!r}, not an .h5ad file; only .h5ad references are supported."
        )
    return path


def acquire_reference(
    source: str,
    output: str | os.PathLike,
    *,
    force: bool = False,
    max_cells: int | None = None,
    label_key: str | None = None,
    census_version: str = "stable",
    random_state: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Download a public reference and store it as an ``.h5ad`` locally or in a bucket.

    Parameters
    ----------
    source
        - ``cellxgene://<key>``: a predefined dataset (see :func:`list_datasets`), or ``cellxgene://<dataset id>``
          for any CELLxGENE dataset id; the source ``.h5ad`` is downloaded with ``cellxgene_census``.
        - ``cellxgene://?tissue=lung&disease=normal[&organism=Mus musculus&cell_type=...]``: primary cells
          matching a CELLxGENE Census query (keys: ``tissue``, ``tissue_general``, ``disease``, ``cell_type``,
          ``assay``, ``sex``, ``development_stage``, ``self_reported_ethnicity``, ``suspension_type``, ``dataset_id``
          and ``organism``, default ``Homo sapiens``; ``tissue`` matches ``tissue`` or ``tissue_general``; several
          values: repeat the key or separate them by commas, where a comma followed by a space is part of a name, as
          in ``cell_type=CD4-positive, alpha-beta T cell``; values may hold quotes, ``tissue=Peyer's patch``), with
          raw counts and Census obs columns; var names are Ensembl ids with ``var["feature_name"]`` symbols. Cells are
          drawn in ``soma_joinid`` order, so a query, ``census_version`` and ``random_state`` give the same cells.
        - ``synapse://syn<id>``: a Synapse file entity (``.h5ad``), through ``synapseclient``. Credentials: the
          ``SYNAPSE_AUTH_TOKEN`` environment variable, else ``~/.synapseConfig``.

        ``cellxgene://`` needs the ``census`` extra (``cellxgene-census``), ``synapse://`` the ``synapse`` extra.
    output
        Where to store it: an ``.h5ad`` path or a folder (then ``<key>.h5ad`` / ``<synapse id>.h5ad`` /
        ``cellxgene_query.h5ad`` inside), local or a ``gs://`` / ``s3://`` URI (credentials from the environment,
        as ``gcsfs`` / ``s3fs`` read them, or ``storage_options``).
    force
        Acquire again and replace ``output`` when it exists. Otherwise an existing output is re-used when its
        ``uns["spatialcx_acquisition"]`` shows it was acquired from the same source with the same ``max_cells``,
        ``census_version`` and (when subsampled) ``random_state`` and ``label_key``; any other existing file is left
        alone and a FileExistsError says what it holds.
    max_cells
        Keep at most this many cells, chosen from the labels alone (largest types capped first, see
        :func:`spatialcx.io.read_reference`). For Census queries only the chosen cells are downloaded; a query
        matching more than 1,000,000 cells needs ``max_cells`` (the cells are held in memory at once).
    label_key
        Label column used by ``max_cells`` (default: the dataset's, ``"cell_type"`` for CELLxGENE; a Synapse file
        without one is subsampled uniformly).
    census_version
        CELLxGENE Census release (``"stable"``, ``"latest"`` or a date); pin it for reproducibility.
    random_state
        Seed of the cell draw.
    storage_options
        Passed to the fsspec filesystem of a remote ``output``.

    Returns
    -------
    Where the reference was stored (a path or URI to give to :func:`read_reference` or
    :func:`spatialcx.tl.annotate`). The file is written to a temporary name and moved into place when complete;
    ``uns["spatialcx_acquisition"]`` records the source, census version and cell counts.

    Raises
    ------
    FileExistsError
        When ``output`` exists, holds something else than what is asked for, and ``force`` is False.
    ImportError
        When the ``census`` (``cellxgene://``) or ``synapse`` (``synapse://``) extra, or the fsspec filesystem of a
        remote ``output`` (``gcs`` / ``s3`` extras), is not installed.
    ValueError
        For an unknown source, dataset, query key or output name, a Census query that matches no cells, or one that
        matches more than 1,000,000 cells without ``max_cells``.
    PermissionError
        When Synapse refuses the login (no or wrong credentials).
    OSError
        When a remote ``output`` cannot be reached (credentials, network); checked before anything is downloaded.
    """
    protocol, rest = split_protocol(source)
    if protocol not in ("cellxgene", "synapse"):
        raise ValueError(
            f"Unsupported source {source!r}: use cellxgene://<dataset key or id>, cellxgene://?tissue=...&disease=... "
            f"or synapse://syn<id>. Predefined datasets: {sorted(CELLXGENE_DATASETS)}. For plain files and URIs use "
            "read_reference / resolve_uri."
        )
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"max_cells must be >= 1 or None, got {max_cells}.")
    info: dict[str, Any] = {"source": source, "max_cells": -1 if max_cells is None else int(max_cells)}
    query = None
    if protocol == "cellxgene":
        if rest.startswith("?"):
            query = True
            info["value_filter"], info["organism"] = _census_filter(parse_qsl(rest[1:], keep_blank_values=True))
            name = "cellxgene_query.h5ad"
        else:
            key = rest.strip("/")
            if key in CELLXGENE_DATASETS:
                dataset_id = CELLXGENE_DATASETS[key]["dataset_id"]
                label_key = label_key or CELLXGENE_DATASETS[key]["label_key"]
            elif _UUID.match(key.lower()):  # census dataset ids are lower case; a pasted id may not be
                key = key.lower()
                dataset_id, label_key = key, label_key or "cell_type"
            else:
                raise ValueError(
                    f"Unknown CELLxGENE dataset {key!r}. Predefined: {sorted(CELLXGENE_DATASETS)} (see "
                    "scx.io.list_datasets()); or give a dataset id (UUID) or a query like "
                    "cellxgene://?tissue=lung&disease=normal."
                )
            name = f"{key}.h5ad"
            info["dataset_id"] = dataset_id
        info["census_version"] = census_version
    else:
        syn_id = rest.strip("/")
        if not _SYNAPSE_ID.match(syn_id):
            raise ValueError(f"Bad Synapse id {syn_id!r}: expected synapse://syn<digits>.")
        name = f"{syn_id}.h5ad"
        info["synapse_id"] = syn_id
    target = _output_target(output, name)
    # checked even with force: a missing extra or credentials for a remote output are reported before the download
    exists = _exists(target, storage_options)
    if exists and not force:
        identity = ("value_filter", "organism", "dataset_id", "synapse_id", "census_version", "max_cells")
        wanted = {key: info[key] for key in identity if key in info}
        if max_cells is not None:
            wanted["random_state"] = int(random_state)
            if query is None:
                wanted["label_key"] = label_key or ""
        _check_reusable(target, wanted, storage_options)
        logger.info("%s exists and holds %s; re-using it (force=True acquires again).", target, source)
        return target

    local_parent = None if is_remote(target) else _local_target(target).parent
    if local_parent is not None:
        local_parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_acquisitions(local_parent)  # a killed run leaves its partial download (GBs) behind
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=local_parent) as tmp_name:
        tmp = Path(tmp_name)
        final = tmp / "reference.h5ad"
        if query is not None:
            info.update(
                _acquire_census_query(
                    info["value_filter"],
                    info["organism"],
                    final,
                    max_cells=max_cells,
                    census_version=census_version,
                    random_state=random_state,
                )
            )
        else:
            if protocol == "cellxgene":
                downloaded = tmp / "download" / "source.h5ad"
                downloaded.parent.mkdir()
                _download_dataset(info["dataset_id"], downloaded, census_version)
            else:
                downloaded = _acquire_synapse(syn_id, tmp / "download")
            if max_cells is not None:
                info["n_cells_kept"] = _subsample_file(downloaded, label_key, max_cells, random_state, final)
            else:
                os.replace(downloaded, final)
        info["label_key"] = label_key or ""
        info["random_state"] = int(random_state)
        _mark(final, info)
        _store(final, target, storage_options)
    logger.info("Stored %s at %s", source, target)
    return target
