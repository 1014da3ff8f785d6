"""Does refining pay off? Treatment against control, with bootstrap confidence intervals.

An A/B log answers with a difference and its uncertainty, not two means: "treatment raises p by
0.08 [0.05, 0.11] and costs +0.9 s per image; users liked it 4 points more [1, 7]". Each
difference of means gets a two-sample bootstrap interval from :func:`scipy.stats.bootstrap`
(BCa, the arms resampled independently, seeded so a report reads the same every time). The unit
resampled is the image: an image rated by several users counts once, with the mean of its ratings,
since ratings of one image are not independent draws.

>>> comparison = QualityLog("quality.sqlite").compare()  # doctest: +SKIP
>>> comparison.verdict  # doctest: +SKIP
'treatment vs control (95% CI): raises p by 0.080 [0.050, 0.110]; ...'
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
from scipy import stats

from .records import ARMS, REFINE_DECISIONS, Feedback, QualityRecord

#: Fewer records than this in an arm (for a metric) and no interval is given. Below about ten
#: values per arm the bootstrap distribution is too coarse and its intervals too narrow.
MIN_PER_ARM = 10
#: The compared means: what the caller got (p, a), what it cost, what users said.
METRICS = ("p_final", "a_final", "added_seconds", "feedback")


@dataclass(frozen=True)
class ArmStats:
    """One arm's numbers.

    Attributes:
        count (`int`): records. refine_rate, revert_rate, fail_rate (`float`): shares of records
            refinement ran on (refined, reverted or failed), the guard reverted, a stage failed.
        p_final_mean, a_final_mean (`float`): mean score of the image the caller got (after for
            ``refined``, before otherwise; see `QualityLog.summary`).
        added_seconds_mean, added_seconds_p95 (`float`): seconds added per image (scoring and
            refinement), mean and 95th percentile (linear interpolation).
        feedback_mean (`float`): mean over rated images of each image's mean feedback score.
        feedback_count (`int`): feedback entries; feedback_records (`int`): images rated.

    Means, rates and percentiles are None when nothing in the arm has the value.
    """

    count: int
    refine_rate: float | None
    revert_rate: float | None
    fail_rate: float | None
    p_final_mean: float | None
    a_final_mean: float | None
    added_seconds_mean: float | None
    added_seconds_p95: float | None
    feedback_mean: float | None
    feedback_count: int
    feedback_records: int


@dataclass(frozen=True)
class Difference:
    """Treatment minus control of one metric's mean, with its confidence interval.

    ``estimate`` is None when an arm has no value; ``low`` and ``high`` are None when an arm has
    fewer than ``MIN_PER_ARM`` values, and ``note`` then says so.
    """

    metric: str
    estimate: float | None
    low: float | None
    high: float | None
    n_control: int
    n_treatment: int
    note: str | None = None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_arms` found: both arms, the differences, and a one-line verdict."""

    arms: dict[str, ArmStats]
    differences: dict[str, Difference]
    verdict: str
    confidence: float
    n_resamples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``grefine ab --json``)."""
        return {
            "arms": {arm: asdict(values) for arm, values in self.arms.items()},
            "differences": {name: asdict(value) for name, value in self.differences.items()},
            "verdict": self.verdict,
            "confidence": self.confidence,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "min_per_arm": MIN_PER_ARM,
        }


def compare_arms(
    records: Iterable[QualityRecord],
    feedback: Iterable[Feedback] = (),
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> Comparison:
    """Per-arm numbers and treatment-minus-control differences with bootstrap intervals.

    Args:
        records: the records compared (feedback on other records is ignored).
        feedback: feedback on them, any number per record.
        confidence (`float`, defaults to `0.95`): the intervals' confidence level, in (0, 1).
        n_resamples (`int`, defaults to `9999`): bootstrap resamples per interval (scipy's default).
        seed (`int`, defaults to `0`): seeds the resampling; same inputs and seed, same intervals.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    records = list(records)
    ratings: dict[str, list[float]] = defaultdict(list)
    known = {record.record_id for record in records}
    for item in feedback:
        if item.record_id in known:
            ratings[item.record_id].append(item.score)
    samples = {arm: _samples([r for r in records if r.arm == arm], ratings) for arm in ARMS}
    arms = {arm: _arm_stats([r for r in records if r.arm == arm], samples[arm], ratings) for arm in ARMS}
    differences = {
        metric: _difference(
            metric, samples["treatment"][metric], samples["control"][metric], confidence, n_resamples, seed + index
        )
        for index, metric in enumerate(METRICS)
    }
    return Comparison(arms, differences, _verdict(arms, differences, confidence), confidence, n_resamples, seed)


def _samples(records: list[QualityRecord], ratings: dict[str, list[float]]) -> dict[str, np.ndarray]:
    """Per metric, one value per record that has it."""
    final_p = [record.p_after if record.decision == "refined" else record.p_before for record in records]
    final_a = [record.a_after if record.decision == "refined" else record.a_before for record in records]
    return {
        "p_final": np.array([value for value in final_p if value is not None], dtype=float),
        "a_final": np.array([value for value in final_a if value is not None], dtype=float),
        "added_seconds": np.array([record.added_seconds for record in records], dtype=float),
        "feedback": np.array(
            [statistics.fmean(ratings[r.record_id]) for r in records if ratings.get(r.record_id)], dtype=float
        ),
    }


def _arm_stats(
    records: list[QualityRecord], samples: dict[str, np.ndarray], ratings: dict[str, list[float]]
) -> ArmStats:
    count = len(records)

    def share(decisions: tuple[str, ...]) -> float | None:
        return sum(record.decision in decisions for record in records) / count if count else None

    def mean(values: np.ndarray) -> float | None:
        return float(np.mean(values)) if values.size else None

    seconds = samples["added_seconds"]
    return ArmStats(
        count=count,
        refine_rate=share(REFINE_DECISIONS),
        revert_rate=share(("reverted",)),
        fail_rate=share(("failed",)),
        p_final_mean=mean(samples["p_final"]),
        a_final_mean=mean(samples["a_final"]),
        added_seconds_mean=mean(seconds),
        added_seconds_p95=float(np.percentile(seconds, 95)) if seconds.size else None,
        feedback_mean=mean(samples["feedback"]),
        feedback_count=sum(len(ratings.get(record.record_id, ())) for record in records),
        feedback_records=int(samples["feedback"].size),
    )


def _mean_difference(treatment: np.ndarray, control: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(treatment, axis=axis) - np.mean(control, axis=axis)


def _difference(
    metric: str, treatment: np.ndarray, control: np.ndarray, confidence: float, n_resamples: int, seed: int
) -> Difference:
    sizes = {"n_control": int(control.size), "n_treatment": int(treatment.size)}
    if not treatment.size or not control.size:
        return Difference(metric, None, None, None, **sizes, note="an arm has no values")
    estimate = float(_mean_difference(treatment, control))
    if min(treatment.size, control.size) < MIN_PER_ARM:
        note = (
            f"too few for an interval: control {control.size}, treatment {treatment.size} "
            f"(need {MIN_PER_ARM} per arm)"
        )
        return Difference(metric, estimate, None, None, **sizes, note=note)
    if np.ptp(treatment) == 0 and np.ptp(control) == 0:
        return Difference(metric, estimate, estimate, estimate, **sizes)  # no spread: no uncertainty
    low, high = math.nan, math.nan
    for method in ("BCa", "percentile"):  # BCa fails (NaN) only on near-degenerate data
        result = stats.bootstrap(
            (treatment, control), _mean_difference, n_resamples=n_resamples, confidence_level=confidence,
            method=method, vectorized=True, rng=np.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            break
    return Difference(metric, estimate, low, high, **sizes)


# Per metric: its name in words, the phrases for a rise and a fall, the display scale and format
# (feedback in points: hundredths of the [0, 1] rating scale).
_WORDS = {
    "p_final": ("p", "raises p by {}", "lowers p by {}", 1.0, "{:.3f}"),
    "a_final": ("a", "raises a by {}", "lowers a by {}", 1.0, "{:.3f}"),
    "added_seconds": ("added time", "costs +{} s per image", "saves {} s per image", 1.0, "{:.2f}"),
    "feedback": ("user feedback", "users liked it {} points more", "users liked it {} points less", 100.0, "{:.1f}"),
}


def _verdict(arms: dict[str, ArmStats], differences: dict[str, Difference], confidence: float) -> str:
    """One line: each difference in words with its interval, or why there is none."""
    empty = [arm for arm in ARMS if arms[arm].count == 0]
    if empty:
        return f"no comparison: no records in the {' and '.join(empty)} arm{'s' if len(empty) > 1 else ''}"
    if min(arms[arm].count for arm in ARMS) < MIN_PER_ARM:
        return (
            f"too few records for an interval: control {arms['control'].count}, treatment "
            f"{arms['treatment'].count} (need {MIN_PER_ARM} per arm)"
        )
    parts = [_phrase(differences[metric], *_WORDS[metric]) for metric in METRICS]
    return f"treatment vs control ({100 * confidence:g}% CI): " + "; ".join(parts)


def _phrase(difference: Difference, name: str, rise: str, fall: str, scale: float, form: str) -> str:
    if difference.estimate is None:
        return f"no {name} in {'both arms' if not difference.n_control + difference.n_treatment else 'one arm'}"
    if difference.low is None:
        return f"{name}: {difference.note}"
    value, low, high = (number * scale for number in (difference.estimate, difference.low, difference.high))
    interval = f"[{form.format(low)}, {form.format(high)}]"
    if not difference.excludes_zero:
        return f"no clear change in {name} ({form.format(value)} {interval})"
    return f"{(rise if value > 0 else fall).format(form.format(abs(value)))} {interval}"


# Rows of the text and HTML tables: (label, ArmStats field, format).
ARM_ROWS = (
    ("images", "count", "{:d}"),
    ("refine rate", "refine_rate", "{:.1%}"),
    ("revert rate", "revert_rate", "{:.1%}"),
    ("fail rate", "fail_rate", "{:.1%}"),
    ("mean final p", "p_final_mean", "{:.3f}"),
    ("mean final a", "a_final_mean", "{:.3f}"),
    ("mean added s", "added_seconds_mean", "{:.2f}"),
    ("p95 added s", "added_seconds_p95", "{:.2f}"),
    ("mean feedback", "feedback_mean", "{:.3f}"),
    ("feedback given", "feedback_count", "{:d}"),
    ("images rated", "feedback_records", "{:d}"),
)
#: Which ArmStats mean each difference is of, and its display form.
DIFFERENCE_ROWS = {
    "p_final": ("mean final p", "{:+.3f}"),
    "a_final": ("mean final a", "{:+.3f}"),
    "added_seconds": ("mean added s", "{:+.2f}"),
    "feedback": ("mean feedback", "{:+.3f}"),
}


def format_value(form: str, value: Any) -> str:
    return "-" if value is None else form.format(value)


def format_difference(difference: Difference, form: str) -> tuple[str, str]:
    """(estimate, interval) as text; the interval says why it is missing instead of a number."""
    if difference.estimate is None:
        return "-", difference.note or "-"
    if difference.low is None:
        return format_value(form, difference.estimate), difference.note or "-"
    return format_value(form, difference.estimate), f"[{form.format(difference.low)}, {form.format(difference.high)}]"


def format_comparison(comparison: Comparison) -> str:
    """The comparison as a plain-text table and the verdict (``grefine ab``)."""
    lines = [f"{'':16}{'control':>12}{'treatment':>12}"]
    for label, name, form in ARM_ROWS:
        values = [format_value(form, getattr(comparison.arms[arm], name)) for arm in ARMS]
        lines.append(f"{label:16}{values[0]:>12}{values[1]:>12}")
    level = f"{100 * comparison.confidence:g}%"
    lines += ["", f"treatment - control, {level} bootstrap interval (BCa, {comparison.n_resamples} resamples, "
              f"seed {comparison.seed}):"]
    for metric, (label, form) in DIFFERENCE_ROWS.items():
        estimate, interval = format_difference(comparison.differences[metric], form)
        lines.append(f"{label:16}{estimate:>12}  {interval}")
    lines += ["", comparison.verdict]
    return "\n".join(lines)
