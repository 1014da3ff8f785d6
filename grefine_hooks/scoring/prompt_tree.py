"""Prompt syntax tree and phrase split for the alignment-quality indicator (AQ-Map).

G-Refine (Li et al. 2024, "G-Refine: A General Quality Refiner for Text-to-Image
Generation"), section 3.2: the prompt is parsed into a syntax tree, every noun
head becomes the centre of a phrase and every other word joins its nearest noun
centre (eq. 4). Splitting the prompt this way loses the tree's nesting, so each
phrase is then given an *ancestor* phrase from the original tree
(Algorithm 1, ``get_phrase_ancestor``): when a noun is missing from the image,
the scorer draws the phrase on the region of its ancestor instead.

The paper (and its reference code) used a dependency parser; here everything is
nltk and runs offline:

* tokens come from nltk's regex-based ``NLTKWordTokenizer`` (no punkt data);
* UPOS tags come from a perceptron trained in-house on UD English EWT and shipped
  in ``grefine_hooks/data`` (see ``TAGGER_NOTICE.md`` there), or from nltk's own
  English tagger if the user has installed it (``load_tagger("nltk")``);
* the tree comes from a cascaded ``nltk.RegexpParser`` chunk grammar over UPOS.

"Nearest" noun (eq. 4): from a word, climb the tree to the first constituent
that contains a noun centre, then take the centre fewest levels below it; on a
tie take the first centre after the word (prepositions, determiners and verbs
precede the noun they go with), else the closest one before it. Words never
join a noun in another comma segment, so a segment without a noun ("highly
detailed") gives no phrase. Conjunctions and punctuation that link constituents
join no phrase; inside a noun phrase ("a black and white cat") they stay with it.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple, Protocol

import nltk
from nltk.jsontags import JSONTaggedDecoder
from nltk.tag.perceptron import PerceptronTagger
from nltk.tokenize import NLTKWordTokenizer
from nltk.tree import Tree

__all__ = [
    "NOUN_TAGS",
    "NodeInfo",
    "Phrase",
    "UposTagger",
    "build_tree",
    "get_phrase_ancestor",
    "load_tagger",
    "parse_prompt",
]

#: UPOS tags of words that can head a phrase (the paper's "NOUN").
NOUN_TAGS = frozenset({"NOUN", "PROPN"})

MODEL_FILE = "upos_tagger_ud_ewt.json"
_NLTK_TAGGER_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"

# Cascaded chunk grammar over UPOS (plus the internal tags made by _chunk_tags: REL
# relative pronoun, POS possessive 's, OF the preposition "of", DET also for my/her...).
# One stage per line label; later stages see earlier chunks as single tags.
# Comments here must not contain a colon (nltk reads it as a stage label).
_GRAMMAR = r"""
NP: {<DET|NUM>+<ADV|ADJ|VERB|NUM>*(<PUNCT|CCONJ><ADV|ADJ|VERB|NUM>+)*<NOUN|PROPN>+}  # a red book
    {<ADV|ADJ|NUM>*(<PUNCT|CCONJ><ADV|ADJ|NUM>+)*<NOUN|PROPN>+}                      # long hair
POSS: {<NP><POS>}                  # the dog 's
NP: {<POSS><NP>}                   # the dog 's ball
PP: {<ADP>+<NP>}                   # on a table
    {<OF><NP>(?!<AUX|VERB|REL|ADV|PART>)}  # of coffee (an "of" phrase with a clause after it waits)
