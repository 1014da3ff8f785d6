"""A two-pass averaged-perceptron UPOS tagger (the one shipped in ``grefine_hooks/data``).

Why not nltk's ``PerceptronTagger`` as it is: its features see one word of left context
tags and short affixes only, which tops out near 94 % UPOS on UD English EWT and lower on
the lower-case fragments text-to-image prompts are written in. This tagger keeps nltk's
``AveragedPerceptron`` (the learner, unchanged) and gives it richer features in two passes:

1. left to right, with the two previous tags, the words two either side, affixes up to four
   letters and the word's shape, and what a large corpus says about the word and its
   neighbours (:mod:`.word_lexicon`: Brown cluster, usual capitalisation, frequency, WordNet's
   parts of speech), which is what carries unseen words and lower-cased proper nouns;
2. again left to right, now also seeing the *following* two tags as pass 1 guessed them.

Pass 2 is trained on pass-1 guesses made by models that did not see the sentence
(jackknifing), so at tagging time it meets the kind of errors pass 1 really makes.
Frequent unambiguous words skip both passes through a tag dictionary, as in nltk.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from nltk.tag.perceptron import AveragedPerceptron

from .word_lexicon import WordLexicon

__all__ = ["TwoPassTagger"]

TaggedSentence = Sequence[tuple[str, str]]

_START = ("-START-", "-START2-")
_END = ("-END-", "-END2-")
FORMAT = "grefine-upos-two-pass/2"


def _shape(word: str) -> str:
    """Word shape with runs collapsed: "iPhone12" -> "xXxd", "Mr." -> "Xx."."""
    out = []
    for ch in word:
        c = "X" if ch.isupper() else "x" if ch.isalpha() else "d" if ch.isdigit() else ch
        if not out or out[-1] != c:
            out.append(c)
    return "".join(out[:6])


def _norm(word: str) -> str:
    low = word.lower()
    if low.isdigit() and len(low) == 4:
        return "!YEAR"
    if low[:1].isdigit():
        return "!DIGITS"
    return low


def _word_features(words: Sequence[str], word_lexicon: WordLexicon) -> list[list[str]]:
    """The features of every position that do not depend on tags (computed once per sentence)."""
    low = [_norm(w) for w in words]
    clusters = ["S", *(word_lexicon.cluster(w) for w in words), "E"]
    facts = [["S"], *(word_lexicon.features(w) for w in words), ["E"]]
    ctx = list(_START) + low + list(_END)
    feats = []
    for i, word in enumerate(words):
        w = low[i]
        j = i + 2
        f = [
            "b", "w " + w, "s1 " + w[-1:], "s2 " + w[-2:], "s3 " + w[-3:], "s4 " + w[-4:],
            "p1 " + w[:1], "p2 " + w[:2], "p3 " + w[:3], "sh " + _shape(word),
            "w-1 " + ctx[j - 1], "w-2 " + ctx[j - 2], "w+1 " + ctx[j + 1], "w+2 " + ctx[j + 2],
            "s-1 " + ctx[j - 1][-3:], "s+1 " + ctx[j + 1][-3:],
            "ww-1 " + ctx[j - 1] + " " + w, "ww+1 " + w + " " + ctx[j + 1],
            "ww+2 " + ctx[j + 1] + " " + ctx[j + 2],
        ]
        if word != w:
            f.append("W " + word)
        if word[:1].isupper():
            f.append("cap first" if i == 0 else "cap")
        if "-" in word:
            f.append("hyphen")
        c, left, right = clusters[i + 1], clusters[i], clusters[i + 2]
        f += ["c4 " + c[:4], "c6 " + c[:6], "c10 " + c[:10], "c " + c,
              "c-1 " + left[:6], "c+1 " + right[:6], "c-1 " + left, "c+1 " + right]
        f += facts[i + 1]
        f += ["L-1 " + x for x in facts[i][:3]] + ["L+1 " + x for x in facts[i + 2][:3]]
        feats.append(f)
    return feats


def _tag_features(base: list[str], i: int, w: str, left: Sequence[str],
                  right: Sequence[str] | None) -> list[str]:
    p1, p2 = left[i + 1], left[i]  # left is padded with two start tags
    f = base + ["t-1 " + p1, "t-2 " + p2, "tt " + p2 + " " + p1, "tw " + p1 + " " + w]
    if right is not None:
        n0, n1, n2 = right[i], right[i + 1], right[i + 2]
        f += ["t0 " + n0, "t0w " + n0 + " " + w, "t+1 " + n1, "t+2 " + n2, "t+1+2 " + n1 + " " + n2, "t-1+1 " + p1 + " " + n1,
              "wt+1 " + w + " " + n1]
    return f


def _scores(model: AveragedPerceptron, features: list[str]) -> dict[str, float]:
    """Every class's score (a class no feature votes for is missing: 0). Tagging a prompt is
    mostly this loop: ``model.predict`` without its dict of feature values."""
    scores: dict[str, float] = defaultdict(float)
    weights = model.weights
    for feature in features:
        for tag, weight in weights.get(feature, {}).items():
            scores[tag] += weight
    return scores


def _best(model: AveragedPerceptron, scores: dict[str, float]) -> str:
    """``model.predict``'s tag: the highest score over all classes, ties by name."""
    return max(model.classes, key=lambda tag: (scores.get(tag, 0.0), tag))


