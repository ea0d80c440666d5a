"""Perplexity of a streamed model (``load_model(..., stream=True)``), and of attack variants that
share the blocks before the attacked layer.

The windows' hidden states go through the checkpoint block by block (``models.streaming``); a
weight attack edits its block as it is loaded. For several variants, the states entering the
first attacked layer are computed once and every variant continues from them (what
``capture.reuse.reuse_prefix`` does for a model in memory), and every later block is read once
for all of them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Mapping

import torch

from .perplexity import PerplexityResult, build_windows

# a variant: (the layer whose block it edits, a function returning the edit's context manager), or
# None for the unedited model
Variant = tuple[int, Callable[[], object]] | None


def _inputs(streamer, windows: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": windows[s:s + batch_size].to(streamer.device)} for s in range(0, len(windows), batch_size)]


def _nll(streamer, inputs: list[dict], states: list[torch.Tensor]) -> float:
    import torch.nn.functional as F

    total = 0.0
    with torch.inference_mode(), streamer.resident("head"):  # read once for every batch
        for batch, state in zip(inputs, states):
            logits = streamer.run_head(batch, state)
            targets = batch["input_ids"][:, 1:]
            for window_logits, window_targets in zip(logits[:, :-1], targets):
                total += float(F.cross_entropy(window_logits.float(), window_targets, reduction="sum").double())
    return total


def streamed_perplexity(streamer, token_ids: torch.Tensor, *, context: int = 512, bos_id: int | None,
                        max_tokens: int | None = None, batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """``evaluation.perplexity`` for a streamed model: the same windows, each block read once."""
    windows = build_windows(token_ids, context=context, bos_id=bos_id, max_tokens=max_tokens)
    inputs = _inputs(streamer, windows, batch_size)
    return PerplexityResult.of(_nll(streamer, inputs, streamer.run(inputs, progress=progress)), windows, context)


def _edit(variant: Variant) -> Callable[[int], object]:
    """The variant's edit while ``layer`` is loaded (``Streamer.run``'s ``edit``)."""
    def edit(layer: int):
        return variant[1]() if variant is not None and layer == variant[0] else nullcontext()
    return edit


def streamed_variants(streamer, token_ids: torch.Tensor, variants: Mapping[str, Variant], *, context: int = 512,
                      bos_id: int | None, max_tokens: int | None = None, batch_size: int = 4,
                      share_prefix: bool = True, progress: bool = True) -> dict[str, PerplexityResult]:
    """Perplexity of each variant on the same windows. With ``share_prefix`` the blocks before the
    first edited layer run once for all variants, and each later block is read once and run for every
    variant in turn (its edit entered and left around that variant's batches): reading a block costs
    about as much as running it on a few windows. It keeps one set of hidden states per variant (the
    spill, when on, holds them). Without ``share_prefix`` every variant runs from scratch."""
    from tqdm.auto import tqdm

    windows = build_windows(token_ids, context=context, bos_id=bos_id, max_tokens=max_tokens)
    inputs = _inputs(streamer, windows, batch_size)
    if not share_prefix:
        return {name: PerplexityResult.of(_nll(streamer, inputs, streamer.run(inputs, edit=_edit(variant),
                                                                             progress=progress)), windows, context)
                for name, variant in variants.items()}
    start = min((v[0] for v in variants.values() if v is not None), default=0)
    prefix = streamer.run(inputs, stop=start, progress=progress) if start else streamer.states_for(inputs)
    states = {name: prefix.copy() for name in variants}
    with torch.inference_mode():
        for layer in tqdm(range(start, len(streamer.blocks)), desc="blocks", unit="block", disable=not progress,
                          leave=False):
            with streamer.block(layer):
                for name, variant in variants.items():
                    with _edit(variant)(layer):
                        for i, batch in enumerate(inputs):
                            states[name][i] = streamer.run_block(layer, batch, states[name][i])
    return {name: PerplexityResult.of(_nll(streamer, inputs, states[name]), windows, context) for name in variants}
