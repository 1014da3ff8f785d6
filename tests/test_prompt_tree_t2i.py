"""The prompt tree on text-to-image prompts: framing words, compounds, relations, bindings.

The labelled development set (``tests/data/t2i``, see its README) is scored as a whole; the
hand-written cases below pin each rule with prompts of the same shapes that are not in it.
Expected phrases follow the rules in ``prompt_tree``'s docstring, worked out by hand.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import pytest

from grefine_hooks.scoring import prompt_tree
from grefine_hooks.scoring.prompt_tree import load_word_lexicon, parse_prompt
from grefine_hooks.scoring.upos_tagger import TwoPassTagger
from grefine_hooks.scoring.word_lexicon import WordLexicon

sys.path.insert(0, str(Path(__file__).resolve().parent / "data" / "t2i"))
import labels  # noqa: E402


def triples(prompt, **kwargs):
    return [(p.noun, p.text, p.ancestor) for p in parse_prompt(prompt, **kwargs)]


# ------------------------------------------------------------- the dev set as a whole


@pytest.fixture(scope="module")
def dev_tally():
    return labels.score(labels.load(), parse_prompt)


def test_dev_set_is_labelled_from_several_benchmarks():
    items = labels.load()
    groups = labels.by_category(items)
    assert len(items) >= 700
    assert {name.split("/")[0] for name in groups} == {"geneval", "t2i-compbench"}
    assert all(len(group) >= 30 for group in groups.values())


def test_dev_set_no_prompt_fails(dev_tally):
    assert dev_tally.failures == []


@pytest.mark.parametrize(("kind", "floor"), [("objects", 0.97), ("binding", 0.97), ("relations", 0.90)])
def test_dev_set_accuracy(dev_tally, kind, floor):
    assert dev_tally.totals[kind] >= 200
    assert dev_tally.rate(kind) >= floor, dev_tally.misses[:20]


def test_dev_set_scorer_catches_a_wrong_tree():
    # the measure itself must be able to fail: a parser that keeps every phrase at the top
    # attaches no relation, and one that returns nothing finds no object
    items = labels.load()

    def flat(prompt):
        return [prompt_tree.Phrase(p.noun, p.text, None, None, p.start, p.end) for p in parse_prompt(prompt)]

    assert labels.score(items, flat).rate("relations") == 0.0
    assert labels.score(items, lambda prompt: []).rate("objects") == 0.0


# -------------------------------------------------------------------- framing words

FRAMING = [
    ("a photo of a lemon", [("lemon", "a lemon", None)]),
    ("a photo of an orange", [("orange", "an orange", None)]),
    ("an oil painting of a lighthouse on a cliff",
     [("lighthouse", "a lighthouse", None), ("cliff", "on a cliff", "lighthouse")]),
    ("a 3d render of a robot", [("robot", "a robot", None)]),
    ("a close-up of a bee on a flower", [("bee", "a bee", None), ("flower", "on a flower", "bee")]),
    ("a picture of two cats and a dog", [("cats", "two cats", None), ("dog", "a dog", None)]),
    ("a black and white photo of a horse", [("horse", "a horse", None)]),
    ("a watercolor painting of a fox, soft light",
     [("fox", "a fox", None), ("light", "soft light", None)]),
]


@pytest.mark.parametrize(("prompt", "expected"), FRAMING, ids=[p for p, _ in FRAMING])
def test_framing_words_are_not_objects(prompt, expected):
    assert triples(prompt) == expected


def test_a_style_segment_gives_no_phrase():
    assert triples("a cup on a table, digital art, photorealistic, 4k") == [
        ("cup", "a cup", None), ("table", "on a table", "cup")]


def test_a_medium_noun_that_frames_nothing_is_still_an_object():
    # "of" never follows, so nothing is framed: the painting is what the prompt asks for
    assert [p.noun for p in parse_prompt("a painting on a wall")] == ["painting", "wall"]


# ------------------------------------------------------------------------ relations

RELATIONS = [
    ("a lamp to the left of a sofa", [("lamp", "a lamp", None), ("sofa", "to the left of a sofa", "lamp")]),
    ("a kite right of a tree", [("kite", "a kite", None), ("tree", "right of a tree", "kite")]),
    ("a cat below a table", [("cat", "a cat", None), ("table", "below a table", "cat")]),
    ("a bird on top of a car", [("bird", "a bird", None), ("car", "on top of a car", "bird")]),
    ("a vase next to a bowl", [("vase", "a vase", None), ("bowl", "next to a bowl", "vase")]),
    ("a girl holding an umbrella", [("girl", "a girl", None), ("umbrella", "holding an umbrella", "girl")]),
    ("bench near trees", [("bench", "bench", None), ("trees", "near trees", "bench")]),
    ("a photo of a cup on the right of a laptop",
     [("cup", "a cup", None), ("laptop", "on the right of a laptop", "cup")]),
]


@pytest.mark.parametrize(("prompt", "expected"), RELATIONS, ids=[p for p, _ in RELATIONS])
def test_reference_object_hangs_under_its_subject(prompt, expected):
    assert triples(prompt) == expected


# ------------------------------------------------------------- compounds and binding

COMPOUNDS = [
    ("a cell phone on a desk", [("cell phone", "a cell phone", None), ("desk", "on a desk", "cell phone")]),
    ("a wine glass and a coffee mug",
     [("wine glass", "a wine glass", None), ("coffee mug", "a coffee mug", None)]),
    # colour, material and size words before a noun are attributes, not part of its name
    ("a pink cake and a glass bottle", [("cake", "a pink cake", None), ("bottle", "a glass bottle", None)]),
    # ... unless listed as a compound of its own
    ("a light bulb and a black bear", [("light bulb", "a light bulb", None), ("bear", "a black bear", None)]),
    ("a hot dog on a red plate", [("hot dog", "a hot dog", None), ("plate", "on a red plate", "hot dog")]),
    ("a tall building next to a small wooden hut",
     [("building", "a tall building", None), ("hut", "next to a small wooden hut", "building")]),
    ("a red cube, a blue sphere and a green cone",
     [("cube", "a red cube", None), ("sphere", "a blue sphere", None), ("cone", "a green cone", None)]),
    ("three yellow bananas and two red apples",
     [("bananas", "three yellow bananas", None), ("apples", "two red apples", None)]),
]


@pytest.mark.parametrize(("prompt", "expected"), COMPOUNDS, ids=[p for p, _ in COMPOUNDS])
def test_compounds_whole_and_attributes_bound(prompt, expected):
    assert triples(prompt) == expected


# ------------------------------------------------------------------- abbreviations


@pytest.mark.parametrize(("prompt", "expected"), [
    ("Mr. Smith walking a dog", [("Mr. Smith", "Mr. Smith", None), ("dog", "walking a dog", "Mr. Smith")]),
    ("a portrait of Dr. Jones in a lab",
     [("Dr. Jones", "Dr. Jones", None), ("lab", "in a lab", "Dr. Jones")]),
])
def test_a_title_does_not_end_the_sentence(prompt, expected):
    assert triples(prompt) == expected


def test_a_full_stop_after_an_ordinary_word_still_splits():
    assert triples("a tree. a house.") == [("tree", "a tree", None), ("house", "a house", None)]


# ------------------------------------------------- tag repair with fixed tags (no tagger luck)


class FixedTagger:
    """Tags from a word list, with the lexicon hook the shipped tagger offers."""

    def __init__(self, lexicon, nouns=()):
        self.lexicon = lexicon
        self.nouns = set(nouns)

    def tag(self, tokens):
        return [(t, self.lexicon[t.lower()]) for t in tokens]

    def noun_reading(self, word):
        return word.lower() in self.nouns


TAGS = {"a": "DET", "an": "DET", "the": "DET", "orange": "ADJ", "stop": "VERB", "sign": "VERB",
        "on": "ADP", "cat": "NOUN", "sat": "VERB", "mat": "NOUN", "pole": "NOUN", "running": "VERB",
        "dog": "NOUN", "tie": "VERB", "board": "VERB",
        "below": "ADV", "red": "ADJ", "and": "CCONJ", "blue": "ADJ",
        "car": "NOUN", "pink": "NOUN", "left": "NOUN", "of": "ADP", "boy": "NOUN", "kicks": "NOUN",
        "ball": "NOUN", "near": "PROPN", "tree": "NOUN", "man": "NOUN", "is": "AUX",
        "tinkering": "NOUN", "with": "ADP", "painting": "NOUN", "bird": "NOUN", "flies": "NOUN",
        "over": "ADP", "lake": "NOUN", "camera": "NOUN", "lens": "NOUN", "table": "NOUN",
        "apple": "NOUN", "trees": "NOUN", "in": "ADP", "garden": "NOUN", "that": "SCONJ", "chasing": "VERB",
        "so": "ADV", "big": "ADJ", "it": "PRON", "fills": "VERB", "frame": "NOUN"}


@pytest.mark.parametrize(("prompt", "nouns", "expected"), [
    # an adjective ending a noun phrase right after its determiner is its noun
    ("an orange on a mat", (), [("orange", "an orange", None), ("mat", "on a mat", "orange")]),
    # ... but not inside a coordinated modifier list
    ("a red and blue car", (), [("car", "a red and blue car", None)]),
    # a verb between a determiner and a noun is a noun modifier, unless a participle
    ("a stop pole", (), [("stop pole", "a stop pole", None)]),
    ("a running dog", (), [("dog", "a running dog", None)]),
    # a verb after a noun becomes a noun only when the lexicon mostly saw it as one
    ("a stop board on a pole", ("board",),
     [("stop board", "a stop board", None), ("pole", "on a pole", "stop board")]),
    ("a stop board", (), [("stop", "a stop board", None)]),
    # ... unless the two words are an object vocabulary's name
    ("a stop sign", (), [("stop sign", "a stop sign", None)]),
    ("a cat sat on a mat", ("sign",), [("cat", "a cat", None), ("mat", "sat on a mat", "cat")]),
    ("a tie below a dog", (), [("tie", "a tie", None), ("dog", "below a dog", "tie")]),
    ("a pink car left of a dog", (), [("car", "a pink car", None), ("dog", "left of a dog", "car")]),
    # a noun run never runs into a determiner: the noun before it is a verb
    ("a boy kicks a ball", (), [("boy", "a boy", None), ("ball", "kicks a ball", "boy")]),
    # a spatial word between two nouns is a preposition, whatever the tagger said
    ("a car near a tree", (), [("car", "a car", None), ("tree", "near a tree", "car")]),
    # an -ing form after a form of "be" is a verb, unless the lexicon mostly saw it as a noun
    ("a man is tinkering with a car", (),
     [("man", "a man", None), ("car", "is tinkering with a car", "man")]),
    ("a man is painting", ("painting",), [("man", "a man", None), ("painting", "is painting", "man")]),
    # an -s form after a noun that "a" makes singular is its verb, unless mostly a noun
    ("a bird flies over a lake", (), [("bird", "a bird", None), ("lake", "flies over a lake", "bird")]),
    ("a camera lens on a table", ("lens",),
     [("camera lens", "a camera lens", None), ("table", "on a table", "camera lens")]),
    ("the apple trees in the garden", (),
     [("apple trees", "the apple trees", None), ("garden", "in the garden", "apple trees")]),
    # "that" after a noun opens a relative clause: it joins the clause's phrase, read as SCONJ or not
    ("a ball that a dog is chasing", (),
     [("ball", "a ball", None), ("dog", "that a dog is chasing", "ball")]),
    # ... and only there: after an adjective it stays a link word, in no phrase
    ("a ball so big that it fills the frame", (),
     [("ball", "a ball so big it", None), ("frame", "fills the frame", None)]),
])
def test_tag_repair_rules(prompt, nouns, expected):
    assert triples(prompt, tagger=FixedTagger(TAGS, nouns)) == expected


# ------------------------------------------------------------------- the tagger file


def test_tagger_file_of_another_format_is_a_value_error():
    with pytest.raises(ValueError, match="format"):
        TwoPassTagger.from_json('{"format": "something else"}', load_word_lexicon())
    with pytest.raises(ValueError, match="format"):
        TwoPassTagger.from_json("[1, 2]", load_word_lexicon())


def test_tagger_round_trips_through_json():
    sentences = [[("a", "DET"), ("red", "ADJ"), ("cup", "NOUN")],
                 [("the", "DET"), ("dog", "NOUN"), ("runs", "VERB")]] * 30
    tagger = TwoPassTagger.train(sentences, load_word_lexicon(), iterations=2, folds=2,
                                 log=lambda *_: None)
    again = TwoPassTagger.from_json(tagger.to_json(), load_word_lexicon())
    assert again.to_json() == tagger.to_json()
    assert again.tag(["the", "red", "dog"]) == tagger.tag(["the", "red", "dog"])
    assert [t for _, t in again.tag(["a", "red", "cup"])] == ["DET", "ADJ", "NOUN"]
    assert again.noun_reading("cup") and not again.noun_reading("runs")


def test_tagger_file_trained_with_another_word_lexicon_is_refused():
    shipped = (resources.files("grefine_hooks") / "data" / prompt_tree.MODEL_FILE).read_text(encoding="utf-8")
    other = WordLexicon(load_word_lexicon().lines, "sha256:0123456789abcdef")
    with pytest.raises(ValueError, match="word lexicon"):
        TwoPassTagger.from_json(shipped, other)


# ------------------------------------------------------------------- the word lexicon


def test_word_lexicon_reads_the_usual_capitalisation_whatever_the_prompt_writes():
    lexicon = load_word_lexicon()
    # a name stays a name in a lower-cased prompt; a common word stays common when capitalised
    for word in ("paris", "Paris", "PARIS", "john"):
        assert lexicon.get(word).case_class in ("caponly", "r1", "r2", "r3", "r4"), word
    for word in ("table", "Table", "the"):
        assert lexicon.get(word).case_class in ("lowonly", "r-1", "r-2", "r-3", "r-4"), word
    assert lexicon.features("paris") == lexicon.features("PARIS")
    assert "wn nv" in lexicon.features("Table")  # "to table a motion"
    assert "wn a" in lexicon.features("happy")


def test_word_lexicon_cluster_follows_the_written_case():
    lexicon = load_word_lexicon()
    facts = lexicon.get("apple")
    assert facts.cluster and facts.cluster_capitalised and facts.cluster != facts.cluster_capitalised
    assert lexicon.cluster("apple") == facts.cluster
    assert lexicon.cluster("Apple") == facts.cluster_capitalised
    # the treebank never needs a cluster of every word: an unknown one has none, and no facts
    assert lexicon.cluster("qzxvkplm") == "none"
    assert lexicon.features("qzxvkplm") == ["fq 15", "cr none", "wn -"]


def test_word_lexicon_and_its_licences_ship_in_the_package():
    data = resources.files("grefine_hooks") / "data"
    assert (data / prompt_tree.LEXICON_FILE).is_file()
    assert "ExplosionAI" in (data / "LICENSE-spacy-lookups-data").read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (
        data / "LICENSE-wordnet").read_text(encoding="utf-8")
    assert len(load_word_lexicon().lines) > 200_000
