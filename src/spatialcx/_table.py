"""Resolve ``AnnData | SpatialData`` + ``table_key`` to a table, and persist table changes crash-safely.

CONTRACT (being implemented):

resolve_table(data, table_key="table", *, copy=False) -> TableRef
    TableRef.adata   the AnnData table (a copy when copy=True)
    TableRef.sdata   the SpatialData or None
    TableRef.table_key
    TableRef.finish(*, write=True, elements=("obs", "obsm", "uns")) -> AnnData | SpatialData | None
        Persist the changed elements to the zarr store when sdata is backed (and not a copy and write=True);
        return the copy (AnnData or SpatialData) when copy=True, else None.
get_table(data, table_key="table") -> AnnData
write_table(sdata, table_key="table", *, elements=("obs", "obsm", "uns")) -> None   (public: scx.io.write_table)
"""

from __future__ import annotations


def resolve_table(data, table_key="table", *, copy=False):  # noqa: D103
    raise NotImplementedError


def get_table(data, table_key="table"):  # noqa: D103
    raise NotImplementedError


def write_table(sdata, table_key="table", *, elements=("obs", "obsm", "uns")):  # noqa: D103
    raise NotImplementedError
