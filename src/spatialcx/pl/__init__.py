"""Plots: confidence over the tissue, validation, ontology mapping, thresholds."""

from ._confidence import confidence
from ._deg import deg_heatmap
from ._markers import marker_dotplot, validation_2d
from ._ontology import ontology_mapping
from ._report import annotation_report
from ._threshold import threshold