PP: {<PP><PP>(?!<PP>)}             # in a kitchen attaches to the PP before it (right-nested)
PP: {<PP><PP>(?!<PP>)}
PP: {<PP><PP>(?!<PP>)}
PP: {<PP><PP>+}                    # longer chains stay flat, keeping the tree shallow
NP: {<NP><PP>}                     # a cup on a table
VP: {<AUX|PART|ADV>*<VERB|AUX><ADV|PART|VERB|AUX>*<NP|PP|ADJ|ADV>*}  # riding a horse on the moon
RC: {<REL><NP>?<VP>}               # that is chasing a ball
PP: {<OF><NP><VP|RC>+}             # of a cat sleeping on a couch (the clause goes with the cat)
NP: {<NP><PP|VP|RC>+}              # a man in a suit riding a horse
COORD: {<NP>(<CCONJ><NP>)+}        # a red book and a yellow vase
"""
_CHUNKER = nltk.RegexpParser(_GRAMMAR, root_label="SEG")
_TOKENIZER = NLTKWordTokenizer()

_SEPARATORS = frozenset({",", ";", ".", "!", "?", "|", "...", "…"})
_LINK_TAGS = frozenset({"CCONJ", "SCONJ", "PUNCT"})
_REL_WORDS = frozenset({"that", "which", "who", "whom", "whose", "where"})
_POSSESSIVE_PRONOUNS = frozenset({"my", "your", "his", "her", "its", "our", "their"})
_COMPLEX_PREPOSITIONS = (
    ("in", "front", "of"),
    ("on", "top", "of"),
    ("next", "to"),
    ("close", "to"),
    ("out", "of"),
    ("because", "of"),
    ("instead", "of"),
)

# nltk's English tagger speaks Penn Treebank; this maps it to UPOS (word-independent
# except for forms of "be", which UD tags AUX). Other all-symbol tags (. , : `` '') are PUNCT.
_PTB_TO_UPOS = {
    "CC": "CCONJ", "CD": "NUM", "DT": "DET", "EX": "PRON", "FW": "X", "IN": "ADP",
    "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ", "LS": "X", "MD": "AUX",
    "NN": "NOUN", "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN", "PDT": "DET",
    "POS": "PART", "PRP": "PRON", "PRP$": "PRON", "RB": "ADV", "RBR": "ADV",
    "RBS": "ADV", "RP": "ADP", "SYM": "SYM", "TO": "PART", "UH": "INTJ",
    "VB": "VERB", "VBD": "VERB", "VBG": "VERB", "VBN": "VERB", "VBP": "VERB",
    "VBZ": "VERB", "WDT": "PRON", "WP": "PRON", "WP$": "PRON", "WRB": "ADV",
    "$": "SYM", "#": "SYM", "-LRB-": "PUNCT", "-RRB-": "PUNCT", "HYPH": "PUNCT", "NFP": "PUNCT",
}
_BE_FORMS = frozenset({"be", "is", "are", "was", "were", "been", "being", "am", "'s", "'re", "'m"})


class UposTagger(Protocol):
    """Anything with nltk's ``tag`` method that returns UPOS tags."""

    def tag(self, tokens: list[str]) -> list[tuple[str, str]]: ...


@dataclass(frozen=True)
class Phrase:
    """One phrase of eq. 4: a noun centre and the words that joined it."""

    noun: str  #: the head noun as written in the prompt
    text: str  #: the phrase's words (linking words dropped), as shown to CLIP
    ancestor: str | None  #: head noun of the ancestor phrase (Algorithm 1); None at the top
    ancestor_index: int | None  #: index of the ancestor in the returned list
    start: int  #: index of the phrase's first word among the prompt's word tokens
    end: int  #: one past its last word: the phrase lies within tokens[start:end]


@dataclass(frozen=True)
class NodeInfo:
    """What Algorithm 1 needs from a tree node: its head's UPOS and its phrase.

    Used as the label of every subtree and as every leaf of the tree handed to
    :func:`get_phrase_ancestor`; ``pos``/``phrase`` are None for nodes without a
    head (the root, comma segments, coordinations) and for linking words.
    """

    label: str
    pos: str | None
    phrase: int | None


_TreePos = tuple[int, ...]
_Below = dict[_TreePos, list[tuple[int, int]]]


class _Token(NamedTuple):
    text: str
    start: int
    end: int
    tag: str


# ---------------------------------------------------------------- taggers


