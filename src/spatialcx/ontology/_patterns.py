"""The packaged pattern table (``spatialcx/data/label_patterns.json``): loading, validation and compilation."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from ._text import Normalizer

PATTERNS_FILE = "label_patterns.json"


@dataclass(frozen=True)
class Alias:
    """A curated name -> Cell Ontology id entry of the pattern table."""

    term_id: str
    names: tuple[str, ...]
    note: str


@dataclass(frozen=True)
class Patterns:
    """The compiled pattern table. See ``docs/ontology.md`` for what each section does."""

    version: int
    digest: str
    spelling: tuple[tuple[str, str], ...]
    abbreviations: dict[str, str]
    rewrites: tuple[tuple[re.Pattern[str], str, str], ...]
    implied: tuple[dict[str, tuple[str, ...]], ...]
    optional_term_tokens: tuple[tuple[frozenset[str], frozenset[str]], ...]
    state_tokens: frozenset[str]
    identity_tokens: frozenset[str]
    reject_tokens: frozenset[str]
    reject_phrases: tuple[str, ...]
    aliases: tuple[Alias, ...]
    blocked_synonyms: frozenset[tuple[str, str]]
    coarsen: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def normalizer(self) -> Normalizer:
        """The normaliser with this table's spelling rules."""
        return _normalizer(self.spelling)

    @property
    def spelling_digest(self) -> str:
        """Digest of the rules that change normalised ontology names (part of the index cache key)."""
        return hashlib.sha256(json.dumps(self.spelling).encode()).hexdigest()[:12]


@lru_cache(maxsize=4)
def _normalizer(spelling: tuple[tuple[str, str], ...]) -> Normalizer:
    return Normalizer(spelling)


def _section(raw: dict[str, Any], name: str, key: str) -> Any:
    try:
        return raw[name][key]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"The pattern table has no {name!r}/{key!r} section: the packaged file {PATTERNS_FILE} is damaged. "
            "Reinstall spatialcx."
        ) from e


def parse_patterns(raw: dict[str, Any]) -> Patterns:
    """Validate and compile a pattern table read from JSON."""
    text = json.dumps(raw, sort_keys=True)
    spelling = tuple((str(r[0]), str(r[1])) for r in _section(raw, "spelling", "rules"))
    for pattern, _ in spelling:
        re.compile(pattern)
    abbreviations = {str(k).lower(): str(v) for k, v in _section(raw, "abbreviations", "rules").items()}
    rewrites = tuple(
        (re.compile(r[0]), str(r[1]), str(r[2]) if len(r) > 2 else "") for r in _section(raw, "rewrites", "rules")
    )
    implied = tuple(
        {k: tuple(str(t) for t in rule.get(k, ())) for k in ("if_any", "unless_any", "add")}
        for rule in _section(raw, "implied", "rules")
    )
    optional = tuple(
        (frozenset(rule["tokens"]), frozenset(rule.get("when", ())))
        for rule in _section(raw, "optional_term_tokens", "rules")
    )
    aliases = []
    for rule in _section(raw, "aliases", "rules"):
        term_id = str(rule["id"])
        if not re.fullmatch(r"CL:\d{7}", term_id):
            raise ValueError(
                f"Pattern table alias {rule!r} has id {term_id!r}, which is not a Cell Ontology id (CL:NNNNNNN)."
            )
        aliases.append(Alias(term_id, tuple(str(n) for n in rule["names"]), str(rule.get("note", ""))))
    coarsen = {str(r["id"]): (str(r["to"]), str(r.get("note", ""))) for r in _section(raw, "coarsen", "rules")}
    return Patterns(
        version=int(raw.get("version", 1)),
        digest=hashlib.sha256(text.encode()).hexdigest()[:12],
        spelling=spelling,
        abbreviations=abbreviations,
        rewrites=rewrites,
        implied=implied,
        optional_term_tokens=optional,
        state_tokens=frozenset(_section(raw, "state_tokens", "tokens")),
        identity_tokens=frozenset(_section(raw, "identity_tokens", "tokens")),
        reject_tokens=frozenset(_section(raw, "reject", "tokens")),
        reject_phrases=tuple(_section(raw, "reject", "phrases")),
        aliases=tuple(aliases),
        blocked_synonyms=frozenset((str(i), str(s)) for i, s in _section(raw, "blocked_synonyms", "rules")),
        coarsen=coarsen,
    )


@lru_cache(maxsize=1)
def load_patterns() -> Patterns:
    """Load the packaged pattern table (cached)."""
    text = (resources.files("spatialcx") / "data" / PATTERNS_FILE).read_text(encoding="utf-8")
    return parse_patterns(json.loads(text))
