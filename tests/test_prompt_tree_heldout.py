"""The prompt tree on the held-out and sealed labelled sets, and the general rules found on them.

``tests/data/t2i`` holds three labelled sets (development, held-out, sealed; see its README):
each is held to a floor derived from its measured figure, the held-out set to the issue's
targets. The hand-written cases pin each rule found on the held-out set's misses with prompts
that are not in any set, end to end and with fixed tags, and edge prompts must never raise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from grefine_hooks.scoring import prompt_tree
from grefine_hooks.scoring.prompt_tree import parse_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent / "data" / "t2i"))
import labels  # noqa: E402


def triples(prompt, **kwargs):
    return [(p.noun, p.text, p.ancestor) for p in parse_prompt(prompt, **kwargs)]


class FixedTagger:
    """Tags from a word list, with an empty noun lexicon."""

    def __init__(self, lexicon):
        self.lexicon = lexicon

    def tag(self, tokens):
        return [(t, self.lexicon[t.lower()]) for t in tokens]

    def noun_reading(self, word):
        return False


# ------------------------------------------------------------------ the sets as a whole

# Hits and totals measured with `python benchmarks/prompt_tree.py` on the shipped tagger (see
# the README's prompt-tree section). Each floor is the measured rate less two binomial standard
# errors, SE = sqrt(p(1-p)/n) with the Agresti-Coull p = (hits+2)/(n+4), so that a set at 100 %
# still gets a non-zero margin: a change that loses more than chance on that many labels fails.
# Re-measure and update these after changing the parser or the tagger.
MEASURED = {
    ("dev", "objects"): (1347, 1350), ("dev", "binding"): (709, 712),
    ("dev", "relations"): (219, 219),
    ("heldout", "objects"): (6042, 6066), ("heldout", "binding"): (3934, 3954),
    ("heldout", "relations"): (876, 880),
    ("sealed", "objects"): (670, 694), ("sealed", "binding"): (352, 362),
    ("sealed", "relations"): (150, 168),
}
SETS = {"dev": labels.DEV_SET, "heldout": labels.HELDOUT_SET, "sealed": labels.SEALED_SET}


def floor(hits: int, total: int) -> float:
    adjusted = (hits + 2) / (total + 4)
    return hits / total - 2 * (adjusted * (1 - adjusted) / total) ** 0.5


@pytest.fixture(scope="module")
def tallies():
    return {name: labels.score(labels.load(path), parse_prompt) for name, path in SETS.items()}


def test_floor_is_measured_minus_two_standard_errors():
    assert floor(100, 100) == pytest.approx(1 - 2 * (102 / 104 * 2 / 104 / 100) ** 0.5)
    assert 0.89 < floor(95, 100) < 0.95
    assert floor(6039, 6066) > 0.99


@pytest.mark.parametrize(("name", "kind"), sorted(MEASURED))
def test_accuracy_meets_the_floor_from_the_measured_figure(tallies, name, kind):
    tally = tallies[name]
    hits, total = MEASURED[name, kind]
    assert tally.totals[kind] == total  # the set itself has not changed under the figure
    assert tally.rate(kind) >= floor(hits, total), [m for m in tally.misses if m[0] == kind][:20]


@pytest.mark.parametrize(("kind", "target"), [("objects", 0.98), ("binding", 0.97), ("relations", 0.85)])
def test_held_out_set_meets_the_issue_targets(tallies, kind, target):
    # the sealed set is held to its floors only: its non-spatial labels keep an adjective in the
    # object ("a high shelf"), which the tree rightly leaves out of the noun (see the README)
    assert tallies["heldout"].rate(kind) >= target, tallies["heldout"].misses[:20]


def test_no_prompt_of_any_set_raises(tallies):
    assert all(t.failures == [] for t in tallies.values())


def test_held_out_sets_are_apart_from_the_dev_set():
    dev = {it["prompt"].lower() for it in labels.load(labels.DEV_SET)}
    for path in (labels.HELDOUT_SET, labels.SEALED_SET):
        items = labels.load(path)
        assert not dev & {it["prompt"].lower() for it in items}
        assert {it["source"] for it in items} - {"t2i-compbench"}  # other benchmarks too
        assert len(items) >= 200
        assert all(it["objects"] for it in items)
    sources = {it["source"] for it in labels.load(labels.HELDOUT_SET)}
    assert sources == {"t2i-compbench", "cc-500", "attend-excite", "structured-diffusion", "abc-6k"}



# ------------------------------------------------- rules found on the held-out set's misses

GENERAL_RULES = [
    # number words are counts ("Seven" at a prompt's start is no name)
    ("Seven women", [("women", "Seven women", None)]),
    # a past form after a noun is its verb, not the head of a compound
    ("a key hidden by a girl", [("key", "a key", None), ("girl", "hidden by a girl", "key")]),
    ("six fish swam in the aquarium",
     [("fish", "six fish", None), ("aquarium", "swam in the aquarium", "fish")]),
    # "can" with no verb after it is the container; verb groups joined by "and" share a subject
    ("A woman is holding a paint can and redecorating a room.",
     [("woman", "A woman", None), ("paint can", "is holding a paint can", "woman"),
      ("room", "redecorating a room", "woman")]),
    # shape words are attributes, never part of the name
    ("a teardrop plum and a round bag", [("plum", "a teardrop plum", None), ("bag", "a round bag", None)]),
    # two-word names of the object vocabularies are one noun...
    ("a remote control next to a picture frame",
     [("remote control", "a remote control", None),
      ("picture frame", "next to a picture frame", "remote control")]),
    # ... unless led by a colour or material word, which stays an attribute
    ("a brown bear and a plastic bag", [("bear", "a brown bear", None), ("bag", "a plastic bag", None)]),
    # style tags and credits name no object
    ("a corgi on a beach, studio lighting, unreal engine, by greg rutkowski, masterpiece, best quality",
     [("corgi", "a corgi", None), ("beach", "on a beach", "corgi")]),
    ("a cat, in the style of van gogh", [("cat", "a cat", None)]),
    # ... but "by" before a determiner is a place
    ("a cat, by the window", [("cat", "a cat", None), ("window", "by the window", None)]),
    # a medium noun after a determiner is an object
    ("an oval picture and a rectangular frame",
     [("picture", "an oval picture", None), ("frame", "a rectangular frame", None)]),
    # "there is" and "a still life of" frame what follows
    ("there is a red car parked next to a tree",
     [("car", "a red car", None), ("tree", "parked next to a tree", "car")]),
    ("a still life of apples and a jug", [("apples", "apples", None), ("jug", "a jug", None)]),
    # a frame is one noun phrase naming the medium: here the robot paints, the portrait is an object
    ("a robot painting a portrait of a cat",
     [("robot", "a robot", None), ("portrait", "painting a portrait", "robot"),
      ("cat", "of a cat", "portrait")]),
    # a verb's coordinated objects hang under its subject; a new subject with its own verb does not
    ("a woman wearing a red dress and a black hat",
     [("woman", "a woman", None), ("dress", "wearing a red dress", "woman"),
      ("hat", "a black hat", "woman")]),
    ("a girl holding a cup and a boy holding a ball",
     [("girl", "a girl", None), ("cup", "holding a cup", "girl"), ("boy", "a boy", None),
      ("ball", "holding a ball", "boy")]),
    # binding across commas and "and": a leading "and" opens no noun phrase
    ("red apples, green pears and yellow bananas",
     [("apples", "red apples", None), ("pears", "green pears", None),
      ("bananas", "yellow bananas", None)]),
    # generator syntax is no words: emphasis brackets, attention weights, camera settings and
    # "--" parameters (a spaced "--" is a dash and still splits)
    ("(a red fox:1.3) in a [snowy forest], f/1.8, 16:9 --ar 16:9 --v 5",
     [("fox", "a red fox", None), ("forest", "in a snowy forest", "fox")]),
    ("a cat -- a dog", [("cat", "a cat", None), ("dog", "a dog", None)]),
    ("close up portrait photo of a woman", [("woman", "a woman", None)]),
    # capitals, framing and trailing style tags
    ("A PHOTO OF A DOG RIGHT OF A TEDDY BEAR",
     [("DOG", "A DOG", None), ("TEDDY BEAR", "RIGHT OF A TEDDY BEAR", "DOG")]),
    ("An oil painting of three red apples below a wine glass, 4k, trending on artstation",
     [("apples", "three red apples", None), ("wine glass", "below a wine glass", "apples")]),
]


@pytest.mark.parametrize(("prompt", "expected"), GENERAL_RULES, ids=[p for p, _ in GENERAL_RULES])
def test_general_rules_end_to_end(prompt, expected):
    assert triples(prompt) == expected


FIXED = {"a": "DET", "an": "DET", "seven": "PROPN", "women": "NOUN", "key": "ADJ", "hidden": "NOUN",
         "by": "ADP", "girl": "NOUN", "paint": "NOUN", "can": "AUX", "on": "ADP", "shelf": "NOUN",
         "teardrop": "NOUN", "plum": "NOUN", "blue": "NOUN", "sled": "VERB", "rubber": "PROPN",
         "gloves": "VERB", "and": "CCONJ", "mat": "NOUN", "red": "ADJ", "sphere": "ADV"}


@pytest.mark.parametrize(("prompt", "expected"), [
    ("seven women", [("women", "seven women", None)]),
    ("a key hidden by a girl", [("key", "a key", None), ("girl", "hidden by a girl", "key")]),
    ("a paint can on a shelf", [("paint can", "a paint can", None), ("shelf", "on a shelf", "paint can")]),
    ("a teardrop plum", [("plum", "a teardrop plum", None)]),
    # an attribute before a verb that ends the noun phrase makes that verb the noun
    ("a blue sled", [("sled", "a blue sled", None)]),
    # a prompt's start is a noun phrase's start too
    ("rubber gloves and a mat", [("gloves", "rubber gloves", None), ("mat", "a mat", None)]),
    ("a red sphere on a mat", [("sphere", "a red sphere", None), ("mat", "on a mat", "sphere")]),
])
def test_general_rules_with_fixed_tags(prompt, expected):
    assert triples(prompt, tagger=FixedTagger(FIXED)) == expected


def test_vocabulary_skips_attribute_led_names_and_categories():
    lexicon = prompt_tree._compound_lexicon()
    assert {("remote", "control"), ("tv", "remote"), ("picture", "frame"), ("light", "bulb")} <= lexicon
    assert ("brown", "bear") not in lexicon and ("plastic", "bag") not in lexicon
    assert not any("and" in entry for entry in lexicon)


# -------------------------------------------------------- no prompt raises, whatever it is

LONG = " ".join(
    ["A sprawling medieval harbour town at dusk, seen from a hill above the bay: narrow streets of "
     "whitewashed houses with red tiled roofs wind down to the water, where fishing boats with "
     "patched brown sails are moored beside a stone pier, and an old white lighthouse on a rocky "
     "point to the left of the harbour entrance shines over the calm dark water."] * 9)
EDGE_PROMPTS = [
    LONG,  # 500+ words
    "東京の夜景、ネオンの看板と雨に濡れた通り", "قطة سوداء تجلس على طاولة خشبية", "एक लाल गाड़ी पेड़ के पास",
    "빨간 사과 두 개와 노란 바나나", "un perro marrón junto a un árbol, fotografía, 4k",
    "A Photo Of A Cat Left Of A Teddy Bear", "A PHOTO OF A DOG", "by, of, in the style of, there is",
    "a photo of", "there is", "and and and", "a a a a", "(((masterpiece))), [[cat]], {dog}",
    "a cat" * 300,
]


@pytest.mark.parametrize("prompt", EDGE_PROMPTS, ids=range(len(EDGE_PROMPTS)))
def test_edge_prompts_never_raise_and_give_consistent_phrases(prompt):
    phrases = parse_prompt(prompt)
    for j, p in enumerate(phrases):
        assert p.noun and p.noun in p.text and 0 <= p.start < p.end
        assert p.ancestor_index is None or (p.ancestor_index != j
                                            and phrases[p.ancestor_index].noun == p.ancestor)


def test_the_long_prompt_is_over_500_words_and_keeps_its_relations():
    assert len(LONG.split()) > 500
    phrases = parse_prompt(LONG)
    lighthouse = [p for p in phrases if p.noun == "lighthouse"]
    assert len(lighthouse) == 9 and all(p.ancestor is None for p in lighthouse)
    # "on a rocky point" hangs under the lighthouse, as in the short sentence
    points = [p for p in phrases if p.noun == "point"]
    assert all(p.ancestor == "lighthouse" for p in points)


# Degenerate long prompts: nltk's chunker once spent over 5 s on the first of these and raised a
# TimeoutError. The documented cuts (prompt_tree.MAX_WORDS words, within MAX_CHARS characters;
# segments of at most MAX_SEGMENT_WORDS words) bound the work, so each parses fast.
DEGENERATE = {
    "5,000 determiners then a noun": "a " * 5000 + "cat",
    "repeated determiners around repeated nouns": "a a " + "cat " * 4996 + "a a cat",
    "5,000 repeated nouns": "cat " * 5000,
    "100,000 determiners": "the " * 100_000,
    "one 1,000,000-letter word": "x" * 1_000_000,
    "3,000 unfinished coordinations": "a red and " * 3000,
    "5,000 prepositions": "on " * 5000,
    "3,000 short segments": "a cat, " * 3000,
}


@pytest.mark.parametrize("prompt", DEGENERATE.values(), ids=DEGENERATE.keys())
def test_degenerate_long_prompts_parse_fast_within_the_documented_cuts(prompt):
    import time

    parse_prompt("a cat")  # the tagger is loaded
    started = time.process_time()
    phrases = parse_prompt(prompt)
    assert time.process_time() - started < 2.0  # about 0.1-0.3 s of CPU each
    for j, p in enumerate(phrases):
        assert p.noun and p.noun in p.text and 0 <= p.start < p.end <= prompt_tree.MAX_WORDS + 1
        assert p.end - p.start <= prompt_tree.MAX_SEGMENT_WORDS  # no phrase crosses a cut
        assert p.ancestor_index is None or phrases[p.ancestor_index].noun == p.ancestor


def test_words_after_the_thousandth_give_no_phrase():
    prompt = "a cat on a mat, " * 200 + "a dog"  # 1,200 words before the dog
    phrases = parse_prompt(prompt)
    assert phrases and all(p.noun in ("cat", "mat") for p in phrases)
    assert max(p.end for p in phrases) <= prompt_tree.MAX_WORDS
    assert all("cat" not in p.noun for p in parse_prompt("a " * 5000 + "cat"))  # word 5,001


def test_a_long_segment_is_cut_as_at_a_line_break():
    words = ["a", "red", "cat", "on", "a", "mat"] * 40  # 240 words, no comma
    cut = prompt_tree.MAX_SEGMENT_WORDS
    joined = triples(" ".join(words))
    assert joined == triples(" ".join(words[:cut]) + "\n" + " ".join(words[cut:]))