class _PtbToUposTagger:
    """nltk's Penn Treebank tagger with its tags mapped to UPOS."""

    def __init__(self, tagger: PerceptronTagger) -> None:
        self._tagger = tagger

    def tag(self, tokens: list[str]) -> list[tuple[str, str]]:
        return [(word, _ptb_to_upos(word, tag)) for word, tag in self._tagger.tag(tokens)]


def _ptb_to_upos(word: str, tag: str) -> str:
    if tag.startswith("VB") and word.lower() in _BE_FORMS:
        return "AUX"
    return _PTB_TO_UPOS.get(tag, "PUNCT" if not any(c.isalnum() for c in tag) else "X")


def load_tagger(name: str = "ud-ewt") -> UposTagger:
    """Return a UPOS tagger, loaded once per process and cached.

    Args:
        name (`str`, defaults to `"ud-ewt"`): `"ud-ewt"` is the perceptron shipped in
            `grefine_hooks/data` (needs no nltk_data); `"nltk"` is nltk's own
            `averaged_perceptron_tagger_eng` with its tags mapped to UPOS, usable only
            if the user installed it: this never downloads anything.

    Raises `ValueError` for another name and `LookupError` (saying how to install
    it) when `"nltk"` is asked for but not installed.
    """
    if name not in ("ud-ewt", "nltk"):
        raise ValueError(f"load_tagger: unknown name={name!r}; expected 'ud-ewt' or 'nltk'")
    return _load_tagger(name)


@functools.cache
def _load_tagger(name: str) -> UposTagger:
    if name == "nltk":
        return _load_nltk_tagger()
    text = (resources.files("grefine_hooks") / "data" / MODEL_FILE).read_text(encoding="utf-8")
    # nltk's tagged-JSON decoder rebuilds the PerceptronTagger (no pickle, no nltk_data).
    return json.loads(text, cls=JSONTaggedDecoder)


def _load_nltk_tagger() -> UposTagger:
    try:
        nltk.data.find(_NLTK_TAGGER_RESOURCE)
    except LookupError:
        raise LookupError(
            "load_tagger('nltk'): nltk's 'averaged_perceptron_tagger_eng' is not installed, "
            "and grefine_hooks never downloads data. Install it yourself (on a machine with "
            "internet: python -m nltk.downloader averaged_perceptron_tagger_eng, then copy the "
            "nltk_data folder to this machine and point NLTK_DATA at it), or use "
            "load_tagger('ud-ewt'), which ships with the package."
        ) from None
    return _PtbToUposTagger(PerceptronTagger(lang="eng"))


# ------------------------------------------------------- tokens and tree


def _tokens(prompt: str, tagger: UposTagger | None) -> list[_Token]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    spans = _spans(prompt)
    if not spans:
        return []
    words = [prompt[start:end] for start, end in spans]
    tagged = (load_tagger() if tagger is None else tagger).tag(words)
    return [
        _Token(word, start, end, _fix_tag(word, tag))
        for word, (start, end), (_, tag) in zip(words, spans, tagged, strict=True)
    ]


def _spans(prompt: str) -> list[tuple[int, int]]:
    """Token character spans, with full stops inside the prompt split off.

    The treebank tokenizer expects one sentence and splits only the final full
    stop, so "a tree. a house" would otherwise keep "tree." as one word.
    """
    spans: list[tuple[int, int]] = []
    for start, end in _TOKENIZER.span_tokenize(prompt):
        if end - start > 2 and prompt[end - 1] == "." and prompt[start : end - 1].isalpha():
            spans += [(start, end - 1), (end - 1, end)]
        else:
            spans.append((start, end))
    return spans


def _fix_tag(word: str, tag: str) -> str:
    """Booru-style counts glued to a noun ("1girl", "2boys") look like numbers to the tagger."""
    digits = len(word) - len(word.lstrip("0123456789"))
    if 0 < digits and len(word) - digits >= 3 and word[digits:].isalpha():
        return "NOUN"
    return tag


