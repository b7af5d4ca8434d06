"""Tools: training, prediction, confidence, ontology ids, marker thresholds, domains."""

from ._annotate import annotate
from ._confidence import transform_confidence
from ._config import AnnotationConfig, annotate_from_config
from ._domains import spatial_domains
from ._evaluate import compare_confidence_methods, confidence_metrics, evaluate_confidence
from ._filter import filter_low_confidence, filter_low_count_types
from ._markers import load_canonical_markers
from ._ontology import OntologyMapping, add_ontology_ids, map_labels
from ._predict import predict, train
from ._signatures import annotate_domains, score_signatures
from ._threshold import classify_by_threshold
