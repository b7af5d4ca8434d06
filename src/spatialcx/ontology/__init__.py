"""Cell Ontology index and label matching (internal; the public entry point is :func:`spatialcx.tl.add_ontology_ids`).

* :func:`load_index` -- every Cell Ontology term of ``cellxgene-ontology-guide``, cached on disk (:func:`cache_dir`).
* :func:`resolve_index` -- the ``index=`` argument (None, a user file, a mapping, a DataFrame) as an index.
* :func:`matcher_for` -- the tiered :class:`LabelMatcher` of an index (built once per index).
* :func:`load_patterns` -- the packaged pattern table ``spatialcx/data/label_patterns.json``.
"""

from __future__ import annotations

from ._index import OntologyIndex, build_index, cache_dir, load_index, read_index_file, resolve_index
from ._match import LabelMatcher, Match
from ._patterns import Patterns, load_patterns
from ._text import Normalizer


def matcher_for(index: OntologyIndex) -> LabelMatcher:
    """Return the label matcher of ``index`` with the packaged pattern table (built on first use, then reused)."""
    matcher = index._matcher
    if matcher is None:
        matcher = LabelMatcher(index, load_patterns())
        index._matcher = matcher
    return matcher


__all__ = [
    "LabelMatcher",
    "Match",
    "Normalizer",
    "OntologyIndex",
    "Patterns",
    "build_index",
    "cache_dir",
    "load_index",
    "load_patterns",
    "matcher_for",
    "read_index_file",
    "resolve_index",
]