def _chunk_tags(tokens: Sequence[_Token]) -> list[str]:
    """UPOS, refined where the grammar needs a word-level distinction UPOS does not make."""
    lower = [t.text.lower() for t in tokens]
    tags = [t.tag for t in tokens]
    for i, tok in enumerate(tokens):
        if lower[i] in _POSSESSIVE_PRONOUNS and tok.tag == "PRON":
            tags[i] = "DET"
        elif lower[i] in ("'s", "'") and tok.tag == "PART":
            tags[i] = "POS"
        elif lower[i] in _REL_WORDS and i > 0 and tokens[i - 1].tag in NOUN_TAGS:
            tags[i] = "REL"
        elif lower[i] == "of" and tok.tag == "ADP":
            tags[i] = "OF"
    for i in range(len(tokens)):
        for words in _COMPLEX_PREPOSITIONS:
            if tuple(lower[i : i + len(words)]) == words:
                tags[i : i + len(words)] = ["ADP"] * len(words)
    return tags


def _segments(tokens: Sequence[_Token], gaps: Sequence[str]) -> list[list[int] | int]:
    """Split at commas, full stops and line breaks; a separator stays a bare token index.

    ``gaps[i]`` is the prompt text just before token i. A segment that has no noun
    and starts with a determiner ("a red, shiny apple") is an unfinished noun
    phrase, so the comma after it does not split.
    """
    pieces: list[list[int] | int] = []
    current: list[int] = []
    for i, tok in enumerate(tokens):
        separator = (tok.tag == "PUNCT" and tok.text in _SEPARATORS
                     and not _unfinished(tokens, current))
        if current and (separator or "\n" in gaps[i]):
            pieces.append(current)
            current = []
        if separator:
            pieces.append(i)
        else:
            current.append(i)
    if current:
        pieces.append(current)
    return pieces


def _unfinished(tokens: Sequence[_Token], segment: list[int]) -> bool:
    return (
        bool(segment)
        and tokens[segment[0]].tag == "DET"
        and not any(tokens[i].tag in NOUN_TAGS for i in segment)
    )


def _index_tree(prompt: str, tokens: Sequence[_Token]) -> Tree:
    """Chunk each segment with the grammar; leaves are token indices."""
    gaps = [prompt[tokens[i - 1].end if i else 0 : tok.start] for i, tok in enumerate(tokens)]
    tags = _chunk_tags(tokens)
    children: list[Tree | int] = []
    for piece in _segments(tokens, gaps):
        if isinstance(piece, int):
            children.append(piece)
            continue
        chunked = _CHUNKER.parse(Tree("SEG", [(str(i), tags[i]) for i in piece]))
        children.append(_leaves_to_indices(chunked))
    return Tree("S", children)


def _leaves_to_indices(tree: Tree) -> Tree:
    return Tree(
        tree.label(),
        [_leaves_to_indices(c) if isinstance(c, Tree) else int(c[0]) for c in tree],
    )


def build_tree(prompt: str, tagger: UposTagger | None = None) -> Tree:
    """The prompt's syntax tree: root ``S``, one ``SEG`` per comma segment, leaves ``(word, UPOS)``.

    Labels: NP noun phrase, PP prepositional phrase, VP verb group with its
    objects, RC relative clause, POSS possessor, COORD coordination. Separators
    (commas, full stops) are leaves of ``S``. Arguments as for `parse_prompt`.

    >>> print(build_tree("a man riding a horse").pformat(margin=100))
    (S (SEG (NP (NP a/DET man/NOUN) (VP riding/VERB (NP a/DET horse/NOUN)))))
    """
    tokens = _tokens(prompt, tagger)
    return _word_leaves(_index_tree(prompt, tokens), tokens)


def _word_leaves(tree: Tree, tokens: Sequence[_Token]) -> Tree:
    return Tree(
        tree.label(),
        [_word_leaves(c, tokens) if isinstance(c, Tree) else (tokens[c].text, tokens[c].tag)
         for c in tree],
    )


# ------------------------------------------------------------------ heads


