#!/usr/bin/env python
"""Build ``t2i_heldout.jsonl``, the labelled HELD-OUT set for the prompt tree (see README.md).

The prompts come from benchmark files the rules in ``prompt_tree.py`` were not developed on
(``heldout/``, copied verbatim, sources and licences in README.md). Every label comes by rule from
the benchmark's own template or structure, never by hand, and never by running the parser:

* T2I-CompBench ``3d_spatial_val``: "a A <in front of|behind|hidden by> a B": objects A, B and
  the relation (B's phrase hangs under A's).
* T2I-CompBench ``numeracy_val``: every "<number word> NOUN" (one..eight) is a counted object with
  its count bound to it; in the list part of a prompt (items split at commas and "and") an item
  "a/an NOUN" is an object too.
* T2I-CompBench ``shape_val``: "a(n) SHAPE NOUN and a(n) SHAPE NOUN" (NOUN may be several words:
  "speed limit sign"; a NOUN with "of" in it is not labelled, its head is ambiguous), and the
  sentence lines "The SHAPE NOUN and the SHAPE NOUN <were|was|stood|hung|...>" with one-word nouns.
  The shape (or size) word is bound to its noun.
* T2I-CompBench ``non_spatial_val``: the lines *not* in the development file, labelled with the
  development set's "A SUBJECT is VERB-ing [PREP] DET OBJECT" rule.
* CC-500: "a COLOUR NOUN and a COLOUR NOUN" (colour bound to its noun), and its
  "a COLOUR NOUN <on top of|to the left of|...> a COLOUR NOUN" lines (bindings and the relation).
* Attend-and-Excite: "a A and a B" (objects), "a A with a B" (objects; B hangs under A),
  "a A and a COLOUR B" and "a COLOUR A and a COLOUR B" (colours bound).

Each held-out prompt also gets a *styled* twin, category ``<category>+style``, labels unchanged:
its first letter capitalised, a framing prefix when the prompt is a bare noun phrase ("A photo
of ...", "An oil painting of ...") and trailing style tags (", 4k, trending on artstation"), picked
in turn from the lists below. Prefixes and tags are the common ones of public prompt collections;
none was chosen by looking at the parser's output.

    python tests/data/t2i/build_heldout_set.py   # rewrites t2i_heldout.jsonl beside it
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from build_dev_set import _ACTION, item

HERE = Path(__file__).resolve().parent
RAW = HERE / "heldout"

NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
FRAMES = ("a photo of", "an oil painting of", "a 3d render of", "a close-up of", "a picture of",
          "a watercolor painting of", "a high-resolution photograph of", "a digital illustration of")
TAGS = (", 4k, trending on artstation", ", highly detailed, octane render", ", digital art",
        ", 8k uhd, sharp focus", ", cinematic lighting, masterpiece", ", studio lighting",
        "", ", by greg rutkowski, unreal engine")


def lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.startswith("#")]


def unique(objects: list[str]) -> bool:
    """A prompt that names the same object twice is not labelled (a phrase has one noun)."""
    return len({o.lower() for o in objects}) == len(objects)


_3D = re.compile(r"^an? (\w+) (in front of|behind|hidden by) an? (\w+)$")


def compbench_3d_spatial() -> list[dict]:
    out = []
    for prompt in lines(RAW / "compbench_3d_spatial_val.txt"):
        m = _3D.match(prompt)
        if m and unique([m[1], m[3]]):
            out.append(item("t2i-compbench", "3d_spatial", prompt, [m[1], m[3]],
                            relations=[(m[1], m[2], m[3])]))
    return out


_COUNTED = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r") (\w+)")
_ITEM_SPLIT = re.compile(r",\s*(?:and\s+)?|\s+and\s+")


def compbench_numeracy() -> list[dict]:
    out = []
    for prompt in lines(RAW / "compbench_numeracy_val.txt"):
        objects, attributes = [], []
        for number, noun in _COUNTED.findall(prompt):
            objects.append(noun)
            attributes.append((number, noun))
        if "," in prompt:  # a list: its "a/an NOUN" items are objects too
            for part in _ITEM_SPLIT.split(prompt):
                if m := re.match(r"^an? (\w+)", part):
                    objects.append(m[1])
        objects = list(dict.fromkeys(objects))
        if objects and unique(objects):
            out.append(item("t2i-compbench", "numeracy", prompt, objects, attributes))
    return out


_SHAPE_PAIR = re.compile(r"^an? (\w+) ([A-Za-z' ]+?) and an? (\w+) ([A-Za-z' ]+?)\.?$")
_SHAPE_SENTENCE = re.compile(r"^(?:A|The) (\w+) (\w+) and (?:a|the) (\w+) (\w+) "
                             r"(?:were|was|stood|hung|floated|sat|made|created|provided)\b")


def compbench_shape() -> list[dict]:
    out = []
    for prompt in lines(RAW / "compbench_shape_val.txt"):
        m = _SHAPE_PAIR.match(prompt) or _SHAPE_SENTENCE.match(prompt)
        if not m:
            continue
        pairs = [(m[1], m[2]), (m[3], m[4])]
        pairs = [(attr, noun) for attr, noun in pairs if " of " not in f" {noun} "]
        objects = [noun for _, noun in pairs]
        if objects and unique(objects):
            out.append(item("t2i-compbench", "shape", prompt, objects, pairs))
    return out


def compbench_non_spatial(name: str = "compbench_non_spatial_val.txt") -> list[dict]:
    seen = set(lines(HERE / "compbench_non_spatial_val.txt"))
    out = []
    for prompt in lines(RAW / name):
        m = _ACTION.match(prompt)
        if m and prompt not in seen:
            subject, verb, prep, obj = m.groups()
            rel = verb if prep is None else f"{verb} {prep}"
            if unique([subject, obj]):
                out.append(item("t2i-compbench", "non_spatial", prompt, [subject, obj],
                                relations=[(subject, rel, obj)]))
    return out


_CC_PAIR = re.compile(r"^(?:an? )?(\w+) ([a-z ]+?) and (?:an? )?(\w+) ([a-z ]+)$", re.IGNORECASE)
_CC_REL = re.compile(r"^an? (\w+) ([a-z ]+?) (on top of|to the right of|to the left of|next to|"
                     r"in front of) an? (\w+) ([a-z ]+)$")


def cc500() -> list[dict]:
    out = []
    for prompt in lines(RAW / "cc500.txt"):
        if m := _CC_REL.match(prompt):
            ca, a, rel, cb, b = m.groups()
            if unique([a, b]):
                out.append(item("cc-500", "spatial", prompt, [a, b], [(ca, a), (cb, b)],
                                [(a, rel, b)]))
        elif m := _CC_PAIR.match(prompt):
            ca, a, cb, b = m.groups()
            if unique([a, b]):
                out.append(item("cc-500", "color", prompt, [a, b], [(ca, a), (cb, b)]))
    return out


_AE_WITH = re.compile(r"^an? (\w+) with an? (\w+)$")
_AE_AND = re.compile(r"^an? (?:(\w+) )?(\w+) and an? (?:(\w+) )?(\w+)$")


def attend_excite() -> list[dict]:
    out, category = [], None
    for raw in (RAW / "attend_excite_prompts.txt").read_text(encoding="utf-8").splitlines():
        if raw.startswith("# "):
            category = raw[2:].strip()
            continue
        prompt = raw.strip()
        if not prompt:
            continue
        if m := _AE_WITH.match(prompt):
            out.append(item("attend-excite", category, prompt, [m[1], m[2]],
                            relations=[(m[1], "with", m[2])]))
        elif m := _AE_AND.match(prompt):
            ca, a, cb, b = m.groups()
            if not unique([a, b]):
                continue
            bound = [(c, o) for c, o in ((ca, a), (cb, b)) if c]
            out.append(item("attend-excite", category, prompt, [a, b], bound))
    return out


_CHUNK = re.compile(r"^an? (?:(\w+) )?(\w+)$")
_COLOURS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
            "white", "gray", "grey"}


def feng_level_3() -> list[dict]:
    """Three objects joined by ",", "and" and "with": "a A with a B , a COLOUR C".

    Objects and colours by the template; B hangs under A where "a A with a B" is not part of a
    longer "with" chain (in "a A with a B with a C" the attachment is ambiguous).
    """
    out = []
    for prompt in lines(RAW / "feng_level_3.txt"):
        parts = re.split(r" (,|and|with) ", prompt)
        chunks, links = parts[::2], parts[1::2]
        matches = [_CHUNK.match(c) for c in chunks]
        if not all(matches) or any(m[1] and m[1] not in _COLOURS for m in matches):
            continue
        objects = [m[2] for m in matches]
        if not unique(objects):
            continue
        attributes = [(m[1], m[2]) for m in matches if m[1]]
        relations = [(objects[k], "with", objects[k + 1]) for k, link in enumerate(links)
                     if link == "with" and links.count("with") == 1]
        out.append(item("structured-diffusion", "level_3", prompt, objects, attributes, relations))
    return out


_ABC_COLOURS = _COLOURS | {"silver", "gold", "tan", "beige"}
_BOUNDARY = {None, ".", ",", "and", "with", "on", "in", "inside", "is", "are", "sitting", "sits",
             "standing", "next", "near", "behind", "under", "above", "that", "which", "while",
             "has", "parked", "at", "over", "into", "against", "reads", "looking", "hangs", "flies",
             "of", "for", "to"}
_FUNCTION = {"a", "an", "the", "and", "with", "on", "in", "is", "are", "of", "to", "at", "one",
             "other", "some"}
_C = "(" + "|".join(sorted(_ABC_COLOURS)) + ")"
_ABC_REL = re.compile(r"^(?:a|an|the) (?:\w+ )?" + _C + r" (\w+) (?:is )?(?:\w+ )?(on top of|"
                      r"in front of|next to|behind|inside|on|near|under|above) (?:a|an|the) "
                      r"(?:\w+ )?" + _C + r" (\w+)\.?$")


def abc6k(name: str = "abc6k_originals.txt") -> list[dict]:
    """COCO captions with two colour words (ABC-6K's original captions, its odd lines).

    A colour word followed by one word and then a boundary (end, comma, "and", "with", a
    preposition, "is", ...) binds the colour to that word, an object ("a white toilet with";
    not "a red tiled floor", "a grey counter top": the word after the colour must end the noun
    phrase). "[det] [adj] COLOUR X [is] [verb] <on|on top of|in front of|next to|behind|inside|
    near|under|above> det [adj] COLOUR Y" also gives the relation (Y hangs under X).
    """
    out = []
    for prompt in lines(RAW / name):
        toks = re.findall(r"[a-z0-9']+|[.,]", prompt.lower())
        pairs = []
        for i, tok in enumerate(toks[:-1]):
            word, after = toks[i + 1], toks[i + 2] if i + 2 < len(toks) else None
            if (tok in _ABC_COLOURS and word.isalpha() and word not in _ABC_COLOURS
                    and word not in _FUNCTION and after in _BOUNDARY):
                pairs.append((tok, word))
        objects = [w for _, w in pairs]
        if not pairs or not unique(objects):
            continue
        relations = []
        if (m := _ABC_REL.match(prompt.lower())) and m[1] in _ABC_COLOURS and m[4] in _ABC_COLOURS:
            if m[2] in objects and m[5] in objects:
                relations.append((m[2], m[3], m[5]))
        out.append(item("abc-6k", "coco_captions", prompt, objects, pairs, relations))
    return out


_FINITE = re.compile(r"\b(is|are|was|were)\b|^(?:A|The) ")


def styled(items: list[dict]) -> list[dict]:
    """A twin of every prompt with a capital letter, a framing prefix and style tags."""
    out = []
    for k, it in enumerate(items):
        prompt = it["prompt"].rstrip(".")
        if not _FINITE.search(prompt):  # a bare noun phrase can be framed
            prompt = f"{FRAMES[k % len(FRAMES)]} {prompt}"
        prompt = prompt[0].upper() + prompt[1:] + TAGS[k % len(TAGS)]
        out.append({**it, "category": it["category"] + "+style", "prompt": prompt})
    return out


def not_in_dev(items: list[dict]) -> list[dict]:
    """Drops prompts the development set has too (T2I-CompBench took some of CC-500's)."""
    dev = {json.loads(ln)["prompt"].lower()
           for ln in (HERE / "t2i_dev.jsonl").read_text(encoding="utf-8").splitlines() if ln}
    return [it for it in items if it["prompt"].lower() not in dev]


def build() -> list[dict]:
    base = not_in_dev(compbench_3d_spatial() + compbench_numeracy() + compbench_shape()
                      + compbench_non_spatial() + cc500() + attend_excite() + feng_level_3()
                      + abc6k())
    return base + styled(base)


def build_sealed() -> list[dict]:
    base = not_in_dev(abc6k("abc6k_originals_2.txt")
                      + compbench_non_spatial("compbench_non_spatial_train.txt"))
    return base + styled(base)


def write(items: list[dict], name: str) -> None:
    with open(HERE / name, "w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps(it) + "\n")
    print(f"wrote {len(items)} prompts to {HERE / name}")


def main() -> None:
    write(build(), "t2i_heldout.jsonl")
    write(build_sealed(), "t2i_sealed.jsonl")


if __name__ == "__main__":
    main()
