"""spatialcx: cell types for single-cell spatial transcriptomics, the scverse way."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, pl, pp, tl
from ._settings import settings
from .model import CellTypeModel

try:
    __version__ = version("spatialcx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["CellTypeModel", "datasets", "io", "pl", "pp", "settings", "tl", "__version__"]
