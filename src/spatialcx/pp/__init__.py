"""Preprocessing: normalization status, panel genes, combining and balancing references."""

from spatialcx._constants import DEFAULT_EXCLUDE_LABELS

from ._balance import subsample_balanced
from ._combine import combine_references
from ._genes import panel_genes
from ._normalization import NormalizationStatus, ensure_normalized, normalization_status
