"""Tiered matching of free-text cell-type labels to Cell Ontology terms.

A label goes through these steps in order and stops at the first that finds a term:

1. a label that *is* a CL id (``CL:0000236``, ``CL_0000236``, ``cl:0000236``, the term's IRI) is taken as such (tier 1,
   score 1; a deprecated id gives its replacement);
2. entries of a user index (``index=``) win over everything else (tier 0, score 1);
3. tier 1, exact: the normalised label equals a CL label (score 1.0), synonym (0.95) or the label of a deprecated term
   (0.9, mapped to its replacement);
4. a label with a word such as ``doublet``, ``unknown``, ``cluster``, ``hybrid`` or ``low quality`` is not a cell
   type: ``unknown`` (checked after step 3, so that CL's own "D1/D2-hybrid medium spiny neuron" is kept);
5. a label that joins types (``NK/T``, ``Mono/Mac``, ``Chondrocytes & osteoblasts``) maps each part; when they differ,
   the label maps to their closest common CL term (``lymphocyte``, ``mononuclear phagocyte``) unless that term is as
   general as "cell" (then ``unknown``);
6. tier 0, patterns: the label equals a curated alias of the pattern table (0.95), or, once abbreviations are expanded
   (``Mono`` -> monocyte, ``EC`` -> endothelial cell), rewrites applied (``L2/3 IT``), implied words added
   (``CD4 Naive`` -> CD4+ naive T) and ``cell`` added or a trailing cluster number dropped, it equals an alias or a CL
   name (0.9);
7. tier 2, tokens: the label's words (a marker with its sign, ``cd4+``, is one word) equal a CL name's words in any
   order (0.85); else the label falls back to the most specific CL term whose words are all in the label, provided
   the left-over words name no other cell type (``Alveolar Mph CCL3+ activated`` -> CCL3-positive alveolar
   macrophage) and do not hold the label's last noun (``Lymphoid follicle``, ``T cell zone`` are places). Score
   ``0.85 * sqrt(coverage)``, where coverage weighs the matched words against all words: states, markers, gene
   symbols the ontology does not use (``Astro Aqp4``) and cluster numbers weigh 0.25, adjectives and places 0.5,
   other words the ontology does not know and words that change what a cell is (``like``, ``derived``,
   ``associated``) 2, other words 1. A label marker whose sign
   contradicts the term (``cd16+`` against "CD16-negative") rules the term out;
8. tier 3, similarity: idf-weighted word overlap with the CL names whose key noun is in the label, or with the one
   term whose names hold all the label's words (``Lamp5 Lhx6`` -> Lamp5 Lhx6 neuron); score ``0.7 * overlap``.

Two different terms that tie at a step make the label ambiguous: it is not mapped. The caller
(:func:`spatialcx.tl.map_labels`) turns matches below ``min_score`` into ``unknown``.

An abbreviation of the pattern table has one reading (``EC`` -> endothelial cell). When the Cell Ontology itself uses
the abbreviation for another cell type (``type EC enteroendocrine cell``, ``superior cervical ganglion TH neuron``),
the match keeps the pattern table's reading but says so: its note names the other terms and
:attr:`Match.alternatives` lists their ids, so that the caller can show the ambiguity.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

from ._index import OntologyIndex
from ._patterns import Patterns
from ._text import _ROMAN, gene_symbols, is_marker_token

TIER_PATTERN = 0
TIER_EXACT = 1
TIER_TOKEN = 2
TIER_SIMILARITY = 3
TIER_NONE = -1

SCORE_ID = 1.0
SCORE_USER = 1.0
SCORE_LABEL = 1.0
SCORE_SYNONYM = 0.95
SCORE_ALIAS = 0.95
SCORE_OBSOLETE = 0.9
SCORE_CANONICAL = 0.9
SCORE_TOKEN = 0.85
SCORE_SIMILARITY = 0.7

STOP = frozenset({"cell", "of", "the", "and", "in", "or", "from", "to", "with", "for", "by", "at"})
_KIND_PRIORITY = {"user": 0, "alias": 1, "label": 2, "synonym": 3, "obsolete": 4}
_TAXON_RE = re.compile(r"\((?:mmus|primate|homo sapiens|sensu [^)]*|metazoa)\)\s*$", re.I)
#: A label that is a CL id: ``CL:0000236``, ``CL_0000236``, ``cl:0000236``, ``CL0000236`` or the term's IRI
#: (``http://purl.obolibrary.org/obo/CL_0000236``, ``obo:CL_0000236``).
_ID_RE = re.compile(r"\s*(?:(?:https?://purl\.obolibrary\.org/obo/|obo:))?CL[:_]?(\d{7})\s*", re.I)
_BARE_CD_RE = re.compile(r"cd\d+(?!\d)(?!hi$|lo$)[a-z]{0,2}")
_NUMBERED = frozenset({"type", "group", "class", "layer", "stage", "grade", "phase", "fraction", "helper", "subset"})
_ADJ_SUFFIXES = ("al", "ar", "ic", "ous", "ive", "ary", "ory")
#: Nouns with an adjective's ending: "memory" says what a T or B cell is, it does not only qualify it.
_NOT_ADJECTIVES = frozenset({"memory"})
#: Prefixes glued to the next word when the ontology knows the glued word ("Pre-adipocytes" -> preadipocyte).
_PREFIXES = frozenset({"pre", "pro"})
_LOCATION = frozenset(
    {"gland", "tissue", "region", "zone", "area", "layer", "tract", "mucosa", "niche", "wall", "side"}
)
#: Organ words: a similarity match may add one to the label's words only when a single term holds them all.
_ORGAN = frozenset(
    {
        "kidney", "renal", "lung", "pulmonary", "liver", "hepatic", "heart", "cardiac", "brain", "cerebral", "retina",
        "retinal", "skin", "dermis", "stomach", "gastric", "intestine", "intestinal", "colon", "colonic", "duodenum",
        "duodenal", "ileum", "ileal", "jejunum", "esophagus", "esophageal", "pancreas", "pancreatic", "spleen",
        "splenic", "thymus", "thymic", "marrow", "breast", "mammary", "prostate", "prostatic", "bladder", "uterus",
        "uterine", "ovary", "ovarian", "testis", "placenta", "placental", "thyroid", "adrenal", "pituitary", "tongue",
        "nasal", "trachea", "tracheal", "bronchus", "bronchial", "cochlea", "eye", "bone", "cartilage", "adipose",
    }
)  # fmt: skip
_TAXON_WORDS = frozenset({"human", "mouse", "homo", "sapien", "mmus", "primate", "vertebrata", "metazoa", "mammalian"})
#: An upper-case word of a CL name ("EC" in "type EC enteroendocrine cell", "TH" in "TH/DBH neuron").
_UPPER_WORD_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z][A-Z0-9]*(?![A-Za-z0-9])")
_UNION_SEP_RE = re.compile(r"[/&]|\band\b")
#: Terms too general to stand for two joined labels.
_GENERIC = frozenset({"CL:0000000", "CL:0000003", "CL:0000255", "CL:0000548", "CL:0002371", "CL:0000010", "CL:0000211"})


@dataclass(frozen=True)
class Match:
    """The result of matching one label.

    Attributes
    ----------
    term_id
        The CL id, or ``None`` when nothing fits.
    tier
        0 pattern table or user index, 1 exact, 2 tokens, 3 similarity; -1 when nothing fits.
    score
        Confidence of the match in [0, 1]; for ``term_id=None`` the score of the best rejected candidate (or 0).
    matched
        The index name (normalised) that matched, or ``""``.
    note
        How the match was found, or why there is none.
    alternatives
        Other CL terms the label may mean: the Cell Ontology uses an abbreviation that the match read from the pattern
        table (``EC`` -> endothelial cell) for them (``type EC enteroendocrine cell``).
    """

    term_id: str | None
    tier: int
    score: float
    matched: str = ""
    note: str = ""
    alternatives: tuple[str, ...] = ()


class _Entry:
    __slots__ = ("term_id", "kind", "norm", "full", "core", "head", "where", "taxon", "ntok", "note", "weight")

    def __init__(
        self,
        norm: str,
        term_id: str,
        kind: str,
        taxon: bool,
        core: frozenset[str],
        full: frozenset[str],
        note: str = "",
    ):
        self.norm = norm
        self.term_id = term_id
        self.kind = kind
        self.taxon = taxon
        self.full = full
        self.core = core
        self.ntok = len(full)
        before_of, _, after_of = norm.partition(" of ")
        content = (
            [t for t in before_of.split() if t not in STOP] or [t for t in norm.split() if t not in STOP] or [norm]
        )
        self.head = next((t for t in reversed(content) if not t.isdigit()), content[-1])
        self.where = frozenset(after_of.split()) - frozenset(before_of.split())
        self.note = note
        self.weight = 1.0

    def key(self, tokens: frozenset[str] | None = None) -> tuple[int, int, int, int]:
        exact = 0 if tokens is not None and self.full == tokens else 1
        return (exact, _KIND_PRIORITY[self.kind], int(self.taxon), self.ntok)


_OPPOSITE = {"+": "-", "-": "+", "hi": "lo", "lo": "hi"}


def _contradicts(words: Iterable[str], name: frozenset[str]) -> bool:
    """Whether a marker of the label has the opposite sign in the name (``cd4+`` in the label, ``cd4-`` in the name)."""
    for w in words:
        for sign, other in _OPPOSITE.items():
            if w.endswith(sign) and len(w) > len(sign) and w[: -len(sign)] + other in name:
                return True
    return False


def _expand(token: str, abbreviations: dict[str, str]) -> str:
    """Expand an abbreviation, also in the plural the normaliser keeps (``Oligos``, ``Monos``, ``Astros``)."""
    full = abbreviations.get(token)
    if full is None and len(token) > 2 and token.endswith("s"):
        full = abbreviations.get(token[:-1])
    return token if full is None else full


def _unknown(note: str, score: float = 0.0) -> Match:
    return Match(None, TIER_NONE, float(score), "", note)


class LabelMatcher:
    """Match free-text labels to the terms of an :class:`OntologyIndex` with the rules of a pattern table.

    Parameters
    ----------
    index
        The Cell Ontology index (optionally with user entries).
    patterns
        The compiled pattern table.
    """

    def __init__(self, index: OntologyIndex, patterns: Patterns) -> None:
        self.index = index
        self.patterns = patterns
        self.normalize = patterns.normalizer
        normalize = self.normalize
        self._optional = patterns.optional_term_tokens
        self._cell_words: dict[str, bool] = {}
        self._other_uses: dict[str, tuple[str, ...]] = {}
        self._upper_words: dict[str, set[str]] | None = None
        self._any_rewrite = re.compile("|".join(f"(?:{rx.pattern})" for rx, _, _ in patterns.rewrites) or "(?!)")
        blocked = {(tid, normalize(syn)) for tid, syn in patterns.blocked_synonyms}
        taxon = {tid for tid in index.term_ids if _TAXON_RE.search(index.name(tid))}

        self.exact_index: dict[str, list[_Entry]] = {}
        self.exact_alias: dict[str, list[_Entry]] = {}
        self.exact_user: dict[str, list[_Entry]] = {}
        self.slash_aliases: set[str] = set()
        token_entries: list[_Entry] = []
        for norm, tid, kind in index.names:
            if (tid, norm) in blocked or (kind == "synonym" and tid in taxon and norm.count(" ") < 2):
                continue  # blocked, or a short synonym ("VIP", "Sst Chodl") of a species-specific taxonomy term
            entry = self._make_entry(norm, tid, kind, tid in taxon)
            self.exact_index.setdefault(norm, []).append(entry)
            if kind != "obsolete" and not entry.taxon:
                token_entries.append(entry)
        missing = sorted({a.term_id for a in patterns.aliases if a.term_id not in index})
        if missing:
            raise ValueError(
                f"The pattern table maps to {missing}, which are not current terms of the Cell Ontology "
                f"{index.version}. Update spatialcx (its pattern table follows the ontology that "
                "cellxgene-ontology-guide ships)."
            )
        for alias in patterns.aliases:
            for name in alias.names:
                entry = self._make_entry(normalize(name), alias.term_id, "alias", False, note=alias.note)
                self.exact_alias.setdefault(entry.norm, []).append(entry)
                token_entries.append(entry)
                if "/" in name or "&" in name:
                    self.slash_aliases.add(name.strip().lower())
        for label, norm, tid in index.entries:
            entry = self._make_entry(norm, tid, "user", False, note=f"user index: {label!r}")
            self.exact_user.setdefault(norm, []).append(entry)
            token_entries.append(entry)
            if "/" in label or "&" in label:
                self.slash_aliases.add(label.strip().lower())

        self.by_core: dict[frozenset[str], list[_Entry]] = {}
        for entry in token_entries:
            if entry.core:
                self.by_core.setdefault(entry.core, []).append(entry)
        self.heads = frozenset(next(iter(k)) for k in self.by_core if len(k) == 1)
        df: Counter[str] = Counter()
        self.by_head: dict[str, list[_Entry]] = {}
        self.by_term: dict[str, list[_Entry]] = {}
        terms_with: dict[str, set[str]] = {}
        for entry in token_entries:
            self.by_head.setdefault(entry.head, []).append(entry)
            self.by_term.setdefault(entry.term_id, []).append(entry)
            for t in entry.core:
                df[t] += 1
                terms_with.setdefault(t, set()).add(entry.term_id)
        self.terms_with = {t: frozenset(v) for t, v in terms_with.items()}
        self.label_words = {e.term_id: e.full for e in token_entries if e.kind == "label"}
        n = max(len(token_entries), 1)
        self.idf = {t: math.log(1.0 + n / c) for t, c in df.items()}
        self._max_idf = math.log(1.0 + n)
        for entry in token_entries:  # idf weight of each name's words ("of <place>" words weigh half)
            entry.weight = sum(self.idf[t] * (0.5 if t in entry.where else 1.0) for t in entry.core) or 1.0
        for group in self.by_head.values():
            group.sort(key=lambda e: e.weight)

    # ------------------------------------------------------------------ building blocks
    def _make_entry(self, norm: str, tid: str, kind: str, taxon: bool, note: str = "") -> _Entry:
        full = frozenset(t for t in norm.split() if t not in STOP)
        core = full
        for tokens, when in self._optional:
            if tokens <= core and when <= core and core - tokens:
                core = core - tokens
        return _Entry(norm, tid, kind, taxon, core, full, note)

    def weights(self, ordered: list[str]) -> dict[str, float]:
        """Weight of each label word in the coverage of a fall-back match (a number counts when it follows 'type')."""
        out = {}
        for i, t in enumerate(ordered):
            numbered = t.isdigit() and i > 0 and ordered[i - 1] in _NUMBERED
            out[t] = 1.0 if numbered else self.weight(t)
        return out

    def weight(self, token: str) -> float:
        """Weight of a label word in the coverage of a fall-back match."""
        p = self.patterns
        if token in p.state_tokens or token.isdigit() or is_marker_token(token):
            return 0.25
        if token in p.identity_tokens:
            return 2.0
        if token in self.heads:
            return 1.0
        if token in _LOCATION or (len(token) >= 5 and token.endswith(_ADJ_SUFFIXES) and token not in _NOT_ADJECTIVES):
            return 0.5
        if token not in self.idf:
            if token in gene_symbols():
                return 0.25  # a marker gene in a cluster name: "Astro Aqp4", "Endo Cldn5"
            return 2.0  # a word the ontology does not know may change what the cell is
        return 1.0

    def _pick(self, entries: Iterable[_Entry], tokens: frozenset[str] | None = None) -> _Entry | None:
        """The best entry; ``None`` when two different terms tie (ambiguous)."""
        best: dict[str, tuple[tuple[int, int, int, int], _Entry]] = {}
        for e in entries:
            k = e.key(tokens)
            if e.term_id not in best or k < best[e.term_id][0]:
                best[e.term_id] = (k, e)
        ranked = sorted(best.values(), key=lambda x: (x[0], x[1].term_id))
        if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
            # two terms with the very same label are the same concept: take the first id; a tie between
            # synonyms or aliases of different terms is ambiguous
            if ranked[0][1].kind != "label":
                return None
        return ranked[0][1]

    def canonical(self, norm: str) -> str:
        """Glue prefixes, expand abbreviations, apply the rewrites, sign bare CD markers and add implied words."""
        p = self.patterns
        abbreviations = p.abbreviations
        s = " ".join(_expand(t, abbreviations) for t in self._glue_prefixes(norm.split()))
        if self._any_rewrite.search(s):
            for rx, repl, _ in p.rewrites:
                s = rx.sub(repl, s)
        tokens = [t + "+" if _BARE_CD_RE.fullmatch(t) else t for t in s.split()]
        present = set(tokens)
        for rule in p.implied:
            if (
                present.intersection(rule["if_any"])
                and not present.intersection(rule["unless_any"])
                and not present.intersection(self.heads)  # the label already names a cell
            ):
                tokens.extend(t for t in rule["add"] if t not in present)
        return " ".join(tokens)

    def _glue_prefixes(self, tokens: list[str]) -> list[str]:
        """Join ``pre``/``pro`` to the next word when the ontology has the joined word (``pro erythroblast``)."""
        out: list[str] = []
        i = 0
        while i < len(tokens):
            t = tokens[i]
            if t in _PREFIXES and i + 1 < len(tokens) and t + tokens[i + 1] in self.idf:
                out.append(t + tokens[i + 1])
                i += 2
            else:
                out.append(t)
                i += 1
        return out

    @staticmethod
    def _strip_number(s: str) -> str:
        tokens = s.split()
        while len(tokens) > 1 and tokens[-1].isdigit():
            if tokens[-2] in _NUMBERED:
                break
            tokens.pop()
        return " ".join(tokens)

    def _exact(self, table: dict[str, list[_Entry]], s: str) -> _Entry | None:
        entries = table.get(s)
        return self._pick(entries) if entries else None

    def _resolved(self, entry: _Entry, tier: int, score: float, note: str = "") -> Match:
        tid = entry.term_id
        notes = [n for n in (note, entry.note) if n]
        if tid not in self.index:
            current, why = self.index.resolve(tid)
            if current is None:
                return _unknown(why)
            tid = current
            notes.append(why)
        return Match(tid, tier, score, entry.norm, "; ".join(notes))

    def _abbreviation_readings(self, norm: str) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(abbreviation, reading, other CL ids)`` of each pattern-table abbreviation in a normalised label."""
        out = []
        for token in dict.fromkeys(self._glue_prefixes(norm.split())):
            full = _expand(token, self.patterns.abbreviations)
            if full != token:
                key = token if token in self.patterns.abbreviations else token[:-1]
                out.append((key, full, self._other_uses_of(key, full)))
        return out

    def _other_uses_of(self, abbreviation: str, full: str) -> tuple[str, ...]:
        """Current CL terms whose label or a synonym uses ``abbreviation`` (as an upper-case word) for another cell.

        Terms at, above or below the reading's own term are the same cell (``DC`` in "CD1c-positive DC"); terms of a
        species-specific taxonomy ("OPC-Oligo cell (Mmus)") are left out, as they are from the token tier.
        """
        cached = self._other_uses.get(abbreviation)
        if cached is not None:
            return cached
        index = self.index
        if self._upper_words is None:  # once: upper-case words of every current, non-taxonomy CL name -> term ids
            words: dict[str, set[str]] = {}
            for tid in index.term_ids:
                t = index.term(tid)
                if not _TAXON_RE.search(t["label"]):
                    for name in (t["label"], *t["synonyms"]):
                        for w in _UPPER_WORD_RE.findall(name):
                            words.setdefault(w, set()).add(tid)
            self._upper_words = words
        norm = self.normalize(full)
        own = self._exact(self.exact_index, norm) or self._exact(self.exact_alias, norm)
        found: tuple[str, ...] = ()
        if own is not None and own.term_id in index:
            mine = own.term_id
            found = tuple(
                sorted(
                    tid
                    for tid in self._upper_words.get(abbreviation.upper(), ())
                    if tid != mine and not index.is_ancestor(mine, tid) and not index.is_ancestor(tid, mine)
                )
            )
        self._other_uses[abbreviation] = found
        return found

    def _with_readings(self, match: Match, readings: list[tuple[str, str, tuple[str, ...]]]) -> Match:
        """Add to a match the abbreviations it read, when the Cell Ontology uses them for other cells too."""
        others = [(a, full, ids) for a, full, ids in readings if ids and match.term_id not in ids]
        if not others:
            return match
        notes = [match.note] if match.note else []
        alternatives: list[str] = []
        for abbreviation, full, ids in others:
            shown = ", ".join(f"{self.index.name(i)} ({i})" for i in ids[:3]) + (
                f" and {len(ids) - 3} more" if len(ids) > 3 else ""
            )
            notes.append(
                f"read {abbreviation.upper()!r} as {full!r} (pattern table); the Cell Ontology also uses "
                f"{abbreviation.upper()!r} for {shown}"
            )
            alternatives.extend(i for i in ids if i not in alternatives)
        return Match(match.term_id, match.tier, match.score, match.matched, "; ".join(notes), tuple(alternatives))

    # ------------------------------------------------------------------ the tiers
    def match(self, label: object) -> Match:
        """Match one label."""
        raw = "" if label is None else str(label).strip()
        if not raw:
            return _unknown("empty label")
        m = _ID_RE.fullmatch(raw)
        if m:
            tid = f"CL:{m.group(1)}"
            current, why = self.index.resolve(tid)
            if current is None:
                return _unknown(why)
            return Match(current, TIER_EXACT, SCORE_ID, tid, why or "Cell Ontology id")
        s0 = self.normalize(raw)
        if not any(ch.isalpha() for ch in s0):
            return _unknown("no words in the label")
        entry = self._exact(self.exact_user, s0)
        if entry is not None:  # the user's own entries win over everything
            return self._resolved(entry, TIER_PATTERN, SCORE_USER)
        # an exact Cell Ontology name wins over the words that mark a label as no cell type: "D1/D2-hybrid medium
        # spiny neuron" and "hybrid osteochondral skeletal cell" are CL terms, not hybrids of two clusters
        entry = self._exact(self.exact_index, s0)
        if entry is not None:
            score = {"label": SCORE_LABEL, "synonym": SCORE_SYNONYM}.get(entry.kind, SCORE_OBSOLETE)
            return self._resolved(entry, TIER_EXACT, score, f"exact {entry.kind}")
        tokens0 = s0.split()
        rejected = self.patterns.reject_tokens.intersection(tokens0)
        if rejected:
            return _unknown(f"not a cell type ({sorted(rejected)[0]!r})")
        for phrase in self.patterns.reject_phrases:
            if f" {phrase} " in f" {s0} ":
                return _unknown(f"not a cell type ({phrase!r})")
        union = self._union(raw)
        if union is not None:
            return union
        entry = self._exact(self.exact_alias, s0)
        if entry is not None:
            return self._resolved(entry, TIER_PATTERN, SCORE_ALIAS, "pattern table")

        readings = self._abbreviation_readings(s0)
        c1 = self.canonical(s0)
        stripped = self._strip_number(c1)
        candidates = []
        for c in (c1, stripped):
            candidates.append(c)
            if c.split()[-1] != "cell":
                candidates.append(c + " cell")
        seen = {s0}
        for c in candidates:
            if c in seen:
                continue
            seen.add(c)
            for table, kind in (
                (self.exact_user, "user index"),
                (self.exact_alias, "pattern table"),
                (self.exact_index, ""),
            ):
                entry = self._exact(table, c)
                if entry is not None:
                    what = kind or f"{entry.kind} after canonicalisation"
                    found = self._resolved(entry, TIER_PATTERN, SCORE_CANONICAL, f"{what} ({c!r})")
                    return self._with_readings(found, readings)

        ordered = [t for t in stripped.split() if t not in STOP]
        tokens = frozenset(ordered)
        if not tokens:
            return _unknown("no words left after canonicalisation")
        found = self._token_match(tokens, ordered, stripped)
        if found is not None and found.term_id is not None:
            return self._with_readings(found, readings)
        similar = self._similarity(tokens)
        if similar is not None and similar.term_id is not None:
            return self._with_readings(similar, readings)
        best = max((x for x in (found, similar) if x is not None), key=lambda x: x.score, default=None)
        return best if best is not None else _unknown("no Cell Ontology term fits")

    def _token_match(self, tokens: frozenset[str], ordered: list[str], stripped: str) -> Match | None:
        entries = self.by_core.get(tokens)
        if entries:
            entry = self._pick(entries, tokens)
            if entry is not None:
                return self._resolved(entry, TIER_TOKEN, SCORE_TOKEN, "same words")
        weights = self.weights(ordered)
        total = sum(weights[t] for t in tokens)
        items = sorted(t for t in tokens if t in self.idf)  # words in no ontology name are in no subset
        n = len(items)
        if n < 1 or (n == 1 and len(tokens) == 1):
            return None
        lowest = 1 if n <= 10 else n - 3
        head = self._head_noun(stripped.split())
        candidates: list[tuple[float, _Entry, frozenset[str]]] = []
        for r in range(min(n, len(tokens) - 1), lowest - 1, -1):
            for subset in combinations(items, r):
                key = frozenset(subset)
                entries = self.by_core.get(key)
                if not entries:
                    continue
                left = tokens - key
                if head in left or left & self.heads or any(self._names_a_cell(t) for t in left):
                    continue
                entry = self._pick(entries, key)
                if entry is None or _contradicts(left, entry.full | self.label_words.get(entry.term_id, frozenset())):
                    continue
                coverage = sum(weights[t] for t in key) / total
                candidates.append((coverage, entry, left))
        if not candidates:
            return None
        candidates.sort(key=lambda c: (-c[0], c[1].key(), c[1].term_id))
        coverage, entry, left = candidates[0]
        rivals = {
            c[1].term_id
            for c in candidates[1:]
            if abs(c[0] - coverage) < 1e-9
            and c[1].term_id != entry.term_id
            and not self.index.is_ancestor(c[1].term_id, entry.term_id)
        }
        score = SCORE_TOKEN * math.sqrt(coverage)
        if rivals:
            return _unknown(f"ambiguous: {entry.term_id} or {sorted(rivals)[0]}", score)
        dropped = ", ".join(sorted(left))
        return self._resolved(entry, TIER_TOKEN, score, f"fell back to parent term (dropped: {dropped})")

    def _head_noun(self, ordered: list[str]) -> str | None:
        """The label's last word when it is a noun that says what the label names, else ``None``.

        In ``Lymphoid follicle``, ``Blood vessels``, ``T cell zone`` the last word names a structure, not a cell: a
        fall-back that drops it would map a place to a cell type. A last word that only qualifies (a state, a marker, a
        gene, a number, an adjective: ``Basal resting``, ``Goblet (nasal)``) is no such noun.
        """
        before_of = ordered[: ordered.index("of")] if "of" in ordered else ordered  # "stromal cell of ovary"
        words = [t for t in before_of if t not in STOP]
        last = words[-1] if words else ""
        p = self.patterns
        # _ROMAN: cluster numbers ("Fibroblast III")
        if len(last) < 3 or not last.isalpha() or last in _ROMAN or last in _TAXON_WORDS:
            return None
        if last in p.state_tokens or last in p.identity_tokens:  # these have their own weights
            return None
        if last in _LOCATION or self.weight(last) >= 1.0:
            return last
        return None

    def _names_a_cell(self, token: str) -> bool:
        """Whether a word, alone, names a cell type once abbreviations and rewrites apply.

        ``pvalb`` -> pvalb GABAergic interneuron: such a word left over by a fall-back names another cell type, like a
        one-word CL name does, so the fall-back is not taken ("Pvalb Th Sst" is not a helper T cell).
        """
        known = self._cell_words.get(token)
        if known is None:
            c = self.canonical(token)
            known = c != token and (c in self.exact_alias or c in self.exact_index or c in self.exact_user)
            self._cell_words[token] = known
        return known

    def _similarity(self, tokens: frozenset[str]) -> Match | None:
        # candidates: names whose key noun is in the label, and the one term (if any) whose names hold all the
        # label's words ("Lamp5 Lhx6" -> "Lamp5 Lhx6 neuron")
        pools: list[list[_Entry]] = [self.by_head[t] for t in tokens if t in self.by_head]
        unique = None
        content = [t for t in tokens if self.weight(t) > 0.25]
        if content:
            sets = sorted((self.terms_with.get(t, frozenset()) for t in content), key=len)
            ids = sets[0].intersection(*sets[1:]) if sets[0] else frozenset()
            if len(ids) == 1:
                tid = next(iter(ids))
                own = [e for e in self.by_term[tid] if set(content) <= e.core]
                if own:
                    unique = tid
                    pools.append(sorted(own, key=lambda e: e.weight))
        idf = self.idf
        default = self._max_idf
        w_tokens = sum(idf.get(t, default) for t in tokens)
        best: list[tuple[float, _Entry]] = []
        top = -1.0
        heads = self.heads
        for pool in pools:  # each pool is sorted by the weight of its names: the bound below only decreases
            for entry in pool:
                wc = entry.weight
                if w_tokens < wc * (top - 1e-9):  # this and all later (heavier) names cannot reach the best overlap
                    break
                if wc < 0.5 * w_tokens * (top - 1e-9):  # too light to reach it
                    continue
                if entry.term_id != unique and ((tokens - entry.full) & heads or (entry.core - tokens) & _ORGAN):
                    continue  # a word of the label names another cell; or the name adds an organ the label lacks
                if _contradicts(tokens, entry.full):
                    continue
                where = entry.where  # words of the "of <place>" part weigh half
                common = tokens & entry.core
                shared = sum(idf.get(t, default) * (0.5 if t in where else 1.0) for t in common)
                outside = w_tokens - sum(idf.get(t, default) for t in common)
                overlap = shared / (outside + entry.weight)
                top = max(top, overlap)
                best.append((overlap, entry))
        if not best:
            return None
        best.sort(key=lambda c: (-c[0], c[1].key(), c[1].term_id))
        overlap, entry = best[0]
        score = SCORE_SIMILARITY * overlap
        rivals = {c[1].term_id for c in best[1:] if abs(c[0] - overlap) < 1e-9 and c[1].term_id != entry.term_id}
        if rivals:
            return _unknown(f"ambiguous: {entry.term_id} or {sorted(rivals)[0]}", score)
        return self._resolved(entry, TIER_SIMILARITY, score, f"word overlap {overlap:.2f}")

    def _union(self, raw: str) -> Match | None:
        if not _UNION_SEP_RE.search(raw) or raw.lower() in self.slash_aliases:
            return None
        parts = []
        start = 0
        for m in _UNION_SEP_RE.finditer(raw):
            left = raw[: m.start()].rstrip(" _")
            right = raw[m.end() :].lstrip(" _")
            if not (left[-1:].isalpha() and right[:1].isalpha()):
                return None
            parts.append(raw[start : m.start()])
            start = m.end()
        parts.append(raw[start:])
        parts = [p.strip(" _") for p in parts]
        if any(not any(ch.isalpha() for ch in p) for p in parts):
            return None
        matches = [self.match(p) for p in parts]
        ids = [m.term_id for m in matches]
        joined = " and ".join(repr(p) for p in parts)
        if any(i is None for i in ids):
            return _unknown(f"joins {joined}, not all of which are cell types")
        unique: list[str] = list(dict.fromkeys(ids))  # type: ignore[arg-type]
        score = min(m.score for m in matches)
        tier = max(m.tier for m in matches)
        if len(unique) == 1:
            return Match(unique[0], tier, score, "", f"joins {joined}")
        common = frozenset.intersection(*(self.index.ancestors(i) | {i} for i in unique))
        depth = {c: len(self.index.ancestors(c)) for c in common if c not in _GENERIC and c in self.index}
        deepest = [c for c, d in depth.items() if d >= 2 and d == max(depth.values())]
        if len(deepest) != 1:
            names = [self.index.name(i) for i in unique]
            return _unknown(f"joins different cell types with no specific common term: {names}")
        return Match(deepest[0], tier, score * 0.9, "", f"joins {joined}: their closest common term")
