"""The Cell Ontology index: every CL term of the ontology that ``cellxgene-ontology-guide`` ships, cached on disk.

The index holds, for each CL term, its label, its synonyms (the packaged ontology lists exact and related synonyms
together), whether it is deprecated and by what it is replaced, and its ancestors; plus the normalised form of every
name. It is built once from the package's compressed ontology file and cached as JSON in the user's cache directory
(``$SPATIALCX_CACHE_DIR``, else ``$XDG_CACHE_HOME/spatialcx``, else ``~/.cache/spatialcx``), keyed by the ontology
version and the normalisation rules, written atomically; when the directory is not writable, the index lives in memory.

Users extend the index with their own entries (label -> CL id) by passing a file or a mapping to ``index=``; see
:func:`resolve_index`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from spatialcx._settings import logger
from spatialcx._utils import write_atomically

from ._patterns import Patterns, load_patterns
from ._text import NORMALIZER_VERSION

#: Bump when the layout of the cached index changes.
INDEX_FORMAT = 1
CACHE_ENV = "SPATIALCX_CACHE_DIR"
CL_ID_RE = re.compile(r"CL:\d{7}")

_MEMORY: dict[str, OntologyIndex] = {}


def cache_dir() -> Path:
    """Return spatialcx's cache directory.

    ``$SPATIALCX_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/spatialcx``, else ``~/.cache/spatialcx``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "spatialcx"


