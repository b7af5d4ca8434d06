"""Preprocessing: normalization status, panel genes, combining and balancing references."""

from ._balance import subsample_balanced
from ._combine import combine_references
from ._genes import panel_genes
from ._normalization import NormalizationStatus, ensure_normalized, normalization_status
