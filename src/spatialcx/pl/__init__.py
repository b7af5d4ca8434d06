"""Plots: confidence over the tissue, validation, ontology mapping, thresholds."""

from ._confidence import confidence
