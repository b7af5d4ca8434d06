"""The CellTypist-compatible model: training, exact sparse chunked scoring, safe save/load."""

from ._model import CellTypeModel
