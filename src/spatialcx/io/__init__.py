"""Reading and writing: references, remote URIs, tables in zarr stores, 10x outputs."""

from .._table import write_table
from ._acquire import acquire_reference, list_datasets
from ._reference import read_reference
from ._tenx import add_10x_cell_types, read_10x_cell_types
from ._uri import resolve_uri
