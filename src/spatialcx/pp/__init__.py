"""Preprocessing: normalization status, panel genes, combining and balancing references."""

from ._genes import panel_genes
from ._normalization import NormalizationStatus, ensure_normalized, normalization_status
