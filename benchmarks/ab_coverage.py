"""Coverage of the A/B bootstrap intervals, measured on synthetic logs with a known truth.

`grefine ab` / `QualityLog.compare` promise 95 % intervals for treatment minus control. This runs
RUNS seeded synthetic logs per scenario (a known effect; no effect) through
`grefine_hooks.ab_stats.compare_arms` and prints, per metric, the share of intervals that cover
the true difference and, with no effect, the share that exclude 0 (the false-positive rate).
With 1000 runs the shares have a standard error of about 0.7 points.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ab_coverage.py [--runs 1000] [--per-arm 150] [--resamples 2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_ab_stats import synthetic_log  # noqa: E402  (the suite's generator: one definition of the truth)

from grefine_hooks.ab_stats import METRICS, compare_arms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--per-arm", type=int, default=150)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--first-seed", type=int, default=1000, help="seeds the suite's test does not use")
    args = parser.parse_args()
    for effect in (True, False):
        covered, excluded = dict.fromkeys(METRICS, 0), dict.fromkeys(METRICS, 0)
        for run in range(args.first_seed, args.first_seed + args.runs):
            records, feedback, truth = synthetic_log(np.random.default_rng(run), effect, args.per_arm)
            comparison = compare_arms(records, feedback, n_resamples=args.resamples, seed=run)
            for metric in METRICS:
                difference = comparison.differences[metric]
                covered[metric] += difference.low <= truth[metric] <= difference.high
                excluded[metric] += difference.excludes_zero
        name = "known effect" if effect else "no effect"
        print(f"{name}: {args.runs} runs, {args.per_arm} images per arm, {args.resamples} resamples")
        for metric in METRICS:
            line = f"  {metric:14} covers the truth {covered[metric] / args.runs:6.1%}"
            if not effect:
                line += f"   excludes 0 {excluded[metric] / args.runs:6.1%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
