"""spatialcx: cell types for single-cell spatial transcriptomics, the scverse way."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ._settings import settings

if TYPE_CHECKING:  # imported on first use (below): `import spatialcx` stays cheap, `spatialcx --help` quick
    from . import datasets, io, pl, pp, tl
    from .model import CellTypeModel

try:
    __version__ = version("spatialcx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["CellTypeModel", "datasets", "io", "pl", "pp", "settings", "tl", "__version__"]

_SUBMODULES = ("datasets", "io", "pl", "pp", "tl")


def __getattr__(name: str) -> Any:
    # the submodules (and anndata, pandas, scipy, dask they import) load when first used: scx.tl, scx.pp, ...
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name == "CellTypeModel":
        value = importlib.import_module(".model", __name__).CellTypeModel
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