def _features_dict(feats: list[str]) -> dict[str, int]:
    return dict.fromkeys(feats, 1)


class TwoPassTagger:
    """UPOS tagger: ``tag(words) -> [(word, tag), ...]``, nltk's tagger interface."""

    def __init__(self, first: AveragedPerceptron, second: AveragedPerceptron, tagdict: dict[str, str],
                 word_lexicon: WordLexicon, lexicon: dict[str, dict[str, int]] | None = None) -> None:
        self.first = first
        self.second = second
        self.tagdict = tagdict
        self.word_lexicon = word_lexicon
        #: lower-cased word -> {UPOS: count} in the training data, for NOUN/VERB/ADJ readings:
        #: lets the prompt tree ask whether a word the tagger read as a verb is usually a noun.
        self.lexicon = lexicon or {}

    def noun_reading(self, word: str) -> bool:
        """Whether the training data saw ``word`` as a NOUN at least as often as as a VERB or ADJ."""
        counts = self.lexicon.get(word.lower(), {})
        noun = counts.get("NOUN", 0)
        return noun > 0 and noun >= max(counts.get("VERB", 0), counts.get("ADJ", 0))

    # --------------------------------------------------------------- tagging

    def tag(self, tokens: list[str]) -> list[tuple[str, str]]:
        """Tag one sentence (a list of words)."""
        return list(zip(tokens, self.tag_scores(tokens)[0]))

    def tag_scores(self, tokens: Sequence[str]) -> tuple[list[str], list[dict[str, float] | None]]:
        """The tags of one sentence, and pass 2's score of every class for each word (None for a
        word the tag dictionary settles): what an ensemble weighs against other taggers."""
        base = _word_features(tokens, self.word_lexicon)  # shared by both passes
        guesses = self._pass(self.first, tokens, base, None)
        scores: list[dict[str, float] | None] = []
        return self._pass(self.second, tokens, base, [*guesses, *_END], scores), scores

    def _pass(self, model: AveragedPerceptron, words: Sequence[str], base: list[list[str]],
              right: Sequence[str] | None, scores_out: list[dict[str, float] | None] | None = None) -> list[str]:
        left = list(_START)
        for i, word in enumerate(words):
            tag = self.tagdict.get(word)
            scores = None
            if tag is None:
                scores = _scores(model, _tag_features(base[i], i, _norm(word), left, right))
                tag = _best(model, scores)
            if scores_out is not None:
                scores_out.append(scores)
            left.append(tag)
        return left[2:]

    # -------------------------------------------------------------- training

    @classmethod
    def train(cls, sentences: Sequence[TaggedSentence], word_lexicon: WordLexicon, iterations: int = 8,
              folds: int = 4, seed: int = 1234, log=print) -> TwoPassTagger:
        """Train both passes; pass 2 learns from jackknifed pass-1 guesses (``folds`` of them)."""
        sentences = [list(s) for s in sentences]
        tagdict = _make_tagdict(sentences)
        classes = sorted({t for s in sentences for _, t in s})
        rng = random.Random(seed)

        log(f"pass 1 on all {len(sentences)} sentences")
        first = _train_pass(sentences, None, tagdict, word_lexicon, classes, iterations, rng, log)
        guesses: list[list[str] | None] = [None] * len(sentences)
        order = list(range(len(sentences)))
        rng.shuffle(order)
        for k in range(folds):
            held = set(order[k::folds])
            log(f"jackknife fold {k + 1}/{folds}")
            model = _train_pass([s for n, s in enumerate(sentences) if n not in held], None,
                                tagdict, word_lexicon, classes, iterations, rng, log)
            tagger = cls(model, model, tagdict, word_lexicon)
            for n in held:
                words = [w for w, _ in sentences[n]]
                guesses[n] = tagger._pass(model, words, _word_features(words, word_lexicon), None)
        log("pass 2")
        second = _train_pass(sentences, guesses, tagdict, word_lexicon, classes, iterations, rng, log)
        return cls(first, second, tagdict, word_lexicon, make_lexicon(sentences))

    # ---------------------------------------------------------- serialising

    def to_json(self) -> str:
        """Compact, key-sorted JSON (the same model gives a byte-identical file)."""
        payload = {
            "format": FORMAT,
            "classes": sorted(self.first.classes),
            "tagdict": self.tagdict,
            "lexicon": self.lexicon,
            "word_lexicon": self.word_lexicon.digest,
            "first": self.first.weights,
            "second": self.second.weights,
        }
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, word_lexicon: WordLexicon) -> TwoPassTagger:
        """Rebuild a tagger written by :meth:`to_json`, with the word lexicon it was trained with.

        A file of another format, or a lexicon other than the one the weights were learnt with
        (its digest differs), is a ValueError: the features would silently mean something else.
        """
        payload = json.loads(text)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"tagger file: expected format {FORMAT!r}")
        word_lexicon.check(payload.get("word_lexicon"))
        classes = set(payload["classes"])
        return cls(_model(payload["first"], classes), _model(payload["second"], classes),
                   payload["tagdict"], word_lexicon, payload.get("lexicon"))

    def prune(self, threshold: float) -> int:
        """Drop weights with ``|w| < threshold`` from both passes; return how many went."""
        return _prune(self.first, threshold) + _prune(self.second, threshold)


