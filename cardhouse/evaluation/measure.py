"""One measurement function for every variant: perplexities and, optionally, zero-shot accuracy.

The corpora are tokenized once, so each variant is evaluated on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..models.loading import LoadedModel
from .corpora import get_corpus, tokenize_corpus
from .perplexity import perplexity


@dataclass
class Budget:
    corpora: list[str] = field(default_factory=lambda: ["wikipedia"])
    max_tokens: int = 4096  # corpus tokens per corpus (BOS not counted)
    context: int = 512
    batch_size: int = 4
    tasks: list[str] = field(default_factory=list)  # zero-shot tasks (lm-eval)
    limit: int | None = None  # zero-shot examples per task

    def __post_init__(self):  # a bad budget fails before any model time is spent
        for name in self.corpora:
            get_corpus(name)  # an unknown name raises, listing the known ones
        if self.tasks:
            from .zeroshot import check_tasks

            check_tasks(self.tasks)
        if self.corpora and self.max_tokens < self.context - 1:
            raise ValueError(f"max_tokens ({self.max_tokens}) must fill at least one window (context {self.context})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def measurer(lm: LoadedModel, budget: Budget, progress: bool = True) -> Callable[[LoadedModel], dict]:
    from ..models.spec import spec_of
    from ..validation import check_options

    check_options(spec_of(lm), context=budget.context)  # a window longer than the model's positions fails here
    tokens = {name: tokenize_corpus(lm.tokenizer, name, budget.max_tokens) for name in budget.corpora}

    def measure(lm: LoadedModel) -> dict:
        out = {}
        for name, ids in tokens.items():
            result = perplexity(lm.model, ids, context=budget.context, bos_id=lm.bos_id,
                                batch_size=budget.batch_size, progress=progress)
            out[f"ppl_{name}"] = result.ppl
            out[f"tokens_{name}"] = result.n_predicted_tokens
        if budget.tasks:
            from .zeroshot import zero_shot

            scores = zero_shot(lm.model, lm.tokenizer, budget.tasks, limit=budget.limit)
            out.update({f"acc_{t}": scores[t]["acc"] for t in budget.tasks})
            out["acc_mean"] = scores["mean_acc"]
        return out

    return measure
