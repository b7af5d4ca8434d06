"""Cell Ontology index and label matching (internal; the public entry point is :func:`spatialcx.tl.add_ontology_ids`)."""
