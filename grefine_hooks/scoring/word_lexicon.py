"""What a large English corpus says about a word, for the UPOS tagger: its word cluster, how it is
usually capitalised, how common it is, and the parts of speech WordNet gives it.

The treebank the tagger learns from has 250,000 words; prompts use words it never saw, and are
often written all in lower case, which hides the capital letter that marks a proper noun. The
lexicon (``grefine_hooks/data/word_lexicon.tsv.gz``, 210,000 words, from spaCy's lookup tables,
``scripts/build_word_lexicon.py``, ``TAGGER_NOTICE.md``) fills both gaps: "astronaut" shares a
Brown cluster with words the treebank did see, and "paris" is the word usually written "Paris".
"""

from __future__ import annotations

import gzip
import hashlib
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["WordFacts", "WordLexicon"]


class WordFacts(NamedTuple):
    """One lower-cased word's line of the lexicon (empty strings and ``None`` where it says nothing)."""

    cluster: str  #: Brown cluster bits of the lower-case form
    cluster_capitalised: str  #: ... and of the Capitalised form
    logp_lower: float | None  #: natural-log frequency of the lower-case form
    logp_capitalised: float | None
    logp_upper: float | None
    wordnet: str  #: WordNet's parts of speech: letters of "anrv"

    @property
    def case_class(self) -> str:
        """How the corpus writes the word: only Capitalised, only lower-case, or the log-ratio of
        Capitalised to lower-case (clipped to +-4). Unchanged by lower-casing the prompt."""
        low, cap = self.logp_lower, self.logp_capitalised
        if low is None and cap is None:
            return "none"
        if low is None:
            return "caponly"
        if cap is None:
            return "lowonly"
        return f"r{max(-4, min(4, round(cap - low)))}"


_NOTHING = WordFacts("", "", None, None, None, "")


def _float(text: str) -> float | None:
    return float(text) if text else None


class WordLexicon:
    """Lower-cased word -> :class:`WordFacts`, and the tagger features they give."""

    def __init__(self, lines: dict[str, str], digest: str) -> None:
        #: lower-cased word -> the rest of its line, parsed when asked (loading is one split per
        #: line, and most words are never asked for)
        self.lines = lines
        #: sha256 of the lexicon's text: a tagger file names the lexicon its weights were learnt with
        self.digest = digest
        self._features: dict[str, list[str]] = {}

    @classmethod
    def load(cls, source: Traversable) -> WordLexicon:
        """Read a ``word_lexicon.tsv.gz`` written by ``scripts/build_word_lexicon.py``."""
        with source.open("rb") as raw:
            data = gzip.decompress(raw.read())
        lines = dict(line.split("\t", 1) for line in data.decode("utf-8").split("\n")
                     if line and not line.startswith("#"))
        return cls(lines, "sha256:" + hashlib.sha256(data).hexdigest()[:16])

    def check(self, recorded: object) -> None:
        """Refuse a tagger file whose weights were learnt with another lexicon (``recorded``, the
        digest the file names): its features would silently mean something else."""
        if recorded != self.digest:
            raise ValueError(f"tagger file: learnt with word lexicon {recorded!r}, given {self.digest!r}")

    def get(self, word: str) -> WordFacts:
        """The lexicon's facts about ``word`` (any case); nothing known is all empty."""
        line = self.lines.get(word.lower())
        if line is None:
            return _NOTHING
        c_low, c_cap, p_low, p_cap, p_up, wordnet = line.split("\t")
        return WordFacts(c_low, c_cap, _float(p_low), _float(p_cap), _float(p_up), wordnet)

    def cluster(self, word: str) -> str:
        """The cluster of ``word`` as written: the Capitalised form's for a capitalised word."""
        facts = self.get(word)
        if word[:1].isupper():
            return facts.cluster_capitalised or facts.cluster or "none"
        return facts.cluster or facts.cluster_capitalised or "none"

    def features(self, word: str) -> list[str]:
        """The tagger's features of one word (the same in any case; cached: prompts repeat words)."""
        key = word.lower()
        cached = self._features.get(key)
        if cached is not None:
            return cached
        facts = self.get(word)
        logps = [p for p in (facts.logp_lower, facts.logp_capitalised, facts.logp_upper) if p is not None]
        out = [f"fq {int(-max(logps, default=-30.0) // 2)}", "cr " + facts.case_class,
               "wn " + (facts.wordnet or "-")]
        if facts.logp_upper is not None and (facts.logp_lower is None or facts.logp_upper > facts.logp_lower):
            out.append("upper dom")
        cap = facts.logp_capitalised
        if cap is not None and (facts.logp_lower is None or cap > facts.logp_lower + 1):
            out.append("capcl " + (facts.cluster_capitalised or "none")[:6])
        if len(self._features) < 100_000:  # bounded: a long-running service meets endless new words
            self._features[key] = out
        return out