def _head(node: Tree | int, tokens: Sequence[_Token]) -> int | None:
    """Token index of a constituent's head word, or None (root, segment, coordination).

    Why: eq. 4 takes noun heads as phrase centres, and Algorithm 1 asks of each
    enclosing node whether its head is a noun.
    """
    if isinstance(node, int):
        return node
    label = node.label()
    if label == "NP":
        nouns = [c for c in node if isinstance(c, int) and tokens[c].tag in NOUN_TAGS]
        return nouns[-1] if nouns else _first_child_head(node, ("NP",), tokens)
    if label in ("PP", "POSS"):
        return _first_child_head(node, ("NP", "PP"), tokens)
    if label == "RC":
        return _first_child_head(node, ("VP",), tokens)
    if label == "VP":
        for wanted in ("VERB", "AUX"):
            heads = [c for c in node if isinstance(c, int) and tokens[c].tag == wanted]
            if heads:
                return heads[0]
    return None


def _first_child_head(node: Tree, labels: tuple[str, ...], tokens: Sequence[_Token]) -> int | None:
    for child in node:
        if isinstance(child, Tree) and child.label() in labels:
            return _head(child, tokens)
    return None


def _noun_centres(tree: Tree, tokens: Sequence[_Token]) -> list[int]:
    """Token indices of the phrase centres, in prompt order: the heads of all noun phrases."""
    heads = {_head(np, tokens) for np in tree.subtrees(lambda t: t.label() == "NP")}
    return sorted(h for h in heads if h is not None)


# ------------------------------------------------------------------ eq. 4


def _assign_phrases(tree: Tree, tokens: Sequence[_Token], centres: list[int]) -> list[int | None]:
    """Eq. 4: the phrase index each token joins (None for linking words and noun-less segments)."""
    leaf_positions = tree.treepositions("leaves")
    centre_of = {c: j for j, c in enumerate(centres)}
    below = _centres_below(leaf_positions, centres)
    phrase_of: list[int | None] = []
    for i, pos in enumerate(leaf_positions):
        if i in centre_of:
            phrase_of.append(centre_of[i])
        elif tokens[i].tag in _LINK_TAGS and tree[pos[:-1]].label() != "NP":
            phrase_of.append(None)
        else:
            phrase_of.append(_nearest_centre(i, pos, below, centres))
    return phrase_of


def _centres_below(leaf_positions: Sequence[_TreePos], centres: list[int]) -> _Below:
    """For every node below the root: (depth under it, phrase) of each centre it contains."""
    below: _Below = {}
    for j, c in enumerate(centres):
        pos = leaf_positions[c]
        for k in range(1, len(pos)):  # the root is left out: words never join across segments
            below.setdefault(pos[:k], []).append((len(pos) - k, j))
    return below


def _nearest_centre(i: int, pos: _TreePos, below: _Below, centres: list[int]) -> int | None:
    """Climb from token i to the first node holding a centre; shallowest centre, then the following one."""
    for k in range(len(pos) - 1, 0, -1):
        candidates = below.get(pos[:k])
        if candidates:
            depth = min(d for d, _ in candidates)
            closest = [j for d, j in candidates if d == depth]
            after = [j for j in closest if centres[j] > i]
            return min(after) if after else max(closest)
    return None


# ------------------------------------------------------------ Algorithm 1


def _annotated(node: Tree | int, tokens: Sequence[_Token], phrase_of: list[int | None]) -> Tree | NodeInfo:
    """The tree with every node replaced by its NodeInfo, as get_phrase_ancestor reads it."""
    if isinstance(node, int):
        return NodeInfo(tokens[node].text, tokens[node].tag, phrase_of[node])
    head = _head(node, tokens)
    info = NodeInfo(
        node.label(),
        None if head is None else tokens[head].tag,
        None if head is None else phrase_of[head],
    )
    return Tree(info, [_annotated(c, tokens, phrase_of) for c in node])


def _info(node: Tree | NodeInfo) -> NodeInfo:
    return node.label() if isinstance(node, Tree) else node


