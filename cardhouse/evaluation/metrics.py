"""The metric registry (in the manner of lm-eval's): what each number in a results row means.

A ``MetricSpec`` says whether higher is better, whether to plot it on a log scale, its unit and
format, and how it is computed. A metric measured per corpus or per task (``per``) has one row
key per source, ``NAME_SOURCE`` (``ppl_wikipedia``, ``acc_arc_easy``); the others have the key
``NAME`` (``acc_mean``, ``val_loss``). Consumers (tables, plots, reports) find a row's metrics
with ``metric_keys(row)`` and read the spec with ``metric_of(key)``, so a registered metric
shows up everywhere and a key that is no metric (``tokens_wikipedia``) never does.

``measure`` builds the measurement once per model and budget (tokenizing the corpora, say)
and returns a function ``lm -> {key: value}`` run once per variant, or None when the budget
does not ask for it. Adding a metric is one ``register_metric`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ..data.token_cache import tokenize_corpus
from ..models.loading import LoadedModel
from .perplexity import perplexity
from .zeroshot import ZeroShot

if TYPE_CHECKING:  # the budget module imports this one
    from .measure import Budget

Measure = Callable[[LoadedModel], dict]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    title: str
    higher_is_better: bool
    log_scale: bool = False
    unit: str = ""
    per: str | None = None  # "corpus" or "task": one key per source, NAME_SOURCE
    fmt: str = ",.3f"
    # (lm, budget, progress) -> lm -> {key: value}; None: computed by another metric's measure
    measure: Callable[[LoadedModel, "Budget", bool], Measure | None] | None = None

    def key(self, source: str | None = None) -> str:
        return self.name if self.per is None else f"{self.name}_{source}"

    def matches(self, key: str) -> bool:
        return key == self.name if self.per is None else key.startswith(self.name + "_")

    def source(self, key: str) -> str | None:
        return None if self.per is None else key[len(self.name) + 1:]

    def format(self, value) -> str:
        return "–" if value is None else format(value, self.fmt)

    def label(self, key: str) -> str:
        """``perplexity (wikipedia)`` for axis titles."""
        source = self.source(key)
        return self.title if source is None else f"{self.title} ({source})"


METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    METRICS[spec.name] = spec
    return spec


def metric_of(key: str) -> MetricSpec | None:
    """The spec of a row key (an exact name first, so ``acc_mean`` is not read as task "mean")."""
    if key in METRICS and METRICS[key].per is None:
        return METRICS[key]
    return next((spec for spec in METRICS.values() if spec.per is not None and spec.matches(key)), None)


def metric_keys(row: dict, keys: Iterable[str] | None = None) -> list[str]:
    """The keys of ``row`` (or ``keys``) that are registered metrics, in row order."""
    return [key for key in (row if keys is None else keys) if metric_of(key) is not None]


def _perplexity(lm: LoadedModel, budget: "Budget", progress: bool) -> Measure | None:
    if not budget.corpora:
        return None
    tokens = {name: tokenize_corpus(lm.tokenizer, name, budget.max_tokens) for name in budget.corpora}

    def measure(lm: LoadedModel) -> dict:
        out = {}
        for name, ids in tokens.items():
            result = perplexity(lm.model, ids, context=budget.context, bos_id=lm.bos_id,
                                batch_size=budget.batch_size, progress=progress)
            out[PPL.key(name)] = result.ppl
            out[f"tokens_{name}"] = result.n_predicted_tokens  # a count beside the metric, not a metric
        return out

    return measure


def _zero_shot(lm: LoadedModel, budget: "Budget", progress: bool) -> Measure | None:
    if not budget.tasks:
        return None

    evaluators: dict[int, ZeroShot] = {}  # set up once per model: the variants of a sweep share it

    def measure(lm: LoadedModel) -> dict:
        if id(lm.model) not in evaluators:
            evaluators[id(lm.model)] = ZeroShot(lm.model, lm.tokenizer, budget.tasks, limit=budget.limit,
                                                backend=budget.backend)
        scores = evaluators[id(lm.model)]()
        return {**{ACC.key(t): scores[t]["acc"] for t in budget.tasks}, ACC_MEAN.key(): scores["mean_acc"]}

    return measure


PPL = register_metric(MetricSpec("ppl", "perplexity", higher_is_better=False, log_scale=True, per="corpus",
                                 fmt=",.2f", measure=_perplexity))
ACC = register_metric(MetricSpec("acc", "zero-shot accuracy", higher_is_better=True, per="task", measure=_zero_shot))
ACC_MEAN = register_metric(MetricSpec("acc_mean", "mean zero-shot accuracy", higher_is_better=True))
VAL_LOSS = register_metric(MetricSpec("val_loss", "validation loss", higher_is_better=False, unit="nats/token",
                                      fmt=",.4f"))


def curve_metrics(row: dict) -> list[str]:
    """The metrics worth one curve each (a sweep plot): every per-corpus metric and the single-number
    ones, not each zero-shot task (their mean stands for them)."""
    return [key for key in metric_keys(row) if metric_of(key).per != "task"]
