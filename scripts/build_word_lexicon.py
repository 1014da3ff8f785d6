#!/usr/bin/env python
"""Write ``grefine_hooks/data/word_lexicon.tsv.gz`` from spaCy's English lookup tables (developer tool).

The UPOS tagger (:mod:`grefine_hooks.scoring.upos_tagger`) reads three things about a word that
the treebank alone cannot tell it, from the PyPI package ``spacy-lookups-data`` (MIT licence,
Explosion AI; ``pip install spacy-lookups-data==1.0.5``, the ``tagger-train`` extra):

* its Brown cluster (table ``en_lexeme_cluster``): ~190,000 words in 1,000 clusters of words
  used alike, so a word the treebank never saw ("astronaut") reads like words it did. spaCy
  stores a cluster's bit string reversed as an integer, so the bits are ``bin(n)[2:][::-1]``;
* how often it is written lower-case, Capitalised and UPPER-CASE (``en_lexeme_prob``, log
  probabilities of a million cased forms): in a lower-cased prompt "paris" is still the word
  usually written "Paris", which is what tells a proper noun from a common one;
* which parts of speech WordNet lists it as (``en_lemma_index``, through ``en_lemma_lookup``
  for inflected forms): "n", "v", "a" (adjective), "r" (adverb).

One line per lower-cased word: ``word, cluster of the lower-case form, cluster of the
Capitalised form, log-probability of the lower-case, Capitalised and UPPER-CASE forms (one
decimal), WordNet letters``, tab-separated, empty where the table has nothing. Kept: words with
a cluster in either spelling, words with a log-probability above ``--min-logprob`` in some
spelling, and WordNet's words. gzip with mtime 0, lines sorted: the same package gives a
byte-identical file.

    python scripts/build_word_lexicon.py --out grefine_hooks/data
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from importlib import resources
from pathlib import Path

LEXICON_FILE = "word_lexicon.tsv.gz"
HEADER = ("# word\tcluster\tcluster_capitalised\tlogp_lower\tlogp_capitalised\tlogp_upper\twordnet"
          " -- from spacy-lookups-data 1.0.5 (MIT, Explosion AI); see TAGGER_NOTICE.md\n")
WORDNET_LETTERS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


def read_table(name: str) -> dict:
    """One of spaCy's gzipped JSON lookup tables."""
    table = resources.files("spacy_lookups_data") / "data" / f"{name}.json.gz"
    with table.open("rb") as raw:
        return json.loads(gzip.decompress(raw.read()).decode("utf-8"))


def _bits(number: int | None) -> str:
    return bin(number)[2:][::-1] if number else ""


def _logp(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def build(min_logprob: float) -> list[str]:
    """The lexicon's lines (without the header), sorted."""
    clusters, probs = read_table("en_lexeme_cluster"), read_table("en_lexeme_prob")
    lemma_of = read_table("en_lemma_lookup")
    wordnet: dict[str, set[str]] = {}
    for pos, lemmas in read_table("en_lemma_index").items():
        for lemma in lemmas:
            wordnet.setdefault(lemma.lower(), set()).add(WORDNET_LETTERS[pos])

    keys = {w.lower() for w, n in clusters.items() if n} | set(wordnet)
    keys |= {w.lower() for w, p in probs.items() if p > min_logprob}
    lines = []
    for word in keys:
        if not word or any(ch in word for ch in "\t\n\r ") or word.startswith("#"):
            continue
        cap, upper = word.capitalize(), word.upper()
        letters = wordnet.get(word, set()) | wordnet.get(lemma_of.get(word, word).lower(), set())
        fields = [word, _bits(clusters.get(word)), _bits(clusters.get(cap)),
                  _logp(probs.get(word)), _logp(probs.get(cap)), _logp(probs.get(upper)),
                  "".join(sorted(letters))]
        lines.append("\t".join(fields))
    return sorted(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help=f"folder to write {LEXICON_FILE} into")
    parser.add_argument("--min-logprob", type=float, default=-17.0,
                        help="keep words more frequent than this in some spelling (natural log)")
    args = parser.parse_args(argv)
    lines = build(args.min_logprob)
    text = io.StringIO()
    text.write(HEADER)
    text.writelines(line + "\n" for line in lines)
    path = args.out / LEXICON_FILE
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.getvalue().encode("utf-8"))
    print(f"wrote {path}: {len(lines)} words, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
