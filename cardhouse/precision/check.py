"""The whole precision check of one model: headroom, a real low-precision run, and (optionally) the
function-preserving rescale that makes it fit, verified the three ways that matter: the float32 logits,
the low-precision run, and perplexity in low precision against float32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.token_cache import tokenize_corpus
from ..evaluation.measure import Budget
from ..evaluation.perplexity import perplexity
from ..models.loading import LoadedModel
from .headroom import DTYPES, cast_copy, first_nonfinite, headroom
from .rescale import choose_power, logits_change, plan_rescale, rescaled, scaled_points


@dataclass
class PrecisionSettings:
    dtype: str = "float16"  # the format the model is really run in
    rescale: bool = False
    power: int | None = None  # None: chosen from the headroom
    margin: float = 2.0  # doublings kept free below the format's largest value
    batch_size: int = 8
    corpora: tuple[str, ...] = ("wikipedia",)
    max_tokens: int = 0  # corpus tokens for perplexity in low precision vs float32 (0: skip)
    context: int = 256

    def __post_init__(self):  # bad input fails before any model time is spent
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; this check runs models in {', '.join(DTYPES)}")
        if self.power is not None and self.power < 0:
            raise ValueError(f"--power must be >= 0, got {self.power}")
        if not 0 <= self.margin <= 16:
            raise ValueError(f"--margin is in doublings (powers of two) and must lie in 0..16, got {self.margin}")
        if self.max_tokens:

            Budget(corpora=list(self.corpora), max_tokens=self.max_tokens, context=self.context)

    def to_dict(self) -> dict:
        return {**self.__dict__, "corpora": list(self.corpora)}


def _perplexities(lm: LoadedModel, settings: PrecisionSettings) -> list[dict]:
    """Per corpus: perplexity in float32 and of a cast copy in ``settings.dtype``, on the same tokens."""
    low_model = cast_copy(lm.model, DTYPES[settings.dtype])
    rows = []
    for corpus in settings.corpora:
        ids = tokenize_corpus(lm.tokenizer, corpus, max_tokens=settings.max_tokens)
        full = perplexity(lm.model, ids, context=settings.context, bos_id=lm.bos_id, progress=False)
        low = perplexity(low_model, ids, context=settings.context, bos_id=lm.bos_id, progress=False)
        rows.append({"corpus": corpus, "tokens": full.n_predicted_tokens, "float32": full.ppl,
                     settings.dtype: low.ppl, "ratio": low.ppl / full.ppl if full.ppl else float("nan")})
    return rows


def check_precision(lm: LoadedModel, token_lists: Sequence[Sequence[int]], settings: PrecisionSettings,
                    progress: bool = True) -> dict:
    """Headroom and a real run in ``settings.dtype``; with ``settings.rescale``, the same after the rescale."""
    if next(lm.model.parameters()).dtype != torch.float32:
        raise ValueError("load the model in float32: the headroom and the reference logits are measured there")
    room = headroom(lm, token_lists, batch_size=settings.batch_size, progress=progress)
    run = first_nonfinite(lm, token_lists, dtype=settings.dtype, batch_size=settings.batch_size)
    out = {"headroom": room.to_dict(), "run": run.to_dict()}
    if settings.max_tokens and not settings.rescale:
        out["perplexity"] = _perplexities(lm, settings)
    if not settings.rescale:
        return out
    power, unfixed = choose_power(room, scaled_points(lm), fmt=settings.dtype, margin=settings.margin)
    if settings.power is not None:
        power = settings.power
    plan = plan_rescale(lm, power)  # refuses (RescaleError) where it would change the function
    change = logits_change(lm, power, token_lists, batch_size=settings.batch_size)
    with rescaled(lm, power):
        after = {"headroom": headroom(lm, token_lists, batch_size=settings.batch_size, progress=progress).to_dict(),
                 "run": first_nonfinite(lm, token_lists, dtype=settings.dtype,
                                        batch_size=settings.batch_size).to_dict()}
        if settings.max_tokens:
            after["perplexity"] = _perplexities(lm, settings)
    out["rescale"] = {"plan": plan.to_dict(), "margin": settings.margin, "unfixed": unfixed,
                      "logits_change_float32": change, "after": after}
    return out
