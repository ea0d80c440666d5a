"""Evaluation: perplexity on real text and zero-shot accuracy through lm-evaluation-harness."""

from ..data.corpora import prepare_corpora  # the text sources themselves: cardhouse.data.corpora
from .metrics import METRICS, MetricSpec, metric_keys, metric_of, register_metric
from .perplexity import PerplexityResult, build_windows, perplexity
from .zeroshot import PAPER_TASKS, ZERO_SHOT_TASKS, ZeroShot, prepare_zero_shot_data, zero_shot

__all__ = [
    "METRICS", "MetricSpec", "metric_keys", "metric_of", "register_metric",
    "PerplexityResult", "build_windows", "perplexity",
    "PAPER_TASKS", "ZERO_SHOT_TASKS", "prepare_zero_shot_data", "zero_shot", "ZeroShot",
    "prepare_all",
]


def prepare_all() -> None:
    """Fetch and cache every corpus and the zero-shot data, so that evaluation later runs offline."""
    prepare_corpora()
    prepare_zero_shot_data()
