"""Tests for grefine_hooks.scoring.prompt_tree (G-Refine eq. 4 and Algorithm 1).

Expected phrases were worked out by hand from the rules in the module docstring
(noun heads are centres, every other word joins the nearest centre in the tree,
ancestors by Algorithm 1), not copied from a run.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from importlib import resources
from pathlib import Path

import nltk
import pytest
from nltk.tag.perceptron import PerceptronTagger
from nltk.tree import Tree

from grefine_hooks.scoring import prompt_tree
from grefine_hooks.scoring.prompt_tree import (
    NodeInfo,
    Phrase,
    build_tree,
    get_phrase_ancestor,
    load_tagger,
    parse_prompt,
)

UD_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt" / "en_ewt-ud-test.conllu"
UPOS = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART",
        "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"}


def triples(phrases: list[Phrase]) -> list[tuple[str, str, str | None]]:
    return [(p.noun, p.text, p.ancestor) for p in phrases]


# --------------------------------------------------------- end to end (shipped tagger)

END_TO_END = [
    # the design doc's example
    ("a red book and a yellow vase on a wooden table",
     [("book", "a red book", None), ("vase", "a yellow vase", None),
      ("table", "on a wooden table", "vase")]),
    # conjunctions: conjuncts stay side by side at the top; "and" joins nothing
    ("a boy and a girl", [("boy", "a boy", None), ("girl", "a girl", None)]),
    ("a cat or a dog", [("cat", "a cat", None), ("dog", "a dog", None)]),
    ("two cats and three dogs", [("cats", "two cats", None), ("dogs", "three dogs", None)]),
    ("a man and his dog", [("man", "a man", None), ("dog", "his dog", None)]),
    ("a cat, a dog and a bird",
     [("cat", "a cat", None), ("dog", "a dog", None), ("bird", "a bird", None)]),
    # ... but inside a noun phrase the conjunction stays with it
    ("a black and white cat", [("cat", "a black and white cat", None)]),
    ("a red and blue car parked near a tall building",
     [("car", "a red and blue car", None),
      ("building", "parked near a tall building", "car")]),
    ("a dog running in the park and a cat sleeping on the sofa",
     [("dog", "a dog", None), ("park", "running in the park", "dog"),
      ("cat", "a cat", None), ("sofa", "sleeping on the sofa", "cat")]),
    # prepositional phrases, nested to the right
    ("a cup on a table in a kitchen",
     [("cup", "a cup", None), ("table", "on a table", "cup"),
      ("kitchen", "in a kitchen", "table")]),
    ("a vase with flowers", [("vase", "a vase", None), ("flowers", "with flowers", "vase")]),
    ("a cat in front of a house",
     [("cat", "a cat", None), ("house", "in front of a house", "cat")]),
    ("a bowl of soup", [("bowl", "a bowl", None), ("soup", "of soup", "bowl")]),
    ("a teddy bear on a skateboard",
     [("teddy bear", "a teddy bear", None), ("skateboard", "on a skateboard", "teddy bear")]),
    ("three red apples on a plate",
     [("apples", "three red apples", None), ("plate", "on a plate", "apples")]),
    ("a table made of wood", [("table", "a table", None), ("wood", "made of wood", "table")]),
    # verbs and participles: the verb goes with its object, the clause with the noun it modifies
    ("a man riding a horse", [("man", "a man", None), ("horse", "riding a horse", "man")]),
    ("an astronaut riding a horse on the moon",
     [("astronaut", "an astronaut", None), ("horse", "riding a horse", "astronaut"),
      ("moon", "on the moon", "horse")]),
    ("a man holding a cup of coffee",
     [("man", "a man", None), ("cup", "holding a cup", "man"), ("coffee", "of coffee", "cup")]),
    ("a man with a hat riding a horse",
     [("man", "a man", None), ("hat", "with a hat", "man"), ("horse", "riding a horse", "man")]),
    ("a woman with long hair holding an umbrella",
     [("woman", "a woman", None), ("hair", "with long hair", "woman"),
      ("umbrella", "holding an umbrella", "woman")]),
    # framing words name the medium: they join no phrase, the object is the top
    ("portrait of a man wearing a hat",
     [("man", "a man", None), ("hat", "wearing a hat", "man")]),
    ("a photo of a cat sleeping on a couch",
     [("cat", "a cat", None), ("couch", "sleeping on a couch", "cat")]),
    ("a girl smiling", [("girl", "a girl smiling", None)]),
    ("a cat is sleeping on a sofa",
     [("cat", "a cat", None), ("sofa", "is sleeping on a sofa", "cat")]),
    ("a cat not wearing a hat", [("cat", "a cat", None), ("hat", "not wearing a hat", "cat")]),
    ("two dogs playing in the snow",
     [("dogs", "two dogs", None), ("snow", "playing in the snow", "dogs")]),
    ("she is holding a cat", [("cat", "she is holding a cat", None)]),
    # relative clauses
    ("a dog that is chasing a ball",
     [("dog", "a dog", None), ("ball", "that is chasing a ball", "dog")]),
    ("a ball that a dog is chasing",
     [("ball", "a ball", None), ("dog", "that a dog is chasing", "ball")]),
    ("a woman who has long hair",
     [("woman", "a woman", None), ("hair", "who has long hair", "woman")]),
    ("a girl whose hair is red", [("girl", "a girl", None), ("hair", "whose hair is red", "girl")]),
    # numbers, plurals, possessives
    ("three red apples", [("apples", "three red apples", None)]),
    ("the dog's red ball", [("dog", "the dog's", "ball"), ("ball", "red ball", None)]),
    # proper nouns and compounds: the phrase's noun is the whole run of nouns
    # the two captions printed in the paper
    # ("to bat" is an infinitive, so the verb phrase joins its subject's phrase; a hyphenated
    # modifier is part of the compound noun, as "stop sign" is)
    ("Ichiro Suzuki preparing to bat.",
     [("Ichiro Suzuki", "Ichiro Suzuki preparing to bat", None)]),
    ("Enjoying the baseball game from the third-base seats.",
     [("baseball game", "Enjoying the baseball game", None),
      ("third-base seats", "from the third-base seats", "baseball game")]),
    ("Mount Fuji behind a lake",
     [("Mount Fuji", "Mount Fuji", None), ("lake", "behind a lake", "Mount Fuji")]),
    ("the Eiffel Tower in Paris",
     [("Eiffel Tower", "the Eiffel Tower", None), ("Paris", "in Paris", "Eiffel Tower")]),
    # no noun: the scorer falls back to the whole prompt
    ("beautiful", []),
    ("very colorful and bright", []),
    ("highly detailed", []),
    # words of a noun-less segment join nothing, not a noun in another segment
    ("a red car, highly detailed, 8k", [("car", "a red car", None)]),
    # comma-separated tag lists: every segment is its own top-level group
    # quality, style and booru tags ("masterpiece", "best quality", "solo") name no depicted
    # object and give no phrase
    ("masterpiece, best quality, 1girl, solo, long hair",
     [("1girl", "1girl", None), ("hair", "long hair", None)]),
    ("masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
     [("1girl", "1girl", None), ("hair", "long hair", None),
      ("viewer", "looking at viewer", None)]),
    ("a sunset over the ocean, dramatic clouds, golden light",
     [("sunset", "a sunset", None), ("ocean", "over the ocean", "sunset"),
      ("clouds", "dramatic clouds", None), ("light", "golden light", None)]),
    ("cyberpunk city street at night, neon signs, rain",
     [("cyberpunk city street", "cyberpunk city street", None),
      ("night", "at night", "cyberpunk city street"),
      ("neon signs", "neon signs", None), ("rain", "rain", None)]),
    # a noun-less segment that opens a noun phrase belongs to the next one
    ("a red, shiny apple", [("apple", "a red, shiny apple", None)]),
    # sentences split like commas
    ("a tree. a house.", [("tree", "a tree", None), ("house", "a house", None)]),
    # case variants
    ("a cat sitting on a mat", [("cat", "a cat", None), ("mat", "sitting on a mat", "cat")]),
    ("A Cat Sitting On A Mat", [("Cat", "A Cat", None), ("Mat", "Sitting On A Mat", "Cat")]),
    ("A RED BOOK AND A YELLOW VASE ON A WOODEN TABLE",
     [("BOOK", "A RED BOOK", None), ("VASE", "A YELLOW VASE", None),
      ("TABLE", "ON A WOODEN TABLE", "VASE")]),
]


@pytest.mark.parametrize(("prompt", "expected"), END_TO_END, ids=[p for p, _ in END_TO_END])
def test_parse_prompt_end_to_end(prompt, expected):
    assert triples(parse_prompt(prompt)) == expected


def test_end_to_end_table_is_large_enough():
    assert len(END_TO_END) >= 40


@pytest.mark.parametrize("prompt", [p for p, _ in END_TO_END])
def test_phrase_fields_are_consistent(prompt):
    phrases = parse_prompt(prompt)
    for j, p in enumerate(phrases):
        assert p.noun in p.text  # a compound noun is a run of the phrase's words
        assert 0 <= p.start < p.end
        assert len(p.text.split()) <= p.end - p.start
        if p.ancestor is None:
            assert p.ancestor_index is None
        else:
            assert p.ancestor_index != j
            assert phrases[p.ancestor_index].noun == p.ancestor


def test_ancestor_index_disambiguates_repeated_nouns():
    phrases = parse_prompt("a cat on a table and a cat on a chair")
    assert triples(phrases) == [("cat", "a cat", None), ("table", "on a table", "cat"),
                                ("cat", "a cat", None), ("chair", "on a chair", "cat")]
    assert [p.ancestor_index for p in phrases] == [None, 0, None, 2]


def test_phrase_is_frozen():
    phrase = parse_prompt("a cat")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        phrase.noun = "dog"


def test_word_spans_of_the_design_example():
    phrases = parse_prompt("a red book and a yellow vase on a wooden table")
    assert [(p.start, p.end) for p in phrases] == [(0, 3), (4, 7), (7, 11)]


# ------------------------------------------------------------- the tree itself


def test_build_tree_design_example():
    tree = build_tree("a red book and a yellow vase on a wooden table")
    assert tree.label() == "S"
    assert [w for w, _ in tree.leaves()] == "a red book and a yellow vase on a wooden table".split()
    assert all(tag in UPOS for _, tag in tree.leaves())
    (segment,) = tree
    (coord,) = segment
    assert coord.label() == "COORD"
    book, conj, vase = coord
    assert book.label() == "NP" and conj == ("and", "CCONJ")
    assert [c.label() for c in vase] == ["NP", "PP"]


def test_build_tree_tag_list_keeps_each_segment_apart():
    tree = build_tree("1girl, red dress, long hair, looking at viewer")
    labels = [c.label() if isinstance(c, Tree) else c for c in tree]
    assert labels == ["SEG", (",", "PUNCT"), "SEG", (",", "PUNCT"), "SEG", (",", "PUNCT"), "SEG"]
    assert [" ".join(w for w, _ in seg.leaves()) for seg in tree if isinstance(seg, Tree)] == [
        "1girl", "red dress", "long hair", "looking at viewer"]


def test_build_tree_style_segments_are_leaves_of_the_root():
    # a style tag is no segment of the tree: its words hang from the root and join no phrase
    tree = build_tree("a red dress, masterpiece, best quality")
    labels = [c.label() if isinstance(c, Tree) else c for c in tree]
    assert labels == ["SEG", (",", "PUNCT"), ("masterpiece", "NOUN"), (",", "PUNCT"),
                      ("best", "ADJ"), ("quality", "NOUN")]


def test_line_breaks_split_segments():
    # on one line "long hair smile" is a compound whose head is "smile"
    assert triples(parse_prompt("long hair\nsmile")) == [
        ("hair", "long hair", None), ("smile", "smile", None)]


def test_long_pp_chains_keep_the_tree_shallow():
    prompt = "a cup " + " ".join(f"in a box{i}" for i in range(40))
    tree = build_tree(prompt)
    assert tree.height() <= 12
    phrases = parse_prompt(prompt)
    assert len(phrases) == 41
    assert all(p.ancestor is not None for p in phrases[1:])


# ------------------------------------------ grammar with a fixed lexicon (no tagger luck)


class LexiconTagger:
    """Tags from a word list, so these tests check the grammar and not the statistics."""

    LEXICON = {
        "a": "DET", "an": "DET", "the": "DET", "old": "ADJ", "long": "ADJ", "white": "ADJ",
        "cute": "ADJ", "fluffy": "ADJ", "small": "ADJ", "man": "NOUN", "beard": "NOUN",
        "book": "NOUN", "kitten": "NOUN", "dog": "NOUN", "bone": "NOUN", "with": "ADP",
        "reading": "VERB", "giving": "VERB", "preparing": "VERB", "to": "PART", "bat": "VERB",
        "ichiro": "PROPN", "suzuki": "PROPN", ",": "PUNCT", "and": "CCONJ", "cup": "NOUN",
        "on": "ADP", "in": "ADP", "table": "NOUN", "kitchen": "NOUN", "house": "NOUN",
        "town": "NOUN", "country": "NOUN", "world": "NOUN", "red": "ADJ", "cat": "NOUN",
        "sleeping": "VERB",
    }

    def tag(self, tokens):
        return [(t, self.LEXICON[t.lower()]) for t in tokens]


GRAMMAR_CASES = [
    # the shipped tagger reads a noun + "-ing" at the end of a fragment as a compound noun
    ("a cat sleeping", [("cat", "a cat sleeping", None)]),
    ("an old man with a long white beard reading a book",
     [("man", "an old man", None), ("beard", "with a long white beard", "man"),
      ("book", "reading a book", "man")]),
    ("a cute, fluffy, small kitten", [("kitten", "a cute, fluffy, small kitten", None)]),
    ("ichiro suzuki preparing to bat", [("ichiro suzuki", "ichiro suzuki preparing to bat", None)]),
    # two objects: the verb joins the first; the second's parent is the verb phrase,
    # not a noun, so its ancestor is the man one level further up
    ("a man giving a dog a bone",
     [("man", "a man", None), ("dog", "giving a dog", "man"), ("bone", "a bone", "man")]),
    ("a cup on a table, in a kitchen",
     [("cup", "a cup", None), ("table", "on a table", "cup"), ("kitchen", "in a kitchen", None)]),
    # four PPs nest fully to the right (three nesting stages plus the NP attachment)
    ("a cup on a table in a kitchen in a house in a town",
     [("cup", "a cup", None), ("table", "on a table", "cup"),
      ("kitchen", "in a kitchen", "table"), ("house", "in a house", "kitchen"),
      ("town", "in a town", "house")]),
]


@pytest.mark.parametrize(("prompt", "expected"), GRAMMAR_CASES, ids=[p for p, _ in GRAMMAR_CASES])
def test_grammar_with_fixed_tags(prompt, expected):
    assert triples(parse_prompt(prompt, tagger=LexiconTagger())) == expected


def test_tagger_argument_is_used():
    tree = build_tree("a red cup", tagger=LexiconTagger())
    assert tree.leaves() == [("a", "DET"), ("red", "ADJ"), ("cup", "NOUN")]


# -------------------------------------------------------- edge cases and long prompts


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", ",,,", "...", "!!"])
def test_empty_or_punctuation_only_gives_no_phrases(prompt):
    assert parse_prompt(prompt) == []


@pytest.mark.parametrize("bad", [None, 42, b"a cat", ["a", "cat"]])
def test_non_str_prompt_is_a_type_error(bad):
    with pytest.raises(TypeError, match="prompt"):
        parse_prompt(bad)
    with pytest.raises(TypeError, match="prompt"):
        build_tree(bad)


@pytest.mark.parametrize("prompt", [
    "一只猫坐在桌子上", "猫 🐱 on a table", "🐱🔥✨", "Ein Hund läuft über die Straße",
    "un chat sur la table", "кошка на столе", "(masterpiece:1.2), ((red hair)), [dog]",
    "a \"quoted\" cat in a 'box'", "f/1.8, 8k, 35mm, #art, @user, http://x.y/z",
])
def test_non_english_and_symbols_do_not_crash(prompt):
    phrases = parse_prompt(prompt)
    assert all(isinstance(p, Phrase) and p.noun for p in phrases)
    assert isinstance(build_tree(prompt), Tree)


def test_prompt_longer_than_clip_context():
    prompt = ", ".join(["a red cup on a wooden table"] * 20)  # 140 words, well over 77 CLIP tokens
    phrases = parse_prompt(prompt)
    assert len(phrases) == 40
    assert [(p.noun, p.text, p.ancestor_index) for p in phrases[-2:]] == [
        ("cup", "a red cup", None), ("table", "on a wooden table", 38)]


def test_thousand_words_are_fast():
    words = ("a small red cup on a wooden table next to a window and a cat "
             "sleeping on a chair that is near the door ").split()
    prompt = " ".join((words * 60)[:1000])
    parse_prompt("warm up")  # load the tagger outside the timing
    # CPU time of this process, so that other load on a shared CI machine does not count.
    started = time.process_time()
    phrases = parse_prompt(prompt)
    elapsed = time.process_time() - started
    assert len(phrases) > 200
    assert elapsed < 2.0, f"1,000 words took {elapsed:.2f} s"


# ------------------------------------------------------------ Algorithm 1 by hand


def leaf(word: str, pos: str | None, phrase: int | None) -> NodeInfo:
    return NodeInfo(word, pos, phrase)


def node(label: str, pos: str | None, phrase: int | None, *children) -> Tree:
    return Tree(NodeInfo(label, pos, phrase), list(children))


def np(phrase: int, *words: str) -> Tree:
    """A flat noun phrase whose last word is the head noun."""
    *mods, head = words
    return node("NP", "NOUN", phrase, *[leaf(w, "DET", phrase) for w in mods],
                leaf(head, "NOUN", phrase))


def pp(phrase: int, prep: str, noun_phrase: Tree, *rest: Tree) -> Tree:
    return node("PP", "NOUN", phrase, leaf(prep, "ADP", phrase), noun_phrase, *rest)


def test_algorithm1_single_pp():
    tree = node("S", None, None, node("NP", "NOUN", 0, np(0, "a", "cup"), pp(1, "on", np(1, "a", "table"))))
    assert get_phrase_ancestor(tree) == {0: None, 1: 0}


def test_algorithm1_nested_pps():
    # a cup [on a table [in a kitchen [of a house]]]
    inner = pp(3, "of", np(3, "a", "house"))
    kitchen = pp(2, "in", np(2, "a", "kitchen"), inner)
    table = pp(1, "on", np(1, "a", "table"), kitchen)
    tree = node("S", None, None, node("NP", "NOUN", 0, np(0, "a", "cup"), table))
    assert get_phrase_ancestor(tree) == {0: None, 1: 0, 2: 1, 3: 2}


def test_algorithm1_parent_not_a_noun_but_grandparent_is():
    # a man [VP giving a dog a bone]: the bone's parent is the verb phrase (phrase 1, a VERB),
    # so the search goes on up to the man
    vp = node("VP", "VERB", 1, leaf("giving", "VERB", 1), np(1, "a", "dog"), np(2, "a", "bone"))
    tree = node("S", None, None, node("NP", "NOUN", 0, np(0, "a", "man"), vp))
    assert get_phrase_ancestor(tree) == {0: None, 1: 0, 2: 0}


def test_algorithm1_several_levels_without_a_noun():
    deep = node("X", "VERB", 1, node("Y", "ADV", None, node("Z", "ADJ", None, np(2, "a", "dog"))))
    tree = node("S", None, None, node("NP", "PROPN", 0, np(0, "Paris"), deep))
    assert get_phrase_ancestor(tree) == {0: None, 1: 0, 2: 0}


def test_algorithm1_headless_coordination_keeps_both_at_top():
    coord = node("COORD", None, None, np(0, "a", "book"), leaf("and", "CCONJ", None), np(1, "a", "vase"))
    assert get_phrase_ancestor(node("S", None, None, coord)) == {0: None, 1: None}


def test_algorithm1_ignores_a_noun_node_of_the_same_phrase():
    # the PP is phrase 1 inside an NP that is also phrase 1: the ancestor is the next noun up
    inner = node("NP", "NOUN", 1, np(1, "the", "table"), pp(1, "on", np(1, "it")))
    tree = node("S", None, None, node("NP", "NOUN", 0, np(0, "a", "cup"), pp(1, "with", inner)))
    assert get_phrase_ancestor(tree) == {0: None, 1: 0}


def test_algorithm1_a_phrase_is_never_its_own_ancestor():
    # phrase 0 shows up again under phrase 1; its only noun ancestor is the root,
    # which is phrase 0 itself, so it stays at the top
    vp = node("VP", "VERB", 1, leaf("near", "ADP", 1), node("NP", "NOUN", 0, leaf("his", "PRON", 0)))
    tree = node("NP", "NOUN", 0, np(0, "a", "man"), vp)
    assert get_phrase_ancestor(tree) == {0: None, 1: 0}


def test_algorithm1_skips_noun_nodes_without_a_phrase():
    headless = node("X", "NOUN", None, np(1, "a", "lamp"))
    tree = node("S", None, None, node("NP", "NOUN", 0, np(0, "a", "desk"), headless))
    assert get_phrase_ancestor(tree) == {0: None, 1: 0}


def test_algorithm1_topmost_node_of_a_phrase_decides():
    # phrase 1 appears at the top (no noun above) and again deep under phrase 0: the
    # breadth-first walk meets the top one first, and that one decides
    tree = node("S", None, None,
                np(1, "a", "lamp"),
                node("NP", "NOUN", 0, np(0, "a", "desk"), node("VP", "VERB", 1, leaf("lit", "VERB", 1))))
    assert get_phrase_ancestor(tree) == {0: None, 1: None}


def test_algorithm1_on_a_tree_without_phrases():
    assert get_phrase_ancestor(node("S", None, None, leaf("beautiful", "ADJ", None))) == {}


# ------------------------------------------------------------------------- taggers


def test_shipped_tagger_and_parser_work_without_nltk_data(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    prompt_tree._load_tagger.cache_clear()
    try:
        tagger = load_tagger("ud-ewt")
        assert tagger.tag(["a", "red", "cup", "on", "the", "table"]) == [
            ("a", "DET"), ("red", "ADJ"), ("cup", "NOUN"), ("on", "ADP"),
            ("the", "DET"), ("table", "NOUN")]
        # the tokenizer needs no data either (no punkt)
        assert triples(parse_prompt("a red book and a yellow vase on a wooden table")) == [
            ("book", "a red book", None), ("vase", "a yellow vase", None),
            ("table", "on a wooden table", "vase")]
    finally:
        prompt_tree._load_tagger.cache_clear()


def test_shipped_tagger_is_cached():
    assert load_tagger() is load_tagger("ud-ewt")


def test_tagger_files_ship_in_the_package():
    data = resources.files("grefine_hooks") / "data"
    assert (data / prompt_tree.MODEL_FILE).is_file()
    notice = (data / "TAGGER_NOTICE.md").read_text(encoding="utf-8")
    assert ("UD English EWT, (c) 2013-2021 The Board of Trustees of the Leland Stanford "
            "Junior University, CC BY-SA 4.0") in notice


def test_unknown_tagger_name_is_a_value_error():
    with pytest.raises(ValueError, match="name"):
        load_tagger("spacy")


def _read_conllu(path: Path, limit: int) -> list[list[tuple[str, str]]]:
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
                if len(sentences) == limit:
                    break
        elif not line.startswith("#"):
            cols = line.split("\t")
            if "-" not in cols[0] and "." not in cols[0]:
                current.append((cols[1], cols[3]))
    return sentences


@pytest.mark.skipif(not UD_TEST.is_file(), reason="shared UD English EWT test split not present")
# Measured with the shipped tagger on these 13,145 tokens: 96.74 % cased, 96.26 % lower-cased;
# each floor is about three standard errors (0.17 points each) below.
@pytest.mark.parametrize(("lowercase", "floor"), [(False, 0.962), (True, 0.957)])
def test_shipped_tagger_accuracy_on_ud_test(lowercase, floor):
    tagger = load_tagger()
    correct = total = 0
    for sent in _read_conllu(UD_TEST, limit=1000):
        words = [w.lower() if lowercase else w for w, _ in sent]
        for (_, guess), (_, gold) in zip(tagger.tag(words), sent, strict=True):
            correct += guess == gold
            total += 1
    assert total > 10_000
    assert correct / total >= floor


@pytest.fixture
def no_downloads(monkeypatch):
    """Fail loudly if anything tries nltk's downloader or opens a network connection."""
    def refuse(*args, **kwargs):
        raise AssertionError("a download or network connection was attempted")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.downloader.Downloader, "download", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    prompt_tree._load_tagger.cache_clear()
    yield
    prompt_tree._load_tagger.cache_clear()