def get_phrase_ancestor(tree: Tree) -> dict[int, int | None]:
    """Algorithm 1 of the paper: map each phrase to its ancestor phrase (None at the top).

    ``tree`` carries a :class:`NodeInfo` on every node (labels and leaves). As in
    the paper, ``stack`` maps each node to its phrase and ``ans`` each phrase to
    its ancestor; the tree is walked breadth first, and where a child belongs to
    another phrase than its parent, the child's phrase gets the phrase of the
    first enclosing node whose head is a NOUN/PROPN of a different phrase.
    Breadth first meets a phrase's topmost node first; that meeting decides
    (the paper's loop would let deeper ones overwrite it).
    """
    positions = tree.treepositions()
    stack = {pos: _info(tree[pos]).phrase for pos in positions}
    ans: dict[int, int | None] = {p: None for p in stack.values() if p is not None}
    decided: set[int] = set()
    queue = deque([()])
    while queue:
        obj = queue.popleft()
        if not isinstance(tree[obj], Tree):
            continue
        for k in range(len(tree[obj])):
            child = obj + (k,)
            queue.append(child)
            phrase = stack[child]
            if phrase is None or phrase == stack[obj] or phrase in decided:
                continue
            decided.add(phrase)
            ans[phrase] = _first_noun_ancestor(tree, child, stack)
    return ans


def _first_noun_ancestor(tree: Tree, child: _TreePos, stack: dict[_TreePos, int | None]) -> int | None:
    phrase = stack[child]
    for depth in range(len(child) - 1, -1, -1):
        ancestor = child[:depth]
        if _info(tree[ancestor]).pos in NOUN_TAGS and stack[ancestor] not in (None, phrase):
            return stack[ancestor]
    return None


# ------------------------------------------------------------- public API


def parse_prompt(prompt: str, tagger: UposTagger | None = None) -> list[Phrase]:
    """Split a prompt into noun-centred phrases with ancestors (eq. 4 + Algorithm 1).

    Args:
        prompt (`str`): the text-to-image prompt, any length or language.
        tagger (`UposTagger`, *optional*): defaults to `load_tagger("ud-ewt")`.

    Returns `list[Phrase]` in the order of their nouns in the prompt; `[]` when the
    prompt has no noun (or is empty), and the scorer then uses the whole prompt.
    Raises `TypeError` if `prompt` is not a `str`.

    >>> [(p.noun, p.text, p.ancestor) for p in parse_prompt("a cup on a table in a kitchen")]
    [('cup', 'a cup', None), ('table', 'on a table', 'cup'), ('kitchen', 'in a kitchen', 'table')]
    """
    tokens = _tokens(prompt, tagger)
    if not tokens:
        return []
    tree = _index_tree(prompt, tokens)
    centres = _noun_centres(tree, tokens)
    phrase_of = _assign_phrases(tree, tokens, centres)
    ans = get_phrase_ancestor(_annotated(tree, tokens, phrase_of))
    members: list[list[int]] = [[] for _ in centres]
    for i, j in enumerate(phrase_of):
        if j is not None:
            members[j].append(i)
    return [
        _phrase(tokens, centres[j], members[j], ans.get(j), centres)
        for j in range(len(centres))
    ]


def _phrase(tokens: Sequence[_Token], centre: int, words: list[int], ancestor: int | None,
            centres: list[int]) -> Phrase:
    return Phrase(
        noun=tokens[centre].text,
        text=_join(tokens, words),
        ancestor=None if ancestor is None else tokens[centres[ancestor]].text,
        ancestor_index=ancestor,
        start=words[0],
        end=words[-1] + 1,
    )


def _join(tokens: Sequence[_Token], words: list[int]) -> str:
    """Words spaced as in the prompt ("dog's" stays one word); a gap becomes one space."""
    text = tokens[words[0]].text
    for prev, cur in itertools.pairwise(words):
        glued = cur == prev + 1 and tokens[cur].start == tokens[prev].end
        text += ("" if glued else " ") + tokens[cur].text
    return text
