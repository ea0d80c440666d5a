"""Running a model's own forward with some decoder blocks skipped, without touching any method.

Two places run a model with blocks skipped: prefix reuse (``capture.reuse``: the blocks before an
edited layer, whose output is already known) and layer streaming (``models.streaming``: every block
but the one loaded). Both use the two primitives here:

- ``skip_blocks(layers, skipped)``: for the duration, the chosen entries of the decoder
  ``ModuleList`` are a ``PassThrough`` that returns its hidden states unchanged; the blocks are put
  back in ``finally``, also on error;
- ``feed(module, hidden)`` (or ``with_hidden`` inside a pre-hook of one's own): a module starts from
  given hidden states, a forward pre-hook replacing its first input.

Why swap list entries: the model's forward loops over its ``ModuleList`` (``self.layers[:n]``) and
reads nothing from a block but its call, so a stand-in in the list is skipped by every family, with
the family's own masks, rotary embeddings and caches computed as usual. The alternatives:
- overwriting ``block.forward`` with an instance attribute (what this replaced) shadows the class
  method: it leaks if a cleanup is missed, confuses anything that wraps ``forward`` itself
  (accelerate's dispatch hooks do), and the block's hooks still fire on values it never computed;
- driving the blocks ourselves with the per-layer keyword arguments (position embeddings, masks,
  cache) recorded by forward pre-hooks would re-implement each family's layer loop (Gemma's
  per-layer mask and rotary choice, GPT-2's positional arguments, cache handling), and lm-eval calls
  the model's own forward, which would still run every block.
A ``PassThrough`` answers for the block it stands for: an attribute it lacks is the block's. Older
transformers read ``decoder_layer.attention_type`` (Gemma, Qwen) inside that loop, and code that
attaches hooks by name while blocks are skipped (the streamer's named hooks, the attention hook
points, which visit every layer's attention) finds the block's real parts. It owns none of them:
the model's ``parameters()`` leave the skipped blocks out for the duration. The skipped blocks' own
hooks do not fire (they are not called).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


class PassThrough(nn.Module):
    """Stands in for a decoder block: returns its hidden states (first argument) unchanged.

    ``tuple_output``: return ``(hidden_states,)``, as older transformers' decoder layers do."""

    def __init__(self, block: nn.Module, tuple_output: bool = False):
        super().__init__()
        self.__dict__["stands_for"] = block  # not a submodule: its weights stay out of this module's tree
        self.tuple_output = tuple_output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("stands_for")
            if block is None:
                raise
            return getattr(block, name)  # attention_type, self_attn, ...: the block's own

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.tuple_output else hidden


@contextmanager
def skip_blocks(layers: nn.ModuleList, skipped: Iterable[int], *, tuple_output: bool = False) -> Iterator[None]:
    """Blocks ``skipped`` of ``layers`` pass their input through for the duration (restored in ``finally``)."""
    originals = {j: layers[j] for j in skipped}
    try:
        for j, block in originals.items():
            layers[j] = PassThrough(block, tuple_output)
        yield
    finally:
        for j, block in originals.items():
            layers[j] = block


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A forward pre-hook's (args, kwargs) with the hidden states (first argument) replaced."""
    return ((hidden,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


@contextmanager
def feed(module: nn.Module, hidden: torch.Tensor, *, prepend: bool = True) -> Iterator[None]:
    """``module`` starts from ``hidden`` instead of its input for the duration (a forward pre-hook, run
    before the caller's own hooks unless ``prepend=False``, so that they see ``hidden``)."""
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: with_hidden(args, kwargs, hidden),
                                              with_kwargs=True, prepend=prepend)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["PassThrough", "feed", "skip_blocks", "with_hidden"]
