#!/usr/bin/env python
"""Build ``t2i_dev.jsonl``, the labelled development set for the prompt tree (see README.md).

Every prompt gets its labels by rule from its benchmark's own structure, never by hand:

* GenEval templates (``a photo of ...``) are generated here over the 80 COCO class names, and
  the labels are the template's slots: objects, a colour or count bound to an object, and for
  ``position`` prompts "A <rel> B" (B's phrase must hang under A's).
* T2I-CompBench validation prompts (files beside this script, copied verbatim): ``color`` and
  ``texture`` are "a(n) ATTR OBJECT and a(n) ATTR OBJECT" (lines of another shape are skipped),
  ``spatial`` is "a A <relation> a B", ``non_spatial`` is "A SUBJECT is VERB-ing [PREP] DET OBJECT
  ...", of which the subject and the first object (and their relation) are labelled.

    python tests/data/t2i/build_dev_set.py   # rewrites t2i_dev.jsonl beside it
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

COCO = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
POSITIONS = ["left of", "right of", "above", "below"]
SPATIAL = ["on the left of", "on the right of", "on the top of", "on the bottom of", "on side of",
           "next to", "near"]


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(name: str) -> str:
    return name + ("es" if name.endswith("s") else "s")


def item(source, category, prompt, objects, attributes=(), relations=()):
    return {"source": source, "category": category, "prompt": prompt, "objects": list(objects),
            "attributes": [list(a) for a in attributes], "relations": [list(r) for r in relations]}


def geneval(rng: random.Random, n: int = 60) -> list[dict]:
    out = [item("geneval", "single_object", f"a photo of {article(c)}", [c]) for c in COCO]
    for _ in range(n):
        a, b = rng.sample(COCO, 2)
        out.append(item("geneval", "two_object", f"a photo of {article(a)} and {article(b)}", [a, b]))
    for _ in range(n):
        c, k = rng.choice(COCO), rng.randint(2, 4)
        out.append(item("geneval", "counting", f"a photo of {NUMBERS[k]} {plural(c)}", [plural(c)],
                        [(NUMBERS[k], plural(c))]))
    coloured = [c for c in COCO if c != "person"]
    for _ in range(n):
        c, col = rng.choice(coloured), rng.choice(COLORS)
        out.append(item("geneval", "colors", f"a photo of {article(col)} {c}", [c], [(col, c)]))
    for _ in range(n):
        a, b = rng.sample(COCO, 2)
        rel = rng.choice(POSITIONS)
        out.append(item("geneval", "position", f"a photo of {article(a)} {rel} {article(b)}",
                        [a, b], relations=[(a, rel, b)]))
    for _ in range(n):
        a, b = rng.sample(coloured, 2)
        ca, cb = rng.sample(COLORS, 2)
        out.append(item("geneval", "color_attr",
                        f"a photo of {article(ca)} {a} and {article(cb)} {b}", [a, b],
                        [(ca, a), (cb, b)]))
    return out


def lines(name: str) -> list[str]:
    return [ln.strip() for ln in (HERE / name).read_text(encoding="utf-8").splitlines() if ln.strip()]


_ATTR_PAIR = re.compile(r"^(?:an? )?(\w+) ([a-z ]+?) and (?:an? )?(\w+) ([a-z ]+)$")
_SPATIAL = re.compile(r"^an? ([a-z ]+?) (" + "|".join(SPATIAL) + r") an? ([a-z ]+)$")
_ACTION = re.compile(r"^(?:A|The) (\w+) is (\w+ing)(?: (with|on|at|in|after))? (?:a|an|the|his|her|its) "
                     r"([a-z]+(?: [a-z]+)?)(?: and | on | at | in | with | for | by |\.)")


def compbench() -> list[dict]:
    out = []
    for category in ("color", "texture"):
        for prompt in lines(f"compbench_{category}_val.txt"):
            m = _ATTR_PAIR.match(prompt)
            if m:
                ca, a, cb, b = m.groups()
                out.append(item("t2i-compbench", category, prompt, [a, b], [(ca, a), (cb, b)]))
    for prompt in lines("compbench_spatial_val.txt"):
        m = _SPATIAL.match(prompt)
        if m:
            a, rel, b = m.groups()
            out.append(item("t2i-compbench", "spatial", prompt, [a, b], relations=[(a, rel, b)]))
    for prompt in lines("compbench_non_spatial_val.txt"):
        m = _ACTION.match(prompt)
        if m:
            subject, verb, prep, obj = m.groups()
            rel = verb if prep is None else f"{verb} {prep}"
            out.append(item("t2i-compbench", "non_spatial", prompt, [subject, obj],
                            relations=[(subject, rel, obj)]))
    return out


def main() -> None:
    items = geneval(random.Random(20240601)) + compbench()
    with open(HERE / "t2i_dev.jsonl", "w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps(it) + "\n")
    print(f"wrote {len(items)} prompts to {HERE / 't2i_dev.jsonl'}")


if __name__ == "__main__":
    main()
