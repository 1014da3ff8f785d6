"""Read ``t2i_dev.jsonl`` and score ``parse_prompt`` against its labels (used by the tests and
``benchmarks/prompt_tree.py``).

Three measures, each a fraction of the labels of its kind:

* **object recall**: a labelled object is found when some phrase's noun is the object as a whole
  (a compound such as "stop sign" included), up to a plural "s"/"es" on either side;
* **attribute binding**: the attribute word is in its object's phrase and in no phrase of an
  object it is not labelled for (a word labelled for two objects, "two bees, two vases", may be
  in both of their phrases; an occurrence that no label speaks for, "a black and green tile
  bathroom with a black toilet", may be anywhere);
* **relation attachment**: for "A <rel> B", B's phrase has A's phrase as its ancestor.

A label whose object is not found counts as a miss for binding and relations too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEV_SET = Path(__file__).resolve().parent / "t2i_dev.jsonl"
HELDOUT_SET = Path(__file__).resolve().parent / "t2i_heldout.jsonl"
SEALED_SET = Path(__file__).resolve().parent / "t2i_sealed.jsonl"


def load(path: Path = DEV_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _same(noun: str, label: str) -> bool:
    noun, label = noun.lower(), label.lower()
    return noun == label or noun in (label + "s", label + "es") or label in (noun + "s", noun + "es")


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " ").split()


def find(phrases: Sequence, label: str) -> int | None:
    """Index of the first phrase whose noun is ``label``, or None."""
    return next((j for j, p in enumerate(phrases) if _same(p.noun, label)), None)


@dataclass
class Tally:
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: list[str] = field(default_factory=list)
    misses: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, kind: str, ok: bool, prompt: str, what: str) -> None:
        self.totals[kind] += 1
        self.hits[kind] += ok
        if not ok:
            self.misses.append((kind, prompt, what))

    def rate(self, kind: str) -> float | None:
        return self.hits[kind] / self.totals[kind] if self.totals[kind] else None


def score(items: Sequence[dict], parse: Callable[[str], Sequence]) -> Tally:
    """Parse every prompt and tally the three measures."""
    tally = Tally()
    for it in items:
        try:
            phrases = parse(it["prompt"])
        except Exception as error:  # a crash is a failure of every label of the prompt
            tally.failures.append(f"{it['prompt']!r}: {type(error).__name__}: {error}")
            phrases = []
        for obj in it["objects"]:
            tally.add("objects", find(phrases, obj) is not None, it["prompt"], obj)
        for attr, obj in it["attributes"]:
            j = find(phrases, obj)
            owners = {find(phrases, o) for a, o in it["attributes"] if a == attr}
            # occurrences of the word that no label speaks for may sit in any phrase
            spare = _words(it["prompt"]).count(attr) - sum(a == attr for a, _ in it["attributes"])
            strays = sum(_words(p.text).count(attr) for k, p in enumerate(phrases) if k not in owners)
            ok = j is not None and attr in _words(phrases[j].text) and strays <= max(spare, 0)
            tally.add("binding", ok, it["prompt"], f"{attr} -> {obj}")
        for subject, rel, obj in it["relations"]:
            i, j = find(phrases, subject), find(phrases, obj)
            ok = i is not None and j is not None and phrases[j].ancestor_index == i
            tally.add("relations", ok, it["prompt"], f"{obj} under {subject} ({rel})")
    return tally


def by_category(items: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        groups[f"{it['source']}/{it['category']}"].append(it)
    return dict(groups)
