"""One measurement function for every variant: the registered metrics (``metrics.py``) a budget asks for.

The corpora are tokenized once, so each variant is evaluated on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..models.loading import LoadedModel
from ..models.spec import spec_of
from ..data.corpora import get_corpus
from .metrics import METRICS
from .zeroshot import check_settings


@dataclass
class Budget:
    corpora: list[str] = field(default_factory=lambda: ["wikipedia"])
    max_tokens: int = 4096  # corpus tokens per corpus (BOS not counted)
    context: int = 512
    batch_size: int = 4
    tasks: list[str] = field(default_factory=list)  # zero-shot tasks (lm-eval)
    limit: int | None = None  # zero-shot examples per task
    backend: str = "cardhouse"  # zero-shot backend: cardhouse (evaluation.lm_backend) or hflm (lm-eval's)

    def __post_init__(self):  # a bad budget fails before any model time is spent
        for name in self.corpora:
            get_corpus(name)  # an unknown name raises, listing the known ones
        if self.tasks:
            check_settings(self.tasks, backend=self.backend)
        if self.corpora and self.max_tokens < self.context - 1:
            raise ValueError(f"max_tokens ({self.max_tokens}) must fill at least one window (context {self.context})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def measurer(lm: LoadedModel, budget: Budget, progress: bool = True) -> Callable[[LoadedModel], dict]:
    """One function ``lm -> {key: value}`` measuring every registered metric the budget asks for, on the
    same prepared inputs (corpus tokens) for every call."""
    spec_of(lm).check_positions(budget.context)  # a window longer than the model's positions fails here
    parts = [m for spec in METRICS.values() if spec.measure for m in [spec.measure(lm, budget, progress)] if m]

    def measure(lm: LoadedModel) -> dict:
        out: dict = {}
        for part in parts:
            out.update(part(lm))
        return out

    return measure
