"""Sphinx configuration of the spatialcx documentation."""

from datetime import datetime
from importlib.metadata import version as _version

project = "spatialcx"
author = "spatialcx developers"
copyright = f"{datetime.now():%Y}, {author}"
try:
    release = _version("spatialcx")
except Exception:  # noqa: BLE001
    release = "0.0.0"
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]
autosummary_generate = True
autodoc_member_order = "groupwise"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "braces"
# Returns sections are prose (what comes back and what is written), rendered as written; the return type is in the
# signature. (napoleon would read the first line of the prose as a type.)
napoleon_custom_sections = ["Returns"]
typehints_document_rtype = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3  # [Genes](#genes)-style links to headings
nb_execution_mode = "off"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
templates_path = ["_templates"]  # class templates that document the methods (and the model's properties)
html_title = "spatialcx"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "celltypist": ("https://celltypist.readthedocs.io/en/latest/", None),
}
# The Cell Ontology index is internal (the `index` argument of tl.add_ontology_ids / tl.map_labels documents what it
# accepts); its class has no page of its own.
nitpick_ignore = [("py:class", "spatialcx.ontology._index.OntologyIndex")]


# Public classes are documented where users import them (scx.CellTypeModel, scx.tl.OntologyMapping, ...): type hints
# name them there, not by the private module that defines them.
_PUBLIC_MODULES = {
    "spatialcx.model._model": "spatialcx",
    "spatialcx.tl._ontology": "spatialcx.tl",
    "spatialcx.tl._config": "spatialcx.tl",
}


def typehints_fixup_module_name(module: str) -> str:
    """The public module of a class defined in a private one."""
    return _PUBLIC_MODULES.get(module, module)


suppress_warnings = ["config.cache"]  # the function above cannot be pickled; the environment is rebuilt instead