def _model(weights: dict[str, dict[str, float]], classes: set[str]) -> AveragedPerceptron:
    model = AveragedPerceptron()
    model.weights = weights
    model.classes = classes
    return model


def _prune(model: AveragedPerceptron, threshold: float) -> int:
    removed, kept = 0, {}
    for feature, weights in model.weights.items():
        strong = {t: round(w, 3) for t, w in weights.items() if abs(w) >= threshold}
        removed += len(weights) - len(strong)
        if strong:
            kept[feature] = strong
    model.weights = kept
    return removed


def make_lexicon(sentences: Iterable[TaggedSentence]) -> dict[str, dict[str, int]]:
    """Lower-cased word -> counts of its NOUN, VERB and ADJ readings (words never a NOUN left out)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for sent in sentences:
        for word, tag in sent:
            if tag in ("NOUN", "VERB", "ADJ"):
                counts[word.lower()][tag] += 1
    return {w: dict(sorted(c.items())) for w, c in sorted(counts.items()) if c["NOUN"]}


def _make_tagdict(sentences: Iterable[TaggedSentence], freq: int = 20,
                  ambiguity: float = 0.97) -> dict[str, str]:
    """Words seen at least ``freq`` times with one tag at least ``ambiguity`` of the time."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for sent in sentences:
        for word, tag in sent:
            counts[word][tag] += 1
    tagdict = {}
    for word, tags in counts.items():
        tag, n = tags.most_common(1)[0]
        total = sum(tags.values())
        if total >= freq and n / total >= ambiguity:
            tagdict[word] = tag
    return tagdict


def _train_pass(sentences: list[list[tuple[str, str]]], guesses: list[list[str] | None] | None,
                tagdict: dict[str, str], word_lexicon: WordLexicon, classes: list[str], iterations: int,
                rng: random.Random, log) -> AveragedPerceptron:
    model = AveragedPerceptron()
    model.classes = set(classes)
    prepared = []
    for n, sent in enumerate(sentences):
        words = [w for w, _ in sent]
        right = None if guesses is None else [*guesses[n], *_END]
        prepared.append((words, [t for _, t in sent], _word_features(words, word_lexicon), right))
    for it in range(iterations):
        correct = total = 0
        for words, tags, base, right in prepared:
            left = list(_START)
            for i, word in enumerate(words):
                guess = tagdict.get(word)
                if guess is None:
                    feats = _features_dict(_tag_features(base[i], i, _norm(word), left, right))
                    guess, _ = model.predict(feats)
                    model.update(tags[i], guess, feats)
                left.append(guess)
                correct += guess == tags[i]
                total += 1
        rng.shuffle(prepared)
        log(f"  iteration {it + 1}/{iterations}: train accuracy {correct / total:.4f}")
    model.average_weights()
    return model
