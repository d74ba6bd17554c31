"""Literal mentions of a tag (name or alias) in the text: a cheap signal added to the cosine.

Small encoders miss rare or technical tag words that appear verbatim in the content
("pretzels", "sous-vide", "钓鱼"). Measured on StackExchange cooking (docs/EXPERIMENTS.md), adding
a fixed boost for a literal mention lifts recall@10 by several points with no labels used.

Matching is by dictionary lookup, not by one regex per tag, so it stays cheap at 40k tags:
Latin text is split into words and word n-grams (up to the longest term's word count) are
looked up; CJK text has no spaces, so every substring of up to `max_cjk` characters starting
at a CJK character is looked up.

With `stem=True` Latin words are also matched by their Snowball (English) stems, so
"substitutions" is found in "can I substitute…" and "frying" in "fried": on StackExchange
cooking that lifts recall@10 by about a point, and by one more with `--adapt`, whose lexical
prototypes come from these matches (docs/EXPERIMENTS.md). CJK terms are matched as before.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from collections.abc import Iterable, Sequence

import snowballstemmer

_PUNCT = re.compile(r"[\s\-_/\\|.,;:!?\"'`()\[\]{}<>#@&*+=~^%$、，。！？；：“”‘’（）【】《》·…]+")
_WORD = re.compile(r"[0-9a-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff]+")


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # kana
        or 0x3400 <= o <= 0x4DBF
        or 0x4E00 <= o <= 0x9FFF
        or 0xAC00 <= o <= 0xD7AF  # hangul
        or 0xF900 <= o <= 0xFAFF
    )


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation and separators to single spaces."""
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


_local = threading.local()


@functools.lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    # word frequencies are Zipfian: the cache answers nearly every lookup of a stream. A
    # Snowball stemmer keeps its state in the object, so each thread has its own (the LLM
    # workers map free proposals with `lookup` while the batch loop runs `match`).
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = snowballstemmer.stemmer("english")
    stem: str = stemmer.stemWord(word)
    return stem


def stem_key(text: str) -> str:
    """The space-joined stems of a normalised Latin term ("" when it has CJK or no word)."""
    if any(_is_cjk(c) for c in text):
        return ""
    return " ".join(_stem(w) for w in _WORD.findall(text))


def _variants(term: str) -> set[str]:
    """A term and its simple English singular/plural forms (no stemmer dependency)."""
    out = {term}
    if not term or _is_cjk(term[-1]) or not term[-1].isalpha():
        return out
    if term.endswith("ies") and len(term) > 4:
        out.add(term[:-3] + "y")
    elif term.endswith("es") and len(term) > 3:
        out.update({term[:-2], term[:-1]})
    elif term.endswith("s") and not term.endswith("ss") and len(term) > 3:
        out.add(term[:-1])
    else:
        out.add(term + ("es" if term.endswith(("s", "x", "ch", "sh")) else "s"))
        if term.endswith("y") and len(term) > 2 and term[-2] not in "aeiou":
            out.add(term[:-1] + "ies")
    return out


class Lexicon:
    def __init__(
        self, terms: Sequence[Iterable[str]], *, max_cjk: int = 12, stem: bool = False
    ) -> None:
        """`terms[i]` are the surface forms of tag i (name and aliases); `stem` also matches
        Latin words by their stems."""
        self.index: dict[str, list[int]] = {}
        self.stem_index: dict[str, list[int]] = {}
        self.max_stem_words = 0
        # every proper prefix of a CJK-bearing term: a substring that is no prefix of any
        # term cannot grow into one, so the scan stops there (a trie's pruning, as a set)
        self._prefixes: set[str] = set()
        self.max_words = 1
        self.max_cjk = 1
        for i, forms in enumerate(terms):
            for raw in forms:
                t = normalise(raw)
                if len(t) < 2 and not (t and _is_cjk(t[0])):
                    continue  # one Latin letter matches everything
                for v in _variants(t):
                    hits = self.index.setdefault(v, [])
                    if not hits or hits[-1] != i:
                        hits.append(i)
                    if any(_is_cjk(c) for c in v):
                        self.max_cjk = min(max_cjk, max(self.max_cjk, len(v)))
                        self._prefixes.update(v[:n] for n in range(1, len(v)))
                    else:
                        self.max_words = max(self.max_words, v.count(" ") + 1)
                key = stem_key(t) if stem else ""
                if len(key) >= 2:
                    hits = self.stem_index.setdefault(key, [])
                    if not hits or hits[-1] != i:
                        hits.append(i)
                    self.max_stem_words = max(self.max_stem_words, key.count(" ") + 1)

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, term: str) -> list[int]:
        """The tags one whole term names (after normalisation; else by stems), best first."""
        t = normalise(term)
        hits = self.index.get(t)
        if hits is None and self.stem_index:
            hits = self.stem_index.get(stem_key(t))
        return list(hits or ())

    def match(self, text: str, *, max_chars: int = 1000) -> set[int]:
        """Indices of the tags mentioned in `text` (first `max_chars` characters)."""
        t = normalise(text[:max_chars])
        found: set[int] = set()
        idx, prefixes = self.index, self._prefixes
        words = _WORD.findall(t)
        for n in range(1, self.max_words + 1):
            for s in range(len(words) - n + 1):
                hit = idx.get(" ".join(words[s : s + n]))
                if hit:
                    found.update(hit)
        if self.max_stem_words:
            stems = [_stem(w) for w in words]
            sidx = self.stem_index
            for n in range(1, self.max_stem_words + 1):
                for s in range(len(stems) - n + 1):
                    hit = sidx.get(" ".join(stems[s : s + n]))
                    if hit:
                        found.update(hit)
        if self.max_cjk > 1 or any(_is_cjk(c) for c in t[:64]):
            n = len(t)
            for s in range(n):
                word_start = t[s].isalnum() and (s == 0 or not t[s - 1].isalnum())
                if not (_is_cjk(t[s]) or word_start):
                    continue
                for e in range(s + 1, min(n, s + self.max_cjk) + 1):
                    sub = t[s:e]
                    hit = idx.get(sub)
                    if hit:
                        found.update(hit)
                    if sub not in prefixes:
                        break
        return found