class OntologyIndex:
    """Every Cell Ontology term with its names, deprecation and ancestors; optionally extended by user entries.

    Build it with :func:`load_index` (cached) rather than directly.

    Parameters
    ----------
    terms
        CL id -> ``{"label", "synonyms", "deprecated", "replaced_by", "ancestors"}``.
    names
        ``(normalised name, CL id, kind)`` for every label (kind ``"label"``), synonym (``"synonym"``) and the label
        of a deprecated term that has a replacement (``"obsolete"``).
    version
        The Cell Ontology release, e.g. ``"v2026-03-26"``.
    source
        Where the ontology came from (package and version).
    entries
        User entries ``(label, normalised label, CL id)``, matched before anything else.
    """

    def __init__(
        self,
        terms: dict[str, dict[str, Any]],
        names: list[tuple[str, str, str]],
        *,
        version: str,
        source: str,
        entries: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        self._terms = terms
        self.names = names
        self.version = version
        self.source = source
        self.entries = tuple(entries)
        self._n_current = sum(not t["deprecated"] for t in terms.values())
        self._ancestor_sets: dict[str, frozenset[str]] = {}
        self._matcher: Any = None

    def __len__(self) -> int:
        return self._n_current

    def __contains__(self, term_id: object) -> bool:
        t = self._terms.get(term_id) if isinstance(term_id, str) else None
        return t is not None and not t["deprecated"]

    def __repr__(self) -> str:
        extra = f", {len(self.entries)} user entries" if self.entries else ""
        return f"OntologyIndex(Cell Ontology {self.version}: {len(self)} current terms{extra})"

    @property
    def term_ids(self) -> list[str]:
        """Ids of the current (not deprecated) terms."""
        return [k for k, t in self._terms.items() if not t["deprecated"]]

    def term(self, term_id: str) -> dict[str, Any]:
        """Return the record of ``term_id`` (current or deprecated)."""
        try:
            return self._terms[term_id]
        except KeyError:
            raise KeyError(f"{term_id!r} is not a term of the Cell Ontology {self.version}.") from None

    def name(self, term_id: str) -> str:
        """Return the label of ``term_id``."""
        return self.term(term_id)["label"]

    def ancestors(self, term_id: str) -> frozenset[str]:
        """Return the ancestors of ``term_id`` (not including itself)."""
        cached = self._ancestor_sets.get(term_id)
        if cached is None:
            cached = frozenset(self.term(term_id)["ancestors"])
            self._ancestor_sets[term_id] = cached
        return cached

    def is_ancestor(self, ancestor: str, term_id: str) -> bool:
        """Whether ``ancestor`` is an ancestor of ``term_id``."""
        return ancestor in self.ancestors(term_id)

    def resolve(self, term_id: str) -> tuple[str | None, str]:
        """Return ``(current id, note)`` for a CL id: itself, its replacement when deprecated, or ``None``."""
        t = self._terms.get(term_id)
        if t is None:
            return None, f"{term_id} is not a term of the Cell Ontology {self.version}"
        if not t["deprecated"]:
            return term_id, ""
        new = t.get("replaced_by")
        if new and new in self:
            return new, f"{term_id} is deprecated, replaced by {new}"
        return None, f"{term_id} is deprecated and has no replacement"

    def extend(
        self, entries: Mapping[str, str] | Iterable[tuple[str, str]], *, what: str = "user entries"
    ) -> OntologyIndex:
        """Return a new index that also holds ``entries`` (label -> CL id), matched before the ontology's own names.

        Every id must be a current CL term of this index; labels that normalise to the same text must agree.
        """
        normalize = load_patterns().normalizer
        items = list(entries.items()) if isinstance(entries, Mapping) else [tuple(e) for e in entries]
        seen: dict[str, tuple[str, str]] = {norm: (label, tid) for label, norm, tid in self.entries}
        new: list[tuple[str, str, str]] = []
        problems = []
        for item in items:
            if len(item) != 2:
                raise ValueError(f"{what}: each entry must be (label, CL id), got {item!r}.")
            label, tid = str(item[0]).strip(), str(item[1]).strip()
            if not label:
                problems.append(f"an empty label (for {tid!r})")
                continue
            if not CL_ID_RE.fullmatch(tid):
                problems.append(f"{label!r} -> {tid!r} is not a Cell Ontology id (CL:NNNNNNN)")
                continue
            if tid not in self:
                current, note = self.resolve(tid)
                hint = f"; use {current}" if current else ""
                problems.append(f"{label!r} -> {tid}: {note}{hint}")
                continue
            norm = normalize(label)
            if norm in seen and seen[norm][1] != tid:
                problems.append(f"{label!r} -> {tid} conflicts with {seen[norm][0]!r} -> {seen[norm][1]}")
                continue
            seen[norm] = (label, tid)
            new.append((label, norm, tid))
        if problems:
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise ValueError(
                f"{what}: {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} cannot be used: {shown}. Only "
                "current Cell Ontology ids can be mapped to: fix or remove these entries."
            )
        return OntologyIndex(
            self._terms, self.names, version=self.version, source=self.source, entries=(*self.entries, *new)
        )

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON-serialisable form that the cache stores (without user entries)."""
        return {
            "format": INDEX_FORMAT,
            "ontology": "CL",
            "version": self.version,
            "source": self.source,
            "terms": self._terms,
            "names": self.names,
        }


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cellxgene-ontology-guide")
    except PackageNotFoundError:  # pragma: no cover - the dependency is required
        return "unknown"


@functools.cache
def _cl_release() -> tuple[str, str]:
    """Return (schema version, CL release) of the latest CELLxGENE schema that cellxgene-ontology-guide supports."""
    from cellxgene_ontology_guide.supported_versions import CXGSchema

    schema = CXGSchema()
    return schema.version, str(schema.supported_ontologies["CL"]["version"])


def build_index(patterns: Patterns | None = None) -> OntologyIndex:
    """Build the index from cellxgene-ontology-guide's packaged Cell Ontology (no cache)."""
    from cellxgene_ontology_guide.supported_versions import CXGSchema

    patterns = patterns or load_patterns()
    normalize = patterns.normalizer
    schema = CXGSchema()
    release = str(schema.supported_ontologies["CL"]["version"])
    raw = schema.ontology("CL")
    terms: dict[str, dict[str, Any]] = {}
    names: list[tuple[str, str, str]] = []
    for tid, rec in raw.items():
        if not CL_ID_RE.fullmatch(tid):
            continue
        deprecated = bool(rec.get("deprecated", False))
        label = str(rec.get("label", ""))
        if deprecated:
            label = re.sub(r"^obsolete[ _:]+", "", label, flags=re.I)
        replaced = rec.get("replaced_by")
        ancestors = sorted(
            (a for a in rec.get("ancestors", {}) if CL_ID_RE.fullmatch(a)), key=lambda a: (rec["ancestors"][a], a)
        )
        terms[tid] = {
            "label": label,
            "synonyms": [str(s) for s in rec.get("synonyms", [])],
            "deprecated": deprecated,
            "replaced_by": replaced if isinstance(replaced, str) and CL_ID_RE.fullmatch(replaced) else None,
            "ancestors": ancestors,
        }
    for tid, t in terms.items():
        if not t["deprecated"]:
            names.append((normalize(t["label"]), tid, "label"))
            names.extend((normalize(s), tid, "synonym") for s in t["synonyms"])
        elif t["replaced_by"] and not terms.get(t["replaced_by"], {"deprecated": True})["deprecated"]:
            names.append((normalize(t["label"]), tid, "obsolete"))
    names = [n for n in names if n[0]]
    source = f"cellxgene-ontology-guide {_package_version()} (CELLxGENE schema {schema.version})"
    return OntologyIndex(terms, names, version=release, source=source)


def _cache_path(directory: Path, release: str, patterns: Patterns) -> Path:
    key = f"cl-{release}-f{INDEX_FORMAT}-n{NORMALIZER_VERSION}-{patterns.spelling_digest}.json"
    return directory / "ontology" / key


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())

    write_atomically(path, write)


