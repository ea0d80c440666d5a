"""Padded batches of tokenized prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [batch, pos] (right-padded with 0)
    attention_mask: torch.Tensor  # [batch, pos] 1 for real tokens
    prompt_index: torch.Tensor  # [batch] index of each row in the original prompt list
    pixel_values: torch.Tensor | None = None  # image models read these instead of tokens
    extra: dict = field(default_factory=lambda: {"use_cache": False})  # further arguments of the model body

    @property
    def model_kwargs(self) -> dict:
        """What the model body is called with."""
        if self.pixel_values is not None:  # input_ids then only name the positions (see capture.inputs)
            return {"pixel_values": self.pixel_values, **self.extra}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.extra}


def batches(token_lists: Sequence[Sequence[int]], batch_size: int) -> Iterator[PromptBatch]:
    """Right-padded batches, grouped by length so that little compute goes to padding.

    Right padding keeps every real token at its true position, which matters here:
    position 0 is what makes the first token special under causal attention.
    """
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(token_lists[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(token_lists[i])] = torch.tensor(token_lists[i])
            mask[r, :len(token_lists[i])] = 1
        yield PromptBatch(ids, mask, torch.tensor(rows))
