"""Plots: confidence over the tissue, validation, ontology mapping, thresholds."""

from ._confidence import confidence
from ._ontology import ontology_mapping
from ._threshold import threshold
