"""The shipped UPOS tagger: the two-pass perceptron and the convolutional nets, voting.

The two learn different things from the same treebank: the perceptron sparse conjunctions
of words, affixes and neighbouring tags, the nets dense views of characters and a four-word
window either side. On UD English EWT test the vote makes 13-14 % fewer errors than the
perceptron alone and 2-4 % fewer than the nets alone (``TAGGER_NOTICE.md``). The
perceptron's scores are turned into probabilities by a softmax at ``temperature``; its weight
and the temperature were chosen on dev, with models trained on train only.

For a word its tag dictionary settles (frequent words nearly always one tag: "the", ",") the
perceptron is sure: all its weight goes to that tag, which the nets overrule only when they are
sure of another (on dev, overruling nothing cost 0.07 points).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .conv_tagger import ConvTagger
from .upos_tagger import TwoPassTagger

__all__ = ["UposEnsemble"]


class UposEnsemble:
    """UPOS tagger: ``tag(words) -> [(word, tag), ...]``, nltk's tagger interface."""

    def __init__(self, perceptron: TwoPassTagger, conv: ConvTagger, perceptron_weight: float = 0.4,
                 temperature: float = 12.0) -> None:
        if set(perceptron.second.classes) != set(conv.vocab.tags):
            raise ValueError("UposEnsemble: the perceptron and the nets must know the same tags, got "
                             f"{sorted(perceptron.second.classes)} and {sorted(conv.vocab.tags)}")
        if not 0.0 <= perceptron_weight <= 1.0:
            raise ValueError(f"UposEnsemble: perceptron_weight={perceptron_weight} must be in [0, 1]")
        if temperature <= 0:
            raise ValueError(f"UposEnsemble: temperature={temperature} must be > 0")
        self.perceptron = perceptron
        self.conv = conv
        self.perceptron_weight = perceptron_weight
        self.temperature = temperature

    def noun_reading(self, word: str) -> bool:
        """Whether the treebank saw ``word`` as a NOUN at least as often as a VERB or ADJ."""
        return self.perceptron.noun_reading(word)

    def tag(self, tokens: Sequence[str]) -> list[tuple[str, str]]:
        """Tag one sentence (a list of words)."""
        tokens = list(tokens)
        if not tokens:
            return []
        names = self.conv.vocab.tags
        tags, scores = self.perceptron.tag_scores(tokens)
        open_words = [i for i, word_scores in enumerate(scores) if word_scores is not None]
        perceptron = np.zeros((len(tokens), len(names)))
        # a tag-dictionary word: the perceptron is sure of its tag
        perceptron[np.arange(len(tokens)), [names.index(tag) for tag in tags]] = 1.0
        if open_words:
            logits = np.array([[scores[i].get(t, 0.0) for t in names] for i in open_words]) / self.temperature
            odds = np.exp(logits - logits.max(-1, keepdims=True))
            perceptron[open_words] = odds / odds.sum(-1, keepdims=True)
        w = self.perceptron_weight
        votes = w * perceptron + (1.0 - w) * self.conv.probabilities([tokens])[0].numpy()
        return [(word, names[best]) for word, best in zip(tokens, votes.argmax(-1).tolist(), strict=True)]
