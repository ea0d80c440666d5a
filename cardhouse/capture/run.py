"""Running prompts through a model with hooks attached, batch by batch."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..models.loading import LoadedModel
from ..models.streaming import streamer_of
from .batches import PromptBatch, batches
from .hooks import HookFn, hooks, parse_hook_name


def max_context(lm: LoadedModel) -> int | None:
    config = lm.model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def tokenize_prompts(lm: LoadedModel, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (BOS first when the model uses one), checked for length."""
    if not prompts:
        raise ValueError("no prompts given")
    limit = max_context(lm)
    token_lists = []
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty")
        ids = lm.encode(prompt)
        if limit and len(ids) > limit:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the model's context of {limit}")
        token_lists.append(ids)
    return token_lists


def run_batches(lm: LoadedModel, token_lists: Sequence[Sequence[int]],
                hooks_for: Callable[[PromptBatch], dict[str, HookFn]], *, batch_size: int = 8,
                progress: bool = True, desc: str = "forward") -> None:
    """Forward every batch through the model body (no LM head: the analyses need none).

    A streamed model (``load_model(..., stream=True)``) runs block by block instead: ``hooks_for``
    is called once per batch before the first block, and its hooks fire block by block, every batch
    through one block before the next block (the blocks after the last hooked one do not run); so a hook
    must take its batch from ``hooks_for``'s closure, never from state shared across batches."""
    run_inputs(lm, batches(token_lists, batch_size), -(-len(token_lists) // batch_size), hooks_for,
               progress=progress, desc=desc)


def run_inputs(lm: LoadedModel, batch_iter: Iterable[PromptBatch], n_batches: int,
               hooks_for: Callable[[PromptBatch], dict[str, HookFn]], *, progress: bool = True,
               desc: str = "forward") -> None:
    """Forward batches of any input kind (``batch.model_kwargs``: tokens or pixels) with hooks attached."""
    streamer = streamer_of(lm.model)
    if streamer is not None:
        return _run_streamed(streamer, list(batch_iter), hooks_for, progress)
    body = lm.model.base_model
    for batch in tqdm(batch_iter, total=n_batches, desc=desc, disable=not progress, unit="batch", leave=False):
        with torch.inference_mode(), hooks(lm.model, hooks_for(batch)):
            device = lm.device  # hooks see tensors there; the batch (ids, mask, index) stays on the CPU
            body(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.model_kwargs.items()})


def _run_streamed(streamer, prompt_batches, hooks_for, progress) -> None:
    inputs = [{"input_ids": b.input_ids.to(streamer.device), "attention_mask": b.attention_mask.to(streamer.device)}
              for b in prompt_batches]
    by_layer = []  # per batch: layer -> its named hooks
    for batch in prompt_batches:
        named: dict[int, dict] = {}
        for name, fn in hooks_for(batch).items():
            named.setdefault(parse_hook_name(name)[0], {})[name] = fn
        by_layer.append(named)
    # the hooks are all a streamed pass gives back: the blocks after the last hooked one are not read
    # (the massive-weight search's first pass looks at the middle layer only)
    stop = max((layer for named in by_layer for layer in named), default=-1) + 1
    streamer.run(inputs, hooks_for=lambda layer, i: hooks(streamer.model, by_layer[i].get(layer, {})),
                 stop=stop, progress=progress)
