"""Tools: training, prediction, confidence, ontology ids, marker thresholds, domains."""

from ._annotate import annotate
from ._confidence import transform_confidence
from ._filter import filter_low_confidence, filter_low_count_types
from ._predict import predict, train
