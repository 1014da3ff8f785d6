"""The prompt tree on labelled text-to-image benchmark prompts: accuracy per category, and speed.

Reads ``tests/data/t2i/t2i_dev.jsonl`` (GenEval-template and T2I-CompBench prompts with
object / attribute / relation labels made by rule, see its README) and prints, per category,
object recall, attribute binding and relation attachment of ``parse_prompt``, then the time per
prompt: the median of ``--repeats`` passes over the whole set (one pass parses every prompt
once, in a shuffled order; the first pass scores the set, which also loads the tagger), as wall
time and as the process's CPU time (the fairer figure on a machine shared with other work).

    python benchmarks/prompt_tree.py
    python benchmarks/prompt_tree.py --misses 20     # also list the first misses
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
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one side
    return parser.parse_args(argv)


def worker(checkout: Path, repeats: int) -> dict:
    """Score and time ``parse_prompt`` of one checkout (run in a subprocess of its own)."""
    sys.path.insert(0, str(checkout))
    from grefine_hooks import parse_prompt

    items = labels.load()
    rows = {}
    for name, group in [*sorted(labels.by_category(items).items()), ("ALL", items)]:
        tally = labels.score(group, parse_prompt)
        rows[name] = {k: (tally.rate(k), tally.totals[k]) for k in KINDS}
    overall = labels.score(items, parse_prompt)
    prompts = [it["prompt"] for it in items]
    rng = random.Random(0)
    per_prompt, cpu_per_prompt = [], []
    for _ in range(repeats):
        rng.shuffle(prompts)
        started, cpu_started = time.perf_counter(), time.process_time()
        for prompt in prompts:
            parse_prompt(prompt)
        per_prompt.append((time.perf_counter() - started) / len(prompts))
        cpu_per_prompt.append((time.process_time() - cpu_started) / len(prompts))
    return {"rows": rows, "failures": overall.failures, "misses": overall.misses,
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
    print(f"{'category':30s} " + "   ".join(f"[{name}] {header}" for name in sides))
    for row in first["this"]["rows"]:
        print(f"{row:30s} " + "   ".join(
            " " * (len(name) + 3) + " ".join(fmt(first[name]["rows"][row][k]) for k in KINDS)
            for name in sides))
    for name in sides:
        print(f"[{name}] failures (exceptions): {len(first[name]['failures'])}")
        for line in first[name]["failures"][:5]:
            print("  ", line)
    for kind, prompt, what in first["this"]["misses"][: args.misses]:
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


if __name__ == "__main__":
    main()
