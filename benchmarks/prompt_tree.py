"""The prompt tree on labelled text-to-image benchmark prompts: accuracy per category, and speed.

Reads the three labelled sets in ``tests/data/t2i`` (object / attribute / relation labels made by
rule, see its README): the development set ``t2i_dev.jsonl`` (GenEval templates, T2I-CompBench
colour/texture/spatial/non-spatial lines; the rules were developed on it), the held-out set
``t2i_heldout.jsonl`` (other T2I-CompBench files, CC-500, Attend-and-Excite, Structured
Diffusion's three-object prompts, ABC-6K captions; its misses were read to find general causes)
and the sealed set ``t2i_sealed.jsonl`` (later ABC-6K captions, T2I-CompBench non-spatial
training lines; only its totals are read: do not list its misses while changing the rules), each
with styled twins. Prints, per set, source and category, object recall, attribute binding and
relation attachment of ``parse_prompt``, the prompts that raised, then the time per prompt: the
median of ``--repeats`` passes over all sets (one pass parses every prompt once, in a shuffled
order; the first pass scores the sets, which also loads the tagger), as wall time and as the
process's CPU time (the fairer figure on a machine shared with other work). Exits 1 when the
median CPU time per prompt is over ``--budget-ms`` (5 ms, the issue's bound) or a prompt raised.

    python benchmarks/prompt_tree.py
    python benchmarks/prompt_tree.py --misses 20 --set heldout   # also list the first misses
    python benchmarks/prompt_tree.py --against ../other-checkout  # before / after, interleaved
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data" / "t2i"))

import labels  # noqa: E402

KINDS = ("objects", "binding", "relations")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (rounds with --against)")
    parser.add_argument("--misses", type=int, default=0, help="list this many misses")
    parser.add_argument("--set", choices=("dev", "heldout", "sealed"), default="dev",
                        help="which set --misses lists")
    parser.add_argument("--budget-ms", type=float, default=5.0,
                        help="fail when the median CPU time per prompt is over this")
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one side
    return parser.parse_args(argv)


SETS = {"dev": labels.DEV_SET, "heldout": labels.HELDOUT_SET, "sealed": labels.SEALED_SET}


def worker(checkout: Path, repeats: int) -> dict:
    """Score and time ``parse_prompt`` of one checkout (run in a subprocess of its own)."""
    sys.path.insert(0, str(checkout))
    from grefine_hooks import parse_prompt

    rows, failures, misses, prompts = {}, [], {}, []
    for set_name, path in SETS.items():
        items = labels.load(path)
        for name, group in [*sorted(labels.by_category(items).items()), ("ALL", items)]:
            tally = labels.score(group, parse_prompt)
            rows[f"{set_name}: {name}"] = {k: (tally.rate(k), tally.totals[k]) for k in KINDS}
        styled = [it for it in items if it["category"].endswith("+style")]
        if styled:
            plain = [it for it in items if not it["category"].endswith("+style")]
            for name, group in (("ALL plain", plain), ("ALL +style", styled)):
                tally = labels.score(group, parse_prompt)
                rows[f"{set_name}: {name}"] = {k: (tally.rate(k), tally.totals[k]) for k in KINDS}
        overall = labels.score(items, parse_prompt)
        failures += overall.failures
        misses[set_name] = overall.misses
        prompts += [it["prompt"] for it in items]
    rng = random.Random(0)
    per_prompt, cpu_per_prompt = [], []
    for _ in range(repeats):
        rng.shuffle(prompts)
        started, cpu_started = time.perf_counter(), time.process_time()
        for prompt in prompts:
            parse_prompt(prompt)
        per_prompt.append((time.perf_counter() - started) / len(prompts))
        cpu_per_prompt.append((time.process_time() - cpu_started) / len(prompts))
    return {"rows": rows, "failures": failures, "misses": misses,
            "per_prompt": per_prompt, "cpu_per_prompt": cpu_per_prompt, "prompts": len(prompts)}


def run(checkout: Path, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(checkout), "--repeats", str(repeats)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def fmt(cell: list | tuple) -> str:
    rate, total = cell
    return "      -      " if rate is None else f"{rate:6.3f} ({total:4d})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return
    sides = {"this": ROOT} | ({"against": args.against.resolve()} if args.against else {})
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(args.repeats if args.against else 1):  # interleaved rounds, one pass each
        for name, checkout in sides.items():
            results[name].append(run(checkout, 1 if args.against else args.repeats))
    first = {name: rs[0] for name, rs in results.items()}

    header = " ".join(f"{k:>13s}" for k in KINDS)
    print(f"{'set: source/category':45s} " + "   ".join(f"[{name}] {header}" for name in sides))
    for row in first["this"]["rows"]:
        if row not in first[next(reversed(sides))]["rows"]:
            continue  # a set the other checkout does not have
        print(f"{row:45s} " + "   ".join(
            " " * (len(name) + 3) + " ".join(fmt(first[name]["rows"][row][k]) for k in KINDS)
            for name in sides))
    for name in sides:
        print(f"[{name}] failures (exceptions): {len(first[name]['failures'])}")
        for line in first[name]["failures"][:5]:
            print("  ", line)
    for kind, prompt, what in first["this"]["misses"][args.set][: args.misses]:
        print(f"  miss [{kind}] {prompt!r}: {what}")

    def median(name: str, key: str) -> float:
        return statistics.median(t for r in results[name] for t in r[key])

    medians = {name: median(name, "per_prompt") for name in sides}
    n = first["this"]["prompts"]
    for name in sides:
        print(f"[{name}] time per prompt: median {medians[name] * 1e3:.2f} ms wall, "
              f"{median(name, 'cpu_per_prompt') * 1e3:.2f} ms CPU "
              f"({len(results[name]) * len(results[name][0]['per_prompt'])} passes over {n} prompts)")
    if args.against:
        print(f"ratio this / against: {medians['this'] / medians['against']:.2f}x "
              f"(medians of {args.repeats} interleaved rounds)")
    cpu = median("this", "cpu_per_prompt") * 1e3
    ok = cpu <= args.budget_ms and not first["this"]["failures"]
    print(f"budget: {cpu:.2f} ms CPU per prompt against {args.budget_ms:g} ms, "
          f"{len(first['this']['failures'])} failures: {'OK' if ok else 'FAILED'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
