"""Text normalisation shared by the Cell Ontology index and the label matcher.

Both sides of a match (an author's label and a Cell Ontology name or synonym) go through :func:`normalize`, so the
rules only need to be consistent, not linguistically perfect. The rules, in order:

1. Unicode: NFKC, Greek letters spelled out (``γδ`` -> ``gamma delta``), accents dropped (``naïve`` -> ``naive``).
2. Marker signs are glued to their marker: ``CD4+``, ``CD4-positive``, ``CD4 positive`` -> ``cd4+``; ``CD16-``,
   ``CD16-negative`` -> ``cd16-``, also when the next marker follows without a space (``CD4-CD8-`` ->
   ``cd4- cd8-``); ``CD56bright``, ``CD56-bright``, ``CD56hi`` -> ``cd56hi``; ``CD56dim``, ``CD11c-low``
   -> ``cd56lo``. A bare word followed by ``positive``/``negative`` is a marker only when it looks like one (it has a
   digit or starts with two capitals), so ``double negative`` stays two words.
3. Lower case; apostrophes dropped; every other punctuation mark (``_ - / , ; : ( ) [ ] . &``) becomes a space.
4. Spelling variants from the packaged pattern table (``haematopoietic`` -> ``hematopoietic``, ...).
5. Roman numerals after ``type``/``class``/``group``/``stage``/``grade``/``layer`` become digits (``type II`` ->
   ``type 2``), and a few words glued to a digit are split (``helper2`` -> ``helper 2``).
6. Plurals are reduced token by token (``cells`` -> ``cell``, ``DCs`` -> ``dc``, ``bodies`` -> ``body``; words ending
   in ``ss``, ``us``, ``is``, ``as``, ``os`` are kept).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

#: Bump when the normalisation rules change: cached indexes hold normalised names.
NORMALIZER_VERSION = 2

_GREEK = {
    "α": "alpha",
    "β": "beta",
    "γ": "gamma",
    "δ": "delta",
    "ε": "epsilon",
    "κ": "kappa",
    "λ": "lambda",
    "μ": "mu",
    "φ": "phi",
    "ϕ": "phi",
    "Φ": "phi",
    "ω": "omega",
}
_GREEK_RE = re.compile("|".join(map(re.escape, _GREEK)))

# marker-like word: has a digit, or starts with two capitals (CD4, CCL3, HLA, MT, ACTA2, BEST4)
_MARKER = r"(?:[A-Za-z][A-Za-z0-9.]*\d[A-Za-z0-9]*|[A-Z]{2}[A-Za-z0-9]*)"
_BRIGHT_RE = re.compile(r"\b([Cc][Dd]\d+[A-Za-z]?)[- ]?(bright|BRIGHT|dim|DIM|high|HIGH|hi|low|LOW|lo)\b")
_NOT_MARKER_WORDS = r"(?:double|triple|single|quadruple|Double|Triple|Single|DOUBLE|TRIPLE)"
_HYPHEN_SIGN_RE = re.compile(r"(?<![A-Za-z])(?!" + _NOT_MARKER_WORDS + r"-)(\w+)-(positive|negative|pos|neg)\b", re.I)
_SPACE_SIGN_RE = re.compile(r"\b(" + _MARKER + r")\s+(positive|negative|pos|neg)\b")
_PLUS_SPLIT_RE = re.compile(r"\+\+?(?=\w)")
# a CD marker followed by a minus glued to the next CD marker: "CD4-CD8-", "CD14-CD16+", "Lin-CD34+"
_GLUED_MINUS_RE = re.compile(r"\b([Cc][Dd]\d+[A-Za-z]?|[Ll]in|LIN)-(?=[Cc][Dd]\d)")
_TRAILING_MINUS_RE = re.compile(r"(?<=[A-Za-z0-9])-(?=$|[\s_/,;:)\]&+])")
_SEP_RE = re.compile(r"[^\w+\-]+")
_HYPHEN_RE = re.compile(r"(?<![\w+])-|-(?=[\w-])")
_APOSTROPHE_RE = re.compile(r"['’`´]")
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5", "vi": "6", "vii": "7", "viii": "8"}
_ROMAN_RE = re.compile(r"\b(type|class|group|stage|grade|layer|phase|fraction)\s+(i{1,3}|iv|vi{0,3})\b")
_GLUED_DIGIT_RE = re.compile(r"\b(helper|type|group|class|stage|layer|cluster|subtype|subset)(\d+)\b")
_KEEP_S = ("ss", "us", "is", "as", "os")

_SIGN = {"positive": "+", "pos": "+", "negative": "-", "neg": "-"}
_BRIGHT = {"bright": "hi", "high": "hi", "hi": "hi", "dim": "lo", "low": "lo", "lo": "lo"}


def _spell_greek(match: re.Match[str]) -> str:
    name = _GREEK[match.group(0)]
    return name if name == "phi" else " " + name + " "  # "Mφ" -> "mphi", "γδ" -> " gamma  delta "


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _singular(token: str) -> str:
    if len(token) < 3 or not token[-1] == "s" or token[-2] in "+-":
        return token
    if token.endswith(_KEEP_S):
        return token
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    return token[:-1]


class Normalizer:
    """Normalise free-text cell-type names; see the module docstring for the rules.

    Parameters
    ----------
    spelling
        ``(regex, replacement)`` pairs applied to the lower-cased text (spelling variants).
    """

    def __init__(self, spelling: Iterable[tuple[str, str]] = ()) -> None:
        rules = list(spelling)
        self._replacements = [r for _, r in rules]
        self._spelling = re.compile("|".join(f"(?P<r{i}>{p})" for i, (p, _) in enumerate(rules))) if rules else None

    def _spell(self, match: re.Match[str]) -> str:
        return match.expand(self._replacements[int(match.lastgroup[1:])])  # type: ignore[index]

    def __call__(self, text: str) -> str:
        """Return the normalised form of ``text`` (tokens separated by single spaces)."""
        s = str(text)
        if not s.isascii():
            s = unicodedata.normalize("NFKC", s)
            s = _GREEK_RE.sub(_spell_greek, s)
            s = _strip_accents(s)
        s = s.replace("_", " ")
        low = s.lower()
        if "cd" in low:
            s = _BRIGHT_RE.sub(lambda m: m.group(1) + _BRIGHT[m.group(2).lower()], s)
        if "pos" in low or "neg" in low:
            s = _HYPHEN_SIGN_RE.sub(lambda m: m.group(1) + _SIGN[m.group(2).lower()], s)
            s = _SPACE_SIGN_RE.sub(lambda m: m.group(1) + _SIGN[m.group(2).lower()], s)
        if "+" in s:
            s = _PLUS_SPLIT_RE.sub("+ ", s).replace("++", "+")
        if "-" in s:
            s = _GLUED_MINUS_RE.sub(r"\1- ", s)
            s = _TRAILING_MINUS_RE.sub("- ", s)
        s = _SEP_RE.sub(" ", _APOSTROPHE_RE.sub("", s.lower()))
        if "-" in s:
            s = _HYPHEN_RE.sub(" ", s)
        if self._spelling is not None:
            s = self._spelling.sub(self._spell, s)
        if "typ" in s or "cla" in s or "gro" in s or "sta" in s or "gra" in s or "lay" in s or "pha" in s or "fra" in s:
            s = _ROMAN_RE.sub(lambda m: m.group(1) + " " + _ROMAN[m.group(2)], s)
            s = _GLUED_DIGIT_RE.sub(r"\1 \2", s)
        elif "help" in s or "clus" in s or "sub" in s:
            s = _GLUED_DIGIT_RE.sub(r"\1 \2", s)
        return " ".join([_singular(t) for t in s.split()])


def is_marker_token(token: str) -> bool:
    """Whether a normalised token is a marker with a sign or level (``cd4+``, ``ccl3+``, ``cd16-``, ``cd56hi``)."""
    if token.endswith(("+", "-")) and len(token) > 1:
        return True
    return bool(re.fullmatch(r"cd\d+[a-z]?(hi|lo)", token))


@lru_cache(maxsize=1)
def gene_symbols() -> frozenset[str]:
    """Human and mouse gene symbols of the packaged gene tables, lower case, as label words (plural reduced too).

    The matcher uses them to tell a marker gene in a cluster name (``Astro Aqp4``, ``Endo Cldn5``) from a word that
    may change what the cell is. Read once per process (0.1-0.4 s).
    """
    from spatialcx.pp._harmonize import load_gene_table

    out: set[str] = set()
    for species in ("homo_sapiens", "mus_musculus"):
        for symbol in load_gene_table(species).str.lower().unique():
            if len(symbol) >= 3 and re.fullmatch(r"[a-z][a-z0-9]*", symbol):
                out.add(symbol)
                out.add(_singular(symbol))
    return frozenset(out)
