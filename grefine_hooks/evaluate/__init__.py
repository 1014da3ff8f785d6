"""``grefine evaluate``: the quality gain of G-Refine on a model, measured with independent metrics.

`EvaluateJob` makes the images (base, G-Refine, always-refine, best-of-2), `metrics` loads the
paper's indicators (or takes any ``(images, prompts) -> scores`` callable) and `table` turns the
scores into the paper's kind of table, negative optimisations included.
"""

from .metrics import BUILTIN_METRICS, DEFAULT_METRICS, Metric, MetricLoadError, load_metric, load_metrics
from .runner import SECOND_SEED_OFFSET, EvaluateConfig, EvaluateJob, default_prompts
from .table import METHODS, EvaluationTable, MetricColumn, build_table, format_table

__all__ = [
    "BUILTIN_METRICS", "DEFAULT_METRICS", "METHODS", "SECOND_SEED_OFFSET", "EvaluateConfig", "EvaluateJob",
    "EvaluationTable", "Metric", "MetricColumn", "MetricLoadError", "build_table", "default_prompts",
    "format_table", "load_metric", "load_metrics",
]