def test_nltk_tagger_missing_is_a_lookup_error_without_download(no_downloads, monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(LookupError, match="averaged_perceptron_tagger_eng") as info:
        load_tagger("nltk")
    assert "never downloads" in str(info.value)


def test_nltk_tagger_missing_in_this_environment(no_downloads):
    try:
        nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
    except LookupError:
        with pytest.raises(LookupError, match="not installed"):
            load_tagger("nltk")
    else:
        pytest.skip("nltk's averaged_perceptron_tagger_eng is installed here")


def test_nltk_tagger_when_installed_maps_ptb_to_upos(no_downloads, monkeypatch, tmp_path):
    # Install a tiny PTB-tagged model where nltk looks for averaged_perceptron_tagger_eng.
    # Every word occurs 20 times with one tag, so it lands in the tag dictionary and
    # tagging is exact.
    root = tmp_path / "nltk_data"
    model_dir = root / "taggers" / "averaged_perceptron_tagger_eng"
    model_dir.parent.mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    ptb = [("The", "DT"), ("dog", "NN"), ("is", "VBZ"), ("chasing", "VBG"), ("two", "CD"),
           ("red", "JJ"), ("balls", "NNS"), ("in", "IN"), ("Paris", "NNP"), (".", ".")]
    english = PerceptronTagger(load=False)
    english.train([ptb] * 20, nr_iter=1)
    english.save_to_json(lang="eng", loc=str(model_dir))

    tagger = load_tagger("nltk")
    assert prompt_tree._ptb_to_upos("(", "-LRB-") == "PUNCT"
    assert prompt_tree._ptb_to_upos("''", "''") == "PUNCT"
    assert tagger.tag([w for w, _ in ptb]) == [
        ("The", "DET"), ("dog", "NOUN"), ("is", "AUX"), ("chasing", "VERB"), ("two", "NUM"),
        ("red", "ADJ"), ("balls", "NOUN"), ("in", "ADP"), ("Paris", "PROPN"), (".", "PUNCT")]
    assert triples(parse_prompt("The dog is chasing two red balls in Paris.", tagger=tagger)) == [
        ("dog", "The dog", None), ("balls", "is chasing two red balls", "dog"),
        ("Paris", "in Paris", "balls")]
