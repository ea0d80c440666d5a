"""Perplexity over fixed, non-overlapping windows of a token stream.

Window layout (``context`` tokens per forward pass):

- ``bos_id`` given: ``[bos] + the next (context - 1) corpus tokens``. BOS comes first
  because massive activations form on the first token; it is only ever an input, never a
  target, so every corpus token of the window is predicted (the first one from BOS alone).
- ``bos_id`` None: ``context`` corpus tokens; the first one of each window is context only.

Either way each window predicts ``context - 1`` tokens. The windows depend only on the
token ids and (``context``, ``bos_id``, ``max_tokens``), never on the model, so every
variant of a model (clean, attacked, protected) is scored on exactly the same tokens.
Corpus tokens after the last full window are not used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.placement import input_device
from ..models.streaming import streamer_of


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # inf when the loss is not finite or its exponential overflows
    nll_sum: float  # natural-log negative log-likelihood summed over the predicted tokens
    n_predicted_tokens: int
    n_windows: int
    context: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_predicted_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, nll_sum: float, windows: torch.Tensor, context: int) -> PerplexityResult:
        """The result of ``nll_sum`` over ``windows``: every token of a window but the first is predicted."""
        n = windows.shape[0] * (context - 1)
        return cls(ppl=_perplexity_from_nll(nll_sum, n), nll_sum=nll_sum, n_predicted_tokens=n,
                   n_windows=windows.shape[0], context=context)


def corpus_tokens_per_window(context: int, bos_id: int | None) -> int:
    return context - 1 if bos_id is not None else context


def build_windows(token_ids: torch.Tensor, *, context: int, bos_id: int | None,
                  max_tokens: int | None = None) -> torch.LongTensor:
    """The (n_windows, context) model inputs; see the module docstring for the layout."""
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    per_window = corpus_tokens_per_window(context, bos_id)
    n_windows = token_ids.numel() // per_window
    if n_windows == 0:
        raise ValueError(f"{token_ids.numel()} tokens do not fill one window of {per_window} corpus tokens")
    windows = token_ids[: n_windows * per_window].long().reshape(n_windows, per_window)
    if bos_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def _batch_nll_sum(model, windows_batch: torch.LongTensor) -> float:
    """Summed NLL of tokens 1.. of each window given the tokens before them (float64)."""
    logits = model(input_ids=windows_batch, use_cache=False).logits  # (batch, context, vocab)
    targets = windows_batch[:, 1:]
    nll_sum = torch.zeros((), dtype=torch.float64, device=windows_batch.device)
    # One window at a time keeps the float32 copy of the logits that cross_entropy makes small.
    for window_logits, window_targets in zip(logits[:, :-1], targets, strict=True):
        token_nll = F.cross_entropy(window_logits.float(), window_targets, reduction="none")
        nll_sum += token_nll.double().sum()
    return nll_sum.item()


def _perplexity_from_nll(nll_sum: float, n_tokens: int) -> float:
    mean_nll = nll_sum / n_tokens
    if not math.isfinite(mean_nll):  # nan too: a model whose outputs broke is as bad as it gets
        return float("inf")
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


def perplexity(model, token_ids: torch.Tensor, *, context: int = 512, bos_id: int | None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` (any causal LM returning ``.logits``) on the first ``max_tokens`` token ids.

    Non-overlapping windows of ``context`` tokens (layout in the module docstring), ``batch_size``
    windows per forward pass, losses summed in float64.
    """
    if streamer_of(model) is not None:  # loaded with stream=True: block by block
        from .streamed import streamed_perplexity  # built on this module's windows: it imports this one

        return streamed_perplexity(streamer_of(model), token_ids, context=context, bos_id=bos_id,
                                   max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    windows = build_windows(token_ids, context=context, bos_id=bos_id, max_tokens=max_tokens)
    device = input_device(model)
    nll_sum = 0.0
    with torch.inference_mode(), tqdm(total=len(windows), unit="window", desc="perplexity",
                                      disable=not progress) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            nll_sum += _batch_nll_sum(model, batch)
            bar.update(len(batch))
    return PerplexityResult.of(nll_sum, windows, context)

