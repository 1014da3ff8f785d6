"""Quality gain of G-Refine against the base images, always-refine and best-of-2: ``grefine evaluate``.

Runs the command (every option passes through) and prints, per method, the ratios a reader
compares with the paper: how many metrics got worse on the mean (its negative optimisations),
the mean change per metric, and the cost per image as a multiple of the base image's. The
numbers are measured in this one run; the images and scores stay in ``--out``, so a second run
prints the same table without generating anything.

    python benchmarks/quality_gain.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out eval-sd15
    python benchmarks/quality_gain.py --tiny --out /tmp/eval-tiny --metric my_metrics:sharpness

With ``--tiny`` the pictures are meaningless (random weights): it checks the pipeline, not quality.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from grefine_hooks.cli import main as grefine


def summarise(document: dict) -> str:
    """Per method: negatives on the mean, cost relative to the base, and each metric's change."""
    loaded = [metric for metric in document["metrics"] if metric["error"] is None]
    base_seconds = document["methods"]["base"]["seconds_per_image"]
    lines = [f"{document['prompts']} prompt(s), {len(loaded)} metric(s) scored of {len(document['metrics'])}"]
    for metric in document["metrics"]:
        if metric["error"] is not None:
            lines.append(f"  not scored: {metric['name']}: {metric['error']}")
    for name, row in document["methods"].items():
        if name == "base":
            continue
        cost = row["seconds_per_image"] / base_seconds if base_seconds else float("nan")
        changes = ", ".join(
            f"{metric['name']} {row['cells'][metric['name']]['change']:+.4g}" for metric in loaded
        )
        lines.append(
            f"{name:>14}: negatives on mean {row['negatives_on_mean']}/{len(loaded)} "
            f"(significant {row['negatives_significant']}), per image {row['negatives_per_image']:.2f}; "
            f"refine rate {100 * row['refine_rate']:.0f}%; cost {cost:.2f}x base; {changes}"
        )
    return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", required=True)
    directory = Path(out.parse_known_args(argv)[0].out)
    code = grefine(["evaluate", *argv])  # prints the full table
    if code != 0:
        return code
    print()
    print(summarise(json.loads((directory / "evaluation.json").read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
