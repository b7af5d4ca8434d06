"""Reading and writing: references, remote URIs, tables in zarr stores, 10x outputs."""

from .._table import write_table