def _read_cached(path: Path, release: str) -> OntologyIndex | None:
    try:
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
        if payload.get("format") != INDEX_FORMAT or payload.get("version") != release:
            raise ValueError("stale cache")
        names = [(n[0], n[1], n[2]) for n in payload["names"]]
        return OntologyIndex(payload["terms"], names, version=payload["version"], source=payload["source"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        logger.warning("The cached Cell Ontology index %s cannot be read (%s); rebuilding it.", path, e)
        return None


def load_index(*, cache: Path | str | None = None, refresh: bool = False) -> OntologyIndex:
    """Return the Cell Ontology index, from memory, else from the on-disk cache, else built (and cached).

    Parameters
    ----------
    cache
        Cache directory; default :func:`cache_dir`.
    refresh
        Rebuild from the packaged ontology even when a cached index exists.
    """
    patterns = load_patterns()
    _, release = _cl_release()
    directory = Path(cache).expanduser() if cache is not None else cache_dir()
    path = _cache_path(directory, release, patterns)
    key = str(path)
    if not refresh and key in _MEMORY:
        return _MEMORY[key]
    index = None if refresh else _read_cached(path, release)
    if index is None:
        start = time.perf_counter()
        index = build_index(patterns)
        logger.info("Built the Cell Ontology index (%d terms) in %.2f s.", len(index), time.perf_counter() - start)
        try:
            _write_atomic(path, index.to_payload())
        except OSError as e:
            logger.info("Cannot cache the Cell Ontology index in %s (%s); keeping it in memory.", path.parent, e)
    _MEMORY[key] = index
    return index


def read_index_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read user index entries (label -> CL id) from a CSV, TSV or JSON file.

    Formats
    -------
    CSV / TSV (``.csv``, ``.tsv``, ``.txt``)
        A header with the columns ``label`` and ``ontology_term_id`` (other columns are ignored).
    JSON
        ``{"label": "CL:...", ...}`` or ``[{"label": ..., "ontology_term_id": ...}, ...]``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"Ontology index file {str(p)!r} does not exist. Pass a CSV/TSV with the columns 'label' and "
            "'ontology_term_id', or a JSON object {label: CL id}."
        )
    suffix = p.suffix.lower()
    if suffix == ".json":
        with open(p, encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict):
            return [(str(k), str(v)) for k, v in data.items()]
        if isinstance(data, list) and all(isinstance(r, dict) for r in data):
            try:
                return [(str(r["label"]), str(r["ontology_term_id"])) for r in data]
            except KeyError as e:
                raise ValueError(
                    f"Ontology index file {str(p)!r}: every record needs 'label' and 'ontology_term_id' (missing {e})."
                ) from None
        raise ValueError(
            f"Ontology index file {str(p)!r} holds a JSON {type(data).__name__}; expected an object {{label: CL id}} "
            "or a list of {'label', 'ontology_term_id'} records."
        )
    if suffix in (".csv", ".tsv", ".txt"):
        sep = "," if suffix == ".csv" else "\t"
        frame = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False)
        return entries_from_frame(frame, what=f"Ontology index file {str(p)!r}")
    raise ValueError(
        f"Ontology index file {str(p)!r} has the suffix {suffix!r}; use .csv, .tsv or .json (see the docs of "
        "spatialcx.tl.add_ontology_ids)."
    )


def entries_from_frame(frame: pd.DataFrame, *, what: str = "index entries") -> list[tuple[str, str]]:
    """Return (label, CL id) pairs from a frame with the columns ``label`` and ``ontology_term_id``."""
    cols = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in ("label", "ontology_term_id") if c not in cols]
    if missing:
        raise ValueError(
            f"{what} lacks the column(s) {missing}; found {list(frame.columns)}. It needs 'label' and "
            "'ontology_term_id'."
        )
    labels = frame[cols["label"]].astype(str)
    ids = frame[cols["ontology_term_id"]].astype(str)
    return list(zip(labels, ids, strict=True))


def resolve_index(index: Any = None) -> OntologyIndex:
    """Turn the ``index=`` argument of the mapping functions into an :class:`OntologyIndex`.

    ``None`` gives the packaged Cell Ontology index; an :class:`OntologyIndex` is used as is; a path (CSV, TSV or
    JSON, see :func:`read_index_file`), a mapping ``{label: CL id}`` or a DataFrame with the columns ``label`` and
    ``ontology_term_id`` extends the packaged index with those entries.
    """
    if index is None:
        return load_index()
    if isinstance(index, OntologyIndex):
        return index
    if isinstance(index, str | os.PathLike):
        return load_index().extend(read_index_file(index), what=f"Ontology index file {str(index)!r}")
    if isinstance(index, Mapping):
        return load_index().extend(index)
    if isinstance(index, pd.DataFrame):
        return load_index().extend(entries_from_frame(index))
    raise TypeError(
        f"index must be None, an OntologyIndex, a path to a CSV/TSV/JSON file, a mapping {{label: CL id}} or a "
        f"DataFrame with 'label' and 'ontology_term_id'; got {type(index).__name__}."
    )
