"""The quality-gain table: per method, each metric's mean, its change from the base images with a
bootstrap interval, and how often the method made things worse (the paper's negative optimisations).

Every method's images share their prompts and seeds with the base images, so a change is the
mean of per-prompt differences and its interval a one-sample bootstrap of those differences
(`scipy.stats.bootstrap`, BCa). "Worse" follows each metric's direction (``lower_better``):

* ``negatives_on_mean``: metrics whose mean moved the wrong way, as the paper counts them (one
  in 52 for G-Refine, against ten or more for the other optimisers);
* ``negatives_significant``: of those, the ones whose whole interval lies on the wrong side;
* ``negatives_per_image``: the mean, over prompts, of the number of metrics on which the image
  scores below its base image; per metric, ``worse_share`` is the share of such images.

>>> table = build_table(scores, metrics, refine_rates, seconds)  # doctest: +SKIP
>>> print(format_table(table))                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from ..ab_stats import MIN_PER_ARM
from .metrics import worse

#: The compared methods, base first.
METHODS = ("base", "g-refine", "always-refine", "best-of-2")
#: What each method is, for the table's legend.
METHOD_DESCRIPTIONS = {
    "base": "the pipeline's image as generated (seed S + i)",
    "g-refine": "the image G-Refine returns under the policy (gate, two stages, never-worse guard)",
    "always-refine": "both stages on every image: no gate, no guard",
    "best-of-2": "the better of the base image and a second one (seed S + i + 1000000) by the scorer's (p + a) / 2",
}
#: Fewer paired prompts than this and no interval is given (as for the A/B intervals).
MIN_PAIRS = MIN_PER_ARM


@dataclass(frozen=True)
class MetricColumn:
    """A metric as the table shows it: its direction, or why it has no numbers."""

    name: str
    lower_better: bool = False
    kind: str = "custom"
    error: str | None = None


@dataclass
class Cell:
    """One method on one metric.

    Attributes:
        n: prompts with a score for this method and for the base image.
        mean: the method's mean score over those prompts.
        change, low, high: mean of (method - base) and its bootstrap interval (None with fewer than
            `MIN_PAIRS` prompts; equal to ``change`` when every difference is the same).
        worse_share: share of prompts whose image scores worse than its base image.
    """

    n: int
    mean: float | None
    change: float | None = None
    low: float | None = None
    high: float | None = None
    worse_share: float | None = None

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass
class MethodRow:
    """One method: a `Cell` per loaded metric, its negative optimisations, refine rate and cost."""

    method: str
    cells: dict[str, Cell]
    negatives_on_mean: int
    negatives_significant: int
    negatives_per_image: float | None
    refine_rate: float
    seconds_per_image: float | None
    images: int


@dataclass
class EvaluationTable:
    """The whole table; `to_dict` is what ``evaluation.json`` holds."""

    metrics: list[MetricColumn]
    rows: dict[str, MethodRow]
    prompts: int
    confidence: float
    n_resamples: int
    seed: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def loaded(self) -> list[MetricColumn]:
        return [metric for metric in self.metrics if metric.error is None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "confidence": self.confidence,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "min_pairs": MIN_PAIRS,
            "metrics": [asdict(metric) for metric in self.metrics],
            "methods": {name: {**asdict(row), "cells": {k: asdict(v) for k, v in row.cells.items()}}
                        for name, row in self.rows.items()},
            "method_descriptions": {name: METHOD_DESCRIPTIONS[name] for name in self.rows},
            **self.details,
        }


def build_table(
    scores: Mapping[str, Mapping[str, Sequence[float | None]]],
    metrics: Sequence[MetricColumn],
    refine_rates: Mapping[str, float],
    seconds: Mapping[str, Sequence[float]],
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> EvaluationTable:
    """The table from per-prompt scores.

    Args:
        scores: ``scores[method][metric]`` is one score per prompt (None where there is none), the
            prompts in the same order for every method; ``"base"`` must be among the methods.
        metrics: every metric asked for, those that did not load with their ``error`` set (they
            are listed, with no numbers).
        refine_rates: per method, the share of its images refinement ran on.
        seconds: per method, the seconds each of its images took.
    """
    if "base" not in scores:
        raise ValueError("scores must hold the base images' scores (method 'base')")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    loaded = [metric for metric in metrics if metric.error is None]
    base = {metric.name: _array(scores["base"].get(metric.name)) for metric in loaded}
    prompts = max((values.size for values in base.values()), default=0)
    rows = {}
    for method in (name for name in METHODS if name in scores):
        cells: dict[str, Cell] = {}
        worse_counts: np.ndarray | None = None
        for metric in loaded:
            values = _array(scores[method].get(metric.name))
            cells[metric.name] = _cell(values, base[metric.name], method == "base", metric.lower_better,
                                       confidence, n_resamples, seed)
            paired = ~np.isnan(values) & ~np.isnan(base[metric.name])
            if method != "base" and paired.any():
                worse_here = np.where(paired, _worse_array(values, base[metric.name], metric.lower_better), 0)
                worse_counts = worse_here if worse_counts is None else worse_counts + worse_here
        negatives = [name for name, cell in cells.items() if cell.change is not None
                     and worse(_lower_better(loaded, name), cell.change, 0.0)]
        durations = [value for value in seconds.get(method, ()) if value is not None]
        rows[method] = MethodRow(
            method=method,
            cells=cells,
            negatives_on_mean=len(negatives),
            negatives_significant=sum(cells[name].significant for name in negatives),
            negatives_per_image=None if worse_counts is None else float(np.mean(worse_counts)),
            refine_rate=float(refine_rates.get(method, 0.0)),
            seconds_per_image=float(np.mean(durations)) if durations else None,
            images=len(durations),
        )
    return EvaluationTable(list(metrics), rows, prompts, confidence, n_resamples, seed)


def format_table(table: EvaluationTable) -> str:
    """The table as text: one block per metric, then the per-method summary."""
    level = f"{100 * table.confidence:g}%"
    lines = [f"Quality gain over the base images, {table.prompts} prompt(s); change = mean(method - base), "
             f"{level} bootstrap interval (BCa, {table.n_resamples} resamples, seed {table.seed})"]
    header = f"  {'method':<14} {'mean':>10} {'change':>10} {level + ' interval':>24} {'worse':>7}"
    for metric in table.metrics:
        arrow = "lower is better" if metric.lower_better else "higher is better"
        if metric.error is not None:
            lines += ["", f"{metric.name}: NOT SCORED: {metric.error}"]
            continue
        lines += ["", f"{metric.name} ({metric.kind}, {arrow})", header]
        for method, row in table.rows.items():
            cell = row.cells[metric.name]
            interval = "-" if cell.low is None else f"[{cell.low:+.4g}, {cell.high:+.4g}]"
            mark = " (worse)" if cell.change is not None and worse(metric.lower_better, cell.change, 0.0) else ""
            lines.append(
                f"  {method:<14} {_number(cell.mean):>10} {_signed(cell.change):>10} {interval:>24} "
                f"{_percent(cell.worse_share):>7}{mark}"
            )
    loaded = len(table.loaded)
    lines += ["", f"  {'method':<14} {'negatives on mean':>18} {'(significant)':>14} {'per image':>10} "
              f"{'refine rate':>12} {'s/image':>9}"]
    for method, row in table.rows.items():
        per_image = "-" if row.negatives_per_image is None else f"{row.negatives_per_image:.2f}"
        seconds = "-" if row.seconds_per_image is None else f"{row.seconds_per_image:.2f}"
        on_mean = "-" if method == "base" else f"{row.negatives_on_mean}/{loaded}"
        significant = "-" if method == "base" else str(row.negatives_significant)
        lines.append(f"  {method:<14} {on_mean:>18} {significant:>14} {per_image:>10} "
                     f"{_percent(row.refine_rate):>12} {seconds:>9}")
    lines += ["", "negatives on mean: metrics whose mean got worse than the base's (the paper's negative "
              "optimisations); significant: the interval too; per image: metrics worse than the image's own "
              "base, averaged over prompts; worse: share of images worse than their base on that metric."]
    for method in table.rows:
        lines.append(f"  {method}: {METHOD_DESCRIPTIONS[method]}")
    return "\n".join(lines)


def _cell(values: np.ndarray, base: np.ndarray, is_base: bool, lower_better: bool, confidence: float,
          n_resamples: int, seed: int) -> Cell:
    present = values[~np.isnan(values)]
    mean = float(np.mean(present)) if present.size else None
    if is_base:
        return Cell(int(present.size), mean)
    paired = ~np.isnan(values) & ~np.isnan(base)
    differences = values[paired] - base[paired]
    if not differences.size:
        return Cell(0, mean)
    cell = Cell(
        n=int(differences.size),
        mean=float(np.mean(values[paired])),
        change=float(np.mean(differences)),
        worse_share=float(np.mean(_worse_array(values[paired], base[paired], lower_better))),
    )
    cell.low, cell.high = _interval(differences, confidence, n_resamples, seed)
    return cell


def _interval(differences: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float | None, float | None]:
    if differences.size < MIN_PAIRS:
        return None, None
    if np.ptp(differences) == 0:
        return float(differences[0]), float(differences[0])  # no spread: no uncertainty
    low = high = math.nan
    for method in ("BCa", "percentile"):  # BCa fails (NaN) only on near-degenerate data
        result = stats.bootstrap(
            (differences,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method=method,
            vectorized=True, rng=np.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            break
    return low, high


def _worse_array(values: np.ndarray, base: np.ndarray, lower_better: bool) -> np.ndarray:
    return (values > base) if lower_better else (values < base)


def _lower_better(metrics: Sequence[MetricColumn], name: str) -> bool:
    return next(metric.lower_better for metric in metrics if metric.name == name)


def _array(values: Sequence[float | None] | None) -> np.ndarray:
    return np.array([math.nan if value is None else value for value in (() if values is None else values)],
                    dtype=np.float64)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
