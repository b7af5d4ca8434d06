"""Acquire references: predefined CELLxGENE datasets, CELLxGENE Census queries and Synapse files."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd

from .._settings import logger
from .._utils import import_optional, write_atomically
from ._uri import get_filesystem, is_remote, split_protocol

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
#: ``tissue`` or ``tissue_general``; ``organism`` picks the Census organism. Several values: comma-separated.
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
#: Key in ``.uns`` of an acquired reference (what was asked for and where it came from).
ACQUIRE_UNS_KEY = "spatialcx_acquisition"
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
    if text.endswith("/") or "." not in name or (not is_remote(text) and Path(text).is_dir()):
        return text.rstrip("/") + "/" + default_name
    raise ValueError(
        f"output {text!r} must be an .h5ad file or a folder (a name without suffix, or ending in '/'), local or a "
        "gs:// / s3:// URI."
    )


def _exists(target: str, storage_options: dict[str, Any] | None) -> bool:
    if not is_remote(target):
        _, rest = split_protocol(target)
        return Path(rest).expanduser().exists()
    fs, path = get_filesystem(target, storage_options)
    return fs.exists(path)


def _store(local: Path, target: str, storage_options: dict[str, Any] | None) -> None:
    """Move a finished local file to ``target`` (atomic rename locally, one object upload remotely)."""
    if is_remote(target):
        fs, path = get_filesystem(target, storage_options)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(str(local), path)
        return
    _, rest = split_protocol(target)
    dest = Path(rest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if local.parent == dest.parent or local.parent.parent == dest.parent:
        os.replace(local, dest)  # same folder tree, same filesystem: atomic
        return
    write_atomically(dest, lambda tmp: shutil.copyfile(local, tmp))


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


def _census_filter(query: dict[str, str]) -> tuple[str, str]:
    """SOMA value filter and organism from a ``cellxgene://?...`` query."""
    organism = query.pop("organism", "Homo sapiens")
    unknown = sorted(set(query) - set(CENSUS_QUERY_KEYS))
    if unknown:
        raise ValueError(f"Unknown CELLxGENE query keys {unknown}; allowed: {list(CENSUS_QUERY_KEYS)} and 'organism'.")
    if not query:
        raise ValueError(
            "A cellxgene:// query needs at least one filter, e.g. cellxgene://?tissue=lung&disease=normal."
        )
    parts = ["is_primary_data == True"]
    for key, raw in query.items():
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values or any("'" in v for v in values):
            raise ValueError(f"Bad value {raw!r} for {key!r} in the CELLxGENE query.")
        quoted = "[" + ", ".join(f"'{v}'" for v in values) + "]"
        if key == "tissue":
            parts.append(f"(tissue in {quoted} or tissue_general in {quoted})")
        else:
            parts.append(f"{key} in {quoted}")
    return " and ".join(parts), organism


def _acquire_census_query(
    query: dict[str, str], tmp: Path, *, max_cells: int | None, census_version: str, random_state: int
) -> dict[str, Any]:
    from ._reference import choose_cells

    census_mod = import_optional("cellxgene_census", "census")
    value_filter, organism = _census_filter(dict(query))
    columns = list(CENSUS_OBS_COLUMNS)
    with census_mod.open_soma(census_version=census_version) as census:
        obs = census_mod.get_obs(census, organism, value_filter=value_filter, column_names=["soma_joinid", "cell_type"])
        if len(obs) == 0:
            raise ValueError(f"The CELLxGENE Census ({census_version}) has no {organism} cells for {value_filter!r}.")
        rows = choose_cells(obs["cell_type"].astype(object), max_cells, rng=np.random.default_rng(random_state))
        coords = np.sort(obs["soma_joinid"].to_numpy()[rows]).astype(np.int64)
        logger.info("CELLxGENE Census: %d of %d matching cells.", len(coords), len(obs))
        adata = census_mod.get_anndata(census, organism, obs_coords=coords, obs_column_names=columns)
    if "feature_id" in adata.var.columns:
        adata.var_names = adata.var["feature_id"].astype(str).to_numpy()
    adata.write_h5ad(tmp)
    return {"value_filter": value_filter, "organism": organism, "n_cells_matching": int(len(obs))}


def _acquire_synapse(syn_id: str, tmp_dir: Path) -> Path:
    synapseclient = import_optional("synapseclient", "synapse")
    syn = synapseclient.Synapse()
    token = os.environ.get("SYNAPSE_AUTH_TOKEN")
    if token:
        syn.login(authToken=token, silent=True)
    else:
        syn.login(silent=True)  # ~/.synapseConfig or cached credentials
    entity = syn.get(syn_id, downloadLocation=str(tmp_dir))
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
          values comma-separated), with raw counts and Census obs columns; var names are
          Ensembl ids with ``var["feature_name"]`` symbols.
        - ``synapse://syn<id>``: a Synapse file entity (``.h5ad``), through ``synapseclient``. Credentials: the
          ``SYNAPSE_AUTH_TOKEN`` environment variable, else ``~/.synapseConfig``.

        ``cellxgene://`` needs the ``census`` extra (``cellxgene-census``), ``synapse://`` the ``synapse`` extra.
    output
        Where to store it: an ``.h5ad`` path or a folder (then ``<key>.h5ad`` / ``<synapse id>.h5ad`` /
        ``cellxgene_query.h5ad`` inside), local or a ``gs://`` / ``s3://`` URI (credentials from the environment,
        as ``gcsfs`` / ``s3fs`` read them, or ``storage_options``).
    force
        Acquire again even when ``output`` exists (otherwise an existing output is re-used).
    max_cells
        Keep at most this many cells, chosen from the labels alone (largest types capped first, see
        :func:`spatialcx.io.read_reference`). For Census queries only the chosen cells are downloaded.
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
            query = dict(parse_qsl(rest[1:], keep_blank_values=True))
            name = "cellxgene_query.h5ad"
        else:
            key = rest.strip("/")
            if key in CELLXGENE_DATASETS:
                dataset_id = CELLXGENE_DATASETS[key]["dataset_id"]
                label_key = label_key or CELLXGENE_DATASETS[key]["label_key"]
            elif _UUID.match(key):
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
    target = _output_target(output, name)
    if not force and _exists(target, storage_options):
        logger.info("%s exists; re-using it (force=True acquires again).", target)
        return target

    local_parent = None if is_remote(target) else Path(split_protocol(target)[1]).expanduser().parent
    if local_parent is not None:
        local_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spatialcx-acquire-", dir=local_parent) as tmp_name:
        tmp = Path(tmp_name)
        final = tmp / "reference.h5ad"
        if query is not None:
            info.update(
                _acquire_census_query(
                    query, final, max_cells=max_cells, census_version=census_version, random_state=random_state
                )
            )
        else:
            if protocol == "cellxgene":
                census_mod = import_optional("cellxgene_census", "census")
                downloaded = tmp / "download" / "source.h5ad"
                downloaded.parent.mkdir()
                census_mod.download_source_h5ad(
                    info["dataset_id"], to_path=str(downloaded), census_version=census_version
                )
            else:
                info["synapse_id"] = syn_id
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
