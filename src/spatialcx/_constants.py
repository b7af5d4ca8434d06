"""Names of output keys and default lists shared across spatialcx."""

from __future__ import annotations

from collections.abc import Sequence

#: Output keys written into the table (CELLxGENE naming).
KEY_ADDED = "cell_type"
PREDICTED_SUFFIX = "_predicted"
CONFIDENCE_SUFFIX = "_confidence"
CONFIDENCE_RAW_SUFFIX = "_confidence_raw"
ONTOLOGY_ID_SUFFIX = "_ontology_term_id"
ONTOLOGY_LABEL_SUFFIX = "_ontology_label"
DECISION_SUFFIX = "_decision_scores"
N_GENES_SUFFIX = "_n_genes"
#: Suffix of the ``uns`` entry where ``scx.tl.add_ontology_ids`` keeps its summary (``cell_type_ontology``).
ONTOLOGY_SUFFIX = "_ontology"

#: Label written for cells whose confidence is below the threshold.
UNASSIGNED = "Unassigned"
#: CELLxGENE's value for "no ontology term fits".
UNKNOWN_ONTOLOGY_ID = "unknown"

#: obs columns that references carry after :func:`spatialcx.pp.combine_references`.
ORIGINAL_LABEL_KEY = "original_label"
SOURCE_KEY = "reference_source"

#: Labels that are not cell types. Removed from references by exact, case-sensitive match.
DEFAULT_EXCLUDE_LABELS: tuple[str, ...] = (
    "unknown",
    "Unknown",
    "UNKNOWN",
    "unassigned",
    "Unassigned",
    "na",
    "NA",
    "N/A",
    "n/a",
    "none",
    "None",
    "null",
    "doublet",
    "Doublet",
    "doublets",
    "Doublets",
    "low quality",
    "Low quality",
    "ambiguous",
    "Ambiguous",
    "unclassified",
    "Unclassified",
)

#: Key in ``.uns`` where :func:`spatialcx.io.read_reference` records where a reference came from and the state of its
#: file's ``X`` over all genes (``x_state``, ``x_log1p_target_sum``).
READ_UNS_KEY = "spatialcx_reference"

#: Where raw counts are looked for, in order.
RAW_COUNT_LAYERS: tuple[str, ...] = ("counts", "raw_counts", "raw")

#: Target sum of the log1p normalization that CellTypist models expect.
TARGET_SUM = 1e4


def label_list(labels: Sequence[str] | str | None) -> list[str]:
    """``exclude_labels`` as a list of str: ``None`` gives :data:`DEFAULT_EXCLUDE_LABELS`, a str is one label."""
    if labels is None:
        labels = DEFAULT_EXCLUDE_LABELS
    return [str(x) for x in ([labels] if isinstance(labels, str) else labels)]


def output_keys(key_added: str = KEY_ADDED) -> dict[str, str]:
    """Return the names of every key that prediction writes for ``key_added``."""
    return {
        "label": key_added,
        "predicted": key_added + PREDICTED_SUFFIX,
        "confidence": key_added + CONFIDENCE_SUFFIX,
        "confidence_raw": key_added + CONFIDENCE_RAW_SUFFIX,
        "ontology_id": key_added + ONTOLOGY_ID_SUFFIX,
        "ontology_label": key_added + ONTOLOGY_LABEL_SUFFIX,
        "decision_scores": key_added + DECISION_SUFFIX,
        "n_genes": key_added + N_GENES_SUFFIX,
    }
